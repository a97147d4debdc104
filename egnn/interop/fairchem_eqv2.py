"""egnn's layers inside fairchem 1.x's EquiformerV2 (used by egnn.interop.fairchem.swap_layers).

EquiformerV2's `SO2EquivariantGraphAttention` (the graph attention of every `TransBlockV2` and the
force head's `force_block`): gather [x_src | x_dst], optional per-degree radial scale
(use_m_share_rad), rotate into the edge frame (rows |m| <= mmax), SO(2) convolution with per-(m, l)
radial weights whose m = 0 map also gives the attention scalars (and the gates or the separable-S2
scalars), gate / S2 / separable-S2 activation on fairchem's own grid, SO(2) convolution, attention
softmax over each target's edges, rotate back with EquiformerV2's rescale of the degrees l > mmax,
sum onto the targets, per-degree projection.

`EqV2Attention` runs everything per edge in one recompute region (autograd keeps the block's
inputs, not its per-edge activations): egnn.nn.SO2Convolution with the block's weights (extra
outputs reordered once: fairchem keeps the attention scalars first, egnn the activation's), the
activation on fairchem's grid matrices, and on the PyTorch backend one batched GEMM each way with
fairchem's own Wigner matrices (rows |m| <= mmax taken in m-major order inside the region);
on the Triton backend the kernels rebuild each frame from the edge direction and roll read from
the l = 1 block of those matrices, and the rotation back is fused into the attention aggregation.
fairchem's own modules that are not SO(2) layers (radial MLPs, atom-edge embeddings, attention
norm and dot, the projection) are reused as they are, so trained values are shared.

Not covered (a clear EgnnError): several resolutions (len(lmax_list) > 1), use_s2_act_attn,
graph parallelism. EquiformerV2 detaches its Wigner matrices, so forces taken as -dE/dx flow only
through the distances: the swapped model gives exactly those (the same as fairchem's).
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from .. import kernels, so3
from ..errors import InputError
from ..kernels._torch_impl import rescale_factors, segment_softmax
from ..nn.activation import GateActivation, S2Activation, SeparableS2Activation
from ..nn.fused import recompute
from ..nn.so2 import SO2Convolution, frame_roll, m_major_degrees
from .fairchem import so2_conv_from_fairchem, so2_conv_to_fairchem

ATTENTION = ("fairchem.core.models.equiformer_v2.transformer_block", "SO2EquivariantGraphAttention")


def attention_class():
    """fairchem 1.x's SO2EquivariantGraphAttention if its module is loaded (a model built from it
    has loaded it), else None: nothing is imported here."""
    mod = sys.modules.get(ATTENTION[0])
    return getattr(mod, ATTENTION[1], None) if mod is not None else None


@functools.lru_cache(maxsize=None)
def _orders(lmax: int, mmax: int):
    """(m-major rows as l-major rows [K_m], m-major rows as rows of EquiformerV2's reduced l-major
    order [K_m], degree of each per-(m, l) slot of the SO(2) linear [Σ_m n_m])."""
    perm = so3.l_to_m_major(lmax, mmax).tolist()
    reduced = [l * l + l + m for l in range(lmax + 1) for m in range(-min(l, mmax), min(l, mmax) + 1)]
    slots = [l for m in range(mmax + 1) for l in range(m, lmax + 1)]
    return (torch.tensor(perm), torch.tensor([reduced.index(r) for r in perm]), torch.tensor(slots))


def _m0_perm(n_alpha: int, n_act: int, n: int, to_egnn: bool) -> torch.Tensor:
    """Row order of the first SO(2) linear's m = 0 map: fairchem [alpha, act, rest], egnn [act, alpha, rest]."""
    if to_egnn:
        head = list(range(n_alpha, n_alpha + n_act)) + list(range(n_alpha))
    else:
        head = list(range(n_act, n_act + n_alpha)) + list(range(n_act))
    return torch.tensor(head + list(range(n_alpha + n_act, n)))


