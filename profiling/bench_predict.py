"""`egnn predict` at scale: the 96-atom HfO2 cell, tiled 2x2x2 (768 atoms) and 4x4x4 (6,144 atoms),
r_cut 8 Å, an untrained model of the default size (lmax = mmax = 4, 16 channels, 3 layers; the
weights do not change the cost) or a given checkpoint.

Each size runs in its own child process so that its peak RSS (resource.getrusage ru_maxrss) is its
own; phases: radius graph, model (chunked: `--edge-chunk` edges at a time), assembly of H(R) into
sparse matrices (+ symmetrisation), writing the npz files (and, with --csr, binary CP2K .csr).
Ratios are per atom against the 96-atom baseline of the same run (linear scaling = 1.0).

    .venv/bin/python profiling/bench_predict.py [--sizes 1,2,4] [--edge-chunk 20000] [--checkpoint CK]
        [--csr] [--out profiling/results/bench_predict.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CELL_96 = [os.path.join(ROOT, "..", "shared", "data", "structures", "hfo2_gamma", "hfo2_m96_rattled_000.xyz"),
           "/work/shared/data/structures/hfo2_gamma/hfo2_m96_rattled_000.xyz"]


def base_cell():
    """The rattled 96-atom HfO2 cell; without the shared data, the shipped 12-atom demo cell x 2x2x2."""
    import ase.io

    for p in CELL_96:
        if os.path.exists(p):
            return ase.io.read(p), os.path.abspath(p)
    from egnn.predict import read_input

    demo = os.path.join(ROOT, "egnn", "demo_data", "hfo2_kp", "hfo2_m12_rattled_s0000")
    return read_input(demo)[0].repeat((2, 2, 2)), demo + " x 2x2x2"


def make_model(checkpoint, r_cut):
    import torch

    from egnn.basis import OrbitalBasis
    from egnn.model import HamiltonianModel, ModelConfig
    from egnn.train import model_from_checkpoint

    if checkpoint:
        return model_from_checkpoint(checkpoint)
    torch.manual_seed(0)
    basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
    return HamiltonianModel(ModelConfig(basis=basis, r_cut=r_cut)).eval()


def child(rep: int, args) -> dict:
    """One size in this process: phase times and the peak RSS."""
    import torch

    from egnn.graph import radius_graph
    from egnn.predict import assemble_chunked, predict_blocks, symmetrize, write_prediction

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model = make_model(args.checkpoint, args.r_cut)
    atoms, src = base_cell()
    atoms = atoms.repeat((rep, rep, rep))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = {}
    t0 = time.perf_counter()
    graph = radius_graph(atoms, float(model.config.r_cut))
    t["graph_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    node, edge = predict_blocks(model, graph, edge_chunk=args.edge_chunk)
    t["model_s"] = time.perf_counter() - t0
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    HR = symmetrize(assemble_chunked(graph, node, edge, model.basis))
    del node, edge
    t["assemble_s"] = time.perf_counter() - t0
    nnz = sum(M.nnz for M in HR.values())
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        files = write_prediction(tmp, "bench", HR, model.basis, atoms, binary=True, csr=args.csr)
        t["write_s"] = time.perf_counter() - t0
        size = sum(os.path.getsize(f) for f in files)
    t["total_s"] = sum(t.values())
    return {"rep": rep, "atoms": len(atoms), "edges": int(graph.num_edges), "images": len(HR), "nnz": int(nnz),
            "orbitals": int(model.basis.orbital_offsets(atoms.numbers)[-1]), **t,
            "rss_start_MB": rss0, "rss_after_model_MB": rss_model,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "files_MB": size / 2 ** 20, "edge_chunk": args.edge_chunk, "source": src,
            "threads": torch.get_num_threads()}


def main():
    from egnn.predict import DEFAULT_EDGE_CHUNK

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4", help="tilings of the 96-atom cell (n -> n x n x n)")
    ap.add_argument("--edge-chunk", type=int, default=DEFAULT_EDGE_CHUNK)
    ap.add_argument("--r-cut", type=float, default=8.0)
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: untrained, default size)")
    ap.add_argument("--csr", action="store_true", help="also write the binary CP2K .csr files")
    ap.add_argument("--tmp", default=None, help="folder for the written files (deleted afterwards)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_predict.json"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for rep in [int(x) for x in args.sizes.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(rep), "--edge-chunk", str(args.edge_chunk),
               "--r-cut", str(args.r_cut)] + (["--checkpoint", args.checkpoint] if args.checkpoint else []) + \
              (["--csr"] if args.csr else []) + (["--tmp", args.tmp] if args.tmp else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"size {rep}x{rep}x{rep} failed (exit {p.returncode})")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".partial", "w") as fh:  # what is done so far, should a larger size not finish
            json.dump({"rows": rows}, fh, indent=1)
        print(f"done {rep}x{rep}x{rep}: {rows[-1]['atoms']} atoms in {rows[-1]['total_s']:.1f} s", file=sys.stderr,
              flush=True)
    base = rows[0]
    for r in rows:
        r["time_per_atom_ratio"] = (r["total_s"] / r["atoms"]) / (base["total_s"] / base["atoms"])
        r["model_per_edge_ratio"] = (r["model_s"] / r["edges"]) / (base["model_s"] / base["edges"])
        r["rss_ratio"] = r["peak_rss_MB"] / base["peak_rss_MB"]
    hdr = (f"{'cell':>8s}{'atoms':>7s}{'edges':>10s}{'nnz(H)':>12s}{'graph s':>9s}{'model s':>9s}{'asm s':>8s}"
           f"{'write s':>9s}{'total s':>9s}{'peak RSS MB':>13s}{'t/atom x':>9s}{'RSS x':>7s}")
    print(f"egnn predict, r_cut {args.r_cut} Å, edge_chunk {args.edge_chunk}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'untrained default model'}")
    print(hdr)
    for r in rows:
        print(f"{r['rep']}x{r['rep']}x{r['rep']:<3d}{r['atoms']:>7d}{r['edges']:>10d}{r['nnz']:>12d}{r['graph_s']:>9.2f}"
              f"{r['model_s']:>9.1f}{r['assemble_s']:>8.1f}{r['write_s']:>9.1f}{r['total_s']:>9.1f}"
              f"{r['peak_rss_MB']:>13.0f}{r['time_per_atom_ratio']:>9.2f}{r['rss_ratio']:>7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"r_cut": args.r_cut, "edge_chunk": args.edge_chunk, "checkpoint": args.checkpoint,
                   "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
