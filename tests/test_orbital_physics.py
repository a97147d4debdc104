"""Orbital order and image shifts, shown by physics: rotating a structure rotates its overlap
blocks by the Wigner-D of the internal basis, and CP2K's S equals PySCF's analytic S."""
import os

import numpy as np
import pytest
import torch

from egnn.basis import OrbitalBasis, code_to_e3nn
from egnn.io.cp2k import read_run
from egnn.so3 import wigner_D_from_matrix

import pyscf  # noqa: F401,E402  (a test extra: make test installs egnn[pyscf])
from egnn.io.pyscf import make_cell, overlap  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")


def _random_rotation(seed):
    q = np.random.default_rng(seed).normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)],
                     [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])


def test_conversion_matrices_orthogonal_and_p_permutation():
    for l in range(4):
        T = code_to_e3nn(l)
        assert np.abs(T @ T.T - np.eye(2 * l + 1)).max() < 1e-13
    assert np.array_equal(code_to_e3nn(1), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.]]))  # (py,pz,px)->(x,y,z)
    assert np.array_equal(code_to_e3nn(1, "pyscf"), np.eye(3))
    T2 = code_to_e3nn(2)
    assert (np.abs(T2) > 1e-12).sum() > 5  # d: a true rotation, not a permutation


def test_conversion_matches_pyscf_orbital_values():
    """PySCF's AO values at points, converted, equal the e3nn harmonics times the radial part."""
    from ase import Atoms
    from egnn.so3 import spherical_harmonics

    mol = make_cell(Atoms("Hf", positions=[[0, 0, 0]]), "gth-szv-molopt-sr")  # s s p d
    pts = np.random.default_rng(0).normal(size=(50, 3))
    ao = mol.eval_gto("GTOval_sph", pts / 0.529177210903)  # bohr
    ob = OrbitalBasis.from_pyscf(mol)
    T = ob.transform([72], "pyscf").toarray()
    ao_int = ao @ T.T
    Y = spherical_harmonics(torch.from_numpy(pts), 2).numpy()
    for l, off in zip(ob.shells["Hf"], ob.shell_offsets("Hf")):
        blk = ao_int[:, off:off + 2 * l + 1]
        ratio = blk / Y[:, l * l:(l + 1) ** 2]
        # one radial factor per point: all m columns share it
        assert np.abs(ratio - ratio[:, :1]).max() < 1e-8 * np.abs(ratio).max()


@pytest.mark.parametrize("basis", ["gth-szv-molopt-sr", "gth-dzvp-molopt-sr"])
def test_rotated_overlap_blocks_transform_by_wigner_D(basis):
    from ase import Atoms

    atoms = Atoms("HfOSi", positions=[[0, 0, 0], [1.9, 0.4, -0.3], [-0.5, 2.1, 0.8]])
    if basis == "gth-dzvp-molopt-sr":
        atoms = Atoms("GeTeO", positions=[[0, 0, 0], [2.6, 0.4, -0.3], [-0.5, 1.9, 0.8]])
    R = _random_rotation(3)
    rot = atoms.copy()
    rot.positions = atoms.positions @ R.T
    S = overlap(atoms, basis)[(0, 0, 0)].toarray()
    S2 = overlap(rot, basis)[(0, 0, 0)].toarray()
    ob = OrbitalBasis.from_pyscf(make_cell(atoms, basis))
    D = [d.numpy() for d in wigner_D_from_matrix(torch.from_numpy(R), ob.lmax)]
    offs = ob.orbital_offsets(atoms.numbers)
    checked = 0
    for i in range(3):
        for j in range(3):
            ei, ej = atoms.get_chemical_symbols()[i], atoms.get_chemical_symbols()[j]
            for la, oa in zip(ob.shells[ei], ob.shell_offsets(ei)):
                for lb, o_b in zip(ob.shells[ej], ob.shell_offsets(ej)):
                    a0, b0 = offs[i] + oa, offs[j] + o_b
                    blk = S[a0:a0 + 2 * la + 1, b0:b0 + 2 * lb + 1]
                    blk2 = S2[a0:a0 + 2 * la + 1, b0:b0 + 2 * lb + 1]
                    assert np.abs(blk2 - D[la] @ blk @ D[lb].T).max() < 1e-10
                    checked += (la > 0) + (lb > 1)
    assert checked > 10
    # the test has teeth: the identity conversion (no d rotation) breaks equivariance of d blocks
    assert np.abs(S2 - S).max() > 1e-2


@pytest.mark.parametrize("run,basis", [("gete_rs8_rattled_s0003", "gth-dzvp-molopt-sr"),
                                       ("hfo2_m12_rattled_s0000", "gth-szv-molopt-sr")])
def test_cp2k_overlap_equals_pyscf_with_cp2k_wrapping(run, basis):
    s = read_run(os.path.join(FIX, run), matrices=("S",))
    P = overlap(s.atoms, basis, r_cut=14.0)
    worst, dropped, blocks = 0.0, 0.0, 0
    for R, M in s.S.items():
        A = M.toarray()
        B = P[R].toarray()
        worst = max(worst, np.abs(np.where(A != 0, A - B, 0)).max())
        dropped = max(dropped, np.abs(np.where(A == 0, B, 0)).max())
        blocks += 1
    assert blocks > 50
    assert worst < 1e-5 and dropped < 1e-5
    if run.startswith("gete"):
        # naive shifts (CP2K's image vectors taken as ours, no wrap correction) put overlaps on wrong blocks
        from egnn.io import cp2k
        orig = cp2k.cp2k_wrap_offsets
        cp2k.cp2k_wrap_offsets = lambda p, c, b: np.zeros((len(p), 3), np.int64)
        try:
            naive = read_run(os.path.join(FIX, run), matrices=("S",))
        finally:
            cp2k.cp2k_wrap_offsets = orig
        bad = max(np.abs(M.toarray() - P.get(R, 0 * M).toarray()).max() for R, M in naive.S.items())
        assert bad > 1e-3


@pytest.mark.parametrize("run,basis", [("hfo2_m12_szv", "gth-szv-molopt-sr"), ("si2_prim_dzvp", "gth-dzvp-molopt-sr"),
                                       ("h2o_box6_szv", "gth-szv-molopt-sr")])
def test_cp2k_gamma_overlap_equals_folded_pyscf(run, basis):
    s = read_run(os.path.join(FIX, run), matrices=("S",))
    P = overlap(s.atoms, basis, r_cut=14.0)
    assert np.abs(s.gamma("S").toarray() - sum(P.values()).toarray()).max() < 1e-5
