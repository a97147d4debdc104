"""Split the atom graph over ranks: Low-NN (few neighbour ranks, balanced edges), METIS and linear
baselines, and the halo/quality metrics shared with the distributed halo plans (egnn.comm)."""
from .baselines import linear, metis, metis_adjacency, metis_from_adjacency
from .low_nn import low_nn, partition_frame
from .quality import (HaloSets, Quality, check_parts, embedding_row_bytes, halo_atoms, halo_sets,
                      halo_sets_from_chunks, neighbour_ranks, owned_atoms, quality, quality_from_chunks,
                      tiled_edge_chunks)

METHODS = ("low-nn", "metis", "linear")


def partition(graph, nparts: int, method: str = "low-nn"):
    """Rank of every atom of an AtomGraph by `method` (low-nn, metis or linear)."""
    from ..errors import InputError

    if method == "low-nn":
        return low_nn(graph.positions, graph.cell, graph.pbc, graph.degree, nparts, graph.r_cut)
    if method == "metis":
        return metis(graph, nparts)
    if method == "linear":
        return linear(graph, nparts)
    raise InputError(f"unknown partition method {method!r}; use one of {', '.join(METHODS)}")


__all__ = ["low_nn", "metis", "linear", "quality", "partition", "METHODS", "partition_frame",
           "metis_adjacency", "metis_from_adjacency", "HaloSets", "Quality", "check_parts",
           "embedding_row_bytes", "halo_atoms", "halo_sets", "halo_sets_from_chunks", "neighbour_ranks",
           "owned_atoms", "quality_from_chunks", "tiled_edge_chunks"]
