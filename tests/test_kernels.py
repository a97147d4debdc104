"""Triton kernels against their PyTorch twins (TRITON_INTERPRET=1 on CPU) at the interpreter's wide
blocks and at the GPU launch sizes (several edge blocks, sizes that are not tile multiples), edge
vector gradients (forces), rolls, half precision, the fused layer, backends, fallbacks and bad input.
The gpu-marked tests compare every op forward and backward against backend="torch" on CUDA."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import logging

import numpy as np
import pytest
import torch
from conftest import random_rotation, rotate_blocks

from egnn import EgnnError, KernelError, errors, so3
from egnn.kernels import _torch_impl as twin
from egnn.kernels import attention_aggregate, rotate_back, rotate_to_edge, so2_linear
from egnn.kernels import backend as B
from egnn.kernels import ops
from egnn.nn import EdgeRotation, InteractionLayer, SO2Linear
from egnn.nn.fused import FusedInteractionLayer, saved_activation_bytes

pytestmark = pytest.mark.filterwarnings("ignore")


def graph(N, E, seed=0, device="cpu"):
    """Edges sorted by dst; node 1 has no incoming edge, node 0 more than one edge block (> 32)."""
    g = torch.Generator().manual_seed(seed)
    dst = torch.randint(2, N, (E,), generator=g)
    dst[: min(E, 40)] = 0
    dst = dst.sort().values
    src = torch.randint(0, N, (E,), generator=g)
    vec = torch.randn(E, 3, generator=g)
    vec[0] = torch.tensor([0.0, 1.3, 0.0])  # on the poles too
    vec[1] = torch.tensor([0.0, -0.7, 0.0])
    vec[2] = torch.tensor([1e-7, 0.9, -2e-7])  # next to a pole
    return src.to(device), dst.to(device), vec.to(device)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def probe(y):
    """A fixed non-trivial cotangent for backward checks."""
    return torch.sin(torch.arange(y.numel(), dtype=torch.float64) * 0.37).view(y.shape).to(y.device, y.dtype)


def run_both(fn, inputs, backends=("triton", "torch")):
    """Outputs and input gradients of fn under two backends."""
    res = {}
    for b in backends:
        ins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(b, *ins)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * probe(o)).sum() for o in out if o.numel())
        grads = torch.autograd.grad(loss, [t for t in ins if t.requires_grad])
        res[b] = list(out) + list(grads)
    return res[backends[0]], res[backends[1]]


# the GPU launch sizes, run under the interpreter: E = 45 edges are 6 blocks of 8, C = 48 two channel tiles
GPU_SIZES = pytest.mark.parametrize("sizes", ["interpreter", "gpu"])


def blocks(sizes, lmax, dtype=torch.float32):
    if sizes == "interpreter":
        return ops.launch_overrides()
    return ops.launch_overrides(**{k: ops.gpu_config(k, lmax, dtype) for k in ("rotate", "aggregate", "so2")})


# ----------------------------------------------------------------------------- ops vs twins, fp32, with forces
@GPU_SIZES
@pytest.mark.parametrize("lmax,mmax,C", [(1, 1, 130), (2, 1, 8), (3, 2, 16), (2, 2, 24)])
def test_rotate_to_edge_matches_twin(lmax, mmax, C, sizes):
    src, dst, vec = graph(7, 45, seed=lmax)
    x, e = torch.randn(7, (lmax + 1) ** 2, C), torch.randn(45, (lmax + 1) ** 2, 5)
    with blocks(sizes, lmax):
        tri, ref = run_both(lambda b, x, e, v: rotate_to_edge(x, e, src, dst, v, lmax, mmax, backend=b), [x, e, vec])
    assert tri[0].shape == (45, len(so3.l_to_m_major(lmax, mmax)), 2 * C + 5)
    for a, r in zip(tri, ref):  # output, d/dx, d/de, d/d(edge_vec)
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("lmax,mmax", [(6, 5), (5, 2), (6, 6)])
def test_high_degrees_forward_and_backward(lmax, mmax):
    src, dst, vec = graph(5, 20, seed=6)
    x, e = torch.randn(5, (lmax + 1) ** 2, 3), torch.randn(20, (lmax + 1) ** 2, 2)
    tri, ref = run_both(lambda b, x, e, v: rotate_to_edge(x, e, src, dst, v, lmax, mmax, backend=b), [x, e, vec])
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5
    y = torch.randn(20, len(so3.l_to_m_major(lmax, mmax)), 4)
    tri, ref = run_both(lambda b, y, v: rotate_back(y, v, lmax, mmax, backend=b), [y, vec])
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5


@GPU_SIZES
@pytest.mark.parametrize("lmax,mmax,C", [(2, 2, 16), (4, 3, 8), (4, 1, 20)])
def test_rotate_back_matches_twin(lmax, mmax, C, sizes):
    _, _, vec = graph(4, 37, seed=1)
    y = torch.randn(37, len(so3.l_to_m_major(lmax, mmax)), C)
    with blocks(sizes, lmax):
        tri, ref = run_both(lambda b, y, v: rotate_back(y, v, lmax, mmax, backend=b), [y, vec])
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5


@GPU_SIZES
@pytest.mark.parametrize("lmax,mmax,cin,cout,extra", [(2, 2, 8, 16, 5), (3, 1, 48, 130, 0), (4, 4, 16, 8, 33)])
def test_so2_linear_matches_twin_and_module(lmax, mmax, cin, cout, extra, sizes):
    torch.manual_seed(lmax)
    lin = SO2Linear(lmax, mmax, cin, cout, extra_scalars=extra, backend="torch")
    E = 71
    x = torch.randn(E, len(so3.l_to_m_major(lmax, mmax)), cin)
    scale = torch.rand(E, 1, cin)
    params = [lin.m0.weight, lin.m0.bias, *lin.w]

    def fn(b, x, scale, w0, b0, *ws):
        return so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout, backend=b)

    with blocks(sizes, lmax):
        tri, ref = run_both(fn, [x, scale, *params])
    y_mod, extra_mod = lin(x, scale)
    assert rel(ref[0], y_mod) < 1e-6 and ref[1].shape == extra_mod.shape == (E, extra)
    for a, r in zip(tri, ref):
        if r.numel():
            assert rel(a, r) < 1e-5


@pytest.mark.parametrize("kind", ["ml", "row"])
def test_so2_linear_scale_layouts_and_extra_first_match_twin(kind):
    """fairchem's layouts: a per-(m, l) (or per-row) radial scale and the extra outputs first."""
    lmax, mmax, cin, cout, extra, E = 3, 2, 8, 6, 5, 40
    torch.manual_seed(2)
    lin = SO2Linear(lmax, mmax, cin, cout, extra_scalars=extra, backend="torch", extra_first=True)
    KM = len(so3.l_to_m_major(lmax, mmax))
    x, scale = torch.randn(E, KM, cin), torch.rand(E, twin.num_ml(lmax, mmax) if kind == "ml" else KM, cin)

    def fn(b, x, scale, w0, b0, *ws):
        return so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout, backend=b, extra_first=True)

    tri, ref = run_both(fn, [x, scale, lin.m0.weight, lin.m0.bias, *lin.w])
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5
    y, ex = lin(x, scale)
    assert rel(ref[0], y) < 1e-6 and rel(ref[1], ex) < 1e-6


