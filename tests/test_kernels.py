"""Triton kernels against their PyTorch twins (TRITON_INTERPRET=1 on CPU, tiny shapes), the twins'
gradients, the fused layer (equal to the reference layer, equivariant, memory-lean), backends."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import logging

import pytest
import torch
from conftest import random_rotation, rotate_blocks

from egnn import EgnnError, errors, so3
from egnn.kernels import _torch_impl as twin
from egnn.kernels import attention_aggregate, rotate_back, rotate_to_edge, so2_linear
from egnn.nn import EdgeRotation, InteractionLayer, SO2Linear
from egnn.nn import backend as B
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
    return src.to(device), dst.to(device), vec.to(device)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def probe(y):
    """A fixed non-trivial cotangent for backward checks."""
    return torch.sin(torch.arange(y.numel(), dtype=torch.float64) * 0.37).view(y.shape).to(y.dtype)


def run_both(fn, inputs):
    """Outputs and input gradients of fn under the triton and torch backends."""
    res = {}
    for b in ("triton", "torch"):
        ins = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(b, *ins)
        out = out if isinstance(out, tuple) else (out,)
        loss = sum((o * probe(o)).sum() for o in out if o.numel())
        grads = torch.autograd.grad(loss, [t for t in ins if t.requires_grad])
        res[b] = list(out) + list(grads)
    return res["triton"], res["torch"]


# ----------------------------------------------------------------------------- ops vs twins, fp32
@pytest.mark.parametrize("lmax,mmax,C", [(1, 1, 130), (2, 1, 8), (3, 2, 16), (2, 2, 48)])
def test_rotate_to_edge_matches_twin(lmax, mmax, C):
    src, dst, vec = graph(7, 45, seed=lmax)
    x, e = torch.randn(7, (lmax + 1) ** 2, C), torch.randn(45, (lmax + 1) ** 2, 5)
    tri, ref = run_both(lambda b, x, e: rotate_to_edge(x, e, src, dst, vec, lmax, mmax, backend=b), [x, e])
    assert tri[0].shape == (45, len(so3.l_to_m_major(lmax, mmax)), 2 * C + 5)
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5


def test_rotate_to_edge_lmax6_forward():
    src, dst, vec = graph(5, 20, seed=6)
    x, e = torch.randn(5, 49, 3), torch.randn(20, 49, 2)
    y = rotate_to_edge(x, e, src, dst, vec, 6, 5, backend="triton")
    assert rel(y, twin.rotate_to_edge(x, e, src, dst, vec, 6, 5)) < 1e-5


@pytest.mark.parametrize("lmax,mmax,C", [(2, 2, 16), (4, 3, 8)])
def test_rotate_back_matches_twin(lmax, mmax, C):
    _, _, vec = graph(4, 37, seed=1)
    y = torch.randn(37, len(so3.l_to_m_major(lmax, mmax)), C)
    tri, ref = run_both(lambda b, y: rotate_back(y, vec, lmax, mmax, backend=b), [y])
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5


@pytest.mark.parametrize("lmax,mmax,cin,cout,extra", [(2, 2, 8, 16, 5), (3, 1, 48, 130, 0), (4, 4, 16, 8, 33)])
def test_so2_linear_matches_twin_and_module(lmax, mmax, cin, cout, extra):
    torch.manual_seed(lmax)
    lin = SO2Linear(lmax, mmax, cin, cout, extra_scalars=extra)
    E = 37
    x = torch.randn(E, len(so3.l_to_m_major(lmax, mmax)), cin)
    scale = torch.rand(E, 1, cin)
    params = [lin.m0.weight, lin.m0.bias, *lin.w]

    def fn(b, x, scale, w0, b0, *ws):
        return so2_linear(x, scale, w0, b0, list(ws), lmax, mmax, cout, backend=b)

    tri, ref = run_both(fn, [x, scale, *params])
    y_mod, extra_mod = lin(x, scale)
    assert rel(ref[0], y_mod) < 1e-6 and ref[1].shape == extra_mod.shape == (E, extra)
    for a, r in zip(tri, ref):
        if r.numel():
            assert rel(a, r) < 1e-5


@pytest.mark.parametrize("rotated,C,heads", [(True, 16, 2), (False, 130, 2), (True, 8, 1)])
def test_attention_aggregate_matches_twin(rotated, C, heads):
    lmax, mmax, N, E = 2, 1, 6, 50
    src, dst, vec = graph(N, E, seed=C)
    rows = len(so3.l_to_m_major(lmax, mmax)) if rotated else (lmax + 1) ** 2
    values, logits = torch.randn(E, rows, C), 3 * torch.randn(E, heads)

    def fn(b, values, logits):
        return attention_aggregate(values, logits, dst, N, vec if rotated else None, lmax, mmax, backend=b)

    tri, ref = run_both(fn, [values, logits])
    assert tri[0][1].abs().max() == 0  # node without incoming edges
    for a, r in zip(tri, ref):
        assert rel(a, r) < 1e-5


def test_reference_layers_route_through_kernels():
    """EdgeRotation / SO2Linear / AttentionAggregation with backend='triton' equal the torch path."""
    lmax, mmax = 2, 1
    src, dst, vec = graph(5, 30, seed=3)
    x = torch.randn(30, 9, 6)
    out = {}
    for b in ("triton", "torch"):
        rot = EdgeRotation(lmax, mmax, backend=b)
        D = rot.wigner(vec)
        y = rot.to_edge(x, D)
        out[b] = (y, rot.from_edge(y, D))
    for a, r in zip(out["triton"], out["torch"]):
        assert rel(a, r) < 1e-5


# ----------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_twin(dtype):
    """Each op on the same half-precision inputs: error against the float64 twin (on those inputs)
    at most 2x the twin's own error in that dtype."""
    lmax, mmax, N, E, C = 2, 2, 6, 40, 16
    src, dst, vec = graph(N, E, seed=9)
    lin = SO2Linear(lmax, mmax, 3 * C, 16, extra_scalars=4)
    KM = len(so3.l_to_m_major(lmax, mmax))
    ops = {
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
        for name, (fn, ins) in ops.items():
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
    vec = vec.double()
    x, e = torch.randn(N, 9, 1, requires_grad=True), torch.randn(E, 9, 1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, e: twin.rotate_to_edge(x, e, src, dst, vec, lmax, mmax), (x, e))
    y = torch.randn(E, len(so3.l_to_m_major(lmax, mmax)), 2, requires_grad=True)  # 2 channels, 2 heads
    assert torch.autograd.gradcheck(lambda y: twin.rotate_back(y, vec, lmax, mmax), (y,))
    lin = SO2Linear(lmax, mmax, 2, 3, extra_scalars=2).double()
    s = torch.rand(E, 1, 2, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, s, w0, b0, w1: twin.so2_linear(y, s, w0, b0, [w1], lmax, mmax, 3), (y, s, lin.m0.weight, lin.m0.bias,
                                                                                     lin.w[0]))
    logits = torch.randn(E, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, lg: twin.attention_aggregate(y, lg, dst, N, vec, lmax, mmax), (y, logits),
                                   fast_mode=True)  # the slow mode spends ~20 s in scatter_reduce


# ----------------------------------------------------------------------------- the fused layer
def _layer_inputs(lmax, C, N, E, seed):
    src, dst, vec = graph(N, E, seed)
    g = torch.Generator().manual_seed(seed)
    K = (lmax + 1) ** 2
    return (torch.randn(N, K, C, generator=g), torch.randn(E, K, C, generator=g), src, dst, vec,
            torch.rand(E, 8, generator=g), torch.rand(E, generator=g))


def _run(layer, x, e, src, dst, vec, rbf, env, lmax):
    rot = EdgeRotation(lmax, layer.node_msg.conv.lin1.mmax)
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
        xi, ei = x.clone().requires_grad_(), e.clone().requires_grad_()
        xo, eo = _run(layer, xi, ei, src, dst, vec, rbf, env, lmax)
        grads = torch.autograd.grad((xo * probe(xo)).sum() + (eo * probe(eo)).sum(), [xi, ei, *layer.parameters()])
        outs.append([xo, eo, *grads])
    for a, r in zip(*outs):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5)
    R = random_rotation(4, torch.float32)
    DR = so3.wigner_D_from_matrix(R, lmax)
    with torch.no_grad():
        xr, er = _run(fused, rotate_blocks(x, DR), rotate_blocks(e, DR), src, dst, vec @ R.T, rbf, env, lmax)
        assert rel(xr, rotate_blocks(outs[1][0], DR)) < 1e-5 and rel(er, rotate_blocks(outs[1][1], DR)) < 1e-5


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


