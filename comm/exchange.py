"""Differentiable halo exchange over a HaloPlan, with two point-to-point backends.

forward:  pack the owned rows every neighbour needs into one buffer (egnn/pack), post all sends and
          receives at once (egnn/sendrecv), write the received rows into the halo rows (egnn/unpack).
backward: the reverse trip: gradients of halo rows go back to their owners and are added to the
          owned rows they came from (a row sent to several ranks sums their gradients); the halo
          rows themselves get zero gradient (the forward overwrote them).

Backends: "torch" (torch.distributed.batch_isend_irecv: NCCL on GPUs, gloo on CPUs) and "cupy"
(cupy.cuda.nccl with groupStart/groupEnd, an optional extra imported lazily).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import DistributedError, InputError
from . import _ops
from .plan import HaloPlan
from .timing import PhaseTimer

__all__ = ["HaloExchange", "halo_exchange", "TorchBackend", "CupyBackend", "make_backend", "BACKENDS"]

BACKENDS = ("torch", "cupy")


def _wait_timeout():
    """EGNN_DIST_TIMEOUT (seconds, default 300): how long one exchange may wait for its peers."""
    import datetime
    import os

    try:
        return datetime.timedelta(seconds=float(os.environ.get("EGNN_DIST_TIMEOUT", "300")))
    except ValueError:
        raise DistributedError(f"EGNN_DIST_TIMEOUT must be a number of seconds, got "
                               f"{os.environ['EGNN_DIST_TIMEOUT']!r}") from None


class TorchBackend:
    """torch.distributed point-to-point; peers are ranks of `group` (default: the world)."""

    name = "torch"

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError("halo exchange: torch.distributed is not initialised; call "
                                   "egnn.distributed.init_distributed() (under torchrun) first")
        self.group = group
        self._global = {}

    def size(self) -> int:
        return dist.get_world_size(self.group)

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def _peer(self, r: int) -> int:
        # P2POp takes global ranks on every torch >= 2.0 (group_peer only exists on newer ones)
        if self.group is None:
            return r
        if r not in self._global:
            self._global[r] = dist.get_global_rank(self.group, r)
        return self._global[r]

    def sendrecv(self, sends, recvs) -> None:
        """sends/recvs: lists of (peer rank, contiguous tensor); all posted together, then waited."""
        ops = [dist.P2POp(dist.isend, t, self._peer(q), self.group) for q, t in sends if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self._peer(q), self.group) for q, t in recvs if t.numel()]
        if not ops:  # batch_isend_irecv rejects an empty list (a rank without neighbours)
            return
        try:
            for req in dist.batch_isend_irecv(ops):
                req.wait(_wait_timeout())  # a receive from a dead peer must not wait forever
        except (RuntimeError, TimeoutError) as exc:  # gloo/NCCL report a dead peer as RuntimeError
            peers = sorted({q for q, t in sends + recvs if t.numel()})
            raise DistributedError(f"halo exchange with ranks {peers} failed or timed out ({str(exc)[:200]}); a "
                                   "rank died or is stuck elsewhere: check the other ranks' logs (the timeout is "
                                   "EGNN_DIST_TIMEOUT)") from None


class CupyBackend:
    """NCCL through CuPy (one communicator built from a unique id broadcast over torch.distributed),
    all sends/receives of an exchange inside one groupStart/groupEnd, on torch's current stream."""

    name = "cupy"

    def __init__(self, group=None):
        try:
            from cupy.cuda import nccl  # noqa: PLC0415  (optional extra: pip install egnn[cupy])
        except ImportError as exc:
            raise DistributedError(f"halo exchange backend 'cupy' needs CuPy with NCCL ({exc}); "
                                   "pip install 'egnn[cupy]' or use backend 'torch'") from None
        if not torch.cuda.is_available():
            raise DistributedError("halo exchange backend 'cupy' needs CUDA; use backend 'torch' on CPUs")
        if not dist.is_initialized():
            raise DistributedError("halo exchange backend 'cupy' bootstraps from torch.distributed; call "
                                   "egnn.distributed.init_distributed() first")
        self.nccl, self.group = nccl, group
        self._rank, self._size = dist.get_rank(group), dist.get_world_size(group)
        uid = [nccl.get_unique_id() if self._rank == 0 else None]
        dist.broadcast_object_list(uid, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        self.comm = nccl.NcclCommunicator(self._size, uid[0], self._rank)
        self._dtypes = {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
                        torch.float64: nccl.NCCL_FLOAT64}
        if hasattr(nccl, "NCCL_BFLOAT16"):
            self._dtypes[torch.bfloat16] = nccl.NCCL_BFLOAT16

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def sendrecv(self, sends, recvs) -> None:
        items = [(q, t) for q, t in sends + recvs if t.numel()]
        if not items:
            return
        dtype = items[0][1].dtype
        if dtype not in self._dtypes:
            raise InputError(f"halo exchange (cupy): dtype {dtype} is not supported; use float32/float16"
                             f"{'/bfloat16' if torch.bfloat16 in self._dtypes else ''}")
        nt, stream = self._dtypes[dtype], torch.cuda.current_stream().cuda_stream
        self.nccl.groupStart()
        for q, t in sends:
            if t.numel():
                self.comm.send(t.data_ptr(), t.numel(), nt, q, stream)
        for q, t in recvs:
            if t.numel():
                self.comm.recv(t.data_ptr(), t.numel(), nt, q, stream)
        self.nccl.groupEnd()


def make_backend(name: str = "torch", group=None):
    if name == "torch":
        return TorchBackend(group)
    if name == "cupy":
        return CupyBackend(group)
    raise InputError(f"halo exchange: unknown backend {name!r}; use one of {', '.join(BACKENDS)}")


class _ExchangeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ex):
        ctx.ex = ex
        return ex._forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ex._backward(grad), None


