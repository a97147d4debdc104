"""profiling/novelty.py: shell descriptors, novelty against a reference, greedy picking of candidate
cells (the probe behind docs/accuracy.md's novelty and data-selection paragraphs)."""
import os
import sys

import numpy as np
import pytest
from ase.build import bulk

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "profiling"))
from novelty import atoms_descriptors, novelty, pick_covering, pick_novel  # noqa: E402

Z = [8, 72]


def _rattled(seed, sigma=0.1):
    a = bulk("HfO2", "fluorite", 5.1, cubic=True)
    a.rattle(sigma, seed=seed)
    return a


def test_descriptors_are_invariant_and_novelty_leaves_out_the_own_structure():
    """An atom's shell descriptor (sorted distances to its k nearest neighbours of each element) does
    not change when the cell is rotated and shifted or its atoms reordered, and a reference atom's
    novelty is its distance to the nearest atom of another structure, not to itself."""
    a = _rattled(1)
    b = a.copy()
    b.rotate(37, (1, 2, 3), rotate_cell=True)
    b.translate((0.3, -1.2, 2.0))
    perm = np.random.default_rng(0).permutation(len(a))
    da, db = atoms_descriptors(a, Z, 4, 6.0), atoms_descriptors(b[perm], Z, 4, 6.0)
    assert np.allclose(da[perm], db, atol=1e-10)
    assert (np.diff(da.reshape(len(a), 2, 4), axis=-1) >= 0).all() and da.max() < 6.0
    dc = atoms_descriptors(_rattled(2), Z, 4, 6.0)
    ref, group = np.concatenate([da, dc]), np.repeat([0, 1], len(a))
    assert np.allclose(novelty(ref, group, da), 0.0)
    brute = np.linalg.norm(da[:, None] - dc[None], axis=-1).min(1)
    assert np.allclose(novelty(ref, group, da, np.zeros(len(a), int)), brute) and brute.min() > 0


def _greedy_by_hand(candidates, reference, count):
    """The definition, written out: mean over a candidate's atoms of the distance to the nearest
    reference row of the element; the best joins the reference."""
    ref = {z: [np.asarray(r) for r in rows] for z, rows in reference.items()}
    picked = []
    for _ in range(count):
        best, best_score = None, -1.0
        for c, (numbers, desc) in enumerate(candidates):
            if c in picked:
                continue
            score = np.mean([min(np.linalg.norm(d - r) for r in ref[z]) for z, d in zip(numbers, desc)])
            if score > best_score:
                best, best_score = c, score
        picked.append(best)
        for z, d in zip(*candidates[best]):
            ref[z].append(d)
    return picked


def _random_candidates(seed, count, sizes, dim, reference_rows):
    """(candidates, reference): `count` cells of random size in `sizes` with random descriptors of
    `dim` columns (each cell on its own scale), and `reference_rows` reference atoms per element."""
    rng = np.random.default_rng(seed)
    candidates = []
    for _ in range(count):
        n = int(rng.integers(*sizes))
        candidates.append((rng.choice(Z, n), rng.normal(size=(n, dim)) * rng.uniform(0.5, 2.0)))
    return candidates, {z: rng.normal(size=(reference_rows, dim)) for z in Z}


def test_pick_novel_is_the_greedy_definition_on_random_descriptors():
    candidates, reference = _random_candidates(3, 25, (3, 7), 5, 10)
    picked = pick_novel(candidates, reference, 8)
    assert picked == _greedy_by_hand(candidates, reference, 8)
    assert len(set(picked)) == 8


def test_pick_novel_does_not_pick_the_same_environment_twice():
    """Three copies of the most unusual cell and one other unusual cell: two picks take one copy and
    the other cell, because a picked cell's atoms join the reference."""
    reference = {z: np.concatenate([atoms_descriptors(_rattled(s, 0.05), Z)[_rattled(s, 0.05).numbers == z]
                                    for s in range(3)]) for z in Z}
    odd, other = _rattled(10, 0.3), _rattled(11, 0.25)
    cands = [(a.numbers, atoms_descriptors(a, Z)) for a in (odd, odd, odd, other, _rattled(12, 0.05))]
    assert pick_novel(cands, reference, 2) == [0, 3]
    assert pick_novel(cands[3:], reference, 1) == [0]  # alone, the other cell beats a 0.05 Å one


