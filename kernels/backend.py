"""Which implementation an op runs: the Triton kernels or their pure-PyTorch twins.

`backend="auto"` runs the Triton kernels on CUDA tensors when the compile lane covers the call
(Triton importable, float32 / bfloat16 / float16, lmax <= MAX_TRITON_LMAX) and the twins
otherwise (CPU tensors, float64, ...), logging each fallback once. `"triton"` forces the kernels
and raises `KernelError` for anything they do not cover (on CPU they run only under
TRITON_INTERPRET=1, Triton's interpreter, which the tests use). `"torch"` forces the twins. The
environment variable EGNN_BACKEND overrides the argument; "triton" there counts as forced.
"""
from __future__ import annotations

import functools
import os

import torch

from egnn.errors import ConfigError, KernelError, warn_once

BACKENDS = ("auto", "triton", "torch")
MAX_TRITON_LMAX = 6  # kernels/_wigner.py is generated up to this degree
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r} (argument `backend=` or "
                          "the EGNN_BACKEND environment variable)")
    return backend


def _why_not(device: torch.device, lmax: int, dtype) -> str | None:
    if not triton_available():
        return "Triton is not importable (pip install 'egnn[triton]')"
    if device.type != "cuda" and not interpreting():
        return f"tensors are on {device.type} (the kernels run on CUDA; TRITON_INTERPRET=1 runs them on CPU)"
    if lmax > MAX_TRITON_LMAX:
        return f"lmax={lmax} > {MAX_TRITON_LMAX}, the largest degree the kernels are generated for"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"dtype {dtype} (the kernels take float32, bfloat16 and float16)"
    return None


def resolve(backend: str, device, lmax: int = 0, dtype=None) -> str:
    """'triton' or 'torch' for an op on `device` with tensors of `dtype`."""
    backend = check_backend(os.environ.get("EGNN_BACKEND") or backend)
    if backend == "torch":
        return "torch"
    device = torch.device(device)
    if backend == "auto" and device.type != "cuda":
        return "torch"  # by design: the twins are the CPU path, nothing to log
    reason = _why_not(device, lmax, dtype)
    if reason is None:
        return "triton"
    if forced(backend):
        raise KernelError(f"backend='triton' was forced but the Triton kernels cannot run this call: {reason}; "
                          "use backend='auto' (falls back to the PyTorch twins) or backend='torch'")
    warn_once(f"egnn-backend-{reason}", f"egnn: using the PyTorch twins instead of the Triton kernels: {reason}")
    return "torch"


def forced(backend: str) -> bool:
    return (os.environ.get("EGNN_BACKEND") or backend) == "triton"
