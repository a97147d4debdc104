"""Atom graphs: directed edges within r_cut over all periodic images (vesin), sorted by destination.

Edge k = (src s, dst d, integer cell shift R) with r_k = x_s + R·cell − x_d; it predicts H[d, s](R).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["AtomGraph", "radius_graph", "check_structure", "check_geometry"]


@dataclass
class AtomGraph:
    """A directed graph in CSR-by-destination order. Geometry is float64."""

    positions: np.ndarray  # [N, 3] Å
    numbers: np.ndarray  # [N] atomic numbers
    cell: np.ndarray  # [3, 3] rows are cell vectors (Å)
    pbc: np.ndarray  # [3] bool
    r_cut: float
    src: np.ndarray  # [E] int64
    dst: np.ndarray  # [E] int64, non-decreasing
    shift: np.ndarray  # [E, 3] int64 cell shift R of the source image
    vec: np.ndarray  # [E, 3] float64, x_src + R·cell − x_dst

    @property
    def num_nodes(self) -> int:
        return len(self.positions)

    @property
    def num_edges(self) -> int:
        return len(self.src)

    @property
    def distance(self) -> np.ndarray:
        return np.linalg.norm(self.vec, axis=1)

    @property
    def degree(self) -> np.ndarray:
        """Number of incoming edges of every node (the edge-load proxy of the partitioners)."""
        return np.bincount(self.dst, minlength=self.num_nodes)

    @property
    def indptr(self) -> np.ndarray:
        """CSR row pointer over destinations: edges of node d are indptr[d]:indptr[d+1]."""
        return np.concatenate([[0], np.cumsum(self.degree)]).astype(np.int64)

    def reverse(self) -> np.ndarray:
        """rev[k]: the index of edge k's reverse (src = dst[k], dst = src[k], shift = −shift[k]). A
        radius graph holds one for every edge; anything else is an InputError."""
        sh = self.shift
        fwd = np.lexsort((sh[:, 2], sh[:, 1], sh[:, 0], self.dst, self.src))  # edges by (src, dst, R)
        bwd = np.lexsort((-sh[:, 2], -sh[:, 1], -sh[:, 0], self.src, self.dst))  # edges by their reverse's key
        rev = np.empty(len(fwd), np.int64)
        rev[bwd] = fwd
        if not (np.array_equal(self.src[rev], self.dst) and np.array_equal(self.dst[rev], self.src)
                and np.array_equal(sh[rev], -sh)):
            raise InputError("graph: some edges have no reverse edge (d, s, -R); build it with radius_graph "
                             "(full neighbour list)")
        return rev


def check_structure(positions, cell, pbc, where: str = "structure") -> None:
    """Reject NaN positions and zero-volume periodic cells with a clear message."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise InputError(f"{where}: positions must have shape [N, 3], got {positions.shape}")
    if len(positions) == 0:
        raise InputError(f"{where}: the structure has no atoms")
    if not np.isfinite(positions).all():
        raise InputError(f"{where}: positions contain NaN or Inf; fix the coordinates")
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    for d in np.flatnonzero(pbc):
        if np.linalg.norm(cell[d]) < 1e-9:
            raise InputError(f"{where}: the cell vector {'abc'[d]} is zero on a periodic axis; "
                             "give the cell, or set pbc False on that axis")
    if pbc.any() and abs(np.linalg.det(cell)) < 1e-9 and pbc.all():
        raise InputError(f"{where}: the periodic cell has zero volume; check the cell vectors")


MAX_SHIFT = 1023  # cell shifts are packed in ±1024 per axis (egnn.blocks._shift_keys)
MAX_COORD = 1e6  # Å: beyond this float64 positions lose the precision edges need
MAX_IMAGES = 200_000  # periodic images within r_cut that a sane cell needs


