"""Halo pack/unpack throughput: the egnn::halo_* ops against plain PyTorch in the same run.

    .venv/bin/python profiling/bench_halo.py [--rows 1e4,1e5,1e6] [--dtypes float32,float16,bfloat16]
                                             [--repeat 5] [--device cpu|cuda|all]

Rows are node embeddings of 25 x 16 values (lmax 4, 16 channels). For R rows:
  pack        x [R rows] -> buffer of R rows gathered by a random index with repeats
              vs x.index_select(0, index)                          bytes: read R + write R rows
  unpack      x [R rows] with its last R/2 rows replaced by recv -> new tensor
              vs torch.cat([x[:R/2], recv])                        bytes: read R + write R rows
  unpack_     the same in place                                    bytes: read R/2 + write R/2
              vs x[R/2:].copy_(recv)
  unpack_add  grad [R] + scatter-add of R buffer rows (the pack's backward, deterministic)
              vs grad.index_add(0, index, buf)                     bytes: read 2R + write R rows
  unpack_add+plan  the same with a precomputed scatter_plan (what the exchange uses)
GB/s = bytes / median time. Prints a table, writes profiling/results/bench_halo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from egnn import _ext, ops  # noqa: E402

ROW = (25, 16)


def _timer(device, fn, repeat):
    """Median seconds of `repeat` calls after one warm-up (CUDA: events on the current stream)."""
    fn()
    ts = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _cases(rows, dtype, device, gen):
    x = torch.randn((rows, *ROW), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    index = torch.randint(0, rows, (rows,), generator=gen).to(device)
    half = rows // 2
    recv = x[:half].flip(0).contiguous()
    buf = torch.randn((rows, *ROW), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    plan = ops.scatter_plan(index)
    rb = x[0].numel() * x.element_size()
    y = x.clone()
    e = torch.ops.egnn  # the raw ops: the validated wrappers add a host-side range check on CPU
    return [
        ("pack", 2 * rows * rb, lambda: e.halo_pack(x, index), lambda: x.index_select(0, index)),
        ("unpack", 2 * rows * rb, lambda: e.halo_unpack(x, recv, rows - half),
         lambda: torch.cat([x[:rows - half], recv])),
        ("unpack_", 2 * half * rb, lambda: e.halo_unpack_(y, recv, rows - half),
         lambda: y[rows - half:].copy_(recv)),
        ("unpack_add", 3 * rows * rb, lambda: e.halo_unpack_add(x, index, buf), lambda: x.index_add(0, index, buf)),
        ("unpack_add+plan", 3 * rows * rb, lambda: e.halo_unpack_add_csr(x, *plan, buf),
         lambda: x.index_add(0, index, buf)),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1e4,1e5,1e6")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--out", default=os.path.join(ROOT, "profiling", "results", "bench_halo.json"))
    a = p.parse_args(argv)
    rows_list = [int(float(r)) for r in a.rows.split(",")]
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    devices = [torch.device("cpu")] if a.device in ("cpu", "all") else []
    if a.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif a.device == "cuda":
        p.error("--device cuda: no CUDA device visible")
    compiled = _ext.require("profiling/bench_halo.py")
    gen = torch.Generator().manual_seed(0)
    results = []
    head = f"{'device':6} {'op':16} {'dtype':9} {'rows':>8} {'egnn GB/s':>10} {'torch GB/s':>11} {'ratio':>6}"
    print(f"egnn halo ops ({'compiled egnn._C' if compiled else 'pure-PyTorch twin'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, row = {ROW[0]}x{ROW[1]} values")
    print(head + "\n" + "-" * len(head))
    for device in devices:
        for dtype in dtypes:
            for rows in rows_list:
                for name, nbytes, ours, base in _cases(rows, dtype, device, gen):
                    t_ours, t_base = _timer(device, ours, a.repeat), _timer(device, base, a.repeat)
                    r = dict(device=device.type, op=name, dtype=str(dtype).replace("torch.", ""), rows=rows,
                             bytes=nbytes, egnn_s=t_ours, torch_s=t_base, egnn_gbs=nbytes / t_ours / 1e9,
                             torch_gbs=nbytes / t_base / 1e9, ratio=t_base / t_ours)
                    results.append(r)
                    print(f"{r['device']:6} {name:16} {r['dtype']:9} {rows:8.0e} {r['egnn_gbs']:10.2f} "
                          f"{r['torch_gbs']:11.2f} {r['ratio']:6.2f}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    meta = dict(torch=torch.__version__, compiled=compiled, threads=torch.get_num_threads(), machine=platform.machine(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, row=list(ROW),
                repeat=a.repeat)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
