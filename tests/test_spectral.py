"""The Γ-eigenvalue loss (egnn.spectral): the first-order shifts equal the exact eigenvalue change of
a perturbed DFT H, vanish at the DFT H, read no padding, and train under `egnn train`."""
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml

from egnn.cli import main
from egnn.io.cp2k import valence_electrons
from egnn.spectral import _block_sets, first_order, gamma_matrices, prepare
from egnn.train import collate, load_samples, open_datasets

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
KP = os.path.join(FIX, "hfo2_m12_rattled_s0000")  # real-space images
GAMMA = os.path.join(FIX, "hfo2_m12_szv")  # Γ-only: targets folded per atom pair
R_CUT = 6.0  # at 5 Å the truncated S(Γ) is not positive definite


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("egnn-cache"))
    out = {}
    for name, run in (("kp", KP), ("gamma", GAMMA)):
        ds = open_datasets([run], R_CUT, cache)[0]
        ds.overlap, ds.dtype = True, torch.float64
        out[name] = (ds, ds[0], run)
    return out


def errors(x, pert):
    """(node error or None, edge/pair error) as first_order takes them."""
    if x.mode == "folded":
        return None, torch.from_numpy(pert[0])
    return torch.from_numpy(pert[0]), torch.from_numpy(pert[1])


