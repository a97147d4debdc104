"""egnn's layers inside fairchem's eSCN-MD / UMA models: one call swaps them in, one swaps them back.

    from egnn.interop.fairchem import swap_layers, restore_layers
    swap_layers(model)        # each block's edge-wise message passing runs on egnn's layers
    ...                       # train / predict as usual: energies, forces, stress unchanged
    restore_layers(model)     # fairchem's own modules back, with the (trained) weights written back

What is swapped: every `fairchem.core.models.uma.escn_md_block.Edgewise` (the SO(2) message passing
of an eSCN-MD / UMA block: gather [x_src | x_dst], rotate into the edge frame, SO(2) convolution
with per-(m, l) radial weights, gate or separable-S2 activation, SO(2) convolution, rotate back
with the envelope, sum onto the targets) becomes a `UMAEdgewise`: the rotation into the edge frame
(rows |m| <= mmax only), `egnn.nn.SO2Convolution` (fairchem's weights, extra outputs first, radial
scale fused into the SO(2) linear), the rotation back and an index_add, in one recompute region
(memory-lean: autograd keeps the block's inputs, not its per-edge activations; on the PyTorch
backend its backward reruns the block only up to the activation, see _LeanTorchEdgewise). The rotations are
egnn.kernels' rotate_to_edge / rotate_back on the Triton backend (frames rebuilt from the edge
directions inside the kernels), and one batched GEMM with fairchem's own reduced m-major matrices
on the PyTorch backend.

The frames: fairchem blocks receive Wigner matrices, not edge vectors. The l = 1 block of the Wigner
matrix is the frame's rotation itself, so `frames_from_wigner` reads the edge direction (with its
gradient: forces and stress flow back through fairchem's own Wigner computation) and fairchem's
(random) roll from it, and the envelope from the l = 0 entry of the enveloped inverse. The swapped
model therefore reproduces fairchem's outputs for the same roll, activations that are not exactly
SO(2)-equivariant (S2 on a grid) included.

Not covered (a clear EgnnError): graph parallelism (gp_utils), MoLE experts that are not merged
(fairchem's merge_mole), Wigner matrices in a compact layout (the fused GPU backends).
EquiformerV2 (fairchem 1.x, whose source fairchem 2.x no longer ships): its graph attention is
swapped too when its module is importable (egnn.interop.fairchem_eqv2.EqV2Attention).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import kernels, so3
from ..errors import InputError
from ..nn.activation import GateActivation, SeparableS2Activation
from ..nn.fused import recompute, rerun_backward
from ..nn.so2 import SO2Convolution, m_major_degrees

__all__ = ["swap_layers", "restore_layers", "UMAEdgewise", "EqV2Attention", "frames_from_wigner", "so2_conv_from_fairchem",
           "so2_conv_to_fairchem"]


def _fairchem_edgewise_class():
    """fairchem 2.x's eSCN-MD/UMA Edgewise, or None where that fairchem is not installed."""
    try:
        from fairchem.core.models.uma.escn_md_block import Edgewise
    except ImportError:
        return None
    return Edgewise


@functools.lru_cache(maxsize=None)
def _l1_rows(lmax: int, mmax: int) -> tuple[list[int], int]:
    """m-major rows of the l = 1 block (m = -1, 0, 1 where |m| <= mmax) and the row of (1, 0)."""
    perm = so3.l_to_m_major(lmax, mmax).tolist()  # l-major row of each m-major row
    rows = [perm.index(r) for r in (1, 2, 3) if r in perm]
    return rows, perm.index(2)


def frames_from_wigner(wigner: torch.Tensor, wigner_inv_envelope: torch.Tensor, lmax: int, mmax: int):
    """(edge direction [E, 3], roll [E] or None, envelope [E]) from fairchem's m-major Wigner
    matrices [E, K_m, (lmax+1)²] and enveloped inverses [E, (lmax+1)², K_m]. The direction is the
    (l = 1, m = 0) row (R·r̂ = +Y, and e3nn's l = 1 block is R itself); the roll is R's turn about
    the edge against egnn's frame (egnn.nn.so2.frame_roll); the envelope the (l = 0, m = 0) entry."""
    if wigner.dim() != 3 or wigner.shape[2] != (lmax + 1) ** 2 or wigner.shape[1] != kernels.ops.num_m_rows(lmax, mmax):
        raise InputError(f"fairchem Wigner matrices must be [E, K_m={kernels.ops.num_m_rows(lmax, mmax)}, "
                         f"{(lmax + 1) ** 2}] (the general execution backend's layout), got {tuple(wigner.shape)}")
    rows, r0 = _l1_rows(lmax, mmax)
    vec = wigner[:, r0, 1:4]
    roll = None
    if mmax >= 1:  # with m = 0 rows only, the layers cannot see the roll
        from ..nn.so2 import frame_roll

        R = wigner[:, rows, 1:4]
        _, roll = frame_roll(R)
    return vec, roll, wigner_inv_envelope[:, 0, 0]


