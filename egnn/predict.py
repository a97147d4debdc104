"""Inference: a structure -> predicted H(R) (and optionally the exact S(R) from PySCF) -> files,
streamed block of rows by block of rows, so memory holds the model state and one chunk whatever the
structure's size.

Library::

    model = egnn.train.model_from_checkpoint("best.pt")
    atoms, stem = read_input("POSCAR.xyz")            # any ase-readable file, a CP2K .inp or run folder
    HR = predict_structure(model, atoms)               # in memory: {shift: csr} eV, internal (e3nn) basis
    report = predict_to_files(model, atoms, "out/", stem, formats=("rows", "gamma"))   # streamed

Files per structure (`--format`, comma separated; orbitals in the input's atom order and CP2K's
orbital order, H in eV unless said otherwise)::

    rows   <stem>_H.rows/                   H(R) by row blocks: index.json + part-r<rank>-<k>.npz
                                            (layout: egnn.io.rows); streamed, one part per chunk,
                                            written by the rank that owns the rows under torchrun
    gamma  <stem>_H.npz                     H(Γ) = Σ_R H(R), scipy.sparse.save_npz
    npz    <stem>_HR.npz                    every image: shifts [K, 3], n_orbitals and the CSR arrays of
                                            the images stacked as rows [K·n, n]; read with load_images
    cp2k   <stem>-KS_SPIN_1-1_0.csr         H(Γ) as CP2K writes it (Hartree; binary with --binary)
           <stem>-KS_SPIN_1_R_<n>-1_0.csr   H of CP2K image n, streamed, with the image table in
           <stem>_images.out                CP2K's "KS CSR write| N periodic images" form
    sisl   <stem>.TSHS                      sisl's Hamiltonian (H and S) for TBtrans (--with-overlap)
    always <stem>_meta.json                 atoms, orbitals, edges, images, units, conventions, files
    With --with-overlap the same formats for S (<stem>_S.rows, _S.npz, _SR.npz, -S_SPIN_1*.csr).

Default formats: rows and gamma. gamma, npz and sisl hold their whole matrix in memory while they
are written (after the model's state is freed); rows and cp2k never do.

CP2K indexes images relative to atoms wrapped into the cell (fractional s − ANINT(s)); the .csr
files follow that convention (entry (i, j) of our shift R is CP2K image R − n_i + n_j), so
`egnn.io.cp2k.read_run` reads them back exactly. The other files use the shifts of the positions
as given (the graph convention: block [d, s](R) couples x_d with x_s + R·cell).

H(R) is symmetric by construction: block [d, s](R) is ½(B_k + B_k'ᵀ) of the two edges that predict
it (k = (s → d, R) and its reverse k' = (d → s, −R)). Everything is written into a hidden
`.<stem>.*.part` folder and moved into place at the end: a killed run leaves no file under a
final name, and the next run removes such a folder (or reports it, when its writer is alive).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .errors import InputError
from .io import rows as rowfile
from .io.cp2k import symmetrize  # noqa: F401  (re-exported)
from .io.structure import parse_tile, read_input  # noqa: F401  (re-exported)

__all__ = ["read_input", "parse_tile", "predict_structure", "predict_to_files", "output_chunks", "row_blocks",
           "estimate", "symmetrize", "to_cp2k_order", "load_images", "overlap_for", "check_overlap_basis",
           "pyscf_basis_name", "DEFAULT_EDGE_CHUNK", "FORMATS", "DEFAULT_FORMATS", "clean_stale_parts"]

# About 40 kB of transient per-edge tensors per chunk edge on CPU (lmax 4, 16 channels): 20k edges
# keep the transient under 1 GB; the node and edge embeddings themselves are extra.
DEFAULT_EDGE_CHUNK = 20_000
TRANSIENT_BYTES_PER_EDGE = 40_000  # at (lmax+1)²·C = 400; scales with it
FORMATS = ("rows", "gamma", "npz", "cp2k", "sisl")
DEFAULT_FORMATS = ("rows", "gamma")
_IN_MEMORY = ("gamma", "npz", "sisl")


def log(msg: str) -> None:
    print(f"[egnn predict] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model outputs, chunk by chunk
@dataclass
class Chunk:
    """Coupled outputs that complete the rows of `atoms`: their node blocks, their incoming edges
    (global ids), those edges' outputs and the outputs of the edges' reverses."""
    atoms: np.ndarray
    node: torch.Tensor
    edges: np.ndarray
    edge: torch.Tensor
    reverse: torch.Tensor


def _parts_or_none(graph, partition):
    if not partition or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from . import distributed as D
    from .partition import partition as make_parts

    D.init_distributed()
    return np.asarray(make_parts(graph, D.world()[1], partition))


@torch.no_grad()
def output_chunks(model, graph, edge_chunk: int = DEFAULT_EDGE_CHUNK, device=None, partition: str | None = None,
                  progress: bool = False):
    """`Chunk`s of every atom (one process), or of the atoms this rank owns (torchrun with
    `partition`): the model runs `edge_chunk` edges at a time."""
    parts = _parts_or_none(graph, partition)
    if parts is not None:
        from .distributed import output_chunks as dist_chunks

        yield from dist_chunks(model, graph, parts, edge_chunk, device=device, progress=progress)
        return
    p0 = next(model.parameters())
    device = torch.device(device) if device is not None else p0.device
    t = lambda a, **k: torch.as_tensor(np.asarray(a), device=device, **k)  # noqa: E731
    species = t(model.basis.species_index(graph.numbers))
    rev = t(graph.reverse())
    bar = _bar(progress, len(model.layers) * max(1, -(-graph.num_edges // edge_chunk)), "layers x chunks")
    enc = model.encode(species, t(graph.src), t(graph.dst), t(graph.vec, dtype=p0.dtype), edge_chunk,
                       progress=bar.update if bar else None)
    if bar:
        bar.close()
    for oc in model.decode(enc):
        yield Chunk(np.arange(oc.lo, oc.hi), oc.node, np.arange(oc.a, oc.b), oc.edge,
                    model.edge_outputs(enc, rev[oc.a:oc.b]))


def _bar(on, total, desc):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"[egnn predict] {desc}", unit="chunk", file=sys.stderr, leave=False)


class _Blocks:
    """Coupled outputs -> orbital rows: per species pair the Clebsch-Gordan back-transform, the
    symmetrisation ½(B + B_reverseᵀ) and, for order "cp2k", CP2K's orbital order (Tᵀ B T per atom)."""

    def __init__(self, graph, basis, order: str = "cp2k"):
        self.graph, self.basis = graph, basis
        self.numbers = np.asarray(graph.numbers)
        self.offs = basis.orbital_offsets(self.numbers)
        self.n = int(self.offs[-1])
        self.T = {}
        for z in np.unique(self.numbers):
            na = basis.n_orbitals(basis._symbol(int(z)))
            self.T[int(z)] = (np.asarray(basis.transform(np.array([z]), "cp2k").todense()) if order == "cp2k"
                              else np.eye(na))

    def rows_of(self, atoms):
        return np.concatenate([np.arange(self.offs[a], self.offs[a + 1]) for a in atoms]) if len(atoms) else \
            np.zeros(0, np.int64)

    def __call__(self, ch: Chunk) -> rowfile.RowBlock:
        from .blocks import _np, _species_groups, from_coupled

        g, numbers, offs = self.graph, self.numbers, self.offs
        atoms = np.asarray(ch.atoms, np.int64)
        rows = self.rows_of(atoms)
        local = np.full(len(numbers) + 1, -1, np.int64)  # first local row of each block atom
        local[atoms] = np.concatenate([[0], np.cumsum(np.diff(offs)[atoms])[:-1]]) if len(atoms) else []
        r_all, c_all, v_all, k_all = [], [], [], []
        node = _np(ch.node)
        for (za, _), idx in _species_groups(numbers[atoms], numbers[atoms]).items():
            B = from_coupled(node[idx], za, za, self.basis)
            B = self.T[za].T @ (0.5 * (B + B.transpose(0, 2, 1))) @ self.T[za]
            self._coo(B, local[atoms[idx]], offs[atoms[idx]], np.zeros(len(idx), np.int64), r_all, c_all, v_all, k_all)
        if len(ch.edges):
            e = np.asarray(ch.edges, np.int64)
            d, s = g.dst[e], g.src[e]
            edge, rev = _np(ch.edge), _np(ch.reverse)
            shifts, inv = np.unique(g.shift[e], axis=0, return_inverse=True)
            inv = inv.reshape(-1) + 1
            for (zd, zs), idx in _species_groups(numbers[d], numbers[s]).items():
                B = from_coupled(edge[idx], zd, zs, self.basis)
                Br = from_coupled(rev[idx], zs, zd, self.basis)
                B = self.T[zd].T @ (0.5 * (B + Br.transpose(0, 2, 1))) @ self.T[zs]
                self._coo(B, local[d[idx]], offs[s[idx]], inv[idx], r_all, c_all, v_all, k_all)
        else:
            shifts = np.zeros((0, 3), np.int64)
        keys = np.concatenate([np.zeros((1, 3), np.int64), shifts])  # key 0 is R = 0 (the node blocks)
        r, c, v, k = (np.concatenate(x) for x in (r_all, c_all, v_all, k_all)) if r_all else [np.zeros(0)] * 4
        images = {}
        for key in np.unique(k).astype(np.int64):
            sel = k == key
            R = tuple(int(x) for x in keys[key])
            M = sp.csr_matrix((v[sel], (r[sel], c[sel])), shape=(len(rows), self.n))
            images[R] = M + images[R] if R in images else M
        return rowfile.RowBlock(atoms, rows, images)

    @staticmethod
    def _coo(B, row0, col0, key, r_all, c_all, v_all, k_all):
        na, nb = B.shape[1:]
        r = np.broadcast_to(row0[:, None, None] + np.arange(na)[None, :, None], B.shape)
        c = np.broadcast_to(col0[:, None, None] + np.arange(nb)[None, None, :], B.shape)
        r_all.append(r.ravel())
        c_all.append(c.ravel())
        v_all.append(B.ravel())
        k_all.append(np.repeat(key, na * nb))