class EqV2Attention(nn.Module):
    """egnn's drop-in for EquiformerV2's SO2EquivariantGraphAttention (same call, same outputs)."""

    def __init__(self, ga: nn.Module, backend: str = "auto", memory_lean: bool = True):
        super().__init__()
        if len(ga.lmax_list) != 1:
            raise InputError(f"EquiformerV2 with several resolutions (lmax_list={ga.lmax_list}) is not supported by "
                             "egnn's swapped layers: use one resolution")
        if ga.use_s2_act_attn:
            raise InputError("EquiformerV2 with use_s2_act_attn=True is not supported by egnn's swapped layers")
        self.lmax, self.mmax = ga.lmax_list[0], ga.mmax_list[0]
        self.backend, self.memory_lean = backend, memory_lean
        L, M, C, H = self.lmax, self.mmax, ga.sphere_channels, ga.hidden_channels
        self.heads, self.alpha_channels, self.value_channels = ga.num_heads, ga.attn_alpha_channels, \
            ga.attn_value_channels
        perm, reduced, slots = _orders(L, M)
        if ga.use_gate_act:
            act = GateActivation(m_major_degrees(L, M), L, H)
        else:
            grid = ga.SO3_grid[L][M]  # fairchem's matrices [lat, long, K] in its reduced l-major order
            K = grid.to_grid_mat.shape[-1]
            to_grid = grid.to_grid_mat.reshape(-1, K)[:, reduced]
            from_grid = grid.from_grid_mat.reshape(-1, K)[:, reduced].t()
            act = SeparableS2Activation(L, M, H, to_grid, from_grid) if ga.use_sep_s2_act else \
                S2Activation(L, M, to_grid, from_grid)
        n_alpha = self.heads * self.alpha_channels
        dtype = ga.so2_conv_1.fc_m0.weight.dtype
        self.conv = SO2Convolution(L, M, 2 * C, H, self.heads * self.value_channels, extra_scalars=n_alpha,
                                   backend=backend, act=act, extra_first=True).to(dtype)
        n0 = ga.so2_conv_1.fc_m0.out_features
        self._m0_in = _m0_perm(n_alpha, act.num_scalars, n0, True)
        self._m0_out = _m0_perm(n_alpha, act.num_scalars, n0, False)
        so2_conv_from_fairchem(ga.so2_conv_1, self.conv.lin1, self._m0_in)
        so2_conv_from_fairchem(ga.so2_conv_2, self.conv.lin2)
        # fairchem's non-SO(2) modules, shared (their trained values stay fairchem's)
        self.rad_func = ga.so2_conv_1.rad_func if not ga.use_m_share_rad else ga.rad_func
        self.m_share_rad = ga.use_m_share_rad
        self.source_embedding, self.target_embedding = ga.source_embedding, ga.target_embedding
        self.alpha_norm, self.alpha_act, self.alpha_dot = ga.alpha_norm, ga.alpha_act, ga.alpha_dot
        self.alpha_dropout, self.proj = ga.alpha_dropout, ga.proj
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("rescale", rescale_factors(L, M).to(dtype), persistent=False)
        self.__dict__["_fairchem"] = ga  # kept outside the module tree for restore_layers

    # ------------------------------------------------------------------ the call fairchem makes
    def forward(self, x, atomic_numbers, edge_distance, edge_index, node_offset: int = 0):
        ga = self._fairchem
        try:
            from fairchem.core.common import gp_utils

            gp = gp_utils.initialized()
        except ImportError:
            gp = False
        if gp:
            raise InputError("egnn's swapped layers do not support fairchem's graph parallelism; restore_layers(model) "
                             "or run without gp")
        src, dst = edge_index[0], edge_index[1]
        # the edge features [distances | atom embeddings] are built inside the region (from the
        # distances, which the model holds for all blocks): with EquiformerV2's 600 Gaussians they
        # would be ~5 kB per edge kept
        x_edge = (edge_distance, atomic_numbers)
        emb = x.embedding
        E = src.shape[0]
        target = dst - node_offset if node_offset else dst
        mask = None
        if self.alpha_dropout is not None and self.training:
            # fairchem's draws, made outside the recompute region: its attention weights are laid out
            # head-major in memory (einsum, softmax) and dropout draws in memory order, so the same
            # seed gives the same mask
            ones = emb.new_ones(self.heads, E).t().reshape(E, 1, self.heads, 1)
            mask = self.alpha_dropout(ones).reshape(E, self.heads)
        rot = ga.SO3_rotation[0]
        if kernels.backend.resolve(self.backend, emb.device, self.lmax, emb.dtype) == "triton":
            vec, roll = frame_roll(rot.wigner[:, 1:4, 1:4])  # l = 1 block = the frame (e3nn's basis)
            ins, run = (emb, *x_edge, vec, roll, src, dst, target, mask), self._messages_triton
        else:
            # fairchem's Wigner matrices [E, (L+1)², (L+1)²] (detached, held by fairchem for all blocks)
            ins, run = (emb, *x_edge, rot.wigner, src, dst, target, mask), self._messages_torch
        run = functools.partial(run, emb.shape[0], emb.shape[0] + int(node_offset))  # softmax over edge_index[1]
        mods = [self.conv, self.rad_func, self.alpha_norm] + \
            ([self.source_embedding, self.target_embedding] if self.source_embedding is not None else [])
        params = [p for m in mods for p in m.parameters()] + [self.alpha_dot]
        out = run(*ins) if not self.memory_lean else recompute(run, ins, params)
        msg = type(x)(0, x.lmax_list.copy(), out.shape[-1], device=x.device, dtype=x.dtype)
        msg.set_embedding(out)
        msg.set_lmax_mmax(x.lmax_list.copy(), x.lmax_list.copy())
        return self.proj(msg)

    def _scale(self, dist, z, src, dst):
        x_edge = dist
        if self.source_embedding is not None:
            x_edge = torch.cat((dist, self.source_embedding(z[src]), self.target_embedding(z[dst])), dim=1)
        s = self.rad_func(x_edge)
        if self.m_share_rad:  # one weight per degree (and channel), applied before the rotation
            s = s.view(s.shape[0], self.lmax + 1, -1).index_select(1, self.slots.to(s.device))
        return s

    def _logits(self, extra, mask):
        a = self.alpha_act(self.alpha_norm(extra.reshape(-1, self.heads, self.alpha_channels)))
        return torch.einsum("bik, ik -> bi", a, self.alpha_dot), mask

    def _weights(self, extra, dst, n, mask):
        logits, mask = self._logits(extra, mask)
        alpha = segment_softmax(logits, dst, n).to(logits.dtype)
        return alpha if mask is None else alpha * mask

    def _messages_torch(self, n, nseg, emb, dist, z, wigner, src, dst, target, mask):
        # the m-major rows |m| <= mmax of fairchem's matrices, inside the region: a copy per block
        # (small next to the GEMMs), nothing per edge kept beyond what fairchem holds anyway
        w = wigner.index_select(1, self.perm)
        msg = kernels._torch_impl.gather_message(emb, None, src, dst)
        y, extra = self.conv(torch.bmm(w, msg), self._scale(dist, z, src, dst))
        E = y.shape[0]
        alpha = self._weights(extra, dst, nseg, mask)
        y = (y.view(E, y.shape[1], self.heads, -1) * alpha.view(E, 1, self.heads, 1)).view_as(y)
        # back with Wᵀ, EquiformerV2's rescale on the output rows of degree l > mmax (as fairchem)
        out = torch.bmm(w.transpose(1, 2) * self.rescale.to(w.dtype).view(1, -1, 1), y)
        return out.new_zeros((n,) + out.shape[1:]).index_add_(0, target, out)

    def _messages_triton(self, n, nseg, emb, dist, z, vec, roll, src, dst, target, mask):
        h = kernels.rotate_to_edge(emb, None, src, dst, vec, self.lmax, self.mmax, backend=self.backend, roll=roll)
        y, extra = self.conv(h, self._scale(dist, z, src, dst))
        logits, mask = self._logits(extra, mask)
        if mask is None:  # softmax, weighting, rotation back (rescaled) and the sum in one kernel
            return kernels.attention_aggregate(y, logits, target, n, vec, self.lmax, self.mmax, backend=self.backend,
                                               roll=roll, rescale=True)
        alpha = segment_softmax(logits, dst, nseg).to(y.dtype) * mask
        E = y.shape[0]
        y = (y.view(E, y.shape[1], self.heads, -1) * alpha.view(E, 1, self.heads, 1)).view_as(y)
        out = kernels.rotate_back(y, vec, self.lmax, self.mmax, backend=self.backend, roll=roll, rescale=True)
        return out.new_zeros((n,) + out.shape[1:]).index_add_(0, target, out)

    def to_fairchem(self) -> nn.Module:
        """fairchem's module back, with this layer's (possibly trained) SO(2) weights written into it."""
        ga = self._fairchem
        so2_conv_to_fairchem(self.conv.lin1, ga.so2_conv_1, self._m0_out)
        so2_conv_to_fairchem(self.conv.lin2, ga.so2_conv_2)
        return ga
