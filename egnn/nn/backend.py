"""Which implementation an op runs: the Triton kernels or their pure-PyTorch twins.

`backend="auto"` picks Triton for CUDA tensors (when Triton imports) and the torch twin on CPU;
`"triton"` forces the kernels (on CPU only under TRITON_INTERPRET=1, the interpreter the tests
use); `"torch"` forces the twins. The environment variable EGNN_BACKEND overrides the argument.
Every fallback from a requested or expected Triton path is logged once (egnn.errors.warn_once).
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import ConfigError, warn_once

BACKENDS = ("auto", "triton", "torch")
MAX_TRITON_LMAX = 6


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r} (argument `backend=` or "
                          "the EGNN_BACKEND environment variable)")
    return backend


def resolve(backend: str, device: torch.device, lmax: int = 0, edge_grad: bool = False) -> str:
    """'triton' or 'torch' for an op on `device` (edge_grad: edge vectors need a gradient)."""
    backend = check_backend(os.environ.get("EGNN_BACKEND") or backend)
    if backend == "torch":
        return "torch"
    device = torch.device(device)
    if backend == "auto" and device.type != "cuda":
        return "torch"  # by design: the twins are the CPU path
    reason = None
    if not triton_available():
        reason = "Triton is not importable"
    elif device.type != "cuda" and not interpreting():
        reason = f"tensors are on {device.type} (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    elif lmax > MAX_TRITON_LMAX:
        reason = f"lmax={lmax} > {MAX_TRITON_LMAX}"
    elif edge_grad:
        reason = "edge vectors require a gradient (forces), which the kernels do not propagate"
    if reason:
        warn_once(f"egnn-backend-{reason}", f"egnn: using the PyTorch twins instead of the Triton kernels: {reason}")
        return "torch"
    return "triton"
