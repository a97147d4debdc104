"""`egnn data convert RUN_DIR... -o DATASET [--r-cut R]`, `egnn data info DATASET` and
`egnn data generate PLAN... -o DIR` (new CP2K runs, see egnn.datagen)."""
from __future__ import annotations

import json
import os


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
    g = sub.add_parser("generate", help="make new CP2K runs (rattled/strained/supercell families) with cp2k.psmp")
    g.add_argument("plans", nargs="+", help="named plans: hfo2 (SZV), gete (DZVP); see egnn.datagen.PLANS")
    g.add_argument("-o", "--output", required=True, help="folder for the run folders (created; resumable)")
    g.add_argument("--family", action="append", default=None,
                   help="only this family (repeatable), e.g. hfo2_m12_val")
    g.add_argument("--np", type=int, default=2, help="MPI ranks per CP2K run (default 2)")
    g.add_argument("--jobs", type=int, default=1, help="CP2K runs at a time (default 1); independent runs need "
                   "no communication: on a node with N cores, --jobs N --np 1")
    g.add_argument("--dry-run", action="store_true", help="write structures and inputs, run nothing")
    g.add_argument("--list", action="store_true", help="list the families of the plans and exit")


def _print(d: dict) -> None:
    print(f"dataset    {d['path']}  ({d['format']} v{d['version']}, {d['bytes'] / 1e6:.1f} MB)")
    print(f"structures {d['structures']}  modes {d['modes']}")
    print(f"atoms      {d['atoms']}  orbitals {d['orbitals']}  edges {d['edges']}  (r_cut {d['r_cut']} Å)")
    shells = ", ".join(f"{el} {''.join('spdfg'[l] for l in ls)}" for el, ls in d["basis"]["shells"].items())
    print(f"basis      {d['basis']['name']}: {shells}; L_max {d['L_max']}, widths node {d['node_width']} "
          f"edge {d['edge_width']}")
    c = d["coverage"]
    print(f"coverage   min ‖H‖ fraction {c['min_frobenius']:.6f}, min non-zero fraction {c['min_nonzeros']:.6f}")


def _generate(args) -> int:
    from .. import datagen

    fams = datagen.select(args.plans, args.family)
    if args.list:
        for f in fams:
            n = len(datagen.prototype(f.proto)) * f.supercell[0] * f.supercell[1] * f.supercell[2]
            k = "Gamma" if f.kpoints is None else "x".join(map(str, f.kpoints))
            if f.kpoints is not None and f.supercell != (1, 1, 1):
                nk = len(datagen.folded_kpoints(f.kpoints, f.supercell))
                k += f" of the prototype: {nk} folded point{'s' if nk > 1 else ''}"
            print(f"{f.name:18s} {f.role:5s} {n:4d} atoms {f.basis:4s} sigma {f.sigma:.2f} A  strain {f.strain:.2f}  "
                  f"k {k}  seeds {len(f.seeds)}")
        return 0
    os.makedirs(args.output, exist_ok=True)
    datagen.write_plan(args.output, fams)
    for f in fams:
        print(f"{f.name}: {len(f.seeds)} structures -> {os.path.join(args.output, f.name)}")
    datagen.run_families([(f, os.path.join(args.output, f.name)) for f in fams], np_ranks=args.np,
                         jobs=args.jobs, dry_run=args.dry_run)
    return 0


def run(args) -> int:
    from ..dataset import convert, info

    if args.data_command == "generate":
        return _generate(args)
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
