"""Layers 2 and 3 of the kernels: launchers, torch.library ops egnn::*, autograd rules.

Public functions (all take `backend="auto" | "triton" | "torch"`, see egnn.nn.backend):

* `rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax)`: gather [x_src | x_dst | e], rotate into
  the edge frame (D rebuilt from edge_vec inside the kernel), l -> m-major: [E, K_m, 2C_x + C_e].
  Backward saves only edge_vec, src and dst: the gradient is D^T g scattered to the node rows.
* `rotate_back(y, edge_vec, lmax, mmax)`: m-major edge frame -> l-major global frame.
* `so2_linear(x, scale, w0, b0, ws, lmax, mmax, cout)`: the SO(2) linear of SO2Linear, all m in one
  launch; backward for the input, the radial scale and the weights.
* `attention_aggregate(values, logits, dst, num_nodes, edge_vec=None, lmax, mmax)`: segment softmax
  + weighted sum per destination (with edge_vec: the messages are rotated back first, fused).

The Triton forward/backward ops are registered as `torch.library.custom_op`s (egnn::rotate_to_edge,
egnn::rotate_back, egnn::so2_linear, egnn::attention_aggregate, with fakes for torch.compile) when
the running torch has that API; otherwise the plain functions are used. Autograd is always an
`autograd.Function` calling those ops, which works on every torch >= 2.6. The twins in
_torch_impl.py are plain differentiable torch code and run under ordinary autograd.
"""
from typing import Optional

import nvtx
import torch

from egnn import so3
from egnn.errors import InputError
from egnn.nn import backend as _backend

from . import _tables
from . import _torch_impl as twin


def _edge_block():
    # the interpreter runs one numpy op per tile op: few, wide programs are much faster there
    return 64 if _backend.interpreting() else 16


def _channel_block(c):
    return _pow2(c, 16, 128 if _backend.interpreting() else 32)


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2(n, lo=16, hi=64):
    p = lo
    while p < min(n, hi):
        p *= 2
    return p


def _num_m_rows(lmax, mmax):
    return len(so3.l_to_m_major(lmax, mmax))


# ----------------------------------------------------------------------------- launchers (Triton)
def _gather_rotate(x1, i1, x2, i2, x3, edge_vec, lmax, mmax, dtype):
    """D [x1[i1] | x2[i2] | x3] -> m-major [E, K_m, C1 + C2 + C3]; any part may be None."""
    from .rotate import gather_rotate_kernel

    E = edge_vec.shape[0]
    tab, rows = _tables.tables(lmax, mmax, edge_vec.device)
    KM = _num_m_rows(lmax, mmax)
    ref = next(t for t in (x1, x2, x3) if t is not None)
    idx = i1 if i1 is not None else (i2 if i2 is not None else torch.zeros(E, dtype=torch.int32, device=ref.device))
    C1, C2, C3 = (0 if t is None else t.shape[-1] for t in (x1, x2, x3))
    x1, x2, x3 = (ref if t is None else t.contiguous() for t in (x1, x2, x3))
    i1 = idx if i1 is None else i1
    i2 = idx if i2 is None else i2
    out = torch.empty((E, KM, C1 + C2 + C3), dtype=dtype, device=ref.device)
    if E == 0 or out.shape[-1] == 0:
        return out
    BE, BC = _edge_block(), _channel_block(C1 + C2 + C3)
    grid = (_cdiv(E, BE), _cdiv(C1 + C2 + C3, BC))
    gather_rotate_kernel[grid](out, x1, i1.contiguous(), x2, i2.contiguous(), x3, edge_vec.contiguous(), tab, rows,
                               E, C1, C2, C3, KM, LMAX=lmax, NPTS=_tables.num_points(lmax), BLOCK_E=BE, BLOCK_C=BC)
    return out


