"""Onsite-block ablations (issue 11): which change makes the node blocks generalise?

    .venv/bin/python profiling/ablate_onsite.py [--variant NAME ...] [--epochs-scale 1.0]

Each variant trains the demo-sized model (2 layers, 16 channels) for a fixed number of epochs (not
minutes, so other jobs on the machine do not change the result) and is evaluated on
  * in distribution: shared hfo2_kp s0020-s0023 (σ = 0.1 Å, never trained on),
  * held out: the generated families hfo2_m12_val (σ = 0.22 Å, ±3 % strain) and hfo2_m24_val
    (24 atoms, σ = 0.20 Å, ±3 %), which no variant trains on.
Data: "small" = the 5 shipped demo runs; "full" = shared hfo2_kp s0000-s0019 and the generated
12-atom families hfo2_m12_d05, _d15 and _strain (44 structures; `egnn data generate hfo2 -o
data/generated` makes them). One JSON line per variant goes to profiling/results/ablate_onsite.jsonl
(appended; a finished variant is skipped); the table is printed at the end.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_splits import GEN, ROOT, SHARED, SPLITS, summary  # noqa: E402

RESULTS = os.path.join(ROOT, "profiling", "results", "ablate_onsite.jsonl")

DATA = {
    "small": lambda: sorted(glob.glob(os.path.join(ROOT, "egnn", "demo_data", "hfo2_kp", "*")))[:5],
    "full": lambda: sorted(glob.glob(os.path.join(SHARED, "hfo2_kp", "hfo2_m12_rattled_s00[01]?")))
    + sorted(glob.glob(os.path.join(GEN, "hfo2_m12_d05", "*_s*")) + glob.glob(os.path.join(GEN, "hfo2_m12_d15", "*_s*"))
             + glob.glob(os.path.join(GEN, "hfo2_m12_strain", "*_s*"))),
}
VAL_IN = SPLITS["in_dist"]
HELD_OUT = {k: SPLITS[k] for k in ("m12_val", "m24_val")}

# name: (data, epochs, model overrides, train overrides)
VARIANTS = {
    "small_baseline": ("small", 300, {}, {}),
    "small_onsite_edges": ("small", 300, {"onsite": "node+edges"}, {}),
    "full_baseline": ("full", 40, {}, {}),
    "full_onsite_edges": ("full", 40, {"onsite": "node+edges"}, {}),
    "full_head_all": ("full", 40, {"node_head_input": "all"}, {}),
    "full_both": ("full", 40, {"onsite": "node+edges", "node_head_input": "all"}, {}),
    "full_both_nw5": ("full", 40, {"onsite": "node+edges", "node_head_input": "all"}, {"node_weight": 5.0}),
    # the fitted two-centre reference alone (0 epochs: the network's output scaled to zero), then
    # with the network learning its residual
    "small_ref_only": ("small", 0, {"reference": "two_centre"}, {}),
    "full_ref_only": ("full", 0, {"reference": "two_centre"}, {}),
    "small_reference": ("small", 300, {"reference": "two_centre"}, {}),
    "full_reference": ("full", 40, {"reference": "two_centre"}, {}),
}
MODEL = {"lmax": 4, "mmax": 4, "channels": 16, "layers": 2, "heads": 2, "hidden": 32}
TRAIN = {"lr": 5e-3, "lr_patience": 5, "lr_factor": 0.5, "checkpoint_every": 10, "seed": 0, "node_weight": 20.0}


def run_variant(name: str, epochs_scale: float, out_root: str, threads: int) -> dict:
    import torch

    from egnn.evaluate import evaluate
    from egnn.train import default_cache_dir, load_config, model_from_checkpoint, open_datasets, train_from_config

    torch.set_num_threads(threads)
    data, epochs, model_kw, train_kw = VARIANTS[name]
    train_runs = DATA[data]()
    cfg = load_config({"data": {"train": train_runs, "val": VAL_IN(), "r_cut": 8.0},
                       "model": {**MODEL, **model_kw},
                       "train": {**TRAIN, **train_kw, "epochs": max(1, round(epochs * epochs_scale))},
                       "output": os.path.join(out_root, name)})
    cache = default_cache_dir()
    t0 = time.time()
    if epochs:
        res = train_from_config(cfg, progress=False)
        model = model_from_checkpoint(os.path.join(cfg.output, "best.pt"))
    else:
        model, res = _reference_only(cfg, train_runs, cache)
    train_s = time.time() - t0
    row = {"variant": name, "data": data, "train_structures": len(train_runs), "epochs": res["epoch"],
           "model": model_kw, "train": train_kw, "train_minutes": train_s / 60, "threads": threads,
           "final_val_mae_meV": res["val_mae_meV"]}
    sets = {"in_dist": VAL_IN(), **{k: f() for k, f in HELD_OUT.items()}}
    for key, runs in sets.items():
        if runs:
            row[key] = summary(evaluate(model, open_datasets(runs, 8.0, cache)))
    return row


def _reference_only(cfg, train_runs, cache):
    """The model's fitted two-centre reference with the network switched off (output scales 0)."""
    from egnn.model import HamiltonianModel, ModelConfig
    from egnn.train import fit_output_stats, load_samples, open_datasets

    ds = open_datasets(train_runs, cfg.r_cut, cache)
    model = HamiltonianModel(ModelConfig.from_dict({**cfg.model, "basis": ds[0].basis, "r_cut": cfg.r_cut}))
    fit_output_stats(model, load_samples(ds, ds[0].basis))
    for b in (model.node_scale, model.edge_scale, model.node_shift):
        b.zero_()
    return model.eval(), {"epoch": 0, "val_mae_meV": float("nan")}


def _done() -> set:
    if not os.path.isfile(RESULTS):
        return set()
    with open(RESULTS) as f:
        return {json.loads(line)["variant"] for line in f if line.strip()}


def _table(rows):
    cols = [("in_dist", "node"), ("in_dist", "eig_rel_percent"), ("m12_val", "mae"), ("m12_val", "node"),
            ("m12_val", "pairs_lt_2A"), ("m12_val", "eig_rel_percent"), ("m12_val", "gap"), ("m12_val", "band_mae"),
            ("m24_val", "node"), ("m24_val", "eig_rel_percent"), ("m24_val", "band_mae")]
    head = f"{'variant':22s}{'ep':>4s}" + "".join(f"{a[:6] + ':' + b[:9]:>18s}" for a, b in cols)
    print(head)
    for r in rows:
        vals = "".join(f"{(r.get(a) or {}).get(b, float('nan')) or float('nan'):18.2f}" for a, b in cols)
        print(f"{r['variant']:22s}{r['epochs']:4d}{vals}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="run only these (repeatable)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every variant's epochs")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablate_onsite"), help="training output root")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant (default 1)")
    p.add_argument("--table", action="store_true", help="only print the table of finished variants")
    a = p.parse_args(argv)
    if not a.table:
        for name in a.variant or list(VARIANTS):
            if name in _done():
                print(f"{name}: done earlier")
                continue
            row = run_variant(name, a.epochs_scale, a.out, a.threads)
            os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    with open(RESULTS) as f:
        _table([json.loads(line) for line in f if line.strip()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