# ----------------------------------------------------------------------------- backends and bad input
def test_backend_selection(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert B.resolve("auto", cpu) == "torch"
    assert B.resolve("triton", cpu) == "triton"  # the interpreter is on in this module
    monkeypatch.setenv("EGNN_BACKEND", "torch")
    assert B.resolve("triton", cpu) == "torch"
    monkeypatch.setenv("EGNN_BACKEND", "cuda")
    with pytest.raises(EgnnError, match="EGNN_BACKEND"):
        B.resolve("auto", cpu)
    monkeypatch.delenv("EGNN_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    errors._said.clear()
    with caplog.at_level(logging.WARNING, logger="egnn"):
        assert B.resolve("triton", cpu) == "torch"
        assert B.resolve("triton", cpu) == "torch"
    assert len([r for r in caplog.records if "PyTorch twins" in r.message]) == 1  # logged once
    with pytest.raises(EgnnError, match="backend"):
        SO2Linear(2, 2, 4, 4, backend="cuda")


def test_triton_path_needs_sorted_dst():
    _, _, vec = graph(4, 10)
    dst = torch.tensor([0, 2, 1, 3, 3, 0, 1, 2, 2, 2])
    with pytest.raises(EgnnError, match="sorted"):
        attention_aggregate(torch.randn(10, 4, 2), torch.randn(10, 1), dst, 4, backend="triton")


# ----------------------------------------------------------------------------- GPU, realistic sizes
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_pipeline_matches_twins(dtype):
    lmax, mmax, N, E, C = 4, 4, 3000, 200_000, 16
    src, dst, vec = graph(N, E, device="cuda")
    x, e = torch.randn(N, 25, C, device="cuda", dtype=dtype), torch.randn(E, 25, C, device="cuda", dtype=dtype)
    lin = SO2Linear(lmax, mmax, 3 * C, 32, extra_scalars=8).cuda().to(dtype)
    logits = torch.randn(E, 2, device="cuda", dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for b in ("triton",):
        h = rotate_to_edge(x, e, src, dst, vec, lmax, mmax, backend=b)
        assert rel(h, twin.rotate_to_edge(x, e, src, dst, vec, lmax, mmax)) < tol
        y, ex = lin(h)
        lin.backend = "torch"
        y2, ex2 = lin(h)
        lin.backend = "auto"
        assert rel(y, y2) < tol * 10 and rel(ex, ex2) < tol * 10
        a = attention_aggregate(y, logits, dst, N, vec, lmax, mmax, backend=b)
        assert rel(a, twin.attention_aggregate(y, logits, dst, N, vec, lmax, mmax)) < tol


@pytest.mark.gpu
@gpu
def test_gpu_fused_layer_matches_reference():
    lmax, C, N, E = 4, 16, 500, 30_000
    torch.manual_seed(0)
    ref = InteractionLayer(lmax, lmax, C, 32, 2, 8).cuda()
    fused = FusedInteractionLayer(lmax, lmax, C, 32, 2, 8).cuda()
    fused.load_state_dict(ref.state_dict())
    ins = [t.cuda() for t in _layer_inputs(lmax, C, N, E, 3)]
    outs = []
    for layer in (ref, fused):
        xi, ei = ins[0].clone().requires_grad_(), ins[1].clone().requires_grad_()
        xo, eo = _run(layer, xi, ei, *ins[2:], lmax)
        outs.append([xo, eo, *torch.autograd.grad((xo * probe(xo)).sum() + (eo * probe(eo)).sum(), [xi, ei])])
    for a, r in zip(*outs):
        assert rel(a, r) < 1e-4
