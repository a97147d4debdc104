"""Distributed training and inference on PyTorch's own engine (torchrun on one node, SLURM on many).

Each rank owns the atoms its partition gives it and every edge whose dst it owns (a block of rows
of H). It runs the unchanged HamiltonianModel on its local graph (owned atoms, then halo atoms),
with `exchange` = a HaloExchange that refreshes the halo rows before every message-building
gather. Node outputs are valid on owned rows, edge outputs on all local edges.

Training: the loss is the global L1 + L2 loss (the sums of each rank's rows, all-reduced, over the
global element count); every rank back-propagates its own share and the parameter gradients are
summed with one all-reduce at the end of backward, so each rank takes the single-process step.
Inference: `output_chunks` gives each rank the outputs of the rows it owns, chunk by chunk, with
the outputs of their edges' reverse edges (needed to symmetrise H; the ones another rank computes
arrive in one point-to-point exchange), so `egnn predict` under torchrun writes every rank's own
rows and no rank holds the whole H. `predict_distributed` gathers the raw outputs on one rank (tests,
small structures).

Environment: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them;
EGNN_DIST_TIMEOUT (seconds, default 300) bounds every rendezvous and collective, so a missing rank
is an EgnnError instead of a hang; EGNN_CUDA_PROFILE="A:B" calls cudaProfilerStart before step A and
cudaProfilerStop after step B-1 (for `nsys --capture-range=cudaProfilerApi`).
"""
from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .comm import HaloExchange, HaloPlan, PhaseTimer, build_plans
from .errors import ConfigError, DistributedError, EgnnError
from .train import Sample, Trainer, fold_edges

__all__ = ["DistInfo", "init_distributed", "world", "agree", "local_inputs", "local_sample", "check_plans",
           "partition_sample", "DistributedTrainer", "predict_distributed", "output_chunks", "timing_report",
           "ProfilerWindow",
           "PARTITION_KEYS"]

PARTITION_KEYS = {"method", "cache", "backend"}


# ----------------------------------------------------------------------------- process group
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _timeout(timeout_s) -> datetime.timedelta:
    if timeout_s is None:
        timeout_s = os.environ.get("EGNN_DIST_TIMEOUT", "300")
    try:
        t = float(timeout_s)
    except ValueError:
        raise ConfigError(f"EGNN_DIST_TIMEOUT must be a number of seconds, got {timeout_s!r}") from None
    if not t > 0:
        raise ConfigError(f"the distributed timeout must be > 0 s, got {t}")
    return datetime.timedelta(seconds=t)


