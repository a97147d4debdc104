"""Are a checkpoint's onsite-energy errors the electrostatic site potential? (docs/accuracy.md)

    .venv/bin/python profiling/site_potential.py --checkpoint pretrained:hfo2_szv \
        --train configs/hfo2_szv_full.yaml [--split m12_val ...] [--charges Hf=4,O=-2] [--out JSON]

Per atom: the onsite level errors (diagonal of the predicted minus the DFT onsite block, per
orbital) and two point-charge potentials of formal charges:

* φ, Wolf-summed over the atom's own incoming edges (r < r_cut: φ_i = k_e {Σ_j q_j [erfc(α r_ij)/r_ij
  − erfc(α r_c)/r_c] − q_i [erfc(α r_c)/r_c + 2α/√π]}, the damped, shifted Coulomb sum whose
  charge-neutral sphere converges like Ewald's sum: rocksalt's Madelung potential within 1.5 % at
  r_c = 8 Å, α = 0.2/Å). Local: what a model with that reach can know.
* φ_long, the reciprocal-space term of the Ewald sum with splitting α_long = 0.25/Å, (4π k_e / V)
  Σ_{k≠0} exp(−k²/4α²)/k² Re[S(k) e^{−ik·r_i}]: the potential of wavelengths ≳ 10 Å (weight 1/e at
  12.6 Å), which only cells about that long can hold (12-atom HfO2 cells, 5 Å across: RMS ~15 meV;
  one axis doubled: ~1 eV). A model trained on cells without it cannot learn it.

It prints, per split and element: how the DFT onsite levels follow φ (correlation), how the model's
level errors follow φ and φ_long, the slope of the mean level error on φ_long (a screened,
orbital-independent shift has one slope per element), and what a linear correction c·φ + b per
(element, orbital) does to the held-out errors when it is fitted on the training atoms (what a
site-potential term in the model could at best learn from them) and when it is fitted on the
held-out atoms themselves (an upper bound); for φ_long, the offset b alone and c·φ_long + b, both
fitted on the held-out atoms, so that φ_long's own share is their difference. φ is local to each
atom's incoming edges (no global step in the distributed scheme); φ_long is not.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from scipy.special import erfc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402
from accuracy_splits import SPLITS  # noqa: E402

KE = 14.399645  # e² / (4π ε0), eV·Å
ALPHA_LONG = 0.25  # 1/Å: φ_long holds wavelengths ≳ 10 Å (Gaussian weight 1/e at 2π/(2α) = 12.6 Å)


def _screened_sum(graph, q, alpha: float) -> np.ndarray:
    """Σ_j q_j erfc(α r_ij)/r_ij [N] over each atom's incoming edges of an egnn.graph.AtomGraph."""
    r = np.linalg.norm(graph.vec, axis=1)
    out = np.zeros(len(q))
    np.add.at(out, graph.dst, q[graph.src] * erfc(alpha * r) / r)
    return out


def wolf_potential(graph, q, alpha: float, r_cut: float) -> np.ndarray:
    """φ [N] in eV of charges q [N], summed over each atom's incoming edges (r < r_cut) of the graph."""
    shift = erfc(alpha * r_cut) / r_cut
    own = np.zeros(len(q))
    np.add.at(own, graph.dst, q[graph.src])  # the shift of each edge, summed
    # the charge's own screening
    return KE * (_screened_sum(graph, q, alpha) - shift * own - q * (shift + 2 * alpha / np.sqrt(np.pi)))


def formal_charges(numbers, charges: dict) -> np.ndarray:
    """q [N] of atomic numbers from {symbol: charge}."""
    from ase.data import chemical_symbols

    return np.array([charges[chemical_symbols[int(z)]] for z in np.asarray(numbers)])


