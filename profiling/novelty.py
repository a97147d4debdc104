"""Are a checkpoint's held-out onsite errors those of atoms unlike any training atom? (docs/accuracy.md)

    .venv/bin/python profiling/novelty.py --checkpoint CK --train CONFIG [--split m12_val ...] [--out JSON]

Per atom: the mean |onsite level error| (diagonal of the predicted minus the DFT onsite block, as
profiling/site_potential.py) and the novelty of its first shells: the Euclidean distance (Å) from its
shell descriptor, the sorted distances to its K nearest neighbours of each element (incoming
edges; r_cut where there are fewer), to the nearest descriptor of a training atom of the same
element (for the training atoms themselves: of another training structure). Prints per split and
element the mean error, the median novelty, the Spearman correlation of the two and the mean error
in each novelty quartile. A rising row says the errors are those of environments the training data
does not cover (more, or targeted, data); a flat one that they are not local-geometry novelty.

Also the two greedy pickers of profiling/data_selection.py (geometry only): `pick_novel`, farthest-point
by cell (the candidate whose atoms are the most novel on average joins the reference), and
`pick_covering`, a facility location (the candidate that lowers the summed novelty of all candidate
atoms most). Measured against random picks in docs/accuracy.md ("which cells"): neither beat random.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402
from accuracy_splits import SPLITS  # noqa: E402
from site_potential import onsite_levels  # noqa: E402


def shell_descriptors(graph, elements, k: int, r_cut: float) -> np.ndarray:
    """[N, k · len(elements)]: per atom of an egnn.graph.AtomGraph, the sorted distances to its k
    nearest neighbours of each element (atomic numbers) over its incoming edges, padded with r_cut."""
    r = np.linalg.norm(graph.vec, axis=1)
    z_src = np.asarray(graph.numbers)[graph.src]
    n = len(graph.numbers)
    out = np.full((n, len(elements), k), float(r_cut))
    for j, z in enumerate(elements):
        sel = z_src == z
        dst, d = graph.dst[sel], r[sel]
        order = np.lexsort((d, dst))  # by destination, nearest first: one pass over the edges
        dst, d = dst[order], d[order]
        rank = np.arange(len(dst)) - np.searchsorted(dst, dst)  # position within its destination
        keep = rank < k
        out[dst[keep], j, rank[keep]] = d[keep]
    return out.reshape(n, -1)


def atoms_descriptors(atoms, elements, k: int = 8, r_cut: float = 8.0) -> np.ndarray:
    """shell_descriptors of an ase.Atoms (its own radius graph)."""
    from egnn.graph import radius_graph

    return shell_descriptors(radius_graph(atoms, r_cut), elements, k, r_cut)


def novelty(ref_desc, ref_group, desc, group=None) -> np.ndarray:
    """Per row of desc, the distance to the nearest row of ref_desc, leaving out the reference rows of
    the same group (structure) when `group` is given (how novel a training atom is among the others;
    inf where no other group exists)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(ref_desc)
    if group is None:
        return tree.query(desc)[0]
    # the nearest row of another group is among the (largest group + 1) nearest rows; cKDTree pads a
    # query beyond the reference with index len(ref_desc) at distance inf, hence the extra group -1
    dist, idx = tree.query(desc, k=np.bincount(ref_group).max() + 1)
    own = np.append(np.asarray(ref_group), -1)[idx] == np.asarray(group)[:, None]
    return np.where(own, np.inf, dist).min(axis=1)


def _pool(candidates, reference, who: str, count: int):
    """Candidate atoms flattened: numbers, float64 descriptors, owning candidate, and each atom's
    novelty against the reference (inf for an element the reference lacks)."""
    if not 0 <= count <= len(candidates):
        raise ValueError(f"{who}: count {count} outside 0..{len(candidates)} candidates")
    numbers = np.concatenate([np.asarray(n, dtype=np.int64) for n, _ in candidates] or [np.zeros(0, np.int64)])
    desc = np.concatenate([np.asarray(d, dtype=np.float64) for _, d in candidates] or [np.zeros((0, 0))])
    owner = np.repeat(np.arange(len(candidates)), [len(n) for n, _ in candidates])
    near = np.full(len(numbers), np.inf)
    for z in np.unique(numbers):
        rows = numbers == z
        if len(reference.get(z, ())):
            near[rows] = novelty(np.asarray(reference[z], dtype=np.float64), None, desc[rows])
    return numbers, desc, owner, near


def _capped(near: np.ndarray) -> np.ndarray:
    """Uncovered atoms (inf: their element is in neither the reference nor the picks yet) count as far
    as the farthest covered atom; with nothing covered every atom counts 1, i.e. all alike."""
    finite = near[np.isfinite(near)]
    return np.where(np.isfinite(near), near, finite.max() if len(finite) else 1.0)


