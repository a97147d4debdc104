"""Adapter to the halo pack/unpack ops: egnn.ops (C++/CUDA egnn::halo_* with autograd) when it is
importable, else a pure-PyTorch stand-in with the same semantics (logged once, never silent).

All three are out-of-place and used inside the exchange's own autograd.Function:
  pack(x, index)              -> x[index]                       (one contiguous send buffer)
  unpack(x, recv, offset)     -> x with rows offset:offset+len(recv) replaced by recv
  unpack_add(grad, index, buf[, plan]) -> grad + scatter-add of buf rows into rows `index` (repeats
                                add up; `plan` = scatter_plan(index), precomputed once per structure)
"""
from __future__ import annotations

import torch

from ..errors import warn_once

_impl = None


def _torch_pack(x, index):
    return x.index_select(0, index)


def _torch_unpack(x, recv, offset):
    out = x.clone()
    out[offset:offset + recv.shape[0]] = recv
    return out


def _torch_unpack_add(grad, index, buf):
    return grad.index_add(0, index, buf)


def backend() -> str:
    """'egnn.ops' or 'torch' (the stand-in)."""
    _load()
    return _impl[0]


def _load():
    global _impl
    if _impl is None:
        try:
            from .. import ops  # noqa: PLC0415  (owned by the extension work; may not exist yet)

            _impl = ("egnn.ops", ops.halo_pack, ops.halo_unpack, ops.halo_unpack_add, ops.scatter_plan)
        except (ImportError, AttributeError) as exc:
            warn_once("comm-ops", f"egnn.ops halo ops not available ({exc}); the halo exchange packs and "
                      "unpacks with index_select/index_add")
            _impl = ("torch", _torch_pack, _torch_unpack, _torch_unpack_add, None)
    return _impl


def pack(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _load()[1](x, index)


def unpack(x: torch.Tensor, recv: torch.Tensor, offset: int) -> torch.Tensor:
    return _load()[2](x, recv, offset)


def scatter_plan(index: torch.Tensor):
    """egnn.ops' precomputed CSR of `index` (makes unpack_add deterministic without a sort per
    call), or None with the stand-in."""
    make = _load()[4]
    return make(index) if make is not None else None


def unpack_add(grad: torch.Tensor, index: torch.Tensor, buf: torch.Tensor, plan=None) -> torch.Tensor:
    if plan is not None:
        return _load()[3](grad, index, buf, plan)
    return _load()[3](grad, index, buf)
