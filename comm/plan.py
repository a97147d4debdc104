"""HaloPlan: who sends which node rows to whom, for one rank, from the global graph and a partition.

Ownership and halos are exactly egnn.partition.quality's definitions (one place for them): rank r
owns the atoms with parts == r and every edge whose dst it owns; its halo is the distinct remote
src atoms of those edges, sorted by (owner rank, atom id). Every rank can build every plan from
the global edge list and `parts` alone, without communication, so the plans of a structure are
computed once and cached (to_dict/from_dict, save/load npz).

Local node order: owned atoms (ascending global id), then the halo grouped by owner rank. The
rows received from rank q are therefore one contiguous slice of the halo, and the rows rank r sends
to q are q's slice from r, in the same (ascending atom id) order on both sides.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..errors import DistributedError, InputError
from ..partition.quality import HaloSets, check_parts, halo_sets

__all__ = ["HaloPlan", "build_plans"]

FORMAT = "egnn-haloplan-1"
_ARRAYS = ("owned", "halo", "recv_ranks", "recv_counts", "send_ranks", "send_counts", "send_index",
           "edges", "src", "dst")
_INTS = ("rank", "world_size", "num_nodes", "num_edges")


def _edges_of(graph) -> tuple[np.ndarray, np.ndarray, int]:
    """(src, dst, num_nodes) of an AtomGraph or anything with src/dst (numpy or torch) and num_nodes."""
    src, dst = graph.src, graph.dst
    if hasattr(src, "detach"):
        src, dst = src.detach().cpu().numpy(), dst.detach().cpu().numpy()
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    n = int(graph.num_nodes) if hasattr(graph, "num_nodes") else len(graph.positions)
    if src.shape != dst.shape or src.ndim != 1:
        raise InputError(f"graph: src and dst must be 1-D arrays of equal length, got {src.shape}, {dst.shape}")
    return src, dst, n


def fingerprint(parts: np.ndarray, src: np.ndarray, dst: np.ndarray, world_size: int) -> str:
    """Short hash of (partition, edges, world): plans of one structure share it; ranks compare it."""
    h = hashlib.sha1()
    for a in (np.asarray([world_size, len(parts), len(src)], dtype=np.int64), parts, src, dst):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class HaloPlan:
    """The exchange plan of one rank (all index arrays int64 numpy).

    owned [n_own] global ids (ascending); halo [n_halo] global ids, grouped by owner rank;
    recv_ranks/recv_counts: the ranks this rank receives from and how many halo rows each (in halo
    order: the rows from recv_ranks[i] are local rows n_own + sum(recv_counts[:i]) + ...);
    send_ranks/send_counts/send_index: the ranks this rank sends to, how many rows each, and the
    local (owned) row of every sent row, concatenated in send_ranks order (a row may repeat);
    edges [E_loc] global ids of the edges whose dst is owned (global order, so still sorted by dst);
    src/dst [E_loc] their endpoints as local rows."""

    rank: int
    world_size: int
    num_nodes: int  # global
    num_edges: int  # global
    owned: np.ndarray
    halo: np.ndarray
    recv_ranks: np.ndarray
    recv_counts: np.ndarray
    send_ranks: np.ndarray
    send_counts: np.ndarray
    send_index: np.ndarray
    edges: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    key: str = ""  # fingerprint of (parts, edges, world)

    # -- sizes
    @property
    def num_owned(self) -> int:
        return len(self.owned)

    @property
    def num_halo(self) -> int:
        return len(self.halo)

    @property
    def num_local(self) -> int:
        return len(self.owned) + len(self.halo)

    @property
    def nodes(self) -> np.ndarray:
        """Global id of every local row (owned, then halo)."""
        return np.concatenate([self.owned, self.halo])

    def recv_slices(self) -> dict[int, slice]:
        """{rank q: local rows that hold the atoms received from q}."""
        off = np.concatenate([[0], np.cumsum(self.recv_counts)]) + self.num_owned
        return {int(q): slice(int(off[i]), int(off[i + 1])) for i, q in enumerate(self.recv_ranks)}

    def send_lists(self) -> dict[int, np.ndarray]:
        """{rank q: local rows sent to q}."""
        cuts = np.cumsum(self.send_counts)[:-1]
        return {int(q): ix for q, ix in zip(self.send_ranks, np.split(self.send_index, cuts))}

    def bytes_per_exchange(self, row_bytes: int) -> dict:
        """Bytes one forward exchange sends and receives (the backward moves the same, reversed)."""
        return {"send": int(len(self.send_index)) * int(row_bytes), "recv": self.num_halo * int(row_bytes)}

    # -- checks
    def validate(self, world_size: int, rank: int | None = None, where: str = "halo plan") -> None:
        """Raise DistributedError unless this plan was built for this world (and rank)."""
        if int(world_size) != self.world_size:
            raise DistributedError(
                f"{where}: the plan was built for {self.world_size} ranks but the process group has "
                f"{world_size}; rebuild the plans (HaloPlan.build) for this world size or launch "
                f"torchrun with --nproc-per-node/--nnodes giving {self.world_size} ranks")
        if rank is not None and int(rank) != self.rank:
            raise DistributedError(f"{where}: the plan belongs to rank {self.rank} but is used on rank {rank}; "
                                   "load the plan of this rank")

    # -- serialisation
    def to_dict(self) -> dict:
        d = {k: np.asarray(getattr(self, k)) for k in _ARRAYS}
        d.update({k: int(getattr(self, k)) for k in _INTS})
        d["key"] = self.key
        d["format"] = FORMAT
        return d

    @classmethod
    def from_dict(cls, d, where: str = "halo plan") -> "HaloPlan":
        fmt = str(np.asarray(d.get("format", ""))) if hasattr(d, "get") else ""
        if fmt != FORMAT:
            raise InputError(f"{where}: not an egnn halo plan (format {fmt!r}, expected {FORMAT!r}); "
                             "rebuild it with HaloPlan.build")
        missing = [k for k in _ARRAYS + _INTS if k not in d]
        if missing:
            raise InputError(f"{where}: missing field(s) {missing}; rebuild the plan with HaloPlan.build")
        plan = cls(**{k: np.asarray(d[k], dtype=np.int64).reshape(-1) for k in _ARRAYS},
                   **{k: int(np.asarray(d[k])) for k in _INTS}, key=str(np.asarray(d.get("key", ""))))
        plan._check(where)
        return plan

    def save(self, path: str) -> None:
        tmp = path + ".tmp.npz"
        np.savez(tmp, **self.to_dict())
        os.replace(tmp, path)  # never half a plan on disk

    @classmethod
    def load(cls, path: str) -> "HaloPlan":
        if not os.path.isfile(path):
            raise InputError(f"{path}: halo plan file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable halo plan npz ({exc})") from None
        return cls.from_dict(d, where=path)

    def _check(self, where: str) -> None:
        """Internal consistency (catches a corrupt or hand-edited cache)."""
        ok = (0 <= self.rank < self.world_size and len(self.recv_ranks) == len(self.recv_counts)
              and len(self.send_ranks) == len(self.send_counts)
              and int(self.recv_counts.sum()) == self.num_halo and int(self.send_counts.sum()) == len(self.send_index)
              and len(self.edges) == len(self.src) == len(self.dst)
              and (len(self.send_index) == 0 or (self.send_index.min() >= 0 and self.send_index.max() < self.num_owned))
              and (len(self.src) == 0 or (min(self.src.min(), self.dst.min()) >= 0
                                          and self.src.max() < self.num_local and self.dst.max() < self.num_owned)))
        if not ok:
            raise InputError(f"{where}: inconsistent halo plan (sizes or indices out of range); rebuild it")

    # -- construction
    @classmethod
    def build(cls, graph, parts, rank: int, world_size: int) -> "HaloPlan":
        """The plan of `rank` from the global graph (src, dst, num_nodes) and the rank of every atom."""
        src, dst, n = _edges_of(graph)
        p, world_size = check_parts(parts, n, world_size)
        if not 0 <= rank < world_size:
            raise DistributedError(f"rank {rank} is outside the world of {world_size} ranks")
        return _build(src, dst, p, world_size, halo_sets(src, dst, p, world_size), rank,
                      fingerprint(p, src, dst, world_size))


def build_plans(graph, parts, world_size: int) -> list[HaloPlan]:
    """The plans of all ranks (the halo sets are computed once)."""
    src, dst, n = _edges_of(graph)
    p, world_size = check_parts(parts, n, world_size)
    hs = halo_sets(src, dst, p, world_size)
    key = fingerprint(p, src, dst, world_size)
    return [_build(src, dst, p, world_size, hs, r, key) for r in range(world_size)]


def _build(src, dst, parts, world, hs: HaloSets, rank: int, key: str) -> HaloPlan:
    n = len(parts)
    owned = np.flatnonzero(parts == rank).astype(np.int64)
    halo = hs[rank].astype(np.int64)
    recv_ranks, recv_counts = np.unique(hs.owners_of(rank), return_counts=True)
    g2l = np.full(n, -1, dtype=np.int64)
    g2l[owned] = np.arange(len(owned))
    g2l[halo] = len(owned) + np.arange(len(halo))
    # what this rank sends: its atoms in every other rank's halo, in that rank's receive order
    send_ranks, send_counts, send_index = [], [], []
    for q in range(world):
        if q == rank:
            continue
        atoms = hs[q][hs.owners_of(q) == rank]
        if len(atoms):
            send_ranks.append(q)
            send_counts.append(len(atoms))
            send_index.append(g2l[atoms])
    edges = np.flatnonzero(parts[dst] == rank).astype(np.int64)
    ls, ld = g2l[src[edges]], g2l[dst[edges]]
    if len(edges) and ls.min() < 0:  # cannot happen with quality's definitions; guards a mismatch
        raise DistributedError("halo plan: an owned edge has a source that is neither owned nor halo")
    i64 = lambda a: np.asarray(a, dtype=np.int64)  # noqa: E731
    return HaloPlan(rank=rank, world_size=world, num_nodes=n, num_edges=len(src), owned=owned, halo=halo,
                    recv_ranks=i64(recv_ranks), recv_counts=i64(recv_counts), send_ranks=i64(send_ranks),
                    send_counts=i64(send_counts),
                    send_index=np.concatenate(send_index) if send_index else np.zeros(0, dtype=np.int64),
                    edges=edges, src=ls, dst=ld, key=key)
