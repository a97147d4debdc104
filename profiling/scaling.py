"""Strong / weak scaling harness for the distributed model (forward + backward steps).

One world:   torchrun --standalone --nproc-per-node 4 profiling/scaling.py --reps 2 2 1
Sweep 1..N:  python profiling/scaling.py --launch 4 [--weak] ...   (runs torchrun once per world size)

Builds amorphous-like HfO2 (fluorite, rattled, tiled by --reps; with --weak the x repetition grows
with the world size), partitions it (--method), builds each rank's HaloPlan and runs --warmup +
--steps steps of forward, a sum-of-squares loss over owned outputs, backward and the gradient
all-reduce. Per rank it reports owned/halo atoms, edges, neighbour ranks, communication bytes
(which depend only on the plan, not on the hardware) and per-step times of the phases pack,
sendrecv, unpack and compute (= step - communication). Rank 0 prints the table and writes
profiling/results/scaling_<mode>_w<N>.json; --launch adds a table of speedups against 1 rank.
EGNN_CUDA_PROFILE=A:B brackets steps A..B-1 with cudaProfilerStart/Stop (see nsys_train.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, nargs=3, default=[2, 2, 1], help="tiling of the 12-atom HfO2 cell")
    p.add_argument("--weak", action="store_true", help="weak scaling: x repetition *= world size")
    p.add_argument("--r-cut", type=float, default=5.0)
    p.add_argument("--method", default="low-nn", choices=["low-nn", "metis", "linear"])
    p.add_argument("--basis", default="szv", choices=["szv", "sp"],
                   help="szv: Hf sspd / O sp (needs lmax 4); sp: Hf sp / O sp (lmax 2, for CPU smoke runs)")
    p.add_argument("--lmax", type=int, default=4)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="torch", choices=["torch", "cupy"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--launch", type=int, metavar="N", help="run torchrun for 1..N ranks and compare")
    p.add_argument("--out", default=None, help="JSON path (default profiling/results/scaling_<mode>_w<N>.json)")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def structure(args, world: int):
    from ase.build import bulk

    from egnn.graph import radius_graph

    reps = list(args.reps)
    if args.weak:
        reps[0] *= world
    atoms = bulk("HfO2", "fluorite", 5.1, cubic=True).repeat(reps)
    atoms.rattle(0.1, seed=0)
    return radius_graph(atoms, args.r_cut), reps


def run_world(args) -> None:
    import torch
    import torch.distributed as dist

    from egnn.basis import OrbitalBasis
    from egnn.comm import HaloExchange, HaloPlan, PhaseTimer
    from egnn.distributed import ProfilerWindow, init_distributed, local_inputs, timing_report
    from egnn.model import HamiltonianModel, ModelConfig
    from egnn.partition import partition, quality
    from egnn.partition.quality import embedding_row_bytes

    if "WORLD_SIZE" not in os.environ:  # plain `python scaling.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    info = init_distributed()
    rank, world = info.rank, info.world_size
    if info.device.type == "cpu":  # ranks share the cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
    dtype = getattr(torch, args.dtype)

    graph, reps = structure(args, world)
    parts = partition(graph, world, args.method)
    plan = HaloPlan.build(graph, parts, rank, world)
    timer = PhaseTimer(sync=info.device.type == "cuda")
    ex = HaloExchange(plan, args.backend, timer=timer)

    torch.manual_seed(0)
    basis = (OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH") if args.basis == "szv"
             else OrbitalBasis.explicit({"Hf": "sp", "O": "sp"}, "sp"))
    lmax = max(args.lmax, basis.L_max)
    cfg = ModelConfig(basis=basis, r_cut=args.r_cut, lmax=lmax, mmax=lmax,
                      channels=args.channels, layers=args.layers, heads=2, hidden=2 * args.channels)
    model = HamiltonianModel(cfg).to(info.device, dtype)
    params = [p for p in model.parameters()]
    sp = torch.as_tensor(basis.species_index(graph.numbers))
    vec = torch.as_tensor(graph.vec, dtype=dtype)
    inputs = local_inputs(plan, sp, vec, info.device)
    profile = ProfilerWindow()

    def step():
        node, edge = model(*inputs, exchange=ex)
        loss = node[:plan.num_owned].square().sum() + edge.square().sum()
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if world > 1:
            dist.all_reduce(flat)
        for p in params:
            p.grad = None

    step_s = []
    for i in range(args.warmup + args.steps):
        profile.step()
        if i == args.warmup:
            timer.reset()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            step_s.append(time.perf_counter() - t0)
            timer.add("step", step_s[-1])
    profile.close()

    row_bytes = embedding_row_bytes(cfg.lmax, cfg.channels, args.dtype)
    q = quality(graph, parts, row_bytes=row_bytes)
    extra = {"owned": plan.num_owned, "halo": plan.num_halo, "edges": int(len(plan.edges)),
             "recv_from": len(plan.recv_ranks), "send_to": len(plan.send_ranks),
             "rows_sent": int(len(plan.send_index)), "plan_bytes_per_exchange": plan.bytes_per_exchange(row_bytes),
             "step_s": step_s}
    got = timing_report(timer, None, log=lambda *a: None, extra=extra)
    if rank == 0:
        mode = "weak" if args.weak else "strong"
        out = args.out or os.path.join(RESULTS, f"scaling_{mode}_w{world}.json")
        result = {"world_size": world, "mode": mode, "reps": reps, "atoms": graph.num_nodes,
                  "edges": graph.num_edges, "r_cut": args.r_cut, "method": args.method, "lmax": cfg.lmax,
                  "channels": cfg.channels, "layers": cfg.layers, "dtype": args.dtype, "steps": args.steps,
                  "threads_per_rank": torch.get_num_threads(),
                  "row_bytes": row_bytes, "device": str(info.device), "backend": info.backend,
                  "quality": q.summary(), "ranks": got}
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(table(result))
        print(f"wrote {out}")
    dist.destroy_process_group()


def table(r: dict) -> str:
    n = r["steps"]
    lines = [f"{r['mode']} scaling, world {r['world_size']}: {r['atoms']} atoms, {r['edges']} edges, "
             f"r_cut {r['r_cut']} Å, {r['method']}, lmax {r['lmax']} C {r['channels']} x{r['layers']} layers, "
             f"{r['dtype']} ({r['row_bytes']} B/row), per step (mean of {n})",
             f"{'rank':>4} {'owned':>6} {'halo':>5} {'edges':>6} {'nbrs':>4} {'KiB sent':>9} {'KiB recv':>9} "
             f"{'pack ms':>8} {'sendrecv ms':>11} {'unpack ms':>9} {'compute ms':>10} {'step ms':>8}"]
    for g in r["ranks"]:
        s = g["seconds"]
        ms = lambda k: 1000 * s.get(k, 0.0) / n  # noqa: E731
        lines.append(f"{g['rank']:>4} {g['owned']:>6} {g['halo']:>5} {g['edges']:>6} {g['recv_from']:>4} "
                     f"{g['bytes_sent'] / n / 1024:>9.1f} {g['bytes_recv'] / n / 1024:>9.1f} {ms('pack'):>8.2f} "
                     f"{ms('sendrecv'):>11.2f} {ms('unpack'):>9.2f} {ms('compute'):>10.2f} {ms('step'):>8.2f}")
    return "\n".join(lines)


def launch(args, argv) -> None:
    """torchrun once per world size 1..N, then a comparison against the 1-rank run."""
    mode = "weak" if args.weak else "strong"
    rest, skip = [], False
    for a in argv:  # forward everything but --launch N
        if skip:
            skip = False
            continue
        if a == "--launch":
            skip = True
            continue
        if not a.startswith("--launch="):
            rest.append(a)
    rows = []
    for n in range(1, args.launch + 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               os.path.abspath(__file__)] + rest
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or max(1, (os.cpu_count() or 1) // n)))
        subprocess.run(cmd, check=True, env=env)
        with open(os.path.join(RESULTS, f"scaling_{mode}_w{n}.json")) as f:
            rows.append(json.load(f))
    base = max(np.mean(g["step_s"]) for g in rows[0]["ranks"])
    print(f"\n{mode} scaling summary (step = slowest rank's mean; ratio = 1-rank step / step)")
    print(f"{'ranks':>5} {'atoms':>6} {'step ms':>9} {'ratio':>7} {'comm ms':>8} {'max KiB sent/step':>18} "
          f"{'max halo':>8}")
    summary = []
    for r in rows:
        step = max(np.mean(g["step_s"]) for g in r["ranks"])
        comm = max(g["seconds"]["comm"] for g in r["ranks"]) / r["steps"]
        sent = max(g["bytes_sent"] for g in r["ranks"]) / r["steps"] / 1024
        halo = max(g["halo"] for g in r["ranks"])
        summary.append({"world_size": r["world_size"], "atoms": r["atoms"], "step_s": step, "ratio": base / step,
                        "comm_s": comm, "max_kib_sent_per_step": sent, "max_halo": halo})
        print(f"{r['world_size']:>5} {r['atoms']:>6} {1000 * step:>9.1f} {base / step:>7.2f} {1000 * comm:>8.2f} "
              f"{sent:>18.1f} {halo:>8}")
    with open(os.path.join(RESULTS, f"scaling_{mode}_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.launch:
        launch(args, argv)
    else:
        run_world(args)


if __name__ == "__main__":
    main()
