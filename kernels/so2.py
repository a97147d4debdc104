"""Triton kernel: the m-major SO(2) linear for every m in one launch, as a grouped GEMM.

Layer 1 (the @triton.jit function only). In m-major order the rows of one m are contiguous: m = 0
holds n0 rows, each m > 0 holds its +m rows then its −m rows (2n). The SO(2) map of a ±m pair,
y₊ = x₊W1 − x₋W2 and y₋ = x₊W2 + x₋W1, is the plain product [x₊ | x₋] · [[W1, W2], [−W2, W1]], so
every m is one dense GEMM  Y_m [E, N_m] = X_m [E, K_m] · W_m [K_m, N_m]  on the flattened rows,
with the weights packed per m by the launcher (meta[m] = first row, rows, weight offset, N_m).
m = 0 also produces the extra invariant outputs (columns ≥ rows·C_out go to `xo`), takes the bias,
and in the backward pass reads extra inputs (`xe`, the gradient of those outputs). The optional
radial scale [E, C_in] multiplies the input on load. Grid: (edge blocks, m, column tiles); one
float32 accumulator per program, tensor cores for half-precision inputs (fp32: IEEE FMAs, or TF32
when torch.backends.cuda.matmul.allow_tf32 is set).
"""
import triton
import triton.language as tl

from .rotate_io import cast_out


@triton.jit
def _mm(acc, a, w, PRECISION: tl.constexpr):
    if PRECISION == "ieee":  # float32 inputs (and all dtypes under the interpreter)
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if PRECISION == "tf32":
        return tl.dot(a, w, acc, input_precision="tf32")
    return tl.dot(a, w, acc)  # bfloat16 / float16 on tensor cores, float32 accumulation


@triton.jit
def so2_linear_kernel(y_ptr, xo_ptr, x_ptr, xe_ptr, s_ptr, w_ptr, b_ptr, meta_ptr,
                      E, KMR, CIN, COUT, KX, NX,
                      HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1)
    row = tl.load(meta_ptr + 4 * m)
    nrows = tl.load(meta_ptr + 4 * m + 1)
    woff = tl.load(meta_ptr + 4 * m + 2)
    N = tl.load(meta_ptr + 4 * m + 3)
    if tl.program_id(2) * BLOCK_N < N:
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        me = offs_e < E
        e64 = offs_e.to(tl.int64)
        rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = rn < N
        K = nrows * CIN
        dt = w_ptr.dtype.element_ty
        xp = x_ptr + e64[:, None] * (KMR * CIN) + row * CIN
        acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            a = tl.load(xp + rk[None, :], mask=me[:, None] & mk[None, :], other=0.0)
            if HAS_SCALE:
                s = tl.load(s_ptr + e64[:, None] * CIN + (rk % CIN)[None, :], mask=me[:, None] & mk[None, :],
                            other=0.0)
                a = (a.to(tl.float32) * s.to(tl.float32)).to(dt)
            w = tl.load(w_ptr + woff + rk[:, None] * N + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
            acc = _mm(acc, a, w, PRECISION)
        kx = tl.where(m == 0, KX, 0)  # extra inputs belong to m = 0 (weight rows after its K)
        for k0 in range(0, kx, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < kx
            a = tl.load(xe_ptr + e64[:, None] * KX + rk[None, :], mask=me[:, None] & mk[None, :], other=0.0)
            w = tl.load(w_ptr + woff + (K + rk)[:, None] * N + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
            acc = _mm(acc, a, w, PRECISION)
        if HAS_BIAS:
            nb = tl.where(m == 0, N, 0)  # the bias belongs to m = 0
            acc += tl.load(b_ptr + rn, mask=rn < nb, other=0.0).to(tl.float32)[None, :]
        NY = nrows * COUT
        tl.store(y_ptr + e64[:, None] * (KMR * COUT) + row * COUT + rn[None, :], cast_out(acc, y_ptr.dtype.element_ty),
                 mask=me[:, None] & (rn < NY)[None, :])
        tl.store(xo_ptr + e64[:, None] * NX + (rn - NY)[None, :], cast_out(acc, xo_ptr.dtype.element_ty),
                 mask=me[:, None] & ((rn >= NY) & mn)[None, :])
