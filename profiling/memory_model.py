"""Per-rank memory of `egnn predict` at 190,000+ atoms on 64-512 ranks, from the real partition and
halo sets, without running the model.

The structure: the 3,000-atom rattled monoclinic HfO2 block of bench_predict.py tiled 4x4x4
(192,000 atoms). Its edges are generated tile by tile from the 3,000-atom graph (exact for periodic
tiling, egnn.partition.quality.tiled_edge_chunks), so the 36 M-edge (8 Å) graph is never held.
Low-NN partitions it for each rank count; per rank the halo sets (the same definitions HaloPlan
uses) give owned atoms, halo atoms, owned edges and the edges whose src is remote (whose reverse
outputs arrive in the exchange). Per rank, for the model's size (lmax, channels, layers):

    graph      owned edges × 36 B (src, dst int64, edge_vec float32, reverse index)
    nodes      (owned + halo) atoms × (lmax+1)²·C·4 B × (layers + 3)   (x per layer, xn, xe)
    edges      owned edges × (lmax+1)²·C·4 B                           (the edge embeddings)
    transient  edge_chunk × 40 kB × (lmax+1)²·C / 400                  (one chunk's messages)
    halo       (recv + send) halo rows × (lmax+1)²·C·4 B               (exchange buffers)
    reverse    2 × remote-src edges × (L+1)²·w·4 B                      (outputs sent, reverses received)
    rows       edge_chunk × 2 × (orbitals per atom)² × 48 B             (one block of rows, host RAM)
    host       all edges × 167 B                                        (every rank builds the global graph:
                                                                         host RAM per rank, the known limit)

and the GPU memory size that holds everything but the rows (host RAM) with 10 % to spare. The transient constant is egnn.predict's
(calibrated on CPU by bench_predict.py: compare "est. MB" with the peak RSS there).

    .venv/bin/python profiling/memory_model.py [--r-cut 8] [--tile 4,4,4] [--ranks 64,128,256,512]
        [--layers 2] [--edge-chunk 20000] [--out profiling/results/memory_model.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HOST_GRAPH_BYTES_PER_EDGE = 167  # peak while building the global graph (vesin + sorting), measured on CPU
GPUS = [("24 GB (L4, A10)", 24), ("40 GB (A100-40)", 40), ("80 GB (A100/H100-80)", 80), ("96 GB (GH200)", 96),
        ("141 GB (H200)", 141)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r-cut", type=float, default=8.0)
    ap.add_argument("--tile", default="4,4,4")
    ap.add_argument("--ranks", default="64,128,256,512")
    ap.add_argument("--layers", type=int, default=2, help="interaction layers (demo: 2, full configs: 3)")
    ap.add_argument("--lmax", type=int, default=4)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--edge-chunk", type=int, default=20_000)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "memory_model.json"))
    a = ap.parse_args()
    from egnn.basis import OrbitalBasis
    from egnn.datagen import prototype
    from egnn.graph import radius_graph
    from egnn.partition import low_nn
    from egnn.partition.quality import quality_from_chunks, tiled_edge_chunks
    from egnn.predict import TRANSIENT_BYTES_PER_EDGE

    base = prototype("hfo2_m12").repeat((5, 5, 10))
    base.rattle(0.1, seed=0)
    bg = radius_graph(base, a.r_cut)
    reps = tuple(int(x) for x in a.tile.split(","))
    atoms = base.repeat(reps)
    T, n0 = int(np.prod(reps)), len(base)
    deg = np.tile(bg.degree, T)
    basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
    norb = np.diff(basis.orbital_offsets(atoms.numbers)).astype(np.float64)
    K, C = (a.lmax + 1) ** 2, a.channels
    row = K * C * 4
    G, we = (basis.L_max + 1) ** 2, max(basis.edge_channels())
    print(f"{len(atoms):,} atoms ({n0} x {T} tiles), {bg.num_edges * T / 1e6:.1f} M edges at {a.r_cut} Å; "
          f"model lmax {a.lmax}, C {C}, {a.layers} layers, edge_chunk {a.edge_chunk}")
    total_edges = bg.num_edges * T
    hdr = (f"{'ranks':>6}{'atoms/rk':>9}{'edges/rk':>10}{'halo/rk':>9}{'remote e':>9}{'graph':>7}{'nodes':>7}"
           f"{'edges':>7}{'trans.':>7}{'halo':>6}{'rev':>6}{'rows':>6}{'total GB':>9}{'host GB':>8}  fits")
    print("per rank (the rank with the most GPU memory), GB; 'rows' is host RAM, not in the total:")
    print(hdr)
    out = []
    for P in [int(x) for x in a.ranks.split(",")]:
        t0 = time.perf_counter()
        parts = np.asarray(low_nn(atoms.positions, atoms.cell.array, atoms.pbc, deg, P, a.r_cut))
        t_part = time.perf_counter() - t0
        q = quality_from_chunks(tiled_edge_chunks(bg.src, bg.dst, bg.shift, n0, reps), parts, nparts=P, row_bytes=row)
        remote = np.zeros(P, np.int64)
        for s, d in tiled_edge_chunks(bg.src, bg.dst, bg.shift, n0, reps):
            cut = parts[s] != parts[d]
            remote += np.bincount(parts[d][cut], minlength=P)
        nodes, edges, halo = q.nodes.astype(np.float64), q.edges.astype(np.float64), q.halo.astype(np.float64)
        send = q.send_atoms.astype(np.float64)
        mean_norb2 = float(np.mean(norb ** 2))
        comp = {
            "graph": edges * 36,
            "nodes": (nodes + halo) * row * (a.layers + 3),
            "edges": edges * row,
            "transient": np.minimum(edges, a.edge_chunk) * TRANSIENT_BYTES_PER_EDGE * K * C / 400,
            "halo": (halo + send) * row,
            "reverse": 2 * remote * G * we * 4.0,  # outputs sent to the owners of remote srcs, reverses received
            "rows": np.minimum(edges, a.edge_chunk) * 2 * mean_norb2 * 48,
        }
        total = sum(v for k, v in comp.items() if k != "rows")  # the GPU's share; rows live in host memory
        host = comp["rows"] + total_edges * HOST_GRAPH_BYTES_PER_EDGE  # every rank builds the global graph
        worst = int(np.argmax(total))
        fits = next((name for name, gb in GPUS if total[worst] * 1.1 <= gb * 1e9), "none listed")
        rec = {"ranks": P, "atoms": len(atoms), "partition_s": t_part, "host_bytes_per_rank": float(host.max()),
               "atoms_per_rank_max": int(nodes.max()), "edges_per_rank_max": int(edges.max()),
               "halo_per_rank_max": int(halo.max()), "remote_edges_per_rank_max": int(remote.max()),
               "bytes_per_rank_max": float(total.max()), "bytes_per_rank_mean": float(total.mean()),
               "components_of_max_rank_bytes": {k: float(v[worst]) for k, v in comp.items()}, "fits": fits}
        out.append(rec)
        g = {k: v[worst] / 1e9 for k, v in comp.items()}
        print(f"{P:>6}{int(nodes.max()):>9}{int(edges.max()):>10}{int(halo.max()):>9}{int(remote.max()):>9}"
              f"{g['graph']:>7.2f}{g['nodes']:>7.2f}{g['edges']:>7.2f}{g['transient']:>7.2f}{g['halo']:>6.2f}"
              f"{g['reverse']:>6.2f}{g['rows']:>6.2f}{total[worst] / 1e9:>9.2f}{host.max() / 1e9:>8.1f}  {fits}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump({"r_cut": a.r_cut, "tile": reps, "layers": a.layers, "lmax": a.lmax, "channels": C,
                   "edge_chunk": a.edge_chunk, "rows": out}, fh, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
