"""Partitioners (Low-NN, METIS, linear) and the halo/quality metrics, on cases checked by hand,
against brute-force counts, and on random periodic (also triclinic) structures."""
import importlib
import itertools

import ase
import numpy as np
import pytest

from egnn.errors import EgnnError
from egnn.graph import radius_graph
from egnn.partition import (embedding_row_bytes, halo_atoms, halo_sets, linear, low_nn, metis,
                            metis_adjacency, neighbour_ranks, owned_atoms, partition, partition_frame,
                            quality, quality_from_chunks, tiled_edge_chunks)

quality_mod = importlib.import_module("egnn.partition.quality")


def lnn(g, nparts):
    return low_nn(g.positions, g.cell, g.pbc, g.degree, nparts, g.r_cut)


def chain(n, spacing=2.0, pbc=(True, False, False), vacuum=0.0):
    pos = np.zeros((n, 3))
    pos[:, 0] = spacing * np.arange(n)
    cell = np.diag([n * spacing, vacuum, vacuum])
    return ase.Atoms("H" * n, positions=pos, cell=cell, pbc=pbc)


def cubic_lattice(m=4, a=3.0, cell=None):
    frac = np.array(list(itertools.product(range(m), repeat=3)), dtype=float) / m
    cellm = np.eye(3) * m * a if cell is None else np.asarray(cell, dtype=float)
    return ase.Atoms("H" * len(frac), scaled_positions=frac, cell=cellm, pbc=True), frac


def random_atoms(n, seed, cell=None, pbc=True):
    rng = np.random.default_rng(seed)
    cell = np.diag([12.0, 10.0, 14.0]) if cell is None else np.asarray(cell, dtype=float)
    return ase.Atoms("H" * n, scaled_positions=rng.random((n, 3)), cell=cell, pbc=pbc)


TRICLINIC = [[9.0, 0.0, 0.0], [4.0, 8.0, 0.0], [-2.0, 3.0, 10.0]]


# ---------------------------------------------------------------- exact cases by hand

@pytest.mark.parametrize("pbc,vacuum", [((True, False, False), 0.0), ((True, True, True), 20.0)])
def test_periodic_chain_in_two_parts(pbc, vacuum):
    g = radius_graph(chain(10, pbc=pbc, vacuum=vacuum), 2.5)
    parts = lnn(g, 2)
    np.testing.assert_array_equal(parts, [0] * 5 + [1] * 5)  # cut along the chain, not across it
    q = quality(g, parts)
    np.testing.assert_array_equal(q.neighbours, [1, 1])
    h = halo_atoms(g.src, g.dst, parts)
    # the halo of rank 0 (atoms 0..4) is atom 5 and, across the periodic boundary, atom 9
    np.testing.assert_array_equal(h[0], [5, 9])
    np.testing.assert_array_equal(h[1], [0, 4])
    np.testing.assert_array_equal(q.halo, [2, 2])
    np.testing.assert_array_equal(q.edges, [10, 10])


def test_periodic_chain_wider_cutoff_and_three_parts():
    g = radius_graph(chain(12), 4.5)  # two neighbours on each side
    parts = lnn(g, 3)
    np.testing.assert_array_equal(parts, np.repeat([0, 1, 2], 4))
    q = quality(g, parts)
    np.testing.assert_array_equal(q.neighbours, [2, 2, 2])  # a ring of three
    np.testing.assert_array_equal(q.halo, [4, 4, 4])
    np.testing.assert_array_equal(halo_atoms(g.src, g.dst, parts)[0], [4, 5, 10, 11])