def test_rescaled_rotate_back_matches_twin():
    """EquiformerV2's rotate-back rescale, alone and fused into the aggregation."""
    lmax, mmax, N, E = 3, 1, 5, 30
    _, dst, vec = graph(N, E, seed=2)
    y = torch.randn(E, len(so3.l_to_m_major(lmax, mmax)), 4)
    for fn, ins in ((lambda b, y, v: rotate_back(y, v, lmax, mmax, backend=b, rescale=True), [y, vec]),
                    (lambda b, y, lg, v: attention_aggregate(y, lg, dst, N, v, lmax, mmax, backend=b, rescale=True),
                     [y, torch.randn(E, 2), vec])):
        tri, ref = run_both(fn, ins)
        for a, r in zip(tri, ref):
            assert rel(a, r) < 1e-5
    plain = rotate_back(y, vec, lmax, mmax, backend="triton")
    scaled = rotate_back(y, vec, lmax, mmax, backend="triton", rescale=True)
    f = torch.tensor([1.0] * 4 + [(5 / 3) ** 0.5] * 5 + [(7 / 3) ** 0.5] * 7)
    assert rel(scaled, plain * f[None, :, None]) < 1e-6


@GPU_SIZES
@pytest.mark.parametrize("rotated,K,C,heads", [(True, None, 16, 2), (False, 9, 130, 2), (True, None, 8, 1),
                                               (False, 5, 6, 3)])
