"""Layers 2 and 3 of the kernels: launchers, the torch.library ops egnn::*, autograd rules, and the
public functions (each takes `backend="auto" | "triton" | "torch"`, see egnn.kernels.backend):

* `rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax, roll=None)`: gather [x_src | x_dst | e],
  rotate into the edge frame (D rebuilt from edge_vec inside the kernel), keep the m-major rows
  |m| <= mmax: [E, K_m, 2C_x + C_e].
* `rotate_back(y, edge_vec, lmax, mmax, roll=None)`: m-major edge frame -> l-major global frame.
* `so2_linear(x, scale, w0, b0, ws, lmax, mmax, cout)`: the SO(2) linear of SO2Linear.
* `attention_aggregate(values, logits, dst, num_nodes, edge_vec=None, lmax, mmax, roll=None)`:
  segment softmax + weighted sum per destination (with edge_vec: rotated back first, fused).

Launches run under the tensors' CUDA device, after shape checks, with the launch parameters of
`launch_config` (exactly what the compile lane, egnn.kernels.resources, compiles and budgets).
Nothing here synchronises with the host per call: `dst` must be sorted (CSR by destination; egnn's
graphs are), which is checked once per dst tensor (`check_once`, skipped while a CUDA graph is
captured); segment pointers come from searchsorted, weight packing and meta tables are cached, so a
training step can be captured in a CUDA graph. A kernel that fails to compile falls back to the
twin with one log line, or raises KernelError when backend="triton" was forced.

Gradients flow to every floating input, including the edge vectors (forces): the backward passes
turn <g, D x> into the frame's generators (twin.generator_dot) and the frame's Jacobian
(twin.frame_grad). Second derivatives through the Triton path are not supported (once
differentiable: training on forces needs backend="torch").
"""
import contextlib
import weakref
from typing import Optional

import nvtx
import torch
from torch.autograd.function import once_differentiable

from egnn import so3
from egnn.errors import InputError, KernelError, warn_once

from . import _torch_impl as twin
from . import backend as _backend
from .backend import interpreting

Tensor = torch.Tensor  # at module scope: torch.library reads the ops' annotations

__all__ = ["rotate_to_edge", "rotate_back", "so2_linear", "attention_aggregate", "launch_config",
           "launch_overrides", "num_m_rows"]


# ----------------------------------------------------------------------------- launch parameters
# GPU launch parameters per kernel family, chosen with the compile lane (profiling/kernel_resources.py,
# README "Kernels"): the rotations hold two sets of 2l+1 row tiles of BLOCK_E x BLOCK_C, so wide
# degrees take narrower channel tiles; so2_linear keeps one float32 accumulator.
_INTERPRETER = {"rotate": dict(BLOCK_E=64, BLOCK_C=128), "aggregate": dict(BLOCK_E=32, BLOCK_C=128),
                "so2": dict(BLOCK_E=32, BLOCK_N=256, BLOCK_K=32)}
_OVERRIDES: dict = {}


