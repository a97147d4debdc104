"""Training: config validation, output statistics, the L1 + L2 masked loss, the epoch loop with
ReduceLROnPlateau, JSON-lines metrics, checkpoints (every N epochs, the best, exact resume).

The loss is the element loss (L1 + L2 over unpadded coupled-basis elements, node blocks weighted by
`train.node_weight`) plus, with `train.eig_weight` > 0, the same L1 + L2 of the first-order Γ-level
errors of each structure (its occupied levels and `train.eig_empty` empty ones; egnn.spectral):
what the eigenvalues see of the many small far blocks, which the element loss treats as independent.

A training example is a `Sample`: one structure's graph and its coupled-basis targets with masks
(built from DFT data by `egnn.dataset`). Several samples are joined into one disjoint graph per step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint
from .errors import ConfigError, TrainingError, log, warn_once
from .model import HamiltonianModel, ModelConfig

__all__ = ["Sample", "TrainConfig", "collate", "masked_loss", "fit_output_stats", "Trainer", "load_config"]



@dataclass
class Sample:
    """One structure: graph tensors and coupled-basis targets (eV) with padding masks.

    For a Γ-only structure (image-summed H), `fold` maps every edge to its (dst, src) pair and
    `fold_node` maps every node to its pair; targets are then per pair: the sum over images of the
    edge blocks plus, for d == s, the node block. `fold` is None for real-space data.
    """

    name: str
    species: torch.Tensor  # [N] long, index into basis.elements
    src: torch.Tensor  # [E] long
    dst: torch.Tensor  # [E] long, sorted
    edge_vec: torch.Tensor  # [E, 3] float
    node_target: torch.Tensor  # [N, K, Cn]
    node_mask: torch.Tensor  # [N, K, Cn] bool
    edge_target: torch.Tensor  # [E, K, Ce] (or [P, K, Ce] per pair when folded)
    edge_mask: torch.Tensor
    fold: torch.Tensor | None = None  # [E] pair id
    fold_node: torch.Tensor | None = None  # [N] pair id of the (i, i) pair
    meta: dict = field(default_factory=dict)
    # Γ-eigenvalue loss (egnn.spectral), per structure of a batch:
    # (node offset, nodes, edge/pair offset, edges/pairs, Spectrum)
    spectra: list = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        return len(self.species)


def collate(samples: list[Sample]) -> Sample:
    """Join structures into one disjoint graph (node and pair indices offset)."""
    if len(samples) == 1:
        return samples[0]
    off_n, off_p, off_e, spectra = 0, 0, 0, []
    parts = {k: [] for k in ("species", "src", "dst", "edge_vec", "node_target", "node_mask",
                                                 "edge_target", "edge_mask", "fold", "fold_node")}
    folded = samples[0].fold is not None
    for s in samples:
        if (s.fold is not None) != folded:
            raise ConfigError("cannot batch Γ-only (folded) and real-space structures together; use batch_size 1 "
                              "or keep the datasets apart")
        parts["species"].append(s.species)
        parts["src"].append(s.src + off_n)
        parts["dst"].append(s.dst + off_n)
        for k in ("edge_vec", "node_target", "node_mask", "edge_target", "edge_mask"):
            parts[k].append(getattr(s, k))
        if folded:
            parts["fold"].append(s.fold + off_p)
            parts["fold_node"].append(s.fold_node + off_p)
            off_p += len(s.edge_target)
        spectra += [(no + off_n, n, eo + off_e, e, sp) for no, n, eo, e, sp in s.spectra]
        off_n += s.num_nodes
        off_e += len(s.edge_target)
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    return Sample(name="+".join(s.name for s in samples), fold=cat.pop("fold", None),
                  fold_node=cat.pop("fold_node", None), spectra=spectra, **cat)


def fold_edges(sample: Sample, node_out: torch.Tensor, edge_out: torch.Tensor) -> torch.Tensor:
    """Per-pair Γ blocks of a folded sample (see `egnn.blocks.fold`)."""
    from .blocks import fold

    return fold(node_out, edge_out, sample.fold, sample.fold_node, len(sample.edge_target))


def masked_loss(pred, target, mask, l1: float = 1.0, l2: float = 1.0):
    """The seed's L1 + L2 loss over unpadded elements only (returns loss, sum|err|, count)."""
    err = (pred - target)[mask]
    n = max(err.numel(), 1)
    abs_sum = err.abs().sum()
    return l1 * abs_sum / n + l2 * err.square().sum() / n, abs_sum.detach(), err.numel()


