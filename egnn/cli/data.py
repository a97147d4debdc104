"""`egnn data convert RUN_DIR... -o DATASET [--r-cut R]` and `egnn data info DATASET`."""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    c = sub.add_parser("convert", help="CP2K run folders / PySCF npz files -> a dataset folder")
    c.add_argument("sources", nargs="+", help="CP2K run folders (with .inp, .out, .csr) or PySCF .npz files")
    c.add_argument("-o", "--output", required=True, help="dataset folder to create")
    c.add_argument("--r-cut", type=float, default=12.0, help="graph cutoff in Å (default 12)")
    c.add_argument("--basis-file", default=None, help="CP2K basis file (default: /usr/share/cp2k/BASIS_MOLOPT "
                   "if present, else the embedded MOLOPT shells)")
    c.add_argument("--no-overlap", action="store_true", help="do not store S")
    c.add_argument("--force", action="store_true", help="replace an existing output folder")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    i = sub.add_parser("info", help="summarise a dataset")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true", help="print one JSON object")


def _print(d: dict) -> None:
    print(f"dataset    {d['path']}  ({d['format']} v{d['version']}, {d['bytes'] / 1e6:.1f} MB)")
    print(f"structures {d['structures']}  modes {d['modes']}")
    print(f"atoms      {d['atoms']}  orbitals {d['orbitals']}  edges {d['edges']}  (r_cut {d['r_cut']} Å)")
    shells = ", ".join(f"{el} {''.join('spdfg'[l] for l in ls)}" for el, ls in d["basis"]["shells"].items())
    print(f"basis      {d['basis']['name']}: {shells}; L_max {d['L_max']}, widths node {d['node_width']} "
          f"edge {d['edge_width']}")
    c = d["coverage"]
    print(f"coverage   min ‖H‖ fraction {c['min_frobenius']:.6f}, min non-zero fraction {c['min_nonzeros']:.6f}")


def run(args) -> int:
    from ..dataset import convert, info

    if args.data_command == "convert":
        convert(args.sources, args.output, r_cut=args.r_cut, basis_file=args.basis_file,
                overlap=not args.no_overlap, force=args.force, progress=not args.json)
        d = info(args.output)
    else:
        d = info(args.dataset)
    if args.json:
        print(json.dumps(d))
    else:
        _print(d)
    return 0