def gpu_config(kind: str, lmax: int, dtype) -> dict:
    """The GPU launch parameters of a kernel family ("rotate", "aggregate" or "so2")."""
    if kind in ("rotate", "aggregate"):
        return dict(BLOCK_E=8, BLOCK_C=32 if lmax <= 4 else 16, num_warps=4)
    if dtype == torch.float32:
        return dict(BLOCK_E=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
    return dict(BLOCK_E=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2)


def launch_config(kind: str, lmax: int, dtype) -> dict:
    """What a launch uses: a test override, the interpreter's wide blocks, or gpu_config."""
    if kind in _OVERRIDES:
        return dict(_OVERRIDES[kind])
    if interpreting():
        return dict(_INTERPRETER[kind])
    return gpu_config(kind, lmax, dtype)


@contextlib.contextmanager
def launch_overrides(**cfgs):
    """Force launch parameters per kind (tests run the GPU block sizes under the interpreter)."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(cfgs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _cdiv(a, b):
    return (a + b - 1) // b


def num_m_rows(lmax: int, mmax: int) -> int:
    return (lmax + 1) + sum(2 * (lmax + 1 - m) for m in range(1, mmax + 1))


def _run(kernel, grid, args, cfg, device):
    """Launch under the tensors' device (a --device cuda:1 run must not launch on cuda:0)."""
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        kernel[grid](*args, **cfg)


def _compile_errors() -> tuple:
    errs = []
    for mod, name in (("triton.compiler.errors", "CompilationError"), ("triton.runtime.errors", "OutOfResources"),
                      ("triton.runtime.errors", "PTXASError")):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


# ----------------------------------------------------------------------------- launchers (Triton)
def _to_edge(x1, i1, x2, i2, x3, edge_vec, roll, lmax, mmax, dtype):
    """D [x1[i1] | x2[i2] | x3] -> m-major [E, K_m, C1 + C2 + C3]; any part may be None (its index is
    then a one-entry placeholder that the kernel masks off: reading E entries of it faulted at 1e6
    edges on the first GPU, while small E stayed inside the allocator's block)."""
    from .rotate import to_edge_kernel

    E = edge_vec.shape[0]
    KM = num_m_rows(lmax, mmax)
    ref = next(t for t in (x1, x2, x3) if t is not None)
    C1, C2, C3 = (0 if t is None else t.shape[-1] for t in (x1, x2, x3))
    idx = i1 if i1 is not None else (i2 if i2 is not None else edge_vec.new_zeros(1, dtype=torch.int32))
    x1, x2, x3 = (ref if t is None else t.contiguous() for t in (x1, x2, x3))
    i1 = (idx if i1 is None else i1).contiguous()
    i2 = (idx if i2 is None else i2).contiguous()
    out = torch.empty((E, KM, C1 + C2 + C3), dtype=dtype, device=ref.device)
    if E == 0 or out.shape[-1] == 0:
        return out
    cfg = launch_config("rotate", lmax, dtype)
    grid = (_cdiv(E, cfg["BLOCK_E"]), _cdiv(C1 + C2 + C3, cfg["BLOCK_C"]))
    r = roll.contiguous() if roll is not None else edge_vec
    _run(to_edge_kernel, grid, (out, x1, i1, x2, i2, x3, edge_vec.contiguous(), r, E, C1, C2, C3, KM),
         dict(LMAX=lmax, MMAX=mmax, HAS_ROLL=roll is not None, **cfg), ref.device)
    return out


def _from_edge(y, edge_vec, roll, lmax, mmax):
    from .rotate import from_edge_kernel

    E, KM, C = y.shape
    out = torch.empty((E, (lmax + 1) ** 2, C), dtype=y.dtype, device=y.device)
    if E == 0 or C == 0:
        return out
    cfg = launch_config("rotate", lmax, y.dtype)
    r = roll.contiguous() if roll is not None else edge_vec
    _run(from_edge_kernel, (_cdiv(E, cfg["BLOCK_E"]), _cdiv(C, cfg["BLOCK_C"])),
         (out, y.contiguous(), edge_vec.contiguous(), r, E, C, KM),
         dict(LMAX=lmax, MMAX=mmax, HAS_ROLL=roll is not None, **cfg), y.device)
    return out


_META: dict = {}


def _meta(lmax, mmax, cin, cout, nx, transpose, device):
    """int32 [mmax+1, 4]: (first m-major row, rows, weight offset, output columns) per m; cached."""
    key = (lmax, mmax, cin, cout, nx, transpose, str(device))
    if key not in _META:
        rows, off, meta = 0, 0, []
        kin, kout = (cout, cin) if transpose else (cin, cout)
        for m, n in enumerate(so3.m_major_sizes(lmax, mmax)):
            nr = n if m == 0 else 2 * n
            cols = nr * kout + (nx if m == 0 and not transpose else 0)
            meta += [rows, nr, off, cols]
            off += (nr * kin + (nx if m == 0 and transpose else 0)) * cols
            rows += nr
        _META[key] = torch.tensor(meta, dtype=torch.int32, device=device)
    return _META[key]


class _PackCache:
    """Packed SO(2) weights per (module weights, dtype, direction), rebuilt when a weight changes
    (tensor versions), so repeated inference never repacks and training packs once per step."""

    def __init__(self):
        self._d: dict = {}

    def get(self, w0, ws, dtype, transpose, nx_first=0):
        key = (id(w0), dtype, transpose, nx_first)
        stamp = (w0._version, *(w._version for w in ws))
        hit = self._d.get(key)
        if hit is not None and hit[0]() is w0 and all(r() is w for r, w in zip(hit[1], ws)) and hit[2] == stamp:
            return hit[3]
        buf = _pack(w0, ws, dtype, transpose, nx_first)
        if len(self._d) > 256:
            self._d.clear()
        self._d[key] = (weakref.ref(w0), [weakref.ref(w) for w in ws], stamp, buf)
        return buf


_PACKS = _PackCache()


def _pack(w0, ws, dtype, transpose, nx_first=0):
    """One flat buffer of per-m [K_m, N_m] row-major GEMM weights: m = 0 is W0ᵀ (W0 for the
    transposed pass), m > 0 is [[W1, W2], [−W2, W1]] (its transpose for the input gradient).
    `nx_first` extra outputs at the top of W0 (fairchem's layout) are moved after the others."""
    with torch.no_grad():
        if nx_first:
            w0 = torch.cat([w0[nx_first:], w0[:nx_first]])
        parts = [w0.reshape(-1) if transpose else w0.t().reshape(-1)]
        for w in ws:
            half = w.shape[1] // 2
            w1, w2 = w[:, :half], w[:, half:]
            big = torch.cat([torch.cat([w1, w2], 1), torch.cat([-w2, w1], 1)], 0)
            parts.append((big.t() if transpose else big).reshape(-1))
        return torch.cat(parts).to(dtype).contiguous()


def _precision(dtype):
    if interpreting():
        return "ieee"  # the interpreter's half-precision dot is unreliable
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "native"


def _so2_launch(x, xe, scale, wbuf, bias, meta, lmax, mmax, cin, cout, nx):
    from .so2 import so2_linear_kernel

    E, KMR, _ = x.shape
    y = torch.empty((E, KMR, cout), dtype=x.dtype, device=x.device)
    xo = torch.empty((E, nx), dtype=x.dtype, device=x.device)
    if E == 0:
        return y, xo
    kx = 0 if xe is None else xe.shape[1]
    ncols = max((lmax + 1) * cout + nx, 2 * lmax * cout if mmax else 0)
    cfg = launch_config("so2", lmax, x.dtype)
    grid = (_cdiv(E, cfg["BLOCK_E"]), mmax + 1, _cdiv(ncols, cfg["BLOCK_N"]))
    _run(so2_linear_kernel, grid,
         (y, xo, x.contiguous(), x if xe is None else xe.contiguous(),
          x if scale is None else scale.reshape(E, cin).contiguous(), wbuf,
          wbuf if bias is None else bias.to(wbuf.dtype).contiguous(), meta, E, KMR, cin, cout, kx, nx),
         dict(HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), **cfg), x.device)
    return y, xo


