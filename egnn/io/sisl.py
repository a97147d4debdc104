"""Predicted H(R) and S(R) -> sisl's Hamiltonian, and through sisl TBtrans' .TSHS file.

sisl (PyPI; optional: `pip install 'egnn[sisl]'`) stores a periodic tight-binding matrix as a
Geometry (atoms with their orbitals, a Lattice with nsc supercells per direction) and sparse
matrices of shape [no, no·n_s] whose column block isc couples to the orbitals of supercell offset
lattice.sc_off[isc]. egnn's block (i, j) of image R couples atom i with atom j at x_j + R·cell: the
same convention, so the image R of H goes to the column block of offset R unchanged. The matrices
given here are in CP2K's orbital order (the order egnn's files use); each sisl orbital carries its
shell's l and m (m = −l..l, CP2K's real harmonics), H in eV, lengths in Å.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

__all__ = ["to_sisl", "write_tshs"]


def _sisl():
    try:
        import sisl
    except ImportError:
        raise InputError("the sisl format needs sisl: pip install 'egnn[sisl]' (or pip install sisl)") from None
    return sisl


def _atom(sisl, z, shells):
    orbs = []
    seen: dict = {}
    for l in shells:
        seen[l] = seen.get(l, 0) + 1
        orbs += [sisl.AtomicOrbital(n=l + 1, l=l, m=m, zeta=seen[l]) for m in range(-l, l + 1)]
    return sisl.Atom(int(z), orbitals=orbs)


def to_sisl(atoms, basis, HR: dict, SR: dict):
    """sisl.Hamiltonian (non-orthogonal) of {shift: csr} H (eV) and S in CP2K's orbital order."""
    sisl = _sisl()
    numbers = atoms.get_atomic_numbers()
    n = int(basis.orbital_offsets(numbers)[-1])
    shifts = np.array(sorted(set(HR) | set(SR)), dtype=np.int64).reshape(-1, 3)
    pbc = atoms.get_pbc()
    if (np.abs(shifts[:, ~pbc]) > 0).any():
        raise InputError("sisl: images along a non-periodic axis; check the cell and pbc")
    nsc = [2 * int(np.abs(shifts[:, d]).max()) + 1 if len(shifts) else 1 for d in range(3)]
    kinds = {int(z): _atom(sisl, z, basis.shells[basis._symbol(int(z))]) for z in np.unique(numbers)}
    cell = np.array(atoms.get_cell(), dtype=np.float64)
    pos = atoms.get_positions()
    for d in np.flatnonzero(~pbc):  # an open axis: a box 20 Å beyond the atoms' extent (sisl needs a lattice)
        e = np.eye(3)[d]
        if np.linalg.norm(cell[d]) > 1e-9:
            e = cell[d] / np.linalg.norm(cell[d])
        cell[d] = e * (np.ptp(pos @ e) + 20.0)
    geom = sisl.Geometry(pos, atoms=[kinds[int(z)] for z in numbers], lattice=sisl.Lattice(cell, nsc=nsc))
    if geom.no != n:
        raise InputError(f"sisl: the geometry has {geom.no} orbitals but the matrices {n}")

    def big(MR):
        rows, cols, vals = [], [], []
        for R, M in MR.items():
            isc = int(geom.lattice.sc_index(np.asarray(R)))
            C = M.tocoo()
            rows.append(C.row)
            cols.append(C.col + isc * n)
            vals.append(C.data)
        r, c, v = (np.concatenate(x) for x in (rows, cols, vals))
        return sp.csr_matrix((v, (r, c)), shape=(n, n * geom.n_s))

    return sisl.Hamiltonian.fromsp(geom, [big(HR)], S=big(SR))


def write_tshs(path: str, atoms, basis, HR: dict, SR: dict) -> str:
    """TBtrans' .TSHS (H and S) through sisl."""
    to_sisl(atoms, basis, HR, SR).write(path)
    return path