def _rotate_back(y, edge_vec, lmax, mmax):
    from .rotate import rotate_back_kernel

    E, KM, C = y.shape
    tab, rows = _tables.tables(lmax, mmax, y.device)
    out = torch.empty((E, (lmax + 1) ** 2, C), dtype=y.dtype, device=y.device)
    if E == 0 or C == 0:
        return out
    BE, BC = _edge_block(), _channel_block(C)
    rotate_back_kernel[(_cdiv(E, BE), _cdiv(C, BC))](out, y.contiguous(), edge_vec.contiguous(), tab, rows, E, C, KM,
                                                      LMAX=lmax, NPTS=_tables.num_points(lmax), BLOCK_E=BE, BLOCK_C=BC)
    return out


def _pack_weights(first, blocks, dtype):
    """Flat weight buffer ([K, N] row-major per m) and the int32 meta table (row, n, offset)."""
    return torch.cat([first.reshape(-1)] + [w.reshape(-1) for w in blocks]).to(dtype).contiguous()


def _meta(lmax, mmax, blocks_numel, first_numel, device):
    meta, off = [], first_numel
    for m, (row, n) in enumerate(_tables.m_major_meta(lmax, mmax)):
        meta += [row, n, 0 if m == 0 else off]
        if m:
            off += blocks_numel[m - 1]
    return torch.tensor(meta, dtype=torch.int32, device=device)


def _so2_launch(x, xe, scale, wbuf, bias, meta, lmax, mmax, cin, cout, nx):
    from .so2 import so2_linear_kernel

    E, KMR, _ = x.shape
    y = torch.empty((E, KMR, cout), dtype=x.dtype, device=x.device)
    xo = torch.empty((E, nx), dtype=x.dtype, device=x.device)
    if E == 0:
        return y, xo
    kx = 0 if xe is None else xe.shape[1]
    n0 = lmax + 1
    ncols = max(n0 * cout + nx, lmax * cout)
    BE, BN, BK = 32, _pow2(ncols, 16, 256 if _backend.interpreting() else 64), 32
    grid = (_cdiv(E, BE), mmax + 1, _cdiv(ncols, BN))
    so2_linear_kernel[grid](y, xo, x.contiguous(), x if xe is None else xe.contiguous(),
                            x if scale is None else scale.reshape(E, cin).contiguous(), wbuf,
                            wbuf if bias is None else bias.to(wbuf.dtype).contiguous(), meta,
                            E, KMR, cin, cout, kx, nx, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                            IEEE=x.dtype == torch.float32 or _backend.interpreting(), BLOCK_E=BE, BLOCK_N=BN, BLOCK_K=BK)
    return y, xo


def _segment_ptr(dst, num_nodes):
    if dst.numel() > 1 and bool((dst[1:] < dst[:-1]).any()):
        raise InputError("attention_aggregate: dst must be sorted (edges sorted by destination, CSR by dst); "
                         "sort the edges with dst.argsort(stable=True) or use backend='torch'")
    ptr = torch.zeros(num_nodes + 1, dtype=torch.int32, device=dst.device)
    ptr[1:] = torch.bincount(dst, minlength=num_nodes).cumsum(0)
    return ptr


def _aggregate_launch(values, logits, dst, num_nodes, edge_vec, lmax, mmax):
    from .aggregate import aggregate_kernel

    E, KV, C = values.shape
    H = logits.shape[1]
    K = (lmax + 1) ** 2 if edge_vec is not None else KV
    if edge_vec is None:
        lmax = int(round(K ** 0.5)) - 1
        mmax = lmax
    out = torch.empty((num_nodes, K, C), dtype=values.dtype, device=values.device)
    if num_nodes == 0 or C == 0:
        return out
    tab, rows = _tables.tables(lmax, mmax, values.device)
    ptr = _segment_ptr(dst, num_nodes)
    BC = _channel_block(C)
    vec = edge_vec.contiguous() if edge_vec is not None else tab
    aggregate_kernel[(num_nodes, _cdiv(C, BC))](out, values.contiguous(), logits.contiguous(), ptr, vec, tab, rows,
                                                C, H, C // H, KV, LMAX=lmax, NPTS=_tables.num_points(lmax),
                                                BLOCK_E=_edge_block() // 2, BLOCK_C=BC, ROTATE=edge_vec is not None)
    return out


# ----------------------------------------------------------------------------- forward ops (layer 2)
def _op_rotate_to_edge(x, e, src, dst, edge_vec, lmax: int, mmax: int, use_triton: bool):
    if not use_triton:
        return twin.rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax)
    dtype = (x if x is not None else e).dtype
    return _gather_rotate(x, src, x, dst, e, edge_vec, lmax, mmax, dtype) if x is not None else \
        _gather_rotate(None, None, None, None, e, edge_vec, lmax, mmax, dtype)