_CHECKED: dict = {}


def check_once(tag: str, t: torch.Tensor, check) -> None:
    """Run `check(t)` (which may synchronise with the host) once per tensor object and version:
    a graph's dst or edge vectors are validated on first use, later layers and steps reuse the
    verdict, and nothing is checked while a CUDA graph is being captured."""
    key = (tag, id(t))
    hit = _CHECKED.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    check(t)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[key] = (weakref.ref(t), t._version)


def _check_sorted(dst):
    if dst.numel() > 1 and bool((dst[1:] < dst[:-1]).any()):
        raise InputError("attention_aggregate: dst must be sorted (edges in CSR order by destination, as "
                         "egnn.graph.radius_graph returns them); sort the edges with dst.argsort(stable=True)")


def _segment_ptr(dst, num_nodes):
    """CSR pointers of the sorted dst (searchsorted: no host synchronisation)."""
    nodes = torch.arange(num_nodes + 1, device=dst.device, dtype=dst.dtype)
    return torch.searchsorted(dst.contiguous(), nodes).to(torch.int32)


def _aggregate_launch(values, logits, dst, num_nodes, edge_vec, roll, lmax, mmax):
    from .aggregate import aggregate_kernel

    E, KV, C = values.shape
    H = logits.shape[1]
    K = (lmax + 1) ** 2 if edge_vec is not None else KV
    out = torch.empty((num_nodes, K, C), dtype=values.dtype, device=values.device)
    if num_nodes == 0 or C == 0:
        return out
    cfg = launch_config("aggregate", lmax, values.dtype)
    vec = edge_vec.contiguous() if edge_vec is not None else values
    r = roll.contiguous() if roll is not None else vec
    _run(aggregate_kernel, (num_nodes, _cdiv(C, cfg["BLOCK_C"])),
         (out, values.contiguous(), logits.contiguous(), _segment_ptr(dst, num_nodes), vec, r, C, H, C // H, KV),
         dict(K=K, LMAX=lmax, MMAX=mmax, ROTATE=edge_vec is not None, HAS_ROLL=roll is not None, **cfg),
         values.device)
    return out


# ----------------------------------------------------------------------------- torch.library ops (layer 2)
def _op_rotate_to_edge(x, e, src, dst, edge_vec, roll, lmax: int, mmax: int, use_triton: bool):
    if not use_triton:
        return twin.rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax, roll)
    dtype = (x if x is not None else e).dtype
    if x is None:
        return _to_edge(None, None, None, None, e, edge_vec, roll, lmax, mmax, dtype)
    return _to_edge(x, src, x, dst, e, edge_vec, roll, lmax, mmax, dtype)


def _op_rotate_back(y, edge_vec, roll, lmax: int, mmax: int, use_triton: bool):
    return _from_edge(y, edge_vec, roll, lmax, mmax) if use_triton else twin.rotate_back(y, edge_vec, lmax, mmax, roll)


