"""PySCF in: the exact overlap S(R) of any structure (analytic, no SCF), and H (Fock) / S from a
PySCF calculation or from an npz that holds them. PySCF is an optional extra (`pip install
egnn[pyscf]`); it is imported only when a function here runs.

* `overlap(atoms, basis="gth-szv-molopt-sr", r_cut=None)` -> {shift: csr} in the internal basis:
  S[i, j](R) = <φ_i(r − x_i)|φ_j(r − x_j − R·cell)> for every atom pair within r_cut (default: the
  basis range, where the most diffuse primitives overlap to 1e-10).
* `read_calculation(mf)` -> egnn.io.Structure with H = Fock (eV) and S of a molecular or Γ-point
  periodic PySCF calculation (periodic Γ matrices are image sums: gamma_only=True).
* `save_npz(path, mf)` / `read_npz(path)`: the same through a file (keys: numbers, positions [Å],
  cell [Å], pbc, basis (PySCF name), H [Hartree], S, all in PySCF's AO order).
"""
from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from ..errors import InputError
from .cp2k import HARTREE_EV

__all__ = ["overlap", "overlap_gamma", "read_calculation", "read_npz", "save_npz", "make_cell"]

_BOHR = 0.529177210903


def _pyscf():
    try:
        import pyscf  # noqa: F401
        from pyscf import gto
        from pyscf.pbc import gto as pgto
    except ImportError:
        raise InputError("PySCF is not installed: `pip install egnn[pyscf]` (or pyscf>=2.4) to compute "
                         "overlaps and read PySCF calculations") from None
    return gto, pgto


def _load_basis(name: str, elements):
    gto, pgto = _pyscf()
    out = {}
    for el in elements:
        try:
            out[el] = pgto.basis.load(name, el) if name.lower().startswith("gth") else gto.basis.load(name, el)
        except Exception as exc:  # PySCF raises several types for unknown names
            raise InputError(f"PySCF basis {name!r} has no entry for element {el} ({type(exc).__name__}); "
                             "use e.g. 'gth-szv-molopt-sr' or 'gth-dzvp-molopt-sr'") from None
    return out


def make_cell(atoms, basis: str = "gth-szv-molopt-sr"):
    """A pyscf.pbc Cell (periodic) or Mole of an ase.Atoms, in Å, without pseudopotential."""
    gto, pgto = _pyscf()
    els = sorted(set(atoms.get_chemical_symbols()))
    bas = _load_basis(basis, els)
    atom = [[s, p] for s, p in zip(atoms.get_chemical_symbols(), atoms.get_positions())]
    if atoms.get_pbc().any():
        c = pgto.Cell(atom=atom, a=np.asarray(atoms.get_cell()), basis=bas, unit="Angstrom", verbose=0)
        c.basis_name = basis
        c.build(dump_input=False, parse_arg=False)
        return c
    return gto.M(atom=atom, basis=bas, unit="Angstrom", verbose=0)


def _basis_range(mol) -> float:
    """Distance (Å) beyond which two atoms' functions overlap below ~1e-10: from the smallest
    exponent α, a Gaussian pair decays as exp(−α d²/2)."""
    amin = min(mol.bas_exp(ib).min() for ib in range(mol.nbas))
    return float(np.sqrt(2 * np.log(1e10) / amin)) * _BOHR


def overlap(atoms, basis: str = "gth-szv-molopt-sr", r_cut: float | None = None) -> dict:
    """S(R) of `atoms` in the internal basis, one analytic integral call over all images in range."""
    from ..basis import OrbitalBasis
    from ..graph import check_structure

    gto, _ = _pyscf()
    check_structure(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc(), "overlap")
    mol = make_cell(atoms, basis)
    ob = OrbitalBasis.from_pyscf(mol, name=basis)
    numbers = atoms.get_atomic_numbers()
    T = ob.transform(numbers, "pyscf")
    n = T.shape[0]
    rc = _basis_range(mol) if r_cut is None else float(r_cut)
    pos = atoms.get_positions()
    cell = atoms.get_cell().array
    pbc = atoms.get_pbc()
    shifts = [np.zeros(3, np.int64)]
    if pbc.any():
        from ..graph import radius_graph
        g = radius_graph(atoms, rc)
        shifts = np.unique(g.shift, axis=0)
        shifts = np.concatenate([np.zeros((1, 3), np.int64), shifts[shifts.any(axis=1)]])  # home first
    # one molecule: the home cell plus every image in range; S(R) = columns of image R
    syms = atoms.get_chemical_symbols()
    atom = [[s, p + R @ cell] for R in shifts for s, p in zip(syms, pos)]
    big = gto.M(atom=atom, basis=_load_basis(basis, set(syms)), unit="Angstrom", verbose=0)
    nsh = mol.nbas
    S = big.intor("int1e_ovlp", shls_slice=(0, nsh, 0, big.nbas))
    out = {}
    for k, R in enumerate(shifts):
        blk = S[:, k * n:(k + 1) * n]
        if pbc.any():  # keep only atom pairs within range (the graph's notion of "stored")
            d = np.linalg.norm(pos[None, :, :] + R @ cell - pos[:, None, :], axis=-1)
            far = d > rc
            if far.all():
                continue
            offs = ob.orbital_offsets(numbers)
            mask = np.repeat(np.repeat(~far, np.diff(offs), axis=0), np.diff(offs), axis=1)
            blk = np.where(mask, blk, 0.0)
        out[tuple(int(x) for x in R)] = sp.csr_matrix(T @ blk @ T.T)
    return out