def _op_rotate_back(y, edge_vec, lmax: int, mmax: int, use_triton: bool):
    return _rotate_back(y, edge_vec, lmax, mmax) if use_triton else twin.rotate_back(y, edge_vec, lmax, mmax)


def _op_so2_linear(x, scale, w0, b0, ws, lmax: int, mmax: int, cout: int, use_triton: bool):
    if not use_triton:
        y, extra = twin.so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout)
        return y, extra.contiguous()
    n0 = lmax + 1
    nx = w0.shape[0] - n0 * cout
    dtype = x.dtype
    w0t = w0.t()
    wbuf = _pack_weights(w0t, ws, dtype)
    meta = _meta(lmax, mmax, [w.numel() for w in ws], w0t.numel(), x.device)
    return _so2_launch(x, None, scale, wbuf, b0, meta, lmax, mmax, x.shape[2], cout, nx)


def _op_attention_aggregate(values, logits, dst, num_nodes: int, edge_vec, lmax: int, mmax: int, use_triton: bool):
    if not use_triton:
        return twin.attention_aggregate(values, logits, dst, num_nodes, edge_vec, lmax, mmax)
    return _aggregate_launch(values, logits, dst, num_nodes, edge_vec, lmax, mmax)


def _register_library_ops():
    """egnn::<op> custom ops with fakes, where torch.library has the API (torch >= 2.4)."""
    lib = torch.library
    if not (hasattr(lib, "custom_op") and hasattr(lib, "register_fake")):
        return None
    Tensor = torch.Tensor
    ops = {}
    try:
        @lib.custom_op("egnn::rotate_to_edge", mutates_args=())
        def rotate_to_edge_op(x: Optional[Tensor], e: Optional[Tensor], src: Tensor, dst: Tensor, edge_vec: Tensor,
                              lmax: int, mmax: int, use_triton: bool) -> Tensor:
            return _op_rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax, use_triton)

        @rotate_to_edge_op.register_fake
        def _(x, e, src, dst, edge_vec, lmax, mmax, use_triton):
            ref = x if x is not None else e
            c = (0 if x is None else 2 * x.shape[-1]) + (0 if e is None else e.shape[-1])
            return ref.new_empty((edge_vec.shape[0], _num_m_rows(lmax, mmax), c))

        @lib.custom_op("egnn::rotate_back", mutates_args=())
        def rotate_back_op(y: Tensor, edge_vec: Tensor, lmax: int, mmax: int, use_triton: bool) -> Tensor:
            return _op_rotate_back(y, edge_vec, lmax, mmax, use_triton)

        @rotate_back_op.register_fake
        def _(y, edge_vec, lmax, mmax, use_triton):
            return y.new_empty((y.shape[0], (lmax + 1) ** 2, y.shape[2]))

        @lib.custom_op("egnn::so2_linear", mutates_args=())
        def so2_linear_op(x: Tensor, scale: Optional[Tensor], w0: Tensor, b0: Optional[Tensor], ws: list[Tensor],
                          lmax: int, mmax: int, cout: int, use_triton: bool) -> tuple[Tensor, Tensor]:
            y, extra = _op_so2_linear(x, scale, w0, b0, ws, lmax, mmax, cout, use_triton)
            return y.contiguous(), extra.contiguous()

        @so2_linear_op.register_fake
        def _(x, scale, w0, b0, ws, lmax, mmax, cout, use_triton):
            return x.new_empty((x.shape[0], x.shape[1], cout)), x.new_empty((x.shape[0], w0.shape[0] - (lmax + 1) * cout))

        @lib.custom_op("egnn::attention_aggregate", mutates_args=())
        def attention_aggregate_op(values: Tensor, logits: Tensor, dst: Tensor, num_nodes: int,
                                   edge_vec: Optional[Tensor], lmax: int, mmax: int, use_triton: bool) -> Tensor:
            return _op_attention_aggregate(values, logits, dst, num_nodes, edge_vec, lmax, mmax, use_triton)

        @attention_aggregate_op.register_fake
        def _(values, logits, dst, num_nodes, edge_vec, lmax, mmax, use_triton):
            K = (lmax + 1) ** 2 if edge_vec is not None else values.shape[1]
            return values.new_empty((num_nodes, K, values.shape[2]))
    except Exception as err:  # noqa: BLE001 - an older/newer torch.library: keep the plain functions
        from egnn.errors import warn_once
        warn_once("egnn-custom-op", f"egnn: torch.library.custom_op unavailable ({err}); using plain functions")
        return None
    ops.update(rotate_to_edge=rotate_to_edge_op, rotate_back=rotate_back_op, so2_linear=so2_linear_op,
               attention_aggregate=attention_aggregate_op)
    return ops