def init_distributed(backend: str | None = None, timeout_s: float | None = None, device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (NCCL with CUDA, gloo otherwise).
    Idempotent. A rank that never arrives, or a WORLD_SIZE that the launched ranks do not fill,
    raises DistributedError after the timeout instead of hanging."""
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; install a torch with distributed support")
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistributedError(f"distributed run: environment variable(s) {missing} not set; launch with "
                                   "`torchrun --nproc-per-node N -m egnn ...` (or srun with those variables)")
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        backend = backend or ("nccl" if use_cuda else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # NCCL p2p hangs without it
        try:
            dist.init_process_group(backend, timeout=_timeout(timeout_s))
        except (RuntimeError, TimeoutError, ValueError) as exc:  # DistStoreError is a RuntimeError
            raise DistributedError(
                f"distributed run: could not form the process group of WORLD_SIZE={os.environ['WORLD_SIZE']} "
                f"(rank {os.environ['RANK']}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}) "
                f"within the timeout: a rank is missing or the world size is wrong ({exc}). Check "
                "--nproc-per-node/--nnodes, or raise EGNN_DIST_TIMEOUT") from None
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def world(group=None) -> tuple[int, int]:
    """(rank, world size) of `group`, or (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _collective(fn, what: str):
    try:
        return fn()
    except (RuntimeError, TimeoutError) as exc:
        raise DistributedError(f"distributed run: {what} failed or timed out ({exc}); a rank died or "
                               "is stuck elsewhere. Check the other ranks' logs") from None


def agree(check, group=None) -> None:
    """Run `check()` on every rank and share the outcome: if it raised an EgnnError on any rank, every
    rank raises it (the lowest failing rank's error; other ranks name that rank), so no rank goes on
    alone to wait for peers that stopped. Without a process group it is just `check()`."""
    rank, size = world(group)
    if size == 1:
        return check()
    try:
        check()
        mine = None
    except EgnnError as exc:
        mine = exc
    got = [None] * size
    _collective(lambda: dist.all_gather_object(got, mine, group=group), "sharing the checks before work")
    failed = [(r, e) for r, e in enumerate(got) if e is not None]
    if failed:
        r, exc = failed[0]
        raise exc if r == rank else type(exc)(f"rank {r}: {exc}")


def check_plans(plan: HaloPlan, group=None) -> None:
    """All ranks hold plans of the same structure, partition and world, each its own rank's plan."""
    rank, size = world(group)
    plan.validate(size, rank)
    got = [None] * size
    _collective(lambda: dist.all_gather_object(got, (plan.key, plan.rank, plan.world_size), group=group),
                "checking the halo plans")
    keys = {g[0] for g in got}
    if len(keys) != 1 or [g[1] for g in got] != list(range(size)):
        raise DistributedError(f"halo plans differ between ranks ({got}); every rank must build its plan "
                               "from the same graph and partition (delete a stale plan cache)")


# ----------------------------------------------------------------------------- local graphs
def local_inputs(plan: HaloPlan, species, edge_vec, device=None):
    """(species, src, dst, edge_vec) of the rank's local graph, as tensors on `device`."""
    species = torch.as_tensor(species)
    edge_vec = torch.as_tensor(edge_vec)
    device = device or edge_vec.device
    nodes = torch.as_tensor(plan.nodes, device=species.device)
    edges = torch.as_tensor(plan.edges, device=edge_vec.device)
    return (species.index_select(0, nodes).to(device), torch.as_tensor(plan.src, device=device),
            torch.as_tensor(plan.dst, device=device), edge_vec.index_select(0, edges).to(device))


def local_sample(s: Sample, plan: HaloPlan) -> Sample:
    """The rank's share of a training sample: local graph, owned node targets, owned edge targets
    (or, for Γ-only samples, the pairs (d, s) with owned d, renumbered)."""
    sp, src, dst, vec = local_inputs(plan, s.species, s.edge_vec, s.edge_vec.device)
    own = torch.as_tensor(plan.owned)
    edges = torch.as_tensor(plan.edges)
    kw = dict(name=s.name, species=sp, src=src, dst=dst, edge_vec=vec, node_target=s.node_target[own],
              node_mask=s.node_mask[own], meta=dict(s.meta))
    if s.fold is None:
        kw.update(edge_target=s.edge_target[edges], edge_mask=s.edge_mask[edges])
    else:  # all images of a pair (d, s) and the pair (d, d) belong to d's owner
        ids = torch.cat([s.fold[edges], s.fold_node[own]])
        pairs, inv = torch.unique(ids, return_inverse=True)
        kw.update(edge_target=s.edge_target[pairs], edge_mask=s.edge_mask[pairs], fold=inv[:len(edges)],
                  fold_node=inv[len(edges):])
    return Sample(**kw)


def partition_sample(s: Sample, nparts: int, method: str, r_cut: float) -> np.ndarray:
    """Rank of every atom of a sample. low-nn needs the geometry: s.meta['graph'] (an AtomGraph) or
    s.meta positions/cell/pbc; metis and linear need only the edges."""
    from types import SimpleNamespace

    from .partition import METHODS, partition

    if method not in METHODS:
        raise ConfigError(f"partition.method must be one of {', '.join(METHODS)}, got {method!r}")
    g = s.meta.get("graph")
    if g is None:
        src, dst = s.src.cpu().numpy(), s.dst.cpu().numpy()
        deg = np.bincount(dst, minlength=s.num_nodes)
        geo = {k: s.meta.get(k) for k in ("positions", "cell", "pbc")}
        if method == "low-nn" and any(v is None for v in geo.values()):
            raise ConfigError(f"partition.method low-nn needs the atom positions of sample {s.name!r} "
                              "(Sample.meta['graph'] or meta positions/cell/pbc); use metis or linear, or "
                              "keep the geometry in the samples")
        g = SimpleNamespace(src=src, dst=dst, num_nodes=s.num_nodes, degree=deg, r_cut=r_cut,
                            **{k: np.asarray(v) for k, v in geo.items() if v is not None})
    return np.asarray(partition(g, nparts, method), dtype=np.int64)


# ----------------------------------------------------------------------------- profiler window
class ProfilerWindow:
    """EGNN_CUDA_PROFILE="A:B": cudaProfilerStart before step A, cudaProfilerStop before step B (0-based
    steps counted by `step()`), so nsys --capture-range=cudaProfilerApi records steady-state steps only."""

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("EGNN_CUDA_PROFILE", "") if spec is None else spec
        self.start = self.stop = None
        if spec:
            try:
                a, b = (int(v) for v in spec.split(":"))
            except ValueError:
                raise ConfigError(f"EGNN_CUDA_PROFILE must be 'START:STOP' steps, e.g. '5:10', got {spec!r}") from None
            if not 0 <= a < b:
                raise ConfigError(f"EGNN_CUDA_PROFILE: need 0 <= START < STOP, got {spec!r}")
            self.start, self.stop = a, b
        self.count = 0
        self.active = False

    def step(self) -> None:
        """Call before every step."""
        if self.start is not None and torch.cuda.is_available():
            if self.count == self.start:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                self.active = True
            elif self.count == self.stop and self.active:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                self.active = False
        self.count += 1

    def close(self) -> None:
        if self.active:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            self.active = False


# ----------------------------------------------------------------------------- timing report
def timing_report(timer: PhaseTimer, path: str | None = None, group=None, log=print, extra: dict | None = None):
    """Gather every rank's phase times and bytes; rank 0 prints a table and writes JSON to `path`.
    Returns the list of per-rank summaries on rank 0 (None elsewhere)."""
    rank, size = world(group)
    mine = {"rank": rank, **timer.summary(), **(extra or {})}
    if size > 1:
        got = [None] * size
        _collective(lambda: dist.all_gather_object(got, mine, group=group), "gathering the timing report")
    else:
        got = [mine]
    if rank != 0:
        return None
    lines = [f"{'rank':>4} {'pack s':>9} {'sendrecv s':>11} {'unpack s':>9} {'compute s':>10} "
             f"{'sent MiB':>9} {'recv MiB':>9}"]
    for g in got:
        s = g["seconds"]
        lines.append(f"{g['rank']:>4} {s.get('pack', 0):>9.4f} {s.get('sendrecv', 0):>11.4f} "
                     f"{s.get('unpack', 0):>9.4f} {s.get('compute', 0):>10.4f} {g['bytes_sent'] / 2**20:>9.3f} "
                     f"{g['bytes_recv'] / 2**20:>9.3f}")
    log("per-rank timing (forward + backward exchanges)\n" + "\n".join(lines))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"world_size": size, "ranks": got}, f, indent=1)
    return got