def overlap_gamma(atoms, basis: str = "gth-szv-molopt-sr", r_cut: float | None = None):
    """S(k=Γ) = Σ_R S(R) in the internal basis."""
    return sum(overlap(atoms, basis, r_cut).values()).tocsr()


def read_calculation(mf, basis_name: str | None = None):
    """H = Fock and S of a converged PySCF SCF object (molecular, or periodic at Γ) as a Structure."""
    from ase import Atoms

    from ..basis import OrbitalBasis

    _pyscf()
    mol = mf.mol if hasattr(mf, "mol") else mf.cell
    F = np.asarray(mf.get_fock())
    S = np.asarray(mf.get_ovlp())
    if F.ndim == 3:  # k-point object at one k: take it
        if F.shape[0] != 1:
            raise InputError("read_calculation: only Γ-point periodic calculations are supported; "
                             "run with kpts = [[0, 0, 0]] or pass a molecular calculation")
        F, S = F[0], S[0]
    if np.iscomplexobj(F):
        if np.abs(F.imag).max() > 1e-10:
            raise InputError("read_calculation: complex Fock matrix (k != Γ); only Γ is supported")
        F, S = F.real, S.real
    pbc = hasattr(mol, "a") and mol.a is not None
    atoms = Atoms(symbols=[mol.atom_pure_symbol(i) for i in range(mol.natm)],
                  positions=mol.atom_coords(unit="Angstrom"),
                  cell=np.asarray(mol.lattice_vectors()) * _BOHR if pbc else None, pbc=pbc)
    return _structure(atoms, F, S, OrbitalBasis.from_pyscf(mol, name=basis_name or ""), pbc, "pyscf calculation")


def _structure(atoms, F, S, ob, pbc, source):
    from . import Structure

    T = ob.transform(atoms.get_atomic_numbers(), "pyscf")
    n = T.shape[0]
    if F.shape != (n, n) or S.shape != (n, n):
        raise InputError(f"{source}: H is {F.shape} and S is {S.shape} but the basis gives {n} orbitals")
    for name, M in (("H", F), ("S", S)):
        if not np.isfinite(M).all():
            raise InputError(f"{source}: {name} holds NaN/Inf values")
    H = sp.csr_matrix(T @ ((F + F.T) * 0.5 * HARTREE_EV) @ T.T)
    Sm = sp.csr_matrix(T @ ((S + S.T) * 0.5) @ T.T)
    return Structure(atoms=atoms, basis=ob, H={(0, 0, 0): H}, S={(0, 0, 0): Sm}, gamma_only=bool(pbc),
                     source=source, meta={"code": "pyscf", "basis_sets": ob.name})


def save_npz(path: str, mf, basis_name: str) -> None:
    """Store a PySCF calculation's Fock and overlap (Hartree, PySCF order) with its structure."""
    s = read_calculation(mf, basis_name)
    mol = mf.mol if hasattr(mf, "mol") else mf.cell
    F = np.asarray(mf.get_fock()).reshape(-1, mol.nao)[-mol.nao:].real
    S = np.asarray(mf.get_ovlp()).reshape(-1, mol.nao)[-mol.nao:].real
    np.savez(path, numbers=s.atoms.get_atomic_numbers(), positions=s.atoms.get_positions(),
             cell=s.atoms.get_cell().array, pbc=s.atoms.get_pbc(), basis=basis_name, H=F, S=S)


def read_npz(path: str):
    """H and S from an npz (see the module docstring) as a Structure."""
    from ase import Atoms

    from ..basis import OrbitalBasis

    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as exc:
        raise InputError(f"{path}: not a readable npz ({exc})") from None
    need = {"numbers", "positions", "basis", "H", "S"}
    if need - keys:
        raise InputError(f"{path}: missing keys {sorted(need - keys)}; expected {sorted(need)} (+ cell, pbc)")
    pbc = z["pbc"] if "pbc" in keys else np.zeros(3, bool)
    atoms = Atoms(numbers=z["numbers"], positions=z["positions"],
                  cell=z["cell"] if "cell" in keys else None, pbc=pbc)
    mol = make_cell(atoms, str(z["basis"]))
    ob = OrbitalBasis.from_pyscf(mol, name=str(z["basis"]))
    return _structure(atoms, np.asarray(z["H"], np.float64), np.asarray(z["S"], np.float64), ob,
                      bool(np.any(pbc)), path)
