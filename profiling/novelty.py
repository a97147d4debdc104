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
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402
from accuracy_splits import SPLITS  # noqa: E402
from site_potential import onsite_levels  # noqa: E402


def shell_descriptors(graph, elements, k: int, r_cut: float) -> np.ndarray:
    """[N, k · len(elements)]: per atom, the sorted distances to its k nearest neighbours of each
    element (atomic numbers), over its incoming edges, padded with r_cut."""
    r = np.linalg.norm(graph.vec, axis=1)
    z_src = np.asarray(graph.numbers)[graph.src]
    n, out = len(graph.numbers), np.full((len(graph.numbers), len(elements), k), float(r_cut))
    for j, z in enumerate(elements):
        sel = z_src == z
        dst, d = graph.dst[sel], r[sel]
        order = np.lexsort((d, dst))  # by destination, nearest first: one pass over the edges
        dst, d = dst[order], d[order]
        rank = np.arange(len(dst)) - np.searchsorted(dst, dst)  # position within its destination
        keep = rank < k
        out[dst[keep], j, rank[keep]] = d[keep]
    return out.reshape(n, -1)


def novelty(train_desc, train_group, desc, group=None) -> np.ndarray:
    """Per row of desc, the distance to the nearest row of train_desc, leaving out the training rows
    of the same group (structure) when `group` is given."""
    tree = cKDTree(train_desc)
    if group is None:
        return tree.query(desc)[0]
    # the nearest row of another group is among the (largest group + 1) nearest rows
    dist, idx = tree.query(desc, k=np.bincount(train_group).max() + 1)
    return np.where(train_group[idx] == np.asarray(group)[:, None], np.inf, dist).min(axis=1)


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
    p.add_argument("--train", required=True, help="the training config whose data.train atoms the novelty is measured against")
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