@pytest.mark.parametrize("r_cut,neighbours", [(3.1, 3), (4.5, 6), (5.3, 7)])
def test_cube_in_eight(r_cut, neighbours):
    # 4x4x4 simple cubic (a = 3 Å), periodic: 8 parts must be the 2x2x2 blocks; a block touches
    # 3 blocks by faces (3.0 Å), 3 more by edges (4.24 Å) and the last by its corner (5.20 Å)
    atoms, frac = cubic_lattice()
    g = radius_graph(atoms, r_cut)
    parts = lnn(g, 8)
    block = np.floor(frac * 4 / 2).astype(int) @ [4, 2, 1]
    assert len(set(zip(block.tolist(), parts.tolist()))) == 8  # parts and blocks coincide
    q = quality(g, parts)
    np.testing.assert_array_equal(q.nodes, 8)
    np.testing.assert_array_equal(q.neighbours, neighbours)
    np.testing.assert_array_equal(q.send_neighbours, neighbours)
    if r_cut == 3.1:  # both x-faces of the other block along x are within 3 Å (one via the wrap)
        np.testing.assert_array_equal(q.halo, 24)
    assert q.summary()["edge_imbalance"] == 1.0


def test_sheared_lattice_splits_in_fractional_coordinates():
    # the same lattice in a triclinic cell: parts must still be blocks of fractional indices
    atoms, frac = cubic_lattice(cell=[[12.0, 0, 0], [5.0, 12.0, 0], [3.0, -4.0, 12.0]])
    g = radius_graph(atoms, 3.5)
    parts = lnn(g, 8)
    block = np.floor(frac * 4 / 2).astype(int) @ [4, 2, 1]
    assert len(set(zip(block.tolist(), parts.tolist()))) == 8


def test_self_image_edges_are_local_not_halo():
    # a 2.5 Å cell at r_cut 3: every atom sees its own periodic images (src == dst, R != 0)
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [1.2, 1.2, 1.2]], cell=np.eye(3) * 2.5, pbc=True)
    g = radius_graph(atoms, 3.0)
    own_images = (g.src == g.dst)
    assert own_images.any() and (g.shift[own_images] != 0).any(axis=1).all()
    parts = np.array([0, 1])
    q = quality(g, parts)
    np.testing.assert_array_equal(q.edges, np.bincount(g.dst))  # every image edge is counted
    np.testing.assert_array_equal(halo_atoms(g.src, g.dst, parts)[0], [1])
    np.testing.assert_array_equal(q.halo, [1, 1])
    # one part: images of local atoms only, so no halo at all
    q1 = quality(g, np.zeros(2, dtype=np.int64))
    assert q1.halo.tolist() == [0] and q1.neighbours.tolist() == [0]


# ---------------------------------------------------------------- brute force

def brute_force(src, dst, parts, nparts):
    halo = [set() for _ in range(nparts)]
    edges = [0] * nparts
    for s, d in zip(src.tolist(), dst.tolist()):
        r = parts[d]
        edges[r] += 1
        if parts[s] != r:
            halo[r].add(s)
    halo_sorted = [sorted(h, key=lambda a: (parts[a], a)) for h in halo]
    nbr = [len({parts[a] for a in h}) for h in halo]
    links = {}
    for r, h in enumerate(halo):
        for a in h:
            links[(parts[a], r)] = links.get((parts[a], r), 0) + 1
    send = [sum(c for (o, _), c in links.items() if o == q) for q in range(nparts)]
    send_nbr = [sum(1 for (o, _) in links if o == q) for q in range(nparts)]
    return edges, halo_sorted, nbr, send, send_nbr, links


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["dense", "sparse-chunked"])
def test_quality_equals_brute_force(seed, mode, monkeypatch):
    if mode == "sparse-chunked":  # the sort-unique path and many small chunks must agree too
        monkeypatch.setattr(quality_mod, "_DENSE_LIMIT", 0)
        monkeypatch.setattr(quality_mod, "_CHUNK", 97)
    cell = TRICLINIC if seed == 1 else None
    g = radius_graph(random_atoms(70, seed, cell=cell), 4.0)
    rng = np.random.default_rng(seed)
    for nparts, parts in [(5, rng.integers(0, 5, 70)), (6, lnn(g, 6)), (4, metis(g, 4))]:
        q = quality(g, parts, row_bytes=123, nparts=nparts, keep_halo=True)
        edges, halo, nbr, send, send_nbr, links = brute_force(g.src, g.dst, parts.tolist(), nparts)
        assert q.edges.tolist() == edges
        assert q.halo.tolist() == [len(h) for h in halo]
        assert q.neighbours.tolist() == nbr
        assert q.send_atoms.tolist() == send
        assert q.send_neighbours.tolist() == send_nbr
        assert q.nodes.tolist() == np.bincount(parts, minlength=nparts).tolist()
        assert q.bytes_recv.tolist() == [123 * len(h) for h in halo]
        got_links = dict(zip(zip(q.pair_owner.tolist(), q.pair_rank.tolist()), q.pair_atoms.tolist()))
        assert got_links == links
        for r in range(nparts):
            assert q.halo_sets[r].tolist() == halo[r]
            by = q.halo_sets.by_owner(r)
            assert list(by) == sorted({parts[a] for a in halo[r]})
            for o, atoms in by.items():
                assert atoms.tolist() == sorted(a for a in halo[r] if parts[a] == o)
        lists = halo_atoms(g.src, g.dst, parts, nparts)
        assert [h.tolist() for h in lists] == halo
        assert [n.tolist() for n in neighbour_ranks(g.src, g.dst, parts, nparts)] == \
            [sorted({parts[a] for a in h}) for h in halo]
        s = q.summary()
        assert s["edge_imbalance"] == pytest.approx(max(edges) / np.mean(edges))
        assert s["halo_max"] == max(len(h) for h in halo)


