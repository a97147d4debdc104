"""Readers and writers of DFT matrices: `egnn.io.cp2k` (run folders, .csr files) and
`egnn.io.pyscf` (overlaps of any structure, Fock/overlap from a calculation or an npz).

Every reader returns a `Structure`: ase.Atoms, the OrbitalBasis, and H(R), S(R) as
{integer shift (a, b, c): scipy.sparse.csr_matrix} in eV (S unitless) in the internal e3nn
orbital basis, with M[i, j](R) = <φ_i(r − x_i)|M|φ_j(r − x_j − R·cell)> for the positions x of
`atoms` — the graph convention: edge (src j, dst i, shift R) holds block M[i, j](R).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Structure", "read_run", "read_csr", "write_csr", "read_input", "parse_tile", "tile"]


@dataclass
class Structure:
    atoms: object  # ase.Atoms
    basis: object  # egnn.basis.OrbitalBasis
    H: dict | None  # {shift: csr} eV
    S: dict | None  # {shift: csr}
    gamma_only: bool  # True: H[(0,0,0)] is the Γ matrix, i.e. the sum over all images
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_orbitals(self) -> int:
        return int(self.basis.orbital_offsets(self.atoms.get_atomic_numbers())[-1])

    @property
    def mode(self) -> str:
        return "gamma" if self.gamma_only else "real_space"

    def gamma(self, which: str = "H"):
        """M(k=Γ) = Σ_R M(R) (for a Γ-only structure, its one matrix)."""
        from ..blocks import gamma

        return gamma(getattr(self, which))


from .cp2k import read_csr, read_run, write_csr  # noqa: E402
from .structure import parse_tile, read_input, tile  # noqa: E402
