"""Constant tables the Triton kernels read (built once per lmax and device, a few kB).

The kernels rebuild every Wigner-D block on the fly from the edge vector, as egnn.so3 does:
D^l(R) = Y^l(R P) · pinv(Y^l(P)) for fixed points P. Inside a kernel Y^l is evaluated as a
homogeneous polynomial of degree l (exact on unit vectors): Y^l_i(v) = Σ_ab C[l,a,b,i] x^a y^b z^(l-a-b).

Float32 layout (offsets in elements): points P [NPTS, 3] at 0; pinv [LMAX+1, NPTS, 16] at 64;
monomial coefficients C [LMAX+1, LMAX+1, LMAX+1, 16] after that. Rows are padded to 16 (2l+1 <= 13).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from egnn import so3

PINV_OFFSET = 64
MAX_LMAX = 6


@functools.lru_cache(maxsize=None)
def _monomial_coefficients(lmax: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    v = rng.normal(size=(400, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    Y = so3.spherical_harmonics(torch.from_numpy(v), lmax).numpy()
    C = np.zeros((lmax + 1, lmax + 1, lmax + 1, 16))
    for l in range(lmax + 1):
        ab = [(a, b) for a in range(l + 1) for b in range(l + 1 - a)]
        M = np.stack([v[:, 0] ** a * v[:, 1] ** b * v[:, 2] ** (l - a - b) for a, b in ab], 1)
        coef, *_ = np.linalg.lstsq(M, Y[:, l * l:(l + 1) ** 2], rcond=None)
        assert np.abs(M @ coef - Y[:, l * l:(l + 1) ** 2]).max() < 1e-9, "SH is not a degree-l polynomial"
        coef[np.abs(coef) < 1e-12] = 0.0
        for t, (a, b) in enumerate(ab):
            C[l, a, b, :2 * l + 1] = coef[t]
    return C


@functools.lru_cache(maxsize=None)
def _tables_np(lmax: int) -> np.ndarray:
    P, pinvs = so3._fit_constants(lmax)  # points as columns [3, n]; pinv_l [n, 2l+1]
    n = P.shape[1]
    pinv = np.zeros((lmax + 1, n, 16))
    for l in range(lmax + 1):
        pinv[l, :, :2 * l + 1] = pinvs[l]
    head = np.zeros(PINV_OFFSET)
    head[:3 * n] = P.T.reshape(-1)
    return np.concatenate([head, pinv.reshape(-1), _monomial_coefficients(lmax).reshape(-1)])


def num_points(lmax: int) -> int:
    return 2 * lmax + 1


_cache: dict = {}


def tables(lmax: int, mmax: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 constants, int32 m-major row of each l-major row, -1 where |m| > mmax)."""
    key = (lmax, mmax, str(device))
    if key not in _cache:
        rows = torch.full(((lmax + 1) ** 2,), -1, dtype=torch.int32)
        rows[so3.l_to_m_major(lmax, mmax)] = torch.arange(len(so3.l_to_m_major(lmax, mmax)), dtype=torch.int32)
        _cache[key] = (torch.tensor(_tables_np(lmax), dtype=torch.float32, device=device), rows.to(device))
    return _cache[key]


def m_major_meta(lmax: int, mmax: int) -> list[tuple[int, int]]:
    """(first m-major row, number of l) of each m = 0..mmax (m > 0: +m rows then -m rows)."""
    out, row = [], 0
    for m, n in enumerate(so3.m_major_sizes(lmax, mmax)):
        out.append((row, n))
        row += n if m == 0 else 2 * n
    return out