@torch.no_grad()
def fit_output_stats(model: HamiltonianModel, samples: list[Sample]) -> None:
    """Per-species mean of the L = 0 node targets, per-(L, channel) RMS of node/edge residuals: the
    model then predicts O(1) numbers. Stats live in model buffers, so checkpoints carry them."""
    S, L = model.num_species, model.L_max
    row_L = model.row_L
    Cn, Ce = model.node_shift.shape[1], model.edge_scale.shape[1]
    if model.reference is not None:  # the network learns the residual of the two-centre reference
        from .nn.reference import fit_reference

        fitted = fit_reference(model.reference, samples)
        if not fitted["structures"]:
            warn_once("reference-unfitted", "model.reference: no real-space (k-point) training structure to fit the "
                      "two-centre reference; it stays zero and the network predicts H itself")
        samples = [_residual(model.reference, s) for s in samples]
    shift_sum, shift_n = torch.zeros(S, Cn, dtype=torch.float64), torch.zeros(S, Cn, dtype=torch.float64)
    for s in samples:
        t, m = s.node_target[:, 0].double(), s.node_mask[:, 0].double()
        shift_sum.index_add_(0, s.species, t * m)
        shift_n.index_add_(0, s.species, m)
    shift = shift_sum / shift_n.clamp(min=1)

    def rms(pairs, C):
        acc, n = torch.zeros(L + 1, C, dtype=torch.float64), torch.zeros(L + 1, C, dtype=torch.float64)
        for t, m in pairs:
            t2, md = (t.double() * m).square(), m.double()
            acc.index_add_(0, row_L, t2.sum(0))
            n.index_add_(0, row_L, md.sum(0))
        return (acc / n.clamp(min=1)).sqrt().where(n > 0, torch.ones_like(acc)).clamp(min=1e-3)

    node_res = []
    for s in samples:
        t = s.node_target.clone()
        t[:, 0] -= shift[s.species].to(t.dtype)
        node_res.append((t, s.node_mask))
    model.node_shift.copy_(shift)
    model.node_scale.copy_(rms(node_res, Cn))
    model.edge_scale.copy_(rms([(s.edge_target, s.edge_mask) for s in samples if s.fold is None] or
                               [(s.edge_target, s.edge_mask) for s in samples], Ce))


def _residual(reference, s: Sample) -> Sample:
    """The sample with the reference's blocks subtracted from its targets (real-space samples only:
    folded Γ targets are left as they are, and output statistics skip their edges)."""
    if s.fold is not None:
        return s
    node_ref, edge_ref = reference(s.species, s.src, s.dst, s.edge_vec.double())
    return dataclasses.replace(s, node_target=s.node_target.double() - node_ref * s.node_mask,
                               edge_target=s.edge_target.double() - edge_ref * s.edge_mask)


# ----------------------------------------------------------------------------- config
TRAIN_DEFAULTS = {
    "epochs": 100, "lr": 3e-3, "weight_decay": 0.0, "batch_size": 1, "amp": "off", "seed": 0,
    "checkpoint_every": 10, "lr_factor": 0.5, "lr_patience": 10, "min_lr": 1e-5, "l1": 1.0, "l2": 1.0,
    "grad_clip": 10.0, "max_minutes": None, "device": "auto", "node_weight": 1.0, "eig_weight": 0.0, "eig_empty": 2,
    "ema_decay": 0.0,
}
DATA_KEYS = {"train", "val", "r_cut", "cache"}
TOP_KEYS = {"data", "model", "train", "output", "partition"}


@dataclass
class TrainConfig:
    data: dict
    model: dict
    train: dict
    output: str
    partition: dict | None = None
    source: str = ""

    @property
    def r_cut(self) -> float:
        return float(self.data["r_cut"])


