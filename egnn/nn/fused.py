"""The fused, memory-lean interaction layer: same parameters as `InteractionLayer`, fused ops.

Per message it runs egnn.kernels' rotate_to_edge (gather [x_src | x_dst | e] + Wigner-D rebuilt
from the edge vector + l->m-major, one kernel), the SO(2) convolution (SO2Linear kernels), and
attention_aggregate with the rotation back fused in. Autograd is memory-lean: each message pass
is one recompute region that saves only its inputs (node rows, the normalised edge embedding,
rbf, envelope, edge vectors, indices), so no per-edge intermediate (gathered message, D, hidden
activations) lives between forward and backward; backward recomputes them.

`FusedInteractionLayer` subclasses `InteractionLayer` (identical state dict) and its forward takes
the same arguments; the edge vectors come from `D` when it is the `EdgeFrame` that
`EdgeRotation.wigner` returns, or from `edge_vec=`. Gradients reach the edge vectors (forces)
through the recompute region and the ops.
"""
from __future__ import annotations

import nvtx
import torch

from .. import kernels
from ..errors import InputError
from .layers import InteractionLayer, _identity, attention_logits


class _Recompute(torch.autograd.Function):
    """Checkpoint that saves the region's tensor inputs (through save_for_backward, so
    saved_tensors_hooks see them) and reruns `run` under grad in backward (double backward too:
    training on forces, with the PyTorch backend; the Triton ops are once-differentiable)."""

    @staticmethod
    def forward(ctx, run, n_in, *args):
        ctx.run, ctx.n_in, ctx.params = run, n_in, args[n_in:]
        ctx.save_for_backward(*args[:n_in])
        with torch.no_grad():
            return run(*args[:n_in])

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *rerun_backward(ctx.run, ctx.saved_tensors, ctx.params, grad))


def rerun_backward(run, saved, params, grad):
    """Gradients (for saved + params, None where not wanted) of run(*saved) for the output gradient
    `grad`, by rerunning run under grad. create_graph=True (forces that enter a loss): recompute on
    fresh views of the original inputs and keep the graph, so second derivatives are exact (views,
    not the inputs: the gradient w.r.t. each must not count paths through another input that
    depends on it); otherwise on detached copies (nothing retained)."""
    higher = torch.is_grad_enabled()
    ins = [(t.view_as(t) if higher and t.requires_grad else t.detach().requires_grad_(t.requires_grad))
           if t is not None and t.is_floating_point() else t for t in saved]
    with torch.enable_grad():
        out = run(*ins)
    every = list(ins) + list(params)
    wanted = [t for t in every if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True, create_graph=higher)) if wanted else iter(())
    return [next(grads) if t is not None and t.requires_grad else None for t in every]


def recompute(run, inputs, params):
    params = [p for p in params if p.requires_grad]
    if not torch.is_grad_enabled():
        return run(*inputs)
    return _Recompute.apply(run, len(inputs), *inputs, *params)


class FusedInteractionLayer(InteractionLayer):
    def __init__(self, lmax, mmax, channels, hidden, heads, num_rbf, alpha_channels=32, backend: str = "auto",
                 attention: str = "softmax"):
        super().__init__(lmax, mmax, channels, hidden, heads, num_rbf, alpha_channels, backend, attention)
        self.lmax, self.mmax = lmax, mmax

    def _node_messages(self, n, xn, en, rbf, envelope, src, dst, edge_vec):
        blk = self.node_msg
        h = kernels.rotate_to_edge(xn, en, src, dst, edge_vec, self.lmax, self.mmax, backend=self.backend)
        y, extra = blk.conv(h, blk.radial(rbf).unsqueeze(1))
        with nvtx.annotate("egnn/aggregate"):
            logits = attention_logits(self.alpha(extra), envelope, self.attention)
            return kernels.attention_aggregate(y * envelope.view(-1, 1, 1).to(y.dtype), logits, dst, n,
                                               edge_vec, self.lmax, self.mmax, backend=self.backend)

    def _edge_messages(self, xn, en, rbf, src, dst, edge_vec):
        blk = self.edge_msg
        h = kernels.rotate_to_edge(xn, en, src, dst, edge_vec, self.lmax, self.mmax, backend=self.backend)
        y, _ = blk.conv(h, blk.radial(rbf).unsqueeze(1))
        return kernels.rotate_back(y, edge_vec, self.lmax, self.mmax, backend=self.backend)

    def forward(self, x, e, src, dst, rot, D, rbf, envelope, exchange=_identity, edge_vec=None):
        edge_vec = edge_vec if edge_vec is not None else getattr(D, "edge_vec", None)
        if edge_vec is None:
            raise InputError("FusedInteractionLayer: no edge vectors; pass D from EdgeRotation.wigner(edge_vec) "
                             "(an EdgeFrame) or edge_vec=")
        n = x.shape[0]
        with nvtx.annotate("egnn/node_update"):
            xn = exchange(self.node_norm(x))
            en = self.edge_norm(e)
            agg = recompute(lambda *a: self._node_messages(n, *a), (xn, en, rbf, envelope, src, dst, edge_vec),
                            list(self.node_msg.parameters()) + list(self.alpha.parameters()))
            x = x + self.node_proj(agg)
            x = x + self.ffn(self.ffn_norm(x))
        with nvtx.annotate("egnn/edge_update"):
            xn = exchange(self.node_norm(x))
            u = recompute(self._edge_messages, (xn, en, rbf, src, dst, edge_vec), list(self.edge_msg.parameters()))
            e = e + u * envelope.view(-1, 1, 1)
        return x, e


def saved_activation_bytes(fn, *args, exclude=()):
    """(bytes of all tensors autograd saves while running fn(*args), fn's output), counted with
    torch.autograd.graph.saved_tensors_hooks; each storage once, tensors sharing a storage with
    `exclude` (e.g. the parameters) left out. The output holds every saved tensor: drop it before
    measuring anything else (a benchmark that kept it reported the next layer's GPU peak 66 GB high)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out