@pytest.mark.parametrize("which", ["kp", "gamma"])
def test_first_order_matches_the_exact_eigenvalue_change(data, which):
    ds, x, run = data[which]
    basis = ds.basis
    n_el, _ = valence_electrons([basis._symbol(int(z)) for z in x.graph.numbers], run)
    spec = prepare(x, basis, n_el // 2, n_empty=3)
    rng = np.random.default_rng(0)
    sets = _block_sets(x)
    zero = [np.zeros_like(t.numpy()) for _, _, _, t, _ in sets]
    assert first_order(spec, *errors(x, zero), basis).abs().max() == 0  # zero at the DFT H
    # a random perturbation inside the layout (padding carries garbage that must not be read)
    masks = [x.node_mask.numpy(), x.edge_mask.numpy()] if x.mode != "folded" else [x.pair_mask.numpy()]
    noise = [rng.standard_normal(m.shape) for m in masks]
    H0, S, _ = gamma_matrices(x, basis)
    k = spec.vec.shape[1]
    e0 = scipy.linalg.eigh(H0, S, eigvals_only=True, subset_by_index=[0, k - 1])

    # levels closer than 20 meV mix at second order, so compare sums over such clusters
    cluster = np.concatenate([[0], np.cumsum(np.diff(e0) > 0.02)])

    def residual(scale):
        pert = [np.where(m, scale * z, 1e3) for m, z in zip(masks, noise)]
        d = first_order(spec, *errors(x, pert), basis).numpy()
        targets = [t.numpy() for _, _, _, t, _ in sets]
        H1, _, _ = gamma_matrices(x, basis, [t + np.where(m, p, 0) for t, m, p in zip(targets, masks, pert)])
        exact = scipy.linalg.eigh(H1, S, eigvals_only=True, subset_by_index=[0, k - 1]) - e0
        d, exact = (np.bincount(cluster, v) for v in (d, exact))
        assert np.abs(exact).mean() > 0.3 * scale  # the levels move measurably
        return np.abs(d - exact).max(), np.abs(exact).max()

    big, size = residual(4e-4)  # 0.4 meV per element
    small, _ = residual(1e-4)
    assert big < 0.1 * size  # first order: the rest is second order ...
    assert small < big / 8  # ... and shrinks as the square of the perturbation (16x for 4x)

def test_collated_batch_gives_each_structures_shifts(data):
    ds, x, run = data["kp"]
    samples = load_samples([ds], ds.basis, dtype=torch.float64, eig_empty=2)
    pair = collate([samples[0], samples[0]])
    assert [(no, eo) for no, _, eo, _, _ in pair.spectra] == [(0, 0), (samples[0].num_nodes, len(samples[0].src))]
    rng = torch.Generator().manual_seed(1)
    dn = torch.randn(pair.node_target.shape, generator=rng, dtype=torch.float64) * 1e-3
    de = torch.randn(pair.edge_target.shape, generator=rng, dtype=torch.float64) * 1e-3
    n, e = samples[0].num_nodes, len(samples[0].src)
    sp = samples[0].spectra[0][4]
    for i in range(2):
        want = first_order(sp, dn[i * n:(i + 1) * n], de[i * e:(i + 1) * e], ds.basis)
        no, nn_, eo, ee, spi = pair.spectra[i]
        got = first_order(spi, dn[no:no + nn_], de[eo:eo + ee], ds.basis)
        assert torch.equal(got, want)


def test_train_with_the_eigenvalue_loss(tmp_path):
    """`egnn train` with train.eig_weight logs the Γ-level error, and a step on the eigenvalue loss
    alone lowers it (its gradient reaches the weights)."""
    cfg = {"data": {"train": [KP, GAMMA], "val": [KP], "r_cut": R_CUT, "cache": str(tmp_path / "cache")},
           "model": {"channels": 8, "layers": 1, "hidden": 8, "heads": 1, "num_rbf": 8},
           "train": {"epochs": 3, "lr": 3e-3, "seed": 3, "eig_weight": 1.0, "eig_empty": 2},
           "output": str(tmp_path / "run")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--json"]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(x["val_eig_mae_meV"] > 0 and x["train_eig_mae_meV"] > 0 for x in lines)
    assert lines[-1]["val_eig_mae_meV"] < lines[0]["val_eig_mae_meV"]


def test_eigenvalue_loss_needs_overlap(tmp_path, capsys):
    from egnn.dataset import convert

    convert([KP], str(tmp_path / "ds"), r_cut=R_CUT, overlap=False)
    cfg = {"data": {"train": [str(tmp_path / "ds")], "val": [], "r_cut": R_CUT},
           "model": {"channels": 8, "layers": 1, "hidden": 8, "heads": 1, "num_rbf": 8},
           "train": {"epochs": 1, "eig_weight": 0.5}, "output": str(tmp_path / "run")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) != 0
    assert "converted without S, which train.eig_weight needs" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "best.pt")


class Oracle(torch.nn.Module):
    """Returns the DFT targets of one sample, plus `delta` on the edge blocks within [lo, hi) Å."""

    def __init__(self, x, basis, delta=0.0, lo=0.0, hi=0.0):
        super().__init__()
        self.basis, self.x = basis, x
        self.w = torch.nn.Parameter(torch.zeros(()))
        r = torch.from_numpy(np.linalg.norm(x.graph.vec, axis=1))
        self.edge_delta = delta * ((r >= lo) & (r < hi)).double()[:, None, None] * x.edge_mask

    def forward(self, species, src, dst, vec, edge_chunk=None):
        return self.x.node_target.double(), self.x.edge_target.double() + self.edge_delta


def test_evaluate_splits_the_level_errors_by_distance(data):
    """A prediction that is exact but for a 1 meV bias on every element of the 4-6 Å edges: the
    per-shell decomposition puts the shift there (and the cut-off's share beyond r_cut), and the
    shell's share equals the real change of the eigenvalues."""
    from egnn.evaluate import evaluate_sample

    ds, _, run = data["kp"]
    ds.overlap, ds.dtype = True, torch.float64
    x = ds[0]
    exact = evaluate_sample(Oracle(x, ds.basis), x, name="exact", source=run)
    biased = evaluate_sample(Oracle(x, ds.basis, 1e-3, 4.0, 6.0), x, name="biased", source=run)
    for res, shell in ((exact, None), (biased, "4-6")):
        by = {b["shell"]: b for b in res["eig_by_distance"]}
        assert list(by) == ["node", "0-2", "2-3", "3-4", "4-6", "6-inf", "beyond r_cut"]
        for name, b in by.items():
            if name not in (shell, "beyond r_cut"):
                assert b["occ_shift_meV"] == 0 and b["gap_meV"] == 0
    level = lambda r: 1000 * r["_arrays"]["eig_d"][:-1].mean()  # noqa: E731
    moved = {b["shell"]: b for b in biased["eig_by_distance"]}["4-6"]["occ_shift_meV"]
    assert abs(moved) > 1.0  # 1 meV per element adds up to more on the levels
    assert abs(moved - (level(biased) - level(exact))) < 0.05 * abs(moved)


def test_resume_with_another_loss_restarts_best(tmp_path, capsys):
    """A best value measured with the element loss alone would block best.pt for good once the
    eigenvalue term is added on resume; the trainer restarts it and says so."""
    from egnn import checkpoint

    def config(name, **train):
        cfg = {"data": {"train": [KP], "val": [KP], "r_cut": R_CUT, "cache": str(tmp_path / "cache")},
               "model": {"channels": 8, "layers": 1, "hidden": 8, "heads": 1, "num_rbf": 8},
               "train": {"lr": 3e-3, "seed": 3, **train}, "output": str(tmp_path / "run")}
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
        return str(tmp_path / name)

    assert main(["train", config("a.yaml", epochs=2)]) == 0
    assert checkpoint.load(str(tmp_path / "run" / "best.pt"))["best_loss"]["eig_weight"] == 0.0
    b = config("b.yaml", epochs=3, eig_weight=1.0)
    assert main(["train", b, "--resume", str(tmp_path / "run" / "last.pt")]) == 0
    assert "best.pt restarts" in capsys.readouterr().out
    best = checkpoint.load(str(tmp_path / "run" / "best.pt"))
    assert best["epoch"] == 3 and best["best_loss"]["eig_weight"] == 1.0


def test_site_potential_probe_gives_the_madelung_potential_of_rocksalt():
    """profiling/site_potential.py (docs/accuracy.md: the onsite errors are not the site potential)
    sums a Wolf potential over each atom's incoming edges: at r_cut 8 Å it must give NaCl's Madelung
    potential, −1.7476 k_e q / r0 at each ion, with opposite signs on the two sublattices."""
    import sys

    from ase.build import bulk

    from egnn.graph import radius_graph

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "profiling"))
    from site_potential import KE, formal_charges, wolf_potential

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    phi = wolf_potential(radius_graph(atoms, 8.0), formal_charges(atoms.numbers, {"Na": 1.0, "Cl": -1.0}), 0.2, 8.0)
    madelung = -1.747565 * KE / 2.82
    na = np.array(atoms.get_chemical_symbols()) == "Na"
    assert np.allclose(phi[na], madelung, rtol=0.015) and np.allclose(phi[~na], -madelung, rtol=0.015)


