"""Activations of equivariant features: the gate (SiLU on l = 0, sigmoid gates from invariant
scalars on l > 0) and EquiformerV2's S2 activations on a sphere grid (plain and separable).

Each takes (x, scalars) and says how many invariant scalars it needs (`num_scalars`), so
`SO2Convolution(act=...)` can request them as extra m = 0 outputs of its first SO(2) linear.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


class GateActivation(nn.Module):
    """x [rows, K, C] (l-major or m-major, given by `row_l`, the degree of each row) and
    gates [rows, lmax·C] -> SiLU(x_{l=0}), x_{l>0} · sigmoid(gate_{l, c})."""

    def __init__(self, row_l: torch.Tensor, lmax: int, channels: int):
        super().__init__()
        if (row_l == 0).nonzero().flatten().tolist() != [0]:
            raise InputError("GateActivation: row 0 must be the only l = 0 row (l-major and m-major orders)")
        self.lmax, self.channels = lmax, channels
        self.register_buffer("row_l", row_l.clone(), persistent=False)
        self.register_buffer("gate_row", row_l[1:] - 1, persistent=False)  # gate of each row l > 0

    @property
    def num_gates(self) -> int:
        return self.lmax * self.channels

    num_scalars = num_gates

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(gates).view(-1, self.lmax, self.channels).index_select(1, self.gate_row)
        x0, rest = x.split([1, x.shape[1] - 1], dim=1)
        return torch.cat([torch.nn.functional.silu(x0), rest * g], dim=1)


def s2_grid(lmax: int, mmax: int, resolution: tuple[int, int] | None = None, rescale: bool = False):
    """(to_grid [G, K_m], from_grid [K_m, G]) for m-major edge-frame rows |m| <= mmax: the real
    spherical harmonics (egnn.so3, y polar) at G = lat x long points (latitudes at the midpoints of
    `lat` equal bands, longitudes equally spaced; default 2(lmax+1) x (2·mmax+1), +2 when
    mmax = lmax, as EquiformerV2), and the least-squares projection back. `rescale` multiplies
    degrees l > mmax by √((2l+1)/(2·mmax+1)) both ways (EquiformerV2's grid rescale)."""
    import math

    from .. import so3

    lat, lon = resolution or (2 * (lmax + 1), 2 * mmax + 1 + (2 if mmax == lmax else 0))
    beta = (torch.arange(lat, dtype=torch.float64) + 0.5) * math.pi / lat
    alpha = torch.arange(lon, dtype=torch.float64) * 2 * math.pi / lon
    b, a = torch.meshgrid(beta, alpha, indexing="ij")
    pts = torch.stack([b.sin() * a.sin(), b.cos(), b.sin() * a.cos()], -1).reshape(-1, 3)
    Y = so3.spherical_harmonics(pts, lmax)[:, so3.l_to_m_major(lmax, mmax)]  # [G, K_m]
    to_grid, from_grid = Y, torch.linalg.pinv(Y)
    if rescale and mmax < lmax:
        f = torch.tensor([math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0
                          for l in so3.l_to_m_major(lmax, mmax).float().sqrt().floor().long().tolist()],
                         dtype=torch.float64)
        to_grid, from_grid = to_grid * f, from_grid * f[:, None]
    return to_grid, from_grid  # float64: cast with the module (.to(dtype)) or on use


class S2Activation(nn.Module):
    """SiLU applied pointwise on a sphere grid: x [E, K_m, C] (m-major edge-frame rows) -> grid ->
    SiLU -> back. `to_grid` [G, K_m] and `from_grid` [K_m, G] default to `s2_grid(lmax, mmax)`;
    pass a model's own matrices (e.g. fairchem's SO3_Grid) to reproduce it exactly."""

    num_scalars = 0

    def __init__(self, lmax: int, mmax: int, to_grid: torch.Tensor | None = None,
                 from_grid: torch.Tensor | None = None):
        super().__init__()
        if to_grid is None or from_grid is None:
            to_grid, from_grid = s2_grid(lmax, mmax)
        self.register_buffer("to_grid", to_grid.clone(), persistent=False)
        self.register_buffer("from_grid", from_grid.clone(), persistent=False)

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.nn.functional.silu(torch.matmul(self.to_grid.to(x.dtype), x))  # [E, G, C]
        return torch.matmul(self.from_grid.to(x.dtype), g)


class SeparableS2Activation(S2Activation):
    """EquiformerV2's separable S2 activation: the l = 0 row is SiLU of C separate invariant
    scalars (extra m = 0 outputs of the preceding SO(2) linear), every other row comes from the
    S2 activation of all rows."""

    def __init__(self, lmax: int, mmax: int, channels: int, to_grid: torch.Tensor | None = None,
                 from_grid: torch.Tensor | None = None):
        super().__init__(lmax, mmax, to_grid, from_grid)
        self.channels = channels

    @property
    def num_scalars(self) -> int:
        return self.channels

    def forward(self, x: torch.Tensor, scalars: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        return torch.cat([torch.nn.functional.silu(scalars).unsqueeze(1), out[:, 1:]], dim=1)
