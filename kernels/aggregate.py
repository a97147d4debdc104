"""Triton kernel: (rotate back +) attention-weighted aggregation onto destination nodes.

Layer 1 (the @triton.jit function only). Edges are sorted by dst, so program (d, channel tile)
owns the whole segment ptr[d]..ptr[d+1]: an online-softmax pass for the per-head max and
denominator, then per degree l a pass that rotates each message back (D^T, rebuilt on the fly)
and adds alpha · v into a float32 accumulator. No atomics, so the result is deterministic;
segments longer than BLOCK_E are walked in chunks, empty segments write zeros.
"""
import triton
import triton.language as tl

from .rotate import cast_out, edge_frame, load_m_major_degree, rotate_tile


@triton.jit
def _softmax_weights(logit_ptr, offs_e, me, head, mc, H, mx, inv_s):
    lg = tl.load(logit_ptr + offs_e[:, None] * H + head[None, :], mask=me[:, None] & mc[None, :],
                 other=float("-inf")).to(tl.float32)
    return tl.exp(lg - mx[None, :]) * inv_s[None, :]


@triton.jit
def _aggregate_degree(out_ptr, y_ptr, logit_ptr, vec_ptr, tab_ptr, row_ptr, d, lo, hi, offs_c, head, mc,
                      C, H, KM, mx, inv_s,
                      L: tl.constexpr, LMAX: tl.constexpr, NPTS: tl.constexpr, KP: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, ROTATE: tl.constexpr):
    K: tl.constexpr = (LMAX + 1) * (LMAX + 1)
    j = tl.arange(0, KP)
    mj = j < 2 * L + 1
    c = offs_c[None, None, :]
    acc = tl.zeros([KP, BLOCK_C], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_E):
        offs_e = start + tl.arange(0, BLOCK_E)
        me = offs_e < hi
        e64 = offs_e.to(tl.int64)
        alpha = _softmax_weights(logit_ptr, offs_e, me, head, mc, H, mx, inv_s)
        if ROTATE:
            r00, r01, r02, r10, r11, r12, r20, r21, r22 = edge_frame(vec_ptr, offs_e, me)
            y = load_m_major_degree(y_ptr, e64, me, offs_c, C, KM, row_ptr, L, KP)
            v = rotate_tile(y, tab_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, L, LMAX, NPTS, KP, True)
        else:
            v = tl.load(y_ptr + e64[:, None, None] * (K * C) + (L * L + j)[None, :, None] * C + c,
                        mask=me[:, None, None] & mj[None, :, None] & (c < C), other=0.0).to(tl.float32)
        acc += tl.sum(v * alpha[:, None, :], axis=0)
    d64 = d.to(tl.int64)
    tl.store(out_ptr + d64 * (K * C) + (L * L + j)[:, None] * C + offs_c[None, :],
             cast_out(acc, out_ptr.dtype.element_ty), mask=mj[:, None] & mc[None, :])


@triton.jit
def aggregate_kernel(out_ptr, y_ptr, logit_ptr, ptr_ptr, vec_ptr, tab_ptr, row_ptr, C, H, CH, KM,
                     LMAX: tl.constexpr, NPTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                     ROTATE: tl.constexpr):
    """out[d] = Σ_{e in segment d} softmax(logits)[e, head(c)] · (D_e^T y_e if ROTATE else y_e)."""
    d = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    head = tl.where(mc, offs_c // CH, 0)
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
    for l in tl.static_range(LMAX + 1):
        if l == 0:
            _aggregate_degree(out_ptr, y_ptr, logit_ptr, vec_ptr, tab_ptr, row_ptr, d, lo, hi, offs_c, head, mc,
                              C, H, KM, mx, inv_s, l, LMAX, NPTS, 1, BLOCK_E, BLOCK_C, ROTATE)
        elif l == 1:
            _aggregate_degree(out_ptr, y_ptr, logit_ptr, vec_ptr, tab_ptr, row_ptr, d, lo, hi, offs_c, head, mc,
                              C, H, KM, mx, inv_s, l, LMAX, NPTS, 4, BLOCK_E, BLOCK_C, ROTATE)
        elif l <= 3:
            _aggregate_degree(out_ptr, y_ptr, logit_ptr, vec_ptr, tab_ptr, row_ptr, d, lo, hi, offs_c, head, mc,
                              C, H, KM, mx, inv_s, l, LMAX, NPTS, 8, BLOCK_E, BLOCK_C, ROTATE)
        else:
            _aggregate_degree(out_ptr, y_ptr, logit_ptr, vec_ptr, tab_ptr, row_ptr, d, lo, hi, offs_c, head, mc,
                              C, H, KM, mx, inv_s, l, LMAX, NPTS, 16, BLOCK_E, BLOCK_C, ROTATE)