@pytest.mark.parametrize("alpha", [0.35, 0.45])
def test_long_wavelength_potential_completes_the_ewald_sum(alpha):
    """profiling/site_potential.py's φ_long is the reciprocal-space term of Ewald's sum: with the
    erfc-screened real-space sum and the self term (`ewald_potential`) it gives NaCl's Madelung
    potential at splittings where φ_long carries 1e-3-1e-2 of it (to 1e-4), and in a rattled
    monoclinic HfO2 cell with one axis doubled (no closed form there) the same potential for α and
    0.3 (to 1 meV of ~5 eV): a wrong prefactor, a lost k-vector or a reciprocal basis without its
    transpose would each move it by tenths of an eV. φ_long is linear in the charges."""
    import sys

    from ase.build import bulk

    from egnn.datagen import prototype

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "profiling"))
    from site_potential import KE, ewald_potential, long_wavelength_potential

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    q = np.where(np.array(atoms.get_chemical_symbols()) == "Na", 1.0, -1.0)
    assert np.allclose(ewald_potential(atoms, q, alpha), -1.747565 * KE / 2.82 * q, rtol=1e-4)
    cell = prototype("hfo2_m12").repeat((1, 1, 2))
    cell.positions += np.random.default_rng(1).normal(0.0, 0.2, cell.positions.shape)
    qh = np.where(cell.numbers == 8, -2.0, 4.0)
    assert np.allclose(ewald_potential(cell, qh, alpha), ewald_potential(cell, qh, 0.3), atol=1e-3)
    phi = long_wavelength_potential(cell.positions, cell.cell, qh)
    assert np.allclose(long_wavelength_potential(cell.positions, cell.cell, -2 * qh), -2 * phi)
    assert np.std(phi) > 0.1  # the doubled axis holds a long wave (m24_val: ~1 eV)


