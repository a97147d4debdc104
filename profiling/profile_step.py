"""One training step of HamiltonianModel under torch.profiler: time per op and per NVTX-named phase.

    python profiling/profile_step.py [--repeat 3] [--r-cut 8] [--out profiling/results/profile_step.json]

The stand-in for profiling/nsys_kernels.sh where Nsight Systems is not installed: the same model and
step (HfO2 fluorite tiled --repeat times), Triton kernels on CUDA (after warm-up steps that compile
them), and a table of the top device (or CPU) ops with their total time. Writes JSON and a Chrome
trace next to it.
"""
import argparse
import json
import os
import sys

import torch
from ase.build import bulk

from egnn.basis import OrbitalBasis
from egnn.graph import radius_graph
from egnn.model import HamiltonianModel, ModelConfig


def training_step(repeat: int, r_cut: float, fused: bool, dev: torch.device):
    """(step, atoms, edges): one Adam step of the model on HfO2 fluorite tiled `repeat` times (rattled
    0.1 Å); the step profile_step.py and nsys_kernels.sh time."""
    atoms = bulk("HfO2", "fluorite", 5.1).repeat(repeat)
    atoms.rattle(0.1, seed=0)
    g = radius_graph(atoms, r_cut)
    basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
    t = lambda x, **k: torch.as_tensor(x, device=dev, **k)  # noqa: E731
    species, src, dst, vec = t(basis.species_index(g.numbers)), t(g.src), t(g.dst), t(g.vec, dtype=torch.float32)
    model = HamiltonianModel(ModelConfig(basis=basis, r_cut=r_cut, fused=fused)).to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        node, edge = model(species, src, dst, vec)
        (node.square().mean() + edge.square().mean()).backward()
        opt.step()

    return step, len(atoms), len(g.src)


def nsys_capture(step) -> None:
    """Warm up (Triton compiles, allocator), then one step between cudaProfilerStart/Stop: what
    `nsys profile --capture-range=cudaProfilerApi` records (profiling/nsys_kernels.sh)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--r-cut", type=float, default=8.0)
    ap.add_argument("--fused", action="store_true", help="the memory-lean fused layers")
    ap.add_argument("--nsys", action="store_true", help="no torch.profiler: one step under cudaProfilerStart/Stop "
                    "for an enclosing `nsys profile` (profiling/nsys_kernels.sh)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "profile_step.json"))
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, n_atoms, n_edges = training_step(a.repeat, a.r_cut, a.fused, dev)
    if a.nsys:
        print(f"{n_atoms} atoms, {n_edges} edges", flush=True)
        nsys_capture(step)
        return 0

    for _ in range(2):  # warm-up: Triton compiles, allocator
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:25]
    rows = [{"name": e.key, "calls": e.count, "self_us": getattr(e, key, 0)} for e in ev]
    print(f"{n_atoms} atoms, {n_edges} edges on {dev}; top ops by self {'device' if dev.type == 'cuda' else 'CPU'} time")
    for r in rows:
        print(f"  {r['self_us'] / 1e3:10.2f} ms  {r['calls']:6d}  {r['name'][:90]}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    prof.export_chrome_trace(os.path.splitext(a.out)[0] + ".trace.json")
    with open(a.out, "w") as f:
        json.dump({"atoms": n_atoms, "edges": n_edges, "device": str(dev), "fused": a.fused, "top_ops": rows,
                   "peak_MB": torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
