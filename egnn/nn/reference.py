"""A linear two-centre reference Hamiltonian, fitted in closed form, that the network corrects.

Why. Onsite (node) blocks of an oxide vary by eV with the environment (O 2s/2p by ~1 eV σ at
σ_disp = 0.1 Å, ~2.5 eV at 0.22 Å) and short bonds (< 2 Å) carry the largest hoppings. A network that
learns them from tens of structures interpolates well but extrapolates badly to shorter distances
and larger distortions than it saw. Most of both is two-centre physics with smooth, monotone
distance dependence:

* hopping (edge k = (s -> d, R)):  H[d, s](R) in coupled form ≈ Σ_L f^L_{ab,c}(r) · Y_LM(r̂)
  (a two-centre integral is cylindrically symmetric about the bond, so only M = 0 survives in the
  bond frame: Slater-Koster in the coupled basis);
* onsite (node i):  H[i, i] ≈ ε_{a,c} + Σ_{j -> i} g^L_{a b_j,c}(r_ij) · Y_LM(r̂_ij)
  (the crystal-field / neighbour-potential expansion),

with f, g linear in K exponentials exp(-α_k (r − r0)) · envelope(r) (α log-spaced over 0.5-4 Å⁻¹):
monotone features extrapolate physically to shorter bonds, unlike Gaussian RBFs with no data
there. The weights are the ridge least-squares solution on the training targets
(`fit_reference`, called by the trainer's output statistics); the network then predicts only the
residual. Equivariant by construction (the Y_LM are egnn.so3's, the embedding basis), local to the
destination atom (the distributed incoming-edge scheme needs nothing more), and per edge it holds
only [(L+1)·C] coefficients.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..so3 import spherical_harmonics
from .radial import cosine_envelope

__all__ = ["TwoCentreReference", "fit_reference"]

R0 = 2.0  # Å: the exponentials are 1 at a typical bond length (keeps the normal equations scaled)
ALPHA_RANGE = (0.5, 4.0)  # Å⁻¹: decay lengths 0.25-2 Å


class TwoCentreReference(nn.Module):
    """node_ref [N, (L+1)², Cn], edge_ref [E, (L+1)², Ce] from species and edge vectors."""

    def __init__(self, num_species: int, L_max: int, node_width: int, edge_width: int, r_cut: float,
                 num_radial: int = 8):
        super().__init__()
        self.num_species, self.L_max, self.r_cut, self.num_radial = num_species, L_max, float(r_cut), num_radial
        S, L1, K = num_species, L_max + 1, num_radial
        self.register_buffer("alpha", torch.tensor(np.geomspace(*ALPHA_RANGE, K)), persistent=False)
        # weights [pair = a·S + b, K, (L+1)·C]; pair (dst species, src species)
        self.register_buffer("edge_weight", torch.zeros(S * S, K, L1 * edge_width))
        self.register_buffer("node_weight", torch.zeros(S * S, K, L1 * node_width))
        self.register_buffer("node_bias", torch.zeros(S, node_width))
        # shortest distance per species pair in the fitted data: shorter bonds use the features at
        # that distance (a linear fit must not extrapolate its exponentials, see fit_reference)
        self.register_buffer("r_min", torch.zeros(S * S))
        self.register_buffer("row_L", torch.tensor([l for l in range(L1) for _ in range(2 * l + 1)]),
                             persistent=False)

    def features(self, edge_vec: torch.Tensor, pair: torch.Tensor | None = None):
        """(Y [E, (L+1)²], φ [E, K]) of edge vectors; with the species `pair` of each edge, φ is
        held constant below the pair's shortest fitted distance."""
        r = edge_vec.norm(dim=-1)
        Y = spherical_harmonics(edge_vec, self.L_max)
        if pair is not None:
            r = torch.maximum(r, self.r_min.to(r.dtype).index_select(0, pair))
        phi = torch.exp(-self.alpha.to(r.dtype) * (r.unsqueeze(-1) - R0)) * cosine_envelope(r, self.r_cut).unsqueeze(-1)
        return Y, phi

    def _expand(self, weight, pair, phi, Y):
        """Σ_k φ_k W[pair, k, (L, c)] · Y_LM -> [E, (L+1)², C], one GEMM per species pair present."""
        L1 = self.L_max + 1
        C = weight.shape[-1] // L1
        coef = phi.new_zeros(len(phi), L1 * C)
        for p in torch.unique(pair).tolist():
            idx = torch.nonzero(pair == p).flatten()
            coef.index_copy_(0, idx, phi.index_select(0, idx) @ weight[p].to(phi.dtype))
        return coef.view(-1, L1, C).index_select(1, self.row_L) * Y.unsqueeze(-1)

    def forward(self, species, src, dst, edge_vec, with_bias: bool = True, nodes: tuple | None = None):
        """(node_ref, edge_ref [E]). Edges s -> d with vector x_s + R·cell − x_d; node i sums over its
        incoming edges (all of a rank's own atoms' edges are local in the distributed scheme).
        node_ref covers every atom [N], or the atoms lo..hi-1 of `nodes=(lo, hi)` when every dst lies
        there (one output chunk). `with_bias=False` leaves out the per-species constant (for all but
        the first of several edge ranges of the same atoms)."""
        pair, Y, phi = self._edge_features(species, src, dst, edge_vec)
        lo, hi = nodes or (0, len(species))
        node = phi.new_zeros((hi - lo,) + Y.shape[1:] + (self.node_bias.shape[1],))
        node.index_add_(0, dst - lo, self._expand(self.node_weight, pair, phi, Y))
        if with_bias:
            node[:, 0] += self.node_bias.index_select(0, species[lo:hi]).to(node.dtype)
        return node, self._expand(self.edge_weight, pair, phi, Y)

    def edge(self, species, src, dst, edge_vec):
        """edge_ref [E] alone (any edges, e.g. the reverse edges of a prediction)."""
        pair, Y, phi = self._edge_features(species, src, dst, edge_vec)
        return self._expand(self.edge_weight, pair, phi, Y)

    def _edge_features(self, species, src, dst, edge_vec):
        """(species pair [E], Y, φ) of the edges s -> d."""
        pair = species.index_select(0, dst) * self.num_species + species.index_select(0, src)
        return (pair, *self.features(edge_vec, pair))

    def extra_repr(self) -> str:
        return f"species={self.num_species}, L_max={self.L_max}, radial={self.num_radial}, r_cut={self.r_cut}"