def row_blocks(model, graph, edge_chunk: int = DEFAULT_EDGE_CHUNK, device=None, partition: str | None = None,
               order: str = "cp2k", progress: bool = False):
    """RowBlocks of the predicted H (this rank's rows under torchrun), in CP2K's orbital order (or
    the internal e3nn order with order="internal")."""
    make = _Blocks(graph, model.basis, order)
    for ch in output_chunks(model, graph, edge_chunk, device, partition, progress):
        yield make(ch)


def predict_structure(model, atoms, edge_chunk: int | None = DEFAULT_EDGE_CHUNK, device=None,
                      partition: str | None = None, return_graph: bool = False):
    """Predicted H(R) of an ase.Atoms as {shift: csr} (eV, internal e3nn orbital basis, shifts
    relative to the given positions), in memory. Under torchrun every rank returns its own rows only
    (use predict_to_files there). Returns (HR, graph) with return_graph."""
    from .graph import radius_graph

    model.basis.species_index(atoms.get_atomic_numbers())  # unknown element -> InputError, before any work
    graph = radius_graph(atoms, float(model.config.r_cut))
    n = int(model.basis.orbital_offsets(graph.numbers)[-1])
    HR = rowfile.assemble(row_blocks(model, graph, edge_chunk or max(1, graph.num_edges), device, partition,
                                     order="internal"), n)
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


