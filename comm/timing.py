"""Per-rank phase timer (pack, sendrecv, unpack, compute) with NVTX ranges and byte counters.

Each phase is an NVTX range named egnn/<phase> (the `nvtx` package: a no-op without a profiler).
On CUDA the timer synchronises around a phase only when `sync=True` (honest per-phase times cost
the overlap; leave it off in production and read the NVTX ranges in Nsight instead)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import nvtx
import torch

__all__ = ["PhaseTimer", "COMM_PHASES"]

COMM_PHASES = ("pack", "sendrecv", "unpack")


class PhaseTimer:
    def __init__(self, sync: bool = False, enabled: bool = True):
        self.sync, self.enabled = sync, enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.exchanges = 0

    def _sync(self, device):
        if self.sync and device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    @contextmanager
    def phase(self, name: str, device=None):
        with nvtx.annotate(f"egnn/{name}"):
            if not self.enabled:
                yield
                return
            self._sync(device)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._sync(device)
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.bytes_sent = self.bytes_recv = self.exchanges = 0

    def summary(self) -> dict:
        """Seconds per phase; 'compute' = 'step' minus the communication phases when steps were timed."""
        out = {k: float(v) for k, v in self.seconds.items()}
        comm = sum(out.get(p, 0.0) for p in COMM_PHASES)
        if "step" in out:
            out["compute"] = max(out["step"] - comm, 0.0)
        out["comm"] = comm
        return {"seconds": out, "calls": dict(self.calls), "bytes_sent": int(self.bytes_sent),
                "bytes_recv": int(self.bytes_recv), "exchanges": int(self.exchanges)}