def long_wavelength_potential(positions, cell, q, alpha: float = ALPHA_LONG, tol: float = 1e-10) -> np.ndarray:
    """φ_long [N] in eV: the reciprocal-space term of the Ewald sum of point charges q [N] (neutral) in
    the periodic cell, (4π k_e / V) Σ_{k≠0} exp(−k²/4α²)/k² Re[S(k) e^{−ik·r_i}], over every k whose
    Gaussian factor exceeds `tol` (|k| ≤ 2α·sqrt(ln 1/tol); |n_i| ≤ |k|·|a_i|/2π bounds the grid in
    any cell). k and −k give the same term: half of them, doubled."""
    cell = np.asarray(cell, dtype=float)
    V = abs(np.linalg.det(cell))
    B = 2 * np.pi * np.linalg.inv(cell).T  # reciprocal vectors as rows
    kmax = 2 * alpha * np.sqrt(np.log(1 / tol))
    n = [int(np.ceil(kmax * np.linalg.norm(a) / (2 * np.pi))) for a in cell]
    grid = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in n], indexing="ij"), -1).reshape(-1, 3)
    grid = grid[[tuple(g) > (0, 0, 0) for g in grid]]  # one of each ±k pair
    k = grid @ B
    k2 = (k * k).sum(1)
    gauss = np.exp(-k2 / (4 * alpha**2))
    k, w = k[gauss > tol], (gauss / k2)[gauss > tol]
    e = np.exp(1j * (np.asarray(positions, dtype=float) @ k.T))  # [N, K]
    S = np.asarray(q, dtype=float) @ e
    return KE * 8 * np.pi / V * (np.real(S * e.conj()) @ w)


def ewald_potential(atoms, q, alpha: float = 0.3, real_cut: float = 12.0) -> np.ndarray:
    """φ [N] in eV of point charges q in the periodic cell of `atoms`: erfc-screened real space over
    edges within real_cut (erfc(α·real_cut) ≈ 2e-7 at the defaults), φ_long and the self term."""
    from egnn.graph import radius_graph

    phi_long = long_wavelength_potential(atoms.positions, atoms.cell, q, alpha)
    real = _screened_sum(radius_graph(atoms, real_cut), q, alpha)
    return KE * (real - 2 * alpha / np.sqrt(np.pi) * q) + phi_long


@torch.no_grad()
def onsite_levels(model, x):
    """(element per atom, predicted − DFT onsite diagonal per atom [list of arrays], DFT diagonal)."""
    from ase.data import chemical_symbols

    from egnn import blocks as B
    from egnn.evaluate import _np64

    g = x.graph
    numbers = np.asarray(g.numbers)
    node, edge = model(x.species.long(), torch.from_numpy(g.src), torch.from_numpy(g.dst),
                       torch.from_numpy(g.vec).to(next(model.parameters()).dtype))
    if x.mode == "folded":  # atom i's (i, i) pair: its node block plus its own images
        pairs = B.fold(node.double(), edge.double(), x.edge_fold.long(), x.node_fold.long(), len(x.pair_target))
        pred, target = _np64(pairs[x.node_fold.long()]), _np64(x.pair_target[x.node_fold.long()])
    else:
        pred, target = _np64(node), _np64(x.node_target)
    els, err, dft = [], [], []
    for k, z in enumerate(numbers):
        a = chemical_symbols[z]
        bp = B.from_coupled(pred[k:k + 1], a, a, model.basis)[0]
        bt = B.from_coupled(target[k:k + 1], a, a, model.basis)[0]
        els.append(a)
        err.append(np.diag(bp - bt))
        dft.append(np.diag(bt))
    return els, err, dft


def collect(model, runs, charges, alpha, cache) -> dict:
    """{element: (φ [n], level errors [n, orbitals], DFT levels [n, orbitals], φ_long [n])} over the runs'
    atoms."""
    from egnn.evaluate import _iter_samples
    from egnn.train import open_datasets

    rows = {}
    r_cut = float(model.config.r_cut)
    for x, _, _ in _iter_samples(open_datasets(runs, r_cut, cache), model):
        g = x.graph
        q = formal_charges(g.numbers, charges)
        phi = wolf_potential(g, q, alpha, r_cut)
        phi_long = long_wavelength_potential(g.positions, g.cell, q)
        els, err, dft = onsite_levels(model, x)
        for a, p, e, d, pl in zip(els, phi, err, dft, phi_long):
            rows.setdefault(a, []).append((p, e, d, pl))
    return {a: tuple(np.array([r[i] for r in v]) for i in range(4)) for a, v in rows.items()}