def _linear(mod, what):
    if type(mod) is not nn.Linear:
        raise InputError(f"{what} is a {type(mod).__name__}, not a Linear: for UMA merge fairchem's MoLE experts "
                         "first (merge_mole=True in the inference settings) or swap a model without MoLE")
    return mod


def so2_conv_from_fairchem(conv, lin, m0_perm=None) -> None:
    """Copy a fairchem SO2_Convolution's weights into an egnn SO2Linear (extra_first=True):
    m0 = fc_m0 (its output rows in the order `m0_perm`, if given), w[m-1] = so2_m_conv[m-1].fc.weight.T."""
    with torch.no_grad():
        fc0 = _linear(conv.fc_m0, "fc_m0")
        w, b = (fc0.weight, fc0.bias) if m0_perm is None else (fc0.weight[m0_perm], fc0.bias[m0_perm])
        lin.m0.weight.copy_(w)
        lin.m0.bias.copy_(b)
        for w, mc in zip(lin.w, conv.so2_m_conv):
            w.copy_(_linear(mc.fc, "so2_m_conv.fc").weight.t())


def so2_conv_to_fairchem(lin, conv, m0_perm=None) -> None:
    """The reverse of so2_conv_from_fairchem (`m0_perm`: the inverse row order)."""
    with torch.no_grad():
        w, b = (lin.m0.weight, lin.m0.bias) if m0_perm is None else (lin.m0.weight[m0_perm], lin.m0.bias[m0_perm])
        conv.fc_m0.weight.copy_(w)
        conv.fc_m0.bias.copy_(b)
        for w, mc in zip(lin.w, conv.so2_m_conv):
            mc.fc.weight.copy_(w.t())
            if getattr(mc, "_w_block", None) is not None:  # fairchem's cached block matrix (fast backend)
                mc._build_w_block()


