"""egnn predict --checkpoint CK STRUCTURE... -o OUT [--format rows,gamma] [--tile 2x2x2] [--with-overlap]
[--edge-chunk N] [--binary] [--overwrite] [--json] [--partition low-nn|metis|linear]

Writes the chosen formats of every structure into OUT (see egnn.predict's file table), streamed row
block by row block. Every input is read and checked, and the output folder checked, before any
prediction starts, so a bad input writes nothing. Under torchrun each rank writes its own rows.
"""
from __future__ import annotations

import json
import os
import resource
import sys


def add_arguments(p) -> None:
    p.add_argument("structures", nargs="+", metavar="STRUCTURE",
                   help="ase-readable structure files, CP2K .inp files or CP2K run folders")
    p.add_argument("--checkpoint", required=True,
                   help="trained checkpoint (best.pt / last.pt), or pretrained:NAME for a shipped one")
    p.add_argument("-o", "--output", required=True, help="output folder (created; files are added to it)")
    p.add_argument("--format", default="rows,gamma",
                   help="comma-separated: rows, gamma, npz, cp2k, sisl (default rows,gamma; see egnn.predict)")
    p.add_argument("--tile", default=None, help="repeat the cell, e.g. 2x2x2 (ase atoms.repeat)")
    p.add_argument("--with-overlap", action="store_true", help="also write the exact S(R) from PySCF")
    p.add_argument("--overlap-basis", default=None,
                   help="PySCF basis name for S (default: derived from the checkpoint's basis, e.g. gth-szv-molopt-sr)")
    p.add_argument("--edge-chunk", type=int, default=None,
                   help="edges per model chunk (bounds inference memory; default egnn.predict.DEFAULT_EDGE_CHUNK)")
    p.add_argument("--binary", action="store_true", help="cp2k format: binary (BINARY T) records")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier prediction of the same structure in OUT (only its own files)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--partition", choices=["low-nn", "metis", "linear"], default="low-nn",
                   help="graph partition when run under torchrun (WORLD_SIZE > 1)")
    p.add_argument("--no-memory-check", action="store_true", help="skip the peak-memory estimate check")
    p.add_argument("--json", action="store_true", help="print one JSON object with files, timings and bytes")


def _check_output(path):
    from ..errors import InputError

    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"-o {path}: exists and is not a folder; choose another output")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"-o {path}: {parent} is a file, so the output folder cannot be made; choose another output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"-o {path}: {parent} is not writable; choose another output folder")


