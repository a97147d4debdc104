"""The pure-PyTorch twins of the Triton ops: the CPU implementation, the test oracle, and the one
place where the maths of every op is written (egnn.nn layers call the ops, never their own copy).

Plain differentiable torch code, so `gradcheck`, forces (gradients to the edge vectors) and double
backward all work on them. Shapes follow the EquiformerV2/fairchem layout: l-major [rows,
(lmax+1)², C], m-major edge frame [E, K_m, C] (rows with |m| > mmax left out). `roll` [E] (radians,
optional) turns each edge frame about its axis after egnn.so3.edge_rotation's frame; gradients flow
to it too (a frame read from another model's Wigner matrices depends on the positions through it).
"""
from __future__ import annotations

import math

import torch

from egnn import so3


def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


def edge_frames(edge_vec: torch.Tensor, lmax: int, dtype) -> list[torch.Tensor]:
    return [d.to(dtype) for d in so3.wigner_D(edge_vec.to(_acc(dtype)), lmax)]


def gather_message(x, e, src, dst):
    """[x_src | x_dst | e] along channels (x and/or e may be None)."""
    parts = []
    if x is not None:
        parts += [x[src], x[dst]]  # indexing, not index_select: its backward (index_put) is ~2x faster on CPU
    if e is not None:
        parts.append(e)
    return torch.cat(parts, dim=-1)


def rotate_to_edge(x, e, src, dst, edge_vec, lmax: int, mmax: int, roll=None):
    """Gather [x_src | x_dst | e] ([E, (lmax+1)², 2C_x + C_e]) and rotate it into each edge frame,
    keeping the m-major rows |m| <= mmax (reduced Wigner blocks): [E, K_m, 2C_x + C_e]."""
    msg = gather_message(x, e, src, dst)
    acc = _acc(msg.dtype)
    y = so3.rotate_to_m_major(msg.to(acc), edge_frames(edge_vec, lmax, acc), mmax)
    if roll is not None:
        y = so3.turn_about_polar_axis(y, roll.to(acc), lmax, mmax)
    return y.to(msg.dtype)


def rescale_factors(lmax: int, mmax: int) -> torch.Tensor:
    """EquiformerV2's rotate-back rescale per l-major row: √((2l+1)/(2·mmax+1)) for degrees l > mmax
    (their edge-frame rows beyond |m| = mmax were dropped), 1 elsewhere. float64 [(lmax+1)²]."""
    f = [math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0 for l in range(lmax + 1) for _ in range(2 * l + 1)]
    return torch.tensor(f, dtype=torch.float64)


def rotate_back(y, edge_vec, lmax: int, mmax: int, roll=None, rescale: bool = False):
    """m-major edge frame [E, K_m, C] -> l-major global frame [E, (lmax+1)², C] (Dᵀ; rows with
    |m| > mmax count as zero; with `rescale`, EquiformerV2's factors of `rescale_factors`)."""
    acc = _acc(y.dtype)
    z = y.to(acc)
    if roll is not None:
        z = so3.turn_about_polar_axis(z, -roll.to(acc), lmax, mmax)
    out = so3.rotate_from_m_major(z, edge_frames(edge_vec, lmax, acc), mmax)
    if rescale and mmax < lmax:
        out = out * rescale_factors(lmax, mmax).to(out.device, acc).view(1, -1, 1)
    return out.to(y.dtype)


def num_ml(lmax: int, mmax: int) -> int:
    """Number of (m >= 0, l) pairs: the rows of a per-(m, l) radial scale."""
    return sum(so3.m_major_sizes(lmax, mmax))


def scale_kind(scale, lmax: int, mmax: int, KM: int) -> str:
    """How a radial scale [E, R, C_in] applies: "channel" (R = 1), "ml" (R = Σ_m n_m: one row per
    (m, l), shared by the ±m rows, fairchem's rad_func layout) or "row" (R = K_m)."""
    R = scale.shape[1]
    if R == 1:
        return "channel"
    if R == num_ml(lmax, mmax):
        return "ml"  # (equals "row" when mmax = 0)
    return "row"


def ml_rows(lmax: int, mmax: int) -> torch.Tensor:
    """Index of the (m, l) scale row of each m-major row (expands a per-(m, l) scale to rows)."""
    idx, base = [], 0
    for m, n in enumerate(so3.m_major_sizes(lmax, mmax)):
        idx += list(range(base, base + n)) * (1 if m == 0 else 2)
        base += n
    return torch.tensor(idx, dtype=torch.long)