def to_cp2k_order(M, basis, numbers):
    """Internal (e3nn) orbital order -> CP2K's: M_code = Tᵀ M T."""
    T = basis.transform(numbers, "cp2k")
    return (T.T @ sp.csr_matrix(M) @ T).tocsr()


def _split_rows(MR: dict, basis, numbers, atoms_per_block: int = 4096):
    """RowBlocks (CP2K order) of an in-memory {shift: csr} (internal order), atoms_per_block atoms each."""
    offs = basis.orbital_offsets(numbers)
    T = basis.transform(numbers, "cp2k")
    code = {R: (T.T @ M @ T).tocsr() for R, M in MR.items()}
    for a in range(0, len(numbers), atoms_per_block):
        atoms = np.arange(a, min(a + atoms_per_block, len(numbers)))
        r0, r1 = int(offs[atoms[0]]), int(offs[atoms[-1] + 1])
        yield rowfile.RowBlock(atoms, np.arange(r0, r1), {R: M[r0:r1] for R, M in code.items() if M[r0:r1].nnz})


# ----------------------------------------------------------------------------- files
def load_images(path: str) -> dict:
    """{shift: csr} from a <stem>_HR.npz / _SR.npz (format npz)."""
    try:
        z = np.load(path, allow_pickle=False)
        shifts, n = z["shifts"], int(z["n_orbitals"])
        big = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(len(shifts) * n, n))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not an egnn image file ({exc})") from None
    return {tuple(int(x) for x in R): big[k * n:(k + 1) * n].tocsr() for k, R in enumerate(shifts)}


