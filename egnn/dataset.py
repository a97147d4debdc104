"""Converted datasets: CP2K/PySCF runs -> one .npz per structure + manifest.json; and the loader.

On disk (format "egnn-dataset", version 1)::

    DATASET/manifest.json     format, version, basis (OrbitalBasis.to_dict), units, r_cut, L_max,
                              node_width, edge_width, species pairs, per structure: file, source,
                              atoms, orbitals, edges, mode, coverage; dataset coverage summary
    DATASET/s00000.npz ...    numbers, positions [Å], cell [Å], pbc, src, dst, shift, mode, and the
                              targets as compact coupled values (float64, exact):
                              H: node_values/node_pair, edge_values/edge_pair   (real_space, direct)
                                 pair_values/pair_pair, pair_dst, pair_src,
                                 edge_fold, node_fold                           (folded Γ targets)
                              S: the same keys prefixed with "s_"

Loader API (what training consumes)::

    ds = egnn.dataset.Dataset("DATASET", dtype=torch.float32, overlap=False)
    len(ds); ds.basis; ds.r_cut; ds.manifest
    x = ds[i]                      # a Sample:
    x.atoms                        # ase.Atoms (positions as in the source)
    x.graph                        # egnn.graph.AtomGraph (float64 geometry, edges sorted by dst)
    x.species                      # [N] long, index into ds.basis.elements
    x.mode                         # 'real_space' | 'direct' | 'folded'
    x.node_target, x.node_mask     # [N, (L_max+1)², node_width] dtype / bool
    x.edge_target, x.edge_mask     # [E, (L_max+1)², edge_width] (None in 'folded' mode)
    x.pair_target, x.pair_mask     # 'folded' only: [P, (L_max+1)², edge_width] Γ blocks per atom pair
    x.edge_fold, x.node_fold       # 'folded' only: [E], [N] long pair index of each edge / node;
                                   # fold a prediction with `Sample.fold(node_out, edge_out)`
    x.overlap                      # with overlap=True: dict of the same targets for S

Targets are in eV in the coupled basis of egnn.blocks (mask True where a value exists). Loading a
structure is a few array reads and one masked scatter per tensor: no parsing, no CG transforms.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from . import blocks as B
from .basis import OrbitalBasis
from .errors import InputError

__all__ = ["convert", "Dataset", "Sample", "info", "verify", "is_dataset", "check_output", "FORMAT", "VERSION",
           "read_structure", "CONVERTER"]

FORMAT, VERSION = "egnn-dataset", 1
CONVERTER = "2"  # bump when convert() changes its output for the same inputs: cached conversions go stale
log = logging.getLogger("egnn")


def read_structure(path: str, basis_file=None):
    """A CP2K run folder or a PySCF npz as an egnn.io.Structure."""
    if os.path.isdir(path):
        from .io.cp2k import read_run
        return read_run(path, basis_file=basis_file)
    if path.endswith(".npz"):
        from .io.pyscf import read_npz
        return read_npz(path)
    raise InputError(f"{path}: neither a CP2K run folder nor a PySCF .npz")


def _union_basis(bases) -> OrbitalBasis:
    shells, names = {}, set()
    for b in bases:
        names.add(b.name)
        for el, ls in b.shells.items():
            if shells.setdefault(el, ls) != ls:
                raise InputError(f"element {el} has different shells in different runs ({shells[el]} vs {ls}); "
                                 "a dataset needs one basis per element")
    return OrbitalBasis(shells, "+".join(sorted(n for n in names if n)))


def _pack(prefix, ex, arrays):
    for key in ("node", "edge", "pair"):
        if key in ex:
            vals, pair = ex[key]
            arrays[f"{prefix}{key}_values"] = vals
            arrays[f"{prefix}{key}_pair"] = pair.astype(np.int16)
    if ex["mode"] == "folded":
        arrays[f"{prefix}pair_dst"] = ex["pair_dst"]
        arrays[f"{prefix}pair_src"] = ex["pair_src"]
        arrays[f"{prefix}edge_fold"] = ex["edge_pair"]
        arrays[f"{prefix}node_fold"] = ex["node_pair"]


def convert(sources, out: str, r_cut: float = 12.0, basis_file=None, overlap: bool = True,
            force: bool = False, progress: bool = False) -> dict:
    """Convert run folders / npz files into a dataset folder `out`; returns the manifest."""
    sources = list(sources)
    if not sources:
        raise InputError("egnn data convert: give at least one run folder")
    check_output(out, sources, force)
    structures = [read_structure(p, basis_file) for p in _progress(sources, progress, "read")]
    basis = _union_basis(s.basis for s in structures)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".part", dir=parent)
    try:
        manifest = _write_structures(tmp, sources, structures, basis, r_cut, overlap)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    with open(os.path.join(tmp, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    old = None
    if os.path.exists(out):  # an egnn dataset (check_output): set aside until the new one is in place
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".old", dir=parent)
        os.replace(out, os.path.join(old, "dataset"))
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old)
    return manifest


def is_dataset(path: str) -> bool:
    """True for a folder egnn wrote: its manifest.json parses and names egnn's format."""
    try:
        with open(os.path.join(path, "manifest.json")) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: str, sources, force: bool) -> None:
    """Refuse, before any work, an output that would destroy something: an input (or a folder that
    holds one, or one inside an input), the working or home directory, an existing folder egnn did
    not write (--force replaces only egnn datasets), a file, or an unwritable place."""
    o = os.path.realpath(out)
    for src in sources:
        r = os.path.realpath(src)
        if o == r or r.startswith(o + os.sep) or o.startswith(r + os.sep):
            raise InputError(f"-o {out}: the output {'is' if o == r else 'overlaps'} the input {src}; converting "
                             "would overwrite the source data. Choose an output folder outside the inputs")
    if o in (os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~")), os.path.sep):
        raise InputError(f"-o {out}: is the working, home or root directory; name a new folder for the dataset")
    if os.path.exists(o):
        if not os.path.isdir(o):
            raise InputError(f"-o {out}: exists and is a file; choose another output")
        if not force:
            raise InputError(f"{out} exists; choose another output or pass --force to replace it")
        if not is_dataset(o):
            raise InputError(f"-o {out}: --force replaces only a dataset folder egnn wrote (one with egnn's "
                             "manifest.json); this folder is not one, so it is left alone. Choose another output")
    parent = os.path.dirname(o)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"-o {out}: cannot create it in {parent} (not a writable folder)")


