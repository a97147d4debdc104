"""egnn.bands on real CP2K k-point runs: Bloch sums, the phase convention, band comparisons."""
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp

from egnn import bands as BD
from egnn.errors import InputError
from egnn.io.cp2k import read_run

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")


@pytest.fixture(scope="module")
def hfo2():
    return read_run(os.path.join(FIX, "hfo2_m12_rattled_s0000"))


def test_gamma_bands_are_the_image_summed_eigenvalues(hfo2):
    e = BD.bands(hfo2.H, hfo2.S, [[0, 0, 0]])[0]
    ref = scipy.linalg.eigh(hfo2.gamma("H").toarray(), hfo2.gamma("S").toarray(), eigvals_only=True)
    np.testing.assert_allclose(e, ref, atol=1e-9)
    # time reversal: real H(R) gives the same bands at k and −k; and k + G is the same k
    k = np.array([0.13, -0.31, 0.27])
    ek = BD.bands(hfo2.H, hfo2.S, [k, -k, k + [1, 0, -1]])
    np.testing.assert_allclose(ek[0], ek[1], atol=1e-9)
    np.testing.assert_allclose(ek[0], ek[2], atol=1e-9)
    assert np.abs(ek[0] - e).max() > 1e-3  # the bands do disperse


def _supercell_211(MR, natoms_orbitals):
    """The matrices of the 2x1x1 supercell (atoms (i, t), t = 0, 1 along a) from the primitive
    H(R): block [(i,t),(j,u)](R') = H[i, j](R) with R = (u − t + 2R'_1, R'_2, R'_3)."""
    n = natoms_orbitals
    out = {}
    for R, M in MR.items():
        for t in (0, 1):
            for u in (0, 1):
                d = R[0] - (u - t)
                if d % 2:
                    continue
                Rs = (d // 2, R[1], R[2])
                blk = sp.lil_matrix((2 * n, 2 * n))
                blk[t * n:(t + 1) * n, u * n:(u + 1) * n] = M
                out[Rs] = out.get(Rs, sp.csr_matrix((2 * n, 2 * n))) + blk.tocsr()
    return out


def test_phase_convention_against_a_supercell_fold(hfo2):
    """Γ of the doubled cell holds the primitive bands at k = 0 and k = ½ along a*: only true with the
    right sign and unit of the shift in the Bloch phase."""
    n = hfo2.n_orbitals
    H2, S2 = _supercell_211(hfo2.H, n), _supercell_211(hfo2.S, n)
    e2 = BD.bands(H2, S2, [[0, 0, 0]])[0]
    e1 = np.sort(BD.bands(hfo2.H, hfo2.S, [[0, 0, 0], [0.5, 0, 0]]).ravel())
    np.testing.assert_allclose(e2, e1, atol=1e-8)
    wrong = np.sort(BD.bands(hfo2.H, hfo2.S, [[0, 0, 0], [0, 0.5, 0]]).ravel())
    assert np.abs(e2 - wrong).max() > 1e-3


def test_path_and_monkhorst_pack(hfo2):
    kp, x, xs, labels = BD.kpath(hfo2.atoms, 40)
    assert len(kp) == len(x) == 40 and np.all(np.diff(x) >= 0)
    assert "G" in labels and np.any(np.abs(kp).sum(1) < 1e-12)  # the path passes through Γ
    mp = BD.monkhorst_pack(hfo2.meta["kpoint_mesh"])
    assert hfo2.meta["kpoint_mesh"] == (2, 2, 2) and mp.shape == (8, 3)
    np.testing.assert_allclose(np.sort(np.abs(mp), axis=0), 0.25)


def test_compare_counts_and_shifts():
    rng = np.random.default_rng(0)
    dft = np.sort(rng.normal(size=(5, 12)), axis=1)
    dft[:, 6:] += 3.0  # a gap above 6 occupied bands
    same = BD.compare(dft, dft, 6)
    assert same["band_mae_meV"] == 0 and same["band_gap_err_meV"] == 0
    assert same["n_empty_bands"] == BD.N_EMPTY
    r = BD.compare(dft + 0.1, dft, 6)
    assert r["band_mae_meV"] == pytest.approx(100.0) and r["band_gap_err_meV"] == pytest.approx(0.0, abs=1e-9)
    assert BD.compare(dft + 0.1, dft, 6, shift=0.1)["band_mae_meV"] == pytest.approx(0.0, abs=1e-9)
    wide = dft.copy()
    wide[:, 6:] += 0.25  # conduction bands up: gap error +250 meV, empty-band MAE 250 meV
    r = BD.compare(wide, dft, 6)
    assert r["band_gap_err_meV"] == pytest.approx(250.0) and r["band_occ_mae_meV"] == pytest.approx(0.0)
    assert r["band_empty_mae_meV"] == pytest.approx(250.0)
    with pytest.raises(InputError, match="occupied"):
        BD.compare(dft, dft, 12)


def test_band_figures_of_the_dft_matrices_themselves(hfo2, tmp_path):
    from egnn.evaluate import _band_figures

    arrays = {}
    out = _band_figures(hfo2, hfo2.H, 48, 0.0, arrays, keep=True)
    assert out["band_mae_meV"] < 1e-6 and out["band_gap_err_meV"] == pytest.approx(0.0, abs=1e-6)
    assert out["band_kpoints"] == 60 + 8 and 2.0 < out["band_gap_dft_eV"] < 5.0
    noisy = {R: M + (0.01 * sp.eye(M.shape[0]) if R == (0, 0, 0) else 0) for R, M in hfo2.H.items()}
    out = _band_figures(hfo2, noisy, 48, 0.0, arrays, keep=True)  # + 10 meV · I shifts E by ~10 meV · S⁻¹
    assert 3.0 < out["band_mae_meV"] < 30.0
    png = BD.plot_bands(arrays["bands"]["x"], arrays["bands"]["special_x"], arrays["bands"]["labels"],
                        arrays["bands"]["dft"], arrays["bands"]["pred"], 48, str(tmp_path / "b.png"))
    assert os.path.getsize(png) > 10_000 and not os.path.exists(png + ".part.png")