def _image_table(kind: str, keys) -> str:
    """The image table as CP2K prints it in the .out (egnn.io.cp2k.parse_out reads it)."""
    lines = [f" {kind} CSR write|{len(keys):>9d} periodic images", "     Number    X      Y      Z"]
    lines += [f"{k + 1:>11d}{R[0]:>7d}{R[1]:>7d}{R[2]:>7d}" for k, R in enumerate(keys)]
    return "\n".join(lines) + "\n"


class _Cp2kStream:
    """CP2K's .csr files of one matrix, appended block by block (rows ascending): one file per CP2K
    image (numbered as they first appear, (0, 0, 0) first) and the Γ file; the image table at close."""

    def __init__(self, folder, stem, prefix, kind, binary, atoms, basis):
        from .io.cp2k import cp2k_wrap_offsets

        self.folder, self.stem, self.prefix, self.kind, self.binary = folder, stem, prefix, kind, binary
        numbers = atoms.get_atomic_numbers()
        offs = basis.orbital_offsets(numbers)
        self.atom_of = np.repeat(np.arange(len(numbers)), np.diff(offs))
        self.wrap = cp2k_wrap_offsets(atoms.get_positions(), np.asarray(atoms.get_cell()), atoms.get_pbc())
        self.index = {(0, 0, 0): 1}
        self.path(0)  # image 1 exists even when empty
        open(self.path(0), "wb").close()
        open(self._gamma(), "wb").close()

    def path(self, k):
        return os.path.join(self.folder, f"{self.stem}-{self.prefix}_SPIN_1_R_{k + 1}-1_0.csr")

    def _gamma(self):
        return os.path.join(self.folder, f"{self.stem}-{self.prefix}_SPIN_1-1_0.csr")

    def write(self, blk: rowfile.RowBlock) -> None:
        from .io.cp2k import append_csr

        per_image: dict = {}
        gam = []
        for R, M in blk.images.items():
            C = M.tocoo()
            rows = blk.rows[C.row]
            gam.append((rows, C.col, C.data))
            new = np.asarray(R, np.int64) - self.wrap[self.atom_of[rows]] + self.wrap[self.atom_of[C.col]]
            keys, inv = np.unique(new, axis=0, return_inverse=True)
            inv = inv.reshape(-1)
            for k, key in enumerate(keys):
                sel = inv == k
                per_image.setdefault(tuple(int(x) for x in key), []).append((rows[sel], C.col[sel], C.data[sel]))
        for key, trip in per_image.items():
            k = self.index.setdefault(key, len(self.index) + 1) - 1
            append_csr(self.path(k), *(np.concatenate(x) for x in zip(*trip)), kind=self.kind, binary=self.binary)
        if gam:
            r, c, v = (np.concatenate(x) for x in zip(*gam))
            G = sp.coo_matrix((v, (r, c))).tocsr()  # Σ over images, duplicates summed
            G.sum_duplicates()
            C = G.tocoo()
            append_csr(self._gamma(), C.row, C.col, C.data, kind=self.kind, binary=self.binary)

    def close(self) -> None:
        keys = sorted(self.index, key=self.index.get)
        with open(os.path.join(self.folder, f"{self.stem}_images.out"), "a") as fh:
            fh.write(_image_table(self.prefix, keys))


def _gamma_rows(blk: rowfile.RowBlock, n: int) -> sp.csr_matrix:
    """Σ_R of a block's rows: its rows of H(Γ) [len(rows), n]."""
    G = sp.csr_matrix((len(blk.rows), n))
    for M in blk.images.values():
        G = G + M
    return G.tocsr()