def _op_so2_linear(x, scale, w0, b0, ws, lmax: int, mmax: int, cout: int, use_triton: bool, extra_first: bool):
    if not use_triton:
        y, extra = twin.so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout, extra_first)
        return y, extra.contiguous()
    nx = w0.shape[0] - (lmax + 1) * cout
    wbuf = _PACKS.get(w0, list(ws), x.dtype, False, nx if extra_first else 0)
    if extra_first and b0 is not None:
        b0 = torch.cat([b0[nx:], b0[:nx]])
    meta = _meta(lmax, mmax, x.shape[2], cout, nx, False, x.device)
    return _so2_launch(x, None, scale, wbuf, b0, meta, lmax, mmax, x.shape[2], cout, nx)


def _op_attention_aggregate(values, logits, dst, num_nodes: int, edge_vec, roll, lmax: int, mmax: int,
                            use_triton: bool):
    if not use_triton:
        return twin.attention_aggregate(values, logits, dst, num_nodes, edge_vec, lmax, mmax, roll)
    return _aggregate_launch(values, logits, dst, num_nodes, edge_vec, roll, lmax, mmax)


def _register_library_ops() -> dict:
    """egnn::<op> custom ops with fakes (torch.compile traces through them)."""
    lib = torch.library

    @lib.custom_op("egnn::rotate_to_edge", mutates_args=())
    def rotate_to_edge_op(x: Optional[Tensor], e: Optional[Tensor], src: Tensor, dst: Tensor, edge_vec: Tensor,
                          roll: Optional[Tensor], lmax: int, mmax: int, use_triton: bool) -> Tensor:
        return _op_rotate_to_edge(x, e, src, dst, edge_vec, roll, lmax, mmax, use_triton)

    @rotate_to_edge_op.register_fake
    def _(x, e, src, dst, edge_vec, roll, lmax, mmax, use_triton):
        ref = x if x is not None else e
        c = (0 if x is None else 2 * x.shape[-1]) + (0 if e is None else e.shape[-1])
        return ref.new_empty((edge_vec.shape[0], num_m_rows(lmax, mmax), c))

    @lib.custom_op("egnn::rotate_back", mutates_args=())
    def rotate_back_op(y: Tensor, edge_vec: Tensor, roll: Optional[Tensor], lmax: int, mmax: int,
                       use_triton: bool) -> Tensor:
        return _op_rotate_back(y, edge_vec, roll, lmax, mmax, use_triton)

    @rotate_back_op.register_fake
    def _(y, edge_vec, roll, lmax, mmax, use_triton):
        return y.new_empty((y.shape[0], (lmax + 1) ** 2, y.shape[2]))

    @lib.custom_op("egnn::so2_linear", mutates_args=())
    def so2_linear_op(x: Tensor, scale: Optional[Tensor], w0: Tensor, b0: Optional[Tensor], ws: list[Tensor],
                      lmax: int, mmax: int, cout: int, use_triton: bool, extra_first: bool) -> tuple[Tensor, Tensor]:
        y, extra = _op_so2_linear(x, scale, w0, b0, ws, lmax, mmax, cout, use_triton, extra_first)
        return y.contiguous(), extra.contiguous()

    @so2_linear_op.register_fake
    def _(x, scale, w0, b0, ws, lmax, mmax, cout, use_triton, extra_first):
        return x.new_empty((x.shape[0], x.shape[1], cout)), x.new_empty((x.shape[0], w0.shape[0] - (lmax + 1) * cout))

    @lib.custom_op("egnn::attention_aggregate", mutates_args=())
    def attention_aggregate_op(values: Tensor, logits: Tensor, dst: Tensor, num_nodes: int, edge_vec: Optional[Tensor],
                               roll: Optional[Tensor], lmax: int, mmax: int, use_triton: bool) -> Tensor:
        return _op_attention_aggregate(values, logits, dst, num_nodes, edge_vec, roll, lmax, mmax, use_triton)

    @attention_aggregate_op.register_fake
    def _(values, logits, dst, num_nodes, edge_vec, roll, lmax, mmax, use_triton):
        K = (lmax + 1) ** 2 if edge_vec is not None else values.shape[1]
        return values.new_empty((num_nodes, K, values.shape[2]))

    return dict(rotate_to_edge=rotate_to_edge_op, rotate_back=rotate_back_op, so2_linear=so2_linear_op,
                attention_aggregate=attention_aggregate_op)


OPS = _register_library_ops()


# ----------------------------------------------------------------------------- autograd (layer 3)
def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


