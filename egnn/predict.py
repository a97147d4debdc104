"""Inference: a structure -> predicted H(R) (and optionally the exact S(R) from PySCF) -> files.

Library::

    model = egnn.train.model_from_checkpoint("best.pt")
    atoms, stem = read_input("POSCAR.xyz")            # any ase-readable file, a CP2K .inp or run folder
    HR = predict_structure(model, atoms)               # {shift: csr} eV, internal (e3nn) orbital basis
    files = write_prediction("out/", stem, HR, model.basis, atoms.numbers)

Files per structure (orbitals in the input's atom order and CP2K's orbital order, H in eV)::

    <stem>_H.npz                      scipy.sparse.save_npz of H(Γ) = Σ_R H(R)
    <stem>_HR.npz                     every image: keys shifts [K, 3], n_orbitals and the CSR arrays
                                      (data, indices, indptr) of the images stacked as rows
                                      [K·n, n]; read back with `load_images`
    <stem>-KS_SPIN_1-1_0.csr          H(Γ) as CP2K writes it (Hartree)
    <stem>-KS_SPIN_1_R_<n>-1_0.csr    H of CP2K image n (Hartree), with the image table in
    <stem>_images.out                 CP2K's "KS CSR write| N periodic images" format
    <stem>_S.npz, <stem>_SR.npz, <stem>-S_SPIN_1*.csr   the same for S (--with-overlap)
    <stem>_meta.json                  atoms, orbitals, edges, images, units, conventions

CP2K indexes images relative to atoms wrapped into the cell (fractional s − ANINT(s)); the .csr
files follow that convention (entry (i, j) of our shift R is CP2K image R − n_i + n_j), so
`egnn.io.cp2k.read_run` reads them back exactly. The npz files use the shifts of the positions
as given (the graph convention: block [d, s](R) couples x_d with x_s + R·cell).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import scipy.sparse as sp
import torch

from .errors import EgnnError, InputError
from .blocks import gamma
from .io.cp2k import symmetrize  # noqa: F401  (re-exported; (H(R) + H(−R)ᵀ)/2 of the two edge predictions)
from .io.structure import parse_tile, read_input  # noqa: F401  (re-exported)

__all__ = ["read_input", "parse_tile", "predict_structure", "predict_blocks", "assemble_chunked",
           "symmetrize", "to_cp2k_order", "write_prediction", "load_images", "overlap_for", "check_overlap_basis",
           "pyscf_basis_name", "DEFAULT_EDGE_CHUNK"]

# About 40 kB of transient per-edge tensors per chunk edge on CPU (lmax 4, 16 channels): 20k edges
# keep the transient under 1 GB; the node and edge embeddings themselves are extra.
DEFAULT_EDGE_CHUNK = 20_000


# ----------------------------------------------------------------------------- inputs
# ----------------------------------------------------------------------------- prediction
def _distributed_outputs(model, graph, species, partition: str):
    """The torchrun path (WORLD_SIZE > 1): every rank predicts its rows, rank 0 gets them all."""
    try:
        from . import distributed as D
        predict_distributed = D.predict_distributed
    except (ImportError, AttributeError):
        raise EgnnError("distributed predict not available (egnn.distributed.predict_distributed is missing); "
                        "run egnn predict without torchrun") from None
    from .partition import partition as make_parts

    info = D.init_distributed()
    model.to(info.device)
    rank, size = D.world()
    parts = make_parts(graph, size, partition)
    node, edge = predict_distributed(model, graph, parts, species)
    return (node, edge) if rank == 0 else (None, None)


@torch.no_grad()
def predict_blocks(model, graph, edge_chunk: int | None = DEFAULT_EDGE_CHUNK, device=None, partition=None):
    """Coupled-basis (node_out [N, G, wn], edge_out [E, G, we]) of an AtomGraph. With torchrun
    (WORLD_SIZE > 1) and `partition` set, the graph is split over the ranks; ranks other than 0
    then return (None, None)."""
    species = model.basis.species_index(graph.numbers)
    if partition and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _distributed_outputs(model, graph, species, partition)
    p0 = next(model.parameters())
    device = torch.device(device) if device is not None else p0.device
    dtype = p0.dtype
    node, edge = model(torch.from_numpy(species).to(device), torch.from_numpy(graph.src).to(device),
                       torch.from_numpy(graph.dst).to(device),
                       torch.from_numpy(graph.vec).to(device=device, dtype=dtype), edge_chunk=edge_chunk or None)
    return node, edge


def assemble_chunked(graph, node_out, edge_out, basis, chunk: int = 100_000) -> dict:
    """blocks.assemble over edge ranges (bounded temporaries): {shift: csr} in the internal basis."""
    from .blocks import assemble
    from .graph import AtomGraph

    def sub(a, b):
        return AtomGraph(positions=graph.positions, numbers=graph.numbers, cell=graph.cell, pbc=graph.pbc,
                         r_cut=graph.r_cut, src=graph.src[a:b], dst=graph.dst[a:b], shift=graph.shift[a:b],
                         vec=graph.vec[a:b])

    E = graph.num_edges
    out = assemble(sub(0, min(chunk, E)), node_out, edge_out[:chunk], basis)  # nodes + first edges
    for a in range(chunk, E, chunk):
        for R, M in _assemble_edges(sub(a, min(a + chunk, E)), edge_out[a:a + chunk], basis).items():
            out[R] = out[R] + M if R in out else M
    return out


def _assemble_edges(g, edge_out, basis):
    """assemble() of edges only (no node blocks)."""
    from .blocks import _np, _shift_keys, _species_groups, from_coupled

    edge_out = _np(edge_out)
    numbers = np.asarray(g.numbers)
    offs = basis.orbital_offsets(numbers)
    n = int(offs[-1])
    rows, cols, vals, keys = [], [], [], []
    skey = _shift_keys(g.shift)
    for (za, zb), idx in _species_groups(numbers[g.dst], numbers[g.src]).items():
        Bk = from_coupled(edge_out[idx], za, zb, basis)
        na, nb = Bk.shape[1:]
        r = np.broadcast_to(offs[g.dst[idx]][:, None, None] + np.arange(na)[None, :, None], Bk.shape)
        c = np.broadcast_to(offs[g.src[idx]][:, None, None] + np.arange(nb)[None, None, :], Bk.shape)
        rows.append(r.ravel())
        cols.append(c.ravel())
        vals.append(Bk.ravel())
        keys.append(np.repeat(skey[idx], na * nb))
    out = {}
    if not rows:
        return out
    r, c, v, k = map(np.concatenate, (rows, cols, vals, keys))
    uk, inv = np.unique(k, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(uk) + 1))
    for g_, key in enumerate(uk):
        sel = order[bounds[g_]:bounds[g_ + 1]]
        R = (int(key // (2048 * 2048)) - 1024, int(key // 2048 % 2048) - 1024, int(key % 2048) - 1024)
        out[R] = sp.csr_matrix((v[sel], (r[sel], c[sel])), shape=(n, n))
    return out


def predict_structure(model, atoms, edge_chunk: int | None = DEFAULT_EDGE_CHUNK, device=None,
                      symmetric: bool = True, partition: str | None = None, return_graph: bool = False):
    """Predicted H(R) of an ase.Atoms as {shift: csr} (eV, internal e3nn orbital basis, shifts
    relative to the given positions). Edges go through the model `edge_chunk` at a time, so memory
    holds the node/edge embeddings and outputs but no per-edge intermediates of the whole graph.
    Returns None on ranks other than 0 of a distributed run; (HR, graph) with return_graph."""
    from .graph import radius_graph

    model.basis.species_index(atoms.get_atomic_numbers())  # unknown element -> InputError, before any work
    graph = radius_graph(atoms, float(model.config.r_cut))
    node, edge = predict_blocks(model, graph, edge_chunk, device, partition)
    if node is None:
        return (None, graph) if return_graph else None
    node, edge = node.float().cpu(), edge.float().cpu()
    HR = assemble_chunked(graph, node, edge, model.basis)
    del node, edge
    if symmetric:
        HR = symmetrize(HR)
    for M in HR.values():
        M.eliminate_zeros()
    return (HR, graph) if return_graph else HR


# ----------------------------------------------------------------------------- overlap (PySCF)
def pyscf_basis_name(cp2k_name: str) -> str:
    """'SZV-MOLOPT-SR-GTH' -> 'gth-szv-molopt-sr' (PySCF's name of the same MOLOPT set)."""
    import re

    name = re.sub(r"-q\d+$", "", cp2k_name.strip(), flags=re.I)
    name = re.sub(r"-GTH$", "", name, flags=re.I)
    return "gth-" + name.lower()


def check_overlap_basis(basis, elements, pyscf_basis: str | None = None) -> str:
    """The PySCF basis name for S, checked (cheaply, one atom per element) to give the checkpoint's
    shells for every element; InputError when PySCF or the basis is missing or does not match."""
    from ase.data import atomic_numbers

    from .basis import OrbitalBasis
    from .io.pyscf import _load_basis, _pyscf

    gto, _ = _pyscf()  # clear InputError when PySCF is missing
    name = pyscf_basis or (pyscf_basis_name(basis.name.split("+")[0]) if basis.name else None)
    if not name:
        raise InputError("--with-overlap: the checkpoint's basis has no name; give --overlap-basis "
                         "(a PySCF basis name like gth-szv-molopt-sr)")
    bas = _load_basis(name, sorted(set(elements)))
    for el in sorted(set(elements)):
        z = atomic_numbers[el]
        mol = gto.M(atom=[[el, (0.0, 0.0, 0.0)]], basis={el: bas[el]}, spin=z % 2, unit="Angstrom", verbose=0)
        ls = OrbitalBasis.from_pyscf(mol, name=name).shells[el]
        if tuple(basis.shells.get(el, ())) != tuple(ls):
            raise InputError(f"--with-overlap: PySCF basis {name!r} gives {el} shells {list(ls)} but the checkpoint "
                             f"has {list(basis.shells.get(el, ()))}; pass the matching --overlap-basis")
    return name


def overlap_for(atoms, basis, pyscf_basis: str | None = None) -> dict:
    """Exact S(R) of `atoms` from PySCF in the internal basis, checked to have the checkpoint's shells."""
    from .io.pyscf import overlap

    return overlap(atoms, check_overlap_basis(basis, atoms.get_chemical_symbols(), pyscf_basis))


# ----------------------------------------------------------------------------- files
def to_cp2k_order(M, basis, numbers):
    """Internal (e3nn) orbital order -> CP2K's: M_code = Tᵀ M T."""
    T = basis.transform(numbers, "cp2k")
    return (T.T @ sp.csr_matrix(M) @ T).tocsr()


def _save_images(path, MR_code: dict):
    keys = sorted(MR_code)
    n = next(iter(MR_code.values())).shape[0]
    big = sp.vstack([MR_code[R] for R in keys], format="csr")
    with open(path, "wb") as fh:
        np.savez(fh, shifts=np.array(keys, np.int64).reshape(-1, 3), n_orbitals=np.int64(n),
                 data=big.data, indices=big.indices, indptr=big.indptr)


def load_images(path: str) -> dict:
    """{shift: csr} from a <stem>_HR.npz / _SR.npz written by `write_prediction`."""
    try:
        z = np.load(path, allow_pickle=False)
        shifts, n = z["shifts"], int(z["n_orbitals"])
        big = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(len(shifts) * n, n))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not an egnn image file ({exc})") from None
    return {tuple(int(x) for x in R): big[k * n:(k + 1) * n].tocsr() for k, R in enumerate(shifts)}