# train.<key>: (kind, check, what it must be); kinds "int", "float", "str", "bool"; None passes where allowed
_TRAIN_SCHEMA = {
    "epochs": ("int", lambda v: v >= 1, "a positive integer"),
    "lr": ("float", lambda v: v > 0, "a number > 0"),
    "weight_decay": ("float", lambda v: v >= 0, "a number >= 0"),
    "batch_size": ("int", lambda v: v >= 1, "a positive integer"),
    "amp": ("str", lambda v: v in ("off", "bf16", "fp16"), "off, bf16 or fp16"),
    "seed": ("int", lambda v: True, "an integer"),
    "checkpoint_every": ("int", lambda v: v >= 1, "a positive integer"),
    "lr_factor": ("float", lambda v: 0 < v < 1, "a number between 0 and 1"),
    "lr_patience": ("int", lambda v: v >= 0, "an integer >= 0"),
    "min_lr": ("float", lambda v: v >= 0, "a number >= 0"),
    "l1": ("float", lambda v: v >= 0, "a number >= 0"),
    "l2": ("float", lambda v: v >= 0, "a number >= 0"),
    "grad_clip": ("float", lambda v: v > 0, "a number > 0"),
    "max_minutes": ("float?", lambda v: v > 0, "a number of minutes > 0, or null"),
    "device": ("str", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "node_weight": ("float", lambda v: v >= 0, "a number >= 0"),
    "eig_weight": ("float", lambda v: v >= 0, "a number >= 0"),
    "eig_empty": ("int", lambda v: v >= 0, "an integer >= 0"),
    "ema_decay": ("float", lambda v: 0 <= v < 1, "a number in [0, 1) (0: off)"),
}


def _typed(value, kind: str, where: str, key: str, what: str):
    """value as `kind`; YAML reads 1e-3 as a string, so numeric strings are taken as numbers."""
    if kind.endswith("?") and value is None:
        return None
    kind = kind.rstrip("?")
    bad = ConfigError(f"{where}: {key} must be {what}, got {value!r}")
    if value is None or isinstance(value, (list, dict)):
        raise bad
    if kind == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad from None
    if not math.isfinite(float(value)):
        raise bad
    if kind == "int":
        if float(value) != int(value):
            raise bad
        return int(value)
    return float(value)


def _section(raw, key, where) -> dict:
    val = raw.get(key)
    if val is None:
        return {}
    if not isinstance(val, dict):
        raise ConfigError(f"{where}: the '{key}' section must be a mapping of keys, got {type(val).__name__} {val!r}")
    return dict(val)


@functools.cache
def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently,
    so a stale second `data:` would drop the first list without a word."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {key!r} given twice (first at line "
                        f"{seen[key] + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return Loader  # built once, on the first config read (yaml is imported lazily)


def load_config(path_or_dict, base_dir: str | None = None) -> TrainConfig:
    """Read and validate a YAML training config before any work: every problem is a ConfigError that
    names the key and what it must be."""
    import yaml

    if isinstance(path_or_dict, dict):
        raw, where = copy.deepcopy(path_or_dict), "config"
        base_dir = base_dir or os.getcwd()
    else:
        where = str(path_or_dict)
        if not os.path.isfile(where):
            raise ConfigError(f"{where}: config file not found")
        with open(where) as f:
            try:
                raw = yaml.load(f, Loader=_unique_key_loader())
            except yaml.YAMLError as exc:
                raise ConfigError(f"{where}: not valid YAML ({exc})") from None
        base_dir = base_dir or os.path.dirname(os.path.abspath(where))
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping with keys {sorted(TOP_KEYS)}")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    for key in ("data", "output"):
        if raw.get(key) is None:
            raise ConfigError(f"{where}: missing required key '{key}'")
    data = _section(raw, "data", where)
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) data.{sorted(unknown)}; allowed: {sorted(DATA_KEYS)}")
    if not data.get("train"):
        raise ConfigError(f"{where}: data.train must list CP2K run folders or converted datasets")
    data["r_cut"] = _typed(data.get("r_cut", 8.0), "float", where, "data.r_cut", "a positive number of Å")
    if not data["r_cut"] > 0:
        raise ConfigError(f"{where}: data.r_cut must be a positive number of Å, got {data['r_cut']!r}")
    for split in ("train", "val"):
        paths = data.get(split) or []
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"{where}: data.{split} must be a path or a list of paths, got {paths!r}")
        data[split] = [_resolve(p, base_dir, where, f"data.{split}") for p in paths]
    model = _section(raw, "model", where)
    allowed_model = {f.name for f in dataclasses.fields(ModelConfig)} - {"basis", "r_cut"}
    unknown = set(model) - allowed_model
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) model.{sorted(unknown)}; allowed: {sorted(allowed_model)}")
    for f in dataclasses.fields(ModelConfig):
        if f.name in model:
            kind = {int: "int", bool: "bool", str: "str", float: "float"}.get(type(f.default))
            if kind:
                model[f.name] = _typed(model[f.name], kind, where, f"model.{f.name}", f"a {kind} value")
    given = _section(raw, "train", where)
    unknown = set(given) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) train.{sorted(unknown)}; allowed: {sorted(TRAIN_DEFAULTS)}")
    train = dict(TRAIN_DEFAULTS)
    for key, value in given.items():
        kind, ok, what = _TRAIN_SCHEMA[key]
        value = _typed(value, kind, where, f"train.{key}", what)
        if value is not None and not ok(value):
            raise ConfigError(f"{where}: train.{key} must be {what}, got {value!r}")
        train[key] = value
    if train["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{where}: train.device is {train['device']!r} but this machine has no usable CUDA "
                          "device; use device: auto (or cpu)")
    partition = raw.get("partition")
    if partition is not None and not isinstance(partition, dict):
        raise ConfigError(f"{where}: the 'partition' section must be a mapping (e.g. {{method: low-nn}}), got "
                          f"{partition!r}")
    output = raw["output"]
    if not isinstance(output, str):
        raise ConfigError(f"{where}: output must be a folder path, got {output!r}")
    output = os.path.normpath(output if os.path.isabs(output) else os.path.join(base_dir, output))
    return TrainConfig(data=data, model=model, train=train, output=output, partition=partition, source=where)


def _resolve(path, base_dir, where, key):
    import glob

    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(base_dir, path))
    hits = sorted(glob.glob(full)) if any(c in full for c in "*?[") else ([full] if os.path.exists(full) else [])
    if not hits:
        raise ConfigError(f"{where}: {key} entry {path!r} does not exist (looked at {full})")
    return hits if len(hits) > 1 else hits[0]


def flatten_paths(entries) -> list[str]:
    out = []
    for e in entries:
        out.extend(e if isinstance(e, list) else [e])
    return out


