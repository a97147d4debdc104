"""Who owns what, who needs what from whom: halo definitions and partition quality metrics.

Definitions (shared with the distributed halo plans in egnn.comm, so keep them here, in one place):

- A rank r **owns** the atoms d with parts[d] == r and all their incoming edges (s -> d, any shift
  R): that is a block of rows of H, so aggregation needs no communication.
- The **halo** of r is the set of distinct source atoms s of r's owned edges with parts[s] != r.
  An edge from a periodic image of an atom r owns itself (s == d, or any local s, with R != 0)
  needs no data from elsewhere: local sources are never halo atoms, whatever their shift.
- The **neighbour ranks** of r are the distinct owners of its halo atoms (r receives from them).
  Its **send neighbours** are the ranks whose halo holds atoms r owns. For a radius graph (every
  edge has its reverse) both sets are equal, but the counts of atoms sent and received differ.
- Bytes: one halo atom is one row of the node embedding, (lmax+1)^2 * C values per layer.

`halo_sets` returns all of it in one CSR layout (HaloSets): rank r's halo sorted by (owner, atom),
`by_owner(r)` its receive runs, `sends(q)` what q packs for each receiver, in the same order.

Everything is vectorised over edges and can be fed edge chunks, so 10^8-edge graphs never need
one contiguous edge array (see `tiled_edge_chunks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputError

__all__ = [
    "HaloSets", "Quality", "check_parts", "owned_atoms", "halo_sets", "halo_sets_from_chunks",
    "halo_atoms", "neighbour_ranks", "quality", "quality_from_chunks", "embedding_row_bytes",
    "tiled_edge_chunks",
]

_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_CHUNK = 1 << 22  # edges per vectorised step: bounds temporary memory to ~100 MB
_DENSE_LIMIT = 1 << 28  # largest nparts * N boolean mask (256 MB) before switching to sort-unique


def embedding_row_bytes(lmax: int = 4, channels: int = 16, dtype: str = "float16") -> int:
    """Bytes of one node-embedding row [(lmax+1)^2, C] in `dtype` (float16, bfloat16, float32, float64).
    lmax 4, C 16, float16 -> 800 bytes."""
    if dtype not in _ITEMSIZE:
        raise InputError(f"dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
    if lmax < 0 or channels < 1:
        raise InputError(f"need lmax >= 0 and channels >= 1, got lmax={lmax}, channels={channels}")
    return (lmax + 1) ** 2 * channels * _ITEMSIZE[dtype]


def check_parts(parts, num_nodes: int, nparts: int | None = None) -> tuple[np.ndarray, int]:
    """Validate a rank-per-atom array; returns (parts as int64, nparts)."""
    p = np.asarray(parts)
    if p.shape != (num_nodes,):
        raise InputError(f"parts must have shape [{num_nodes}] (one rank per atom), got {p.shape}")
    if num_nodes and not np.issubdtype(p.dtype, np.integer):
        raise InputError(f"parts must be integer ranks, got dtype {p.dtype}")
    p = p.astype(np.int64, copy=False)
    if nparts is None:
        nparts = int(p.max()) + 1 if num_nodes else 1
    if num_nodes and (p.min() < 0 or p.max() >= nparts):
        raise InputError(f"parts must lie in 0..{nparts - 1}, got {p.min()}..{p.max()}")
    return p, int(nparts)


def owned_atoms(parts, nparts: int | None = None) -> list[np.ndarray]:
    """Sorted atom ids owned by each rank."""
    p, nparts = check_parts(parts, len(np.asarray(parts)), nparts)
    order = np.argsort(p, kind="stable")
    return np.split(order, np.cumsum(np.bincount(p, minlength=nparts))[:-1])


@dataclass
class HaloSets:
    """Halo atoms of every rank in one flat CSR layout.

    Rank r's halo is atoms[ptr[r]:ptr[r+1]], sorted by (owner rank, atom id), with owners[i] =
    parts[atoms[i]], so the atoms r receives from rank q form one contiguous run (one receive
    buffer per neighbour, in a deterministic order both sides can compute)."""

    ptr: np.ndarray  # [nparts + 1] int64
    atoms: np.ndarray  # [H] int64
    owners: np.ndarray  # [H] int64

    @property
    def nparts(self) -> int:
        return len(self.ptr) - 1

    def __getitem__(self, r: int) -> np.ndarray:
        return self.atoms[self.ptr[r]:self.ptr[r + 1]]

    def owners_of(self, r: int) -> np.ndarray:
        return self.owners[self.ptr[r]:self.ptr[r + 1]]

    def neighbours(self, r: int) -> np.ndarray:
        """Sorted distinct owners of r's halo (the ranks r receives from)."""
        return np.unique(self.owners_of(r))

    def by_owner(self, r: int) -> dict[int, np.ndarray]:
        """{owner rank: sorted atoms r receives from it}."""
        own = self.owners_of(r)
        cuts = np.flatnonzero(np.diff(own)) + 1
        return {int(o[0]): a for o, a in zip(np.split(own, cuts), np.split(self[r], cuts))} if len(own) else {}

    def sends(self, q: int) -> dict[int, np.ndarray]:
        """{receiving rank r: sorted atoms q owns that are in r's halo}: what q packs for each r,
        in the same order as r's receive run from q."""
        idx = np.flatnonzero(self.owners == q)
        rank = np.searchsorted(self.ptr, idx, side="right") - 1
        cuts = np.flatnonzero(np.diff(rank)) + 1
        return {int(r[0]): self.atoms[i] for r, i in zip(np.split(rank, cuts), np.split(idx, cuts))} if len(idx) else {}

    def as_list(self) -> list[np.ndarray]:
        return [self[r] for r in range(self.nparts)]


