"""Which candidate cells to send to CP2K: random, the most novel, or the most covering? (docs/accuracy.md)

    .venv/bin/python profiling/data_selection.py [--pool 1000] [--count 40] [--out JSON]

The A/B of session 17, geometry only (no DFT, no model). Reference: the 84 12-atom training cells of
the R-ablations (shared hfo2_kp s0000-s0019 and the generated hfo2_m12_d17s). Candidates: `--pool`
12-atom cells of one family (σ = 0.20 Å, ±3 % strain, salt 25, as egnn.datagen draws them). Three
arms of `--count` cells: the first seeds (random), novelty.pick_novel (farthest-point by cell) and
novelty.pick_covering (facility location over the pool). Prints the picks and, per arm, the
novelty of the held-out atoms (m12_val, m24_val: median and 90th percentile, Å) and the mean novelty
of the pool, against reference + picks: how much closer each arm brings what a model is asked to
predict. The DFT of the picks and the trainings on them are in docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

from egnn.datagen import Family, make_structure  # noqa: E402
from egnn.io.cp2k import read_run  # noqa: E402
from novelty import atoms_descriptors, novelty, pick_covering, pick_novel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.path.join(ROOT, "..", "shared", "data", "cp2k")
GENERATED = os.path.join(ROOT, "data", "generated")
Z = [8, 72]
POOL_FAMILY = Family("hfo2_m12_d20p", "hfo2_m12", "SZV", 0.20, (), salt=25, strain=0.03)


def _runs(pattern):
    found = sorted(glob.glob(pattern))
    if not found:
        sys.exit(f"data_selection: no run folders match {pattern}; "
                 "make them with `egnn data generate hfo2 -o data/generated --family ...`")
    return [read_run(d, matrices=()).atoms for d in found]


def _describe(cells):
    """(numbers, descriptors) per cell."""
    return [(a.numbers, atoms_descriptors(a, Z)) for a in cells]


def _stack(descs):
    """atomic number -> [atoms, D] over (numbers, descriptors) pairs."""
    return {z: np.concatenate([d[n == z] for n, d in descs]) for z in Z}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    # described once: every arm is these cells plus its picks from the pool
    base = _describe(_runs(os.path.join(SHARED, "hfo2_kp", "hfo2_m12_rattled_s00[01]?")) +
                     _runs(os.path.join(GENERATED, "hfo2_m12_d17s", "hfo2_m12_d17s_s*")))
    held = {n: _stack(_describe(_runs(os.path.join(GENERATED, f"hfo2_{n}", f"hfo2_{n}_s*"))))
            for n in ("m12_val", "m24_val")}
    pool = _describe(make_structure(POOL_FAMILY, s) for s in range(a.pool))
    pool_rows, ref = _stack(pool), _stack(base)
    arms = {"random": list(range(a.count)), "novel": pick_novel(pool, ref, a.count),
            "covering": pick_covering(pool, ref, a.count)}
    out = {"pool": a.pool, "count": a.count, "reference_cells": len(base), "arms": {}}
    print(f"{'arm':9s}" + "".join(f"{n} {el} med/q90".rjust(22) for n in held for el in ("O", "Hf"))
          + "   pool mean O / Hf")
    for arm, picks in [("none", [])] + list(arms.items()):
        r = _stack(base + [pool[i] for i in picks])
        row = {"seeds": sorted(picks)}
        line = f"{arm:9s}"
        for n, h in held.items():
            for z, el in zip(Z, ("O", "Hf")):
                v = novelty(r[z], None, h[z])
                row[f"{n}_{el}"] = [float(np.median(v)), float(np.quantile(v, 0.9))]
                line += f"{row[f'{n}_{el}'][0]:15.3f} / {row[f'{n}_{el}'][1]:.3f}"
        row["pool_mean"] = [float(novelty(r[z], None, pool_rows[z]).mean()) for z in Z]
        print(line + f"   {row['pool_mean'][0]:.3f} / {row['pool_mean'][1]:.3f}")
        out["arms"][arm] = row
    for arm, picks in arms.items():
        print(f"{arm} seeds: {sorted(picks)}")
    if a.out:
        write_json(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
