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


def frame_roll(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge direction [E, 3], roll [E]) of user-supplied edge frames R [E, 3, 3] (rotations with
    R·r̂ = +Y, e.g. the l = 1 block of a model's own Wigner-D): R = Ry(roll)·so3.edge_rotation(r̂).
    Both keep their gradients (forces through a frame that depends on the positions)."""
    if frame.dim() != 3 or frame.shape[1:] != (3, 3):
        raise InputError(f"frame must be rotation matrices [E, 3, 3], got {tuple(frame.shape)}")
    v = frame[:, 1, :]
    M = frame @ so3.edge_rotation(v).transpose(-1, -2)
    return v, torch.atan2(M[:, 0, 2], M[:, 0, 0])


def check_degrees(lmax: int, mmax: int) -> None:
    if lmax < 0 or not 0 <= mmax <= lmax:
        raise InputError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")


class EdgeRotation(nn.Module):
    """Wigner-D blocks of the edge frames, and the rotations l-major <-> m-major edge frame.

    `wigner(edge_vec, roll=None, frame=None)` returns the per-l blocks (Σ(2l+1)² values per edge,
    never a dense matrix; on the Triton backend not even those: the kernels rebuild them); the frame
    maps each edge onto +Y, turned about it by `roll` [E] radians, or is given as rotation matrices
    `frame` [E, 3, 3]. Any list of per-l blocks [E, 2l+1, 2l+1] works as D too (the PyTorch path).
    `to_edge(x, D)`: [E, (lmax+1)^2, C] l-major global frame -> [E, K_m, C] m-major edge frame,
    rows with |m| > mmax dropped; `from_edge(y, D)` is its transpose (dropped rows come back as 0),
    times EquiformerV2's √((2l+1)/(2·mmax+1)) on degrees l > mmax when `rescale`.
    """

    def __init__(self, lmax: int, mmax: int | None = None, backend: str = "auto", rescale: bool = False):
        super().__init__()
        mmax = lmax if mmax is None else mmax
        check_degrees(lmax, mmax)
        self.lmax, self.mmax, self.backend = lmax, mmax, _backend.check_backend(backend)
        self.rescale = rescale
        self.register_buffer("perm", so3.l_to_m_major(lmax, mmax), persistent=False)  # l-major row of each m-major row

    @property
    def num_rows(self) -> int:
        return len(self.perm)

    def _triton(self, t: torch.Tensor, D) -> bool:
        return getattr(D, "edge_vec", None) is not None and \
            _backend.resolve(self.backend, t.device, self.lmax, t.dtype) == "triton"

    def wigner(self, edge_vec: torch.Tensor | None = None, roll: torch.Tensor | None = None,
               frame: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The per-l blocks (an `EdgeFrame`: a list that also holds edge_vec and roll). `roll` [E]
        (radians) turns each frame about its edge axis; `frame` [E, 3, 3] gives the frames instead."""
        if frame is not None:
            if edge_vec is not None or roll is not None:
                raise InputError("EdgeRotation.wigner: give edge_vec (and roll) or frame, not both")
            edge_vec, roll = frame_roll(frame)
        if edge_vec is None:
            raise InputError("EdgeRotation.wigner: give edge_vec or frame")
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
            return kernels.rotate_back(y, D.edge_vec, self.lmax, self.mmax, backend=self.backend, roll=D.roll,
                                       rescale=self.rescale)
        out = so3.rotate_from_m_major(y, D, self.mmax)
        if self.rescale and self.mmax < self.lmax:
            out = out * kernels._torch_impl.rescale_factors(self.lmax, self.mmax).to(out.device, out.dtype).view(1, -1, 1)
        return out


class SO2Linear(nn.Module):
    """m-major [E, K_m, C_in] -> [E, K_m, C_out], plus `extra_scalars` invariant outputs per edge
    taken from the m = 0 map (used for gates and attention logits).

    `scale` (optional) multiplies the input first, the radial (distance) modulation of eSCN:
    [E, 1, C_in] per channel, [E, Σ_m n_m, C_in] (or flat [E, Σ_m n_m·C_in]) per (m, l) as
    fairchem's radial MLPs produce it (shared by the ±m rows), or [E, K_m, C_in] per row; the
    kernels fuse it into the GEMM. `extra_first` puts the extra outputs in the first rows of the
    m = 0 weight (fairchem's layout) instead of the last, so fairchem weights load unchanged:
    m0.weight = fc_m0.weight, w[m-1] = so2_m_conv[m-1].fc.weight.T.
    """

    def __init__(self, lmax: int, mmax: int, in_channels: int, out_channels: int, extra_scalars: int = 0,
                 backend: str = "auto", extra_first: bool = False):
        super().__init__()
        check_degrees(lmax, mmax)
        self.lmax, self.mmax, self.backend = lmax, mmax, _backend.check_backend(backend)
        self.cin, self.cout, self.extra = in_channels, out_channels, extra_scalars
        self.extra_first = extra_first
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
                                  backend=self.backend, extra_first=self.extra_first)


def m_major_degrees(lmax: int, mmax: int) -> torch.Tensor:
    """Degree l of each m-major row."""
    return torch.tensor([int(math.isqrt(i)) for i in so3.l_to_m_major(lmax, mmax).tolist()])


def make_activation(act, lmax: int, mmax: int, channels: int) -> nn.Module:
    """"gate" (GateActivation), "s2" (S2Activation), "separable_s2" (SeparableS2Activation, on the
    default grid of activation.s2_grid) or any module act(x, scalars) with a `num_scalars`."""
    from . import activation as A

    if isinstance(act, nn.Module):
        if not hasattr(act, "num_scalars"):
            raise InputError(f"activation {type(act).__name__} needs a `num_scalars` attribute (how many invariant "
                             "scalars it takes from the first SO(2) linear; 0 for none)")
        return act
    if act == "gate":
        return A.GateActivation(m_major_degrees(lmax, mmax), lmax, channels)
    if act == "s2":
        return A.S2Activation(lmax, mmax)
    if act == "separable_s2":
        return A.SeparableS2Activation(lmax, mmax, channels)
    raise InputError(f"unknown activation {act!r}: use 'gate', 's2', 'separable_s2' or a module")


class SO2Convolution(nn.Module):
    """Edge-frame message MLP: SO2Linear (C_in -> hidden, + the activation's scalars + extra
    scalars) -> activation -> SO2Linear (hidden -> C_out). Returns (m-major output, the extra
    invariant scalars). `act`: see `make_activation` (default the gate); `extra_first` as in
    SO2Linear (fairchem's layout: the activation's scalars, then the extra ones, then the rest)."""

    def __init__(self, lmax: int, mmax: int, in_channels: int, hidden: int, out_channels: int,
                 extra_scalars: int = 0, backend: str = "auto", act="gate", extra_first: bool = False):
        super().__init__()
        self.act = make_activation(act, lmax, mmax, hidden)
        self.extra = extra_scalars
        self.lin1 = SO2Linear(lmax, mmax, in_channels, hidden, extra_scalars=self.act.num_scalars + extra_scalars,
                              backend=backend, extra_first=extra_first)
        self.lin2 = SO2Linear(lmax, mmax, hidden, out_channels, backend=backend)

    @property
    def gate(self) -> nn.Module:
        """The activation (named `gate` before activations were pluggable)."""
        return self.act

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None):
        h, s = self.lin1(x, scale)
        n = self.act.num_scalars
        y, _ = self.lin2(self.act(h, s[:, :n]))
        return y, s[:, n:]
