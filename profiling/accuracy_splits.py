"""Accuracy of a checkpoint on the fixed data splits of README "Accuracy" (HfO2 SZV or GeTe DZVP).

    .venv/bin/python profiling/accuracy_splits.py --checkpoint CK [--split NAME ...] [--out JSON]
        [--export egnn/pretrained/hfo2_szv.pt [--training "how it was trained"]]
                                                 # also write CK as the shipped checkpoint, card included

The material follows from the checkpoint's elements. Paths are relative to the checkout; ../shared
is the shared data, data/generated what `egnn data generate hfo2 gete -o data/generated` makes.
HfO2 (SZV) splits:
  in_dist  shared hfo2_kp s0020-s0023: σ = 0.1 Å like most training data, never trained on
  m12_val  generated hfo2_m12_val: 8 × 12 atoms, σ = 0.22 Å, ±3 % strain (held out entirely)
  m24_val  generated hfo2_m24_val: 6 × 24 atoms, σ = 0.20 Å, ±3 % strain (held out entirely)
  m96      shared hfo2_gamma/hfo2_m96_rattled_000: 96 atoms, Γ only, σ = 0.1 Å (train small, predict large;
           Γ is not the training cells' k-sampling, so this also measures that difference)
  m96_val  generated hfo2_m96_val: 1 × 96 atoms, σ = 0.1 Å, on the training cells' k-points (folded)
GeTe (DZVP) splits:
  in_dist  shared gete_kp s0014-s0015: σ = 0.1 Å like the shared training runs (the configs' validation)
  rs8_val  generated gete_rs8_val: 8 × 8 atoms, σ = 0.25 Å, ±3 % strain (held out entirely)
  rs64     generated gete_rs64_val: 2 × 64 atoms, σ = 0.1 Å, on the training cells' k-points (folded;
           until 2026-12-05 at Γ) (train small, predict large)
--fit adds a few cells of the largest-σ training families of each cell size (fit_* rows; training data, so
never on a card): how well the model fits what it was trained on. Where a fit row is as far off as the
held-out rows of the same cell size, the model underfits those cells, and more cells of that kind will
not help; where it is far better, it is the held-out geometry that is new.
Prints one row per split (node MAE per species, pairs < 2 Å, occupied eigenvalues, gap, bands) and
writes the full `egnn evaluate` results as JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "cp2k")
GEN = os.path.join(ROOT, "data", "generated")


@dataclass(frozen=True)
class Split:
    """The run folders root/folder/pattern; calling it lists them."""

    root: str  # SHARED or GEN
    folder: str  # a shared data set or a generated family
    pattern: str

    def __call__(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.root, self.folder, self.pattern)))


SPLITS = {  # HfO2
    "in_dist": Split(SHARED, "hfo2_kp", "hfo2_m12_rattled_s002[0-3]"),
    "m12_val": Split(GEN, "hfo2_m12_val", "*_s*"),
    "m24_val": Split(GEN, "hfo2_m24_val", "*_s*"),
    "m96": Split(SHARED, "hfo2_gamma", "hfo2_m96_rattled_000"),
    "m96_val": Split(GEN, "hfo2_m96_val", "*_s*"),
}
GETE_SPLITS = {
    "in_dist": Split(SHARED, "gete_kp", "gete_rs8_rattled_s001[4-5]"),
    "rs8_val": Split(GEN, "gete_rs8_val", "*_s*"),
    "rs64": Split(GEN, "gete_rs64_val", "*_s*"),
}
# --fit: cells of training families (role "train" in egnn.datagen.PLANS)
FIT_SPLITS = {
    "hfo2": {"fit_m12": Split(GEN, "hfo2_m12_d18s", "*_s000[0-7]"),
             "fit_m24": Split(GEN, "hfo2_m24_d20s", "*_s000[0-5]"),
             "fit_m96": Split(GEN, "hfo2_m96_d12", "*_s*")},
    "gete": {"fit_rs8": Split(GEN, "gete_rs8_d23s", "*_s000[0-7]"),
             "fit_rs16": Split(GEN, "gete_rs16_d18s", "*_s000[0-5]")},
}
# elements -> (name, splits, the card's limits)
MATERIALS = {
    ("Hf", "O"): ("hfo2", SPLITS, "HfO2 only (Hf, O), SZV-MOLOPT-SR-GTH, PBE as in shared/data/scripts; "
                  "monoclinic-derived cells, displacements 0.05-0.22 A, strain within 3 %; see README 'Accuracy'"),
    ("Ge", "Te"): ("gete", GETE_SPLITS, "GeTe only (Ge, Te), DZVP-MOLOPT-SR-GTH, PBE as in shared/data/scripts; "
                   "rocksalt-derived cells, displacements 0.05-0.25 A, strain within 3 %; see README 'Accuracy'"),
}


def material(elements) -> tuple:
    """(name, splits, limits) of a model's elements; an EgnnError for elements no split set covers."""
    from egnn import EgnnError

    key = tuple(sorted(elements))
    if key not in MATERIALS:
        raise EgnnError(f"no accuracy splits for a model of elements {list(key)}; known: "
                        f"{[list(k) for k in MATERIALS]} (profiling/accuracy_splits.py MATERIALS)")
    return MATERIALS[key]