def _edge_slices(src, dst) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    src, dst = np.asarray(src), np.asarray(dst)
    if src.shape != dst.shape or src.ndim != 1:
        raise InputError(f"src and dst must be 1-D arrays of equal length, got {src.shape} and {dst.shape}")
    for a in range(0, len(src), _CHUNK):
        yield src[a:a + _CHUNK], dst[a:a + _CHUNK]


def _accumulate(chunks, parts, nparts):
    """One pass over edge chunks: incoming-edge count per rank and the (rank, src) halo pairs."""
    n = len(parts)
    p32 = parts.astype(np.int32)
    edges = np.zeros(nparts, dtype=np.int64)
    dense = nparts * n <= _DENSE_LIMIT
    mask = np.zeros(nparts * n, dtype=bool) if dense else None
    keys = []
    for s, d in chunks:
        s = np.asarray(s)
        d = np.asarray(d)
        if len(s) == 0:
            continue
        if s.min() < 0 or d.min() < 0 or s.max() >= n or d.max() >= n:
            raise InputError(f"edge indices must lie in 0..{n - 1} (one entry of parts per atom)")
        rd = p32[d]
        edges += np.bincount(rd, minlength=nparts)
        remote = rd != p32[s]  # local sources (including own periodic images) are never halo
        key = rd[remote].astype(np.int64) * n + s[remote]
        if dense:
            mask[key] = True
        else:
            keys.append(np.unique(key))
    if dense:
        key = np.flatnonzero(mask)
    else:
        key = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)
    return edges, key // n, key % n


def _halo_from_pairs(rank, atom, parts, nparts) -> HaloSets:
    owner = parts[atom]
    order = np.lexsort((atom, owner, rank))
    ptr = np.zeros(nparts + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(rank, minlength=nparts))
    return HaloSets(ptr=ptr, atoms=atom[order], owners=owner[order])


def halo_sets_from_chunks(chunks: Iterable, parts, nparts: int | None = None) -> HaloSets:
    """HaloSets of a graph given as an iterable of (src, dst) edge chunks."""
    parts, nparts = check_parts(parts, len(np.asarray(parts)), nparts)
    _, rank, atom = _accumulate(chunks, parts, nparts)
    return _halo_from_pairs(rank, atom, parts, nparts)


def halo_sets(src, dst, parts, nparts: int | None = None) -> HaloSets:
    """HaloSets of the graph with edges src -> dst (any order, duplicates and periodic images fine)."""
    return halo_sets_from_chunks(_edge_slices(src, dst), parts, nparts)


def halo_atoms(src, dst, parts, nparts: int | None = None) -> list[np.ndarray]:
    """Per rank r: the distinct source atoms of edges whose dst r owns and that r does not own,
    sorted by (owner, atom id). A periodic self-image (src owned by r, shift R != 0) is not halo."""
    return halo_sets(src, dst, parts, nparts).as_list()


def neighbour_ranks(src, dst, parts, nparts: int | None = None) -> list[np.ndarray]:
    """Per rank r: the sorted distinct owners of r's halo atoms (the ranks r receives from)."""
    h = halo_sets(src, dst, parts, nparts)
    return [h.neighbours(r) for r in range(h.nparts)]


