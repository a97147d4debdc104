"""Halo pack/unpack: the Python side of the ``egnn::halo_*`` torch ops (kernels in csrc/halo.*).

A rank's local embedding has its owned rows first and its halo rows (remote src atoms, grouped by
owner rank) after them. One exchange step is::

    send = halo_pack(x_owned, plan_send_index)        # one contiguous buffer for all neighbours
    ... send/recv slices of the buffer ...
    x_local = halo_unpack(x_local, recv, n_owned)      # recv rows -> rows n_owned .. n_owned+len(recv)

and the backward of the exchange sends the gradients of the halo rows back to their owners, which
add them into the rows they packed::

    grad_owned = halo_unpack_add(grad_owned, plan_send_index, grad_send_buffer)

Public functions (validate their arguments and raise :class:`egnn.errors.InputError`):

- ``halo_pack(x, index, plan=None)`` → ``x[index]`` as a new contiguous tensor. Differentiable: the
  backward is a deterministic index-add (pass ``plan=scatter_plan(index)``, computed once per
  structure, to skip the backward's sort).
- ``halo_unpack(x, recv, offset)`` → a copy of ``x`` whose rows ``offset:offset+len(recv)`` are
  ``recv``. Out-of-place so that it composes with autograd (the gradient of the overwritten rows of
  ``x`` is zero, ``recv`` gets those rows of the incoming gradient).
- ``halo_unpack_(x, recv, offset)`` → the same, in place on ``x`` (inference only: refuses tensors
  that require grad), saves the copy of the owned rows.
- ``halo_unpack_add(grad, index, buf, plan=None)`` → ``grad`` with ``buf[k]`` added to row
  ``index[k]``; duplicates add, in ascending k, accumulated in float32 for float16/bfloat16:
  deterministic (no atomics) on CPU and CUDA. Differentiable (its buf-gradient is a pack).
- ``scatter_plan(index)`` → :class:`ScatterPlan` (rows, ptr, order): the CSR of ``index`` by target
  row that the scatter-add kernels use (one CUDA block per target row).

Implementations: the compiled extension egnn._C (CPU: at::parallel_for over rows; CUDA: 16-byte
vector copies, one launch for all neighbours). Without it, the same op names are defined here with
the pure-PyTorch twins below as their implementation, and that fallback is logged once through
``egnn._ext.require``. The twins are also the reference the tests compare the compiled ops with.
Fake (meta) kernels and autograd rules are registered here for both, so the ops trace under
``torch.compile``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _ext
from .errors import InputError, warn_once

__all__ = ["ScatterPlan", "scatter_plan", "halo_pack", "halo_unpack", "halo_unpack_", "halo_unpack_add"]

# Must equal the m.def strings in csrc/halo.cpp (a test checks).
SCHEMAS = {
    "halo_pack": "halo_pack(Tensor x, Tensor send_index, Tensor? rows=None, Tensor? ptr=None, "
                 "Tensor? order=None) -> Tensor",
    "halo_unpack": "halo_unpack(Tensor x, Tensor recv, int offset) -> Tensor",
    "halo_unpack_": "halo_unpack_(Tensor(a!) x, Tensor recv, int offset) -> ()",
    "halo_unpack_add": "halo_unpack_add(Tensor grad_x, Tensor index, Tensor buf) -> Tensor",
    "halo_unpack_add_csr": "halo_unpack_add_csr(Tensor grad_x, Tensor rows, Tensor ptr, Tensor order, "
                           "Tensor buf) -> Tensor",
}


class ScatterPlan(NamedTuple):
    """CSR of an index list by target row: ``rows[u]`` receives ``buf[order[ptr[u]:ptr[u+1]]]``."""

    rows: Tensor   # [U] distinct target rows, ascending
    ptr: Tensor    # [U+1]
    order: Tensor  # [M] positions into the index list, stably sorted by target

    def to(self, device) -> "ScatterPlan":
        return ScatterPlan(*(t.to(device) for t in self))


def scatter_plan(index: Tensor) -> ScatterPlan:
    """The CSR of ``index`` (1-D int64) by target row; deterministic (stable sort)."""
    _check_index(index, "index")
    order = torch.argsort(index, stable=True)
    rows, counts = torch.unique_consecutive(index[order], return_counts=True)
    ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ScatterPlan(rows, ptr, order)


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch twins (the fallback implementation and the tests' reference).

def _twin_pack(x, send_index, rows=None, ptr=None, order=None):
    return x.index_select(0, send_index).contiguous()


def _twin_unpack(x, recv, offset):
    out = x.clone(memory_format=torch.contiguous_format)
    out[offset:offset + recv.shape[0]] = recv
    return out


def _twin_unpack_inplace(x, recv, offset):
    x[offset:offset + recv.shape[0]].copy_(recv)


def _twin_unpack_add(grad_x, index, buf):
    # float32 accumulation for half types, as the kernels do; serial index_add_ order on CPU
    # (ascending k per row), so fp32/fp64 results equal the compiled CPU op bit for bit.
    if grad_x.dtype in (torch.float16, torch.bfloat16):
        return grad_x.float().index_add_(0, index, buf.float()).to(grad_x.dtype)
    return grad_x.clone(memory_format=torch.contiguous_format).index_add_(0, index, buf)


def _index_from_csr(rows, ptr, order):
    index = torch.empty_like(order)
    index[order] = torch.repeat_interleave(rows, ptr.diff(), output_size=order.numel())
    return index


def _twin_unpack_add_csr(grad_x, rows, ptr, order, buf):
    return _twin_unpack_add(grad_x, _index_from_csr(rows, ptr, order), buf)


TWINS = {"halo_pack": _twin_pack, "halo_unpack": _twin_unpack, "halo_unpack_": _twin_unpack_inplace,
         "halo_unpack_add": _twin_unpack_add, "halo_unpack_add_csr": _twin_unpack_add_csr}


# ---------------------------------------------------------------------------------------------
# Registration: compiled op when egnn._C has it, else the twin (logged once).

def _has_op(name: str) -> bool:
    return hasattr(torch.ops.egnn, name) if _ext.AVAILABLE else False


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"egnn::{name}", key)


_lib = torch.library.Library("egnn", "FRAGMENT")
_missing = [n for n in SCHEMAS if not _has_op(n)]
if _missing:
    if _ext.require("halo pack/unpack (egnn.ops)"):  # loaded, but built from older csrc/
        warn_once("ext-stale", f"egnn._C lacks the ops {_missing}; they use the pure-PyTorch path. Rebuild with "
                  "`pip install --no-build-isolation -e .`.")
    for _name in _missing:
        _lib.define(SCHEMAS[_name])
        _lib.impl(_name, TWINS[_name], "CompositeExplicitAutograd")
if torch.version.cuda is not None:  # a CUDA torch (no device query here: it could poison fork())
    _no_cuda = [n for n in SCHEMAS if n not in _missing and not _has_kernel(n, "CUDA")
                and not _has_kernel(n, "CompositeExplicitAutograd")]
    if _no_cuda:
        warn_once("ext-cuda", f"egnn._C was built without CUDA kernels; {_no_cuda} use the pure-PyTorch path on "
                  "GPUs. Rebuild with a CUDA torch and nvcc present (or EGNN_FORCE_CUDA=1).")
        for _name in _no_cuda:
            _lib.impl(_name, TWINS[_name], "CUDA")


@torch.library.register_fake("egnn::halo_pack", lib=_lib)
def _fake_pack(x, send_index, rows=None, ptr=None, order=None):
    return x.new_empty((send_index.shape[0], *x.shape[1:]))


@torch.library.register_fake("egnn::halo_unpack", lib=_lib)
def _fake_unpack(x, recv, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("egnn::halo_unpack_", lib=_lib)
def _fake_unpack_inplace(x, recv, offset):
    return None


@torch.library.register_fake("egnn::halo_unpack_add", lib=_lib)
def _fake_unpack_add(grad_x, index, buf):
    return torch.empty_like(grad_x, memory_format=torch.contiguous_format)


@torch.library.register_fake("egnn::halo_unpack_add_csr", lib=_lib)
def _fake_unpack_add_csr(grad_x, rows, ptr, order, buf):
    return torch.empty_like(grad_x, memory_format=torch.contiguous_format)


# Autograd rules. Each backward is written with the ops themselves, so double backward works too.

def _pack_setup(ctx, inputs, output):
    x, index, rows, ptr, order = inputs
    ctx.n = x.shape[0]
    ctx.save_for_backward(index, rows, ptr, order)


def _pack_backward(ctx, grad):
    index, rows, ptr, order = ctx.saved_tensors
    zeros = grad.new_zeros((ctx.n, *grad.shape[1:]))
    if rows is not None:
        gx = torch.ops.egnn.halo_unpack_add_csr(zeros, rows, ptr, order, grad)
    else:
        gx = torch.ops.egnn.halo_unpack_add(zeros, index, grad)
    return gx, None, None, None, None


def _unpack_setup(ctx, inputs, output):
    x, recv, offset = inputs
    ctx.offset, ctx.m = offset, recv.shape[0]


def _unpack_backward(ctx, grad):
    gx = grecv = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.egnn.halo_unpack(grad, grad.new_zeros((ctx.m, *grad.shape[1:])), ctx.offset)
    if ctx.needs_input_grad[1]:
        grecv = grad.narrow(0, ctx.offset, ctx.m)
    return gx, grecv, None


def _unpack_add_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _unpack_add_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    gbuf = torch.ops.egnn.halo_pack(grad, index) if ctx.needs_input_grad[2] else None
    return grad, None, gbuf


def _unpack_add_csr_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:4])


def _unpack_add_csr_backward(ctx, grad):
    rows, ptr, order = ctx.saved_tensors
    gbuf = None
    if ctx.needs_input_grad[4]:
        gbuf = torch.ops.egnn.halo_pack(grad, _index_from_csr(rows, ptr, order), rows, ptr, order)
    return grad, None, None, None, gbuf


torch.library.register_autograd("egnn::halo_pack", _pack_backward, setup_context=_pack_setup, lib=_lib)
torch.library.register_autograd("egnn::halo_unpack", _unpack_backward, setup_context=_unpack_setup, lib=_lib)
torch.library.register_autograd("egnn::halo_unpack_add", _unpack_add_backward, setup_context=_unpack_add_setup,
                                lib=_lib)
torch.library.register_autograd("egnn::halo_unpack_add_csr", _unpack_add_csr_backward,
                                setup_context=_unpack_add_csr_setup, lib=_lib)


# ---------------------------------------------------------------------------------------------
# Public, validated entry points.

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_index(index, name: str, rows: int | None = None, device=None) -> None:
    if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype != torch.int64:
        what = f"{tuple(index.shape)} {index.dtype}" if isinstance(index, Tensor) else type(index).__name__
        raise InputError(f"egnn.ops: {name} must be a 1-D torch.int64 tensor, got {what}; "
                         f"convert it with torch.as_tensor({name}, dtype=torch.int64).")
    if device is not None and index.device != device:
        raise InputError(f"egnn.ops: {name} is on {index.device} but the data is on {device}; move it with .to().")
    # Range check on the host only: on a GPU it would cost a device sync every call (plans are
    # validated when they are built, and the CUDA kernels assert).
    if rows is not None and index.device.type == "cpu" and index.numel() and not _compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= rows:
            raise InputError(f"egnn.ops: {name} has values in [{lo}, {hi}] but the target has {rows} rows; "
                             "the plan does not match this tensor (rebuild the plan for this structure).")


def _check_rows(a: Tensor, b: Tensor, an: str, bn: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() < 1:
        raise InputError(f"egnn.ops: {an} and {bn} must be tensors with a row dimension.")
    if a.shape[1:] != b.shape[1:] or a.dim() != b.dim():
        raise InputError(f"egnn.ops: {bn} rows {tuple(b.shape[1:])} must have the shape of {an} rows "
                         f"{tuple(a.shape[1:])} ({an} {tuple(a.shape)}, {bn} {tuple(b.shape)}).")
    if a.dtype != b.dtype or a.device != b.device:
        raise InputError(f"egnn.ops: {an} is {a.dtype} on {a.device} but {bn} is {b.dtype} on {b.device}; "
                         "cast them to one dtype and device.")


def _check_plan(plan: ScatterPlan, m: int, device) -> ScatterPlan:
    if not isinstance(plan, ScatterPlan):
        raise InputError(f"egnn.ops: plan must be an egnn.ops.ScatterPlan (from scatter_plan(index)), "
                         f"got {type(plan).__name__}.")
    for name, t in zip(plan._fields, plan):
        _check_index(t, f"plan.{name}", device=device)
    if plan.order.numel() != m or plan.ptr.numel() != plan.rows.numel() + 1:
        raise InputError(f"egnn.ops: plan covers {plan.order.numel()} entries but the index has {m}; "
                         "build it with scatter_plan(index) for this index.")
    return plan


def halo_pack(x: Tensor, index: Tensor, plan: ScatterPlan | None = None) -> Tensor:
    """``x[index]`` as one contiguous send buffer (rows of all neighbours, concatenated)."""
    _check_rows(x, x, "x", "x")
    _check_index(index, "index", x.shape[0], x.device)
    if plan is None:
        return torch.ops.egnn.halo_pack(x, index)
    _check_plan(plan, index.numel(), x.device)
    return torch.ops.egnn.halo_pack(x, index, plan.rows, plan.ptr, plan.order)


def _check_slab(x: Tensor, recv: Tensor, offset: int) -> None:
    _check_rows(x, recv, "x", "recv")
    if not isinstance(offset, int) or offset < 0 or offset + recv.shape[0] > x.shape[0]:
        raise InputError(f"egnn.ops: the {recv.shape[0]} received rows at offset {offset} do not fit in x with "
                         f"{x.shape[0]} rows; offset must be the number of owned rows of this rank's plan.")


def halo_unpack(x: Tensor, recv: Tensor, offset: int) -> Tensor:
    """A copy of ``x`` with rows ``offset:offset+len(recv)`` replaced by ``recv`` (differentiable)."""
    _check_slab(x, recv, offset)
    return torch.ops.egnn.halo_unpack(x, recv, offset)


def halo_unpack_(x: Tensor, recv: Tensor, offset: int) -> Tensor:
    """In-place :func:`halo_unpack` for inference; returns ``x``."""
    _check_slab(x, recv, offset)
    if torch.is_grad_enabled() and (x.requires_grad or recv.requires_grad):
        raise InputError("egnn.ops.halo_unpack_ is for inference: its inputs require grad; use halo_unpack "
                         "(out-of-place, differentiable) or run under torch.no_grad().")
    torch.ops.egnn.halo_unpack_(x, recv, offset)
    return x


def halo_unpack_add(grad: Tensor, index: Tensor, buf: Tensor, plan: ScatterPlan | None = None) -> Tensor:
    """``grad`` with ``buf[k]`` added into row ``index[k]`` (duplicates add, deterministically)."""
    _check_rows(grad, buf, "grad", "buf")
    _check_index(index, "index", grad.shape[0], grad.device)
    if buf.shape[0] != index.numel():
        raise InputError(f"egnn.ops: buf has {buf.shape[0]} rows but index has {index.numel()} entries; "
                         "the buffer must come from the same plan as the index.")
    if plan is None:
        return torch.ops.egnn.halo_unpack_add(grad, index, buf)
    _check_plan(plan, index.numel(), grad.device)
    return torch.ops.egnn.halo_unpack_add_csr(grad, plan.rows, plan.ptr, plan.order, buf)