def check_geometry(positions, cell, pbc, r_cut: float, where: str = "structure") -> None:
    """check_structure, and what would make the neighbour list wrong or endless: coordinates so large
    that float64 loses sub-Å precision, a nearly flat periodic cell (millions of images within
    r_cut), and atoms so many cells away that their shifts leave the packed range."""
    check_structure(positions, cell, pbc, where)
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool)
    far = float(np.abs(positions).max())
    if far > MAX_COORD:
        raise InputError(f"{where}: a coordinate of {far:.3g} Å; float64 loses the precision edges need that far "
                         "from the origin. Move the structure near the origin (or wrap it into its cell: "
                         "ase's atoms.wrap())")
    if not pbc.any():
        return
    if not pbc.all():
        return  # open axes take no images; check_structure covered the periodic cell vectors
    vol = abs(np.linalg.det(cell))
    heights = vol / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    images = np.prod(2 * np.ceil(r_cut / np.maximum(heights, 1e-300)) + 1)
    if images > MAX_IMAGES:
        d = int(np.argmin(heights))
        raise InputError(f"{where}: the cell is nearly flat (its height across axis {'abc'[d]} is {heights[d]:.3g} Å, "
                         f"volume {vol:.3g} Å³): r_cut {r_cut:g} Å would reach {images:.3g} periodic images. Check "
                         "the cell vectors")
    frac = positions @ np.linalg.inv(cell)
    reach = np.ceil(r_cut / heights)
    worst = np.abs(frac).max(axis=0) + reach
    if (worst > MAX_SHIFT).any():
        k = int(np.argmax(np.abs(frac).max(axis=1)))
        raise InputError(f"{where}: atom {k + 1} lies {np.abs(frac[k]).max():.0f} cells from the cell; cell shifts "
                         f"beyond ±{MAX_SHIFT} cannot be stored. Wrap the positions into the cell (ase: atoms.wrap())")


def radius_graph(atoms, r_cut: float, self_loops: bool = False) -> AtomGraph:
    """All directed edges with |r| <= r_cut over periodic images, sorted by dst (stable: within one
    dst, vesin's deterministic order).

    Cells smaller than 2·r_cut are fine: every image within r_cut is a separate edge. An atom's own
    periodic images are edges too (R != 0); the R = 0 self pair is a node, not an edge.
    """
    import vesin

    if not r_cut > 0:
        raise InputError(f"r_cut must be > 0 Å, got {r_cut}")
    positions = np.ascontiguousarray(atoms.get_positions(), dtype=np.float64)
    cell = np.asarray(atoms.get_cell().array, dtype=np.float64)
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    check_geometry(positions, cell, pbc, r_cut)
    box = cell.copy()
    if not pbc.all():  # vesin wants a box even on open axes; it ignores it there
        for d in np.flatnonzero(~pbc):
            if np.linalg.norm(box[d]) < 1e-9:
                box[d] = 0.0
    i, j, S, D = vesin.NeighborList(cutoff=float(r_cut), full_list=True).compute(
        positions, box, pbc.tolist() if not pbc.all() else True, quantities="ijSD")
    # vesin: D = x_j + S·cell − x_i, so i is our dst and j our src (no copies where types already fit)
    dst, src = i.astype(np.int64, copy=False), j.astype(np.int64, copy=False)
    shift, vec = S.astype(np.int64, copy=False), D.astype(np.float64, copy=False)
    if not self_loops:
        same = src == dst
        if same.any():
            keep = ~(same & ~shift.any(axis=1))
            if not keep.all():
                dst, src, shift, vec = dst[keep], src[keep], shift[keep], vec[keep]
    if len(dst) > 1 and not (dst[1:] >= dst[:-1]).all():  # vesin already groups pairs by i: usually a no-op
        order = np.argsort(dst, kind="stable")
        dst, src, shift, vec = dst[order], src[order], shift[order], vec[order]
    return AtomGraph(positions=positions, numbers=np.asarray(atoms.get_atomic_numbers()), cell=cell,
                     pbc=pbc, r_cut=float(r_cut), src=src, dst=dst, shift=shift, vec=vec)