def summary(r: dict) -> dict:
    """The figures the README tables report, from an `egnn.evaluate.evaluate` result."""
    near = [b for b in r["vs_distance"] if b["r_lo"] >= 1.0 and b["r_hi"] <= 2.0]
    out = {"mae": r["mae_meV"], "node": r["mae_node_meV"], "edge": r["mae_edge_meV"],
           "node_per_element": {k: v["mae_meV"] for k, v in r["per_element_node"].items()},
           "pairs_lt_2A": near[0]["mae_meV"] if near else None,
           "eig_occ_meV": r["eig_occ_mae_meV"], "eig_rel_percent": r["eig_rel_percent"], "gap": r["gap_mae_meV"],
           "eig_rel_shifted_percent": r["eig_rel_shifted_percent"], "ghost_levels": r.get("ghost_levels", 0)}
    for k in ("band_mae_meV", "band_occ_mae_meV", "band_empty_mae_meV", "band_gap_mae_meV", "band_mae_shifted_meV"):
        if k in r:
            out[k.replace("_meV", "")] = r[k]
    return out


def evaluate_splits(model, names, cache: str, splits=SPLITS) -> dict:
    from egnn.evaluate import evaluate
    from egnn.train import open_datasets

    out = {}
    for name in names:
        runs = splits[name]()
        if runs:
            r = evaluate(model, open_datasets(runs, float(model.config.r_cut), cache))
            out[name] = {"summary": summary(r), "structures": [os.path.basename(p) for p in runs],
                         "result": {k: v for k, v in r.items() if k != "per_structure"},
                         "per_structure": r["per_structure"]}
    return out


def print_table(res: dict, elements=("Hf", "O")) -> None:
    nan = float("nan")
    print(f"{'split':8s}{'n':>3s}{'MAE':>7s}{'node':>7s}" + "".join(f"{e:>7s}" for e in elements) +
          f"{'<2Å':>7s}{'ε occ':>8s}{'ε %':>7s}{'gap':>7s}{'band':>7s}{'b.gap':>7s}{'ghost':>6s}")
    for name, r in res.items():
        s = summary(r["result"]) if "summary" not in r else r["summary"]
        pe = s["node_per_element"]
        f = [s["mae"], s["node"], *(pe.get(e, nan) for e in elements), s["pairs_lt_2A"] or nan,
             s["eig_occ_meV"], s["eig_rel_percent"], s["gap"], s.get("band_mae", nan), s.get("band_gap_mae", nan)]
        pct = 4 + len(elements)  # the ε % column
        print(f"{name:8s}{len(r['structures']):3d}" + "".join(f"{v:7.2f}" if i == pct else f"{v:7.1f}"
                                                              for i, v in enumerate(f)) + f"{s.get('ghost_levels', 0):6d}")
    print("where the Γ-level errors come from (egnn evaluate's eig_by_distance): mean shift of the occupied "
          "levels / mean |gap change| per block shell, meV")
    for name, r in res.items():
        shells = r["result"].get("eig_by_distance", [])
        print(f"{name:8s} " + "  ".join(f"{b['shell']} {b['occ_shift_meV']:+.0f}/{b['gap_meV_abs']:.0f}" for b in shells))


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or pretrained:NAME")
    p.add_argument("--split", action="append", choices=sorted(set(SPLITS) | set(GETE_SPLITS)),
                   help="only these splits of the checkpoint's material (repeatable)")
    p.add_argument("--fit", action="store_true", help="also the training-family cells of FIT_SPLITS (fit_* rows)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export", default=None, help="write the checkpoint here as a shipped one (float32 weights "
                   "and a model card with these splits' figures; egnn.checkpoint.export)")
    p.add_argument("--training", default=None, help="with --export: how the checkpoint was trained (stages, "
                   "configs, minutes), for the card")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from egnn.train import default_cache_dir, model_from_checkpoint

    model = model_from_checkpoint(a.checkpoint)
    name, splits, limits = material(model.basis.elements)
    wrong = sorted(set(a.split or []) - set(splits))
    if wrong:
        p.error(f"split(s) {wrong} are not {name} splits; {name} has {sorted(splits)}")
    res = evaluate_splits(model, a.split or list(splits), default_cache_dir(), splits)
    fit = evaluate_splits(model, list(FIT_SPLITS[name]), default_cache_dir(), FIT_SPLITS[name]) if a.fit else {}
    print_table({**res, **fit}, list(model.basis.elements))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"checkpoint": a.checkpoint, **res, **fit}, f, indent=1, default=float)
    if a.export:
        from egnn.checkpoint import export, load

        data = load(a.checkpoint).get("config", {}).get("data", {})

        def names(runs):  # run folder names (the paths are this machine's)
            flat = [p for g in runs for p in (g if isinstance(g, list) else [g])]
            return sorted(os.path.basename(os.path.normpath(p)) for p in flat)

        card = {"trained_on": names(data.get("train", [])), "validated_on": names(data.get("val", [])),
                "held_out": {k: {"structures": r["structures"], **r["summary"]} for k, r in res.items()},
                "elements": sorted(model.basis.elements), "basis": model.basis.name,
                "r_cut": float(model.config.r_cut), **({"training": a.training} if a.training else {}),
                "limits": limits}
        export(a.checkpoint, a.export, card)
        print(f"wrote {a.export} ({os.path.getsize(a.export) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