def test_pick_novel_refuses_a_count_beyond_the_candidates():
    with pytest.raises(ValueError, match="count 3 outside 0..2"):
        pick_novel([(np.array([8]), np.zeros((1, 2)))] * 2, {8: np.ones((1, 2))}, 3)


def _covering_by_hand(candidates, reference, count):
    """The facility location, written out: pick the candidate after which the candidates' atoms have
    the smallest summed distance to their nearest reference-or-picked atom of the element."""
    atoms = [(z, d) for numbers, desc in candidates for z, d in zip(numbers, desc)]

    def total(picked):
        ref = {z: list(rows) for z, rows in reference.items()}
        for c in picked:
            for z, d in zip(*candidates[c]):
                ref[z].append(d)
        return sum(min(np.linalg.norm(d - r) for r in ref[z]) for z, d in atoms)

    picked = []
    for _ in range(count):
        rest = [c for c in range(len(candidates)) if c not in picked]
        picked.append(min(rest, key=lambda c: total(picked + [c])))
    return picked


def test_pick_covering_is_the_greedy_facility_location_on_random_descriptors():
    candidates, reference = _random_candidates(5, 14, (2, 5), 4, 6)
    assert pick_covering(candidates, reference, 5, chunk=7) == _covering_by_hand(candidates, reference, 5)


def test_pick_covering_takes_the_typical_cell_and_pick_novel_the_outlier():
    """Nine cells rattled by 0.15 Å and one by 0.35 Å, against a 0.05 Å reference: covering the pool
    takes a 0.15 Å cell first, novelty the 0.35 Å one."""
    reference = {z: np.concatenate([atoms_descriptors(_rattled(s, 0.05), Z)[_rattled(s, 0.05).numbers == z]
                                    for s in range(2)]) for z in Z}
    cells = [_rattled(20 + s, 0.15) for s in range(9)] + [_rattled(40, 0.35)]
    cands = [(a.numbers, atoms_descriptors(a, Z)) for a in cells]
    assert pick_novel(cands, reference, 1) == [9]
    assert pick_covering(cands, reference, 1)[0] < 9


@pytest.mark.parametrize("pick", [pick_novel, pick_covering])
def test_pickers_without_a_reference_still_spread_their_picks(pick):
    """An empty reference, or one that lacks an element, is not an excuse to return the first cells:
    with nothing to compare every atom counts alike (pick_novel then takes candidate 0 first,
    pick_covering the most central cell), and after the first pick the rest follow the rule (the
    by-hand greedy with the first pick as the reference)."""
    rng = np.random.default_rng(7)
    candidates = [(rng.choice(Z, 4), rng.normal(size=(4, 3)) * rng.uniform(0.5, 2.0)) for _ in range(9)]
    candidates = [(np.array([8, 8, 72, 72]), d) for _, d in candidates]  # both elements in every cell
    picked = pick(candidates, {}, 4)
    assert picked != [0, 1, 2, 3] and len(set(picked)) == 4
    if pick is pick_novel:
        assert picked[0] == 0
    first = {z: candidates[picked[0]][1][candidates[picked[0]][0] == z] for z in Z}
    by_hand = _greedy_by_hand if pick is pick_novel else _covering_by_hand
    assert picked[1:] == [c for c in by_hand(candidates, first, 4) if c != picked[0]][:3]
    only_o = pick(candidates, {8: rng.normal(size=(5, 3))}, 3)
    assert len(set(only_o)) == 3


def test_novelty_with_a_single_reference_structure_is_infinite_for_its_own_atoms():
    d = np.random.default_rng(0).normal(size=(4, 3))
    assert np.isinf(novelty(d, np.zeros(4, int), d, np.zeros(4, int))).all()
    assert np.allclose(novelty(d, np.zeros(4, int), d[:2] + 0.1, np.ones(2, int)), novelty(d, None, d[:2] + 0.1))
