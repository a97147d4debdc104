"""CP2K reader/writer on real run folders (tests/fixtures/cp2k), and malformed inputs."""
import gzip
import os
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from egnn.basis import OrbitalBasis
from egnn.errors import EgnnError
from egnn.io.cp2k import HARTREE_EV, cp2k_wrap_offsets, read_csr, read_run, write_csr

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
KP_HFO2 = os.path.join(FIX, "hfo2_m12_rattled_s0000")
KP_GETE = os.path.join(FIX, "gete_rs8_rattled_s0003")


@pytest.fixture(scope="module")
def hfo2_kp():
    return read_run(KP_HFO2)


def test_basis_from_embedded_table_matches_out_counts():
    b = OrbitalBasis.from_cp2k(None, {"Hf": "SZV-MOLOPT-SR-GTH", "O": "SZV-MOLOPT-SR-GTH",
                                      "Ge": "DZVP-MOLOPT-SR-GTH", "H": "DZVP-MOLOPT-SR-GTH"})
    assert b.shells["Hf"] == (0, 0, 1, 2) and b.shells["O"] == (0, 1)
    assert b.shells["Ge"] == (0, 0, 1, 1, 2) and b.shells["H"] == (0, 0, 1)
    assert [b.n_orbitals(e) for e in ("Hf", "O", "Ge", "H")] == [10, 4, 13, 5]


def test_basis_file_is_read(tmp_path):
    f = tmp_path / "MYBASIS"
    f.write_text("# comment\n Xe MY-BASIS\n 2\n 1 0 1 1 2 1\n 1.0 0.5 0.5 0.5\n 3 2 2 1 1\n 0.7 1.0\n")
    assert OrbitalBasis.from_cp2k(str(f), {"Xe": "MY-BASIS"}).shells["Xe"] == (0, 0, 1, 2)


def test_gamma_run(tmp_path):
    s = read_run(os.path.join(FIX, "hfo2_m12_szv"))
    assert s.gamma_only and list(s.H) == [(0, 0, 0)] and s.n_orbitals == 72
    H = s.H[(0, 0, 0)].toarray()
    assert np.abs(H - H.T).max() == 0.0
    # same numbers as the file, up to the orbital rotation and units: the spectrum is invariant
    i, j, v = read_csr(os.path.join(FIX, "hfo2_m12_szv", "hfo2_m12-KS_SPIN_1-1_0.csr.gz"), 72)
    raw = sp.csr_matrix((v, (i, j)), shape=(72, 72)).toarray()
    raw = (raw + raw.T) / 2 * HARTREE_EV
    assert np.allclose(np.linalg.eigvalsh(H), np.linalg.eigvalsh(raw), atol=1e-10)
    assert s.atoms.get_pbc().all() and len(s.atoms) == 12


def test_kpoint_run_symmetry_and_units(hfo2_kp):
    s = hfo2_kp
    assert not s.gamma_only
    for R, M in s.H.items():
        mR = tuple(-x for x in R)
        assert abs(M - s.H[mR].T).max() < 1e-12
    S0 = s.S[(0, 0, 0)].toarray()
    assert np.abs(np.diag(S0) - 1).max() < 1e-12
    # on-site Hf/O energies are eV (tens of eV), not Hartree
    assert 1.0 < np.abs(s.H[(0, 0, 0)].diagonal()).max() < 200


def test_wrap_offsets_round_half_away_from_zero():
    cell = np.eye(3) * 2.0
    pos = np.array([[1.0, -1.0, 0.99], [1.01, -1.01, 3.0]])  # s = ±0.5 -> ±1 (ANINT), 1.5 -> 2
    n = cp2k_wrap_offsets(pos, cell, [True, True, True])
    assert n.tolist() == [[1, -1, 0], [1, -1, 2]]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("ext", ["", ".gz", ".xz"])
def test_write_read_roundtrip_kpoint(hfo2_kp, tmp_path, binary, ext):
    s = hfo2_kp
    n = s.n_orbitals
    for R in list(s.H)[:3]:
        p = str(tmp_path / f"m{R[0]}{R[1]}{R[2]}.csr{ext}")
        write_csr(p, s.H[R], s.basis, s.atoms.get_atomic_numbers(), binary=binary)
        i, j, v = read_csr(p, n)
        back = sp.csr_matrix((v * HARTREE_EV, (i, j)), shape=(n, n))
        T = s.basis.transform(s.atoms.get_atomic_numbers())
        back = T @ back @ T.T
        tol = 1e-12 if binary else 1e-13 * np.abs(s.H[R]).max() * 10 + 1e-12
        assert abs(back - s.H[R]).max() <= tol