def linear_fix(phi, err):
    """Least-squares (c, b) per orbital of err ≈ c·φ + b: [2, orbitals]."""
    X = np.stack([phi, np.ones_like(phi)], 1)
    return np.linalg.lstsq(X, err, rcond=None)[0]


LEVEL_COLUMNS = ("level_err_meV", "after_train_fit_meV", "after_oracle_fit_meV", "after_offset_meV",
                 "after_long_oracle_fit_meV")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True, help="training config whose data.train atoms fit the correction")
    p.add_argument("--split", action="append", choices=sorted(SPLITS))
    p.add_argument("--charges", default="Hf=4,O=-2", help="formal charges, e.g. Hf=4,O=-2")
    p.add_argument("--alpha", type=float, default=0.2, help="Wolf damping, 1/Å")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from egnn.train import default_cache_dir, flatten_paths, load_config, model_from_checkpoint

    charges = {k: float(v) for k, v in (kv.split("=") for kv in a.charges.split(","))}
    cache = default_cache_dir()
    model = model_from_checkpoint(a.checkpoint)
    train = collect(model, flatten_paths(load_config(a.train).data["train"]), charges, a.alpha, cache)
    fits = {el: linear_fix(phi, err) for el, (phi, err, _, _) in train.items()}
    out = {}
    print(f"{'split':8s}{'el':>3s}{'atoms':>6s}  corr(φ, DFT level)  corr(φ, error)  RMS φ_long meV  "
          "corr(φ_long, error)  slope  mean |level error| meV: as is / − c·φ + b fitted on training atoms / on "
          "these atoms / − b on these atoms / − c·φ_long + b on these atoms")
    for split in a.split or ["m12_val", "m24_val", "m96"]:
        for el, (phi, err, dft, pl) in collect(model, SPLITS[split](), charges, a.alpha, cache).items():
            X = np.stack([phi, np.ones_like(phi)], 1)
            XL = np.stack([pl, np.ones_like(pl)], 1)
            lev = err.mean(1)
            row = {"atoms": len(phi), "corr_phi_dft": float(np.corrcoef(phi, dft.mean(1))[0, 1]),
                   "corr_phi_err": float(np.corrcoef(phi, lev)[0, 1]),
                   "rms_phi_long_meV": 1000 * float(pl.std()),
                   "corr_phi_long_err": float(np.corrcoef(pl, lev)[0, 1]),
                   "slope_phi_long": float(linear_fix(pl, lev)[0]),
                   "level_err_meV": 1000 * float(np.abs(err).mean()),
                   "after_train_fit_meV": 1000 * float(np.abs(err - X @ fits[el]).mean()),
                   "after_oracle_fit_meV": 1000 * float(np.abs(err - X @ linear_fix(phi, err)).mean()),
                   "after_offset_meV": 1000 * float(np.abs(err - err.mean(0)).mean()),
                   "after_long_oracle_fit_meV": 1000 * float(np.abs(err - XL @ linear_fix(pl, err)).mean())}
            out.setdefault(split, {})[el] = row
            print(f"{split:8s}{el:>3s}{row['atoms']:6d}  {row['corr_phi_dft']:+18.2f}  {row['corr_phi_err']:+14.2f}  "
                  f"{row['rms_phi_long_meV']:14.0f}  {row['corr_phi_long_err']:+19.2f}  {row['slope_phi_long']:+5.2f}  "
                  + " / ".join(f"{row[k]:6.0f}" for k in LEVEL_COLUMNS))
    if a.out:
        write_json({"checkpoint": a.checkpoint, "charges": charges, "alpha": a.alpha, "alpha_long": ALPHA_LONG,
                    **out}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