_LIB = _register_library_ops()
_PLAIN = dict(rotate_to_edge=_op_rotate_to_edge, rotate_back=_op_rotate_back, so2_linear=_op_so2_linear,
              attention_aggregate=_op_attention_aggregate)
OPS = _LIB or _PLAIN


# ----------------------------------------------------------------------------- autograd (layer 3)
class _RotateToEdge(torch.autograd.Function):
    """Saves only edge_vec, src, dst: backward recomputes D and scatters D^T g to the rows."""

    @staticmethod
    @nvtx.annotate("egnn/rotate_to_edge")
    def forward(ctx, x, e, src, dst, edge_vec, lmax, mmax):
        ctx.save_for_backward(src, dst, edge_vec)
        ctx.meta = (lmax, mmax, None if x is None else x.shape[0], None if x is None else x.shape[-1])
        return OPS["rotate_to_edge"](x, e, src, dst, edge_vec, lmax, mmax, True)

    @staticmethod
    @nvtx.annotate("egnn/rotate_to_edge/backward")
    def backward(ctx, g):
        src, dst, edge_vec = ctx.saved_tensors
        lmax, mmax, n, c = ctx.meta
        gm = OPS["rotate_back"](g.contiguous(), edge_vec, lmax, mmax, True)
        gx = ge = None
        if c is not None and ctx.needs_input_grad[0]:
            acc = torch.promote_types(gm.dtype, torch.float32)
            gx = gm.new_zeros((n,) + gm.shape[1:-1] + (c,), dtype=acc)
            gx.index_add_(0, src, gm[..., :c].to(acc)).index_add_(0, dst, gm[..., c:2 * c].to(acc))
            gx = gx.to(gm.dtype)
        if ctx.needs_input_grad[1]:
            ge = gm[..., (0 if c is None else 2 * c):]
        return gx, ge, None, None, None, None, None


class _RotateBack(torch.autograd.Function):
    @staticmethod
    @nvtx.annotate("egnn/rotate_back")
    def forward(ctx, y, edge_vec, lmax, mmax):
        ctx.save_for_backward(edge_vec)
        ctx.meta = (lmax, mmax)
        return OPS["rotate_back"](y, edge_vec, lmax, mmax, True)

    @staticmethod
    @nvtx.annotate("egnn/rotate_back/backward")
    def backward(ctx, g):
        (edge_vec,) = ctx.saved_tensors
        lmax, mmax = ctx.meta
        e = edge_vec.new_zeros(0, dtype=torch.int64)
        return OPS["rotate_to_edge"](None, g.contiguous(), e, e, edge_vec, lmax, mmax, True), None, None, None