def _finalize(kind, rows_dir, tmp, stem, name, atoms, meta_extra):
    """An in-memory format from a finished row-block folder (after the model's state is freed).
    gamma sums each part's images as it reads it, so it never holds more than H(Γ)."""
    if kind == "gamma":
        n = int(rowfile.read_index(rows_dir)["n_orbitals"])
        rows, mats = [], []
        for blk in rowfile.iter_parts(rows_dir):
            rows.append(blk.rows)
            mats.append(_gamma_rows(blk, n))
        order = np.argsort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
        G = sp.vstack(mats, format="csr")[order] if mats else sp.csr_matrix((n, n))
        sp.save_npz(os.path.join(tmp, f"{stem}_{name}.npz"), G, compressed=False)
        return
    MR = rowfile.load_rows(rows_dir)
    if kind == "npz":
        keys = sorted(MR)
        big = sp.vstack([MR[R] for R in keys], format="csr")
        with open(os.path.join(tmp, f"{stem}_{name}R.npz"), "wb") as fh:
            np.savez(fh, shifts=np.array(keys, np.int64).reshape(-1, 3), n_orbitals=np.int64(big.shape[1]),
                     data=big.data, indices=big.indices, indptr=big.indptr)


def _write_sisl(tmp, stem, atoms, basis, H_dir, S_dir):
    from .io.sisl import write_tshs

    write_tshs(os.path.join(tmp, f"{stem}.TSHS"), atoms, basis, rowfile.load_rows(H_dir), rowfile.load_rows(S_dir))


# ----------------------------------------------------------------------------- honesty: estimates, stale parts
def _available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit if any."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                lim = fh.read().strip()
            if lim.isdigit() and int(lim) < (1 << 60):
                used = 0
                for upath in ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
                    if os.path.exists(upath):
                        with open(upath) as fh:
                            used = int(fh.read().strip())
                        break
                avail = min(avail or int(lim), int(lim) - used)
        except (OSError, ValueError):
            continue
    return avail


BASE_BYTES = 450 * 2 ** 20  # python + torch + egnn before any data (measured: bench_predict.py)


def estimate(graph, model, formats, edge_chunk: int, overlap: bool = False, ranks: int = 1,
             binary: bool = True) -> dict:
    """Peak memory (bytes per process) and output size (bytes per format) of a prediction, before it
    runs: the interpreter, the graph (every rank holds the global one), the model state (node and
    edge embeddings of its share), one chunk's transients and one block of rows while streaming,
    the reverse-edge buffers of a distributed run; at the end, the in-memory formats (gamma holds
    H(Γ); npz and sisl the whole H(R)), once the model state is freed."""
    cfg = model.config
    K, C = (cfg.lmax + 1) ** 2, cfg.channels
    E, N = graph.num_edges, graph.num_nodes
    norb = np.diff(model.basis.orbital_offsets(graph.numbers))
    nnz = int(E * float(np.mean(norb) ** 2) + float(np.sum(norb ** 2)))  # one block per edge and node
    e_loc, n_loc = E / ranks, N / ranks
    G, we = (model.L_max + 1) ** 2, max(model.edge_counts)
    graph_b = E * 72  # src, dst, shift, vec (numpy) + reverse index: the global graph on every rank
    state = e_loc * (K * C * 4 + 40) + n_loc * K * C * 4 * (len(model.layers) + 3)
    chunk = min(edge_chunk, max(E, 1)) * TRANSIENT_BYTES_PER_EDGE * (K * C) / 400
    block = min(edge_chunk, max(E, 1)) * 2 * float(np.mean(norb) ** 2) * 48
    reverse = 0.0
    if ranks > 1:  # edges with a remote src: their outputs sent and the reverses received
        reverse = 2 * e_loc * 0.5 * G * we * 4
    stream = BASE_BYTES + graph_b + state + chunk + block + reverse
    mats = 2 if overlap else 1
    per_nnz = {"gamma": 60, "npz": 48, "sisl": 64}  # measured peaks of each finishing step, bytes per non-zero
    final = BASE_BYTES + graph_b + max([0] + [per_nnz[f] * nnz * mats for f in formats if f in _IN_MEMORY])
    out = {"rows": nnz * 12 * mats, "gamma": nnz * 12 * mats, "npz": nnz * 12 * mats,
           "cp2k": nnz * (24 if binary else 40) * 2 * mats, "sisl": nnz * 24 * mats}
    return {"peak_bytes": int(max(stream, final)), "stream_bytes": int(stream), "finalize_bytes": int(final),
            "nonzeros": nnz, "output_bytes": {f: int(out[f]) for f in formats}, "edges": E, "atoms": N}