class UMAEdgewise(nn.Module):
    """egnn's drop-in for fairchem's Edgewise (same call, same outputs; see the module docstring)."""

    def __init__(self, edgewise: nn.Module, backend: str = "auto", memory_lean: bool = True):
        super().__init__()
        ew = edgewise
        self.lmax, self.mmax, self.memory_lean = ew.lmax, ew.mmax, memory_lean
        self.backend = backend
        C, H = ew.sphere_channels, ew.hidden_channels
        if ew.act_type == "gate":
            act = GateActivation(m_major_degrees(self.lmax, self.mmax), self.lmax, H)
        elif ew.act_type == "s2":
            s2 = ew.act.s2_act  # fairchem's grid: [K_m, lat, long] and [lat, long, K_m]
            KM = s2.to_grid_mat_m.shape[0]
            act = SeparableS2Activation(self.lmax, self.mmax, H, s2.to_grid_mat_m.permute(1, 2, 0).reshape(-1, KM),
                                        s2.from_grid_mat_m.reshape(-1, KM).t())
        else:
            raise InputError(f"fairchem Edgewise act_type {ew.act_type!r} is not supported (gate, s2)")
        self.conv = SO2Convolution(self.lmax, self.mmax, 2 * C, H, C, backend=backend, act=act, extra_first=True)
        self.conv.to(ew.so2_conv_1.fc_m0.weight.dtype)
        so2_conv_from_fairchem(ew.so2_conv_1, self.conv.lin1)
        so2_conv_from_fairchem(ew.so2_conv_2, self.conv.lin2)
        self.rad_func = ew.so2_conv_1.rad_func  # fairchem's radial MLP, shared (not an SO(2) layer)
        self.__dict__["_fairchem"] = ew  # kept outside the module tree for restore_layers

    def forward(self, x, x_edge, edge_index, wigner, wigner_inv_envelope, total_atoms_across_gp_ranks=None,
                scatter_target=None, gp_ctx=None):
        try:
            from fairchem.core.common import gp_utils

            gp = gp_utils.initialized()
        except ImportError:
            gp = False
        if gp or gp_ctx is not None:
            raise InputError("egnn's swapped layers do not support fairchem's graph parallelism; restore_layers(model) "
                             "or run without gp")
        target = edge_index[1] if scatter_target is None else scatter_target
        src, dst = edge_index[0], edge_index[1]
        if kernels.backend.resolve(self.backend, x.device, self.lmax, x.dtype) == "triton":
            # the kernels rebuild each frame from its direction and roll: fairchem's matrices are not read
            vec, roll, env = frames_from_wigner(wigner, wigner_inv_envelope, self.lmax, self.mmax)
            ins, run = (x, x_edge, vec, env, roll, src, dst, target), self._messages_triton
        else:  # PyTorch: fairchem's own (reduced, m-major) Wigner matrices, no frames rebuilt
            ins, run = (x, x_edge, wigner, wigner_inv_envelope, src, dst, target), self._messages_torch
        run = functools.partial(run, x.shape[0])
        if not self.memory_lean:
            return run(*ins)
        params = list(self.conv.parameters()) + list(self.rad_func.parameters())
        if run.func == self._messages_torch and torch.is_grad_enabled():
            return _LeanTorchEdgewise.apply(self, run, len(ins), *ins, *[p for p in params if p.requires_grad])
        return recompute(run, ins, params)

    def _scatter(self, n, out, target):
        return out.new_zeros((n,) + out.shape[1:]).index_add_(0, target, out)

    def _messages_triton(self, n, x, x_edge, vec, env, roll, src, dst, target):
        h = kernels.rotate_to_edge(x, None, src, dst, vec, self.lmax, self.mmax, backend=self.backend, roll=roll)
        y, _ = self.conv(h, self.rad_func(x_edge))
        y = y * env.view(-1, 1, 1).to(y.dtype)
        return self._scatter(n, kernels.rotate_back(y, vec, self.lmax, self.mmax, backend=self.backend, roll=roll),
                             target)

    def _messages_torch(self, n, x, x_edge, wigner, wigner_inv_envelope, src, dst, target):
        # fairchem's matrices are already the reduced Wigner-D (rows |m| <= mmax, m-major): one
        # batched GEMM each way beats per-degree blocks plus a reorder on CPU (profiling/bench_fairchem.py)
        y, _ = self.conv.lin2(self._hidden(x, x_edge, wigner, src, dst))
        return self._scatter(n, torch.bmm(wigner_inv_envelope, y), target)

    def _hidden(self, x, x_edge, wigner, src, dst):
        """gather, rotate, first SO(2) linear (radially scaled), activation: what the recompute of
        the memory-lean backward reruns (_LeanTorchEdgewise)."""
        msg = kernels._torch_impl.gather_message(x, None, src, dst)
        h, s = self.conv.lin1(torch.bmm(wigner, msg), self.rad_func(x_edge))
        k = self.conv.act.num_scalars
        return self.conv.act(h, s[:, :k])