def verify(path: str) -> dict:
    """The manifest of a dataset whose every structure file is a complete npz (CRC-checked);
    InputError naming the first damaged file otherwise."""
    import zipfile

    m = read_manifest(path)
    for e in m["structures"]:
        f = os.path.join(path, e["file"])
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            raise InputError(f"{f}: damaged dataset file ({exc}); re-run `egnn data convert`") from None
        if bad is not None:
            raise InputError(f"{f}: damaged dataset file (member {bad} fails its CRC); re-run `egnn data convert`")
    return m


def _write_structures(tmp, sources, structures, basis, r_cut, overlap) -> dict:
    """One npz per structure into tmp; returns the manifest."""
    from .graph import radius_graph

    entries = []
    pairs = [(a, b) for a in basis.elements for b in basis.elements]
    for k, (src, s) in enumerate(zip(sources, structures)):
        s.basis = basis
        g = radius_graph(s.atoms, r_cut)
        cov = B.coverage(s.H, g, basis, s.gamma_only, name=src)
        ex = B.extract(s.H, g, basis, s.gamma_only)
        arrays = dict(numbers=s.atoms.get_atomic_numbers(), positions=s.atoms.get_positions(),
                      cell=s.atoms.get_cell().array, pbc=s.atoms.get_pbc(), src=g.src.astype(np.int32),
                      dst=g.dst.astype(np.int32), shift=g.shift.astype(np.int16), mode=np.array(ex["mode"]))
        _pack("", ex, arrays)
        if overlap and s.S is not None:
            _pack("s_", B.extract(s.S, g, basis, s.gamma_only, mode=ex["mode"] if s.gamma_only else None), arrays)
        fname = f"s{k:05d}.npz"
        np.savez(os.path.join(tmp, fname), **arrays)
        if not (np.isfinite(cov["frobenius"]) and np.isfinite(cov["nonzeros"])):
            raise InputError(f"{src}: the coverage of H by the graph is not finite; the matrices hold "
                             "non-finite or absurd values")
        entries.append({"file": fname, "source": os.path.abspath(src), "atoms": len(s.atoms),
                        "orbitals": s.n_orbitals, "edges": g.num_edges, "mode": ex["mode"],
                        "gamma_only": s.gamma_only, "coverage": cov})
    manifest = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "basis": basis.to_dict(), "units": {"H": "eV", "S": "1", "length": "angstrom"},
        "orbital_basis": "e3nn real spherical harmonics (y polar), l-major, coupled with so3.clebsch_gordan",
        "r_cut": float(r_cut), "L_max": basis.L_max, "node_width": B.node_width(basis),
        "edge_width": B.edge_width(basis), "pairs": [list(p) for p in pairs], "overlap": bool(overlap),
        "structures": entries,
        "coverage": {"min_frobenius": min(e["coverage"]["frobenius"] for e in entries),
                     "min_nonzeros": min(e["coverage"]["nonzeros"] for e in entries)},
    }
    return manifest


def _progress(it, on, desc):
    if not on:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc)


def read_manifest(path: str) -> dict:
    mf = os.path.join(path, "manifest.json")
    if not os.path.exists(mf):
        raise InputError(f"{path}: no manifest.json; not an egnn dataset (make one with `egnn data convert`)")
    try:
        with open(mf) as fh:
            m = json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{mf}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if m.get("format") != FORMAT:
        raise InputError(f"{mf}: format {m.get('format')!r} is not {FORMAT!r}")
    if m.get("version") != VERSION:
        raise InputError(f"{mf}: dataset version {m.get('version')} but this egnn reads version {VERSION}; "
                         "re-run `egnn data convert`")
    return m


