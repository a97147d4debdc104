"""Pure-PyTorch twins of the Triton ops: the oracle for tests and the CPU implementation.

They compose the reference layers' math (egnn.so3.wigner_D, l<->m-major permutation, per-m
matmuls, segment softmax) and are fully differentiable, so `gradcheck` applies to them directly.
Shapes follow the EquiformerV2/fairchem layout: l-major [rows, (lmax+1)^2, C], m-major
[E, K_m, C] (rows with |m| > mmax left out).
"""
from __future__ import annotations

import functools

import torch

from egnn import so3


@functools.lru_cache(maxsize=None)
def _perms(lmax: int, mmax: int):
    perm = so3.l_to_m_major(lmax, mmax)
    inv = torch.full(((lmax + 1) ** 2,), len(perm), dtype=torch.long)  # dropped rows -> a zero row
    inv[perm] = torch.arange(len(perm))
    return perm, inv


def _wigner(edge_vec: torch.Tensor, lmax: int, dtype) -> list[torch.Tensor]:
    return [d.to(dtype) for d in so3.wigner_D(edge_vec.to(torch.promote_types(dtype, torch.float32)), lmax)]


def gather_message(x, e, src, dst):
    """[x_src | x_dst | e] along channels (x and/or e may be None)."""
    parts = []
    if x is not None:
        parts += [x.index_select(0, src), x.index_select(0, dst)]
    if e is not None:
        parts.append(e)
    return torch.cat(parts, dim=-1)


def rotate_to_edge(x, e, src, dst, edge_vec, lmax: int, mmax: int):
    """Gather [x_src | x_dst | e] ([E, (lmax+1)^2, 2C_x + C_e]), rotate into each edge frame and
    permute to m-major: [E, K_m, 2C_x + C_e]."""
    msg = gather_message(x, e, src, dst)
    acc = torch.promote_types(msg.dtype, torch.float32)
    D = _wigner(edge_vec, lmax, acc)
    perm, _ = _perms(lmax, mmax)
    return so3.rotate(msg.to(acc), D).index_select(1, perm.to(msg.device)).to(msg.dtype)


def rotate_back(y, edge_vec, lmax: int, mmax: int):
    """m-major edge frame [E, K_m, C] -> l-major global frame [E, (lmax+1)^2, C] (D^T; rows with
    |m| > mmax come back as zero)."""
    acc = torch.promote_types(y.dtype, torch.float32)
    _, inv = _perms(lmax, mmax)
    z = torch.cat([y.to(acc), y.new_zeros(y.shape[0], 1, y.shape[2], dtype=acc)], 1).index_select(1, inv.to(y.device))
    return so3.rotate_back(z, _wigner(edge_vec, lmax, acc)).to(y.dtype)


def so2_linear(x, scale, w0, b0, ws, lmax: int, mmax: int, cout: int):
    """The m-major SO(2) linear of `egnn.nn.SO2Linear`: x [E, K_m, C_in] (times `scale`
    [E, 1, C_in] if given), m = 0 block `w0` [n0·C_out + X, n0·C_in] + `b0`, per m > 0
    `ws[m-1]` = [W1 | W2] [n·C_in, 2n·C_out]. Returns (y [E, K_m, C_out], extra [E, X])."""
    if scale is not None:
        x = x * scale
    E = x.shape[0]
    sizes = so3.m_major_sizes(lmax, mmax)
    n0 = sizes[0]
    y0 = torch.nn.functional.linear(x[:, :n0].reshape(E, -1), w0, b0)
    out = [y0[:, :n0 * cout].reshape(E, n0, cout)]
    row = n0
    for m, n in enumerate(sizes[1:], start=1):
        xm = x[:, row:row + 2 * n].reshape(E, 2, -1)
        y = (xm @ ws[m - 1]).view(E, 2, 2, n, cout)
        out += [y[:, 0, 0] - y[:, 1, 1], y[:, 0, 1] + y[:, 1, 0]]
        row += 2 * n
    return torch.cat(out, dim=1), y0[:, n0 * cout:]


def segment_softmax(logits, dst, num_nodes: int):
    """Softmax of logits [E, H] over the edges of each destination, float32 accumulation."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    idx = dst.unsqueeze(1).expand(-1, z.shape[1])
    zmax = z.new_full((num_nodes, z.shape[1]), -torch.inf).scatter_reduce(0, idx, z, "amax", include_self=True)
    ez = torch.exp(z - zmax.index_select(0, dst).detach())
    return ez / z.new_zeros(num_nodes, z.shape[1]).index_add_(0, dst, ez).index_select(0, dst)


def attention_aggregate(values, logits, dst, num_nodes: int, edge_vec=None, lmax: int = 0, mmax: int = 0):
    """out[d] = Σ_{e->d} softmax_e(logits)[h] · v_e[:, channels of head h], in float32, cast back.

    With `edge_vec`, `values` are m-major edge-frame messages and v_e = rotate_back(values) (the
    fused rotate back + aggregation); without, `values` are l-major [E, K, C] already."""
    acc = torch.promote_types(values.dtype, torch.float32)
    v = values.to(acc)
    if edge_vec is not None:
        v = rotate_back(v, edge_vec, lmax, mmax)
    E, K, C = v.shape
    H = logits.shape[1]
    alpha = segment_softmax(logits, dst, num_nodes).to(acc)
    w = (v.view(E, K, H, C // H) * alpha.view(E, 1, H, 1)).view(E, K, C)
    out = torch.zeros((num_nodes, K, C), dtype=acc, device=values.device).index_add_(0, dst, w)
    return out.to(values.dtype)