class _LeanTorchEdgewise(torch.autograd.Function):
    """UMAEdgewise's memory-lean region on the PyTorch backend: saves only the block's inputs, and
    its backward reruns the block only up to the activation. The rest (second SO(2) linear, rotation
    back, sum onto the targets) is linear in what it is given, so its backward needs its inputs,
    not its outputs: grad_y = W_invᵀ·g[target] and the second linear's gradients by hand
    (kernels._torch_impl.so2_linear_vjp), never forming y. Only with gradients to the inverse
    Wigner matrices (forces, stress) is y formed (without a graph), for grad W_inv = g[target]·yᵀ.
    create_graph (forces inside a loss) reruns the whole block with its graph (rerun_backward)."""

    @staticmethod
    def forward(ctx, layer, run, n_in, *args):
        ctx.layer, ctx.run, ctx.n_in, ctx.params = layer, run, n_in, args[n_in:]
        ctx.save_for_backward(*args[:n_in])
        with torch.no_grad():
            return run(*args[:n_in])

    @staticmethod
    def backward(ctx, g):
        saved, params, layer = ctx.saved_tensors, ctx.params, ctx.layer
        if torch.is_grad_enabled():
            return (None, None, None, *rerun_backward(ctx.run, saved, params, g))
        x, x_edge, w, w_inv, src, dst, target = saved
        head = [t.detach().requires_grad_(t.requires_grad) for t in (x, x_edge, w)]
        with torch.enable_grad():
            a = layer._hidden(*head, src, dst)
        lin2 = layer.conv.lin2
        g_e = g.index_select(0, target)
        grad_w_inv = None
        if w_inv.requires_grad:
            with torch.no_grad():
                y, _ = lin2(a.detach())
            grad_w_inv = torch.bmm(g_e, y.transpose(1, 2))
        ad = a.detach()
        ga, gw0, gb0, gws = kernels._torch_impl.so2_linear_vjp(ad, lin2.m0.weight.detach(), [w.detach() for w in lin2.w],
                                                             torch.bmm(w_inv.transpose(1, 2), g_e), lin2.lmax,
                                                             lin2.mmax, lin2.cout)
        by_lin2 = {id(lin2.m0.weight): gw0, id(lin2.m0.bias): gb0, **{id(w): gw for w, gw in zip(lin2.w, gws)}}
        rest = [p for p in params if id(p) not in by_lin2]
        wanted = [t for t in head if t.requires_grad] + rest
        grads = iter(torch.autograd.grad(a, wanted, ga, allow_unused=True)) if wanted else iter(())
        g_head = [next(grads) if t.requires_grad else None for t in head]
        g_rest = {id(p): next(grads) for p in rest}
        g_params = [by_lin2[id(p)] if id(p) in by_lin2 else g_rest[id(p)] for p in params]
        return (None, None, None, *g_head, grad_w_inv, None, None, None, *g_params)


def __getattr__(name):
    if name == "EqV2Attention":
        from .fairchem_eqv2 import EqV2Attention

        return EqV2Attention
    raise AttributeError(name)


def _replace(model: nn.Module, match, make) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and match(child):
                parent._modules[name] = make(child)
                count += 1
    return count


def swap_layers(model: nn.Module, backend: str = "auto", memory_lean: bool = True) -> nn.Module:
    """Replace, in place, every fairchem eSCN-MD / UMA `Edgewise` in `model` (a backbone, or any
    model holding one) by egnn's `UMAEdgewise`, and every EquiformerV2 (fairchem 1.x)
    `SO2EquivariantGraphAttention` (the blocks' attention and the force head's) by egnn's
    `EqV2Attention`, with the same weights; returns the model.
    `backend`: egnn's kernels backend ("auto": Triton on CUDA, PyTorch on CPU); `memory_lean`:
    one recompute region per block (autograd keeps no per-edge activations)."""
    from .fairchem_eqv2 import EqV2Attention, attention_class

    Edgewise, Attention = _fairchem_edgewise_class(), attention_class()
    if Edgewise is None and Attention is None:
        raise InputError("egnn.interop.fairchem needs fairchem-core: 2.x for eSCN-MD/UMA (pip install 'egnn[fairchem]'),"
                         " or 1.x's EquiformerV2 (importable as fairchem.core.models.equiformer_v2)")
    n = 0
    if Edgewise is not None:
        n += _replace(model, lambda m: isinstance(m, Edgewise), lambda m: UMAEdgewise(m, backend, memory_lean))
    if Attention is not None:
        n += _replace(model, lambda m: isinstance(m, Attention), lambda m: EqV2Attention(m, backend, memory_lean))
    if n == 0:
        raise InputError(f"swap_layers: no fairchem eSCN-MD/UMA Edgewise or EquiformerV2 SO2EquivariantGraphAttention "
                         f"module in {type(model).__name__} (supported: fairchem 2.x UMA/eSCN-MD backbones with the "
                         "general execution backend, fairchem 1.x EquiformerV2 backbones and heads)")
    return model


def restore_layers(model: nn.Module) -> nn.Module:
    """Put fairchem's own modules back, with egnn's (possibly trained) weights converted back into
    them; returns the model."""
    from .fairchem_eqv2 import EqV2Attention

    def back(m: UMAEdgewise):
        ew = m._fairchem
        so2_conv_to_fairchem(m.conv.lin1, ew.so2_conv_1)
        so2_conv_to_fairchem(m.conv.lin2, ew.so2_conv_2)
        return ew

    n = _replace(model, lambda m: isinstance(m, UMAEdgewise), back)
    n += _replace(model, lambda m: isinstance(m, EqV2Attention), lambda m: m.to_fairchem())
    if n == 0:
        raise InputError("restore_layers: the model holds no layer swapped by egnn.interop.fairchem.swap_layers")
    return model
