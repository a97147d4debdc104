"""The baselines Low-NN must beat: METIS (minimum edge cut) and contiguous blocks in atom order."""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .low_nn import _check_nparts

__all__ = ["metis", "metis_adjacency", "metis_from_adjacency", "linear"]


def _num_nodes(graph) -> int:
    return int(graph.num_nodes) if hasattr(graph, "num_nodes") else len(graph.positions)


def _degree(graph) -> np.ndarray:
    return np.bincount(np.asarray(graph.dst), minlength=_num_nodes(graph)).astype(np.int64)


def metis_adjacency(graph):
    """pymetis.CSRAdjacency (int64) of the undirected atom graph: one entry per distinct neighbour,
    images of the same pair collapsed, no self loops. Needs a symmetric graph (a radius graph is:
    every edge has its reverse)."""
    import pymetis

    n = _num_nodes(graph)
    src = np.asarray(graph.src, dtype=np.int64)
    dst = np.asarray(graph.dst, dtype=np.int64)
    if not np.array_equal(np.bincount(src, minlength=n), np.bincount(dst, minlength=n)):
        raise InputError("metis: the graph is not symmetric (in- and out-degrees differ); pass a "
                         "radius graph, whose every edge s->d has its reverse d->s")
    key = dst * n + src
    key = key[src != dst]
    if len(key) > 1 and (np.diff(key) < 0).any():
        key = np.unique(key)  # radius_graph's (dst, src, shift) order makes this unnecessary
    elif len(key):
        key = key[np.r_[True, key[1:] != key[:-1]]]  # images of one pair sit next to each other
    starts = np.zeros(n + 1, dtype=np.int64)
    starts[1:] = np.cumsum(np.bincount(key // n, minlength=n))
    return pymetis.CSRAdjacency(adj_starts=starts, adjacent=np.ascontiguousarray(key % n))


def metis_from_adjacency(adjacency, vweights, nparts: int, seed: int = 0) -> np.ndarray:
    """pymetis.part_graph (k-way for nparts > 8, as pymetis defaults) with integer vertex weights."""
    import pymetis

    n = len(adjacency.adj_starts) - 1
    nparts = _check_nparts(nparts, n)
    if nparts == 1:
        return np.zeros(n, dtype=np.int64)
    w = np.ascontiguousarray(np.asarray(vweights, dtype=np.int64))
    _, membership = pymetis.part_graph(nparts, adjacency=adjacency, vweights=w,
                                       options=pymetis.Options(seed=int(seed)))
    return np.asarray(membership, dtype=np.int64)


def metis(graph, nparts: int, seed: int = 0) -> np.ndarray:
    """METIS partition of the atom graph, vertex weights = degree (edge load); int64 ranks."""
    nparts = _check_nparts(nparts, _num_nodes(graph))
    return metis_from_adjacency(metis_adjacency(graph), _degree(graph), nparts, seed)


def linear(graph, nparts: int) -> np.ndarray:
    """Contiguous blocks in atom order with degree sums as equal as possible (every part non-empty)."""
    n = _num_nodes(graph)
    nparts = _check_nparts(nparts, n)
    deg = _degree(graph).astype(np.float64)
    cum = np.cumsum(deg)
    k = np.arange(1, nparts)
    # boundary b_k = atoms in the first k parts: the prefix whose degree sum is nearest k/P of all
    target = cum[-1] * k / nparts
    b = np.searchsorted(cum, target)  # cum[b-1] < target <= cum[b]
    below = np.where(b > 0, cum[np.maximum(b - 1, 0)], 0.0)
    b = np.where(np.abs(below - target) <= np.abs(cum[np.minimum(b, n - 1)] - target), b, b + 1)
    b = np.maximum.accumulate(np.maximum(b - k, 0)) + k  # strictly increasing, b_k >= k
    b = np.minimum(b, n - nparts + k)  # leaves at least one atom per later part
    bounds = np.r_[0, b, n]
    return np.repeat(np.arange(nparts, dtype=np.int64), np.diff(bounds))
