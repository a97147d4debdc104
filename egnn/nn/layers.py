"""One interaction layer of the model (the seed's Fig. 2): a node-update block that aggregates
attention-weighted messages, and an edge-update block that updates edge embeddings in place.

Both build messages from [src node, dst node, edge] embeddings (3C channels), rotate them into the
edge frame, apply an SO(2) convolution 3C -> C and rotate back. `exchange(x)` refreshes the rows of
remote (halo) atoms before messages are gathered; it is the identity on one process.
"""
from __future__ import annotations

import nvtx
import torch
from torch import nn

from ..errors import ConfigError
from ..kernels.backend import check_backend
from .activation import GateActivation
from .attention import AttentionAggregation
from .linear import EquivariantLinear
from .norm import EquivariantLayerNorm
from .radial import RadialMLP
from .so2 import EdgeRotation, SO2Convolution


def _identity(x):
    return x


ATTENTION_MODES = ("softmax", "smooth")


def check_attention(mode: str, where: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"{where}: attention must be one of {ATTENTION_MODES}, got {mode!r}")


def attention_logits(logits, envelope, mode: str):
    """The node update's attention logits [E, heads]. "softmax" (the shipped models): every edge within
    r_cut enters the softmax with exp(logit); its value fades with the envelope but its share of the
    normaliser does not, so the node update jumps when an edge leaves r_cut (H9: ~0.7 meV in the
    node blocks, docs/accuracy.md). "smooth": weights envelope · exp(logit) / Σ envelope · exp(logit),
    continuous as an edge leaves (the 1e-12 floor: an edge at r_cut weighs nothing, no 0/0)."""
    if mode == "softmax":
        return logits
    return logits + envelope.clamp_min(1e-12).log().to(logits.dtype).unsqueeze(-1)


class FeedForward(nn.Module):
    """Per-node equivariant MLP: linear C -> H, gate, linear H -> out (C, or a count per l)."""

    def __init__(self, lmax: int, channels: int, hidden: int, out_channels=None):
        super().__init__()
        row_l = torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)])
        self.gate = GateActivation(row_l, lmax, hidden)
        self.lin1 = EquivariantLinear(lmax, channels, hidden)
        self.gates = nn.Linear(channels, self.gate.num_gates)
        self.lin2 = EquivariantLinear(lmax, hidden, channels if out_channels is None else out_channels)

    def forward(self, x):
        return self.lin2(self.gate(self.lin1(x), self.gates(x[:, 0])))


class MessageBlock(nn.Module):
    """Gather [x_src, x_dst, e] -> rotate -> SO(2) conv (radially scaled) -> rotate back."""

    def __init__(self, lmax, mmax, channels, hidden, num_rbf, extra_scalars=0):
        super().__init__()
        self.conv = SO2Convolution(lmax, mmax, 3 * channels, hidden, channels, extra_scalars)
        self.radial = RadialMLP(num_rbf, 3 * channels)

    def forward(self, rot: EdgeRotation, D, x_src, x_dst, e, rbf):
        msg = torch.cat([x_src, x_dst, e], dim=-1)
        y, extra = self.conv(rot.to_edge(msg, D), self.radial(rbf).unsqueeze(1))
        return rot.from_edge(y, D), extra


