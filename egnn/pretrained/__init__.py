"""Pretrained checkpoints shipped inside the package.

    egnn predict --checkpoint pretrained:hfo2_szv structure.xyz -o OUT
    egnn evaluate --checkpoint pretrained:hfo2_szv RUN_DIR...

`pretrained:NAME` works wherever a checkpoint path is accepted (egnn.train.load_checkpoint resolves
it); `path(NAME)` gives the file. Each file holds only tensors and plain Python types (loadable with
`torch.load(weights_only=True)`): format, model_config, model (state dict), epoch, and `card` (what
it was trained on, its held-out accuracy and its limits; the README's model card says the same).
`export` strips a training checkpoint (optimizer and scheduler state) down to that.
"""
from __future__ import annotations

import os

from ..errors import InputError

__all__ = ["PREFIX", "NAMES", "path", "resolve", "export"]

PREFIX = "pretrained:"
HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {"hfo2_szv": "hfo2_szv.pt"}  # name -> file in this folder


def path(name: str) -> str:
    """File of the shipped checkpoint `name`."""
    if name not in NAMES:
        raise InputError(f"{PREFIX}{name}: no such pretrained model; shipped: "
                         + ", ".join(PREFIX + n for n in sorted(NAMES)))
    p = os.path.join(HERE, NAMES[name])
    if not os.path.isfile(p):
        raise InputError(f"{PREFIX}{name}: {p} is missing from this installation; reinstall egnn "
                         "(the file ships as package data)")
    return p


def resolve(spec: str) -> str:
    """`pretrained:NAME` -> its file; any other string is returned unchanged."""
    return path(spec[len(PREFIX):]) if isinstance(spec, str) and spec.startswith(PREFIX) else spec


def export(checkpoint: str, out: str, card: dict) -> str:
    """Write `checkpoint` (an egnn training checkpoint) as a shippable file: float32 model weights,
    the model config, the epoch and `card` (plain types only); written to a temporary name first."""
    import torch

    from ..train import load_checkpoint

    ck = load_checkpoint(checkpoint)
    slim = {"format": ck["format"], "model_config": ck["model_config"], "epoch": int(ck["epoch"]),
            "model": {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in ck["model"].items()},
            "card": card}
    tmp = out + ".tmp"
    torch.save(slim, tmp)
    torch.load(tmp, map_location="cpu", weights_only=True)  # proves it holds no code
    os.replace(tmp, out)
    return out