class _RotateToEdge(torch.autograd.Function):
    """Saves only indices and edge vectors (and, for forces, references to the inputs): backward
    rotates the gradient back and scatters it to the node rows."""

    @staticmethod
    @nvtx.annotate("egnn/rotate_to_edge")
    def forward(ctx, x, e, src, dst, edge_vec, roll, lmax, mmax):
        want_vec = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        ctx.save_for_backward(src, dst, edge_vec, roll, x if want_vec else None, e if want_vec else None)
        ctx.meta = (lmax, mmax, None if x is None else x.shape[0], None if x is None else x.shape[-1])
        return OPS["rotate_to_edge"](x, e, src, dst, edge_vec, roll, lmax, mmax, True)

    @staticmethod
    @once_differentiable
    @nvtx.annotate("egnn/rotate_to_edge/backward")
    def backward(ctx, g):
        src, dst, edge_vec, roll, x, e = ctx.saved_tensors
        lmax, mmax, n, c = ctx.meta
        gm = OPS["rotate_back"](g.contiguous(), edge_vec, roll, lmax, mmax, True)
        gx = ge = gv = gr = None
        if c is not None and ctx.needs_input_grad[0]:
            acc = _acc(gm.dtype)
            gx = gm.new_zeros((n,) + gm.shape[1:-1] + (c,), dtype=acc)
            gx.index_add_(0, src, gm[..., :c].to(acc)).index_add_(0, dst, gm[..., c:2 * c].to(acc))
            gx = gx.to(gm.dtype)
        if ctx.needs_input_grad[1]:
            ge = gm[..., (0 if c is None else 2 * c):]
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            H = 0
            if c is not None:
                H = twin.generator_dot(gm[..., :c], x.index_select(0, src), lmax) + \
                    twin.generator_dot(gm[..., c:2 * c], x.index_select(0, dst), lmax)
            if e is not None:
                H = H + twin.generator_dot(gm[..., (0 if c is None else 2 * c):], e, lmax)
            gv, gr = twin.frame_grad(edge_vec, H, roll)
        return gx, ge, None, None, gv, gr, None, None


class _RotateBack(torch.autograd.Function):
    @staticmethod
    @nvtx.annotate("egnn/rotate_back")
    def forward(ctx, y, edge_vec, roll, lmax, mmax):
        ctx.save_for_backward(edge_vec, roll, y if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None)
        ctx.meta = (lmax, mmax)
        return OPS["rotate_back"](y, edge_vec, roll, lmax, mmax, True)

    @staticmethod
    @once_differentiable
    @nvtx.annotate("egnn/rotate_back/backward")
    def backward(ctx, g):
        edge_vec, roll, y = ctx.saved_tensors
        lmax, mmax = ctx.meta
        g = g.contiguous()
        none = edge_vec.new_zeros(0, dtype=torch.int64)
        gy = OPS["rotate_to_edge"](None, g, none, none, edge_vec, roll, lmax, mmax, True) if ctx.needs_input_grad[0] \
            else None
        gv = gr = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # out = Dᵀ y: a left turn ε changes it by −ε·L out
            out = OPS["rotate_back"](y, edge_vec, roll, lmax, mmax, True)
            gv, gr = twin.frame_grad(edge_vec, -twin.generator_dot(g, out, lmax), roll)
        return gy, gv, gr, None, None


