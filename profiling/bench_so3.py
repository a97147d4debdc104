"""Wigner-D of edge frames: egnn.so3.wigner_D vs e3nn.o3.wigner_D, edges/s in the same run.

e3nn's path: angles from the edge vectors (o3.xyz_to_angles), then o3.wigner_D(l, alpha, beta, 0)
for every l (matrix exponentials of the generators). Both produce the per-l blocks; the fused
Triton kernels (egnn.kernels) never materialise D at all. Goal: >= 100x.

    python profiling/bench_so3.py [--sizes 1e3 1e4 1e5] [--lmax 4]
Prints a table, writes profiling/results/bench_so3.json.
"""
import argparse
import os
import sys

import torch
from _common import best_time, write_json
from e3nn import o3

from egnn import so3


def e3nn_wigner(vec, lmax):
    alpha, beta = o3.xyz_to_angles(vec)
    return [o3.wigner_D(l, alpha, beta, torch.zeros_like(alpha)) for l in range(lmax + 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5])
    ap.add_argument("--lmax", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_so3.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"Wigner-D blocks l = 0..{args.lmax}, float32, {device}")
    print(f"{'edges':>9} {'egnn edges/s':>13} {'e3nn edges/s':>13} {'speedup':>8} {'max |diff|':>10}")
    for E in args.sizes:
        E = int(E)
        vec = torch.randn(E, 3, generator=torch.Generator().manual_seed(0)).to(device)
        ours = best_time(lambda: so3.wigner_D(vec, args.lmax), args.reps, device)
        theirs = best_time(lambda: e3nn_wigner(vec, args.lmax), args.reps, device)
        # same rotation up to the roll about +Y, which e3nn's (alpha, beta, 0) fixes differently: compare D^T Y_l(+Y)
        y = so3.spherical_harmonics(torch.tensor([[0.0, 1.0, 0.0]], device=device), args.lmax)[0]
        diff = max(float((so3.wigner_D(vec[:256], args.lmax)[l].transpose(1, 2) @ y[l * l:(l + 1) ** 2]
                          - so3.spherical_harmonics(vec[:256], args.lmax)[:, l * l:(l + 1) ** 2]).abs().max())
                   for l in range(args.lmax + 1))
        r = dict(edges=E, lmax=args.lmax, device=str(device), egnn_edges_per_s=E / ours, e3nn_edges_per_s=E / theirs,
                 speedup=theirs / ours, check_max_abs_diff=diff)
        rows.append(r)
        print(f"{E:>9} {r['egnn_edges_per_s']:>13.3g} {r['e3nn_edges_per_s']:>13.3g} {r['speedup']:>8.1f} {diff:>10.1e}")
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