class _SO2Linear(torch.autograd.Function):
    @staticmethod
    @nvtx.annotate("egnn/so2_linear")
    def forward(ctx, x, scale, w0, b0, lmax, mmax, cout, *ws):
        ctx.save_for_backward(x, scale, w0, *ws)
        ctx.meta = (lmax, mmax, cout, b0 is not None)
        return OPS["so2_linear"](x, scale, w0, b0, list(ws), lmax, mmax, cout, True)

    @staticmethod
    @nvtx.annotate("egnn/so2_linear/backward")
    def backward(ctx, gy, gextra):
        x, scale, w0, *ws = ctx.saved_tensors
        lmax, mmax, cout, has_bias = ctx.meta
        E, _, cin = x.shape
        n0 = lmax + 1
        gy, gextra = gy.contiguous(), gextra.contiguous()
        # input gradient: the same kernel on the transposed blocks [W1^T | -W2^T] (W0 as is for m = 0)
        wt = [torch.cat([w[:, :w.shape[1] // 2].t(), -w[:, w.shape[1] // 2:].t()], 1) for w in ws]
        wbuf = _pack_weights(w0, wt, x.dtype)
        meta = _meta(lmax, mmax, [w.numel() for w in wt], w0.numel(), x.device)
        gxs, _ = _so2_launch(gy, gextra if gextra.shape[1] else None, None, wbuf, None, meta, lmax, mmax, cout, cin, 0)
        xs = x if scale is None else x * scale
        gx = gxs if scale is None else gxs * scale
        gs = None if scale is None else (gxs.float() * x.float()).sum(1, keepdim=True).to(scale.dtype)
        # weight gradients: per-m GEMMs reduced over edges (cuBLAS does these best)
        acc = torch.promote_types(w0.dtype, torch.float32)
        g0 = torch.cat([gy[:, :n0].reshape(E, -1), gextra], 1).to(acc)
        gw0 = g0.t() @ xs[:, :n0].reshape(E, -1).to(acc)
        gb = g0.sum(0) if has_bias else None
        gws = []
        for m, (row, n) in enumerate(_tables.m_major_meta(lmax, mmax)[1:], start=1):
            a = xs[:, row:row + n].reshape(E, -1).to(acc)
            b = xs[:, row + n:row + 2 * n].reshape(E, -1).to(acc)
            gp = gy[:, row:row + n].reshape(E, -1).to(acc)
            gm = gy[:, row + n:row + 2 * n].reshape(E, -1).to(acc)
            gws.append(torch.cat([a.t() @ gp + b.t() @ gm, a.t() @ gm - b.t() @ gp], 1).to(ws[m - 1].dtype))
        return (gx, gs, gw0.to(w0.dtype), None if gb is None else gb.to(w0.dtype), None, None, None, *gws)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    @nvtx.annotate("egnn/attention_aggregate")
    def forward(ctx, values, logits, dst, num_nodes, edge_vec, lmax, mmax):
        ctx.save_for_backward(values, logits, dst, edge_vec)
        ctx.meta = (num_nodes, lmax, mmax, edge_vec is not None)
        return OPS["attention_aggregate"](values, logits, dst, num_nodes, edge_vec, lmax, mmax, True)

    @staticmethod
    @nvtx.annotate("egnn/attention_aggregate/backward")
    def backward(ctx, g):
        values, logits, dst, edge_vec = ctx.saved_tensors
        num_nodes, lmax, mmax, rotated = ctx.meta
        E, _, C = values.shape
        H = logits.shape[1]
        acc = torch.promote_types(values.dtype, torch.float32)
        alpha = twin.segment_softmax(logits, dst, num_nodes).to(acc)  # recomputed, [E, H]
        g = g.contiguous()
        # u_e = (edge frame of) g[dst_e]: the gather fused with the rotation when the values are m-major
        u = _gather_rotate(g, dst, None, None, None, edge_vec, lmax, mmax, acc) if rotated else \
            g.index_select(0, dst).to(acc)
        gv = (u.view(E, -1, H, C // H) * alpha.view(E, 1, H, 1)).view(E, -1, C).to(values.dtype)
        da = (u.view(E, -1, H, C // H) * values.to(acc).view(E, -1, H, C // H)).sum((1, 3))
        seg = torch.zeros(num_nodes, H, dtype=acc, device=da.device).index_add_(0, dst, alpha * da)
        gl = (alpha * (da - seg.index_select(0, dst))).to(logits.dtype)
        return gv, gl, None, None, None, None, None


# ----------------------------------------------------------------------------- public functions
def _use_triton(backend, device, lmax, edge_vec=None):
    edge_grad = edge_vec is not None and edge_vec.requires_grad and torch.is_grad_enabled()
    return _backend.resolve(backend, device, lmax, edge_grad) == "triton"


def _mmax(lmax, mmax):
    mmax = lmax if mmax is None else mmax
    if lmax < 0 or not 0 <= mmax <= lmax:
        raise InputError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
    return mmax


def rotate_to_edge(x, e, src, dst, edge_vec, lmax: int, mmax: int | None = None, backend: str = "auto"):
    """[x_src | x_dst | e] rotated into each edge frame, m-major: [E, K_m, 2C_x + C_e]."""
    mmax = _mmax(lmax, mmax)
    ref = x if x is not None else e
    if x is None:  # no node part: the index tensors are unused
        src = dst = torch.zeros(0, dtype=torch.long, device=ref.device)
    if not _use_triton(backend, ref.device, lmax, edge_vec):
        return twin.rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax)
    return _RotateToEdge.apply(x, e, src, dst, edge_vec, lmax, mmax)


def rotate_back(y, edge_vec, lmax: int, mmax: int | None = None, backend: str = "auto"):
    """m-major edge-frame [E, K_m, C] -> l-major global frame [E, (lmax+1)^2, C]."""
    mmax = _mmax(lmax, mmax)
    if not _use_triton(backend, y.device, lmax, edge_vec):
        return twin.rotate_back(y, edge_vec, lmax, mmax)
    return _RotateBack.apply(y, edge_vec, lmax, mmax)


def so2_linear(x, scale, w0, b0, ws, lmax: int, mmax: int, cout: int, backend: str = "auto"):
    """(y [E, K_m, C_out], extra [E, X]) of the m-major SO(2) linear (see SO2Linear)."""
    mmax = _mmax(lmax, mmax)
    if scale is not None and scale.dim() == 3 and scale.shape[1] != 1:
        x, scale = x * scale, None  # per-row scales: apply first, the kernel scales per (edge, channel)
    if not _use_triton(backend, x.device, lmax):
        return twin.so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout)
    if scale is not None:
        scale = scale.expand(x.shape[0], 1, x.shape[2])
    return _SO2Linear.apply(x, scale, w0, b0, lmax, mmax, cout, *ws)


def attention_aggregate(values, logits, dst, num_nodes: int, edge_vec=None, lmax: int = 0, mmax: int | None = None,
                        backend: str = "auto"):
    """Σ_{e->d} softmax(logits)_e[head] · v_e per destination d ([N, (lmax+1)^2 or K, C]); with
    edge_vec, values are m-major edge-frame messages rotated back inside the kernel."""
    if values.shape[2] % logits.shape[1]:
        raise InputError(f"attention_aggregate: channels {values.shape[2]} must be divisible by heads "
                         f"{logits.shape[1]}")
    if edge_vec is not None:
        mmax = _mmax(lmax, mmax)
    else:
        lmax = int(round(values.shape[1] ** 0.5)) - 1
        mmax = lmax
    if not _use_triton(backend, values.device, lmax, edge_vec):
        return twin.attention_aggregate(values, logits, dst, num_nodes, edge_vec, lmax, mmax)
    return _Aggregate.apply(values, logits, dst, num_nodes, edge_vec, lmax, mmax)