# ----------------------------------------------------------------------------- trainer
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class WeightAverage:
    """Exponential moving average of the trainable parameters (train.ema_decay): the weights that
    validation, best.pt and every checkpoint's "model" carry, while the raw ones train on (kept as
    "model_train" for --resume). Averaging the last ~1/(1 - decay) optimizer steps removes the
    step-to-step jitter of the weights at a high learning rate (held-out gaps of HfO2 move by up to
    60 meV between checkpoints of one run): it matters for runs that stop before the learning rate
    has decayed; after that, the EMA and the last epoch measured the same (docs/accuracy.md).
    The decay is warmed up, min(decay, (1 + n)/(10 + n)) after n steps, so a fresh run does not
    average in its random start.

    Parameters only: buffers (output statistics, the fitted reference) do not change in training.
    (torch.optim.swa_utils.AveragedModel deep-copies the whole module, buffers included, when it is
    built: before the output statistics are fitted and before the distributed broadcast.)"""

    def __init__(self, decay: float):
        self.decay, self.steps, self.shadow = float(decay), 0, None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        if self.shadow is None:
            self.shadow = [p.clone() for p in params]
        else:
            d = min(self.decay, (1 + self.steps) / (10 + self.steps))
            for s, p in zip(self.shadow, params):
                s.lerp_(p, 1.0 - d)
        self.steps += 1

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """`model` holds the averaged weights inside the block, its own ones again after it."""
        if self.shadow is None:
            yield
            return
        params = list(model.parameters())
        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)

    def state_dict(self, model: torch.nn.Module) -> dict:
        """`model`'s state dict with the averaged parameters (what a checkpoint's "model" holds)."""
        sd = model.state_dict()
        if self.shadow is not None:
            sd.update((name, s) for (name, _), s in zip(model.named_parameters(), self.shadow))
        return sd

    def load(self, model: torch.nn.Module, averaged_state: dict, steps: int) -> None:
        """Resume: the averaged parameters from a checkpoint's "model" (names of `model`)."""
        self.shadow = [averaged_state[name].detach().clone().to(p.device, p.dtype)
                       for name, p in model.named_parameters()]
        self.steps = int(steps)


