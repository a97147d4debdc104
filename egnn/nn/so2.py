"""eSCN/EquiformerV2 message transform: rotate into each edge's frame, SO(2) linear, rotate back.

In the edge frame (edge direction on +Y) a rotation about the edge axis turns each (+m, -m) pair of
every degree l by the angle m·phi, so a linear map that commutes with it may mix degrees but
only within one m: a plain matrix on the m = 0 rows, and [[W1, -W2], [W2, W1]] on each ±m pair.
That is the SO(2) linear; everything here is in the m-major row order of `so3.l_to_m_major`.

Every layer takes `backend="auto" | "triton" | "torch"` (egnn.kernels.backend) and calls the ops of
egnn.kernels, which hold the one implementation of the maths (Triton kernels and their PyTorch twins).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels, so3
from ..errors import InputError
from ..kernels import backend as _backend


class EdgeFrame(list):
    """The per-l Wigner-D blocks of a set of edges (a list) that also carries the edge vectors (and
    an optional roll), so the Triton path can rebuild D inside its kernels instead of reading it.
    On the Triton backend the blocks are only computed if something indexes them."""

    def __init__(self, edge_vec: torch.Tensor, lmax: int, lazy: bool, roll: torch.Tensor | None = None):
        super().__init__([] if lazy else _blocks(edge_vec, lmax, roll))
        self.edge_vec, self.lmax, self.roll, self._lazy = edge_vec, lmax, roll, lazy

    def _fill(self):
        if self._lazy:
            self._lazy = False
            super().extend(_blocks(self.edge_vec, self.lmax, self.roll))

    def __getitem__(self, i):
        self._fill()
        return super().__getitem__(i)

    def __len__(self):
        self._fill()
        return super().__len__()

    def __iter__(self):
        self._fill()
        return super().__iter__()


def _blocks(edge_vec, lmax, roll):
    D = so3.wigner_D(edge_vec, lmax)
    if roll is None:
        return D
    c, s = torch.cos(roll).to(edge_vec.dtype), torch.sin(roll).to(edge_vec.dtype)
    z, o = torch.zeros_like(c), torch.ones_like(c)
    Ry = torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)
    return [a @ d for a, d in zip(so3.wigner_D_from_matrix(Ry, lmax), D)]


def check_degrees(lmax: int, mmax: int) -> None:
    if lmax < 0 or not 0 <= mmax <= lmax:
        raise InputError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")


class EdgeRotation(nn.Module):
    """Wigner-D blocks of the edge frames, and the rotations l-major <-> m-major edge frame.

    `wigner(edge_vec)` returns the per-l blocks (Σ(2l+1)² values per edge, never a dense matrix);
    `to_edge(x, D)`: [E, (lmax+1)^2, C] l-major global frame -> [E, K_m, C] m-major edge frame,
    rows with |m| > mmax dropped; `from_edge(y, D)` is its transpose (dropped rows come back as 0).
    """

    def __init__(self, lmax: int, mmax: int | None = None, backend: str = "auto"):
        super().__init__()
        mmax = lmax if mmax is None else mmax
        check_degrees(lmax, mmax)
        self.lmax, self.mmax, self.backend = lmax, mmax, _backend.check_backend(backend)
        self.register_buffer("perm", so3.l_to_m_major(lmax, mmax), persistent=False)  # l-major row of each m-major row

    @property
    def num_rows(self) -> int:
        return len(self.perm)

    def _triton(self, t: torch.Tensor, D) -> bool:
        return getattr(D, "edge_vec", None) is not None and \
            _backend.resolve(self.backend, t.device, self.lmax, t.dtype) == "triton"

    def wigner(self, edge_vec: torch.Tensor, roll: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The per-l blocks (an `EdgeFrame`: a list that also holds edge_vec and roll). `roll` [E]
        (radians) turns each frame about its edge axis."""
        lazy = _backend.resolve(self.backend, edge_vec.device, self.lmax, edge_vec.dtype) == "triton"
        if lazy:  # validated once per edge_vec tensor (no host sync per call, none under graph capture)
            kernels.ops.check_once("edge_vec", edge_vec, so3._check_vectors)
        return EdgeFrame(edge_vec, self.lmax, lazy, roll)

    def to_edge(self, x: torch.Tensor, D: list[torch.Tensor]) -> torch.Tensor:
        if self._triton(x, D):
            return kernels.rotate_to_edge(None, x, None, None, D.edge_vec, self.lmax, self.mmax, backend=self.backend,
                                          roll=D.roll)
        return so3.rotate_to_m_major(x, D, self.mmax)

    def from_edge(self, y: torch.Tensor, D: list[torch.Tensor]) -> torch.Tensor:
        if self._triton(y, D):
            return kernels.rotate_back(y, D.edge_vec, self.lmax, self.mmax, backend=self.backend, roll=D.roll)
        return so3.rotate_from_m_major(y, D, self.mmax)