def test_owned_atoms_and_row_bytes():
    parts = np.array([2, 0, 2, 1, 0])
    assert [o.tolist() for o in owned_atoms(parts, 4)] == [[1, 4], [3], [0, 2], []]
    assert embedding_row_bytes(4, 16, "float16") == 800
    assert embedding_row_bytes(2, 8, "float32") == 9 * 8 * 4


def test_tiled_edge_stream_equals_graph_of_repeat():
    base = random_atoms(20, 5, cell=TRICLINIC)
    reps = (2, 3, 1)
    bg = radius_graph(base, 5.0)
    big = radius_graph(base.repeat(reps), 5.0)
    chunks = list(tiled_edge_chunks(bg.src, bg.dst, bg.shift, len(base), reps))
    s = np.concatenate([c[0] for c in chunks])
    d = np.concatenate([c[1] for c in chunks])
    key = np.sort(d * big.num_nodes + s)
    np.testing.assert_array_equal(key, np.sort(big.dst * big.num_nodes + big.src))
    parts = lnn(big, 5)
    assert quality_from_chunks(iter(chunks), parts).summary() == quality(big, parts).summary()


# ---------------------------------------------------------------- random structures

@pytest.mark.parametrize("nparts", [1, 2, 3, 5, 6, 7, 8, 12, 13, 16])
@pytest.mark.parametrize("cell", ["ortho", "triclinic"])
def test_low_nn_assigns_every_atom_and_balances(nparts, cell):
    g = radius_graph(random_atoms(400, nparts, cell=TRICLINIC if cell == "triclinic" else None), 4.0)
    parts = lnn(g, nparts)
    assert parts.dtype == np.int64 and parts.shape == (g.num_nodes,)
    assert parts.min() == 0 and parts.max() == nparts - 1
    counts = np.bincount(parts, minlength=nparts)
    assert (counts > 0).all() and counts.sum() == g.num_nodes
    q = quality(g, parts)
    # each cut misses its degree-share by at most half an atom's degree; shares carry down the
    # tree with factors <= 2/3, so no part is off by more than 1.5 max degrees
    assert np.abs(q.edges - g.num_edges / nparts).max() <= 1.5 * g.degree.max()
    assert np.array_equal(parts, lnn(g, nparts))  # deterministic


def test_low_nn_balances_large_random_structure():
    g = radius_graph(random_atoms(3000, 7, cell=np.eye(3) * 32.0), 5.0)
    for nparts in (16, 24):
        assert quality(g, lnn(g, nparts)).summary()["edge_imbalance"] < 1.03


