"""Are a checkpoint's onsite-energy errors the electrostatic site potential? (docs/accuracy.md)

    .venv/bin/python profiling/site_potential.py --checkpoint pretrained:hfo2_szv \
        --train configs/hfo2_szv_full.yaml [--split m12_val ...] [--charges Hf=4,O=-2] [--out JSON]

Per atom: the onsite level errors (diagonal of the predicted minus the DFT onsite block, per
orbital) and a Wolf-summed point-charge potential of formal charges over the atom's own incoming
edges (r < r_cut: φ_i = k_e {Σ_j q_j [erfc(α r_ij)/r_ij − erfc(α r_c)/r_c] − q_i [erfc(α r_c)/r_c +
2α/√π]}, the damped, shifted Coulomb sum whose charge-neutral sphere converges like Ewald's sum:
rocksalt's Madelung potential within 1.5 % at r_c = 8 Å, α = 0.2/Å). It prints, per split and
element: how the DFT onsite levels follow φ (correlation), how the model's level errors do, and
what a linear correction c·φ + b per (element, orbital) does to the held-out errors when it is
fitted on the training atoms (what a site-potential term in the model could at best learn from
them) and when it is fitted on the held-out atoms themselves (an upper bound). Local to each
atom's incoming edges, so a term like this would need no global step in the distributed scheme.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from scipy.special import erfc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_splits import SPLITS  # noqa: E402

KE = 14.399645  # e² / (4π ε0), eV·Å


def wolf_potential(x, charges: dict, alpha: float, r_cut: float) -> np.ndarray:
    """φ [N] in eV of formal charges, summed over each atom's incoming edges of the sample's graph."""
    from ase.data import chemical_symbols

    g = x.graph
    q = np.array([charges[chemical_symbols[z]] for z in np.asarray(g.numbers)])
    r = np.linalg.norm(g.vec, axis=1)
    phi = np.zeros(len(q))
    np.add.at(phi, g.dst, q[g.src] * (erfc(alpha * r) / r - erfc(alpha * r_cut) / r_cut))
    phi -= q * (erfc(alpha * r_cut) / r_cut + 2 * alpha / np.sqrt(np.pi))  # the charge's own screening
    return KE * phi


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
    """{element: (φ [n], level errors [n, orbitals], DFT levels [n, orbitals])} over the runs' atoms."""
    from egnn.evaluate import _iter_samples
    from egnn.train import open_datasets

    rows = {}
    r_cut = float(model.config.r_cut)
    for x, _, _ in _iter_samples(open_datasets(runs, r_cut, cache), model):
        phi = wolf_potential(x, charges, alpha, r_cut)
        els, err, dft = onsite_levels(model, x)
        for a, p, e, d in zip(els, phi, err, dft):
            rows.setdefault(a, []).append((p, e, d))
    return {a: tuple(np.array([r[i] for r in v]) for i in range(3)) for a, v in rows.items()}


def linear_fix(phi, err):
    """Least-squares (c, b) per orbital of err ≈ c·φ + b: [2, orbitals]."""
    X = np.stack([phi, np.ones_like(phi)], 1)
    return np.linalg.lstsq(X, err, rcond=None)[0]


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
    fits = {el: linear_fix(phi, err) for el, (phi, err, _) in train.items()}
    out = {}
    print(f"{'split':8s}{'el':>3s}{'atoms':>6s}  corr(φ, DFT level)  corr(φ, error)  "
          f"mean |level error| meV: as is / − fit on training atoms / − fit on these atoms")
    for split in a.split or ["m12_val", "m24_val", "m96"]:
        for el, (phi, err, dft) in collect(model, SPLITS[split](), charges, a.alpha, cache).items():
            X = np.stack([phi, np.ones_like(phi)], 1)
            row = {"atoms": len(phi), "corr_phi_dft": float(np.corrcoef(phi, dft.mean(1))[0, 1]),
                   "corr_phi_err": float(np.corrcoef(phi, err.mean(1))[0, 1]),
                   "level_err_meV": 1000 * float(np.abs(err).mean()),
                   "after_train_fit_meV": 1000 * float(np.abs(err - X @ fits[el]).mean()),
                   "after_oracle_fit_meV": 1000 * float(np.abs(err - X @ linear_fix(phi, err)).mean())}
            out.setdefault(split, {})[el] = row
            print(f"{split:8s}{el:>3s}{row['atoms']:6d}  {row['corr_phi_dft']:+18.2f}  {row['corr_phi_err']:+14.2f}  "
                  f"{row['level_err_meV']:6.0f} / {row['after_train_fit_meV']:6.0f} / {row['after_oracle_fit_meV']:6.0f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"checkpoint": a.checkpoint, "charges": charges, "alpha": a.alpha, **out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