@torch.no_grad()
def fit_reference(ref: TwoCentreReference, samples, ridge: float = 1e-5) -> dict:
    """Ridge least squares of the reference weights on real-space training samples (objects with
    species, src, dst, edge_vec, node_target/mask, edge_target/mask [E, (L+1)², C]; Γ-folded samples
    are skipped: their targets mix images). Every (species pair, L, channel) is one small problem
    over K features (K·S + 1 for onsite L = 0); `ridge` is relative to the mean diagonal of the
    normal matrix (features are scaled to a unit diagonal first), so it does not depend on units.
    Returns {"structures": number of samples used}."""
    S, L1, K = ref.num_species, ref.L_max + 1, ref.num_radial
    Cn, Ce = ref.node_bias.shape[1], ref.edge_weight.shape[-1] // L1
    row_L = ref.row_L
    f64 = torch.float64
    # normal equations: edge [P, L1, Ce, K, K]; node [S, L1, Cn, S·K+1, S·K+1] (last column: bias)
    Ge, be = torch.zeros(S * S, L1, Ce, K, K, dtype=f64), torch.zeros(S * S, L1, Ce, K, dtype=f64)
    F = S * K + 1
    Gn, bn = torch.zeros(S, L1, Cn, F, F, dtype=f64), torch.zeros(S, L1, Cn, F, dtype=f64)
    real = [s for s in samples if getattr(s, "fold", None) is None]
    if not real:
        return {"structures": 0}
    r_min = torch.full((S * S,), math.inf, dtype=f64)
    for s in real:
        pair = s.species.long()[s.dst.long()] * S + s.species.long()[s.src.long()]
        r_min.scatter_reduce_(0, pair, s.edge_vec.to(f64).norm(dim=-1), "amin")
    ref.r_min.copy_(torch.where(torch.isfinite(r_min), r_min, torch.zeros_like(r_min)))
    for s in real:
        species, src, dst = s.species.long(), s.src.long(), s.dst.long()
        pair = species[dst] * S + species[src]
        Y, phi = ref.features(s.edge_vec.to(f64), pair)
        # edges: rows of (L, M) share the weights of L
        m, t = s.edge_mask.to(f64), s.edge_target.to(f64)
        yy = _per_L(m * Y.square().unsqueeze(-1), row_L, L1)  # [E, L1, Ce]
        yt = _per_L(m * t * Y.unsqueeze(-1), row_L, L1)
        for p in torch.unique(pair).tolist():
            i = pair == p
            Ge[p] += torch.einsum("elc,ek,ej->lckj", yy[i], phi[i], phi[i])
            be[p] += torch.einsum("elc,ek->lck", yt[i], phi[i])
        # nodes: features Σ_{j -> i} φ_k(r_ij) Y(r̂_ij), one block of K per neighbour species, and 1
        N = len(species)
        feat = torch.zeros(N, Y.shape[1], F, dtype=f64)
        for b in range(S):
            i = species[src] == b
            feat[:, :, b * K:(b + 1) * K].index_add_(0, dst[i], Y[i].unsqueeze(-1) * phi[i].unsqueeze(1))
        feat[:, 0, -1] = 1.0
        m, t = s.node_mask.to(f64), s.node_target.to(f64)
        for a in range(S):
            i = species == a
            if not i.any():
                continue
            fa = feat[i]  # [Na, rows, F]
            Gn[a] += _per_L_outer(fa, m[i], row_L, L1)
            bn[a] += _rows_to_L(torch.einsum("nrc,nrf->rcf", m[i] * t[i], fa), row_L, L1)
    ew = _solve(Ge, be, ridge)  # [P, L1, Ce, K]
    nw = _solve(Gn, bn, ridge)  # [S, L1, Cn, F]
    ref.edge_weight.copy_(ew.permute(0, 3, 1, 2).reshape(S * S, K, L1 * Ce))
    # node weights per (centre a, neighbour b): [a·S + b, K, L1·Cn]
    nwk = nw[..., :S * K].reshape(S, L1, Cn, S, K).permute(0, 3, 4, 1, 2).reshape(S * S, K, L1 * Cn)
    ref.node_weight.copy_(nwk)
    ref.node_bias.copy_(nw[:, 0, :, -1])
    return {"structures": len(real)}


