"""Fused Triton message pipeline vs the reference layers: messages/s, peak memory, saved bytes.

One interaction layer (node update with attention aggregation + edge update) at lmax 4, E = 16 or
128 channels, for 1e3..1e7 messages, fused (egnn.nn.fused.FusedInteractionLayer, Triton on CUDA)
vs the reference layer on the PyTorch twins (egnn.nn.InteractionLayer, backend="torch") in the same run, forward and forward+backward; peak
memory (CUDA) and saved-activation bytes per edge per layer (saved_tensors_hooks, CPU too).
On CUDA also the forward rotate_to_edge kernel's achieved bandwidth as a fraction of HBM peak.
On CPU both paths run PyTorch (the fused one = twins + recompute): time ratios there only show
the recompute overhead; the byte counts are the point.

    python profiling/bench_kernels.py [--sizes 1e3 1e4 ...] [--channels 16 128] [--hbm-tbs 4.8]
Prints a table, writes profiling/results/bench_kernels.json.
"""
import argparse
import os
import sys

import torch
from _common import best_time, write_json

from egnn.kernels import rotate_to_edge
from egnn.nn import EdgeRotation, InteractionLayer
from egnn.nn.fused import FusedInteractionLayer, saved_activation_bytes


def make_inputs(E, C, lmax, device, avg_degree=60, seed=0, num_rbf=32):
    g = torch.Generator().manual_seed(seed)
    N = max(2, E // avg_degree)
    K = (lmax + 1) ** 2
    dst = torch.randint(0, N, (E,), generator=g).sort().values
    src = torch.randint(0, N, (E,), generator=g)
    t = dict(x=torch.randn(N, K, C, generator=g), e=torch.randn(E, K, C, generator=g), src=src, dst=dst,
             vec=torch.randn(E, 3, generator=g), rbf=torch.rand(E, num_rbf, generator=g), env=torch.rand(E, generator=g))
    return {k: v.to(device) for k, v in t.items()}


def run_layer(layer, rot, t, backward, grad=None):
    """Forward (with autograd recording when grad/backward) and optionally backward."""
    grad = backward if grad is None else grad
    x = t["x"].requires_grad_(grad)
    e = t["e"].requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        xo, eo = layer(x, e, t["src"], t["dst"], rot, rot.wigner(t["vec"]), t["rbf"], t["env"])
        if backward:
            (xo.square().sum() + eo.square().sum()).backward()
    return xo, eo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=float, nargs="+", default=None)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--lmax", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM peak in TB/s (H200: 4.8)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_kernels.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or ([1e3, 1e4, 1e5, 1e6, 1e7] if device.type == "cuda" else [1e3, 1e4])
    lmax = args.lmax
    rows = []
    print(f"device {device}, lmax {lmax}; messages/s of one interaction layer (node + edge update)")
    print(f"{'E':>9} {'C':>4} {'ref fwd':>10} {'fused fwd':>10} {'x':>5} {'ref f+b':>10} {'fused f+b':>10} {'x':>5} "
          f"{'ref B/edge':>10} {'fused B/edge':>12} {'peak ref MB':>11} {'peak fused MB':>13} {'rot %HBM':>8}")
    for C in args.channels:
        torch.manual_seed(0)
        ref = InteractionLayer(lmax, lmax, C, 2 * C, 2, 32, backend="torch").to(device)  # the PyTorch twins
        fused = FusedInteractionLayer(lmax, lmax, C, 2 * C, 2, 32).to(device)  # Triton on CUDA
        fused.load_state_dict(ref.state_dict())
        rots = {"ref": EdgeRotation(lmax, lmax, backend="torch").to(device), "fused": EdgeRotation(lmax, lmax).to(device)}
        for E in sizes:
            E = int(E)
            bytes_per = 4 * (lmax + 1) ** 2 * C * 3 * 2  # E x [25, 3C] fp32 gathered + written
            if bytes_per * E * 12 > (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                                      else 16e9):
                print(f"{E:>9} {C:>4}  skipped (memory)")
                continue
            t = make_inputs(E, C, lmax, device)
            r = dict(E=E, C=C, lmax=lmax, device=str(device))
            for name, layer in (("ref", ref), ("fused", fused)):
                try:
                    rot = rots[name]
                    r[f"{name}_fwd_s"] = best_time(lambda: run_layer(layer, rot, t, False), args.reps, device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    r[f"{name}_fwdbwd_s"] = best_time(lambda: run_layer(layer, rot, t, True), args.reps, device)
                    r[f"{name}_peak_MB"] = (torch.cuda.max_memory_allocated(device) / 2 ** 20
                                            if device.type == "cuda" else None)
                    # what autograd keeps between a training forward and its backward; [0] frees the
                    # output at once (its graph would inflate the next path's peak memory)
                    nbytes = saved_activation_bytes(run_layer, layer, rot, t, False, True,
                                                    exclude=list(layer.parameters()))[0]
                    r[f"{name}_saved_B_per_edge"] = nbytes / E
                except torch.OutOfMemoryError:
                    r[f"{name}_fwd_s"] = r[f"{name}_fwdbwd_s"] = float("nan")
                    r[f"{name}_saved_B_per_edge"] = r[f"{name}_peak_MB"] = None
                    torch.cuda.empty_cache()
            if device.type == "cuda":  # the forward message transform's gather + rotation alone
                tr = best_time(lambda: rotate_to_edge(t["x"], t["e"], t["src"], t["dst"], t["vec"], lmax, lmax),
                               args.reps, device)
                r["rotate_to_edge_TBs"] = bytes_per * E / tr / 1e12
                r["rotate_to_edge_frac_hbm"] = r["rotate_to_edge_TBs"] / args.hbm_tbs
            for k in ("fwd", "fwdbwd"):
                r[f"ref_{k}_msgs_per_s"] = E / r[f"ref_{k}_s"]
                r[f"fused_{k}_msgs_per_s"] = E / r[f"fused_{k}_s"]
                r[f"speedup_{k}"] = r[f"ref_{k}_s"] / r[f"fused_{k}_s"]
            rows.append(r)

            def mb(v):
                return f"{v:.0f}" if v is not None else "-"

            frac = r.get("rotate_to_edge_frac_hbm")
            print(f"{E:>9} {C:>4} {r['ref_fwd_msgs_per_s']:>10.3g} {r['fused_fwd_msgs_per_s']:>10.3g} "
                  f"{r['speedup_fwd']:>5.2f} {r['ref_fwdbwd_msgs_per_s']:>10.3g} {r['fused_fwdbwd_msgs_per_s']:>10.3g} "
                  f"{r['speedup_fwdbwd']:>5.2f} {r['ref_saved_B_per_edge'] or 0:>10.0f} "
                  f"{r['fused_saved_B_per_edge'] or 0:>12.0f} {mb(r['ref_peak_MB']):>11} {mb(r['fused_peak_MB']):>13} "
                  f"{'-' if frac is None else f'{100 * frac:.0f}':>8}")
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