def test_attention_aggregate_matches_twin(rotated, K, C, heads, sizes):
    """K = 5 rows is not (l+1)²: the kernel must write every row (a bug of the first version)."""
    lmax, mmax, N, E = 2, 1, 6, 50
    src, dst, vec = graph(N, E, seed=C)
    rows = len(so3.l_to_m_major(lmax, mmax)) if rotated else K
    values, logits = torch.randn(E, rows, C), 3 * torch.randn(E, heads)

    def fn(b, values, logits, *v):
        return attention_aggregate(values, logits, dst, N, v[0] if rotated else None, lmax, mmax, backend=b)

    with blocks(sizes, lmax):
        tri, ref = run_both(fn, [values, logits, vec] if rotated else [values, logits])
    assert tri[0][1].abs().max() == 0  # node without incoming edges
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5


def test_roll_turns_the_frame_about_the_edge_axis():
    """A roll ρ equals the twin's frame Ry(ρ)·R, and an SO(2)-equivariant composite cannot see it."""
    lmax, mmax = 3, 2
    src, dst, vec = graph(5, 30, seed=4)
    roll = torch.rand(30) * 6.0
    x = torch.randn(5, 16, 4)
    tri, ref = run_both(lambda b, x, v, r: rotate_to_edge(x, None, src, dst, v, lmax, mmax, backend=b, roll=r),
                        [x, vec, roll])
    for a, r in zip(tri, ref):  # output, d/dx, d/d(edge_vec), d/d(roll)
        assert rel(a, r) < 1e-5
    y = torch.randn(30, len(so3.l_to_m_major(lmax, mmax)), 4)
    for fn, ins in ((lambda b, y, v, r: rotate_back(y, v, lmax, mmax, backend=b, roll=r), [y, vec, roll]),
                    (lambda b, y, lg, v, r: attention_aggregate(y, lg, dst, 5, v, lmax, mmax, backend=b, roll=r),
                     [y, torch.randn(30, 2), vec, roll])):
        tri, ref = run_both(fn, ins)
        for a, r in zip(tri, ref):
            assert rel(a, r) < 1e-5
    y = rotate_to_edge(x, None, src, dst, vec, lmax, mmax, backend="triton", roll=roll)
    assert rel(y, rotate_to_edge(x, None, src, dst, vec, lmax, mmax, backend="triton")) > 1e-2
    back = rotate_back(y, vec, lmax, mmax, backend="triton", roll=roll)
    assert rel(back, rotate_back(rotate_to_edge(x, None, src, dst, vec, lmax, mmax), vec, lmax, mmax)) < 1e-5
    logits = torch.randn(30, 2)
    agg = attention_aggregate(y, logits, dst, 5, vec, lmax, mmax, backend="triton", roll=roll)
    assert rel(agg, twin.attention_aggregate(y, logits, dst, 5, vec, lmax, mmax, roll)) < 1e-5