def test_write_run_roundtrip_exact(tmp_path):
    """Γ (text) and k-point (binary), SZV and DZVP: read -> write -> read gives the same H, S."""
    for run in ("si2_prim_dzvp", "gete_rs8_rattled_s0003"):
        src = os.path.join(FIX, run)
        s = read_run(src)
        dst = tmp_path / run
        shutil.copytree(src, dst)
        z = s.atoms.get_atomic_numbers()
        if s.gamma_only:
            for f, M, kind in ((f"{s.meta['project']}-KS_SPIN_1-1_0.csr.gz", s.H[(0, 0, 0)], "H"),
                               (f"{s.meta['project']}-S_SPIN_1-1_0.csr.gz", s.S[(0, 0, 0)], "S")):
                write_csr(str(dst / f), M, s.basis, z, kind=kind, binary=True)
            t = read_run(str(dst))
            for R in s.H:
                assert abs(t.H[R] - s.H[R]).max() <= 1e-12
                assert abs(t.S[R] - s.S[R]).max() <= 1e-12
        else:
            # rewrite one image file in binary from its raw COO (exact), the reader must agree
            f = str(dst / f"{s.meta['project']}-KS_SPIN_1_R_2-1_0.csr.gz")
            i, j, v = read_csr(f, s.n_orbitals)
            write_csr(f, sp.csr_matrix((v * HARTREE_EV, (i, j)), shape=(s.n_orbitals,) * 2), binary=True)
            t = read_run(str(dst))
            assert set(t.H) == set(s.H)
            assert max(abs(t.H[R] - s.H[R]).max() for R in s.H) <= 1e-12


def test_write_threshold_and_upper(tmp_path, hfo2_kp):
    M = hfo2_kp.S[(0, 0, 0)]
    p = str(tmp_path / "u.csr")
    n_up = write_csr(p, M, upper_triangular=True, threshold=1e-3, kind="S")
    i, j, v = read_csr(p, 72)
    assert n_up == len(v) and (i <= j).all() and (np.abs(v) >= 1e-3).all()
    i2, j2, v2 = read_csr(p, 72, upper_triangular=True)
    full = sp.csr_matrix((v2, (i2, j2)), shape=(72, 72)).toarray()
    ref = M.toarray()
    ref[np.abs(ref) < 1e-3] = 0
    assert np.abs(full - ref).max() < 1e-13


def test_empty_file_is_zero_image(tmp_path):
    p = tmp_path / "e.csr.gz"
    with gzip.open(p, "wb"):
        pass
    i, j, v = read_csr(str(p), 10)
    assert len(i) == len(j) == len(v) == 0


def test_never_mirrors_upper_only_file(tmp_path):
    p = str(tmp_path / "x.csr")
    write_csr(p, sp.csr_matrix(([1.0, 2.0], ([0, 1], [3, 2])), shape=(4, 4)), kind="S")
    i, j, v = read_csr(p, 4)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 3), (1, 2)]


# ----------------------------------------------------------------------------- malformed inputs
def _text(tmp_path, body, name="m.csr"):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def test_malformed_text_columns(tmp_path):
    p = _text(tmp_path, "       1       1  0.1E+000\n       1       2\n")
    with pytest.raises(EgnnError, match=r"m\.csr:2: expected 3 columns"):
        read_csr(p, 4)


def test_malformed_index_beyond_size(tmp_path):
    p = _text(tmp_path, "       1       1  0.1E+000\n       2       9  0.2E+000\n")
    with pytest.raises(EgnnError, match=r"m\.csr: line 2: index \(2, 9\) is outside the 4x4"):
        read_csr(p, 4)


def test_malformed_nan(tmp_path):
    p = _text(tmp_path, "       1       1  0.1E+000\n       1       2  NaN\n       2       2  1.0\n")
    with pytest.raises(EgnnError, match=r"m\.csr: line 2: value nan is not finite"):
        read_csr(p, 4)


def test_malformed_unparsable(tmp_path):
    p = _text(tmp_path, "       1       1  0.1E+000\n       1       x  0.3\n")
    with pytest.raises(EgnnError, match=r"m\.csr:2: cannot parse"):
        read_csr(p, 4)