def _check_fits(est: dict, formats, where: str, out_dir: str) -> None:
    """Memory (this process times the ranks on this node) and disk, before any work."""
    avail = _available_memory()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 1
    need = est["peak_bytes"] * local
    if avail is not None and need >= 0.9 * avail:
        hints = []
        if any(f in _IN_MEMORY for f in formats):
            hints.append("--format rows (or rows,cp2k): formats that never hold the whole matrix")
        hints.append("--edge-chunk 5000 (smaller chunk transients)")
        hints.append("torchrun with more ranks over more nodes (each rank holds its share of the state)")
        raise InputError(f"{where}: the prediction needs about {_human(need)}"
                         f"{f' ({local} ranks on this node)' if local > 1 else ''} ({est['edges']:,} edges, "
                         f"{est['nonzeros']:,} non-zeros) but {_human(avail)} are available; try " + "; or ".join(hints))
    where_disk = os.path.abspath(out_dir)
    while not os.path.exists(where_disk):
        where_disk = os.path.dirname(where_disk)
    free = shutil.disk_usage(where_disk).free
    size = sum(est["output_bytes"].values())
    if size >= 0.95 * free:
        raise InputError(f"{where}: the output needs about {_human(size)} ("
                         + ", ".join(f"{f} {_human(b)}" for f, b in est["output_bytes"].items())
                         + f") but {out_dir} has {_human(free)} free; write fewer formats (--format rows), binary CP2K "
                         "files (--binary), or choose another -o")


def _human(b) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2 ** 30 else f"{b / 2**20:.1f} MiB"


def clean_stale_parts(out_dir: str) -> list[str]:
    """Remove the `.part` folders egnn left in out_dir from killed runs: its marker names a process
    on this host that no longer runs. Report, and leave, the others: a writer that is alive, a
    writer on another host (a shared file system), a `.part` folder without egnn's marker."""
    removed = []
    if not os.path.isdir(out_dir):
        return removed
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if not (name.startswith(".") and name.endswith(".part") and os.path.isdir(path)):
            continue
        marker = os.path.join(path, "egnn-partial.json")
        if not os.path.isfile(marker):
            log(f"{path}: a partial folder without egnn's marker ({_human(_size(path))}); left alone, remove it "
                "yourself if a killed run left it")
            continue
        try:
            with open(marker) as fh:
                info = json.load(fh)
        except (OSError, json.JSONDecodeError):
            info = {}
        if info.get("host") != socket.gethostname():
            log(f"{path}: partial output of {info.get('stem')!r} written from host {info.get('host')!r}; left alone "
                "(it may still run there)")
            continue
        if _pid_alive(int(info.get("pid", -1))):
            log(f"{path}: a prediction of {info.get('stem')!r} started {info.get('started')} is still being written "
                f"by process {info.get('pid')}; left alone")
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log(f"removed {path}: partial output of a run that was killed ({info.get('stem')!r}, "
            f"started {info.get('started')})")
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _egnn_names(stem: str):
    """The names egnn's writers give a structure's files (exactly: never a prefix match)."""
    s = re.escape(stem)
    return re.compile(rf"{s}_(H|S)\.rows|{s}_(H|S)R?\.npz|{s}-(KS|S)_SPIN_1(_R_\d+)?-1_0\.csr|{s}_images\.out|"
                      rf"{s}\.TSHS|{s}_meta\.json")


def existing_outputs(out_dir: str, stem: str) -> list[str]:
    """Files of an earlier prediction of `stem` in out_dir: the names egnn writes for that stem, and
    only those (a meta.json's file list is trusted only where it names such files)."""
    if not os.path.isdir(out_dir):
        return []
    names = _egnn_names(stem)
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if names.fullmatch(f))