class SO2Linear(nn.Module):
    """m-major [E, K_m, C_in] -> [E, K_m, C_out], plus `extra_scalars` invariant outputs per edge
    taken from the m = 0 map (used for gates and attention logits).

    `scale` (optional, broadcastable to the input, e.g. [E, 1, C_in]) multiplies the input first:
    the radial (distance) modulation of eSCN.
    """

    def __init__(self, lmax: int, mmax: int, in_channels: int, out_channels: int, extra_scalars: int = 0,
                 backend: str = "auto"):
        super().__init__()
        check_degrees(lmax, mmax)
        self.lmax, self.mmax, self.backend = lmax, mmax, _backend.check_backend(backend)
        self.cin, self.cout, self.extra = in_channels, out_channels, extra_scalars
        self.sizes = so3.m_major_sizes(lmax, mmax)  # number of l per m
        n0 = self.sizes[0]
        self.m0 = nn.Linear(n0 * in_channels, n0 * out_channels + extra_scalars)
        self.w = nn.ParameterList()
        for n in self.sizes[1:]:
            w = torch.randn(n * in_channels, 2 * n * out_channels) / math.sqrt(2 * n * in_channels)
            self.w.append(nn.Parameter(w))  # [W1 | W2]
        with torch.no_grad():
            self.m0.weight.mul_(1.0 / math.sqrt(2.0))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None):
        return kernels.so2_linear(x, scale, self.m0.weight, self.m0.bias, list(self.w), self.lmax, self.mmax, self.cout,
                                  backend=self.backend)


def m_major_degrees(lmax: int, mmax: int) -> torch.Tensor:
    """Degree l of each m-major row."""
    return torch.tensor([int(math.isqrt(i)) for i in so3.l_to_m_major(lmax, mmax).tolist()])


class SO2Convolution(nn.Module):
    """Edge-frame message MLP: SO2Linear (C_in -> hidden, + gates + extra scalars) -> gate -> SO2Linear
    (hidden -> C_out). Returns (m-major output, the extra invariant scalars)."""

    def __init__(self, lmax: int, mmax: int, in_channels: int, hidden: int, out_channels: int,
                 extra_scalars: int = 0, backend: str = "auto"):
        super().__init__()
        from .activation import GateActivation

        self.gate = GateActivation(m_major_degrees(lmax, mmax), lmax, hidden)
        self.extra = extra_scalars
        self.lin1 = SO2Linear(lmax, mmax, in_channels, hidden, extra_scalars=self.gate.num_gates + extra_scalars,
                              backend=backend)
        self.lin2 = SO2Linear(lmax, mmax, hidden, out_channels, backend=backend)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None):
        h, s = self.lin1(x, scale)
        gates, extra = s[:, :self.gate.num_gates], s[:, self.gate.num_gates:]
        y, _ = self.lin2(self.gate(h, gates))
        return y, extra