@dataclass
class Sample:
    atoms: object
    graph: object
    species: object
    mode: str
    node_target: object = None
    node_mask: object = None
    edge_target: object = None
    edge_mask: object = None
    pair_target: object = None
    pair_mask: object = None
    pair_dst: object = None
    pair_src: object = None
    edge_fold: object = None
    node_fold: object = None
    overlap: dict = field(default_factory=dict)
    source: str = ""

    def fold(self, node_out, edge_out):
        """'folded' mode: per-pair Γ prediction [P, G, edge_width] = Σ of the edge outputs of each
        atom pair plus the node output for i == i (node_out is zero-padded to the edge width)."""
        return B.fold(node_out, edge_out, self.edge_fold, self.node_fold, len(self.pair_dst))


class Dataset:
    """Random access to a converted dataset (see the module docstring)."""

    def __init__(self, path: str, dtype=None, overlap: bool = False):
        import torch

        self.path = path
        self.manifest = read_manifest(path)
        self.basis = OrbitalBasis.from_dict(self.manifest["basis"])
        self.r_cut = self.manifest["r_cut"]
        self.dtype = dtype or torch.float32
        self.overlap = overlap
        self.pairs = [tuple(p) for p in self.manifest["pairs"]]
        if overlap and not self.manifest.get("overlap"):
            raise InputError(f"{path}: converted without S; re-run `egnn data convert` without --no-overlap")

    def __len__(self):
        return len(self.manifest["structures"])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def _targets(self, z, prefix, kind, width):
        import torch

        vals = torch.from_numpy(z[f"{prefix}{kind}_values"]).to(self.dtype)
        pair = z[f"{prefix}{kind}_pair"].astype(np.int64)
        return B.compact_to_padded(vals, pair, self.pairs, self.basis, width)

    def __getitem__(self, i: int) -> Sample:
        import torch
        from ase import Atoms

        from .graph import AtomGraph

        entry = self.manifest["structures"][i]
        f = os.path.join(self.path, entry["file"])
        import zipfile

        try:
            z = dict(np.load(f, allow_pickle=False))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{f}: cannot read ({type(exc).__name__}: {exc}); the dataset is damaged, re-run "
                             "`egnn data convert`") from None
        pos, cell, pbc = z["positions"], z["cell"], z["pbc"]
        src, dst, shift = z["src"].astype(np.int64), z["dst"].astype(np.int64), z["shift"].astype(np.int64)
        vec = pos[src] + shift @ cell - pos[dst]
        atoms = Atoms(numbers=z["numbers"], positions=pos, cell=cell, pbc=pbc)
        graph = AtomGraph(positions=pos, numbers=z["numbers"], cell=cell, pbc=pbc, r_cut=self.r_cut,
                          src=src, dst=dst, shift=shift, vec=vec)
        mode = str(z["mode"])
        wn, we = self.manifest["node_width"], self.manifest["edge_width"]
        s = Sample(atoms=atoms, graph=graph, species=torch.from_numpy(self.basis.species_index(z["numbers"])),
                   mode=mode, source=entry["source"])
        prefixes = [""] + (["s_"] if self.overlap else [])
        for prefix in prefixes:
            t = {}
            if mode == "folded":
                t["pair_target"], t["pair_mask"] = self._targets(z, prefix, "pair", we)
                t["pair_dst"] = torch.from_numpy(z[f"{prefix}pair_dst"])
                t["pair_src"] = torch.from_numpy(z[f"{prefix}pair_src"])
                t["edge_fold"] = torch.from_numpy(z[f"{prefix}edge_fold"])
                t["node_fold"] = torch.from_numpy(z[f"{prefix}node_fold"])
            else:
                t["node_target"], t["node_mask"] = self._targets(z, prefix, "node", wn)
                t["edge_target"], t["edge_mask"] = self._targets(z, prefix, "edge", we)
            if prefix:
                s.overlap = t
            else:
                for k, v in t.items():
                    setattr(s, k, v)
        return s


def info(path: str) -> dict:
    """Summary of a dataset (verified: every structure file is read and CRC-checked)."""
    m = verify(path)
    st = m["structures"]
    modes = {}
    for e in st:
        modes[e["mode"]] = modes.get(e["mode"], 0) + 1
    size = sum(os.path.getsize(os.path.join(path, e["file"])) for e in st if
               os.path.exists(os.path.join(path, e["file"])))
    return {"path": path, "format": m["format"], "version": m["version"], "structures": len(st),
            "atoms": sum(e["atoms"] for e in st), "orbitals": sum(e["orbitals"] for e in st),
            "edges": sum(e["edges"] for e in st), "modes": modes, "r_cut": m["r_cut"],
            "basis": m["basis"], "L_max": m["L_max"], "node_width": m["node_width"],
            "edge_width": m["edge_width"], "coverage": m["coverage"], "bytes": size}