# ----------------------------------------------------------------------------- the whole job
def predict_to_files(model, atoms, out_dir: str, stem: str, formats=DEFAULT_FORMATS, *, S: dict | None = None,
                     binary: bool = False, edge_chunk: int = DEFAULT_EDGE_CHUNK, device=None,
                     partition: str | None = None, overwrite: bool = False, progress: bool = False,
                     extra_meta: dict | None = None, check_memory: bool = True) -> dict:
    """Predict H of `atoms` and write the requested formats (module docstring) into out_dir,
    streamed. Under torchrun (WORLD_SIZE > 1, `partition` given) every rank writes the row blocks of
    the atoms it owns and rank 0 the index and metadata; only the rows format is allowed there.
    Returns a report (timings, bytes, files) on rank 0, None elsewhere."""
    from .graph import radius_graph

    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"--format {','.join(formats)}: unknown {bad}; choose from {','.join(FORMATS)}")
    if "sisl" in formats and S is None:
        raise InputError("--format sisl writes H and S (TBtrans needs both): add --with-overlap")
    world = int(os.environ.get("WORLD_SIZE", "1")) if partition else 1
    if world > 1 and set(formats) - {"rows"}:
        raise InputError(f"--format {','.join(formats)} under torchrun: ranks write only their own rows (format "
                         "rows); convert afterwards in one process, or predict without torchrun")
    rank = 0
    if world > 1:
        from .distributed import init_distributed

        rank = init_distributed().rank
    times = {}
    t0 = time.perf_counter()
    graph = radius_graph(atoms, float(model.config.r_cut))
    times["graph_s"] = time.perf_counter() - t0
    if progress and rank == 0:
        log(f"{stem}: {len(atoms):,} atoms, {graph.num_edges:,} edges within {graph.r_cut:g} Å "
            f"({graph.num_edges / max(times['graph_s'], 1e-9):,.0f} edges/s)")
    est = estimate(graph, model, formats, edge_chunk, S is not None, world, binary)
    if progress and rank == 0:
        log(f"{stem}: estimated peak memory {_human(est['peak_bytes'])} per process, output "
            + ", ".join(f"{f} {_human(b)}" for f, b in est["output_bytes"].items()))
    if check_memory:
        _check_fits(est, formats, stem, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    old = existing_outputs(out_dir, stem)
    if old and not overwrite:
        raise InputError(f"{out_dir}: holds an earlier prediction of {stem!r} ({len(old)} files, e.g. "
                         f"{os.path.basename(old[0])}); add --overwrite to replace them, or choose another -o")
    tmp = _shared_part_dir(out_dir, stem, world, rank)
    try:
        names = ("H",) + (("S",) if S is not None else ())
        rows_dirs = {nm: os.path.join(tmp, f"{stem}_{nm}.rows") for nm in names}
        writer = rowfile.RowsWriter(rows_dirs["H"], int(model.basis.orbital_offsets(graph.numbers)[-1]), rank)
        cp2k = _Cp2kStream(tmp, stem, "KS", "H", binary, atoms, model.basis) if "cp2k" in formats else None
        t1 = time.perf_counter()
        nb, bar = 0, None
        for blk in row_blocks(model, graph, edge_chunk, device, partition, "cp2k", progress and rank == 0):
            if bar is None:  # after the layers' own bar: the heads and the writers, chunk by chunk
                times["layers_s"] = time.perf_counter() - t1
                bar = _bar(progress and rank == 0, max(1, -(-graph.num_edges // edge_chunk)), "heads and rows")
            writer.write(blk)
            if cp2k:
                cp2k.write(blk)
            nb += blk.nnz
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        times["predict_and_write_rows_s"] = time.perf_counter() - t1
        if progress and rank == 0:
            log(f"{stem}: model and row blocks in {times['predict_and_write_rows_s']:.1f} s "
                f"({graph.num_edges / max(times['predict_and_write_rows_s'], 1e-9):,.0f} edges/s, {nb:,} non-zeros"
                f"{' on this rank' if world > 1 else ''})")
        if cp2k:
            cp2k.close()
        parts = _gather_parts(writer.parts, world)
        if rank != 0:
            _barrier(world)
            return None
        meta = {"n_orbitals": writer.n, "atoms": len(atoms), "matrix": "H", "units": "eV"}
        rowfile.write_index(rows_dirs["H"], parts, meta, _atom_part(parts, len(atoms)))
        if S is not None:  # S from PySCF, in memory already: written on rank 0
            swriter = rowfile.RowsWriter(rows_dirs["S"], writer.n, 0)
            scp2k = _Cp2kStream(tmp, stem, "S", "S", binary, atoms, model.basis) if "cp2k" in formats else None
            for blk in _split_rows(S, model.basis, atoms.get_atomic_numbers()):
                swriter.write(blk)
                if scp2k:
                    scp2k.write(blk)
            if scp2k:
                scp2k.close()
            rowfile.write_index(rows_dirs["S"], swriter.parts, {**meta, "matrix": "S", "units": "1"},
                                _atom_part(swriter.parts, len(atoms)))
        t2 = time.perf_counter()
        for kind in ("gamma", "npz"):
            if kind in formats:
                for nm in names:
                    t = time.perf_counter()
                    _finalize(kind, rows_dirs[nm], tmp, stem, nm, atoms, extra_meta)
                    if progress:
                        log(f"{stem}: {kind} {nm} written in {time.perf_counter() - t:.1f} s")
        if "sisl" in formats:
            t = time.perf_counter()
            _write_sisl(tmp, stem, atoms, model.basis, rows_dirs["H"], rows_dirs["S"])
            if progress:
                log(f"{stem}: sisl .TSHS written in {time.perf_counter() - t:.1f} s")
        if "rows" not in formats:
            for d in rows_dirs.values():
                shutil.rmtree(d)
        times["finalize_s"] = time.perf_counter() - t2
        files = sorted(f for f in os.listdir(tmp) if f != "egnn-partial.json")
        meta = {"format": "egnn-prediction-2", "stem": stem, "atoms": len(atoms),
                "symbols": atoms.get_chemical_formula(), "orbitals": writer.n, "edges": graph.num_edges,
                "r_cut": graph.r_cut, "formats": list(formats), "ranks": world, "nonzeros_H": int(sum(p["nnz"] for p in parts)),
                "H_images": len({tuple(R) for p in writer.parts for R in p["images"]}) if world == 1 else None,
                "units": {"H": "eV (Hartree in .csr)", "S": "1", "length": "angstrom"},
                "orbital_order": "input atom order; per atom CP2K's shells and m order",
                "shifts": "relative to the given positions: block [d, s](R) couples x_d and x_s + R·cell",
                "csr_images": "CP2K's: relative to positions wrapped to s - ANINT(s)",
                "cell": np.asarray(atoms.get_cell()).tolist(), "pbc": atoms.get_pbc().tolist(),
                "basis": model.basis.to_dict(), "files": files + [f"{stem}_meta.json"], **(extra_meta or {})}
        with open(os.path.join(tmp, f"{stem}_meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        for f in old:  # --overwrite: only the earlier prediction's own files
            shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
        final = []
        for f in sorted(os.listdir(tmp)):
            if f == "egnn-partial.json":
                continue
            os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
            final.append(os.path.join(out_dir, f))
        _barrier(world)
        times["total_s"] = time.perf_counter() - t0
        return {"stem": stem, "atoms": len(atoms), "edges": graph.num_edges, "nonzeros": meta["nonzeros_H"],
                "files": final, "bytes": int(sum(_size(f) for f in final)), "estimate": est, **times}
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def _shared_part_dir(out_dir, stem, world, rank) -> str:
    """The hidden `.part` folder of this prediction (rank 0 makes it, the others learn its name)."""
    name = None
    if rank == 0:
        name = tempfile.mkdtemp(prefix=f".{stem}.", suffix=".part", dir=out_dir)
        with open(os.path.join(name, "egnn-partial.json"), "w") as fh:
            json.dump({"stem": stem, "pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)
    if world > 1:
        import torch.distributed as dist

        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def _atom_part(parts, n_atoms):
    """Part index of every atom (parts carry their atom lists until the index is written)."""
    ap = np.full(n_atoms, -1, np.int64)
    for k, p in enumerate(parts):
        ap[np.asarray(p.pop("atom_ids"), np.int64)] = k
    if (ap < 0).any():
        raise InputError(f"row blocks: {int((ap < 0).sum())} atoms are in no part; the ranks' outputs are incomplete")
    return ap


def _gather_parts(parts, world):
    if world == 1:
        return parts
    import torch.distributed as dist

    got = [None] * world
    dist.all_gather_object(got, parts)
    return [p for g in got for p in g]


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
