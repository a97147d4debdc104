"""Triton kernel: the m-major SO(2) linear for every m in one launch.

Layer 1 (the @triton.jit function only). Grid (edge blocks, m, output-column tiles). For m = 0 a
plain [n0·C_in (+ KX extra inputs)] x [n0·C_out (+ NX extra outputs)] matmul plus bias; for m > 0
the ±m pair is a complex multiplication: y+ = x+ W1 − x− W2, y− = x+ W2 + x− W1, with
W = [W1 | W2] [n·C_in, 2n·C_out]. Rows of one m are contiguous in m-major order, so each
operand is a plain 2-D tile. The optional radial scale [E, C_in] multiplies the input on load.
Weights are packed in one buffer ([K, N] row-major per m at meta[m].woff).
"""
import triton
import triton.language as tl

from .rotate import cast_out


@triton.jit
def _mm(acc, a, w, IEEE: tl.constexpr):
    if IEEE:  # float32 (and every dtype under the interpreter, whose half-precision dot is unreliable)
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w, acc)


@triton.jit
def so2_linear_kernel(y_ptr, xo_ptr, x_ptr, xe_ptr, s_ptr, w_ptr, b_ptr, meta_ptr,
                      E, KMR, CIN, COUT, KX, NX,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1)
    row = tl.load(meta_ptr + 3 * m)
    n = tl.load(meta_ptr + 3 * m + 1)
    woff = tl.load(meta_ptr + 3 * m + 2)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    e64 = offs_e.to(tl.int64)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    K = n * CIN
    NY = n * COUT
    dt = w_ptr.dtype.element_ty
    if m == 0:
        N = NY + NX
        if tl.program_id(2) * BLOCK_N < N:
            mn = rn < N
            acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < K
                a = tl.load(x_ptr + e64[:, None] * (KMR * CIN) + rk[None, :], mask=me[:, None] & mk[None, :], other=0.0)
                if HAS_SCALE:
                    s = tl.load(s_ptr + e64[:, None] * CIN + (rk % CIN)[None, :], mask=me[:, None] & mk[None, :], other=0.0)
                    a = a.to(tl.float32) * s.to(tl.float32)
                w = tl.load(w_ptr + rk[:, None] * N + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
                acc = _mm(acc, a.to(dt), w, IEEE)
            for k0 in range(0, KX, BLOCK_K):  # extra inputs (the backward's gradient of the extra outputs)
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < KX
                a = tl.load(xe_ptr + e64[:, None] * KX + rk[None, :], mask=me[:, None] & mk[None, :], other=0.0)
                w = tl.load(w_ptr + (K + rk)[:, None] * N + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
                acc = _mm(acc, a.to(dt), w, IEEE)
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + e64[:, None] * (KMR * COUT) + rn[None, :], cast_out(acc, y_ptr.dtype.element_ty),
                     mask=me[:, None] & (rn < NY)[None, :])
            tl.store(xo_ptr + e64[:, None] * NX + (rn - NY)[None, :], cast_out(acc, xo_ptr.dtype.element_ty),
                     mask=me[:, None] & (rn >= NY)[None, :] & mn[None, :])
    else:
        if tl.program_id(2) * BLOCK_N < NY:
            mn = rn < NY
            accp = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
            accm = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
            xp = x_ptr + e64[:, None] * (KMR * CIN) + row * CIN
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < K
                mask = me[:, None] & mk[None, :]
                a = tl.load(xp + rk[None, :], mask=mask, other=0.0).to(tl.float32)
                b = tl.load(xp + K + rk[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_SCALE:
                    s = tl.load(s_ptr + e64[:, None] * CIN + (rk % CIN)[None, :], mask=mask, other=0.0).to(tl.float32)
                    a = a * s
                    b = b * s
                nb = (-b).to(dt)  # negate in float32 (the interpreter keeps bfloat16 as raw bits)
                a = a.to(dt)
                b = b.to(dt)
                wmask = mk[:, None] & mn[None, :]
                w1 = tl.load(w_ptr + woff + rk[:, None] * (2 * NY) + rn[None, :], mask=wmask, other=0.0)
                w2 = tl.load(w_ptr + woff + rk[:, None] * (2 * NY) + NY + rn[None, :], mask=wmask, other=0.0)
                accp = _mm(accp, a, w1, IEEE)
                accp = _mm(accp, nb, w2, IEEE)
                accm = _mm(accm, a, w2, IEEE)
                accm = _mm(accm, b, w1, IEEE)
            yp = y_ptr + e64[:, None] * (KMR * COUT) + row * COUT + rn[None, :]
            tl.store(yp, cast_out(accp, y_ptr.dtype.element_ty), mask=me[:, None] & mn[None, :])
            tl.store(yp + NY, cast_out(accm, y_ptr.dtype.element_ty), mask=me[:, None] & mn[None, :])