def _cp2k_images(MR_code: dict, numbers, positions, cell, pbc, basis) -> dict:
    """Our shifts -> CP2K's image vectors: entry (i, j) of shift R belongs to R − n_i + n_j, with
    n = ANINT of the fractional positions (the inverse of egnn.io.cp2k's reader)."""
    from .io.cp2k import cp2k_wrap_offsets

    wrap = cp2k_wrap_offsets(positions, cell, pbc)
    if not wrap.any():
        return dict(MR_code)
    offs = basis.orbital_offsets(numbers)
    atom_of = np.repeat(np.arange(len(numbers)), np.diff(offs))
    n = int(offs[-1])
    acc: dict = {}
    for R, M in MR_code.items():
        C = M.tocoo()
        new = np.asarray(R, np.int64) - wrap[atom_of[C.row]] + wrap[atom_of[C.col]]
        keys, inv = np.unique(new, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        for k, key in enumerate(keys):
            sel = inv == k
            part = sp.csr_matrix((C.data[sel], (C.row[sel], C.col[sel])), shape=(n, n))
            key = tuple(int(x) for x in key)
            acc[key] = acc[key] + part if key in acc else part
    return acc


def _image_table(kind: str, keys) -> str:
    """The image table as CP2K prints it in the .out (egnn.io.cp2k.parse_out reads it)."""
    lines = [f" {kind} CSR write|{len(keys):>9d} periodic images", "     Number    X      Y      Z"]
    lines += [f"{k + 1:>11d}{R[0]:>7d}{R[1]:>7d}{R[2]:>7d}" for k, R in enumerate(keys)]
    return "\n".join(lines) + "\n"


def write_prediction(out_dir: str, stem: str, HR: dict, basis, atoms, S: dict | None = None,
                     binary: bool = False, csr: bool = True, extra_meta: dict | None = None) -> list[str]:
    """Write the files of one structure (see the module docstring) into `out_dir`. Everything is
    written into a temporary folder inside `out_dir` first and moved in at the end, so an
    interrupted run leaves no half-written file under the final names. Returns the paths."""
    numbers = atoms.get_atomic_numbers()
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{stem}.", suffix=".part", dir=out_dir)
    try:
        meta = {"format": "egnn-prediction-1", "stem": stem, "atoms": len(atoms),
                "symbols": atoms.get_chemical_formula(), "orbitals": int(basis.orbital_offsets(numbers)[-1]),
                "units": {"H": "eV in .npz, Hartree in .csr", "S": "1", "length": "angstrom"},
                "orbital_order": "input atom order; per atom CP2K's shells and m order",
                "npz_shifts": "relative to the given positions: block [d, s](R) couples x_d and x_s + R·cell",
                "csr_images": "CP2K's: relative to positions wrapped to s - ANINT(s)",
                "cell": np.asarray(atoms.get_cell()).tolist(), "pbc": atoms.get_pbc().tolist(),
                "basis": basis.to_dict(), **(extra_meta or {})}
        for name, MR, prefix in (("H", HR, "KS"), ("S", S, "S")):
            if MR is None:
                continue
            code = {R: to_cp2k_order(M, basis, numbers) for R, M in MR.items()}
            G = gamma(code)
            sp.save_npz(os.path.join(tmp, f"{stem}_{name}.npz"), G, compressed=False)
            _save_images(os.path.join(tmp, f"{stem}_{name}R.npz"), code)
            meta[f"{name}_images"] = len(code)
            meta[f"{name}_nnz"] = int(sum(M.nnz for M in code.values()))
            if csr:
                _write_csr_set(tmp, stem, prefix, name, G, code, numbers, atoms, basis, binary)
        with open(os.path.join(tmp, f"{stem}_meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        paths = []
        for f in sorted(os.listdir(tmp)):
            dst = os.path.join(out_dir, f)
            os.replace(os.path.join(tmp, f), dst)
            paths.append(dst)
        return paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_csr_set(tmp, stem, prefix, name, G, code, numbers, atoms, basis, binary):
    from .io.cp2k import write_csr

    kind = "H" if name == "H" else "S"
    write_csr(os.path.join(tmp, f"{stem}-{prefix}_SPIN_1-1_0.csr"), G, kind=kind, binary=binary)
    images = _cp2k_images(code, numbers, atoms.get_positions(), np.asarray(atoms.get_cell()), atoms.get_pbc(), basis)
    keys = sorted(images, key=lambda R: (any(R), R))  # (0, 0, 0) is image 1, as in CP2K
    for k, R in enumerate(keys):
        write_csr(os.path.join(tmp, f"{stem}-{prefix}_SPIN_1_R_{k + 1}-1_0.csr"), images[R], kind=kind, binary=binary)
    mode = "a" if os.path.exists(os.path.join(tmp, f"{stem}_images.out")) else "w"
    with open(os.path.join(tmp, f"{stem}_images.out"), mode) as fh:
        fh.write(_image_table(prefix, keys))

