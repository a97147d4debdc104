"""egnn demo [--out DIR] [--minutes M]: the whole job on the shipped HfO2 data.

Trains the model on the shipped CP2K k-point runs (all but the last), evaluates the held-out run
(MAE of H in meV on the orbital-basis blocks, eigenvalue errors), predicts H for the held-out cell
tiled 2x2x2, and prints where the checkpoint, metrics, figures and matrices are.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_data", "hfo2_kp")


def demo_config(out: str, minutes: float, epochs: int) -> dict:
    runs = sorted(glob.glob(os.path.join(DEMO_DATA, "hfo2_m12_rattled_*")))
    return {
        "data": {"train": runs[:-1], "val": runs[-1:], "r_cut": 8.0},
        # ~1 M parameters; smooth attention: continuous as atoms cross r_cut, as good (docs/accuracy.md, R8)
        "model": {"lmax": 4, "mmax": 4, "channels": 16, "layers": 2, "heads": 2, "hidden": 32, "attention": "smooth"},
        "train": {"epochs": epochs, "lr": 5e-3, "lr_patience": 15, "lr_factor": 0.5, "max_minutes": minutes,
                  "checkpoint_every": 25, "seed": 0, "node_weight": 20.0},
        "output": os.path.join(out, "train"),
    }


def add_arguments(p):
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--minutes", type=float, default=8.0, help="CPU minutes of training (default 8)")
    p.add_argument("--epochs", type=int, default=2000, help="upper bound on epochs (default 2000)")
    p.add_argument("--tile", default="2x2x2", help="supercell of the held-out cell to predict (default 2x2x2)")


def run(args) -> int:
    from ..errors import InputError
    from ..train import load_config, train_from_config

    if not os.path.isdir(DEMO_DATA):
        raise InputError(f"demo data not found at {DEMO_DATA}; reinstall egnn from a full checkout")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cfg = load_config(demo_config(out, args.minutes, args.epochs))
    t0 = time.time()
    print(f"[1/3] training on {len(cfg.data['train'])} CP2K runs for up to {args.minutes:g} min "
          f"(validation: {os.path.basename(cfg.data['val'][0])})")
    result = train_from_config(cfg, progress=True, overwrite=True)  # a rerun replaces the demo's own files
    ck = os.path.join(out, "checkpoint.pt")
    shutil.copyfile(os.path.join(cfg.output, "best.pt"), ck)
    print(f"      {result['epoch']} epochs in {result['wall_s'] / 60:.1f} min; "
          f"validation MAE (coupled basis) {result['val_mae_meV']:.2f} meV")
    summary = {"checkpoint": ck, "metrics": os.path.join(cfg.output, "metrics.jsonl"), "train": result}
    summary.update(_evaluate_and_predict(ck, cfg.data["val"], out, args.tile))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"done in {(time.time() - t0) / 60:.1f} min. Files:")
    for k, v in summary.items():
        if isinstance(v, str):
            print(f"  {k:12s} {v}")
    print(f"  {'summary':12s} {os.path.join(out, 'summary.json')}")
    return 0


def _evaluate_and_predict(ck: str, val_runs: list, out: str, tile: str) -> dict:
    from ..evaluate import evaluate, make_plots
    from ..predict import parse_tile, predict_to_files, read_input
    from ..train import model_from_checkpoint, open_datasets

    model = model_from_checkpoint(ck)
    print(f"[2/3] evaluating on {', '.join(os.path.basename(r) for r in val_runs)}")
    datasets = open_datasets(val_runs, model.config.r_cut, os.path.join(out, "cache"))
    res = evaluate(model, datasets, keep_arrays=True)
    make_plots(res, os.path.join(out, "plots"))
    res.pop("_arrays", None)
    with open(os.path.join(out, "evaluate.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"      H MAE {res['mae_meV']:.2f} meV (node {res['mae_node_meV']:.2f}, edge {res['mae_edge_meV']:.2f}); "
          f"after the energy-zero shift {res['mae_shifted_meV']:.2f} meV")
    print(f"      eigenvalues at Γ: occupied MAE {res['eig_occ_mae_meV']:.1f} meV "
          f"({res['eig_rel_percent']:.2f} % of |ε|), gap error {res['gap_mae_meV']:.1f} meV")
    if "band_mae_meV" in res:
        print(f"      bands (path + k-mesh, occupied + {4} empty): MAE {res['band_mae_meV']:.1f} meV, "
              f"band gap error {res['band_gap_mae_meV']:.1f} meV; figures in {os.path.join(out, 'plots')}")
    atoms, _ = read_input(val_runs[0])
    big = atoms.repeat(parse_tile(tile))
    print(f"[3/3] predicting H of the held-out cell tiled {tile} ({len(big)} atoms)")
    t0 = time.time()
    stem = f"{os.path.basename(val_runs[0].rstrip('/'))}_{tile}"
    pred_dir = os.path.join(out, "predict")
    rep = predict_to_files(model, big, pred_dir, stem, ("rows", "gamma", "cp2k"), binary=True, overwrite=True)
    files = rep["files"]
    print(f"      {rep['nonzeros']:,} non-zeros in {time.time() - t0:.1f} s: {len(files)} files "
          f"({rep['bytes'] / 2**20:.1f} MiB; rows, Γ npz, binary CP2K .csr)")
    return {"evaluate": os.path.join(out, "evaluate.json"), "plots": os.path.join(out, "plots"),
            "prediction": os.path.join(pred_dir, f"{stem}_H.npz"), "mae_meV": res["mae_meV"],
            "mae_node_meV": res["mae_node_meV"], "mae_edge_meV": res["mae_edge_meV"],
            "eig_occ_mae_meV": res["eig_occ_mae_meV"], "eig_rel_percent": res["eig_rel_percent"],
            "band_mae_meV": res.get("band_mae_meV"), "band_gap_mae_meV": res.get("band_gap_mae_meV"),
            "predicted_files": len(files)}