def test_long_range_probe_remainder_shrinks_with_the_reach(tmp_path):
    """profiling/long_range.py: the part of the Ewald potential a Wolf sum within a reach misses falls
    as the reach grows, to under 2 % of the potential's spread at 16 Å in a rattled 12-atom HfO2 cell;
    the report has a row per (cell, σ, reach), each with its cells."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "profiling"))
    import long_range
    from site_potential import ewald_potential, formal_charges, wolf_potential

    from egnn.datagen import prototype
    from egnn.graph import radius_graph

    atoms = prototype("hfo2_m12")
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.1, atoms.positions.shape)
    q = formal_charges(atoms.numbers, long_range.CHARGES)
    phi = ewald_potential(atoms, q)
    rest = [np.std(phi - wolf_potential(radius_graph(atoms, r), q, 0.1, r)) for r in (6.0, 10.0, 16.0)]
    assert rest[0] > rest[1] > rest[2] and rest[2] < 0.02 * np.std(phi), (rest, np.std(phi))
    long_range.main(["--repeat", "1", "--sigma", "0.1", "--reach", "8", "16", "--seeds", "2",
                     "--out", str(tmp_path / "lr.json")])
    rows = json.load(open(tmp_path / "lr.json"))["rows"]
    assert [(r["atoms"], r["reach_A"], len(r["cells"])) for r in rows] == [(12, 8.0, 2), (12, 16.0, 2)]
    assert rows[1]["beyond_O_meV"]["mean"] <= rows[0]["beyond_O_meV"]["mean"] < rows[0]["phi_O_meV"]


GETE = os.path.join(FIX, "gete_rs8_rattled_s0003")  # DZVP: S(Γ) has near-null directions (~5e-3)


def test_an_error_along_a_fragile_direction_makes_a_ghost_level(tmp_path):
    """What egnn.evaluate's ghost_levels counts: 0.5 eV of H error along the longest S-normalised
    direction of a DZVP GeTe cell pulls a level from tens of eV above the gap to below the occupied
    levels; the same error along an occupied level's direction moves it by at most 0.5 eV (no ghost)."""
    from egnn.evaluate import ghost_levels

    ds = open_datasets([GETE], 8.0, str(tmp_path / "cache"))[0]
    ds.overlap, ds.dtype = True, torch.float64
    x, basis = ds[0], ds.basis
    H0, S, _ = gamma_matrices(x, basis)
    e0, V = scipy.linalg.eigh(H0, S)
    norm2 = np.einsum("ij,ij->j", V, V)
    for k, want in ((int(np.argmax(norm2)), 1), (0, 0)):
        u = V[:, k] / np.sqrt(norm2[k])
        e1 = scipy.linalg.eigh(H0 - 0.5 * np.outer(u, u), S, eigvals_only=True)  # uᵀ ΔH u = -0.5 eV
        n_occ = 20  # Ge4Te4: 40 valence electrons
        assert ghost_levels(e1[:n_occ + 16], e0, n_occ) == want
        assert (e1[0] < e0[0] - 10) == bool(want)  # far below every occupied level
    assert norm2.max() > 50 and e0[np.argmax(norm2)] > 20  # a long vector of a high level
