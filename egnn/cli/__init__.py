"""The `egnn` command. Each subcommand lives in egnn/cli/<name>.py with `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import EgnnError

COMMANDS = {
    "data": "convert CP2K/PySCF runs into a dataset, or summarise one",
    "train": "train a model from a YAML config (torchrun for several ranks)",
    "predict": "predict H for structures with a trained checkpoint",
    "evaluate": "MAE and eigenvalue errors of a checkpoint on DFT data",
    "partition": "partition a structure's atom graph over ranks and report its quality",
    "bench": "run a benchmark from profiling/",
    "demo": "train on the shipped HfO2 data, evaluate, predict a supercell",
}


def _available():
    out = {}
    for name, help_ in COMMANDS.items():
        try:
            out[name] = (importlib.import_module(f"egnn.cli.{name}"), help_)
        except ModuleNotFoundError as exc:
            if exc.name != f"egnn.cli.{name}":
                raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egnn", description="Equivariant GNN for DFT Hamiltonians")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except EgnnError as exc:
        print(f"egnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