def test_malformed_truncated_binary(tmp_path):
    p = str(tmp_path / "b.csr")
    write_csr(p, sp.identity(5, format="csr"), kind="S", binary=True)
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-7])
    with pytest.raises(EgnnError, match=r"b\.csr: record 5: truncated binary record"):
        read_csr(p, 5)


def test_malformed_binary_marker(tmp_path):
    p = str(tmp_path / "b.csr")
    write_csr(p, sp.identity(3, format="csr"), kind="S", binary=True)
    data = bytearray(open(p, "rb").read())
    data[24 + 20] = 99  # second record's trailing marker
    open(p, "wb").write(bytes(data))
    with pytest.raises(EgnnError, match=r"b\.csr: record 2: corrupt binary record"):
        read_csr(p, 3)


def _copy_run(tmp_path, name="hfo2_m12_szv"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIX, name), dst)
    return dst


def _edit(path, old, new):
    txt = path.read_text()
    assert old in txt
    path.write_text(txt.replace(old, new, 1))


def test_malformed_size_mismatch_with_basis(tmp_path):
    d = _copy_run(tmp_path)
    _edit(d / "hfo2_m12.out", "Number of spherical basis functions:                                   10",
          "Number of spherical basis functions:                                   13")
    with pytest.raises(EgnnError, match=r"hfo2_m12\.out: kind Hf has 13 spherical basis functions"):
        read_run(str(d))


def test_malformed_matrix_larger_than_basis(tmp_path):
    d = _copy_run(tmp_path, "h2o_box6_szv")
    with gzip.open(d / "h2o_box6-S_SPIN_1-1_0.csr.gz", "ab") as fh:
        fh.write(b"       7       7  0.10000000000000E+001\n")
    with pytest.raises(EgnnError, match=r"h2o_box6-S_SPIN_1-1_0\.csr\.gz: line 37: index \(7, 7\) is outside the 6x6"):
        read_run(str(d))


def test_malformed_unknown_basis_name(tmp_path):
    d = _copy_run(tmp_path, "h2o_box6_szv")
    _edit(d / "h2o_box6.inp", "BASIS_SET SZV-MOLOPT-SR-GTH", "BASIS_SET NO-SUCH-BASIS")
    with pytest.raises(EgnnError, match=r"basis set 'NO-SUCH-BASIS' for element"):
        read_run(str(d))


def test_malformed_unknown_element(tmp_path):
    d = _copy_run(tmp_path, "h2o_box6_szv")
    _edit(d / "h2o_box6.inp", "&KIND H", "&KIND Qq")
    txt = (d / "h2o_box6.inp").read_text()
    (d / "h2o_box6.inp").write_text(txt.replace("\n      H ", "\n      Qq "))
    with pytest.raises(EgnnError, match=r"h2o_box6\.inp: kind Qq: unknown element"):
        read_run(str(d))


def test_malformed_coord_line(tmp_path):
    d = _copy_run(tmp_path, "h2o_box6_szv")
    txt = (d / "h2o_box6.inp").read_text().splitlines()
    k = next(i for i, ln in enumerate(txt) if ln.strip().startswith("O ") and len(ln.split()) == 4)
    txt[k] = "      O 1.0 abc 2.0"
    (d / "h2o_box6.inp").write_text("\n".join(txt) + "\n")
    with pytest.raises(EgnnError, match=rf"h2o_box6\.inp:{k + 1}: cannot parse"):
        read_run(str(d))


def test_malformed_nan_in_run(tmp_path):
    d = _copy_run(tmp_path, "h2o_box6_szv")
    f = d / "h2o_box6-KS_SPIN_1-1_0.csr.gz"
    lines = gzip.open(f, "rt").read().splitlines()
    lines[4] = lines[4][:16] + "                    NaN"
    with gzip.open(f, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(EgnnError, match=r"KS_SPIN_1-1_0\.csr\.gz: line 5: value nan"):
        read_run(str(d))


def test_missing_image_file(tmp_path):
    d = _copy_run(tmp_path, "gete_rs8_rattled_s0003")
    os.remove(d / "gete_rs8_rattled_s0003-S_SPIN_1_R_7-1_0.csr.gz")
    with pytest.raises(EgnnError, match=r"image 7 .* has no file"):
        read_run(str(d))