class _SO2Linear(torch.autograd.Function):
    @staticmethod
    @nvtx.annotate("egnn/so2_linear")
    def forward(ctx, x, scale, w0, b0, lmax, mmax, cout, extra_first, *ws):
        ctx.save_for_backward(x, scale, w0, *ws)
        ctx.meta = (lmax, mmax, cout, b0 is not None, extra_first)
        return OPS["so2_linear"](x, scale, w0, b0, list(ws), lmax, mmax, cout, True, extra_first)

    @staticmethod
    @once_differentiable
    @nvtx.annotate("egnn/so2_linear/backward")
    def backward(ctx, gy, gextra):
        x, scale, w0, *ws = ctx.saved_tensors
        lmax, mmax, cout, has_bias, extra_first = ctx.meta
        E, _, cin = x.shape
        n0 = lmax + 1
        gy, gextra = gy.contiguous(), gextra.contiguous()
        nx = gextra.shape[1]
        # input gradient: the same grouped GEMM on the transposed per-m weights
        wbuf = _PACKS.get(w0, ws, x.dtype, True, nx if extra_first else 0)
        meta = _meta(lmax, mmax, cin, cout, nx, True, x.device)
        gxs, _ = _so2_launch(gy, gextra if nx else None, None, wbuf, None, meta, lmax, mmax, cout, cin, 0)
        xs = x if scale is None else x * scale
        gx = gxs if scale is None else gxs * scale
        gs = None if scale is None else (gxs.float() * x.float()).sum(1, keepdim=True).to(scale.dtype)
        # weight gradients: per-m GEMMs reduced over edges (cuBLAS does these best)
        acc = _acc(w0.dtype)
        g0 = [gy[:, :n0].reshape(E, -1), gextra]
        g0 = torch.cat(g0[::-1] if extra_first else g0, 1).to(acc)
        gw0 = g0.t() @ xs[:, :n0].reshape(E, -1).to(acc)
        gb = g0.sum(0) if has_bias else None
        gws, row = [], n0
        for m, n in enumerate(so3.m_major_sizes(lmax, mmax)[1:], start=1):
            a = xs[:, row:row + n].reshape(E, -1).to(acc)
            b = xs[:, row + n:row + 2 * n].reshape(E, -1).to(acc)
            gp = gy[:, row:row + n].reshape(E, -1).to(acc)
            gm = gy[:, row + n:row + 2 * n].reshape(E, -1).to(acc)
            gws.append(torch.cat([a.t() @ gp + b.t() @ gm, a.t() @ gm - b.t() @ gp], 1).to(ws[m - 1].dtype))
            row += 2 * n
        return (gx, gs, gw0.to(w0.dtype), None if gb is None else gb.to(w0.dtype), None, None, None, None, *gws)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    @nvtx.annotate("egnn/attention_aggregate")
    def forward(ctx, values, logits, dst, num_nodes, edge_vec, roll, lmax, mmax):
        ctx.save_for_backward(values, logits, dst, edge_vec, roll)
        ctx.meta = (num_nodes, lmax, mmax)
        return OPS["attention_aggregate"](values, logits, dst, num_nodes, edge_vec, roll, lmax, mmax, True)

    @staticmethod
    @once_differentiable
    @nvtx.annotate("egnn/attention_aggregate/backward")
    def backward(ctx, g):
        values, logits, dst, edge_vec, roll = ctx.saved_tensors
        num_nodes, lmax, mmax = ctx.meta
        E, _, C = values.shape
        H = logits.shape[1]
        acc = _acc(values.dtype)
        alpha = twin.segment_softmax(logits, dst, num_nodes).to(acc)  # recomputed, [E, H]
        g = g.contiguous()
        # u_e = (edge frame of) g[dst_e]: the gather fused with the rotation when the values are m-major
        rotated = edge_vec is not None
        u = _to_edge(g, dst, None, None, None, edge_vec, roll, lmax, mmax, acc) if rotated else \
            g.index_select(0, dst).to(acc)
        gv = (u.view(E, -1, H, C // H) * alpha.view(E, 1, H, 1)).view(E, -1, C).to(values.dtype)
        da = (u.view(E, -1, H, C // H) * values.to(acc).view(E, -1, H, C // H)).sum((1, 3))
        seg = torch.zeros(num_nodes, H, dtype=acc, device=da.device).index_add_(0, dst, alpha * da)
        gl = (alpha * (da - seg.index_select(0, dst))).to(logits.dtype)
        gvec = groll = None
        if rotated and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]):  # out_d = Σ α_e D_eᵀ y_e: −ε·L (D_eᵀ y_e)
            v = _from_edge(values, edge_vec, roll, lmax, mmax).to(acc)
            ga = (g.index_select(0, dst).to(acc).view(E, -1, H, C // H) * alpha.view(E, 1, H, 1)).view(E, -1, C)
            gvec, groll = twin.frame_grad(edge_vec, -twin.generator_dot(ga, v, lmax), roll)
        return gv, gl, None, None, gvec, groll, None, None


# ----------------------------------------------------------------------------- public functions
def _degrees(lmax, mmax):
    mmax = lmax if mmax is None else mmax
    if lmax < 0 or not 0 <= mmax <= lmax:
        raise InputError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
    return mmax


def _need(cond, msg):
    if not cond:
        raise InputError(msg)


def _check_edges(name, edge_vec, roll, E, device):
    _need(edge_vec.dim() == 2 and edge_vec.shape == (E, 3), f"{name}: edge_vec must be [E={E}, 3], "
          f"got {tuple(edge_vec.shape)}")
    _need(edge_vec.device == device, f"{name}: edge_vec is on {edge_vec.device}, the data on {device}")
    if roll is not None:
        _need(roll.shape == (E,) and roll.device == device, f"{name}: roll must be [E={E}] on {device}, got "
              f"{tuple(roll.shape)} on {roll.device}")


def _lane_frame(edge_vec, roll):
    """Edge vectors and rolls as the kernels were compiled for them (float32: the angles are float32
    inside the kernels anyway; a float64 geometry would otherwise compile an unchecked variant).
    Differentiable casts, so forces still reach a float64 edge_vec."""
    return edge_vec.float(), None if roll is None else roll.float()


def _fallback(name, backend, exc):
    """A kernel that failed to compile: the twin (logged once) or, when forced, a KernelError."""
    if _backend.forced(backend):
        raise KernelError(f"{name}: the Triton kernel failed to compile ({type(exc).__name__}: {exc}); "
                          "use backend='auto' or 'torch'") from exc
    warn_once(f"egnn-compile-{name}", f"egnn: {name}: the Triton kernel failed to compile "
              f"({type(exc).__name__}); using the PyTorch twin")


def rotate_to_edge(x, e, src, dst, edge_vec, lmax: int, mmax: int | None = None, backend: str = "auto", roll=None):
    """[x_src | x_dst | e] rotated into each edge frame, m-major rows |m| <= mmax: [E, K_m, 2C_x + C_e].
    `roll` [E] (radians, optional) turns each frame about its edge axis."""
    mmax = _degrees(lmax, mmax)
    ref = x if x is not None else e
    _need(ref is not None, "rotate_to_edge: give node embeddings x, edge embeddings e, or both")
    K = (lmax + 1) ** 2
    E = edge_vec.shape[0]
    if x is not None:
        _need(x.dim() == 3 and x.shape[1] == K, f"rotate_to_edge: x must be [N, (lmax+1)²={K}, C], got "
              f"{tuple(x.shape)}")
        _need(src.shape == (E,) and dst.shape == (E,) and not src.is_floating_point(),
              f"rotate_to_edge: src and dst must be integer [E={E}], got {tuple(src.shape)}, {tuple(dst.shape)}")
    else:  # no node part: the index tensors are unused
        src = dst = torch.zeros(0, dtype=torch.long, device=ref.device)
    if e is not None:
        _need(e.dim() == 3 and e.shape[:2] == (E, K), f"rotate_to_edge: e must be [E={E}, {K}, C], got "
              f"{tuple(e.shape)}")
        _need(x is None or e.dtype == x.dtype, f"rotate_to_edge: x is {x.dtype if x is not None else None} but e "
              f"is {e.dtype}")
    _check_edges("rotate_to_edge", edge_vec, roll, E, ref.device)
    if _backend.resolve(backend, ref.device, lmax, ref.dtype) == "torch":
        return twin.rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax, roll)
    try:
        return _RotateToEdge.apply(x, e, src.long(), dst.long(), *_lane_frame(edge_vec, roll), lmax, mmax)
    except _compile_errors() as exc:
        _fallback("rotate_to_edge", backend, exc)
        return twin.rotate_to_edge(x, e, src, dst, edge_vec, lmax, mmax, roll)


def _rescaled(out, lmax, mmax, rescale):
    """EquiformerV2's rotate-back rescale (twin.rescale_factors) on an l-major output."""
    if not rescale or mmax == lmax:
        return out
    return out * twin.rescale_factors(lmax, mmax).to(out.device, out.dtype).view(1, -1, 1)


def rotate_back(y, edge_vec, lmax: int, mmax: int | None = None, backend: str = "auto", roll=None,
                rescale: bool = False):
    """m-major edge-frame [E, K_m, C] -> l-major global frame [E, (lmax+1)², C]; `rescale`:
    EquiformerV2's factor √((2l+1)/(2·mmax+1)) on degrees l > mmax."""
    mmax = _degrees(lmax, mmax)
    KM = num_m_rows(lmax, mmax)
    _need(y.dim() == 3 and y.shape[1] == KM, f"rotate_back: y must be [E, K_m={KM}, C] (lmax={lmax}, "
          f"mmax={mmax}), got {tuple(y.shape)}")
    _check_edges("rotate_back", edge_vec, roll, y.shape[0], y.device)
    if _backend.resolve(backend, y.device, lmax, y.dtype) == "torch":
        return twin.rotate_back(y, edge_vec, lmax, mmax, roll, rescale)
    try:
        return _rescaled(_RotateBack.apply(y, *_lane_frame(edge_vec, roll), lmax, mmax), lmax, mmax, rescale)
    except _compile_errors() as exc:
        _fallback("rotate_back", backend, exc)
        return twin.rotate_back(y, edge_vec, lmax, mmax, roll, rescale)


def so2_linear(x, scale, w0, b0, ws, lmax: int, mmax: int, cout: int, backend: str = "auto", extra_first: bool = False):
    """(y [E, K_m, C_out], extra [E, X]) of the m-major SO(2) linear (see SO2Linear and
    twin.so2_linear). `scale`: None, [E, 1, C_in] per channel, [E, Σ_m n_m, C_in] (or flat
    [E, Σ_m n_m·C_in], fairchem's rad_func output) per (m, l), or [E, K_m, C_in] per row.
    `extra_first`: the X extra outputs are the first rows of w0 (fairchem) instead of the last."""
    mmax = _degrees(lmax, mmax)
    KM = num_m_rows(lmax, mmax)
    _need(x.dim() == 3 and x.shape[1] == KM, f"so2_linear: x must be [E, K_m={KM}, C_in], got {tuple(x.shape)}")
    E, _, cin = x.shape
    sizes = so3.m_major_sizes(lmax, mmax)
    _need(w0.dim() == 2 and w0.shape[1] == sizes[0] * cin and w0.shape[0] >= sizes[0] * cout,
          f"so2_linear: w0 must be [{sizes[0]}·C_out + X, {sizes[0]}·C_in], got {tuple(w0.shape)}")
    _need(b0 is None or b0.shape == (w0.shape[0],), f"so2_linear: b0 must be [{w0.shape[0]}]")
    _need(len(ws) == mmax and all(w.shape == (n * cin, 2 * n * cout) for w, n in zip(ws, sizes[1:])),
          f"so2_linear: ws must hold one [n·C_in, 2n·C_out] block per m = 1..{mmax}, got "
          f"{[tuple(w.shape) for w in ws]}")
    nml = twin.num_ml(lmax, mmax)
    if scale is not None:
        if scale.dim() == 2 and scale.shape == (E, nml * cin):
            scale = scale.view(E, nml, cin)
        _need(scale.dim() == 3 and scale.shape[0] in (1, E) and scale.shape[1] in (1, nml, KM)
              and scale.shape[2] == cin, f"so2_linear: scale must be [E, 1, C_in], [E, {nml}, C_in] (per (m, l)), "
              f"[E, {nml}·C_in] or [E, K_m={KM}, C_in], got {tuple(scale.shape)}")
    if _backend.resolve(backend, x.device, lmax, x.dtype) == "torch":
        return twin.so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout, extra_first)
    if scale is not None and scale.shape[1] != 1:  # the kernel scales per (edge, channel): others first
        rows = twin.ml_rows(lmax, mmax).to(x.device) if twin.scale_kind(scale, lmax, mmax, KM) == "ml" else None
        x, scale = x * (scale if rows is None else scale.index_select(1, rows)), None
    if scale is not None:
        scale = scale.expand(E, 1, cin)
    try:
        return _SO2Linear.apply(x, scale, w0, b0, lmax, mmax, cout, extra_first, *ws)
    except _compile_errors() as exc:
        _fallback("so2_linear", backend, exc)
        return twin.so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout, extra_first)


def attention_aggregate(values, logits, dst, num_nodes: int, edge_vec=None, lmax: int = 0, mmax: int | None = None,
                        backend: str = "auto", roll=None, rescale: bool = False):
    """Σ_{e->d} softmax(logits)_e[head] · v_e per destination d ([N, (lmax+1)² or K, C]); with
    edge_vec, values are m-major edge-frame messages rotated back inside the kernel (`rescale` as
    in rotate_back). dst sorted."""
    _need(values.dim() == 3 and logits.dim() == 2 and logits.shape[0] == values.shape[0],
          f"attention_aggregate: values [E, K, C] and logits [E, H] must share E, got {tuple(values.shape)}, "
          f"{tuple(logits.shape)}")
    E, KV, C = values.shape
    H = logits.shape[1]
    _need(H >= 1 and C % H == 0, f"attention_aggregate: channels {C} must be divisible by heads {H}")
    _need(dst.shape == (E,) and not dst.is_floating_point(), f"attention_aggregate: dst must be integer [E={E}]")
    if edge_vec is not None:
        mmax = _degrees(lmax, mmax)
        _need(KV == num_m_rows(lmax, mmax), f"attention_aggregate: rotated values must be [E, K_m="
              f"{num_m_rows(lmax, mmax)}, C] for lmax={lmax}, mmax={mmax}, got {tuple(values.shape)}")
        _check_edges("attention_aggregate", edge_vec, roll, E, values.device)
    else:
        lmax = mmax = 0  # values are already in the global frame: K rows of any layout
        rescale = False
    if _backend.resolve(backend, values.device, lmax, values.dtype) == "torch":
        return twin.attention_aggregate(values, logits, dst, num_nodes, edge_vec, lmax, mmax, roll, rescale)
    check_once("sorted", dst, _check_sorted)  # the kernel walks CSR segments; the twin does not care
    try:
        vec, r = _lane_frame(edge_vec, roll) if edge_vec is not None else (None, None)
        return _rescaled(_Aggregate.apply(values, logits, dst.long(), num_nodes, vec, r, lmax, mmax), lmax, mmax,
                         rescale)
    except _compile_errors() as exc:
        _fallback("attention_aggregate", backend, exc)
        return twin.attention_aggregate(values, logits, dst, num_nodes, edge_vec, lmax, mmax, roll, rescale)
