"""HamiltonianModel: the reference (pure PyTorch) equivariant model of H blocks.

species, edges, edge vectors -> per-node outputs (diagonal blocks H[i, i](0)) and per-edge outputs
(off-diagonal blocks H[d, s](R)), both in the coupled (L, M) basis of `egnn.basis`: rows
L = 0..basis.L_max (l-major), channels padded per species pair (the basis' layout says which
channel holds which shell pair).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .basis import OrbitalBasis
from .errors import ConfigError, InputError
from .nn import (EdgeRotation, EquivariantLayerNorm, FeedForward, GaussianRBF, InteractionLayer, RadialMLP,
                 cosine_envelope)
from .nn.fused import FusedInteractionLayer
from .nn.layers import check_attention
from .nn.reference import TwoCentreReference

__all__ = ["ModelConfig", "HamiltonianModel", "OutputHead", "Encoded", "OutputChunk", "edge_chunks"]

ONSITE_MODES = ("node", "node+edges")
REFERENCES = ("none", "two_centre")
# Σ over the ~100-200 incoming edges within 8-12 Å: keeps the initial onsite sum O(1)
ONSITE_EDGE_NORM = 1.0 / 32.0


@dataclass
class ModelConfig:
    basis: OrbitalBasis
    r_cut: float = 8.0
    lmax: int = 4
    mmax: int = 4
    channels: int = 16  # E, the embedding width
    layers: int = 3  # M
    heads: int = 2
    hidden: int = 32  # width inside SO(2) convolutions and feed-forwards
    num_rbf: int = 32
    # memory-lean fused layers (egnn.nn.fused): Triton kernels on CUDA, recompute in backward, ~5.5 kB
    # saved per edge and layer instead of ~63 kB; same parameters and results as the reference layers
    fused: bool = False
    # onsite blocks (issue 11 ablations): "node" = the node head alone (the original model);
    # "node+edges" adds Σ_{j->i} envelope(r_ij)·head([e_ij, x_i, x_j]) over the incoming edges, a
    # two-centre expansion of the crystal field that the onsite energies follow
    onsite: str = "node"
    # what the node head reads: "last" = the final node embedding; "all" = every layer's, concatenated
    node_head_input: str = "last"
    # "two_centre": add a linear two-centre reference H (Slater-Koster hoppings and a crystal-field
    # onsite sum over exponential radial features, egnn.nn.reference) fitted in closed form to the
    # training data; the network predicts the residual. "none": the network predicts H itself
    reference: str = "none"
    # the node update's attention over incoming edges (egnn.nn.layers.attention_logits): "softmax" (the
    # shipped models) or "smooth", envelope-weighted and so continuous when an edge leaves r_cut, at
    # no cost and no loss of accuracy (docs/accuracy.md, R8); a checkpoint keeps the mode it was trained with
    attention: str = "softmax"

    def __post_init__(self):
        if isinstance(self.basis, dict):
            self.basis = OrbitalBasis.from_dict(self.basis)
        if self.lmax < 0 or not 0 <= self.mmax <= self.lmax:
            raise ConfigError(f"model: need 0 <= mmax <= lmax, got lmax={self.lmax}, mmax={self.mmax}")
        if self.lmax < self.basis.L_max:
            raise ConfigError(f"model: lmax={self.lmax} is smaller than the L={self.basis.L_max} that the "
                              f"orbital basis needs (shells up to l={self.basis.lmax} couple to 2l); "
                              f"set lmax >= {self.basis.L_max}")
        if self.channels % self.heads:
            raise ConfigError(f"model: channels={self.channels} must be divisible by heads={self.heads}")
        if not self.r_cut > 0:
            raise ConfigError(f"model: r_cut must be > 0 Å, got {self.r_cut}")
        check_attention(self.attention, "model")
        if self.onsite not in ONSITE_MODES:
            raise ConfigError(f"model: onsite must be one of {ONSITE_MODES}, got {self.onsite!r}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"model: reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.node_head_input not in ("last", "all"):
            raise ConfigError(f"model: node_head_input must be 'last' or 'all', got {self.node_head_input!r}")
        for name in ("channels", "layers", "heads", "hidden", "num_rbf"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model: {name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["basis"] = self.basis.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)


class OutputHead(FeedForward):
    """Equivariant MLP to padded coupled-basis outputs: rows L <= L_max, C_in -> hidden (gated) ->
    counts[L] channels per L."""

    def __init__(self, L_max: int, in_channels: int, hidden: int, counts: list[int]):
        super().__init__(L_max, in_channels, hidden, counts)
        self.L_max = L_max

    def forward(self, z):
        return super().forward(z[:, :(self.L_max + 1) ** 2])


@dataclass
class Encoded:
    """What `HamiltonianModel.encode` leaves for the output heads (inference)."""
    species: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    edge_vec: torch.Tensor
    chunks: list
    e: torch.Tensor  # edge embeddings after the last layer [E, (lmax+1)², C]
    xn: torch.Tensor  # normalised node embeddings [N, (lmax+1)², C]
    xe: torch.Tensor  # the same after the halo exchange (what edges gather)
    seen: list  # node embeddings before each layer (node_head_input "all")


@dataclass
class OutputChunk:
    """Node outputs of atoms lo..hi-1 and edge outputs of edges a..b-1 (their incoming edges)."""
    lo: int
    hi: int
    node: torch.Tensor
    a: int
    b: int
    edge: torch.Tensor


def edge_chunks(dst: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """Edge ranges of about `size` edges that start and end on destination boundaries."""
    E = len(dst)
    if E == 0:
        return []
    starts = torch.ones(E, dtype=torch.bool, device=dst.device)
    starts[1:] = dst[1:] != dst[:-1]
    bounds = torch.nonzero(starts).flatten().tolist() + [E]
    out, a = [], 0
    for b in bounds[1:]:
        if b - a >= size or b == E:
            out.append((a, b))
            a = b
    return out


class HamiltonianModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        basis = cfg.basis
        S, C, L = len(basis.elements), cfg.channels, basis.L_max
        self.num_species, self.L_max = S, L
        self.node_counts, self.edge_counts = basis.node_channels(), basis.edge_channels()
        self.rotation = EdgeRotation(cfg.lmax, cfg.mmax)
        self.rbf = GaussianRBF(cfg.r_cut, cfg.num_rbf)
        self.node_embed = nn.Embedding(S, C)
        self.edge_radial = RadialMLP(cfg.num_rbf, C)
        self.edge_src_embed = nn.Embedding(S, C)
        self.edge_dst_embed = nn.Embedding(S, C)
        layer_cls = FusedInteractionLayer if cfg.fused else InteractionLayer
        self.layers = nn.ModuleList(layer_cls(cfg.lmax, cfg.mmax, C, cfg.hidden, cfg.heads, cfg.num_rbf,
                                              attention=cfg.attention) for _ in range(cfg.layers))
        self.node_norm = EquivariantLayerNorm(cfg.lmax, C)
        self.edge_norm = EquivariantLayerNorm(cfg.lmax, C)
        n_in = C * (cfg.layers + 1 if cfg.node_head_input == "all" else 1)
        self.node_head = OutputHead(L, n_in, cfg.hidden, self.node_counts)
        # per-layer norms of the embeddings the "all" node head reads besides the final one
        self.layer_norms = nn.ModuleList(EquivariantLayerNorm(cfg.lmax, C) for _ in range(cfg.layers)) \
            if cfg.node_head_input == "all" else None
        self.onsite_head = OutputHead(L, 3 * C, cfg.hidden, self.node_counts) if cfg.onsite == "node+edges" else None
        self.edge_head = OutputHead(L, 3 * C, cfg.hidden, self.edge_counts)
        # H decays roughly exponentially with distance: a learned log-scale per output channel and
        # distance lets far blocks be small without squeezing them through the equivariant head
        self.edge_log_scale = RadialMLP(cfg.num_rbf, max(self.edge_counts))
        nn.init.zeros_(self.edge_log_scale.net[-1].weight)
        nn.init.zeros_(self.edge_log_scale.net[-1].bias)
        self.reference = (TwoCentreReference(S, L, max(self.node_counts), max(self.edge_counts), cfg.r_cut)
                          if cfg.reference == "two_centre" else None)
        # output statistics (set by the trainer from the data): per-species L = 0 shift, per-(L, c) scale
        self.register_buffer("node_shift", torch.zeros(S, max(self.node_counts)))
        self.register_buffer("node_scale", torch.ones(L + 1, max(self.node_counts)))
        self.register_buffer("edge_scale", torch.ones(L + 1, max(self.edge_counts)))
        self.register_buffer("row_L", torch.tensor([l for l in range(L + 1) for _ in range(2 * l + 1)]),
                             persistent=False)

    def load_grown(self, state: dict, layers: int) -> None:
        """Load the weights of the same model with `layers` interaction layers (fewer than this one's):
        the first `layers` layers, the embeddings, heads, reference and statistics are copied, and the
        layers after them start as the identity (`InteractionLayer.make_identity_`), so the deeper
        model predicts exactly what the checkpoint did and training goes on from there. Needs the
        node head to read the last layer only ("all" reads a per-layer list whose width grows)."""
        if self.config.node_head_input != "last" or not 0 < layers < len(self.layers):
            raise ConfigError(f"model: can grow a model of {layers} layers to {len(self.layers)} only with more layers "
                              f"than it had and node_head_input 'last' (got {self.config.node_head_input!r})")
        added = tuple(f"layers.{i}." for i in range(layers, len(self.layers)))
        own = self.state_dict()
        wrong = sorted((set(own) ^ set(state)) - {k for k in own if k.startswith(added)})
        wrong += [k for k in state if k in own and state[k].shape != own[k].shape]
        if wrong:
            raise ConfigError(f"model: the checkpoint's weights do not fit this model with {layers} of its layers "
                              f"(e.g. {wrong[:3]}); grow only a checkpoint of the same model section but layers")
        self.load_state_dict(state, strict=False)
        for layer in self.layers[layers:]:
            layer.make_identity_()

    @property
    def basis(self) -> OrbitalBasis:
        return self.config.basis

    def embed(self, species, src, dst, edge_vec, chunks=None):
        """Initial node and edge embeddings ([N|E, (lmax+1)^2, C], only the L = 0 row non-zero) and
        (rbf, envelope). With `chunks` (inference) the edge embedding is filled range by range and
        rbf/envelope are not kept (returned as None): no [E, num_rbf] temporary."""
        K, C = (self.config.lmax + 1) ** 2, self.config.channels
        x = torch.nn.functional.pad(self.node_embed(species).unsqueeze(1), (0, 0, 0, K - 1))

        def e0_of(a, b):
            dist = edge_vec[a:b].norm(dim=-1)
            rbf = self.rbf(dist)
            envelope = cosine_envelope(dist, self.config.r_cut)
            e0 = (self.edge_radial(rbf) + self.edge_src_embed(species.index_select(0, src[a:b]))
                  + self.edge_dst_embed(species.index_select(0, dst[a:b]))) * envelope.unsqueeze(-1)
            return e0, rbf, envelope

        if chunks is None:
            e0, rbf, envelope = e0_of(0, len(src))
            return x, torch.nn.functional.pad(e0.unsqueeze(1), (0, 0, 0, K - 1)), rbf, envelope
        e = x.new_zeros((len(src), K, C))
        for a, b in chunks:
            e[a:b, 0] = e0_of(a, b)[0]
        return x, e, None, None

    def forward(self, species: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, edge_vec: torch.Tensor,
                exchange=None, edge_chunk: int | None = None):
        """species [N] int (index into basis.elements), src/dst [E] int (edges sorted by dst),
        edge_vec [E, 3] = x_src + R·cell − x_dst. Returns (node_out [N, (L+1)^2, Cn],
        edge_out [E, (L+1)^2, Ce]). `exchange(x)` refreshes halo rows (distributed runs).

        `edge_chunk` (inference only): build messages for about this many edges at a time, so memory
        holds the node and edge embeddings but no per-edge intermediates of the whole graph (see
        `encode` / `decode` for outputs streamed chunk by chunk)."""
        self._check(species, src, dst, edge_vec)
        if edge_chunk and not torch.is_grad_enabled():
            enc = self.encode(species, src, dst, edge_vec, edge_chunk, exchange)
            parts = list(self.decode(enc))
            return torch.cat([p.node for p in parts]), torch.cat([p.edge for p in parts])
        exchange = exchange or (lambda t: t)
        x, e, rbf, envelope = self.embed(species, src, dst, edge_vec)
        seen = []  # node embeddings after each layer but the last, for node_head_input "all"
        D = self.rotation.wigner(edge_vec)
        for layer in self.layers:
            seen.append(x)
            x, e = layer(x, e, src, dst, self.rotation, D, rbf, envelope, exchange)
        xn = self.node_norm(x)
        z = self._edge_input(e, exchange(xn), src, dst)
        node = self._node_out(xn, seen)
        node = self._node_stats(self._add_onsite(node, z, dst, envelope), species)
        edge = self._edge_out(z, rbf)
        if self.reference is None:
            return node, edge
        node_ref, edge_ref = self.reference(species, src, dst, edge_vec)
        return node + node_ref.to(node.dtype), edge + edge_ref.to(edge.dtype)

    @torch.no_grad()
    def encode(self, species, src, dst, edge_vec, edge_chunk: int, exchange=None, progress=None) -> "Encoded":
        """Inference through every layer, `edge_chunk` edges at a time (destination-aligned ranges):
        the final embeddings the output heads read. `progress(n)` is called after each chunk."""
        exchange = exchange or (lambda t: t)
        chunks = edge_chunks(dst, edge_chunk)
        x, e, _, _ = self.embed(species, src, dst, edge_vec, chunks)
        seen = []
        for layer in self.layers:
            seen.append(x)
            x, e = layer.forward_chunked(x, e, src, dst, self.rotation, chunks,
                                         lambda a, b: self.edge_features(edge_vec[a:b]), exchange, progress)
        xn = self.node_norm(x)
        return Encoded(species, src, dst, edge_vec, chunks, e, xn, exchange(xn), seen)

    @torch.no_grad()
    def decode(self, enc: "Encoded"):
        """Outputs chunk by chunk: each `OutputChunk` completes the rows of the atoms lo..hi-1 (the
        destinations of its edges, plus atoms without incoming edges before them): their node
        outputs and the outputs of all their incoming edges."""
        N = len(enc.species)
        lo = 0
        chunks = enc.chunks or [(0, 0)]
        for k, (a, b) in enumerate(chunks):
            hi = N if k == len(chunks) - 1 else int(enc.dst[b - 1]) + 1
            src, dst, vec = enc.src[a:b], enc.dst[a:b], enc.edge_vec[a:b]
            z = self._edge_input(enc.e[a:b], enc.xe, src, dst)  # read by the edge head and the onsite sum
            dist = vec.norm(dim=-1)
            edge = self._edge_out(z, self.rbf(dist))
            node = self._node_out(enc.xn[lo:hi], [s[lo:hi] for s in enc.seen])
            if self.onsite_head is not None:
                node = self._add_onsite(node, z, dst - lo, cosine_envelope(dist, self.config.r_cut))
            node = self._node_stats(node, enc.species[lo:hi])
            if self.reference is not None:
                node_ref, edge_ref = self.reference(enc.species, src, dst, vec, nodes=(lo, hi))
                node, edge = node + node_ref.to(node.dtype), edge + edge_ref.to(edge.dtype)
            yield OutputChunk(lo, hi, node, a, b, edge)
            lo = hi

    @torch.no_grad()
    def edge_outputs(self, enc: "Encoded", a, b=None):
        """Coupled outputs of the edges a:b (or of the edge index tensor `a`)."""
        idx = slice(a, b) if b is not None else a
        e, src, dst, vec = enc.e[idx], enc.src[idx], enc.dst[idx], enc.edge_vec[idx]
        edge = self._edge_out(self._edge_input(e, enc.xe, src, dst), self.rbf(vec.norm(dim=-1)))
        if self.reference is None:
            return edge
        return edge + self.reference.edge(enc.species, src, dst, vec).to(edge.dtype)

    def _node_out(self, xn, seen):
        """The node head on the final normalised embedding (and, for node_head_input "all", on the
        normalised embeddings after the initial embedding and every layer but the last)."""
        if self.layer_norms is None:
            return self.node_head(xn)
        return self.node_head(torch.cat([norm(x) for norm, x in zip(self.layer_norms, seen)] + [xn], dim=-1))

    def _add_onsite(self, node, z, dst, envelope):
        """node + Σ over incoming edges of the onsite head (onsite "node+edges"; dst-local, so a
        rank's own edges give its own atoms' sums)."""
        if self.onsite_head is None:
            return node
        part = self.onsite_head(z) * (envelope * ONSITE_EDGE_NORM).view(-1, 1, 1).to(z.dtype)
        if torch.is_grad_enabled():
            return node.index_add(0, dst, part.to(node.dtype))
        return node.index_add_(0, dst, part.to(node.dtype))

    def edge_features(self, edge_vec):
        """(Wigner-D blocks, radial basis, envelope) of a set of edges."""
        dist = edge_vec.norm(dim=-1)
        return self.rotation.wigner(edge_vec), self.rbf(dist), cosine_envelope(dist, self.config.r_cut)

    def _edge_input(self, e, xe, src, dst):
        """[normalised edge embedding | x_src | x_dst], what the edge (and onsite) heads read."""
        return torch.cat([self.edge_norm(e), xe.index_select(0, src), xe.index_select(0, dst)], -1)

    def _edge_out(self, z, rbf):
        edge = self.edge_head(z)
        scale = torch.exp(self.edge_log_scale(rbf)).unsqueeze(1) * self.edge_scale[self.row_L]
        return edge * scale.to(edge.dtype)

    def _node_stats(self, node, species):
        node = node * self.node_scale[self.row_L].to(node.dtype)
        shift = self.node_shift.index_select(0, species).to(node.dtype)
        return torch.cat([node[:, :1] + shift.unsqueeze(1), node[:, 1:]], dim=1)

    def _check(self, species, src, dst, edge_vec):
        if edge_vec.shape != (len(src), 3) or len(src) != len(dst):
            raise InputError(f"model: src {tuple(src.shape)}, dst {tuple(dst.shape)} and edge_vec "
                             f"{tuple(edge_vec.shape)} must describe the same edges ([E], [E], [E, 3])")
        if len(species) and (int(species.min()) < 0 or int(species.max()) >= self.num_species):
            raise InputError(f"model: species ids must lie in [0, {self.num_species}) "
                             f"(elements {self.basis.elements})")