# ----------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_twin(dtype):
    """Each op on the same half-precision inputs: error against the float64 twin (on those inputs)
    at most 2x the twin's own error in that dtype."""
    lmax, mmax, N, E, C = 2, 2, 6, 40, 16
    src, dst, vec = graph(N, E, seed=9)
    lin = SO2Linear(lmax, mmax, 3 * C, 16, extra_scalars=4)
    KM = len(so3.l_to_m_major(lmax, mmax))
    ops_ = {
        "rotate_to_edge": (lambda b, x, e: rotate_to_edge(x, e, src, dst, vec, lmax, mmax, backend=b),
                           [torch.randn(N, 9, C), torch.randn(E, 9, C)]),
        "so2_linear": (lambda b, h, s, w0, b0, *ws: so2_linear(h, s, w0, b0, list(ws), lmax, mmax, 16, backend=b)[0],
                       [torch.randn(E, KM, 3 * C), torch.rand(E, 1, 3 * C), lin.m0.weight.detach(),
                        lin.m0.bias.detach(), *[w.detach() for w in lin.w]]),
        "attention_aggregate": (lambda b, y, lg: attention_aggregate(y, lg, dst, N, vec, lmax, mmax, backend=b),
                                [torch.randn(E, KM, C), torch.randn(E, 2)]),
        "rotate_back": (lambda b, y: rotate_back(y, vec, lmax, mmax, backend=b), [torch.randn(E, KM, C)]),
    }
    with torch.no_grad():
        for name, (fn, ins) in ops_.items():
            half = [t.to(dtype) for t in ins]
            exact = fn("torch", *[t.double() for t in half]).double()
            tri, tw = fn("triton", *half), fn("torch", *half)
            assert tri.dtype == dtype, name
            err, err_twin = (tri.double() - exact).abs().max(), (tw.double() - exact).abs().max()
            assert err <= 2 * err_twin + 1e-6 * exact.abs().max(), (name, float(err), float(err_twin))


# ----------------------------------------------------------------------------- twins: gradcheck
def test_twins_gradcheck(f64):
    lmax, mmax, N, E = 2, 1, 3, 6
    src, dst, vec = graph(N, E, seed=2)
    vec = vec.double().requires_grad_()
    x, e = torch.randn(N, 9, 1, requires_grad=True), torch.randn(E, 9, 1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, e, v: twin.rotate_to_edge(x, e, src, dst, v, lmax, mmax), (x, e, vec))
    y = torch.randn(E, len(so3.l_to_m_major(lmax, mmax)), 2, requires_grad=True)  # 2 channels, 2 heads
    assert torch.autograd.gradcheck(lambda y, v: twin.rotate_back(y, v, lmax, mmax), (y, vec))
    lin = SO2Linear(lmax, mmax, 2, 3, extra_scalars=2).double()
    s = torch.rand(E, 1, 2, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, s, w0, b0, w1: twin.so2_linear(y, s, w0, b0, [w1], lmax, mmax, 3), (y, s, lin.m0.weight, lin.m0.bias,
                                                                                     lin.w[0]))
    logits = torch.randn(E, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, lg: twin.attention_aggregate(y, lg, dst, N, vec, lmax, mmax), (y, logits),
                                   fast_mode=True)  # the slow mode spends ~20 s in scatter_reduce


def test_frame_grad_is_the_edge_vector_gradient(f64):
    """The generator route (what the Triton backward uses) equals autograd through so3.wigner_D."""
    lmax, E = 3, 9
    _, _, vec = graph(4, E, seed=5)
    vec = vec.double()
    x, g = torch.randn(E, 16, 3), torch.randn(E, 16, 3)
    v = vec.clone().requires_grad_()
    (ref,) = torch.autograd.grad((so3.rotate(x, so3.wigner_D(v, lmax)) * g).sum(), v)
    D = so3.wigner_D(vec, lmax)
    H = twin.generator_dot(so3.rotate_back(g, D), x, lmax)
    assert rel(twin.frame_grad(vec, H)[0], ref) < 1e-10


# ----------------------------------------------------------------------------- the fused layer
def _layer_inputs(lmax, C, N, E, seed):
    src, dst, vec = graph(N, E, seed)
    g = torch.Generator().manual_seed(seed)
    K = (lmax + 1) ** 2
    return (torch.randn(N, K, C, generator=g), torch.randn(E, K, C, generator=g), src, dst, vec,
            torch.rand(E, 8, generator=g), torch.rand(E, generator=g))