@dataclass
class Quality:
    """Per-rank partition metrics (arrays of length nparts) and the rank-to-rank traffic."""

    nparts: int
    row_bytes: int
    nodes: np.ndarray  # owned atoms
    edges: np.ndarray  # owned (incoming) edges
    halo: np.ndarray  # distinct remote source atoms = rows received
    neighbours: np.ndarray  # distinct owners of the halo (ranks received from)
    send_atoms: np.ndarray  # rows sent, summed over destination ranks
    send_neighbours: np.ndarray  # ranks sent to
    pair_owner: np.ndarray  # [M] sending rank q of each (q -> r) link
    pair_rank: np.ndarray  # [M] receiving rank r
    pair_atoms: np.ndarray  # [M] atoms q sends to r
    halo_sets: HaloSets | None = field(default=None, repr=False)

    @property
    def bytes_recv(self) -> np.ndarray:
        return self.halo * self.row_bytes

    @property
    def bytes_send(self) -> np.ndarray:
        return self.send_atoms * self.row_bytes

    def summary(self) -> dict:
        def mm(name, a):
            return {f"{name}_max": int(a.max()), f"{name}_mean": float(a.mean()), f"{name}_min": int(a.min())}

        out = {"nparts": self.nparts, "row_bytes": self.row_bytes}
        for name in ("nodes", "edges", "halo", "neighbours", "send_atoms", "send_neighbours",
                     "bytes_recv", "bytes_send"):
            out.update(mm(name, getattr(self, name)))
        out["edge_imbalance"] = float(self.edges.max() / self.edges.mean()) if self.edges.sum() else 1.0
        out["node_imbalance"] = float(self.nodes.max() / self.nodes.mean())
        out["empty_parts"] = int((self.nodes == 0).sum())
        return out

    def table(self) -> str:
        """Human-readable max/mean/min table."""
        rows = [("owned atoms", self.nodes), ("owned edges", self.edges), ("halo atoms", self.halo),
                ("neighbour ranks", self.neighbours), ("atoms sent", self.send_atoms),
                ("recv MiB", self.bytes_recv / 2**20), ("send MiB", self.bytes_send / 2**20)]
        lines = [f"{'per rank':<16}{'max':>12}{'mean':>12}{'min':>12}"]
        for name, a in rows:
            f = ".3f" if a.dtype.kind == "f" else ".0f"
            lines.append(f"{name:<16}{a.max():>12{f}}{a.mean():>12.3f}{a.min():>12{f}}")
        s = self.summary()
        lines.append(f"edge imbalance (max/mean) {s['edge_imbalance']:.4f}; "
                     f"row {self.row_bytes} B; empty parts {s['empty_parts']}")
        return "\n".join(lines)


def quality_from_chunks(chunks: Iterable, parts, nparts: int | None = None, row_bytes: int = 800,
                        keep_halo: bool = False) -> Quality:
    """Quality of a partition of a graph given as (src, dst) edge chunks. row_bytes = bytes per
    halo atom (embedding_row_bytes(lmax, C, dtype); 800 = lmax 4, C 16, float16)."""
    parts, nparts = check_parts(parts, len(np.asarray(parts)), nparts)
    if row_bytes < 0:
        raise InputError(f"row_bytes must be >= 0, got {row_bytes}")
    edges, rank, atom = _accumulate(chunks, parts, nparts)
    hs = _halo_from_pairs(rank, atom, parts, nparts)
    # one entry per (owner -> rank) link, with the number of atoms it carries
    link = np.unique(rank * nparts + parts[atom], return_counts=True)
    pair_rank, pair_owner, pair_atoms = link[0] // nparts, link[0] % nparts, link[1]
    return Quality(
        nparts=nparts, row_bytes=int(row_bytes),
        nodes=np.bincount(parts, minlength=nparts), edges=edges,
        halo=np.bincount(rank, minlength=nparts),
        neighbours=np.bincount(pair_rank, minlength=nparts),
        send_atoms=np.bincount(pair_owner, weights=pair_atoms, minlength=nparts).astype(np.int64),
        send_neighbours=np.bincount(pair_owner, minlength=nparts),
        pair_owner=pair_owner, pair_rank=pair_rank, pair_atoms=pair_atoms,
        halo_sets=hs if keep_halo else None)


def quality(graph, parts, row_bytes: int = 800, nparts: int | None = None, keep_halo: bool = False) -> Quality:
    """Quality of `parts` (rank of every atom) on an AtomGraph (anything with src, dst, num_nodes)."""
    n = graph.num_nodes if hasattr(graph, "num_nodes") else len(graph.positions)
    if len(np.asarray(parts)) != n:
        raise InputError(f"parts has {len(np.asarray(parts))} entries but the graph has {n} atoms")
    return quality_from_chunks(_edge_slices(graph.src, graph.dst), parts, nparts, row_bytes, keep_halo)


def tiled_edge_chunks(src, dst, shift, n_base: int, reps) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(src, dst) of the radius graph of `atoms.repeat(reps)`, one destination tile at a time,
    from the graph (src, dst, shift) of the base cell, without ever holding the full edge list.

    Exact for ase's Atoms.repeat layout (atom = tile * n_base + base atom, tile = (t0 * r1 + t1) * r2 +
    t2) when every axis with reps > 1 is periodic: the base edge (s, d, R) into tile t comes from
    atom s of tile (t + R) mod reps. Shifts are dropped (the halo does not depend on them)."""
    reps = np.asarray(reps, dtype=np.int64).reshape(3)
    if (reps < 1).any():
        raise InputError(f"tile repetitions must be >= 1, got {reps.tolist()}")
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    for t in range(int(np.prod(reps))):
        tv = np.array(np.unravel_index(t, reps))
        st = np.mod(tv[None, :] + shift, reps)
        s_tile = (st[:, 0] * reps[1] + st[:, 1]) * reps[2] + st[:, 2]
        yield s_tile * n_base + src, t * n_base + dst
