"""`egnn predict` at device scale: 3,000 / 12,000 / 24,000 atoms of rattled monoclinic HfO2 at 8 Å,
in one process and under torchrun with 2 and 4 gloo ranks; time per stage, peak RSS per rank and
bytes written.

The structure: the 12-atom monoclinic cell of the shipped data repeated 5x5x10 (3,000 atoms,
rattled σ = 0.1 Å, seed 0), tiled 2x2x1 and 2x2x2 by `--tile`. The model is the demo's size
(lmax = mmax = 4, 16 channels, 2 layers; untrained: the weights do not change the cost) or
--checkpoint. Every run is the real command line, `egnn predict ... --json` (under torchrun for
ranks > 1), in its own process, so its peak RSS is its own; the report of each rank comes back in
the JSON. Format: rows (streamed, the scalable one, and the only one under torchrun) for every run, so
bytes and memory compare; --format adds others to the one-process runs.

    .venv/bin/python profiling/bench_predict.py [--sizes 3000,12000,24000] [--ranks 1,2,4]
        [--edge-chunk 20000] [--format rows,gamma] [--checkpoint CK] [--out profiling/results/bench_predict.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TILES = {3000: (1, 1, 1), 12000: (2, 2, 1), 24000: (2, 2, 2)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_structure(path):
    from egnn.datagen import prototype

    atoms = prototype("hfo2_m12").repeat((5, 5, 10))
    atoms.rattle(0.1, seed=0)
    atoms.write(path, format="extxyz")
    return len(atoms)


def make_checkpoint(path, r_cut=8.0):
    import torch

    from egnn.basis import OrbitalBasis
    from egnn.model import HamiltonianModel, ModelConfig

    torch.manual_seed(0)
    basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
    m = HamiltonianModel(ModelConfig(basis=basis, r_cut=r_cut, layers=2))
    torch.save({"format": "egnn-checkpoint-1", "model_config": m.config.to_dict(), "model": m.state_dict()}, path)


def run_one(n_atoms, ranks, args, work):
    out = os.path.join(work, f"out_{n_atoms}_{ranks}")
    shutil.rmtree(out, ignore_errors=True)
    tile = "x".join(map(str, TILES[n_atoms]))
    egnn = [sys.executable, "-m", "egnn"] if ranks == 1 else \
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", str(ranks),
         "--master-port", str(_free_port()), "-m", "egnn"]
    fmt = args.format if ranks == 1 or args.format == "rows" else "rows"
    cmd = egnn + ["predict", "--checkpoint", args.checkpoint, args.structure, "-o", out, "--tile", tile,
                  "--edge-chunk", str(args.edge_chunk), "--format", fmt, "--json"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // ranks)))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    with open(os.path.join(work, f"log_{n_atoms}_{ranks}.txt"), "w") as fh:  # the whole story, for failures
        fh.write(p.stderr)
    if p.returncode:
        why = [ln for ln in p.stderr.splitlines() if "error:" in ln or "Error:" in ln]  # egnn's one line first
        return {"atoms_target": n_atoms, "ranks": ranks, "error": (why[0] if why else p.stderr[-4000:]), "wall_s": wall,
                "log": os.path.join(work, f"log_{n_atoms}_{ranks}.txt")}
    rep = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    s = rep["structures"][0]
    row = {"atoms": s["atoms"], "ranks": ranks, "edges": s["edges"], "nonzeros": s["nonzeros"], "wall_s": wall,
           "graph_s": s["graph_s"], "layers_s": s.get("layers_s"), "predict_and_write_rows_s": s["predict_and_write_rows_s"],
           "finalize_s": s["finalize_s"], "total_s": s["total_s"], "bytes_written": s["bytes"],
           "estimate_peak_MB": s["estimate"]["peak_bytes"] / 2 ** 20,
           "peak_rss_MB": rep.get("peak_rss_MB_per_rank", [rep["peak_rss_MB"]]),
           "format": fmt}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="3000,12000,24000")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--edge-chunk", type=int, default=20_000)
    ap.add_argument("--format", default="rows", help="formats (default rows: the same for every rank count)")
    ap.add_argument("--threads", type=int, default=2, help="threads per run, split over its ranks")
    ap.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: untrained, demo size)")
    ap.add_argument("--work", default=None, help="folder for the structure and the outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written files")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_predict.json"))
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="egnn-bench-predict-")
    os.makedirs(work, exist_ok=True)
    args.structure = os.path.join(work, "hfo2_m3000.extxyz")
    make_structure(args.structure)
    if not args.checkpoint:
        args.checkpoint = os.path.join(work, "demo_size.pt")
        make_checkpoint(args.checkpoint)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for r in [int(x) for x in args.ranks.split(",")]:
            row = run_one(n, r, args, work)
            rows.append(row)
            print(f"done {n} atoms on {r} rank(s): " + (f"{row['total_s']:.0f} s, peak RSS {max(row['peak_rss_MB']):.0f} MB"
                                                         if "error" not in row else "FAILED " + row["error"][-300:]),
                  file=sys.stderr, flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out + ".partial", "w") as fh:
                json.dump({"rows": rows}, fh, indent=1)
    print(f"egnn predict, 8 Å, edge_chunk {args.edge_chunk}, {args.threads} threads per run")
    print(f"{'atoms':>7s}{'ranks':>6s}{'edges':>11s}{'non-zeros':>13s}{'graph s':>9s}{'layers s':>9s}{'rows s':>8s}"
          f"{'final s':>8s}{'total s':>8s}{'written MB':>11s}{'est. MB':>9s}  peak RSS per rank (MB)")
    for r in rows:
        if "error" in r:
            print(f"{r['atoms_target']:>7d}{r['ranks']:>6d}  failed")
            continue
        print(f"{r['atoms']:>7d}{r['ranks']:>6d}{r['edges']:>11,d}{r['nonzeros']:>13,d}{r['graph_s']:>9.1f}"
              f"{r['layers_s'] or 0:>9.1f}{r['predict_and_write_rows_s']:>8.1f}{r['finalize_s']:>8.1f}{r['total_s']:>8.1f}"
              f"{r['bytes_written'] / 2**20:>11.0f}{r['estimate_peak_MB']:>9.0f}  "
              + " ".join(f"{m:.0f}" for m in r["peak_rss_MB"]))
    with open(args.out, "w") as fh:
        json.dump({"edge_chunk": args.edge_chunk, "format": args.format, "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