class HaloExchange:
    """Callable `x -> x with fresh halo rows` for one plan; pass it as HamiltonianModel's `exchange`.
    Index tensors are cached per device; `timer` (a PhaseTimer) collects times and bytes."""

    def __init__(self, plan: HaloPlan, backend="torch", group=None, timer: PhaseTimer | None = None):
        self.plan = plan
        self.backend = make_backend(backend, group) if isinstance(backend, str) else backend
        plan.validate(self.backend.size(), self.backend.rank())
        self.timer = timer or PhaseTimer(enabled=False)
        self._index = {}
        self.send_counts = [int(c) for c in plan.send_counts]
        self.recv_counts = [int(c) for c in plan.recv_counts]
        self.send_ranks = [int(q) for q in plan.send_ranks]
        self.recv_ranks = [int(q) for q in plan.recv_ranks]

    def index(self, device) -> torch.Tensor:
        return self._cached(device)[0]

    def _cached(self, device):
        """(send index, its scatter plan) on `device`, built once."""
        if device not in self._index:
            ix = torch.as_tensor(self.plan.send_index, dtype=torch.long, device=device)
            self._index[device] = (ix, _ops.scatter_plan(ix))
        return self._index[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.plan.num_local:
            raise InputError(f"halo exchange: x has {x.shape[0]} rows but rank {self.plan.rank}'s plan has "
                             f"{self.plan.num_local} local atoms ({self.plan.num_owned} owned + "
                             f"{self.plan.num_halo} halo); run the model on the plan's local graph")
        return _ExchangeFn.apply(x, self)

    def _trip(self, out_bufs, out_ranks, in_bufs, in_ranks, device):
        with self.timer.phase("sendrecv", device):
            self.backend.sendrecv(list(zip(out_ranks, out_bufs)), list(zip(in_ranks, in_bufs)))
        t = self.timer
        t.bytes_sent += sum(b.numel() * b.element_size() for b in out_bufs)
        t.bytes_recv += sum(b.numel() * b.element_size() for b in in_bufs)
        t.exchanges += 1

    def _forward(self, x):
        x = x.contiguous()
        n_own, tail = self.plan.num_owned, tuple(x.shape[1:])
        with self.timer.phase("pack", x.device):
            send = _ops.pack(x, self.index(x.device))
            recv = x.new_empty((self.plan.num_halo,) + tail)
        self._trip(send.split(self.send_counts), self.send_ranks, recv.split(self.recv_counts),
                   self.recv_ranks, x.device)
        with self.timer.phase("unpack", x.device):
            return _ops.unpack(x, recv, n_own)

    def _backward(self, grad):
        grad = grad.contiguous()
        n_own, tail = self.plan.num_owned, tuple(grad.shape[1:])
        with self.timer.phase("pack", grad.device):
            back = grad[n_own:].contiguous()  # halo-row gradients go home, in receive order
            buf = grad.new_empty((len(self.plan.send_index),) + tail)
        self._trip(back.split(self.recv_counts), self.recv_ranks, buf.split(self.send_counts),
                   self.send_ranks, grad.device)
        with self.timer.phase("unpack", grad.device):
            base = torch.cat([grad[:n_own], grad.new_zeros((self.plan.num_halo,) + tail)])
            index, plan = self._cached(grad.device)
            return _ops.unpack_add(base, index, buf, plan)


def halo_exchange(x: torch.Tensor, plan: HaloPlan, backend="torch", group=None,
                  timer: PhaseTimer | None = None) -> torch.Tensor:
    """x [num_local, ...] (owned rows, then halo rows) -> the same rows with the halo refreshed from
    the owners. Differentiable. For repeated calls build one HaloExchange(plan) and call it."""
    return HaloExchange(plan, backend, group, timer)(x)
