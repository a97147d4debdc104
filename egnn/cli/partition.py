"""`egnn partition STRUCTURE --r-cut 12 --parts 64 --method low-nn|metis|linear [--tile 2x2x2]
[--plot out.png] [--save PARTS.npy] [--json]`: build the graph, partition it, report its quality."""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from ..errors import InputError


def add_arguments(p) -> None:
    p.add_argument("structure", help="any ase-readable structure (xyz, extxyz, CIF, POSCAR, ...) or a CP2K .inp")
    p.add_argument("--r-cut", type=float, default=12.0, help="graph cutoff in Å (default 12)")
    p.add_argument("--parts", type=int, required=True, help="number of ranks")
    p.add_argument("--method", default="low-nn", choices=["low-nn", "metis", "linear"])
    p.add_argument("--tile", default=None, help="repeat the cell, e.g. 2x2x2 (periodic axes only)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the partition and topology figure")
    p.add_argument("--plot-axes", default="xy", help="projection plane of the partition figure (xy, xz, yz)")
    p.add_argument("--save", default=None, metavar="NPY", help="write the rank of every atom (int64, tiled order)")
    p.add_argument("--lmax", type=int, default=4, help="embedding lmax for the halo bytes (default 4)")
    p.add_argument("--channels", type=int, default=16, help="embedding channels for the halo bytes (default 16)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32", "float64"],
                   help="halo buffer dtype (default float16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def run(args) -> int:
    from ..graph import radius_graph
    from ..partition import partition, quality
    from ..io.structure import parse_tile, read_input, tile
    from ..partition.quality import embedding_row_bytes

    row_bytes = embedding_row_bytes(args.lmax, args.channels, args.dtype)
    reps = parse_tile(args.tile)
    if not args.r_cut > 0:
        raise InputError(f"--r-cut must be > 0 Å, got {args.r_cut}")
    t = {}
    t0 = time.perf_counter()
    atoms = tile(read_input(args.structure)[0], reps)
    t["read"] = time.perf_counter() - t0
    if not 1 <= args.parts <= len(atoms):
        raise InputError(f"--parts must be in 1..{len(atoms)} (the number of atoms), got {args.parts}")

    t0 = time.perf_counter()
    graph = radius_graph(atoms, args.r_cut)
    t["graph"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = partition(graph, args.parts, args.method)
    t["partition"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = quality(graph, parts, row_bytes=row_bytes, nparts=args.parts)
    t["quality"] = time.perf_counter() - t0

    if args.save:
        try:
            np.save(args.save, parts.astype(np.int64))
        except OSError as exc:
            raise InputError(f"--save {args.save}: cannot write ({exc}); check the directory") from exc
    if args.plot:
        from ..partition.plot import save_figures

        t0 = time.perf_counter()
        save_figures(args.plot, graph.positions, parts, q, axes=args.plot_axes)
        t["plot"] = time.perf_counter() - t0

    s = q.summary()
    if args.json:
        out = {"structure": args.structure, "atoms": graph.num_nodes, "edges": graph.num_edges,
               "parts": args.parts, "method": args.method, "r_cut": args.r_cut, "tile": list(reps),
               **{f"time_{k}_s": v for k, v in t.items()},
               "neighbours_mean": s["neighbours_mean"], "neighbours_max": s["neighbours_max"],
               "halo_mean": s["halo_mean"], "halo_max": s["halo_max"],
               "edge_imbalance": s["edge_imbalance"], "summary": s}
        print(json.dumps(out))
        return 0
    print(f"{args.structure}: {graph.num_nodes} atoms (tile {'x'.join(map(str, reps))}), "
          f"{graph.num_edges} edges at r_cut {args.r_cut} Å; {args.method} into {args.parts} parts")
    print(q.table())
    print("time: " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))
    if args.save:
        print(f"wrote {args.save}")
    if args.plot:
        print(f"wrote {args.plot}")
    sys.stdout.flush()
    return 0