def run(args) -> int:
    import torch

    from ..errors import InputError
    from ..graph import check_geometry
    from ..predict import (DEFAULT_EDGE_CHUNK, FORMATS, clean_stale_parts, existing_outputs, parse_tile,
                           predict_to_files, read_input)
    from ..train import model_from_checkpoint

    # --- everything that can fail on bad input happens before any prediction or file
    _check_output(args.output)
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"--format {args.format}: unknown {bad or 'empty'}; choose from {','.join(FORMATS)}")
    if "sisl" in formats and not args.with_overlap:
        raise InputError("--format sisl writes H and S (TBtrans needs both): add --with-overlap")
    reps = parse_tile(args.tile)
    if args.edge_chunk is not None and args.edge_chunk < 1:
        raise InputError(f"--edge-chunk {args.edge_chunk}: must be a positive number of edges")
    model = model_from_checkpoint(args.checkpoint)
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank on its own GPU (LOCAL_RANK), gloo for CPUs
        from ..distributed import init_distributed

        info = init_distributed(device="cuda" if args.device.startswith("cuda") else "cpu")
        device = str(info.device)
    try:
        model.to(torch.device(device))
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"--device {args.device}: not usable here ({exc}); use --device cpu") from None
    basis = model.basis
    inputs = []
    for path in args.structures:
        atoms, stem = read_input(path)
        try:
            basis.species_index(atoms.get_atomic_numbers())
        except InputError as exc:
            raise InputError(f"{path}: {exc} (checkpoint {args.checkpoint})") from None
        if reps != (1, 1, 1):
            if not atoms.get_pbc().all():
                raise InputError(f"{path}: --tile needs a structure periodic in all three directions")
            atoms = atoms.repeat(reps)
            stem = f"{stem}_{'x'.join(map(str, reps))}"
        check_geometry(atoms.get_positions(), atoms.get_cell().array, atoms.get_pbc(), float(model.config.r_cut), path)
        inputs.append((path, atoms, stem))
    stems = [s for _, _, s in inputs]
    if len(set(stems)) != len(stems):
        raise InputError(f"two inputs have the same name stem ({stems}); their files would collide — "
                         "rename one or predict them into separate folders")
    if not args.overwrite:
        for _, _, stem in inputs:
            old = existing_outputs(args.output, stem)
            if old:
                raise InputError(f"{args.output}: holds an earlier prediction of {stem!r} ({len(old)} files, e.g. "
                                 f"{os.path.basename(old[0])}); add --overwrite to replace them, or choose another -o")
    # memory and disk of every input before any is predicted: all or nothing
    from ..graph import radius_graph
    from ..predict import _check_fits, estimate

    from ..distributed import agree

    world = int(os.environ.get("WORLD_SIZE", "1"))

    def fits():
        for path, atoms, stem in inputs:
            est = estimate(radius_graph(atoms, float(model.config.r_cut)), model, formats,
                           args.edge_chunk or DEFAULT_EDGE_CHUNK, args.with_overlap, world, args.binary)
            _check_fits(est, formats, path, args.output)

    if not args.no_memory_check:
        agree(fits)  # under torchrun every rank stops if one does (each sees its own free memory)
    overlap_basis = None
    if args.with_overlap:
        from ..predict import check_overlap_basis

        overlap_basis = check_overlap_basis(basis, [el for _, a, _ in inputs for el in set(a.get_chemical_symbols())],
                                            args.overlap_basis)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        clean_stale_parts(args.output)
    chunk = args.edge_chunk or DEFAULT_EDGE_CHUNK
    report = {"checkpoint": os.path.abspath(args.checkpoint) if os.path.exists(args.checkpoint) else args.checkpoint,
              "output": os.path.abspath(args.output), "formats": list(formats), "structures": []}
    for path, atoms, stem in inputs:
        S = None
        if args.with_overlap and rank0:
            from ..predict import overlap_for

            S = overlap_for(atoms, basis, overlap_basis)
        info = predict_to_files(model, atoms, args.output, stem, formats, S=S, binary=args.binary, edge_chunk=chunk,
                                device=device, partition=args.partition, overwrite=args.overwrite,
                                progress=not args.json, check_memory=not args.no_memory_check,
                                extra_meta={"source": os.path.abspath(path), "checkpoint": report["checkpoint"],
                                            "tile": list(reps)})
        if info is None:  # another rank of a distributed run: rank 0 reports
            continue
        info["input"] = path
        report["structures"].append(info)
        if not args.json and rank0:
            print(f"{stem}: {info['atoms']} atoms, {info['edges']} edges, {info['nonzeros']:,} non-zeros in "
                  f"{info['total_s']:.1f} s; {len(info['files'])} files, {info['bytes'] / 2**20:,.1f} MiB -> "
                  f"{args.output}", file=sys.stderr)
    report["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.device(device).type == "cuda":  # the device's own peak: what bounds the structure size there
        report["peak_cuda_MB"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank's own peak, gathered on rank 0
        import torch.distributed as dist

        if dist.is_initialized():
            got = [None] * dist.get_world_size()
            dist.all_gather_object(got, report["peak_rss_MB"])
            report["peak_rss_MB_per_rank"] = got
            dist.destroy_process_group()
    if rank0:
        if args.json:
            print(json.dumps(report, default=str))
        else:
            for s in report["structures"]:
                for f in s["files"]:
                    print(f)
    return 0
