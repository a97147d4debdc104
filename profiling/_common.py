"""Helpers shared by the benchmarks: one timer and one JSON writer (scripts import it from here)."""
import json
import os
import time

import torch


def best_time(fn, reps: int = 3, device=None, warmup: bool = True):
    """Best wall time of `reps` calls of fn (after one warm-up call), CUDA-synchronised on GPUs."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if warmup:
        fn()
    best = float("inf")
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")
