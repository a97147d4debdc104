"""Triton helpers shared by the rotation kernels: edge-frame angles, row loads and stores.

Layer 1 (@triton.jit functions only). Tiles are [BLOCK_E, BLOCK_C] float32: one row (one (l, m)) of
a block of edges and a block of channels, so every load and store is a 2-D access that is
contiguous along channels. Indices: e64 [BLOCK_E] int64 edge ids, me [BLOCK_E] their mask,
c [BLOCK_C] channel offsets.
"""
import triton
import triton.language as tl


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
def edge_angles(vec_ptr, roll_ptr, offs_e, me, HAS_ROLL: tl.constexpr):
    """(cos, sin) of α, β, γ as [BLOCK_E, 1] tiles with D(R_e) = Y(γ) Jᵀ Y(β) J Y(α), R_e being
    egnn.so3.edge_rotation's frame (edge direction onto +y; lower hemisphere turned by π about z
    first), turned by roll[e] about y when HAS_ROLL. Y(α) turns v̂ about y into the xy-plane
    (x > 0), Rz(β) tilts it onto +y, and γ is the remaining roll about y that makes the product equal
    R_e. No trigonometric calls but the roll's."""
    vx = tl.load(vec_ptr + offs_e * 3, mask=me, other=0.0).to(tl.float32)
    vy = tl.load(vec_ptr + offs_e * 3 + 1, mask=me, other=1.0).to(tl.float32)
    vz = tl.load(vec_ptr + offs_e * 3 + 2, mask=me, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(vx * vx + vy * vy + vz * vz)
    x = vx * inv
    y = vy * inv
    z = vz * inv
    rho = tl.sqrt(x * x + z * z)
    pole = rho < 1e-12
    ca = tl.where(pole, 1.0, x / tl.where(pole, 1.0, rho))
    sa = tl.where(pole, 0.0, z / tl.where(pole, 1.0, rho))
    cb = y
    sb = rho
    # first row of R_e (egnn.so3.edge_rotation): with the hemisphere flip f = ±1 and (x', y') = f·(x, y)
    f = tl.where(y < 0, -1.0, 1.0)
    xf = x * f
    yf = y * f
    k = 1.0 / (1.0 + yf)
    r00 = (yf + z * z * k) * f
    r01 = -xf * f
    r02 = -xf * z * k
    cg = r00 * ca * cb - r01 * sb + r02 * sa * cb
    sg = -r00 * sa + r02 * ca
    if HAS_ROLL:
        rho = tl.load(roll_ptr + offs_e, mask=me, other=0.0).to(tl.float32)
        cr = tl.cos(rho)
        sr = tl.sin(rho)
        cg, sg = cr * cg - sr * sg, sr * cg + cr * sg
    return ca[:, None], sa[:, None], cb[:, None], sb[:, None], cg[:, None], sg[:, None]


@triton.jit
def load_gathered(t1_ptr, t2_ptr, t3_ptr, n1, n2, e64, me, c, C1, C2, C3, row, K):
    """Row `row` of [t1[n1] | t2[n2] | t3[e]] (channel blocks C1, C2, C3 of l-major [*, K, C*])."""
    m2 = me[:, None]
    cc = c[None, :]
    x = tl.load(t1_ptr + n1[:, None] * (K * C1) + row * C1 + cc, mask=m2 & (cc < C1), other=0.0).to(tl.float32)
    x += tl.load(t2_ptr + n2[:, None] * (K * C2) + row * C2 + (cc - C1), mask=m2 & (cc >= C1) & (cc < C1 + C2),
                 other=0.0).to(tl.float32)
    x += tl.load(t3_ptr + e64[:, None] * (K * C3) + row * C3 + (cc - C1 - C2),
                 mask=m2 & (cc >= C1 + C2) & (cc < C1 + C2 + C3), other=0.0).to(tl.float32)
    return x


@triton.jit
def load_mrow(y_ptr, e64, me, c, C, KM, mrow):
    """Row `mrow` of m-major edge-frame messages y [E, KM, C] as float32."""
    cc = c[None, :]
    return tl.load(y_ptr + e64[:, None] * (KM * C) + mrow * C + cc, mask=me[:, None] & (cc < C),
                   other=0.0).to(tl.float32)


@triton.jit
def store_mrow(out_ptr, e64, me, c, CT, KM, mrow, x):
    cc = c[None, :]
    tl.store(out_ptr + e64[:, None] * (KM * CT) + mrow * CT + cc, cast_out(x, out_ptr.dtype.element_ty),
             mask=me[:, None] & (cc < CT))


@triton.jit
def store_row(out_ptr, e64, me, c, C, K, row, x):
    cc = c[None, :]
    tl.store(out_ptr + e64[:, None] * (K * C) + row * C + cc, cast_out(x, out_ptr.dtype.element_ty),
             mask=me[:, None] & (cc < C))


@triton.jit
def softmax_weights(logit_ptr, offs_e, me, head, mc, H, mx, inv_s):
    """softmax weight [BLOCK_E, BLOCK_C] of each edge for the head of each channel."""
    lg = tl.load(logit_ptr + offs_e[:, None] * H + head[None, :], mask=me[:, None] & mc[None, :],
                 other=float("-inf")).to(tl.float32)
    return tl.exp(lg - mx[None, :]) * inv_s[None, :]
