"""egnn train CONFIG.yaml [--resume CHECKPOINT | --init CHECKPOINT] [--epochs N] [--overwrite] [--json]"""
from __future__ import annotations

import json
import os


def add_arguments(p):
    p.add_argument("config", help="YAML training config (see configs/)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue exactly from a checkpoint (last.pt)")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="fine-tune: start from a checkpoint's weights (a training one or pretrained:NAME; its "
                        "output statistics and reference too) with a new optimizer at train.lr, epochs from 0; a config "
                        "with more model.layers grows it, the added layers starting as the identity")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--json", action="store_true", help="print one JSON object with the final metrics")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier training in the output folder (only egnn's files there)")


def run(args) -> int:
    from ..train import load_config, train_from_config

    from ..errors import ConfigError

    cfg = load_config(args.config)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(f"--epochs {args.epochs}: must be a positive number of epochs")
        cfg.train["epochs"] = args.epochs
    if args.resume and args.init:
        raise ConfigError("--resume continues a run exactly, --init starts a new one from a checkpoint's weights; "
                          "give one of them")
    result = train_from_config(cfg, resume=args.resume, progress=not (args.quiet or args.json), overwrite=args.overwrite,
                               init=args.init)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"trained {result['epoch']} epochs; best checkpoint {os.path.join(cfg.output, 'best.pt')}")
    return 0