def pick_novel(candidates, reference, count: int) -> list[int]:
    """Indices of `count` candidates, in pick order: greedily the candidate whose atoms are the most
    novel on average, after which its atoms join the reference (farthest-point sampling by cell).

    candidates: list of (numbers [n], descriptors [n, D]) per candidate structure; reference: dict
    atomic number -> [m, D] descriptors of the atoms already in the data. An atom of an element the
    reference lacks counts as far as the farthest atom that has a neighbour of its element there
    (with an empty reference the first pick is candidate 0, then farthest-point). Ties go to the lower
    index, so the result is a pure function of the inputs."""
    from scipy.spatial import cKDTree

    numbers, desc, owner, near = _pool(candidates, reference, "pick_novel", count)
    sizes = np.maximum(np.bincount(owner, minlength=len(candidates)), 1)
    picked: list[int] = []
    for _ in range(count):
        score = np.bincount(owner, weights=_capped(near), minlength=len(candidates)) / sizes
        score[picked] = -np.inf
        c = int(np.argmax(score))
        picked.append(c)
        for z in np.unique(numbers[owner == c]):  # the picked atoms join the reference
            rows = numbers == z
            d = cKDTree(desc[(owner == c) & rows]).query(desc[rows])[0]
            near[rows] = np.minimum(near[rows], d)
    return picked


def pick_covering(candidates, reference, count: int, chunk: int = 1024) -> list[int]:
    """Indices of `count` candidates, in pick order, that cover the candidates' own environments best:
    greedily, the one that lowers the summed novelty of *all* candidate atoms the most (a facility
    location), so the picks are typical of the pool rather than its outliers. Same inputs and rules as
    pick_novel (with nothing to compare, the first pick is the most central cell). Memory: one
    [atoms of an element, candidates] float64 array per element."""
    numbers, desc, owner, near = _pool(candidates, reference, "pick_covering", count)
    cover = {}  # per element: distance of each candidate atom to the nearest atom of each candidate
    for z in np.unique(numbers):
        rows = numbers == z
        x, own = desc[rows] - desc[rows].mean(0), owner[rows]  # centred: |x|² small, the expansion exact
        has = np.unique(own)
        starts = np.searchsorted(own, has)  # own is sorted: a candidate's atoms are contiguous
        m = np.full((len(x), len(candidates)), np.inf)
        sq = (x * x).sum(1)
        for a in range(0, len(x), chunk):
            d2 = sq[a:a + chunk, None] + sq[None] - 2 * x[a:a + chunk] @ x.T
            m[a:a + chunk, has] = np.minimum.reduceat(np.sqrt(np.maximum(d2, 0)), starts, axis=1)
        cover[z] = (rows, m)
    picked: list[int] = []
    for _ in range(count):
        now, gain = _capped(near), np.zeros(len(candidates))
        for rows, m in cover.values():
            gain += np.maximum(now[rows, None] - m, 0).sum(0)
        gain[picked] = -np.inf
        c = int(np.argmax(gain))
        picked.append(c)
        for rows, m in cover.values():
            near[rows] = np.minimum(near[rows], m[:, c])
    return picked


def collect(model, runs, k, cache):
    """(element symbol, structure index, mean |level error| meV, descriptor) per atom of the runs."""
    from ase.data import atomic_numbers

    from egnn.evaluate import _iter_samples
    from egnn.train import open_datasets

    r_cut = float(model.config.r_cut)
    elements = [atomic_numbers[e] for e in model.basis.elements]
    els, groups, errs, descs = [], [], [], []
    for s, (x, _, _) in enumerate(_iter_samples(open_datasets(runs, r_cut, cache), model)):
        e, err, _ = onsite_levels(model, x)
        els += e
        groups += [s] * len(e)
        errs += [1000 * float(np.abs(v).mean()) for v in err]
        descs.append(shell_descriptors(x.graph, elements, k, r_cut))
    return np.array(els), np.array(groups), np.array(errs), np.concatenate(descs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True,
                   help="the training config whose data.train atoms the novelty is measured against")
    p.add_argument("--split", action="append", choices=sorted(SPLITS))
    p.add_argument("-k", type=int, default=8, help="neighbours per element in the descriptor")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from egnn.train import default_cache_dir, flatten_paths, load_config, model_from_checkpoint

    model = model_from_checkpoint(a.checkpoint)
    cache = default_cache_dir()
    train = collect(model, flatten_paths(load_config(a.train).data["train"]), a.k, cache)
    out = {"checkpoint": a.checkpoint, "train_config": a.train, "k": a.k}
    print(f"{'split':8s}{'el':>3s}{'atoms':>6s}{'|err| meV':>10s}{'novelty Å':>10s}{'spearman':>9s}"
          "   mean |err| (meV) by novelty quartile, least novel first")
    for split in ["train"] + (a.split or ["in_dist", "m12_val", "m24_val"]):
        els, groups, errs, desc = train if split == "train" else collect(model, SPLITS[split](), a.k, cache)
        for el in model.basis.elements:
            mine, ref = els == el, train[0] == el
            nov = novelty(train[3][ref], train[1][ref], desc[mine], groups[mine] if split == "train" else None)
            err = errs[mine]
            cuts = np.quantile(nov, [0.25, 0.5, 0.75])
            q = np.digitize(nov, cuts)
            row = {"atoms": int(mine.sum()), "err_meV": float(err.mean()), "novelty_median_A": float(cuts[1]),
                   "spearman": float(spearmanr(nov, err).correlation),
                   "err_by_quartile_meV": [float(err[q == b].mean()) for b in range(4)]}
            out.setdefault(split, {})[el] = row
            print(f"{split:8s}{el:>3s}{row['atoms']:6d}{row['err_meV']:10.1f}{row['novelty_median_A']:10.3f}"
                  f"{row['spearman']:+9.2f}   " + " ".join(f"{v:6.1f}" for v in row["err_by_quartile_meV"]))
    if a.out:
        write_json(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