def _run(layer, x, e, src, dst, vec, rbf, env, lmax):
    rot = EdgeRotation(lmax, layer.node_msg.conv.lin1.mmax, backend=getattr(layer, "backend", "auto"))
    return layer(x, e, src, dst, rot, rot.wigner(vec), rbf, env)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_layer_equals_reference_and_is_equivariant(backend):
    lmax, C, N, E = 1, 8, 6, 45
    torch.manual_seed(0)
    ref = InteractionLayer(lmax, lmax, C, 8, 2, 8, alpha_channels=8)
    fused = FusedInteractionLayer(lmax, lmax, C, 8, 2, 8, alpha_channels=8, backend=backend)
    fused.load_state_dict(ref.state_dict())
    x, e, src, dst, vec, rbf, env = _layer_inputs(lmax, C, N, E, 1)
    outs = []
    for layer in (ref, fused):
        xi, ei, vi = x.clone().requires_grad_(), e.clone().requires_grad_(), vec.clone().requires_grad_()
        xo, eo = _run(layer, xi, ei, src, dst, vi, rbf, env, lmax)
        grads = torch.autograd.grad((xo * probe(xo)).sum() + (eo * probe(eo)).sum(),
                                    [xi, ei, vi, *layer.parameters()])
        outs.append([xo, eo, *grads])
    for a, r in zip(*outs):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5)
    R = random_rotation(4, torch.float32)
    DR = so3.wigner_D_from_matrix(R, lmax)
    with torch.no_grad():
        xr, er = _run(fused, rotate_blocks(x, DR), rotate_blocks(e, DR), src, dst, vec @ R.T, rbf, env, lmax)
        assert rel(xr, rotate_blocks(outs[1][0], DR)) < 1e-5 and rel(er, rotate_blocks(outs[1][1], DR)) < 1e-5


def _force_setup(backend, dtype):
    """An invariant energy of atom positions through the memory-lean layer (all pairs of 5 atoms)."""
    lmax, C, N = 2, 4, 5
    torch.manual_seed(3)
    layer = FusedInteractionLayer(lmax, lmax, C, 8, 2, 8, alpha_channels=8, backend=backend).to(dtype)
    g = torch.Generator().manual_seed(0)
    pos = (torch.randn(N, 3, generator=g) * 1.5).to(dtype)
    src, dst = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    keep = src != dst
    src, dst = src[keep], dst[keep]
    order = dst.argsort(stable=True)
    src, dst = src[order], dst[order]
    x0 = torch.randn(N, (lmax + 1) ** 2, C, generator=g).to(dtype)
    e0 = torch.randn(len(src), 1, C, generator=g).to(dtype)

    def energy(p):
        vec = p[src] - p[dst]
        d = vec.norm(dim=-1)
        rbf = torch.exp(-(d[:, None] - torch.linspace(0.5, 4, 8, dtype=dtype)) ** 2)
        env = torch.exp(-d)
        e = torch.cat([e0 * env[:, None, None], e0.new_zeros(len(src), (lmax + 1) ** 2 - 1, C)], 1)
        x, _ = _run(layer, x0, e, src, dst, vec, rbf, env, lmax)
        return x[:, 0].square().sum()

    return energy, pos


def _forces(energy, pos):
    p = pos.clone().requires_grad_()
    return torch.autograd.grad(-energy(p), p)[0]


def test_fused_layer_forces_equal_finite_differences():
    """F = −dE/dx by autograd through the recompute region equals central differences (float64)."""
    energy, pos = _force_setup("torch", torch.float64)
    force = _forces(energy, pos)
    h = 1e-6
    fd = torch.zeros_like(pos)
    for i in range(pos.shape[0]):
        for k in range(3):
            dp = torch.zeros_like(pos)
            dp[i, k] = h
            fd[i, k] = -(energy(pos + dp) - energy(pos - dp)) / (2 * h)
    assert rel(force, fd) < 1e-6


def test_fused_layer_forces_through_the_triton_ops():
    """The same forces through the Triton kernels' edge-vector gradients (float32)."""
    ref = _forces(*_force_setup("torch", torch.float32))
    tri = _forces(*_force_setup("triton", torch.float32))
    assert rel(tri, ref) < 1e-4


def test_fused_layer_saved_activations_under_8kB_per_edge():
    """lmax = mmax = 4, E = 16 channels (the paper's setting), float32, one layer."""
    lmax, C, N, E = 4, 16, 20, 400
    torch.manual_seed(0)
    ref = InteractionLayer(lmax, lmax, C, 32, 2, 8)
    fused = FusedInteractionLayer(lmax, lmax, C, 32, 2, 8, backend="torch")
    x, e, src, dst, vec, rbf, env = _layer_inputs(lmax, C, N, E, 2)
    x.requires_grad_(), e.requires_grad_()
    per_edge = {}
    for name, layer in (("ref", ref), ("fused", fused)):
        nbytes, out = saved_activation_bytes(_run, layer, x, e, src, dst, vec, rbf, env, lmax,
                                             exclude=list(layer.parameters()))
        per_edge[name] = nbytes / E
        assert torch.isfinite(out[0]).all()
    assert per_edge["fused"] <= 8192, per_edge
    assert per_edge["fused"] < per_edge["ref"] / 4, per_edge


