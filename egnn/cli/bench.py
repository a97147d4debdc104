"""egnn bench NAME [ARGS...]: run profiling/bench_NAME.py of a source checkout (table + JSON);
`egnn bench kernel-resources` runs the compile lane (profiling/kernel_resources.py)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ..errors import InputError


EXTRA = {"kernel-resources": "kernel_resources.py"}  # profiling scripts that are not bench_*.py


def _profiling_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "profiling")


def add_arguments(p):
    p.add_argument("name", nargs="?", help="benchmark name (e.g. so3, message, kernels, kernel-resources, partition, halo, data)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")


def run(args) -> int:
    prof = _profiling_dir()
    if not os.path.isdir(prof):
        raise InputError("egnn bench needs a source checkout: profiling/ is not installed with the wheel; "
                         "clone the repository and run `egnn bench` there")
    scripts = {f[6:-3]: f for f in os.listdir(prof) if f.startswith("bench_") and f.endswith(".py")}
    scripts.update(EXTRA)
    if not args.name:
        print("benchmarks: " + ", ".join(sorted(scripts)))
        return 0
    if args.name not in scripts:
        raise InputError(f"no benchmark {args.name!r}; available: {', '.join(sorted(scripts))}")
    return subprocess.call([sys.executable, os.path.join(prof, scripts[args.name]), *args.args])
