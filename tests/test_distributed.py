"""The distributed model against the single-process model: gloo on CPU, 4 spawned processes.

One world of 4 ranks runs everything once (subgroups of 2 and 3 give the smaller worlds) and each
rank writes what it measured; the tests below read those records. A second, deliberately broken
world (WORLD_SIZE 3, only 2 processes) must fail with DistributedError within its timeout."""
import json
import os
import socket
import time
import traceback

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.distributed

WORLDS = (2, 3, 4)
METHODS = ("low-nn", "metis", "linear")
BASIS = {"Si": "sp", "C": "sp"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def structure_atoms():
    """16-atom SiC, cell 8.72 x 4.36 x 4.36 Å with r_cut 3.5 Å > half the short cell vectors: an atom
    reaches the same neighbour through two periodic images, across rank boundaries."""
    from ase.build import bulk

    atoms = bulk("SiC", "zincblende", 4.36, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    return atoms


def structure():
    from egnn.graph import radius_graph

    return radius_graph(structure_atoms(), 3.5)


def two_clusters():
    """Two far-apart open clusters of 4 atoms (no edge joins them)."""
    from ase import Atoms

    from egnn.graph import radius_graph

    a = np.array([[0, 0, 0], [1.5, 0, 0], [0, 1.5, 0], [0, 0, 1.5]], dtype=float)
    return radius_graph(Atoms("SiCSiC" + "SiCSiC", positions=np.concatenate([a, a + 20.0]), pbc=False), 2.5)


def make_model(dtype, seed=0):
    from egnn.basis import OrbitalBasis
    from egnn.model import HamiltonianModel, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(basis=OrbitalBasis.explicit(BASIS), r_cut=3.5, lmax=2, mmax=2, channels=4, layers=2,
                      heads=2, hidden=8, num_rbf=8, onsite="node+edges", node_head_input="all",
                      reference="two_centre")
    m = HamiltonianModel(cfg).to(dtype)
    with torch.no_grad():  # non-trivial output statistics and reference, so the buffers matter too
        m.node_shift.uniform_(-1, 1)
        m.edge_scale.uniform_(0.5, 2)
        for b in (m.reference.edge_weight, m.reference.node_weight, m.reference.node_bias):
            b.uniform_(-1, 1)
    return m


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300)) if b.numel() else 0.0


_REF = {}


