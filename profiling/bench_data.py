"""Data path benchmark: raw CP2K read + convert vs converted-dataset load; radius_graph vs vesin.

    .venv/bin/python profiling/bench_data.py [--r-cut 12] [--repeat 3]

Uses ../shared/data (the 96-atom Γ run and one k-point run) when present, else tests/fixtures.
Prints a table and writes profiling/results/bench_data.json. Times are medians of --repeat runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "cp2k")
FIX = os.path.join(ROOT, "tests", "fixtures", "cp2k")


def _runs():
    g = os.path.join(SHARED, "hfo2_gamma", "hfo2_m96_rattled_000")
    k = os.path.join(SHARED, "hfo2_kp", "hfo2_m12_rattled_s0000")
    if os.path.isdir(g) and os.path.isdir(k):
        return {"gamma_hfo2_96": g, "kpoint_hfo2_12": k}
    return {"gamma_hfo2_12": os.path.join(FIX, "hfo2_m12_szv"), "kpoint_hfo2_12": os.path.join(FIX, "hfo2_m12_rattled_s0000")}


def _time(fn, repeat):
    ts, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--r-cut", type=float, default=12.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "profiling", "results", "bench_data.json"))
    args = ap.parse_args(argv)

    import vesin
    from ase.build import make_supercell

    from egnn import blocks as B
    from egnn.dataset import Dataset, convert
    from egnn.graph import radius_graph
    from egnn.io.cp2k import read_run

    B.pair_transform  # warm the CG cache outside the timed region
    rows, result = [], {"r_cut": args.r_cut, "runs": {}, "graph": {}}
    tmp = tempfile.mkdtemp(prefix="egnn_bench_")
    try:
        for name, path in _runs().items():
            s = read_run(path)  # warm-up: imports, basis and CG caches
            g = radius_graph(s.atoms, args.r_cut)
            B.extract(s.H, g, s.basis, s.gamma_only)
            t_read, s = _time(lambda: read_run(path), args.repeat)
            t_graph, g = _time(lambda: radius_graph(s.atoms, args.r_cut), args.repeat)
            t_ext, ex = _time(lambda: (B.extract(s.H, g, s.basis, s.gamma_only),
                                       B.extract(s.S, g, s.basis, s.gamma_only),
                                       B.coverage(s.H, g, s.basis, s.gamma_only)), args.repeat)
            out = os.path.join(tmp, name)
            t_conv, _ = _time(lambda: convert([path], out, r_cut=args.r_cut, force=True), 1)
            ds = Dataset(out)
            t_load, x = _time(lambda: ds[0], args.repeat)
            raw = t_read + t_graph + t_ext
            size = os.path.getsize(os.path.join(out, "s00000.npz"))
            r = {"atoms": len(s.atoms), "orbitals": s.n_orbitals, "images": len(s.H), "edges": g.num_edges,
                 "mode": ex[0]["mode"], "read_s": t_read, "graph_s": t_graph, "extract_s": t_ext,
                 "raw_total_s": raw, "convert_cli_s": t_conv, "load_s": t_load, "npz_bytes": size,
                 "raw_over_load": raw / t_load}
            result["runs"][name] = r
            rows.append((name, r))
        # graph build vs plain vesin on the 96-atom cell and a 3x3x3 tiling of it
        base = read_run(_runs()[next(iter(_runs()))], matrices=("S",)).atoms
        for label, atoms in (("cell", base), ("3x3x3", make_supercell(base, np.diag([3, 3, 3])))):
            pos = atoms.get_positions()
            cell = atoms.get_cell().array
            nl = vesin.NeighborList(cutoff=args.r_cut, full_list=True)
            t_v, res = _time(lambda: nl.compute(pos, cell, True, quantities="ijSD"), args.repeat)
            t_g, g = _time(lambda: radius_graph(atoms, args.r_cut), args.repeat)
            result["graph"][label] = {"atoms": len(atoms), "edges": g.num_edges, "vesin_s": t_v,
                                      "radius_graph_s": t_g, "ratio": t_g / t_v}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"data path, r_cut {args.r_cut} Å (median of {args.repeat})")
    print(f"{'run':18s} {'atoms':>5s} {'edges':>7s} {'mode':>10s} {'read':>8s} {'graph':>8s} {'extract':>8s} "
          f"{'raw tot':>8s} {'load':>8s} {'raw/load':>8s} {'npz MB':>7s}")
    for name, r in rows:
        print(f"{name:18s} {r['atoms']:5d} {r['edges']:7d} {r['mode']:>10s} {r['read_s']:8.3f} {r['graph_s']:8.3f} "
              f"{r['extract_s']:8.3f} {r['raw_total_s']:8.3f} {r['load_s']:8.3f} {r['raw_over_load']:8.1f} "
              f"{r['npz_bytes'] / 1e6:7.2f}")
    print(f"\n{'graph':10s} {'atoms':>6s} {'edges':>9s} {'vesin s':>9s} {'egnn s':>9s} {'ratio':>6s}")
    for label, r in result["graph"].items():
        print(f"{label:10s} {r['atoms']:6d} {r['edges']:9d} {r['vesin_s']:9.4f} {r['radius_graph_s']:9.4f} "
              f"{r['ratio']:6.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
