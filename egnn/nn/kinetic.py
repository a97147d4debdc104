"""The exact kinetic-energy blocks T of the orbital basis, added to the prediction (H = T + V).

Why. The kinetic matrix depends on the basis and the geometry alone, so the network need not learn
it: with `model.reference: two_centre+kinetic` the reference and the network predict V = H − T.
It matters most where S is nearly singular (DZVP: smallest eigenvalue of S(Γ) ~4e-3): along such a
direction u a level sits at uᵀHu / uᵀSu ≈ +45 eV, and that is almost all kinetic energy
(uᵀTu / uᵀSu ≈ 50 eV on held-out GeTe cells), while a bounded potential gives |uᵀVu| ≤ max|V|·uᵀSu.
A learned T errs along u by far more than uᵀSu allows, and the level falls into the gap (a "ghost
level", egnn.evaluate.ghost_levels); an exact T cannot.

How. A two-centre integral is cylindrically symmetric about the bond, so in the coupled basis the
block of edge s -> d is Σ_L t^L_{ab,c}(r) · Y_LM(r̂) exactly (only M = 0 survives in the bond frame:
Slater-Koster, as in egnn.nn.reference). `tabulate` fills t from PySCF's analytic integrals
(int1e_kin; its S agrees with CP2K's to 1e-6) on a 0.02 Å grid, and `edge` interpolates it with
4-point Lagrange cubics (< 0.01 meV from the analytic values). The onsite block is the atom's own
T(R = 0), a constant per species. The tables are buffers (~0.5 MB for two species in DZVP): a
checkpoint carries them, and prediction needs no PySCF.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..so3 import spherical_harmonics

__all__ = ["KineticTable", "tabulate"]

STEP = 0.02  # Å between table points
R_LO = 0.3  # Å: the table starts here; shorter edges are refused (no bond is that short)


class KineticTable(nn.Module):
    """node_T [N, (L+1)², Cn] and edge_T [E, (L+1)², Ce] of the basis, from species and edge vectors."""

    def __init__(self, num_species: int, L_max: int, node_width: int, edge_width: int, r_cut: float):
        super().__init__()
        S, L1 = num_species, L_max + 1
        self.num_species, self.L_max, self.r_cut = S, L_max, float(r_cut)
        n = int(math.ceil((r_cut - R_LO) / STEP)) + 4  # one point below R_LO, two beyond r_cut
        self.register_buffer("table", torch.zeros(S * S, n, L1 * edge_width))  # [pair, r, (L, c)]
        self.register_buffer("onsite", torch.zeros(S, L1 * L1, node_width))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("row_L", torch.tensor([l for l in range(L1) for _ in range(2 * l + 1)]),
                             persistent=False)

    def node(self, species: torch.Tensor) -> torch.Tensor:
        return self.onsite.index_select(0, species)

    def edge(self, species, src, dst, edge_vec) -> torch.Tensor:
        """Σ_L t^L(r) Y_LM(r̂) per edge, t interpolated by 4-point Lagrange cubics."""
        r = edge_vec.norm(dim=-1)
        if len(r) and float(r.min()) < R_LO:
            raise InputError(f"an edge of {float(r.min()):.3f} Å is shorter than the kinetic table's {R_LO} Å; "
                             "two atoms sit on top of each other")
        n, F = self.table.shape[1], self.table.shape[2]
        u = (r - (R_LO - STEP)) / STEP  # table point k sits at R_LO + (k − 1)·STEP
        i = u.floor().clamp(1, n - 3)
        x = (u - i).unsqueeze(-1)  # in [0, 1) between points i and i + 1
        w = torch.cat([-x * (x - 1) * (x - 2) / 6, (x + 1) * (x - 1) * (x - 2) / 2,
                       -(x + 1) * x * (x - 2) / 2, (x + 1) * x * (x - 1) / 6], dim=-1)
        pair = species.index_select(0, dst) * self.num_species + species.index_select(0, src)
        rows = (pair * n + i.long() - 1).unsqueeze(-1) + torch.arange(4, device=r.device)
        t = self.table.view(-1, F).to(r.dtype).index_select(0, rows.flatten()).view(-1, 4, F)
        coef = torch.einsum("ek,ekf->ef", w, t).view(len(r), self.L_max + 1, -1)
        return coef.index_select(1, self.row_L) * spherical_harmonics(edge_vec, self.L_max).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"species={self.num_species}, L_max={self.L_max}, r_cut={self.r_cut}, step={STEP}"


@torch.no_grad()
def tabulate(table: KineticTable, basis, pyscf_basis: str | None = None) -> str:
    """Fill `table` for `basis` (an egnn.basis.OrbitalBasis whose name is a CP2K MOLOPT basis, or
    `pyscf_basis` given) from PySCF's analytic kinetic integrals; returns the PySCF basis name.
    Every species pair is one two-atom molecule per grid point, the second atom on the polar (y)
    axis, where only the M = 0 row of each L is non-zero."""
    from ase.data import atomic_numbers

    from .. import blocks as B
    from ..basis import OrbitalBasis
    from ..io.cp2k import HARTREE_EV
    from ..io.pyscf import _load_basis, _pyscf, check_overlap_basis

    gto, _ = _pyscf()
    name = check_overlap_basis(basis, basis.elements, pyscf_basis, "model.reference two_centre+kinetic",
                               "the kinetic table needs the basis under its PySCF name")
    bas = _load_basis(name, basis.elements)
    L1 = table.L_max + 1
    Ce, Cn = table.table.shape[2] // L1, table.onsite.shape[2]
    mid = [L * L + L for L in range(L1)]
    Y = spherical_harmonics(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), table.L_max)[mid].numpy()
    grid = R_LO + STEP * (np.arange(table.table.shape[1]) - 1)
    out = np.zeros(table.table.shape)
    for ia, a in enumerate(basis.elements):
        for ib, b in enumerate(basis.elements):
            za, zb = atomic_numbers[a], atomic_numbers[b]
            for k, r in enumerate(grid):
                mol = gto.M(atom=[[a, (0.0, 0.0, 0.0)], [b, (0.0, float(r), 0.0)]], basis={a: bas[a], b: bas[b]},
                            unit="Angstrom", spin=(za + zb) % 2, verbose=0)
                P = OrbitalBasis.from_pyscf(mol, name=name).transform(np.array([za, zb]), "pyscf")
                T = P @ mol.intor("int1e_kin") @ P.T * HARTREE_EV
                na = basis.n_orbitals(a)
                c = B.to_coupled(T[None, :na, na:], a, b, basis, Ce)[0][0]  # [(L+1)², Ce]
                out[ia * len(basis.elements) + ib, k] = (c[mid] / Y[:, None]).ravel()
        mol = gto.M(atom=[[a, (0.0, 0.0, 0.0)]], basis={a: bas[a]}, unit="Angstrom", spin=atomic_numbers[a] % 2,
                    verbose=0)
        P = OrbitalBasis.from_pyscf(mol, name=name).transform(np.array([atomic_numbers[a]]), "pyscf")
        T = P @ mol.intor("int1e_kin") @ P.T * HARTREE_EV
        table.onsite[ia] = torch.from_numpy(B.to_coupled(T[None], a, a, basis, Cn)[0][0])
    table.table.copy_(torch.from_numpy(out))
    table.filled.fill_(True)
    return name