def _per_L(x, row_L, L1):
    """Sum the M rows of each L: [E, (L+1)², C] -> [E, L+1, C]."""
    return x.new_zeros(x.shape[0], L1, x.shape[2]).index_add_(1, row_L, x)


def _rows_to_L(x, row_L, L1):
    """Sum the M rows of each L on the leading dim: [(L+1)², ...] -> [L+1, ...]."""
    return x.new_zeros((L1,) + x.shape[1:]).index_add_(0, row_L, x)


def _per_L_outer(feat, mask, row_L, L1):
    """Σ_n Σ_{M in L} mask[n, LM, c] f[n, LM, :] f[n, LM, :]ᵀ -> [L+1, C, F, F]."""
    return _rows_to_L(torch.einsum("nrc,nrf,nrg->rcfg", mask, feat, feat), row_L, L1)


def _solve(G, b, ridge):
    """Batched ridge solve of G w = b over the leading dims; all-zero problems (channels a species
    pair does not have) give w = 0."""
    d = G.diagonal(dim1=-2, dim2=-1)
    # unit-diagonal scaling: one relative ridge fits features of any magnitude; unused features
    # (a neighbour species or channel that never occurs) keep a zero row and get weight 0
    cs = torch.where(d > 0, d.sqrt(), torch.ones_like(d))
    Gs = G / (cs.unsqueeze(-1) * cs.unsqueeze(-2))
    eye = torch.eye(G.shape[-1], dtype=G.dtype)
    return torch.linalg.solve(Gs + ridge * eye, (b / cs).unsqueeze(-1)).squeeze(-1) / cs