def _check_model(graph, parts, group, dtype, name="sic") -> dict:
    """Outputs and all parameter gradients of the distributed model vs the single-process model,
    for the loss sum(W * outputs) with fixed random weights W."""
    import torch.distributed as dist

    from egnn.comm import HaloExchange, HaloPlan
    from egnn.distributed import local_inputs, world

    rank, size = world(group)
    m = make_model(dtype)
    sp = torch.as_tensor(m.basis.species_index(graph.numbers))
    vec = torch.as_tensor(graph.vec, dtype=dtype)
    if (name, dtype) not in _REF:  # the single-process reference does not depend on the partition
        node, edge = m(sp, torch.as_tensor(graph.src), torch.as_tensor(graph.dst), vec)
        gen = torch.Generator().manual_seed(11)
        wn = torch.randn(node.shape, generator=gen, dtype=torch.float64).to(dtype)
        we = torch.randn(edge.shape, generator=gen, dtype=torch.float64).to(dtype)
        ((node * wn).sum() + (edge * we).sum()).backward()
        _REF[name, dtype] = (node.detach(), edge.detach(), wn, we, {n: p.grad.clone() for n, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
    node, edge, wn, we, ref = _REF[name, dtype]

    plan = HaloPlan.build(graph, parts, rank, size)
    ln, le = m(*local_inputs(plan, sp, vec), exchange=HaloExchange(plan, "torch", group))
    own, edges = torch.as_tensor(plan.owned), torch.as_tensor(plan.edges)
    ln = ln[:plan.num_owned]
    ((ln * wn[own]).sum() + (le * we[edges]).sum()).backward()
    out = {"node": _rel(ln, node[own]), "edge": _rel(le, edge[edges])}
    # relative per parameter; a parameter whose exact gradient is zero (the attention-logit bias:
    # softmax ignores a shift) holds rounding noise only, so it is measured against the largest
    # gradient instead of against itself
    ref64 = _REF[name, torch.float64][4]
    top = max(float(g.abs().max()) for g in ref64.values())
    zero = {n for n, g in ref64.items() if float(g.abs().max()) < 1e-9 * top}
    assert len(zero) < len(ref64) // 4
    scale = max(float(g.abs().max()) for g in ref.values())
    grad = diff = 0.0
    for n, p in m.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        d = float((g - ref[n]).abs().max())
        grad, diff = max(grad, d / (scale if n in zero else float(ref[n].abs().max()))), max(diff, d)
    out["grad"] = grad  # worst per-parameter relative error
    out["grad_global"] = diff / scale  # worst error relative to the largest gradient
    out["halo"] = plan.num_halo
    return out


def _check_predict(graph, parts, group) -> float | None:
    from egnn.distributed import predict_distributed, world

    m = make_model(torch.float64).eval()
    node, edge = predict_distributed(m, graph, parts, group=group)
    if world(group)[0] != 0:
        return None
    rn, re = _REF["sic", torch.float64][:2]  # the same model's single-process outputs
    assert node.shape == rn.shape and edge.shape == re.shape
    return max(_rel(node, rn), _rel(edge, re))


def _sample(graph, model, folded: bool, dtype=torch.float64):
    from egnn.train import Sample

    gen = torch.Generator().manual_seed(5)
    n, e = graph.num_nodes, graph.num_edges
    K, cn, ce = (model.L_max + 1) ** 2, model.node_shift.shape[1], model.edge_scale.shape[1]
    fold = fold_node = None
    if folded:  # Γ-only: one target per (dst, src) pair, images summed, (i, i) pairs get the node block
        keys = np.concatenate([graph.dst * n + graph.src, np.arange(n) * (n + 1)])
        uniq, inv = np.unique(keys, return_inverse=True)
        fold, fold_node = torch.as_tensor(inv[:e]), torch.as_tensor(inv[e:])
        e = len(uniq)
    return Sample(name="folded" if folded else "sic", species=torch.as_tensor(model.basis.species_index(graph.numbers)),
                  src=torch.as_tensor(graph.src), dst=torch.as_tensor(graph.dst),
                  edge_vec=torch.as_tensor(graph.vec, dtype=dtype),
                  node_target=torch.randn(n, K, cn, generator=gen, dtype=dtype),
                  node_mask=torch.rand(n, K, cn, generator=gen) < 0.7,
                  edge_target=torch.randn(e, K, ce, generator=gen, dtype=dtype),
                  edge_mask=torch.rand(e, K, ce, generator=gen) < 0.7, fold=fold, fold_node=fold_node,
                  meta={"graph": graph})


def _check_trainer(graph, group, outdir, folded) -> dict:
    """One DistributedTrainer epoch (forward, loss, backward, gradient all-reduce, clip, AdamW) gives
    the loss and the parameters of the single-process Trainer."""
    from egnn.distributed import DistributedTrainer, world
    from egnn.train import TRAIN_DEFAULTS, Trainer

    cfg = dict(TRAIN_DEFAULTS, device="cpu", grad_clip=0.5, lr=1e-2, ema_decay=0.5)
    rank = world(group)[0]
    # every rank starts from another init: the trainer must broadcast rank 0's
    single, multi = make_model(torch.float64, seed=100), make_model(torch.float64, seed=rank + 100)
    s = _sample(graph, single, folded)
    t1 = Trainer(single, [s], [], cfg, os.path.join(outdir, f"single{rank}"), log=lambda *a: None)
    t2 = DistributedTrainer(multi, [s], [], cfg, os.path.join(outdir, f"multi{world(group)[1]}"),
                            partition={"method": "low-nn"}, group=group)
    l1 = t1.compute(s)[0].item()
    l2 = t2.compute(s)[0].item()
    r1, r2 = t1.train_epoch(1, progress=False), t2.train_epoch(1, progress=False)
    par = max(_rel(a, b) for a, b in zip(t2.model.parameters(), t1.model.parameters()))
    t1.train_epoch(2, progress=False), t2.train_epoch(2, progress=False)  # the EMA averages from its 2nd step
    with t1.averaged(), t2.averaged():
        ema = max(_rel(a, b) for a, b in zip(t2.model.parameters(), t1.model.parameters()))
    return {"loss": abs(l1 - l2) / abs(l1), "epoch_loss": abs(r1["loss"] - r2["loss"]) / abs(r1["loss"]),
            "mae": abs(r1["mae_meV"] - r2["mae_meV"]) / r1["mae_meV"], "params": par, "ema": ema}


def _worker(rank, world_size, port, outdir, port2=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rec = {}
    try:
        import torch.distributed as dist

        from egnn.comm import HaloExchange, build_plans
        from egnn.distributed import init_distributed
        from egnn.errors import DistributedError
        from egnn.partition import partition

        t0 = time.time()
        init_distributed(timeout_s=120)
        rec["_init_s"] = time.time() - t0
        groups = {4: None, 3: dist.new_group([0, 1, 2]), 2: dist.new_group([0, 1])}
        graph = structure()
        for w in WORLDS:
            if rank >= w:
                continue
            g = groups[w]
            for method in METHODS:
                rec[f"_t{w}{method}"] = time.time()
                parts = partition(graph, w, method)
                rec[f"{w}/{method}/float64"] = _check_model(graph, parts, g, torch.float64)
                rec[f"{w}/{method}/predict"] = _check_predict(graph, parts, g)
            rec[f"{w}/low-nn/float32"] = _check_model(graph, partition(graph, w, "low-nn"), g, torch.float32)
            rec[f"_t{w}trainer"] = time.time()
            for folded in {2: (), 3: (False, True), 4: (False,)}[w]:
                rec[f"{w}/trainer/{folded}"] = _check_trainer(graph, g, outdir, folded)
            if w == 3:  # cluster A over ranks 0 and 1; rank 2 owns cluster B: no halo, nothing to send
                rec["3/nohalo"] = _check_model(two_clusters(), np.array([0, 0, 1, 1, 2, 2, 2, 2]), g,
                                               torch.float64, "clusters")
            # a plan made for another world size is refused before any communication
            other = build_plans(graph, partition(graph, w + 1, "linear"), w + 1)[rank]
            try:
                HaloExchange(other, "torch", g)
                rec[f"{w}/mismatch"] = "accepted"
            except DistributedError as exc:
                rec[f"{w}/mismatch"] = f"DistributedError: {exc}"
        # egnn predict under torchrun: every rank writes the rows of the atoms it owns (small chunks:
        # several parts per rank), rank 0 the index; the parent compares with one process
        from egnn.predict import predict_to_files

        m = make_model(torch.float64).eval()
        rep = predict_to_files(m, structure_atoms(), os.path.join(outdir, "rows4"), "sic", ("rows",), edge_chunk=40,
                               partition="low-nn", check_memory=False)
        rec["rows4"] = None if rep is None else rep["files"]
        # a check before work that fails on one rank only (e.g. its free memory) stops every rank
        from egnn.distributed import agree
        from egnn.errors import InputError

        def check():
            if rank == 2:
                raise InputError("not enough memory here")

        try:
            agree(check)
            rec["agree"] = "passed"
        except InputError as exc:
            rec["agree"] = str(exc)
        agree(lambda: None)
        rec["agree_ok"] = True
        rec["_tend"] = time.time()
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # recorded for the assertions in the parent
        rec["error"] = traceback.format_exc()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)
    if port2 is not None and rank < 2:
        _missing_rank_worker(rank, 2, port2, outdir)


def _missing_rank_worker(rank, world_size, port, outdir):
    """Claims a world of 3 but only 2 processes exist."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="3",
                      LOCAL_RANK=str(rank))
    t0 = time.time()
    try:
        import torch.distributed as dist

        from egnn.distributed import init_distributed

        init_distributed(timeout_s=4)
        dist.barrier()
        out = {"error": None}
    except Exception as exc:
        from egnn.errors import EgnnError

        out = {"error": type(exc).__name__, "egnn": isinstance(exc, EgnnError), "msg": str(exc)}
    out["seconds"] = time.time() - t0
    with open(os.path.join(outdir, f"missing{rank}.json"), "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Spawn the world of 4 once; afterwards ranks 0 and 1 try to join a world of 3 that never fills."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(4, _free_port(), str(out), _free_port()), nprocs=4,
                             start_method="spawn", join=False)
    deadline = time.time() + 600  # a hang guard, not a timing check: the ranks' own timeouts are far shorter
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the distributed test world hung")
    return out


@pytest.fixture(scope="module")
def records(run_dir):
    recs = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(4)]
    for r, rec in enumerate(recs):
        assert "error" not in rec, f"rank {r}:\n{rec['error']}"
    return recs


def test_structure_has_doubly_crossing_periodic_edges():
    from egnn.partition import partition

    g = structure()
    periodic = g.shift.any(axis=1)
    pairs, counts = np.unique(g.dst * g.num_nodes + g.src, return_counts=True)
    assert (counts >= 2).any()  # some atom pairs are joined through two or more images
    parts = partition(g, 4, "low-nn")
    assert (periodic & (parts[g.src] != parts[g.dst])).sum() > 0
    multi = pairs[counts >= 2]
    assert (parts[multi % g.num_nodes] != parts[multi // g.num_nodes]).any()


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_gradients_match_single_process(records, w, method):
    for r in range(w):
        rec = records[r][f"{w}/{method}/float64"]
        assert rec["halo"] > 0
        assert rec["node"] <= 1e-10 and rec["edge"] <= 1e-10, rec
        assert rec["grad"] <= 1e-10, rec


def test_rank_without_halo(records):
    recs = [records[r]["3/nohalo"] for r in range(3)]
    assert recs[2]["halo"] == 0 and recs[0]["halo"] > 0
    for rec in recs:
        assert max(rec["node"], rec["edge"], rec["grad"]) <= 1e-10, rec


@pytest.mark.parametrize("w", WORLDS)
def test_float32_matches_single_process(records, w):
    for r in range(w):
        rec = records[r][f"{w}/low-nn/float32"]
        # per parameter, float32 sums in another order differ by up to ~3e-5 of a gradient that
        # cancels; against the gradient's scale the difference is rounding
        assert max(rec["node"], rec["edge"], rec["grad_global"]) <= 1e-5, rec
        assert rec["grad"] <= 1e-3, rec


@pytest.mark.parametrize("w", WORLDS)
@pytest.mark.parametrize("method", METHODS)
def test_assembled_prediction_equals_single_process(records, w, method):
    assert records[0][f"{w}/{method}/predict"] <= 1e-12
    assert all(records[r][f"{w}/{method}/predict"] is None for r in range(1, w))


@pytest.mark.parametrize("w,folded", [(3, False), (3, True), (4, False)])
def test_distributed_trainer_step_equals_trainer(records, w, folded):
    for r in range(w):
        rec = records[r][f"{w}/trainer/{folded}"]
        # the Trainer takes the loss in float32 whatever the model dtype, hence 1e-6
        assert rec["loss"] <= 1e-6 and rec["epoch_loss"] <= 1e-6 and rec["mae"] <= 1e-6, rec
        assert rec["params"] <= 1e-8 and rec["ema"] <= 1e-8, rec  # train.ema_decay: the same averaged weights


@pytest.mark.parametrize("w", WORLDS)
def test_plan_of_another_world_size_is_refused(records, w):
    for r in range(w):
        msg = records[r][f"{w}/mismatch"]
        assert msg.startswith("DistributedError") and f"built for {w + 1} ranks" in msg


def test_rank_written_rows_equal_the_single_process_files(records, run_dir, tmp_path, monkeypatch):
    """Each of 4 ranks wrote its own rows; reassembled they equal one process's prediction."""
    from egnn.io.rows import iter_parts, load_rows, read_index
    from egnn.predict import predict_to_files

    assert all(records[r]["rows4"] is None for r in range(1, 4)) and records[0]["rows4"]
    folder = run_dir / "rows4" / "sic_H.rows"
    index = read_index(str(folder))
    assert sorted({p["rank"] for p in index["parts"]}) == [0, 1, 2, 3]
    seen = np.concatenate([b.rows for b in iter_parts(str(folder))])
    assert np.array_equal(np.sort(seen), np.arange(index["n_orbitals"]))  # every row exactly once
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    m = make_model(torch.float64).eval()
    predict_to_files(m, structure_atoms(), str(tmp_path), "sic", ("rows",), edge_chunk=40, check_memory=False)
    single, multi = load_rows(str(tmp_path / "sic_H.rows")), load_rows(str(folder))
    assert set(single) == set(multi)
    scale = max(abs(M).max() for M in single.values())
    for R in single:
        assert abs(single[R] - multi[R]).max() <= 1e-10 * scale


def test_a_check_that_fails_on_one_rank_stops_every_rank(records):
    """egnn predict's memory check under torchrun: each rank sees its own free memory; if one refuses,
    all refuse (with that rank's message) instead of the others waiting for it."""
    assert records[2]["agree"] == "not enough memory here"
    assert all(records[r]["agree"] == "rank 2: not enough memory here" for r in (0, 1, 3))
    assert all(rec["agree_ok"] for rec in records)


def test_missing_rank_fails_with_egnn_error_within_timeout(run_dir):
    # the fixture's join returned, so no rank hung; each must have raised DistributedError
    for r in range(2):
        out = json.loads((run_dir / f"missing{r}.json").read_text())
        assert out["error"] == "DistributedError" and out["egnn"], out
        assert "WORLD_SIZE=3" in out["msg"]


def test_eigenvalue_loss_is_refused_before_joining_a_group():
    """It needs whole structures on one process: refused with the fix, before any process group."""
    from egnn.distributed import DistributedTrainer
    from egnn.errors import ConfigError

    with pytest.raises(ConfigError, match="under torchrun set train.eig_weight: 0"):
        DistributedTrainer(None, [], [], {"eig_weight": 0.1}, "unused")
    assert not torch.distributed.is_initialized()