# ----------------------------------------------------------------------------- training
class DistributedTrainer(Trainer):
    """Trainer whose every step runs each rank's share of the structure with halo exchanges.

    partition: {method: low-nn | metis | linear, cache: DIR (optional: parts saved per structure
    and world size), backend: torch | cupy}. Each structure is partitioned once (rank 0 computes,
    the others receive the same parts) and its plan and local sample are kept for the run.
    Rank 0 writes checkpoints and metrics; other ranks write metrics under output/rank<r>/."""

    def __init__(self, model, train, val, cfg, output, partition: dict | None = None, device=None,
                 config_dict=None, log=print, group=None, timer: PhaseTimer | None = None):
        if float(cfg.get("eig_weight", 0)):
            raise ConfigError("train.eig_weight (the Γ-eigenvalue loss) needs each structure whole on one process; "
                              "under torchrun set train.eig_weight: 0")
        info = init_distributed(device=cfg.get("device", "auto"))  # a no-op when already initialised
        if device is None and info.device.type == "cuda":
            device = info.device  # cuda:LOCAL_RANK, not every rank on cuda:0
        partition = dict(partition or {})
        unknown = set(partition) - PARTITION_KEYS
        if unknown:
            raise ConfigError(f"unknown key(s) partition.{sorted(unknown)}; allowed: {sorted(PARTITION_KEYS)}")
        self.group = group
        self.rank, self.world_size = world(group)
        self.method = partition.get("method", "low-nn")
        self.cache_dir = partition.get("cache")
        self.backend = partition.get("backend", "torch")
        self.timer = timer or PhaseTimer(sync=os.environ.get("EGNN_TIMING_SYNC", "0") == "1")
        self.profile = ProfilerWindow()
        self._plans: dict[str, tuple[HaloPlan, HaloExchange, Sample]] = {}
        self._by_name = {s.name: s for s in list(train) + list(val)}
        self._t_step = None
        out = output if self.rank == 0 else os.path.join(output, f"rank{self.rank}")
        super().__init__(model, train, val, cfg, out, device=device, config_dict=config_dict,
                         log=log if self.rank == 0 else (lambda *a, **k: None))
        self.root_output = output
        self._broadcast_state()

    def _broadcast_state(self):
        """Identical parameters and buffers everywhere (rank 0's), whatever each rank's seed."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            _collective(lambda t=t: dist.broadcast(t.data, src, group=self.group), "broadcasting the model")

    # -- partition, plan and local sample of a (possibly collated) sample, once per structure
    def _parts(self, s: Sample) -> np.ndarray:
        names = s.name.split("+")
        if s.name not in self._by_name and all(n in self._by_name for n in names) and \
                sum(self._by_name[n].num_nodes for n in names) == s.num_nodes:
            return np.concatenate([self._parts(self._by_name[n]) for n in names])  # each structure split
        path = None
        if self.cache_dir:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.name)
            path = os.path.join(self.cache_dir, f"{safe}.{self.method}.{self.world_size}.npy")
        parts = None
        if self.rank == 0:
            if path and os.path.isfile(path):
                parts = np.load(path)
                if parts.shape != (s.num_nodes,):
                    parts = None  # stale cache entry of another structure with this name
            if parts is None:
                parts = partition_sample(s, self.world_size, self.method, self.model.config.r_cut)
                if path:
                    os.makedirs(self.cache_dir, exist_ok=True)
                    np.save(path + ".tmp.npy", parts)
                    os.replace(path + ".tmp.npy", path)
        box = [parts]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        _collective(lambda: dist.broadcast_object_list(box, src=src, group=self.group), "sharing the partition")
        return box[0]

    def local(self, s: Sample) -> tuple[HaloPlan, HaloExchange, Sample]:
        if s.name not in self._plans:
            from types import SimpleNamespace

            parts = self._parts(s)
            g = SimpleNamespace(src=s.src.cpu().numpy(), dst=s.dst.cpu().numpy(), num_nodes=s.num_nodes)
            plan = HaloPlan.build(g, parts, self.rank, self.world_size)
            ex = HaloExchange(plan, self.backend, self.group, self.timer)
            check_plans(plan, self.group)
            self._plans[s.name] = (plan, ex, self._to(local_sample(s, plan)))
        return self._plans[s.name]

    # -- one step
    def compute(self, s: Sample):
        self.profile.step()
        self._t_step = time.perf_counter()
        plan, ex, loc = self.local(s)
        with self._autocast():
            node, edge = self.model(loc.species, loc.src, loc.dst, loc.edge_vec, exchange=ex)
        node, edge = node[:plan.num_owned].float(), edge.float()
        if loc.fold is not None:
            edge = fold_edges(loc, node, edge)
        en = (node - loc.node_target)[loc.node_mask]
        ee = (edge - loc.edge_target)[loc.edge_mask]
        sums = [en.abs().sum(), ee.abs().sum(), en.square().sum(), ee.square().sum()]
        stats = torch.stack([t.detach().double() for t in sums] +
                            [torch.tensor(float(en.numel()), dtype=torch.float64, device=en.device),
                             torch.tensor(float(ee.numel()), dtype=torch.float64, device=en.device)])
        _collective(lambda: dist.all_reduce(stats, group=self.group), "all-reducing the loss")
        l1, l2, w = self.cfg["l1"], self.cfg["l2"], float(self.cfg["node_weight"])
        n = max(float(w * stats[4] + stats[5]), 1.0)
        mine = (l1 * (w * sums[0] + sums[1]) + l2 * (w * sums[2] + sums[3])) / n
        everyone = (l1 * (w * stats[0] + stats[1]) + l2 * (w * stats[2] + stats[3])).to(mine.dtype) / n
        total = mine + (everyone - mine.detach())  # value: the global loss; gradient: this rank's share
        if not total.requires_grad:  # evaluation: no backward, so the step ends here
            self._end_step()
        return total, {"node_abs": float(stats[0]), "node_n": int(stats[4]), "edge_abs": float(stats[1]),
                       "edge_n": int(stats[5])}

    def after_backward(self) -> None:
        self.sync_grads()

    def sync_grads(self) -> None:
        """Sum parameter gradients over ranks in one flat all-reduce (missing grads count as zero)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        _collective(lambda: dist.all_reduce(flat, group=self.group), "all-reducing the gradients")
        off = 0
        for p in params:
            g = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        self._end_step()

    def _end_step(self):
        if self._t_step is not None:
            self.timer.add("step", time.perf_counter() - self._t_step)
            self._t_step = None

    def save(self, path: str) -> None:
        if self.rank == 0:
            super().save(path)

    def fit(self, epochs: int | None = None, progress: bool = True) -> dict:
        try:
            return super().fit(epochs, progress and self.rank == 0)
        finally:
            self.profile.close()
            timing_report(self.timer, os.path.join(self.root_output, "timing.json"), self.group, self.log)


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_distributed(model, graph, parts, species=None, *, group=None, backend="torch", device=None,
                        dtype=None, timer: PhaseTimer | None = None, dst: int = 0):
    """Every rank predicts its rows; rank `dst` (of `group`) returns the full (node [N, K, Cn],
    edge [E, K, Ce]) outputs in the global graph's order, equal to model(...) on one process; the
    other ranks return (None, None). `graph`: an AtomGraph (every rank holds the global graph, as it
    does to build the plans); `species` defaults to model.basis.species_index(graph.numbers)."""
    rank, size = world(group)
    if species is None:
        species = model.basis.species_index(graph.numbers)
    if not 0 <= dst < size:
        raise DistributedError(f"predict_distributed: dst rank {dst} is outside the world of {size}")
    parts = np.asarray(parts)
    plans = build_plans(graph, parts, size) if rank == dst else [HaloPlan.build(graph, parts, rank, size)]
    plan = plans[rank] if rank == dst else plans[0]
    p0 = next(model.parameters())
    device = device or p0.device
    dtype = dtype or p0.dtype
    vec = torch.as_tensor(np.asarray(graph.vec), dtype=dtype)
    sp, src, dstl, v = local_inputs(plan, torch.as_tensor(np.asarray(species), dtype=torch.long), vec, device)
    ex = HaloExchange(plan, backend, group, timer)
    if size > 1:
        check_plans(plan, group)  # same structure and partition everywhere, or an error (not a hang)
    node, edge = model(sp, src, dstl, v, exchange=ex)
    node = node[:plan.num_owned].contiguous()
    edge = edge.contiguous()
    if size == 1:
        return node, edge
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    if rank != dst:
        for t in (node, edge):
            if t.shape[0]:
                _collective(lambda t=t: dist.send(t, peer(dst), group=group), "sending predictions to rank 0")
        return None, None
    full_node = node.new_empty((plan.num_nodes,) + tuple(node.shape[1:]))
    full_edge = edge.new_empty((plan.num_edges,) + tuple(edge.shape[1:]))
    for r, pr in enumerate(plans):
        if r == dst:
            n_r, e_r = node, edge
        else:
            n_r = node.new_empty((pr.num_owned,) + tuple(node.shape[1:]))
            e_r = edge.new_empty((len(pr.edges),) + tuple(edge.shape[1:]))
            for t in (n_r, e_r):
                if t.shape[0]:
                    _collective(lambda t=t: dist.recv(t, peer(r), group=group), f"receiving rank {r}'s predictions")
        full_node[torch.as_tensor(pr.owned, device=device)] = n_r
        full_edge[torch.as_tensor(pr.edges, device=device)] = e_r
    return full_node, full_edge


