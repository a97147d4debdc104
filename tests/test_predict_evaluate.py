"""egnn predict / egnn evaluate on the tiny CP2K fixtures with a small untrained model."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from egnn.basis import OrbitalBasis
from egnn.cli import build_parser
from egnn.errors import EgnnError
from egnn.model import HamiltonianModel, ModelConfig

from conftest import random_rotation

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
GAMMA_RUN = os.path.join(FIX, "hfo2_m12_szv")  # Γ-only, folded at any r_cut (12 atoms)
KP_RUN = os.path.join(FIX, "hfo2_m12_rattled_s0000")  # real-space images
KP_INP = os.path.join(KP_RUN, "hfo2_m12_rattled_s0000.inp")


def _cli(argv):
    args = build_parser().parse_args(argv)
    return args._run(args)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
    m = HamiltonianModel(ModelConfig(basis=basis, r_cut=5.0, lmax=4, mmax=2, channels=4, layers=1, heads=1,
                                     hidden=8, num_rbf=8))
    with torch.no_grad():  # non-trivial output statistics, as after fit_output_stats
        m.node_shift.uniform_(-3, 3)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "ck.pt")
    torch.save({"format": "egnn-checkpoint-1", "model_config": model.config.to_dict(), "model": model.state_dict()},
               path)
    return path


def _atoms(run):
    from egnn.predict import read_input

    return read_input(run)[0]


# ----------------------------------------------------------------------------- predict
def test_predict_cli_every_format(checkpoint, model, tmp_path):
    from egnn.io.cp2k import read_run
    from egnn.io.rows import load_rows, read_index
    from egnn.predict import load_images, predict_structure, to_cp2k_order

    pytest.importorskip("sisl")
    out = str(tmp_path / "out")
    assert _cli(["predict", "--checkpoint", checkpoint, KP_INP, "-o", out, "--with-overlap", "--edge-chunk", "100",
                 "--format", "rows,gamma,npz,cp2k,sisl", "--json"]) == 0
    stem = "hfo2_m12_rattled_s0000"
    G = sp.load_npz(os.path.join(out, f"{stem}_H.npz"))
    assert G.shape == (72, 72)
    images = load_images(os.path.join(out, f"{stem}_HR.npz"))
    assert len(images) > 1
    np.testing.assert_allclose(sum(images.values()).toarray(), G.toarray(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(G.toarray(), G.toarray().T, atol=1e-12)  # symmetric by construction
    for R, M in images.items():  # H(R) = H(-R)ᵀ image by image
        assert abs(M - images[tuple(-x for x in R)].T).max() < 1e-12
    # the row blocks (several parts: 100-edge chunks) reassemble to the same images
    rows = load_rows(os.path.join(out, f"{stem}_H.rows"))
    assert len(read_index(os.path.join(out, f"{stem}_H.rows"))["parts"]) > 3
    assert set(rows) == set(images) and all(abs(rows[R] - images[R]).max() == 0 for R in rows)
    # the files hold the CP2K-ordered version of the library's in-memory prediction
    atoms = _atoms(KP_INP)
    HR = predict_structure(model, atoms, edge_chunk=None)
    ref = to_cp2k_order(sum(HR.values()), model.basis, atoms.numbers)
    np.testing.assert_allclose(G.toarray(), ref.toarray(), rtol=1e-5, atol=1e-5 * abs(ref).max())
    # the streamed CP2K .csr files + image table read back (egnn.io.cp2k) to the same H(R)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(KP_INP, run)
    for f in glob.glob(os.path.join(out, f"{stem}-KS_SPIN_1_R_*-1_0.csr")):
        shutil.copy(f, run)
    shutil.copy(os.path.join(out, f"{stem}_images.out"), run / f"{stem}.out")
    back = read_run(str(run), matrices=("H",)).H
    T = model.basis.transform(atoms.numbers, "cp2k")
    assert set(back) == set(images)
    for R in images:
        np.testing.assert_allclose((T.T @ back[R] @ T).toarray(), images[R].toarray(), atol=1e-10)
    # S from PySCF: normalised orbitals (diagonal 1 at R = 0), symmetric positive definite Γ matrix
    S = load_images(os.path.join(out, f"{stem}_SR.npz"))
    np.testing.assert_allclose(S[(0, 0, 0)].diagonal(), 1.0, atol=1e-6)
    SG = sp.load_npz(os.path.join(out, f"{stem}_S.npz")).toarray()
    assert np.linalg.eigvalsh(SG).min() > 0
    # sisl: TBtrans' TSHS reads back into a Hamiltonian whose bands at Γ and at a k-point are ours
    import sisl

    from egnn.bands import bands

    H = sisl.get_sile(os.path.join(out, f"{stem}.TSHS")).read_hamiltonian()
    for k in ([0, 0, 0], [0.25, -0.1, 0.3]):
        np.testing.assert_allclose(H.eigh(k=k), bands(images, S, [k])[0], atol=1e-8)
    meta = json.load(open(os.path.join(out, f"{stem}_meta.json")))
    assert meta["atoms"] == 12 and meta["H_images"] == len(images)
    assert set(meta["files"]) == set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary left behind


def _with_reference(model):
    """`model` plus a two-centre reference with random weights (as after fit_reference)."""
    m = HamiltonianModel(ModelConfig.from_dict({**model.config.to_dict(), "reference": "two_centre"}))
    m.load_state_dict(model.state_dict(), strict=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for b in (m.reference.edge_weight, m.reference.node_weight, m.reference.node_bias):
            b.normal_()
        m.reference.r_min.fill_(2.0)
    return m.eval()


@pytest.mark.parametrize("reference", [False, True])
def test_streamed_rows_equal_the_in_memory_assembly(model, reference):
    """The streamed, chunked, reverse-edge-symmetrised H(R) equals the old path: one full forward,
    blocks.assemble of every block, then symmetrize (also with the two-centre reference, which the
    streamed path adds chunk by chunk and to the reverse edges)."""
    from egnn.blocks import assemble
    from egnn.graph import radius_graph
    from egnn.predict import predict_structure, symmetrize

    model = _with_reference(model) if reference else model
    atoms = _atoms(KP_INP).repeat((1, 2, 1))
    g = radius_graph(atoms, model.config.r_cut)
    t = torch.as_tensor
    with torch.no_grad():
        node, edge = model(t(model.basis.species_index(g.numbers)), t(g.src), t(g.dst), t(g.vec, dtype=torch.float32))
    ref = symmetrize(assemble(g, node, edge, model.basis))
    for chunk in (None, 37, 500):
        got = predict_structure(model, atoms, edge_chunk=chunk)
        assert set(got) == set(ref)
        scale = max(abs(M).max() for M in ref.values())
        assert max(abs(got[R] - ref[R]).max() for R in ref) <= 1e-5 * scale


def test_overwrite_and_stale_partial_output(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", checkpoint, KP_INP, "-o", str(out), "--format", "gamma"]
    assert _cli(argv) == 0
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EgnnError, match="--overwrite"):
        _cli(argv)
    # a run killed mid-way left its hidden .part folder (its writer no longer runs): the next run removes it
    stale = out / ".hfo2_m12_rattled_s0000.x1y2.part"
    stale.mkdir()
    (stale / "egnn-partial.json").write_text(json.dumps({"stem": "x", "pid": 2 ** 22 + 12345, "host": os.uname()[1],
                                                         "started": "earlier"}))
    (stale / "junk.npz").write_bytes(b"half")
    foreign = out / ".someone-elses.part"  # no egnn marker: never touched
    foreign.mkdir()
    assert _cli(argv + ["--overwrite"]) == 0
    assert not stale.exists() and foreign.exists()
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite clears only egnn's own files
    assert sorted(os.listdir(out)) == sorted([".someone-elses.part", "hfo2_m12_rattled_s0000_H.npz",
                                              "hfo2_m12_rattled_s0000_meta.json", "notes.txt"])


def test_memory_estimate_refuses_before_work(checkpoint, tmp_path, monkeypatch):
    import egnn.predict as P

    monkeypatch.setattr(P, "_available_memory", lambda: 2 ** 20)  # 1 MiB left
    out = tmp_path / "out"
    with pytest.raises(EgnnError, match="--edge-chunk") as exc:
        _cli(["predict", "--checkpoint", checkpoint, KP_INP, "-o", str(out)])
    assert "MiB" in str(exc.value) and "--format rows" in str(exc.value)
    assert not out.exists() or not [f for f in os.listdir(out) if not f.startswith(".")]


def test_estimate_tracks_the_real_graph(model):
    from egnn.graph import radius_graph
    from egnn.predict import BASE_BYTES, estimate

    atoms = _atoms(KP_INP)
    g = radius_graph(atoms, model.config.r_cut)
    est = estimate(g, model, ("rows", "gamma"), 1000)
    HR = __import__("egnn.predict", fromlist=["predict_structure"]).predict_structure(model, atoms)
    nnz = sum(M.nnz for M in HR.values())
    assert 0.5 * nnz <= est["nonzeros"] <= 2.0 * nnz
    small = estimate(g, model, ("rows",), 1)  # 1-edge chunks: what is left is state, linear in size
    big = estimate(radius_graph(atoms.repeat((2, 2, 2)), model.config.r_cut), model, ("rows",), 1)
    lo, hi = small["stream_bytes"] - BASE_BYTES, big["stream_bytes"] - BASE_BYTES
    assert 7.5 * lo < hi < 8.5 * lo
    assert est["output_bytes"]["rows"] == est["output_bytes"]["gamma"] == est["nonzeros"] * 12


def test_rotated_structure_same_eigenvalues(model):
    from egnn.predict import predict_structure

    atoms = _atoms(GAMMA_RUN)
    Rm = random_rotation(7).numpy()
    rot = atoms.copy()
    rot.set_cell(atoms.get_cell().array @ Rm.T, scale_atoms=False)
    rot.set_positions(atoms.get_positions() @ Rm.T)
    e0 = np.linalg.eigvalsh(sum(predict_structure(model, atoms).values()).toarray())
    e1 = np.linalg.eigvalsh(sum(predict_structure(model, rot).values()).toarray())
    assert np.abs(e0).max() > 1.0
    assert np.abs(e1 - e0).max() <= 1e-5 * np.abs(e0).max()


def test_tiling_agrees_block_by_block(model):
    from egnn.predict import predict_structure

    atoms = _atoms(KP_INP)
    prim = predict_structure(model, atoms)
    sup = predict_structure(model, atoms.repeat((2, 1, 1)))
    n = prim[(0, 0, 0)].shape[0]
    total = 0
    scale = max(abs(M).max() for M in prim.values())
    for Rs, M in sup.items():
        C = M.tocoo()
        md, ms = C.row // n, C.col // n  # copy of the dst / src atom (ase repeat: copies contiguous)
        R0 = ms - md + 2 * Rs[0]
        for r0 in np.unique(R0):
            sel = R0 == r0
            P = prim[(int(r0), Rs[1], Rs[2])]
            v = np.asarray(P[C.row[sel] % n, C.col[sel] % n]).ravel()
            np.testing.assert_allclose(C.data[sel], v, atol=2e-5 * scale)
            total += int(sel.sum())
    assert total == 2 * sum(M.nnz for M in prim.values())


def test_bad_inputs_write_nothing(checkpoint, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "garbage.xyz"
    bad.write_text("this is not\na structure file\n")
    h2o = os.path.join(FIX, "h2o_box6_szv")  # H is not in the HfO2 checkpoint's basis
    cases = [
        ["--checkpoint", str(tmp_path / "missing.pt"), KP_INP],
        ["--checkpoint", checkpoint, KP_INP, str(bad)],
        ["--checkpoint", checkpoint, KP_INP, h2o],
        ["--checkpoint", checkpoint, KP_INP, str(tmp_path / "nowhere.xyz")],
        ["--checkpoint", checkpoint, KP_INP, "--tile", "2x0x1"],
        ["--checkpoint", checkpoint, KP_INP, "--with-overlap", "--overlap-basis", "gth-dzvp-molopt-sr"],
    ]
    for argv in cases:
        with pytest.raises(EgnnError) as exc:
            _cli(["predict", *argv, "-o", str(out)])
        assert str(exc.value)
        assert not out.exists(), argv
    with pytest.raises(EgnnError, match="element H"):
        _cli(["predict", "--checkpoint", checkpoint, h2o, "-o", str(out)])


def test_distributed_formats_other_than_rows_are_refused(model, monkeypatch, tmp_path):
    from egnn.predict import predict_to_files

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(EgnnError, match="under torchrun"):
        predict_to_files(model, _atoms(GAMMA_RUN), str(tmp_path), "x", ("rows", "gamma"), partition="low-nn")


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_cli_json_and_plots(checkpoint, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert _cli(["evaluate", "--checkpoint", checkpoint, GAMMA_RUN, KP_RUN, "--json", "--plots", str(plots)]) == 0
    r = json.loads(capsys.readouterr().out)
    for k in ("mae_meV", "mae_node_meV", "mae_edge_meV", "eig_mae_meV", "eig_rel", "mae_shifted_meV",
              "eig_mae_shifted_meV", "gap_mae_meV", "per_pair", "per_element_node", "vs_distance"):
        assert k in r, k
    assert r["structures"] == 2
    assert {s["mode"] for s in r["per_structure"]} == {"folded", "real_space"}
    assert r["mae_shifted_meV"] <= r["mae_meV"]
    assert set(r["per_pair"]) == {"Hf-Hf", "Hf-O", "O-Hf", "O-O"}
    n = sum(b["n"] for b in r["vs_distance"])
    assert n == r["elements"]
    for s in r["per_structure"]:
        assert s["valence_electrons"] == 4 * 12 + 8 * 6  # GTH-PBE-q12 / -q6 from the .inp
        assert s["eig_reference"] == "cp2k run"
    for f in ("H_vs_distance.png", "error_violins.png", "logH_pred_vs_dft.png"):
        assert (plots / f).stat().st_size > 1000


class _Oracle(torch.nn.Module):
    """A 'model' that returns the DFT targets plus c·S (in coupled form) for one sample."""

    def __init__(self, basis, x, c):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.basis, self.x, self.c = basis, x, c

    def forward(self, species, src, dst, vec, edge_chunk=None):
        x, c = self.x, self.c
        if x.mode != "folded":
            return x.node_target + c * x.overlap["node_target"], x.edge_target + c * x.overlap["edge_target"]
        pair = x.pair_target + c * x.overlap["pair_target"]
        N, E = len(x.species), len(src)
        node = pair[:N, :, :x.node_target.shape[-1] if x.node_target is not None else pair.shape[-1]]
        edge = torch.zeros((E,) + tuple(pair.shape[1:]), dtype=pair.dtype)
        fold = x.edge_fold.numpy()
        _, first = np.unique(fold, return_index=True)
        first = first[fold[first] >= N]  # d != s pairs: one edge carries the whole Γ block
        edge[first] = pair[fold[first]]
        return node, edge


@pytest.mark.parametrize("run", [KP_RUN, GAMMA_RUN])
def test_evaluate_exact_up_to_shift(run, tmp_path):
    """DFT + c·S scores c·mean|S| raw, 0 after the shift; eigenvalues move by exactly c."""
    from egnn.dataset import Dataset, convert
    from egnn.evaluate import evaluate_sample

    convert([run], str(tmp_path / "ds"), r_cut=6.0)  # at 5 Å the truncated S(Γ) is not positive definite
    ds = Dataset(str(tmp_path / "ds"), dtype=torch.float64, overlap=True)
    x = ds[0]
    c = 0.37
    r = evaluate_sample(_Oracle(ds.basis, x, c), x, source=None, name="oracle")
    a = r["_arrays"]
    assert r["energy_shift_eV"] == pytest.approx(c, abs=1e-12)
    assert r["mae_meV"] == pytest.approx(1000 * c * np.abs(a["err"] / c).mean(), rel=1e-9)
    assert r["mae_shifted_meV"] < 1e-9 and r["mae_node_shifted_meV"] < 1e-9 and r["mae_edge_shifted_meV"] < 1e-9
    assert r["eig_mae_meV"] == pytest.approx(1000 * c, rel=1e-6)
    assert r["eig_mae_shifted_meV"] < 1e-6
    assert abs(r["gap_err_meV"]) < 1e-6


def test_overwrite_touches_only_this_structures_files(checkpoint, tmp_path):
    """Names are matched exactly: a tiled prediction of the same cell and a user's file with the same
    prefix survive, and a meta.json cannot point --overwrite outside the folder."""
    out = tmp_path / "out"
    base = ["predict", "--checkpoint", checkpoint, KP_INP, "-o", str(out), "--format", "gamma"]
    assert _cli(base) == 0
    assert _cli(base + ["--tile", "1x1x2"]) == 0
    stem = "hfo2_m12_rattled_s0000"
    (out / f"{stem}_notes.txt").write_text("mine")
    sibling = tmp_path / "precious"
    sibling.mkdir()
    meta = json.loads((out / f"{stem}_meta.json").read_text())
    meta["files"] = ["../precious", f"{stem}_notes.txt"]
    (out / f"{stem}_meta.json").write_text(json.dumps(meta))
    (out / f"{stem}-KS_SPIN_1_R_99-1_0.csr").write_text("stale file of an older writer\n")
    assert _cli(base + ["--overwrite"]) == 0
    assert sibling.exists() and (out / f"{stem}_notes.txt").read_text() == "mine"
    assert (out / f"{stem}_1x1x2_H.npz").exists()  # the tiled prediction is another structure
    assert not (out / f"{stem}-KS_SPIN_1_R_99-1_0.csr").exists()  # the older writer's stale image file went


def test_output_under_a_file_and_a_full_disk(checkpoint, tmp_path, monkeypatch):
    import shutil as sh

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(EgnnError, match="is a file"):
        _cli(["predict", "--checkpoint", checkpoint, KP_INP, "-o", str(f / "sub")])
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "out"
    with pytest.raises(EgnnError, match="free"):
        _cli(["predict", "--checkpoint", checkpoint, KP_INP, "-o", str(out)])
    assert not out.exists()


def test_molecule_to_sisl(checkpoint, tmp_path):
    """An open structure gets a finite box in sisl (no NaN lattice) and its Γ bands match ours."""
    sisl = pytest.importorskip("sisl")
    from ase import Atoms

    from egnn.bands import bands
    from egnn.predict import load_images

    mol = Atoms("HfO2", positions=[[0, 0, 0], [1.9, 0.3, 0], [-1.2, 1.5, 0.2]])
    p = tmp_path / "mol.xyz"
    mol.write(p)
    out = tmp_path / "out"
    assert _cli(["predict", "--checkpoint", checkpoint, str(p), "-o", str(out), "--format", "npz,sisl",
                 "--with-overlap"]) == 0
    H = sisl.get_sile(str(out / "mol.TSHS")).read_hamiltonian()
    assert np.isfinite(H.geometry.lattice.cell).all()
    ours = bands(load_images(str(out / "mol_HR.npz")), load_images(str(out / "mol_SR.npz")), [[0, 0, 0]])[0]
    np.testing.assert_allclose(H.eigh(), ours, atol=1e-8)
