"""Checkpoints: what they hold, how they are written and how they are read, safely.

A checkpoint is a dict of plain data saved with torch.save (format "egnn-checkpoint-1"):
    format, model_config (ModelConfig.to_dict), model (state_dict) and, from training, optimizer,
    scheduler, epoch, best, train_config, config, scaler.
Tensors, numbers, strings, None, lists, tuples and dicts only: `save` converts numpy scalars and
refuses anything else, and `load` reads with torch.load(weights_only=True), so a file that hides a
pickled object (whose loading would run its code) is refused with an InputError, never executed.
Writes go to a temporary file that is renamed into place: no half-written checkpoint.

`pretrained:NAME` names a checkpoint shipped with the package (egnn/pretrained/NAME.pt).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .errors import InputError

__all__ = ["FORMAT", "save", "load", "model_from_checkpoint", "resolve", "plain", "export", "PRETRAINED"]

FORMAT = "egnn-checkpoint-1"
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def plain(obj, where: str = "checkpoint"):
    """obj with numpy scalars/arrays turned into Python numbers/tensors; anything that is not plain
    data raises (so every checkpoint egnn writes loads with weights_only=True)."""
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.Size)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    raise InputError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint (plain data only)")


def save(path: str, state: dict) -> None:
    state = plain(state)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve(path: str) -> str:
    """The file behind a checkpoint argument (`pretrained:NAME` -> the shipped NAME.pt)."""
    if path.startswith("pretrained:"):
        name = path.split(":", 1)[1]
        avail = sorted(f[:-3] for f in os.listdir(PRETRAINED) if f.endswith(".pt")) if os.path.isdir(PRETRAINED) else []
        if name not in avail:
            raise InputError(f"{path}: no shipped checkpoint {name!r}; available: {', '.join(avail) or 'none'}")
        return os.path.join(PRETRAINED, f"{name}.pt")
    return path


def export(path: str, out: str, card: dict) -> str:
    """Write the training checkpoint `path` as a shippable one (egnn/pretrained/NAME.pt): float32
    weights, model config, epoch and `card` (what it was trained on, held-out accuracy, limits);
    no optimizer or scheduler state."""
    ck = load(path)
    save(out, {"format": FORMAT, "model_config": ck["model_config"], "epoch": int(ck.get("epoch", 0)),
               "model": {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in ck["model"].items()},
               "card": card})
    return out


def load(path: str) -> dict:
    """The checkpoint dict at `path` (or pretrained:NAME), read as weights only."""
    path = resolve(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types; all mean "not a safe checkpoint"
        why = str(exc).splitlines()[0][:300]
        raise InputError(f"{path}: not a readable egnn checkpoint ({type(exc).__name__}: {why}). egnn loads "
                         "checkpoints as weights only and never runs code from them; a file that needs more "
                         "was not written by egnn") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise InputError(f"{path}: not an egnn checkpoint (no 'format: {FORMAT}')")
    for key in ("model_config", "model"):
        if key not in ck:
            raise InputError(f"{path}: egnn checkpoint without '{key}'; it is damaged")
    bad = [k for k, v in ck["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(f"{path}: model weights hold NaN or Inf ({', '.join(bad[:3])}...); the training diverged "
                         "before this checkpoint was written")
    return ck


def model_from_checkpoint(path: str):
    """The HamiltonianModel of a checkpoint, in eval mode."""
    from .errors import ConfigError
    from .model import HamiltonianModel, ModelConfig

    ck = load(path)
    try:
        model = HamiltonianModel(ModelConfig.from_dict(ck["model_config"]))
        model.load_state_dict(ck["model"])
    except (ConfigError, RuntimeError, KeyError, TypeError) as exc:
        raise InputError(f"{resolve(path)}: the checkpoint does not fit its own model config ({exc})") from None
    return model.eval()