def so2_linear(x, scale, w0, b0, ws, lmax: int, mmax: int, cout: int, extra_first: bool = False):
    """The m-major SO(2) linear of `egnn.nn.SO2Linear`: x [E, K_m, C_in] times the radial `scale`
    (None, [E, 1, C_in] per channel, [E, Σ_m n_m, C_in] per (m, l) or [E, K_m, C_in] per row; see
    `scale_kind`), m = 0 block `w0` [n0·C_out + X, n0·C_in] + `b0` (the X extra invariant outputs
    last, or first with `extra_first` as fairchem lays them out), per m > 0 `ws[m-1]` = [W1 | W2]
    [n·C_in, 2n·C_out]. Returns (y [E, K_m, C_out], extra [E, X])."""
    E = x.shape[0]
    sizes = so3.m_major_sizes(lmax, mmax)
    n0 = sizes[0]
    kind = None if scale is None else scale_kind(scale, lmax, mmax, x.shape[1])
    if kind in ("channel", "row"):
        x, kind = x * scale, None
    # split, never slices: a slice's backward writes a zero-filled copy of the whole input
    xs = x.split([n0] + [2 * n for n in sizes[1:]], dim=1)
    ss = scale.split(sizes, dim=1) if kind == "ml" else None
    x0 = xs[0] if ss is None else xs[0] * ss[0]
    y0 = torch.nn.functional.linear(x0.reshape(E, -1), w0, b0)
    nx = w0.shape[0] - n0 * cout
    if extra_first:
        extra, main = y0.split([nx, n0 * cout], dim=1)
    else:
        main, extra = y0.split([n0 * cout, nx], dim=1)
    out = [main.reshape(E, n0, cout)]
    for m, n in enumerate(sizes[1:], start=1):
        xm = xs[m].reshape(E, 2, n, -1)
        if ss is not None:
            xm = xm * ss[m].unsqueeze(1)
        # (x₊ + i·x₋)(W1 + i·W2) with three real products instead of four (Gauss):
        # k1 = (x₊ + x₋)W1, k2 = x₊(W2 − W1), k3 = x₋(W1 + W2); y₊ = k1 − k3, y₋ = k1 + k2.
        # A quarter fewer GEMM flops forward and backward (autograd differentiates the three products)
        xp, xn = xm.reshape(E, 2, -1).unbind(1)
        w1, w2 = ws[m - 1].split(n * cout, dim=1)
        k1 = (xp + xn) @ w1
        k2 = xp @ (w2 - w1)
        k3 = xn @ (w1 + w2)
        out += [(k1 - k3).view(E, n, cout), (k1 + k2).view(E, n, cout)]
    return torch.cat(out, dim=1), extra


def so2_linear_vjp(x, w0, ws, gy, lmax: int, mmax: int, cout: int):
    """The backward of `so2_linear(x, None, w0, b0, ws, ...)` without extra outputs, by hand: (gx,
    gw0, gb0, gws) for the output gradient gy [E, K_m, C_out], from x and the weights only (the
    forward's output is never formed: a recompute can stop before this linear). The m > 0 blocks
    use the same three products as the forward: 6 GEMMs per m, 8 with four products."""
    E = x.shape[0]
    sizes = so3.m_major_sizes(lmax, mmax)
    n0 = sizes[0]
    xs = x.split([n0] + [2 * n for n in sizes[1:]], dim=1)
    gs = gy.split([n0] + [2 * n for n in sizes[1:]], dim=1)
    g0, x0 = gs[0].reshape(E, -1), xs[0].reshape(E, -1)
    gx = [(g0 @ w0).view(E, n0, -1)]
    gw0, gb0, gws = g0.t() @ x0, g0.sum(0), []
    for m, n in enumerate(sizes[1:], start=1):
        xp, xn = xs[m].reshape(E, 2, -1).unbind(1)
        gp, gm = gs[m].reshape(E, 2, -1).unbind(1)
        w1, w2 = ws[m - 1].split(n * cout, dim=1)
        g1 = gp + gm  # k1 = (x₊ + x₋)W1, k2 = x₊(W2 − W1), k3 = x₋(W1 + W2); y₊ = k1 − k3, y₋ = k1 + k2
        gsum = g1 @ w1.t()
        gx += [(gsum + gm @ (w2 - w1).t()).view(E, n, -1), (gsum - gp @ (w1 + w2).t()).view(E, n, -1)]
        gd, gc = xp.t() @ gm, xn.t() @ gp  # x₊ᵀ g₋, x₋ᵀ g₊
        gws.append(torch.cat([(xp + xn).t() @ g1 - gd - gc, gd - gc], dim=1))
    return torch.cat(gx, dim=1), gw0, gb0, gws