@torch.no_grad()
def output_chunks(model, graph, parts, edge_chunk: int, *, group=None, backend="torch", device=None, dtype=None,
                  progress: bool = False):
    """This rank's share of egnn.predict.output_chunks: `Chunk`s of the atoms it owns (global ids),
    their node outputs, their incoming edges' outputs and the outputs of those edges' reverses.
    A reverse edge (d -> s, -R) belongs to the owner of s; the outputs this rank needs from others
    (its edges with a remote src) come in one exchange, in ascending global edge id on both sides."""
    from .predict import Chunk

    rank, size = world(group)
    parts = np.asarray(parts)
    plan = HaloPlan.build(graph, parts, rank, size)
    p0 = next(model.parameters())
    device = device or p0.device
    dtype = dtype or p0.dtype
    species = model.basis.species_index(graph.numbers)
    vec = torch.as_tensor(np.asarray(graph.vec), dtype=dtype)
    sp, src, dstl, v = local_inputs(plan, torch.as_tensor(np.asarray(species), dtype=torch.long), vec, device)
    ex = HaloExchange(plan, backend, group)
    if size > 1:
        check_plans(plan, group)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(model.layers) * max(1, -(-len(plan.edges) // edge_chunk)), unit="chunk", leave=False,
                   desc="[egnn predict] layers x chunks (rank 0)")
    enc = model.encode(sp, src, dstl, v, edge_chunk, exchange=ex, progress=bar.update if bar else None)
    if bar:
        bar.close()
    g_edges = plan.edges
    rev_g = graph.reverse()[g_edges]
    owner = parts[graph.src[g_edges]]  # owner of each edge's src = owner of its reverse edge
    local_rev = np.full(len(g_edges), -1, np.int64)
    mine = owner == rank
    local_rev[mine] = np.searchsorted(g_edges, rev_g[mine])
    remote_pos = np.full(len(g_edges), -1, np.int64)
    peers = [int(q) for q in np.unique(owner) if q != rank]
    sends, recvs, n_remote = {}, {}, 0
    for q in peers:
        sends[q] = np.flatnonzero(owner == q)  # our edges with src on q: q's reverses, ascending global id
        k = np.flatnonzero(owner == q)
        k = k[np.argsort(rev_g[k], kind="stable")]  # q sends them in ascending global id of its edges
        remote_pos[k] = np.arange(n_remote, n_remote + len(k))
        recvs[q] = (n_remote, len(k))
        n_remote += len(k)
    G, we = model.L_max, max(model.edge_counts)
    remote = torch.empty((n_remote, (G + 1) ** 2, we), dtype=dtype, device=device)
    send_bufs, reqs = [], []
    peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    for q in peers:
        idx = torch.as_tensor(sends[q], device=device)
        buf = torch.empty((len(idx), (G + 1) ** 2, we), dtype=dtype, device=device)
        for a in range(0, len(idx), edge_chunk):  # chunk by chunk: no transient of all boundary edges at once
            buf[a:a + edge_chunk] = model.edge_outputs(enc, idx[a:a + edge_chunk])
        send_bufs.append(buf)
        a, n = recvs[q]
        reqs.append(_collective(lambda q=q, buf=buf: dist.isend(buf, peer(q), group=group), "sending reverse edges"))
        reqs.append(_collective(lambda q=q, a=a, n=n: dist.irecv(remote[a:a + n], peer(q), group=group),
                                "receiving reverse edges"))
    for r in reqs:
        _collective(r.wait, "exchanging the outputs of reverse edges")
    del send_bufs
    local_rev_t = torch.as_tensor(local_rev, device=device)
    remote_pos_t = torch.as_tensor(remote_pos, device=device)
    for oc in model.decode(enc):
        hi = min(oc.hi, plan.num_owned)  # the last chunk also spans the halo rows: not ours
        if hi <= oc.lo and oc.b <= oc.a:
            continue
        lr = local_rev_t[oc.a:oc.b]
        rev_out = oc.edge.new_empty(oc.edge.shape)
        here = lr >= 0
        if bool(here.any()):
            rev_out[here] = model.edge_outputs(enc, lr[here])
        if bool((~here).any()):
            rev_out[~here] = remote[remote_pos_t[oc.a:oc.b][~here]]
        yield Chunk(plan.owned[oc.lo:hi], oc.node[:max(hi - oc.lo, 0)], g_edges[oc.a:oc.b], oc.edge, rev_out)
