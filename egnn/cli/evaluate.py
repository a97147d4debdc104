"""egnn evaluate --checkpoint CK DATA... [--json] [--plots DIR] [--cache DIR] [--edge-chunk N]

DATA: converted datasets (egnn data convert) or CP2K run folders (converted on the fly with the
checkpoint's r_cut into --cache, by default a temporary folder removed afterwards).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile


def add_arguments(p) -> None:
    p.add_argument("data", nargs="+", metavar="DATA", help="converted datasets or CP2K run folders")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object with all metrics")
    p.add_argument("--plots", metavar="DIR", default=None, help="write the figures into DIR")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="keep converted run folders here (default: a temporary folder)")
    p.add_argument("--edge-chunk", type=int, default=None, help="edges per model chunk (bounds memory)")
    p.add_argument("--per-structure", action="store_true", help="also print one line per structure")


def _clean(o):
    """JSON without NaN (null instead), as strict parsers want."""
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def _print(r: dict, per_structure: bool) -> None:
    print(f"{r['structures']} structures, {r['elements']} orbital matrix elements")
    print(f"{'':24s}{'MAE (meV)':>12s}{'shift removed':>16s}")
    for key, label in (("", "all blocks"), ("_node", "node blocks"), ("_edge", "edge blocks")):
        print(f"{label:24s}{r[f'mae{key}_meV']:12.2f}{r[f'mae{key}_shifted_meV']:16.2f}")
    for k, v in r["per_element_node"].items():
        print(f"  node {k:18s}{v['mae_meV']:12.2f}{v['mae_shifted_meV']:16.2f}")
    for k, v in r["per_pair"].items():
        print(f"  edge {k:18s}{v['mae_meV']:12.2f}{v['mae_shifted_meV']:16.2f}")
    print("vs distance (Å):")
    for b in r["vs_distance"]:
        print(f"  {b['r_lo']:4.1f}-{b['r_hi']:4.1f} {b['n']:>10d}{b['mae_meV']:12.2f}{b['mae_shifted_meV']:16.2f}")
    print(f"eigenvalues at Γ (occupied + first unoccupied): MAE {r['eig_mae_meV']:.2f} meV "
          f"({r['eig_rel_percent']:.3f} %), shift removed {r['eig_mae_shifted_meV']:.2f} meV "
          f"({r['eig_rel_shifted_percent']:.3f} %); occupied {r['eig_occ_mae_meV']:.2f} meV, "
          f"first unoccupied {r['eig_lumo_mae_meV']:.2f} meV; band gap MAE {r['gap_mae_meV']:.2f} meV")
    if r["ghost_levels"]:
        print(f"GHOST LEVELS: {r['ghost_levels']} predicted Γ level(s) in {r['ghost_structures']} structure(s) below the DFT "
              "mid-gap beyond the occupied count (H errors along near-null directions of S, egnn.evaluate); the "
              "eigenvalue figures of those structures do not compare level by level. Structures unlike the training "
              "data make them: train on cells nearer these")
    print("where the Γ-level errors come from (first order, per block shell): mean shift of the occupied levels | "
          "gap change (mean, mean |.|), meV")
    for b in r.get("eig_by_distance", []):
        print(f"  {b['shell']:>12s} {b['occ_shift_meV']:+10.1f} {b['gap_meV']:+10.1f} {b['gap_meV_abs']:8.1f}")
    if "band_mae_meV" in r:
        print(f"bands ({r['band_structures']} real-space structures; path + Monkhorst-Pack points; occupied + "
              f"first empty bands): MAE {r['band_mae_meV']:.2f} meV (occupied {r['band_occ_mae_meV']:.2f}, empty "
              f"{r['band_empty_mae_meV']:.2f}), shift removed {r['band_mae_shifted_meV']:.2f} meV; "
              f"band gap MAE {r['band_gap_mae_meV']:.2f} meV")
    if per_structure:
        for s in r["per_structure"]:
            print(f"  {s['name']:32s} {s['mode']:10s} MAE {s['mae_meV']:9.2f} (shifted {s['mae_shifted_meV']:8.2f}) "
                  f"eig {s['eig_mae_meV']:8.2f} meV gap DFT {s['gap_dft_eV']:.3f} pred {s['gap_pred_eV']:.3f} eV "
                  f"c {s['energy_shift_eV']:+.4f} eV [{s['eig_reference']}]")


def run(args) -> int:
    from ..errors import InputError
    from ..evaluate import evaluate, make_plots
    from ..train import model_from_checkpoint, open_datasets

    if args.edge_chunk is not None and args.edge_chunk < 1:
        raise InputError(f"--edge-chunk {args.edge_chunk}: must be a positive number of edges")
    for d in args.data:
        if not os.path.isdir(d):
            raise InputError(f"{d}: not a folder; give converted datasets or CP2K run folders")
    model = model_from_checkpoint(args.checkpoint)
    cache = args.cache or tempfile.mkdtemp(prefix="egnn-evaluate-")
    try:
        datasets = open_datasets(args.data, float(model.config.r_cut), cache)
        result = evaluate(model, datasets, edge_chunk=args.edge_chunk, keep_arrays=bool(args.plots),
                          progress=not args.json)
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)
    if args.plots:
        result["plots"] = make_plots(result, args.plots)
    result.pop("_arrays", None)
    result["checkpoint"] = os.path.abspath(args.checkpoint)
    if args.json:
        print(json.dumps(_clean(result)))
    else:
        _print(result, args.per_structure)
        if args.plots:
            print("figures: " + ", ".join(result["plots"]), file=sys.stderr)
    return 0