def segment_softmax(logits, dst, num_nodes: int):
    """Softmax of logits [E, H] over the edges of each destination, float32 accumulation."""
    z = logits.to(_acc(logits.dtype))
    idx = dst.unsqueeze(1).expand(-1, z.shape[1])
    zmax = z.new_full((num_nodes, z.shape[1]), -torch.inf).scatter_reduce(0, idx, z, "amax", include_self=True)
    ez = torch.exp(z - zmax.index_select(0, dst).detach())
    return ez / z.new_zeros(num_nodes, z.shape[1]).index_add_(0, dst, ez).index_select(0, dst)


def attention_aggregate(values, logits, dst, num_nodes: int, edge_vec=None, lmax: int = 0, mmax: int = 0, roll=None,
                        rescale: bool = False):
    """out[d] = Σ_{e->d} softmax_e(logits)[h] · v_e[:, channels of head h], in float32, cast back.

    With `edge_vec`, `values` are m-major edge-frame messages and v_e = rotate_back(values) (the
    fused rotate back + aggregation, `rescale` as there); without, `values` are l-major [E, K, C]
    already (any K)."""
    acc = _acc(values.dtype)
    v = values.to(acc)
    if edge_vec is not None:
        v = rotate_back(v, edge_vec, lmax, mmax, roll, rescale)
    E, K, C = v.shape
    H = logits.shape[1]
    alpha = segment_softmax(logits, dst, num_nodes).to(acc)
    w = (v.view(E, K, H, C // H) * alpha.view(E, 1, H, 1)).view(E, K, C)
    out = torch.zeros((num_nodes, K, C), dtype=acc, device=values.device).index_add_(0, dst, w)
    return out.to(values.dtype)


# ----------------------------------------------------------------------------- forces (used by the Triton ops' backward)
def generator_dot(u, x, lmax: int) -> torch.Tensor:
    """H[e, j] = Σ_{l, c} u^l · (L_j^l x^l) for l-major u, x [E, (lmax+1)², C]: how <u, D x> changes
    when the frame turns about global axis j (egnn.so3.generators)."""
    acc = _acc(u.dtype)
    L = so3.generators(lmax, acc, u.device)
    H = u.new_zeros(u.shape[0], 3, dtype=acc)
    for l in range(1, lmax + 1):
        ul, xl = u[:, l * l:(l + 1) ** 2].to(acc), x[:, l * l:(l + 1) ** 2].to(acc)
        H = H + torch.einsum("eic,jik,ekc->ej", ul, L[l], xl)
    return H


def frame_grad(edge_vec, H, roll=None):
    """(dLoss/d(edge_vec) [E, 3], dLoss/d(roll) [E] or None) from H = d Loss/d(frame turns) in the
    global axes, for a loss that depends on the edge frame R = Ry(roll)·R(v) only through D(R): with
    a left turn exp(ε·K) R, dLoss/dε = R H; ε(v) = vee(R(v) R(v₀)ᵀ) to first order, and a roll
    is a left turn about y (dLoss/d(roll) = (R H)_y)."""
    with torch.enable_grad():
        v = edge_vec.detach().requires_grad_()
        R = so3.edge_rotation(v.to(H.dtype))
        if roll is not None:
            roll = roll.detach()
            c, s = torch.cos(roll).to(H.dtype), torch.sin(roll).to(H.dtype)
            z, o = torch.zeros_like(c), torch.ones_like(c)
            Ry = torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)
            R = Ry @ R
        R0 = R.detach()
        W = R @ R0.transpose(-1, -2)
        eps = 0.5 * torch.stack([W[:, 2, 1] - W[:, 1, 2], W[:, 0, 2] - W[:, 2, 0], W[:, 1, 0] - W[:, 0, 1]], -1)
        G = (R0 @ H.unsqueeze(-1)).squeeze(-1)
        (g,) = torch.autograd.grad((G * eps).sum(), v)
    return g.to(edge_vec.dtype), None if roll is None else G[:, 1].to(roll.dtype)
