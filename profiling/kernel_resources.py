"""The compile lane: compile every Triton kernel specialization egnn launches for sm_90a and sm_80,
on this machine (no GPU needed), and report registers, spills, stack, shared memory, cubin size
and compile time against the budgets (egnn.kernels.resources.BUDGET).

    .venv/bin/python profiling/kernel_resources.py [--arch 90 80] [--lmax 2 4 6] [--dtype fp32 bf16 fp16]
                                                   [--jobs 2] [--timeout 300] [--subset] [--json]
    egnn bench kernel-resources ...   (the same)

Prints a table (or, with --json, one JSON line per specialization with the keys kernel, arch, lmax,
mmax, dtype, config, registers, spill_bytes, stack_bytes, shared_bytes, cubin_bytes, compile_s,
error). Each specialization compiles in a worker process with a timeout; results are cached in
profiling/results/kernel_resources.jsonl under a hash of the kernel sources and the Triton version,
so an interrupted run resumes and an edited kernel recompiles. Exit status 1 when a row breaks a
budget (compile errors included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "profiling", "results", "kernel_resources.jsonl")


def _worker() -> int:
    """Compile specs read as JSON lines from stdin; answer one JSON record line each."""
    from egnn.kernels import resources as R

    for line in sys.stdin:
        spec = R.Spec(**json.loads(line))
        print(json.dumps(R.compile_spec(spec)), flush=True)
    return 0


class _Proc:
    def __init__(self):
        import tempfile

        # a fresh Triton cache per worker: compile times are real compiles, never cache hits
        self.cache = tempfile.mkdtemp(prefix="egnn-lane-")
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore", TRITON_CACHE_DIR=self.cache)
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)
        self.spec, self.t0 = None, 0.0

    def send(self, spec):
        self.spec, self.t0 = spec, time.time()
        self.p.stdin.write(json.dumps(dataclasses.asdict(spec)) + "\n")
        self.p.stdin.flush()

    def kill(self):
        import shutil

        self.p.kill()
        self.p.wait()
        shutil.rmtree(self.cache, ignore_errors=True)


def run_lane(specs, jobs: int = 2, timeout: float = 300.0, on_row=None) -> list[dict]:
    """Compile specs in `jobs` worker processes; a spec over `timeout` seconds is killed and
    reported with error "timeout"."""
    pending, rows = list(specs), []
    procs = [_Proc() for _ in range(min(jobs, len(pending)))]
    try:
        while pending or any(p.spec for p in procs):
            for p in procs:
                if p.spec is None and pending:
                    p.send(pending.pop(0))
            busy = [p for p in procs if p.spec is not None]
            ready, _, _ = select.select([p.p.stdout for p in busy], [], [], 1.0)
            for p in busy:
                if p.p.stdout in ready:
                    line = p.p.stdout.readline()
                    if line:
                        rec = json.loads(line)
                    else:  # the worker died
                        rec = _failed(p.spec, "worker process died")
                        p.kill()
                        procs[procs.index(p)] = p = _Proc()
                    p.spec = None
                    rows.append(rec)
                    on_row and on_row(rec)
                elif time.time() - p.t0 > timeout:
                    rec = _failed(p.spec, f"timeout after {timeout:.0f} s", time.time() - p.t0)
                    p.kill()
                    procs[procs.index(p)] = _Proc()
                    rows.append(rec)
                    on_row and on_row(rec)
    finally:
        for p in procs:
            p.kill()
    return rows


def _failed(spec, why, secs=None):
    return {"kernel": spec.kernel, "arch": f"sm_{spec.arch}{'a' if spec.arch >= 90 else ''}", "lmax": spec.lmax,
            "mmax": spec.mmax, "dtype": spec.dtype, "roll": spec.roll, "config": None, "registers": None,
            "spill_bytes": None, "stack_bytes": None, "shared_bytes": None, "cubin_bytes": None,
            "compile_s": None if secs is None else round(secs, 1), "error": why}


def _key(rec_or_spec, src) -> str:
    r = rec_or_spec if isinstance(rec_or_spec, dict) else dataclasses.asdict(rec_or_spec)
    arch = r["arch"] if isinstance(r["arch"], str) else f"sm_{r['arch']}{'a' if r['arch'] >= 90 else ''}"
    return f"{src}|{r['kernel']}|{arch}|{r['lmax']}|{r['mmax']}|{r['dtype']}|{r['roll']}"


def _load_cache(src) -> dict:
    out = {}
    if os.path.isfile(CACHE):
        with open(CACHE) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("source") == src:
                    out[_key(rec, src)] = rec
    return out


def table(rows) -> str:
    from egnn.kernels.resources import budget_violations

    head = (f"{'kernel':16s}{'arch':>8s}{'l':>3s}{'m':>3s} {'dtype':6s}{'config':>22s}{'regs':>6s}{'spill':>7s}"
            f"{'stack':>7s}{'smem':>7s}{'cubin kB':>9s}{'compile s':>10s}  verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["config"] or {}
        cfg = "x".join(str(c[k]) for k in ("BLOCK_E", "BLOCK_C", "BLOCK_N", "BLOCK_K") if k in c)
        cfg += f" w{c.get('num_warps', '')}" if c else ""
        v = budget_violations(r)
        fmt = lambda x: "-" if x is None else str(x)  # noqa: E731
        kb = "-" if r["cubin_bytes"] is None else f"{r['cubin_bytes'] / 1024:.0f}"
        name = r["kernel"] + ("+roll" if r.get("roll") else "")
        lines.append(f"{name:16s}{r['arch']:>8s}{r['lmax']:>3d}{r['mmax']:>3d} {r['dtype']:6s}{cfg:>22s}"
                     f"{fmt(r['registers']):>6s}{fmt(r['spill_bytes']):>7s}{fmt(r['stack_bytes']):>7s}"
                     f"{fmt(r['shared_bytes']):>7s}{kb:>9s}{fmt(r['compile_s']):>10s}  {'ok' if not v else '; '.join(v)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default 90 80)")
    p.add_argument("--lmax", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--subset", action="store_true", help="only the representative subset the tests compile")
    p.add_argument("--no-sweep", action="store_true", help="leave out the fp32 sweep over every (lmax, mmax)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile processes (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per specialization (default 300)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything")
    p.add_argument("--json", action="store_true", help="one JSON line per specialization instead of the table")
    a = p.parse_args(argv)
    if a.worker:
        return _worker()
    sys.path.insert(0, ROOT)
    from egnn.kernels import resources as R

    why = R.api_available()
    if why:
        print(f"kernel_resources: skipped: {why}", file=sys.stderr)
        return 0
    specs = R.representative() if a.subset else R.specs(tuple(a.arch), tuple(a.lmax), tuple(a.dtype), sweep=not a.no_sweep)
    src = R.source_hash()
    cache = {} if a.no_cache else _load_cache(src)
    todo = [s for s in specs if _key(s, src) not in cache]
    done = [cache[_key(s, src)] for s in specs if _key(s, src) in cache]
    if not a.json:
        print(f"{len(specs)} specializations ({len(done)} cached, {len(todo)} to compile with {a.jobs} jobs)",
              file=sys.stderr)
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)

    def keep(rec):
        rec["source"] = src
        with open(CACHE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if not a.json:
            print(f"  {rec['kernel']} sm{rec['arch'][3:]} l{rec['lmax']}m{rec['mmax']} {rec['dtype']}: "
                  f"{rec['compile_s']} s {'ERROR ' + rec['error'][:80] if rec['error'] else ''}", file=sys.stderr)

    rows = done + run_lane(todo, a.jobs, a.timeout, keep)
    order = {_key(s, src): i for i, s in enumerate(specs)}
    rows.sort(key=lambda r: order.get(_key(r, src), 0))
    if a.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "source"}))
    else:
        print(table(rows))
        bad = [r for r in rows if R.budget_violations(r)]
        secs = [r["compile_s"] for r in rows if r["compile_s"] is not None]
        print(f"\n{len(rows)} specializations, {len(bad)} over budget; compile time max {max(secs):.1f} s, "
              f"mean {sum(secs) / len(secs):.1f} s" if secs else "")
    return 1 if any(R.budget_violations(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