class Trainer:
    """Runs epochs over `train` samples, validates on `val`, logs and checkpoints into `output`."""

    def __init__(self, model: HamiltonianModel, train: list[Sample], val: list[Sample], cfg: dict, output: str,
                 device=None, config_dict: dict | None = None, log=print):
        self.model, self.train_set, self.val_set, self.cfg, self.output = model, train, val, cfg, output
        self.device = device or pick_device(cfg.get("device", "auto"))
        if cfg["amp"] == "fp16" and self.device.type == "cpu":
            raise ConfigError("train.amp: fp16 needs a CUDA device; on CPU use bf16 or off")
        self.model.to(self.device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, factor=cfg["lr_factor"], patience=cfg["lr_patience"], min_lr=cfg["min_lr"])
        self.scaler = torch.amp.GradScaler("cuda") if cfg["amp"] == "fp16" else None
        self.ema = WeightAverage(cfg["ema_decay"]) if cfg.get("ema_decay") else None
        self.epoch, self.best = 0, math.inf
        self.config_dict = config_dict or {}
        self.log = log
        os.makedirs(output, exist_ok=True)

    # -- one step
    def _autocast(self):
        if self.cfg["amp"] == "off":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.cfg["amp"] == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _to(self, s: Sample) -> Sample:
        out = Sample(**{f.name: (getattr(s, f.name).to(self.device) if torch.is_tensor(getattr(s, f.name))
                                 else getattr(s, f.name)) for f in dataclasses.fields(Sample)})
        out.spectra = [(no, n, eo, e, sp.to(self.device)) for no, n, eo, e, sp in s.spectra]
        return out

    def compute(self, s: Sample):
        s = self._to(s)
        with self._autocast():
            node, edge = self.model(s.species, s.src, s.dst, s.edge_vec)
        node, edge = node.float(), edge.float()
        if s.fold is not None:
            edge = fold_edges(s, node, edge)
        l1, l2 = self.cfg["l1"], self.cfg["l2"]
        ln, an, nn_ = masked_loss(node, s.node_target, s.node_mask, l1, l2)
        le, ae, ne = masked_loss(edge, s.edge_target, s.edge_mask, l1, l2)
        w = float(self.cfg["node_weight"])  # node blocks are few (N vs E) but set the onsite energies
        total = (w * ln * nn_ + le * ne) / max(w * nn_ + ne, 1)
        st = {"node_abs": an.item(), "node_n": nn_, "edge_abs": ae.item(), "edge_n": ne}
        if s.spectra and self.cfg.get("eig_weight"):
            d = self.eigen_shifts(s, node, edge)
            total = total + float(self.cfg["eig_weight"]) * (l1 * d.abs().mean() + l2 * d.square().mean())
            st.update(eig_abs=d.detach().abs().sum().item(), eig_n=d.numel())
        return total, st

    def eigen_shifts(self, s: Sample, node, edge) -> torch.Tensor:
        """First-order Γ-eigenvalue errors [levels of all structures] of a prediction (egnn.spectral)."""
        from .spectral import first_order

        dn, de = node - s.node_target, edge - s.edge_target
        return torch.cat([first_order(sp, dn[no:no + n], de[eo:eo + e], self.model.basis)
                          for no, n, eo, e, sp in s.spectra])

    def batches(self, epoch: int):
        g = torch.Generator().manual_seed(int(self.cfg["seed"]) * 100003 + epoch)  # resumable order
        order = torch.randperm(len(self.train_set), generator=g).tolist()
        bs = self.cfg["batch_size"]
        return [collate([self.train_set[i] for i in order[k:k + bs]]) for k in range(0, len(order), bs)]

    def train_epoch(self, epoch: int, progress: bool = True) -> dict:
        from tqdm import tqdm

        self.model.train()
        tot, stats = 0.0, dict.fromkeys(STAT_KEYS, 0)
        batches = self.batches(epoch)
        for b in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress):
            loss, st = self.compute(b)
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch}, structure(s) {b.name}: the loss is {loss.item()}; training stops "
                                    f"before this step changes the weights (the checkpoints in {self.output} hold the "
                                    "last finite ones). Lower train.lr, check the data, or turn off train.amp")
            self.opt.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                self.after_backward()
                self.scaler.unscale_(self.opt)
            else:
                loss.backward()
                self.after_backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
            if self.scaler:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            if self.ema is not None:
                self.ema.update(self.model)
            tot += loss.item()
            for k in stats:
                stats[k] += st.get(k, 0)
        return {"loss": tot / len(batches), **_maes(stats)}

    def after_backward(self) -> None:
        """Hook between backward and the optimizer step (the distributed trainer sums gradients here)."""

    def averaged(self):
        """Context: the model holds the weights that are validated and saved (the EMA ones, if on)."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, samples) -> dict:
        self.model.eval()
        tot, stats = 0.0, dict.fromkeys(STAT_KEYS, 0)
        with self.averaged():
            for s in samples:
                loss, st = self.compute(s)
                tot += loss.item()
                for k in stats:
                    stats[k] += st.get(k, 0)
        return {"loss": tot / max(len(samples), 1), **_maes(stats)}

    def fit(self, epochs: int | None = None, progress: bool = True) -> dict:
        epochs = epochs or self.cfg["epochs"]
        if self.epoch >= epochs:
            raise ConfigError(f"the run is at epoch {self.epoch} already; ask for more epochs (train.epochs or "
                              f"--epochs > {self.epoch}) to continue it")
        t_start = time.time()
        metrics_path = os.path.join(self.output, "metrics.jsonl")
        last = {}
        while self.epoch < epochs:
            t0 = time.time()
            epoch = self.epoch + 1
            tr = self.train_epoch(epoch, progress)
            va = self.evaluate(self.val_set) if self.val_set else tr
            if not math.isfinite(va["loss"]):
                raise TrainingError(f"epoch {epoch}: the validation loss is {va['loss']}; training stops without "
                                    "saving these weights. Lower train.lr or check the validation data")
            self.sched.step(va["loss"])
            self.epoch = epoch
            last = {"epoch": epoch, "train_loss": tr["loss"], "val_loss": va["loss"],
                    "train_mae_meV": tr["mae_meV"], "val_mae_meV": va["mae_meV"],
                    "val_node_mae_meV": va["node_mae_meV"], "val_edge_mae_meV": va["edge_mae_meV"],
                    "train_node_mae_meV": tr["node_mae_meV"], "train_edge_mae_meV": tr["edge_mae_meV"],
                    **({"val_eig_mae_meV": va["eig_mae_meV"], "train_eig_mae_meV": tr["eig_mae_meV"]}
                       if "eig_mae_meV" in va else {}),
                    "lr": self.opt.param_groups[0]["lr"], "seconds": time.time() - t0}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            if va["loss"] < self.best:
                self.best = va["loss"]
                self.save(os.path.join(self.output, "best.pt"))
            if epoch % self.cfg["checkpoint_every"] == 0 or epoch == epochs:
                self.save(os.path.join(self.output, "last.pt"))
            if progress:
                eig = f", Γ levels {va['eig_mae_meV']:.1f}" if "eig_mae_meV" in va else ""
                self.log(f"epoch {epoch:4d}  loss {tr['loss']:.4g}  val MAE {va['mae_meV']:.2f} meV "
                         f"(node {va['node_mae_meV']:.2f}, edge {va['edge_mae_meV']:.2f}{eig})  lr {last['lr']:.2g}")
            limit = self.cfg.get("max_minutes")
            if limit and time.time() - t_start > 60 * float(limit):
                self.save(os.path.join(self.output, "last.pt"))
                break
        return last

    # -- checkpoints
    def state(self) -> dict:
        raw = self.model.state_dict()
        ema = {"model": self.ema.state_dict(self.model), "model_train": raw, "ema_steps": self.ema.steps} \
            if self.ema else {"model": raw}
        return {"format": "egnn-checkpoint-1", "model_config": self.model.config.to_dict(),
                **ema, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "epoch": self.epoch, "best": self.best,
                "train_config": self.cfg, "config": self.config_dict, "best_loss": self._loss_definition(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def save(self, path: str) -> None:
        checkpoint.save(path, self.state())  # plain data, temp-then-rename: never half-written

    def load(self, path: str, ck: dict | None = None) -> None:
        """Resume from the checkpoint at `path` (`ck`: its contents, when already read)."""
        ck = ck or load_checkpoint(path)
        # "model" holds the averaged weights of an EMA run, "model_train" the ones that train on
        self.model.load_state_dict(ck.get("model_train", ck["model"]))
        if self.ema is not None and "model_train" in ck:
            self.ema.load(self.model, ck["model"], ck.get("ema_steps", 0))
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.scaler and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.best = ck["epoch"], ck["best"]
        # compared key by key over today's LOSS_KEYS: keys added since take their defaults, keys of
        # removed options (e.g. eig_fragile) are ignored
        saved = ck.get("best_loss") or ck.get("train_config") or {}
        old = {k: saved.get(k, TRAIN_DEFAULTS[k]) for k in LOSS_KEYS}
        if old != self._loss_definition():
            # a best value measured with another loss would keep best.pt from ever being written again
            self.log(f"resume: the loss differs from the one the checkpoint's best was measured with ({old} -> "
                     f"{self._loss_definition()}); best.pt restarts from this run's validation losses")
            self.best = math.inf

    def _loss_definition(self) -> dict:
        return {k: self.cfg.get(k, TRAIN_DEFAULTS[k]) for k in LOSS_KEYS}


LOSS_KEYS = ("l1", "l2", "node_weight", "eig_weight", "eig_empty")  # what the validation loss (and best.pt) means
STAT_KEYS = ("node_abs", "node_n", "edge_abs", "edge_n", "eig_abs", "eig_n")


def _maes(st: dict) -> dict:
    n = st["node_n"] + st["edge_n"]
    eig = {"eig_mae_meV": 1000 * st["eig_abs"] / st["eig_n"]} if st.get("eig_n") else {}
    return {"mae_meV": 1000 * (st["node_abs"] + st["edge_abs"]) / max(n, 1),
            "node_mae_meV": 1000 * st["node_abs"] / max(st["node_n"], 1),
            "edge_mae_meV": 1000 * st["edge_abs"] / max(st["edge_n"], 1), **eig}


def load_checkpoint(path: str) -> dict:
    """egnn.checkpoint.load (weights only: never runs code from the file)."""
    return checkpoint.load(path)


def model_from_checkpoint(path: str) -> HamiltonianModel:
    return checkpoint.model_from_checkpoint(path)


# ----------------------------------------------------------------------------- data -> samples
def to_sample(x, dtype=torch.float32, name: str = "") -> Sample:
    """A training Sample from an `egnn.dataset.Sample` (real-space / direct / folded targets)."""
    g = x.graph
    common = dict(name=name or os.path.basename(str(x.source)), species=x.species.long(),
                  src=torch.from_numpy(g.src).long(), dst=torch.from_numpy(g.dst).long(),
                  edge_vec=torch.from_numpy(g.vec).to(dtype), meta={"mode": x.mode, "source": x.source, "graph": g})
    if x.mode == "folded":
        Cn = x.pair_target.shape[2]
        N, K = len(x.species), x.pair_target.shape[1]
        return Sample(node_target=x.pair_target.new_zeros(N, K, Cn), node_mask=torch.zeros(N, K, Cn, dtype=torch.bool),
                      edge_target=x.pair_target.to(dtype), edge_mask=x.pair_mask, fold=x.edge_fold.long(),
                      fold_node=x.node_fold.long(), **common)
    return Sample(node_target=x.node_target.to(dtype), node_mask=x.node_mask, edge_target=x.edge_target.to(dtype),
                  edge_mask=x.edge_mask, **common)


def _cache_key(runs: list[str], r_cut: float) -> str:
    """What a cached conversion depends on: the run folders' files (names, sizes, mtimes), r_cut and
    the converter's version. Any change of a source file gives another key, hence a fresh conversion."""
    import hashlib

    from . import __version__
    from .dataset import CONVERTER, VERSION

    h = hashlib.sha1(json.dumps({"r_cut": r_cut, "egnn": __version__, "converter": CONVERTER, "format": VERSION},
                                sort_keys=True).encode())
    for r in runs:
        h.update(os.path.abspath(r).encode())
        for name in sorted(os.listdir(r)):
            st = os.stat(os.path.join(r, name))
            h.update(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _cached_conversion(runs: list[str], r_cut: float, cache_dir: str):
    """The converted dataset of `runs` from the cache (converted first if absent, rebuilt with a log
    line if damaged), under a file lock so concurrent trainings convert once and never collide."""
    import fcntl
    import shutil

    from . import dataset as ds_mod
    from .errors import InputError, warn_once

    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, "dataset-" + _cache_key(runs, r_cut))
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(target):
            try:
                ds_mod.verify(target)
                return ds_mod.Dataset(target)
            except InputError as exc:
                warn_once(f"cache-{target}", f"the cached conversion {target} is damaged ({exc}); rebuilding it")
                shutil.rmtree(target)
        ds_mod.convert(runs, target, r_cut=r_cut, overlap=True)
        _prune_cache(cache_dir, target, runs, r_cut)
        return ds_mod.Dataset(target)


