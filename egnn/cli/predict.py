"""egnn predict --checkpoint CK STRUCTURE... -o OUT [--tile 2x2x2] [--with-overlap] [--edge-chunk N]
[--binary] [--json] [--partition low-nn|metis|linear]

Writes OUT/<stem>_H.npz (H(Γ), eV, CP2K orbital order), the per-image npz and CP2K .csr files (see
egnn.predict). Every input is read and checked before OUT is created, so a bad input writes nothing.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time


def add_arguments(p) -> None:
    p.add_argument("structures", nargs="+", metavar="STRUCTURE",
                   help="ase-readable structure files, CP2K .inp files or CP2K run folders")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (best.pt / last.pt)")
    p.add_argument("-o", "--output", required=True, help="output folder (created; files are added to it)")
    p.add_argument("--tile", default=None, help="repeat the cell, e.g. 2x2x2 (ase atoms.repeat)")
    p.add_argument("--with-overlap", action="store_true", help="also write the exact S(R) from PySCF")
    p.add_argument("--overlap-basis", default=None,
                   help="PySCF basis name for S (default: derived from the checkpoint's basis, e.g. gth-szv-molopt-sr)")
    p.add_argument("--edge-chunk", type=int, default=None,
                   help="edges per model chunk (bounds inference memory; default egnn.predict.DEFAULT_EDGE_CHUNK)")
    p.add_argument("--binary", action="store_true", help="write CP2K .csr files in binary (BINARY T) form")
    p.add_argument("--no-csr", action="store_true", help="write only the npz files")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--partition", choices=["low-nn", "metis", "linear"], default="low-nn",
                   help="graph partition when run under torchrun (WORLD_SIZE > 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object with files and timings")


def run(args) -> int:
    import torch

    from ..errors import InputError
    from ..predict import DEFAULT_EDGE_CHUNK, parse_tile, predict_structure, read_input, write_prediction
    from ..train import model_from_checkpoint

    # --- everything that can fail on bad input happens before OUT exists
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"-o {args.output}: exists and is not a folder; choose another output")
    reps = parse_tile(args.tile)
    if args.edge_chunk is not None and args.edge_chunk < 1:
        raise InputError(f"--edge-chunk {args.edge_chunk}: must be a positive number of edges")
    model = model_from_checkpoint(args.checkpoint)
    try:
        model.to(torch.device(args.device))
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
        inputs.append((path, atoms, stem))
    stems = [s for _, _, s in inputs]
    if len(set(stems)) != len(stems):
        raise InputError(f"two inputs have the same name stem ({stems}); their files would collide — "
                         "rename one or predict them into separate folders")
    if args.with_overlap:
        from ..predict import check_overlap_basis

        overlap_basis = check_overlap_basis(basis, [el for _, a, _ in inputs for el in set(a.get_chemical_symbols())],
                                            args.overlap_basis)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    chunk = args.edge_chunk or DEFAULT_EDGE_CHUNK
    report = {"checkpoint": os.path.abspath(args.checkpoint), "output": os.path.abspath(args.output),
              "structures": []}
    for path, atoms, stem in inputs:
        t0 = time.perf_counter()
        HR, graph = predict_structure(model, atoms, edge_chunk=chunk, device=args.device,
                                      partition=args.partition, return_graph=True)
        t_pred = time.perf_counter() - t0
        if HR is None:  # another rank of a distributed run: rank 0 writes
            continue
        S = None
        if args.with_overlap:
            from ..predict import overlap_for

            S = overlap_for(atoms, basis, overlap_basis)
        t1 = time.perf_counter()
        info = {"input": path, "stem": stem, "atoms": len(atoms), "edges": graph.num_edges,
                "images": len(HR), "tile": list(reps), "predict_s": t_pred}
        files = write_prediction(args.output, stem, HR, basis, atoms, S=S, binary=args.binary,
                                 csr=not args.no_csr, extra_meta={"source": os.path.abspath(path),
                                                                  "checkpoint": report["checkpoint"],
                                                                  "edges": graph.num_edges, "r_cut": graph.r_cut})
        info.update(write_s=time.perf_counter() - t1, files=len(files),
                    H_gamma=os.path.join(args.output, f"{stem}_H.npz"))
        report["structures"].append(info)
        if not args.json and rank0:
            print(f"{stem}: {len(atoms)} atoms, {graph.num_edges} edges, {len(HR)} images; predicted in "
                  f"{t_pred:.1f} s, {len(files)} files -> {args.output}", file=sys.stderr)
    report["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank0:
        if args.json:
            print(json.dumps(report))
        else:
            for s in report["structures"]:
                print(s["H_gamma"])
    return 0
