"""Triton kernel: (rotate back +) attention-weighted aggregation onto destination nodes.

Layer 1 (the @triton.jit function only). Edges are sorted by dst, so program (d, channel tile)
owns the whole segment ptr[d]..ptr[d+1]: an online-softmax pass for the per-head max and
denominator, then per degree l a pass that rotates each message back (D^T, from the edge's angles,
see rotate.py) and adds alpha · v into float32 accumulators. No atomics, so the result is
deterministic; segments longer than BLOCK_E are walked in chunks, empty segments write zeros.
Without ROTATE the values are l-major [E, K, C] rows of any K, summed row by row.
"""
import triton
import triton.language as tl

from ._wigner import (_aggregate_l0, _aggregate_l1, _aggregate_l2, _aggregate_l3, _aggregate_l4, _aggregate_l5,
                      _aggregate_l6)
from .rotate_io import cast_out, softmax_weights


@triton.jit
def aggregate_kernel(out_ptr, y_ptr, logit_ptr, ptr_ptr, vec_ptr, roll_ptr, C, H, CH, KM,
                     K: tl.constexpr, LMAX: tl.constexpr, MMAX: tl.constexpr, ROTATE: tl.constexpr,
                     HAS_ROLL: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[d] = Σ_{e in segment d} softmax(logits)[e, head(c)] · (D_e^T y_e if ROTATE else y_e)."""
    d = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = c < C
    head = tl.where(mc, c // CH, 0)
    lo = tl.load(ptr_ptr + d)
    hi = tl.load(ptr_ptr + d + 1)
    mx = tl.full([BLOCK_C], -1e30, tl.float32)
    s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_E):  # online softmax statistics, float32
        offs_e = start + tl.arange(0, BLOCK_E)
        lg = tl.load(logit_ptr + offs_e[:, None] * H + head[None, :], mask=(offs_e < hi)[:, None] & mc[None, :],
                     other=float("-inf")).to(tl.float32)
        new = tl.maximum(mx, tl.max(lg, axis=0))
        s = s * tl.exp(mx - new) + tl.sum(tl.exp(lg - new[None, :]), axis=0)
        mx = new
    inv_s = tl.where(s > 0, 1.0 / s, 0.0)
    d64 = d.to(tl.int64)
    if ROTATE:
        _aggregate_l0(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr, roll_ptr, LMAX,
                      MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
        if LMAX >= 1:
            _aggregate_l1(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr,
                          roll_ptr, LMAX, MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
        if LMAX >= 2:
            _aggregate_l2(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr,
                          roll_ptr, LMAX, MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
        if LMAX >= 3:
            _aggregate_l3(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr,
                          roll_ptr, LMAX, MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
        if LMAX >= 4:
            _aggregate_l4(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr,
                          roll_ptr, LMAX, MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
        if LMAX >= 5:
            _aggregate_l5(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr,
                          roll_ptr, LMAX, MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
        if LMAX >= 6:
            _aggregate_l6(out_ptr, y_ptr, d64, lo, hi, c, mc, C, KM, logit_ptr, head, H, mx, inv_s, vec_ptr,
                          roll_ptr, LMAX, MMAX, HAS_ROLL, BLOCK_E, BLOCK_C)
    else:
        for row in range(K):  # a loop, not unrolled: 25 unrolled copies spilled 104 B under Triton 3.6
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            for start in range(lo, hi, BLOCK_E):
                offs_e = start + tl.arange(0, BLOCK_E)
                me = offs_e < hi
                alpha = softmax_weights(logit_ptr, offs_e, me, head, mc, H, mx, inv_s)
                v = tl.load(y_ptr + offs_e.to(tl.int64)[:, None] * (K * C) + row * C + c[None, :],
                            mask=me[:, None] & mc[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(v * alpha, axis=0)
            tl.store(out_ptr + d64 * (K * C) + row * C + c, cast_out(acc, out_ptr.dtype.element_ty), mask=mc)