def _prune_cache(cache_dir: str, keep: str, runs: list[str], r_cut: float) -> None:
    """Remove cached conversions of the same run folders and r_cut made from older contents."""
    import shutil

    from . import dataset as ds_mod

    mine = sorted(os.path.abspath(r) for r in runs)
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if not name.startswith("dataset-") or name.endswith(".lock") or path == keep or not os.path.isdir(path):
            continue
        try:
            m = ds_mod.read_manifest(path)
        except Exception:  # noqa: BLE001 - an unreadable entry is simply not ours to judge
            continue
        if sorted(e["source"] for e in m["structures"]) == mine and abs(m["r_cut"] - r_cut) < 1e-12:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.exists(path + ".lock"):
                os.remove(path + ".lock")


def default_cache_dir() -> str:
    """Where converted run folders are cached unless data.cache says otherwise: $XDG_CACHE_HOME/egnn
    (~/.cache/egnn). Shared by training and the profiling tools, so each conversion happens once."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "egnn")


def open_datasets(paths: list[str], r_cut: float, cache_dir: str, min_coverage: float = 0.99):
    """Each path is a converted dataset (manifest.json) or a CP2K run folder; run folders are converted
    once into `cache_dir` (keyed on their content, r_cut and the converter version; locked; verified
    and rebuilt when damaged). Returns [egnn.dataset.Dataset]."""
    from . import dataset as ds_mod

    datasets, runs = [], []
    for p in paths:
        (datasets if os.path.isfile(os.path.join(p, "manifest.json")) else runs).append(p)
    out = [ds_mod.Dataset(p) for p in datasets]
    if runs:
        out.append(_cached_conversion(runs, r_cut, cache_dir))
    for d in out:
        if abs(d.r_cut - r_cut) > 1e-9:
            raise ConfigError(f"{d.path}: converted with r_cut {d.r_cut} Å but the config asks data.r_cut {r_cut} Å; "
                              "re-convert, or set data.r_cut to match")
        cov = d.manifest["coverage"]["min_frobenius"]
        if not cov >= min_coverage:
            raise ConfigError(f"{d.path}: data.r_cut {r_cut} Å captures only {100 * cov:.2f} % of ‖H‖_F of some "
                              f"structure (need ≥ {100 * min_coverage:.0f} %); raise data.r_cut (CP2K blocks reach "
                              "9-13 Å)")
    return out


def load_samples(datasets, basis, dtype=torch.float32, eig_empty: int | None = None) -> list[Sample]:
    """Training Samples of every structure; with `eig_empty` (not None) each also carries the
    Spectrum of its occupied and `eig_empty` empty Γ levels for the eigenvalue loss."""
    from .io.cp2k import valence_electrons
    from .spectral import prepare

    out = []
    for d in datasets:
        if d.basis.to_dict()["shells"] != basis.to_dict()["shells"]:
            raise ConfigError(f"{d.path}: its orbital basis {d.basis.shells} differs from the training basis "
                              f"{basis.shells}; convert all data with the same basis sets")
        d.dtype = dtype
        if eig_empty is not None:
            if not d.manifest.get("overlap"):
                raise ConfigError(f"{d.path}: converted without S, which train.eig_weight needs; re-run `egnn data "
                                  "convert` without --no-overlap, or set train.eig_weight: 0")
            d.overlap = True
        for i in range(len(d)):
            src = d.manifest["structures"][i]["source"]
            x = d[i]
            s = to_sample(x, dtype, name=os.path.basename(src.rstrip("/")))
            if eig_empty is not None:
                n_el, _ = valence_electrons([basis._symbol(int(z)) for z in x.graph.numbers], src)
                sp = prepare(x, basis, n_el // 2, eig_empty, name=src)
                s.spectra = [(0, s.num_nodes, 0, len(s.edge_target), sp.to("cpu", dtype))]
            out.append(s)
    return out


def warn_mixed_sampling(samples: list[Sample]) -> None:
    """Warn when training data mixes Γ-only runs with k-point runs. H depends on the k-points the
    density was computed with: a 12-atom HfO2 cell's onsite levels lie ~0.2 eV apart at Γ and at
    2×2×2 (docs/accuracy.md, "k-point sampling"), so the two are different targets for one geometry,
    unless the Γ-only cells are large enough to be converged at Γ."""
    gamma = [s.name for s in samples if s.fold is not None]
    if gamma and len(gamma) < len(samples):
        warn_once("mixed-sampling", f"data.train mixes {len(gamma)} Γ-only run(s) ({', '.join(gamma[:3])}"
                  f"{', ...' if len(gamma) > 3 else ''}) with {len(samples) - len(gamma)} k-point run(s). Their H "
                  "comes from different Brillouin-zone samplings, so the same geometry has different targets "
                  "(a 12-atom HfO2 cell's onsite levels move by ~0.2 eV between Γ and 2x2x2). Train on one "
                  "sampling, or keep only Γ-only cells large enough to be converged at Γ")


TRAIN_OUTPUTS = ("best.pt", "last.pt", "best.pt.tmp", "last.pt.tmp", "metrics.jsonl", "config.json", "timing.json")


def _prepare_output(cfg: TrainConfig, resume: str | None, overwrite: bool) -> None:
    """The output folder: new, or resumed, or (--overwrite) cleared of the files egnn wrote there."""
    if os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise ConfigError(f"{cfg.source}: output {cfg.output} exists and is a file; choose another output folder")
    old = [f for f in TRAIN_OUTPUTS if os.path.exists(os.path.join(cfg.output, f))]
    if old and not resume:
        if not overwrite:
            raise ConfigError(f"{cfg.output} holds an earlier training ({', '.join(old)}); continue it with --resume "
                              f"{os.path.join(cfg.output, 'last.pt')}, or pass --overwrite to replace egnn's files "
                              "there, or choose another output")
        if int(os.environ.get("RANK", "0")) == 0:
            for f in old:
                os.remove(os.path.join(cfg.output, f))
    parent = os.path.dirname(os.path.abspath(cfg.output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{cfg.source}: output {cfg.output} cannot be written ({parent} is not writable)")


def _check_same_model(path: str, mcfg: ModelConfig, flag: str, fix: str, ck: dict, allow=()) -> None:
    """`ck` (the checkpoint at `path`) was written by a model of this config, up to the keys in `allow`,
    else a ConfigError."""
    old, new = ck["model_config"], mcfg.to_dict()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in allow)
    if diff:
        show = "; ".join(f"{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}" for k in diff[:4])
        raise ConfigError(f"{flag} {path}: the checkpoint's model differs from the config's ({show}); {fix}")


def _check_resume(path: str, mcfg: ModelConfig, cfg: TrainConfig, ck: dict) -> None:
    _check_same_model(path, mcfg, "--resume", "resume with the config that made it, or start a new training", ck)
    if ck.get("epoch", 0) >= cfg.train["epochs"]:
        raise ConfigError(f"--resume {path}: the checkpoint is at epoch {ck.get('epoch')}; --epochs (or train.epochs)"
                          f" must be larger than that to continue, got {cfg.train['epochs']}")


def train_from_config(cfg: TrainConfig, resume: str | None = None, progress: bool = True,
                      overwrite: bool = False, init: str | None = None) -> dict:
    """The whole `egnn train`: data, model, output statistics, epochs, checkpoints. `init`: fine-tune,
    starting from that checkpoint's weights, output statistics and reference (not refitted: the model
    keeps predicting what it learned) with a new optimizer and scheduler; a config with more layers
    than the checkpoint grows it (`HamiltonianModel.load_grown`)."""
    _prepare_output(cfg, resume, overwrite)
    # each checkpoint is read once, and a bad one fails before any data work
    resume_ck = checkpoint.load(resume) if resume else None
    init_ck = checkpoint.load(init) if init else None
    seed_everything(int(cfg.train["seed"]))
    # converted run folders are cached outside the output folder, so a config that fails validation
    # leaves no output behind
    cache = cfg.data.get("cache") or default_cache_dir()
    train_ds = open_datasets(flatten_paths(cfg.data["train"]), cfg.r_cut, cache)
    val_ds = open_datasets(flatten_paths(cfg.data["val"]), cfg.r_cut, cache) if cfg.data["val"] else []
    basis = train_ds[0].basis
    mcfg = ModelConfig.from_dict({**cfg.model, "basis": basis, "r_cut": cfg.r_cut})
    eig = int(cfg.train["eig_empty"]) if float(cfg.train["eig_weight"]) > 0 else None
    train, val = load_samples(train_ds, basis, eig_empty=eig), load_samples(val_ds, basis, eig_empty=eig)
    warn_mixed_sampling(train)
    if resume:
        _check_resume(resume, mcfg, cfg, resume_ck)
    model = HamiltonianModel(mcfg)
    if init:
        _check_same_model(init, mcfg, "--init", "train with the checkpoint's model section (or more layers), "
                          "or without --init", init_ck, allow=("layers",))
        old_layers = int(init_ck["model_config"]["layers"])
        if old_layers == mcfg.layers:
            model.load_state_dict(init_ck["model"])
        else:  # load_grown refuses fewer layers
            model.load_grown(init_ck["model"], old_layers)
            log.info("--init %s: %d -> %d layers; the added ones start as the identity", init, old_layers,
                     mcfg.layers)
    elif not resume:  # on the CPU, where the samples are, before the Trainer moves the model to its device
        fit_output_stats(model, train)
    config_dict = {"data": cfg.data, "model": cfg.model, "train": cfg.train, "output": cfg.output,
                   "partition": cfg.partition}
    trainer_cls = Trainer
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import DistributedTrainer as trainer_cls  # noqa: N813
    kw = {"partition": cfg.partition} if trainer_cls is not Trainer else {}
    trainer = trainer_cls(model, train, val, cfg.train, cfg.output, config_dict=config_dict, **kw)
    if resume:
        trainer.load(resume, resume_ck)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(cfg.output, "config.json"), "w") as f:
            json.dump({**config_dict, "model_config": mcfg.to_dict()}, f, indent=1)
    t0 = time.time()
    last = trainer.fit(progress=progress)
    return {**last, "best_val_loss": trainer.best, "train_structures": len(train), "val_structures": len(val),
            "wall_s": time.time() - t0, "output": cfg.output}
