"""Halo plans against egnn.partition.quality's definitions, their serialisation and world checks,
the pack/unpack adapter against index_select/index_add, and the exchange's argument checks."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from egnn import DistributedError, EgnnError, InputError
from egnn.comm import HaloExchange, HaloPlan, PhaseTimer, build_plans, make_backend
from egnn.comm import _ops
from egnn.graph import radius_graph
from egnn.partition import partition, quality


def hfo2(reps=(2, 1, 1), r_cut=4.0, seed=0):
    atoms = bulk("HfO2", "fluorite", 5.1, cubic=True).repeat(reps)
    atoms.rattle(0.1, seed=seed)
    return radius_graph(atoms, r_cut)


def two_clusters():
    """Two far-apart open clusters of 4 atoms: no edge joins them."""
    a = np.array([[0, 0, 0], [1.5, 0, 0], [0, 1.5, 0], [0, 0, 1.5]], dtype=float)
    atoms = Atoms("SiCSiC" + "SiCSiC", positions=np.concatenate([a, a + 20.0]), pbc=False)
    return radius_graph(atoms, 2.5)


@pytest.mark.parametrize("method", ["low-nn", "metis", "linear"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_plans_follow_the_quality_definitions(method, world):
    g = hfo2()
    parts = partition(g, world, method)
    q = quality(g, parts, keep_halo=True, row_bytes=100)
    hs = q.halo_sets
    plans = build_plans(g, parts, world)
    for r, p in enumerate(plans):
        assert p.rank == r and p.world_size == world
        np.testing.assert_array_equal(p.owned, np.flatnonzero(parts == r))
        np.testing.assert_array_equal(p.halo, hs[r])  # same atoms, same (owner, id) order
        np.testing.assert_array_equal(p.recv_ranks, hs.neighbours(r))
        assert p.num_halo == q.halo[r] and len(p.recv_ranks) == q.neighbours[r]
        assert len(p.send_index) == q.send_atoms[r] and len(p.send_ranks) == q.send_neighbours[r]
        assert p.bytes_per_exchange(100) == {"send": q.bytes_send[r], "recv": q.bytes_recv[r]}
        # local edges: exactly the edges whose dst r owns, re-indexed, still sorted by dst
        np.testing.assert_array_equal(p.edges, np.flatnonzero(parts[g.dst] == r))
        np.testing.assert_array_equal(p.nodes[p.src], g.src[p.edges])
        np.testing.assert_array_equal(p.nodes[p.dst], g.dst[p.edges])
        assert (np.diff(p.dst) >= 0).all() and (p.dst < p.num_owned).all()
        # the halo rows from rank s are what s packs for r, in the same order
        for s, rows in p.recv_slices().items():
            sent = plans[s].send_lists()[r]
            np.testing.assert_array_equal(plans[s].owned[sent], p.nodes[rows])
            assert (parts[p.nodes[rows]] == s).all()
    # every send has a matching receive and vice versa
    sends = {(r, s) for r, p in enumerate(plans) for s in p.send_ranks}
    recvs = {(s, r) for r, p in enumerate(plans) for s in p.recv_ranks}
    assert sends == recvs
    assert len({p.key for p in plans}) == 1


def test_build_one_rank_equals_build_all():
    g = hfo2()
    parts = partition(g, 4, "metis")
    for r, p in enumerate(build_plans(g, parts, 4)):
        one = HaloPlan.build(g, parts, r, 4)
        for k, v in p.to_dict().items():
            np.testing.assert_array_equal(v, one.to_dict()[k])


def test_periodic_images_of_local_atoms_are_not_halo():
    # one atom in a small periodic cell: every edge is a periodic self-image, so nothing is halo
    atoms = Atoms("Si", positions=[[0, 0, 0]], cell=np.eye(3) * 2.5, pbc=True)
    g = radius_graph(atoms, 3.0)
    assert g.num_edges > 0
    p = HaloPlan.build(g, np.zeros(1, dtype=int), 0, 1)
    assert p.num_halo == 0 and len(p.send_index) == 0 and len(p.edges) == g.num_edges


def test_rank_without_halo_and_empty_send_lists():
    g = two_clusters()
    parts = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # cluster A over ranks 0, 1; cluster B alone on 2
    plans = build_plans(g, parts, 3)
    assert plans[2].num_halo == 0 and len(plans[2].send_ranks) == 0 and len(plans[2].send_index) == 0
    assert len(plans[2].edges) == (parts[g.dst] == 2).sum() > 0
    assert list(plans[0].recv_ranks) == [1] and list(plans[0].send_ranks) == [1]
    assert 2 not in plans[0].send_ranks and 2 not in plans[1].recv_ranks


def test_serialisation_round_trip(tmp_path):
    g = hfo2()
    plan = build_plans(g, partition(g, 3, "low-nn"), 3)[1]
    back = HaloPlan.from_dict(plan.to_dict())
    plan.save(str(tmp_path / "p.npz"))
    loaded = HaloPlan.load(str(tmp_path / "p.npz"))
    for other in (back, loaded):
        assert other.key == plan.key and other.rank == 1 and other.world_size == 3
        for k, v in plan.to_dict().items():
            np.testing.assert_array_equal(v, other.to_dict()[k])


def test_bad_plans_are_refused(tmp_path):
    g = hfo2()
    plan = build_plans(g, partition(g, 4, "linear"), 4)[0]
    with pytest.raises(DistributedError, match="built for 4 ranks .* has 3"):
        plan.validate(3)
    with pytest.raises(DistributedError, match="belongs to rank 0"):
        plan.validate(4, rank=2)
    d = plan.to_dict()
    d["send_index"] = d["send_index"] + plan.num_owned  # rows that are not owned
    with pytest.raises(InputError, match="inconsistent"):
        HaloPlan.from_dict(d)
    with pytest.raises(InputError, match="not an egnn halo plan"):
        HaloPlan.from_dict({"rank": 0})
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(InputError, match="junk.npz"):
        HaloPlan.load(str(tmp_path / "junk.npz"))
    with pytest.raises(InputError, match="not found"):
        HaloPlan.load(str(tmp_path / "missing.npz"))
    with pytest.raises(DistributedError, match="outside the world"):
        HaloPlan.build(g, np.zeros(g.num_nodes, dtype=int), 1, 1)
    with pytest.raises(InputError, match="parts"):
        HaloPlan.build(g, np.zeros(g.num_nodes - 1, dtype=int), 0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pack_unpack_adapter_matches_index_ops(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 9, 5, generator=gen).to(dtype)
    for index in (torch.tensor([3, 0, 3, 12, 7, 3]), torch.zeros(0, dtype=torch.long)):
        buf = _ops.pack(x, index)
        assert buf.shape == (len(index), 9, 5) and buf.is_contiguous()
        assert torch.equal(buf, x.index_select(0, index))
        recv = torch.randn(len(index) % 5 + 1, 9, 5, generator=gen).to(dtype)
        out = _ops.unpack(x, recv, 6)
        ref = x.clone()
        ref[6:6 + len(recv)] = recv
        assert torch.equal(out, ref) and torch.equal(x[:6], out[:6])
        grad = torch.randn(13, 9, 5, generator=gen).to(dtype)
        b = torch.randn(len(index), 9, 5, generator=gen).to(dtype)
        got = _ops.unpack_add(grad, index, b)
        want = grad.double().index_add(0, index, b.double())  # repeated rows add up
        tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-6)
        assert torch.allclose(got.double(), want, atol=tol, rtol=tol)


def test_exchange_needs_a_process_group_and_a_known_backend(monkeypatch):
    g = hfo2()
    plan = HaloPlan.build(g, np.zeros(g.num_nodes, dtype=int), 0, 1)
    with pytest.raises(DistributedError, match="init_distributed"):
        HaloExchange(plan)
    with pytest.raises(InputError, match="unknown backend"):
        make_backend("mpi")
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)  # as if CuPy were not installed
    with pytest.raises(DistributedError, match="egnn\\[cupy\\]"):
        make_backend("cupy")


def test_phase_timer_splits_compute_from_communication():
    t = PhaseTimer()
    with t.phase("pack"):
        pass
    t.add("sendrecv", 0.25)
    t.add("step", 1.0)
    s = t.summary()["seconds"]
    assert s["sendrecv"] == 0.25 and 0 <= s["pack"] < 0.25
    assert abs(s["compute"] + s["comm"] - 1.0) < 1e-12


def test_distributed_setup_errors(monkeypatch):
    from egnn.distributed import ProfilerWindow, init_distributed

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DistributedError, match="torchrun"):
        init_distributed()
    w = ProfilerWindow("2:4")
    assert (w.start, w.stop) == (2, 4)
    for bad in ("4:2", "x", "1:2:3"):
        with pytest.raises(EgnnError, match="EGNN_CUDA_PROFILE"):
            ProfilerWindow(bad)


def _cupy_worker(rank, port, out):
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from egnn.comm import CupyBackend
    from egnn.distributed import init_distributed

    init_distributed(backend="nccl", timeout_s=60)
    b = CupyBackend()
    res = {}
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(5, 4, 3, device="cuda").to(dtype)
        got = torch.empty_like(x)
        b.sendrecv([(0, x)], [(0, got)])  # a rank may send to itself inside one NCCL group
        torch.cuda.synchronize()
        res[str(dtype)] = bool(torch.equal(got, x))
    with open(out, "w") as f:
        json.dump(res, f)


@pytest.mark.gpu
def test_cupy_backend_round_trip_on_cuda(tmp_path):
    """Needs CUDA and the cupy extra (pip install 'egnn[cupy]')."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_cupy_worker, args=(port, str(tmp_path / "r.json")), nprocs=1, start_method="spawn")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res and all(res.values()), res
