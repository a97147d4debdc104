"""Low-NN partitioner: recursive coordinate bisection that minimises neighbouring ranks.

The goal is not a minimum edge cut but few neighbour ranks per rank (each neighbour costs a packed
buffer and a send/recv posting) with balanced edge counts. At every level each domain is cut along
the dimension that creates the fewest new neighbours, NN[d] = ceil(2 r_cut / L[d]) with L[d] the
domain's width along d; the first cut of a periodic axis counts 1, because with two pieces on a
ring the piece across the cut and the piece across the wrap are the same rank (that cut also
splits the ring in the middle of the gap across the wrap, so both halves get their true widths).
Ties go to the larger index. The cut sits where the degree sum (the edge-load proxy) left matches
the share of parts that go left, so k parts split into floor(k/2) and ceil(k/2) for any k.

Periodic axes are cut in fractional coordinates along the cell vectors (so triclinic cells work,
and widths are plane spacings); non-periodic axes use Cartesian distance along a unit direction
orthogonal to the periodic vectors, over the atoms' extent.

All domains of a level are processed together with one integer argsort, so 24,000 atoms into 128
parts take tens of milliseconds at most.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["low_nn", "partition_frame"]


def _check_nparts(nparts, n_atoms: int, where: str = "nparts") -> int:
    if isinstance(nparts, bool) or not isinstance(nparts, (int, np.integer)):
        raise InputError(f"{where} must be an integer, got {nparts!r}")
    nparts = int(nparts)
    if nparts < 1:
        raise InputError(f"{where} must be >= 1, got {nparts}")
    if nparts > n_atoms:
        raise InputError(f"{where} = {nparts} exceeds the number of atoms ({n_atoms}); "
                         "use at most one part per atom, or a larger (tiled) structure")
    return nparts


def partition_frame(cell, pbc) -> tuple[np.ndarray, np.ndarray]:
    """The frame the partitioner cuts in: rows are the periodic cell vectors and, on open axes,
    orthonormal directions perpendicular to them (Cartesian extent). Returns (frame [3, 3],
    width [3]), where width[d] is the distance between the planes u_d = 0 and u_d = 1 of the
    coordinates u = positions @ inv(frame).

    Raises InputError when the periodic cell vectors span zero volume (area, length)."""
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    if not np.isfinite(cell).all():
        raise InputError("cell: contains NaN or Inf; fix the cell vectors")
    per = np.flatnonzero(pbc)
    if len(per):
        sv = np.linalg.svd(cell[per], compute_uv=False)
        scale = max(1.0, float(np.abs(cell[per]).max()))
        if sv.min() < 1e-8 * scale:
            raise InputError(f"cell: the periodic vectors {''.join('abc'[d] for d in per)} span zero "
                             "volume (a zero or collinear/coplanar vector); give a proper cell or set "
                             "pbc False on the degenerate axes")
    frame = cell.copy()
    placed = [cell[d] / np.linalg.norm(cell[d]) for d in per]
    for d in np.flatnonzero(~pbc):
        # prefer the (projected) cell vector, then Cartesian axes, orthogonalised (Gram-Schmidt)
        cands = ([cell[d]] if np.linalg.norm(cell[d]) > 1e-9 else []) + [np.eye(3)[d], *np.eye(3)]
        for v in cands:
            v = np.asarray(v, dtype=np.float64).copy()
            for q in placed:
                v -= (v @ q) * q
            if np.linalg.norm(v) > 1e-6:
                break
        v /= np.linalg.norm(v)
        placed.append(v)
        frame[d] = v
    inv = np.linalg.inv(frame)
    width = 1.0 / np.linalg.norm(inv, axis=0)
    return frame, width


def low_nn(positions, cell, pbc, degree, nparts: int, r_cut: float) -> np.ndarray:
    """Rank (0..nparts-1, int64) of every atom by Low-NN recursive bisection. Deterministic and
    independent of atom order up to atoms that share a cut coordinate (those go by index).

    positions [N, 3] Å, cell [3, 3] (rows are vectors), pbc [3] bool, degree [N] (incoming edge
    count of each atom, e.g. AtomGraph.degree), r_cut the graph's cutoff in Å.
    Every part gets at least one atom; edge counts (degree sums) balance to about one atom's degree.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) == 0:
        raise InputError(f"positions must have shape [N, 3] with N >= 1, got {pos.shape}")
    if not np.isfinite(pos).all():
        raise InputError("positions contain NaN or Inf; fix the coordinates")
    n = len(pos)
    nparts = _check_nparts(nparts, n)
    try:
        r_cut = float(r_cut)
    except (TypeError, ValueError):
        raise InputError(f"r_cut must be a number in Å, got {r_cut!r}") from None
    if not (np.isfinite(r_cut) and r_cut > 0):
        raise InputError(f"r_cut must be > 0 Å, got {r_cut}")
    deg = np.asarray(degree, dtype=np.float64).reshape(-1)
    if len(deg) != n:
        raise InputError(f"degree has {len(deg)} entries but there are {n} atoms")
    if not np.isfinite(deg).all() or (deg < 0).any():
        raise InputError("degree must be finite and >= 0 (the incoming edge count of each atom)")
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    frame, width = partition_frame(cell, pbc)

    inv = np.linalg.inv(frame)
    u = pos[:, :1] * inv[0] + pos[:, 1:2] * inv[1] + pos[:, 2:] * inv[2]  # no BLAS threads for 3x3
    u[:, pbc] = np.mod(u[:, pbc], 1.0)
    u[:, pbc] = np.where(u[:, pbc] >= 1.0, 0.0, u[:, pbc])  # mod can round up to 1.0

    # rank of every atom along each axis, ties by atom id: one integer sort key per level below
    rank = np.empty((n, 3), dtype=np.int64)
    for d in range(3):
        rank[np.argsort(u[:, d], kind="stable"), d] = np.arange(n)

    parts = np.empty(n, dtype=np.int64)
    # active atoms, kept grouped by domain (domains in increasing id order), with their
    # coordinates, axis ranks and weights carried along in the same order (cache-friendly gathers)
    atoms = np.arange(n)
    ua, ra, wa = u, rank, deg
    dom = np.zeros(n, dtype=np.int64)
    first = np.array([0])
    k = np.array([nparts])
    lo = np.where(pbc, 0.0, u.min(axis=0))[None, :]
    hi = np.where(pbc, 1.0, u.max(axis=0))[None, :]
    cut = np.zeros((1, 3), dtype=bool)

    while len(atoms):
        leaf = k[dom] == 1
        if leaf.any():
            parts[atoms[leaf]] = first[dom[leaf]]
            keep_dom = k > 1
            renum = np.cumsum(keep_dom) - 1
            keep = ~leaf
            atoms, dom, ua, ra, wa = atoms[keep], renum[dom[keep]], ua[keep], ra[keep], wa[keep]
            first, k, lo, hi, cut = first[keep_dom], k[keep_dom], lo[keep_dom], hi[keep_dom], cut[keep_dom]
            if not len(atoms):
                break
        ndom = len(k)
        starts = np.flatnonzero(np.r_[True, dom[1:] != dom[:-1]])
        counts = np.diff(np.r_[starts, len(atoms)])

        # neighbours a cut along d would create; axes where the atoms do not spread are skipped
        spread = np.maximum.reduceat(ua, starts, axis=0) - np.minimum.reduceat(ua, starts, axis=0)
        length = (hi - lo) * width
        with np.errstate(divide="ignore"):
            nn = np.where(length > 0, np.ceil(2.0 * r_cut / np.where(length > 0, length, 1.0)), np.inf)
        nn = np.where(pbc[None, :] & ~cut, 1.0, nn)
        nn = np.where(spread > 0, nn, np.inf)
        axis = 2 - np.argmin(nn[:, ::-1], axis=1)  # ties to the larger index

        ax_atom = axis[dom][:, None]
        order = np.argsort(dom * n + np.take_along_axis(ra, ax_atom, 1)[:, 0], kind="stable")  # unique keys
        # dom stays as is: sorting within domains keeps the grouping
        atoms, ua, ra, wa = atoms[order], ua[order], ra[order], wa[order]
        coord = np.take_along_axis(ua, ax_atom, 1)[:, 0]
        cum = np.cumsum(wa)
        base = np.r_[0.0, cum][starts]
        total = np.add.reduceat(wa, starts)
        kl = k // 2
        kr = k - kl
        target = total * kl / k

        # cutting after position j of a domain puts m = j + 1 atoms on the left
        j = np.arange(len(atoms)) - starts[dom]
        m = j + 1
        valid = (m >= kl[dom]) & (m <= counts[dom] - kr[dom])
        score = np.where(valid, np.abs(cum - base[dom] - target[dom]), np.inf)
        best = np.minimum.reduceat(score, starts)
        tie = np.where(score == best[dom], np.abs(m - counts[dom] * kl[dom] / k[dom]), np.inf)
        best2 = np.minimum.reduceat(tie, starts)
        hit = np.flatnonzero(tie == best2[dom])
        dh = dom[hit]
        m_left = m[hit[np.r_[True, dh[1:] != dh[:-1]]]]  # first best cut of each domain, in order

        # children: left = 2i, right = 2i + 1 (keeps atoms grouped in increasing id order)
        right = j >= m_left[dom]
        c = 0.5 * (coord[starts + m_left - 1] + coord[starts + m_left])
        rows = np.arange(ndom)
        lo2 = np.repeat(lo, 2, axis=0)
        hi2 = np.repeat(hi, 2, axis=0)
        hi2[2 * rows, axis] = c
        lo2[2 * rows + 1, axis] = c
        # the first cut of a periodic axis cuts the ring twice: at c and in the middle of the gap
        # across the wrap, so both halves get their true widths [wrap - 1, c) and [c, wrap)
        ring = pbc[axis] & ~cut[rows, axis]
        if ring.any():
            wrap = 0.5 * (coord[starts + counts - 1] + coord[starts] + 1.0)
            lo2[2 * rows[ring], axis[ring]] = wrap[ring] - 1.0
            hi2[2 * rows[ring] + 1, axis[ring]] = wrap[ring]
        cut2 = np.repeat(cut, 2, axis=0)
        cut2[2 * rows, axis] = True
        cut2[2 * rows + 1, axis] = True
        first = np.stack([first, first + kl], axis=1).reshape(-1)
        k = np.stack([kl, kr], axis=1).reshape(-1)
        lo, hi, cut = lo2, hi2, cut2
        dom = 2 * dom + right
    return parts