# ----------------------------------------------------------------------------- backends, fallbacks, bad input
def test_backend_selection(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert B.resolve("auto", cpu) == "torch"
    assert B.resolve("triton", cpu) == "triton"  # the interpreter is on in this module
    assert B.resolve("auto", cuda, 4, torch.bfloat16) == "triton"
    errors._said.clear()
    with caplog.at_level(logging.WARNING, logger="egnn"):  # outside the compile lane: twin, logged once
        assert B.resolve("auto", cuda, 4, torch.float64) == "torch"
        assert B.resolve("auto", cuda, 4, torch.float64) == "torch"
        assert B.resolve("auto", cuda, 7, torch.float32) == "torch"
    assert len([r for r in caplog.records if "PyTorch twins" in r.message]) == 2
    with pytest.raises(KernelError, match="float64"):
        B.resolve("triton", cuda, 4, torch.float64)
    with pytest.raises(KernelError, match="lmax=7"):
        B.resolve("triton", cpu, 7)
    monkeypatch.setenv("EGNN_BACKEND", "torch")
    assert B.resolve("triton", cpu) == "torch"
    monkeypatch.setenv("EGNN_BACKEND", "cuda")
    with pytest.raises(EgnnError, match="EGNN_BACKEND"):
        B.resolve("auto", cpu)
    monkeypatch.delenv("EGNN_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="on cpu"):
        B.resolve("triton", cpu)
    with pytest.raises(EgnnError, match="backend"):
        SO2Linear(2, 2, 4, 4, backend="cuda")


def test_compile_failure_falls_back_or_raises(monkeypatch, caplog):
    from triton.compiler.errors import CompilationError

    def broken(*args, **kwargs):
        raise CompilationError("x.py", None, "injected")

    monkeypatch.setattr(ops, "_run", broken)
    _, _, vec = graph(4, 10)
    y = torch.randn(10, 9, 3)
    errors._said.clear()
    with caplog.at_level(logging.WARNING, logger="egnn"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        out = rotate_back(y, vec, 2, 2, backend="auto")  # auto on CPU is the twin anyway: no kernel launched
        assert rel(out, twin.rotate_back(y, vec, 2, 2)) == 0
        monkeypatch.setattr(B, "forced", lambda b: False)  # behave like "auto" on a GPU
        out = rotate_back(y, vec, 2, 2, backend="triton")
    assert rel(out, twin.rotate_back(y, vec, 2, 2)) == 0
    assert any("failed to compile" in r.message for r in caplog.records)
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_run", broken)
    with pytest.raises(KernelError, match="failed to compile"):
        rotate_back(y, vec, 2, 2, backend="triton")


def test_shapes_are_checked_before_launch():
    src, dst, vec = graph(4, 10)
    with pytest.raises(EgnnError, match=r"\[N, \(lmax\+1\)²=9, C\]"):
        rotate_to_edge(torch.randn(4, 8, 2), None, src, dst, vec, 2, 2, backend="triton")
    with pytest.raises(EgnnError, match="edge_vec must be"):
        rotate_back(torch.randn(10, 9, 2), vec[:9], 2, 2, backend="triton")
    with pytest.raises(EgnnError, match="K_m=7"):
        rotate_back(torch.randn(10, 9, 2), vec, 2, 1, backend="triton")
    with pytest.raises(EgnnError, match="ws must hold"):
        so2_linear(torch.randn(10, 9, 4), None, torch.randn(3 * 5, 12), None, [torch.randn(8, 20)], 2, 2, 5,
                   backend="triton")
    with pytest.raises(EgnnError, match="divisible"):
        attention_aggregate(torch.randn(10, 4, 3), torch.randn(10, 2), dst, 4, backend="triton")


def test_no_host_sync_helpers():
    """Segment pointers by searchsorted equal the bincount/cumsum ones; packed weights are cached
    and rebuilt after an in-place update (an optimizer step)."""
    _, dst, _ = graph(9, 60)
    ptr = torch.zeros(10, dtype=torch.long)
    ptr[1:] = torch.bincount(dst, minlength=9).cumsum(0)
    assert torch.equal(ops._segment_ptr(dst, 9).long(), ptr)
    lin = SO2Linear(2, 2, 4, 4)
    a = ops._PACKS.get(lin.m0.weight, list(lin.w), torch.float32, False)
    assert ops._PACKS.get(lin.m0.weight, list(lin.w), torch.float32, False) is a
    with torch.no_grad():
        lin.w[1].mul_(2.0)
    b = ops._PACKS.get(lin.m0.weight, list(lin.w), torch.float32, False)
    assert b is not a and not torch.equal(a, b)


def test_dst_order_checked_once_per_graph(monkeypatch):
    """The Triton aggregation walks CSR segments: an unsorted dst is an InputError, checked once per
    dst tensor (one host sync per graph, not per layer), again after an in-place change."""
    _, dst, vec = graph(6, 70)
    values, logits = torch.randn(70, 9, 4), torch.randn(70, 2)
    calls = []
    real = ops._check_sorted
    monkeypatch.setattr(ops, "_check_sorted", lambda d: calls.append(1) or real(d))
    for _ in range(3):
        attention_aggregate(values, logits, dst, 6, backend="triton")
    assert len(calls) == 1
    shuffled = dst.flip(0).contiguous()
    with pytest.raises(EgnnError, match="dst must be sorted"):
        attention_aggregate(values, logits, shuffled, 6, backend="triton")
    torch.testing.assert_close(attention_aggregate(values, logits, shuffled, 6, backend="torch"),
                               attention_aggregate(values, logits, dst.flip(0), 6, backend="torch"))
    dst[:2] = dst[-1]  # in place: a new version, checked again
    with pytest.raises(EgnnError, match="dst must be sorted"):
        attention_aggregate(values, logits, dst, 6, backend="triton")


def test_float64_geometry_and_int32_indices_take_the_compiled_variants():
    """A float64 edge_vec and int32 indices run the float32 / int64 kernels the compile lane covers,
    and the force still reaches the float64 vectors."""
    src, dst, vec = graph(5, 25, seed=3)
    x = torch.randn(5, 9, 3)
    v64 = vec.double().requires_grad_()
    out = rotate_to_edge(x, None, src.int(), dst.int(), v64, 2, 2, backend="triton")
    (g,) = torch.autograd.grad((out * probe(out)).sum(), v64)
    v = vec.clone().requires_grad_()
    ref = twin.rotate_to_edge(x, None, src, dst, v, 2, 2)
    (gr,) = torch.autograd.grad((ref * probe(ref)).sum(), v)
    assert g.dtype == torch.float64 and rel(out, ref) < 1e-5 and rel(g, gr) < 1e-5


def test_generated_rotation_maths_is_current():
    from egnn.kernels import _codegen

    with open(_codegen.OUT) as f:
        assert f.read() == _codegen.generate(), "kernels/_wigner.py is stale: run python -m egnn.kernels._codegen"


def test_generated_rotation_maths_does_not_depend_on_the_last_bits(monkeypatch):
    """The J entries come out of torch with last bits that differ between CPUs; the generated source
    must not (it did at 15 digits: the staleness check above failed on another machine)."""
    from egnn.kernels import _codegen

    base, exact, rng = _codegen.generate(), _codegen.j_matrices, np.random.default_rng(0)
    for _ in range(3):
        monkeypatch.setattr(_codegen, "j_matrices", lambda lmax=_codegen.MAX_L: [
            J * (1 + rng.integers(-4, 5, J.shape) * np.finfo(float).eps) for J in exact(lmax)])
        assert _codegen.generate() == base


# ----------------------------------------------------------------------------- GPU: every op against the twin
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cuda:0"] + (["cuda:1"] if torch.cuda.is_available() and torch.cuda.device_count() > 1 else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("lmax,mmax", [(4, 4), (4, 2), (6, 3)])
def test_gpu_ops_forward_backward_match_twin(device, dtype, lmax, mmax):
    os.environ["TRITON_INTERPRET"] = "0"
    N, E, C = 700, 20_011, 16
    src, dst, vec = graph(N, E, device=device)
    K, KM = (lmax + 1) ** 2, len(so3.l_to_m_major(lmax, mmax))
    x, e = torch.randn(N, K, C, device=device, dtype=dtype), torch.randn(E, K, C, device=device, dtype=dtype)
    lin = SO2Linear(lmax, mmax, 3 * C, 32, extra_scalars=8).to(device, dtype)
    cases = [
        (lambda b, x, e, v: rotate_to_edge(x, e, src, dst, v, lmax, mmax, backend=b), [x, e, vec]),
        (lambda b, e, v: rotate_to_edge(None, e, src, dst, v, lmax, mmax, backend=b), [e, vec]),  # edge part only
        (lambda b, x, v: rotate_to_edge(x, None, src, dst, v, lmax, mmax, backend=b), [x, vec]),  # node parts only
        (lambda b, y, v: rotate_back(y, v, lmax, mmax, backend=b), [torch.randn(E, KM, C, device=device, dtype=dtype), vec]),
        (lambda b, h, s, w0, b0, *ws: so2_linear(h, s, w0, b0, list(ws), lmax, mmax, 32, backend=b),
         [torch.randn(E, KM, 3 * C, device=device, dtype=dtype), torch.rand(E, 1, 3 * C, device=device, dtype=dtype),
          lin.m0.weight.detach(), lin.m0.bias.detach(), *[w.detach() for w in lin.w]]),
        (lambda b, y, lg, v: attention_aggregate(y, lg, dst, N, v, lmax, mmax, backend=b),
         [torch.randn(E, KM, C, device=device, dtype=dtype), torch.randn(E, 2, device=device, dtype=dtype), vec]),
    ]
    for fn, ins in cases:
        tri, ref = run_both(fn, ins)
        for a, r in zip(tri, ref):
            assert a.device == torch.device(device)
            assert rel(a, r) < TOL[dtype]


@pytest.mark.gpu
@gpu
def test_gpu_edge_only_rotation_at_two_million_edges():
    """rotate_to_edge of edge embeddings alone (the edge update's call) passes a one-entry placeholder
    index; the kernel once read E entries of it, which stayed inside the allocator's block below
    ~1e5 edges and faulted (illegal address) at 1e6 on the first GPU. The interpreter cannot see it."""
    os.environ["TRITON_INTERPRET"] = "0"
    lmax, E, C = 4, 2_000_000, 16
    torch.manual_seed(0)
    e = torch.randn(E, (lmax + 1) ** 2, C, device="cuda")
    vec = torch.randn(E, 3, device="cuda")
    out = rotate_to_edge(None, e, None, None, vec, lmax, lmax)
    torch.cuda.synchronize()
    rows = torch.randint(0, E, (4096,), device="cuda")
    ref = rotate_to_edge(None, e[rows], None, None, vec[rows], lmax, lmax, backend="torch")
    assert rel(out[rows], ref) < 1e-5


@pytest.mark.gpu
@gpu
def test_gpu_fused_layer_matches_reference():
    os.environ["TRITON_INTERPRET"] = "0"
    lmax, C, N, E = 4, 16, 500, 30_000
    torch.manual_seed(0)
    ref = InteractionLayer(lmax, lmax, C, 32, 2, 8).cuda()
    fused = FusedInteractionLayer(lmax, lmax, C, 32, 2, 8).cuda()
    fused.load_state_dict(ref.state_dict())
    ins = [t.cuda() for t in _layer_inputs(lmax, C, N, E, 3)]
    outs = []
    for layer in (ref, fused):
        xi, ei, vi = ins[0].clone().requires_grad_(), ins[1].clone().requires_grad_(), ins[4].clone().requires_grad_()
        xo, eo = _run(layer, xi, ei, ins[2], ins[3], vi, ins[5], ins[6], lmax)
        outs.append([xo, eo, *torch.autograd.grad((xo * probe(xo)).sum() + (eo * probe(eo)).sum(), [xi, ei, vi])])
    for a, r in zip(*outs):
        assert rel(a, r) < 1e-4