def test_low_nn_invariances():
    atoms = random_atoms(300, 11, cell=TRICLINIC)
    g = radius_graph(atoms, 4.0)
    ref = lnn(g, 7)
    # atom order
    perm = np.random.default_rng(0).permutation(len(atoms))
    p = low_nn(g.positions[perm], g.cell, g.pbc, g.degree[perm], 7, 4.0)
    np.testing.assert_array_equal(p, ref[perm])
    # lattice translations of single atoms (wrapping) and a rigid rotation of everything
    shifts = np.random.default_rng(1).integers(-2, 3, (len(atoms), 3))
    np.testing.assert_array_equal(low_nn(g.positions + shifts @ g.cell, g.cell, g.pbc, g.degree, 7, 4.0), ref)
    from scipy.spatial.transform import Rotation
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    np.testing.assert_array_equal(low_nn(g.positions @ rot.T, g.cell @ rot.T, g.pbc, g.degree, 7, 4.0), ref)


def test_low_nn_open_axes_and_molecule():
    # a slab periodic in x, y, open in z with no cell vector; and a finite cluster
    xyz = np.random.default_rng(3).random((200, 3)) * [10.0, 10.0, 4.0]
    slab = ase.Atoms("H" * 200, positions=xyz, cell=[[10, 0, 0], [0, 10, 0], [0, 0, 0]], pbc=[True, True, False])
    g = radius_graph(slab, 3.5)
    parts = lnn(g, 4)
    assert np.bincount(parts).min() > 0
    # the 4 Å thick slab must be cut laterally, not through its thickness
    zc = [g.positions[parts == r, 2].mean() for r in range(4)]
    assert np.ptp(zc) < 1.0
    cluster = ase.Atoms("H" * 50, positions=np.random.default_rng(4).random((50, 3)) * 8.0)
    g = radius_graph(cluster, 3.0)
    parts = lnn(g, 5)
    assert np.bincount(parts, minlength=5).min() > 0


def test_partition_frame_widths_are_plane_spacings():
    cell = np.array(TRICLINIC)
    _, width = partition_frame(cell, [True] * 3)
    vol = abs(np.linalg.det(cell))
    expect = [vol / np.linalg.norm(np.cross(cell[1], cell[2])), vol / np.linalg.norm(np.cross(cell[2], cell[0])),
              vol / np.linalg.norm(np.cross(cell[0], cell[1]))]
    np.testing.assert_allclose(width, expect)


# ---------------------------------------------------------------- baselines

def test_metis_adjacency_and_partition():
    g = radius_graph(random_atoms(120, 8, cell=np.eye(3) * 6.0), 4.0)  # small cell: many images
    adj = metis_adjacency(g)
    starts, nb = np.asarray(adj.adj_starts), np.asarray(adj.adjacent)
    assert starts.dtype == np.int64 and nb.dtype == np.int64
    pairs = {(d, s) for s, d in zip(g.src.tolist(), g.dst.tolist()) if s != d}
    got = [(d, int(s)) for d in range(g.num_nodes) for s in nb[starts[d]:starts[d + 1]]]
    assert len(got) == len(set(got)) == len(pairs) and set(got) == pairs  # collapsed, no self loops
    assert set(got) == {(s, d) for d, s in got}  # symmetric
    parts = metis(g, 6)
    assert parts.dtype == np.int64 and np.bincount(parts, minlength=6).min() > 0
    np.testing.assert_array_equal(parts, metis(g, 6))
    np.testing.assert_array_equal(metis(g, 1), 0)


@pytest.mark.parametrize("nparts", [1, 3, 8, 119, 120])
def test_linear_contiguous_and_balanced(nparts):
    g = radius_graph(random_atoms(120, 9), 4.0)
    parts = linear(g, nparts)
    assert (np.diff(parts) >= 0).all() and (np.diff(parts) <= 1).all()
    assert parts[0] == 0 and parts[-1] == nparts - 1  # every part non-empty
    if nparts <= 8:
        edges = np.bincount(parts, weights=g.degree)
        assert np.abs(edges - g.num_edges / nparts).max() <= g.degree.max()