class InteractionLayer(nn.Module):
    def __init__(self, lmax, mmax, channels, hidden, heads, num_rbf, alpha_channels=32, backend: str = "auto",
                 attention: str = "softmax"):
        super().__init__()
        check_attention(attention, "InteractionLayer")
        self.attention = attention
        self.node_norm = EquivariantLayerNorm(lmax, channels)
        self.edge_norm = EquivariantLayerNorm(lmax, channels)
        self.node_msg = MessageBlock(lmax, mmax, channels, hidden, num_rbf, extra_scalars=alpha_channels)
        self.alpha = nn.Sequential(nn.LayerNorm(alpha_channels), nn.SiLU(), nn.Linear(alpha_channels, heads))
        self.aggregate = AttentionAggregation(heads)
        self.node_proj = EquivariantLinear(lmax, channels, channels)
        self.ffn_norm = EquivariantLayerNorm(lmax, channels)
        self.ffn = FeedForward(lmax, channels, hidden)
        self.edge_msg = MessageBlock(lmax, mmax, channels, hidden, num_rbf)
        self.backend = check_backend(backend)
        for m in self.modules():  # the SO(2) linears and the aggregation follow this layer's backend
            if m is not self and hasattr(m, "backend"):
                m.backend = self.backend

    def forward(self, x, e, src, dst, rot, D, rbf, envelope, exchange=_identity):
        n = x.shape[0]
        with nvtx.annotate("egnn/node_update"):
            xn = exchange(self.node_norm(x))
            en = self.edge_norm(e)
            v, extra = self.node_msg(rot, D, xn.index_select(0, src), xn.index_select(0, dst), en, rbf)
            with nvtx.annotate("egnn/aggregate"):
                logits = attention_logits(self.alpha(extra), envelope, self.attention)
                agg = self.aggregate(logits, v * envelope.view(-1, 1, 1), dst, n)
            x = self._node_update(x, agg)
        with nvtx.annotate("egnn/edge_update"):
            xn = exchange(self.node_norm(x))
            u, _ = self.edge_msg(rot, D, xn.index_select(0, src), xn.index_select(0, dst), en, rbf)
            e = e + u * envelope.view(-1, 1, 1)
        return x, e

    @torch.no_grad()
    def make_identity_(self) -> "InteractionLayer":
        """Zero the projections that end the three residual branches (node message, feed-forward,
        edge message): the layer then passes x and e through unchanged, while the gradient of each
        zeroed projection is not zero, so it learns from there (a layer added to a trained model)."""
        for m in (self.node_proj, self.ffn.lin2, self.edge_msg.conv.lin2):
            for p in m.parameters():
                p.zero_()
        return self

    def _node_update(self, x, agg):
        x = x + self.node_proj(agg)
        return x + self.ffn(self.ffn_norm(x))

    @torch.no_grad()
    def forward_chunked(self, x, e, src, dst, rot, chunks, edge_features, exchange=_identity, progress=None):
        """Inference with bounded memory: the same result as forward, but messages are built for one
        edge range at a time. Ranges must start and end on destination boundaries (edges are sorted
        by dst), so every softmax segment lies in one chunk. `edge_features(a, b)` returns
        (D, rbf, envelope) of edges a:b, recomputed per chunk instead of stored for all edges."""
        n = x.shape[0]
        with nvtx.annotate("egnn/node_update"):
            xn = exchange(self.node_norm(x))
            agg = None
            for a, b in chunks:
                D, rbf, env = edge_features(a, b)
                s, d = src[a:b], dst[a:b]
                v, extra = self.node_msg(rot, D, xn.index_select(0, s), xn.index_select(0, d),
                                         self.edge_norm(e[a:b]), rbf)
                logits = attention_logits(self.alpha(extra), env, self.attention)
                part = self.aggregate(logits, v * env.view(-1, 1, 1), d, n)
                agg = part if agg is None else agg.add_(part)
                if progress:
                    progress(0.5)
            if agg is None:
                agg = torch.zeros_like(x)
            x = self._node_update(x, agg)
        with nvtx.annotate("egnn/edge_update"):
            xn = exchange(self.node_norm(x))
            for a, b in chunks:
                D, rbf, env = edge_features(a, b)
                s, d = src[a:b], dst[a:b]
                u, _ = self.edge_msg(rot, D, xn.index_select(0, s), xn.index_select(0, d),
                                     self.edge_norm(e[a:b]), rbf)
                e[a:b] += u * env.view(-1, 1, 1)
                if progress:
                    progress(0.5)
        return x, e
