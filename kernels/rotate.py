"""Triton kernels: Wigner-D rotation into / out of the edge frame, computed on the fly.

Layer 1 of the ops (the @triton.jit functions only; launchers live in egnn.kernels.ops).
Per edge block and channel tile, each degree l is one [BLOCK_E, KP, BLOCK_C] tile (KP = 2l+1
padded to a power of two). With fixed points p and constant pinv (see _tables.py):
    forward  (D x):   out_i = Σ_p Y_i(R p) · (Σ_j pinv[p, j] x_j)
    backward (D^T y): out_j = Σ_p pinv[p, j] · (Σ_i Y_i(R p) y_i)
so D itself never exists, in registers or in memory. R is egnn.so3.edge_rotation's matrix.
"""
import triton
import triton.language as tl

PINV_OFFSET: tl.constexpr = 64


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """float32 -> the output dtype, rounding to nearest even (done by hand for bfloat16: Triton's
    interpreter truncates there; on GPUs this is the same rounding the hardware cast does)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def edge_frame(vec_ptr, offs_e, me):
    """Rotation R (9 vectors over the edge block) that maps each edge direction onto +Y."""
    vx = tl.load(vec_ptr + offs_e * 3, mask=me, other=0.0).to(tl.float32)
    vy = tl.load(vec_ptr + offs_e * 3 + 1, mask=me, other=1.0).to(tl.float32)
    vz = tl.load(vec_ptr + offs_e * 3 + 2, mask=me, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(vx * vx + vy * vy + vz * vz)
    flip = tl.where(vy < 0, -1.0, 1.0)  # lower hemisphere: turn by pi about z first
    x = vx * inv * flip
    y = vy * inv * flip
    z = vz * inv
    k = 1.0 / (1.0 + y)
    return ((y + z * z * k) * flip, -x * flip, -x * z * k,
            x * flip, y * flip, z,
            -x * z * k * flip, -z * flip, y + x * x * k)


@triton.jit
def sh_rotated(tab_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, p,
               L: tl.constexpr, LMAX: tl.constexpr, NPTS: tl.constexpr, KP: tl.constexpr):
    """Y^L(R p) as a [BLOCK_E, KP] tile (columns >= 2L+1 are zero)."""
    px = tl.load(tab_ptr + p * 3)
    py = tl.load(tab_ptr + p * 3 + 1)
    pz = tl.load(tab_ptr + p * 3 + 2)
    wx = r00 * px + r01 * py + r02 * pz
    wy = r10 * px + r11 * py + r12 * pz
    wz = r20 * px + r21 * py + r22 * pz
    j = tl.arange(0, KP)
    mj = j < 2 * L + 1
    coef_base = PINV_OFFSET + (LMAX + 1) * NPTS * 16 + L * (LMAX + 1) * (LMAX + 1) * 16
    ysh = tl.zeros([wx.shape[0], KP], dtype=tl.float32)
    xa = wx * 0.0 + 1.0
    for a in tl.static_range(L + 1):
        yb = wx * 0.0 + 1.0
        for b in tl.static_range(L + 1 - a):
            zc = xa * yb
            for c in tl.static_range(L - a - b):
                zc = zc * wz
            coef = tl.load(tab_ptr + coef_base + (a * (LMAX + 1) + b) * 16 + j, mask=mj, other=0.0)
            ysh += zc[:, None] * coef[None, :]
            yb = yb * wy
        xa = xa * wx
    return ysh


@triton.jit
def _pinv_row(tab_ptr, p, L: tl.constexpr, NPTS: tl.constexpr, KP: tl.constexpr):
    j = tl.arange(0, KP)
    return tl.load(tab_ptr + PINV_OFFSET + (L * NPTS + p) * 16 + j, mask=j < 2 * L + 1, other=0.0)


@triton.jit
def rotate_tile(x, tab_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22,
                L: tl.constexpr, LMAX: tl.constexpr, NPTS: tl.constexpr, KP: tl.constexpr,
                TRANSPOSE: tl.constexpr):
    """D^L x (or D^L^T x) for a [BLOCK_E, KP, BLOCK_C] float32 tile of degree-L rows."""
    acc = tl.zeros(x.shape, dtype=tl.float32)
    for p in tl.static_range(NPTS):
        ysh = sh_rotated(tab_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, p, L, LMAX, NPTS, KP)
        pin = _pinv_row(tab_ptr, p, L, NPTS, KP)
        if TRANSPOSE:
            w = tl.sum(x * ysh[:, :, None], axis=1)
            acc += pin[None, :, None] * w[:, None, :]
        else:
            z = tl.sum(x * pin[None, :, None], axis=1)
            acc += ysh[:, :, None] * z[:, None, :]
    return acc


@triton.jit
def _gather_rotate_degree(out_ptr, t1_ptr, t2_ptr, t3_ptr, n1, n2, e64, me, offs_c, C1, C2, C3, KM,
                          tab_ptr, row_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22,
                          L: tl.constexpr, LMAX: tl.constexpr, NPTS: tl.constexpr, KP: tl.constexpr):
    K: tl.constexpr = (LMAX + 1) * (LMAX + 1)
    CT = C1 + C2 + C3
    j = tl.arange(0, KP)
    mj = j < 2 * L + 1
    rows = (L * L + j)[None, :, None]
    c = offs_c[None, None, :]
    m3 = me[:, None, None] & mj[None, :, None]
    x = tl.load(t1_ptr + n1[:, None, None] * (K * C1) + rows * C1 + c, mask=m3 & (c < C1), other=0.0).to(tl.float32)
    x += tl.load(t2_ptr + n2[:, None, None] * (K * C2) + rows * C2 + (c - C1),
                 mask=m3 & (c >= C1) & (c < C1 + C2), other=0.0).to(tl.float32)
    x += tl.load(t3_ptr + e64[:, None, None] * (K * C3) + rows * C3 + (c - C1 - C2),
                 mask=m3 & (c >= C1 + C2) & (c < CT), other=0.0).to(tl.float32)
    acc = rotate_tile(x, tab_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, L, LMAX, NPTS, KP, False)
    orow = tl.load(row_ptr + L * L + j, mask=mj, other=-1)
    ok = me[:, None, None] & (orow >= 0)[None, :, None] & (c < CT)
    tl.store(out_ptr + e64[:, None, None] * (KM * CT) + orow[None, :, None] * CT + c,
             cast_out(acc, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gather_rotate_kernel(out_ptr, t1_ptr, i1_ptr, t2_ptr, i2_ptr, t3_ptr, vec_ptr, tab_ptr, row_ptr,
                         E, C1, C2, C3, KM,
                         LMAX: tl.constexpr, NPTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[e] (m-major, [E, KM, C1+C2+C3]) = D_e [t1[i1[e]] | t2[i2[e]] | t3[e]] (channel blocks)."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    e64 = offs_e.to(tl.int64)
    n1 = tl.load(i1_ptr + offs_e, mask=me, other=0).to(tl.int64)
    n2 = tl.load(i2_ptr + offs_e, mask=me, other=0).to(tl.int64)
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = edge_frame(vec_ptr, offs_e, me)
    for l in tl.static_range(LMAX + 1):
        if l == 0:
            _gather_rotate_degree(out_ptr, t1_ptr, t2_ptr, t3_ptr, n1, n2, e64, me, offs_c, C1, C2, C3, KM, tab_ptr,
                                  row_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 1)
        elif l == 1:
            _gather_rotate_degree(out_ptr, t1_ptr, t2_ptr, t3_ptr, n1, n2, e64, me, offs_c, C1, C2, C3, KM, tab_ptr,
                                  row_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 4)
        elif l <= 3:
            _gather_rotate_degree(out_ptr, t1_ptr, t2_ptr, t3_ptr, n1, n2, e64, me, offs_c, C1, C2, C3, KM, tab_ptr,
                                  row_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 8)
        else:
            _gather_rotate_degree(out_ptr, t1_ptr, t2_ptr, t3_ptr, n1, n2, e64, me, offs_c, C1, C2, C3, KM, tab_ptr,
                                  row_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 16)


@triton.jit
def load_m_major_degree(y_ptr, e64, me, offs_c, C, KM, row_ptr, L: tl.constexpr, KP: tl.constexpr):
    """The degree-L rows of m-major edge-frame messages as an l-ordered [BLOCK_E, KP, BLOCK_C] tile."""
    j = tl.arange(0, KP)
    orow = tl.load(row_ptr + L * L + j, mask=j < 2 * L + 1, other=-1)
    c = offs_c[None, None, :]
    ok = me[:, None, None] & (orow >= 0)[None, :, None] & (c < C)
    return tl.load(y_ptr + e64[:, None, None] * (KM * C) + orow[None, :, None] * C + c, mask=ok,
                   other=0.0).to(tl.float32)


@triton.jit
def _rotate_back_degree(out_ptr, y_ptr, e64, me, offs_c, C, KM, tab_ptr, row_ptr,
                        r00, r01, r02, r10, r11, r12, r20, r21, r22,
                        L: tl.constexpr, LMAX: tl.constexpr, NPTS: tl.constexpr, KP: tl.constexpr):
    K: tl.constexpr = (LMAX + 1) * (LMAX + 1)
    y = load_m_major_degree(y_ptr, e64, me, offs_c, C, KM, row_ptr, L, KP)
    acc = rotate_tile(y, tab_ptr, r00, r01, r02, r10, r11, r12, r20, r21, r22, L, LMAX, NPTS, KP, True)
    j = tl.arange(0, KP)
    c = offs_c[None, None, :]
    ok = me[:, None, None] & (j < 2 * L + 1)[None, :, None] & (c < C)
    tl.store(out_ptr + e64[:, None, None] * (K * C) + (L * L + j)[None, :, None] * C + c,
             cast_out(acc, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rotate_back_kernel(out_ptr, y_ptr, vec_ptr, tab_ptr, row_ptr, E, C, KM,
                       LMAX: tl.constexpr, NPTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[e] (l-major, [E, (LMAX+1)^2, C]) = D_e^T y[e] (y m-major [E, KM, C])."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    me = offs_e < E
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    e64 = offs_e.to(tl.int64)
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = edge_frame(vec_ptr, offs_e, me)
    for l in tl.static_range(LMAX + 1):
        if l == 0:
            _rotate_back_degree(out_ptr, y_ptr, e64, me, offs_c, C, KM, tab_ptr, row_ptr,
                                r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 1)
        elif l == 1:
            _rotate_back_degree(out_ptr, y_ptr, e64, me, offs_c, C, KM, tab_ptr, row_ptr,
                                r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 4)
        elif l <= 3:
            _rotate_back_degree(out_ptr, y_ptr, e64, me, offs_c, C, KM, tab_ptr, row_ptr,
                                r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 8)
        else:
            _rotate_back_degree(out_ptr, y_ptr, e64, me, offs_c, C, KM, tab_ptr, row_ptr,
                                r00, r01, r02, r10, r11, r12, r20, r21, r22, l, LMAX, NPTS, 16)