def test_partition_dispatch():
    g = radius_graph(random_atoms(50, 10), 4.0)
    np.testing.assert_array_equal(partition(g, 3, "linear"), linear(g, 3))
    np.testing.assert_array_equal(partition(g, 3, "low-nn"), lnn(g, 3))
    with pytest.raises(EgnnError, match="unknown partition method"):
        partition(g, 3, "spectral")


# ---------------------------------------------------------------- bad input

def test_bad_input_raises():
    g = radius_graph(random_atoms(20, 12), 4.0)
    for fn in (lambda p: lnn(g, p), lambda p: metis(g, p), lambda p: linear(g, p)):
        for bad in (0, -1, 21, 2.5):
            with pytest.raises(EgnnError, match="nparts"):
                fn(bad)
    for r_cut in (0.0, -1.0, float("nan")):
        with pytest.raises(EgnnError, match="r_cut"):
            low_nn(g.positions, g.cell, g.pbc, g.degree, 2, r_cut)
    flat = [[4.0, 0, 0], [8.0, 0, 0], [0, 0, 5.0]]  # a and b collinear: zero volume
    with pytest.raises(EgnnError, match="zero"):
        low_nn(g.positions, flat, [True] * 3, g.degree, 2, 4.0)
    with pytest.raises(EgnnError, match="zero"):
        low_nn(g.positions, [[4.0, 0, 0], [0, 0, 0], [0, 0, 5]], [True, True, False], g.degree, 2, 4.0)
    bad_pos = g.positions.copy()
    bad_pos[3, 1] = np.nan
    with pytest.raises(EgnnError, match="NaN"):
        low_nn(bad_pos, g.cell, g.pbc, g.degree, 2, 4.0)
    with pytest.raises(EgnnError, match="degree"):
        low_nn(g.positions, g.cell, g.pbc, g.degree[:-1], 2, 4.0)
    with pytest.raises(EgnnError, match="parts"):
        quality(g, np.full(20, 3), nparts=2)
    with pytest.raises(EgnnError, match="parts"):
        quality(g, np.zeros(19, dtype=int))
    with pytest.raises(EgnnError, match="symmetric"):
        metis(type("G", (), {"num_nodes": 3, "src": np.array([0, 1]), "dst": np.array([1, 2])})(), 2)
    with pytest.raises(EgnnError, match="dtype"):
        embedding_row_bytes(4, 16, "int8")


# ---------------------------------------------------------------- figures

def test_figures_are_png(tmp_path):
    from egnn.partition.plot import plot_partition, save_figures

    g = radius_graph(random_atoms(200, 13), 4.0)
    for nparts in (4, 30):
        parts = lnn(g, nparts)
        q = quality(g, parts)
        out = tmp_path / f"p{nparts}.png"
        save_figures(out, g.positions, parts, q, axes="xz")
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(EgnnError, match="axes"):
        plot_partition(g.positions, parts, axes="xq")
    with pytest.raises(EgnnError, match="cannot write"):
        save_figures(tmp_path / "missing" / "x.png", g.positions, parts, q)


def test_halo_sets_layout():
    g = radius_graph(random_atoms(60, 14), 4.0)
    parts = lnn(g, 4)
    hs = halo_sets(g.src, g.dst, parts)
    assert hs.nparts == 4 and hs.ptr[-1] == len(hs.atoms)
    for r in range(4):
        a, o = hs[r], hs.owners_of(r)
        np.testing.assert_array_equal(o, parts[a])
        assert (o != r).all()
        assert (np.lexsort((a, o)) == np.arange(len(a))).all()  # sorted by (owner, atom)
        np.testing.assert_array_equal(hs.neighbours(r), np.unique(o))
    for q in range(4):  # what q sends to r is exactly r's receive run from q
        sends = hs.sends(q)
        assert sorted(sends) == [r for r in range(4) if q in hs.by_owner(r)]
        for r, a in sends.items():
            np.testing.assert_array_equal(a, hs.by_owner(r)[q])
