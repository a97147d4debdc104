"""The row-block layout of a predicted matrix: H(R) (or S(R)) written block of rows by block of rows,
so that neither the writer nor a reader ever holds the whole matrix.

    <stem>_H.rows/
        index.json                 what a reader needs first (below)
        atom_part.npy              int32 [atoms]: the index (in index.json's "parts") of each atom's part
        part-r00000-00000.npz      rows of some atoms, every image; one file per rank and chunk
        part-r00000-00001.npz
        ...

index.json: {"format": "egnn-rows-1", "matrix": "H" | "S", "units": "eV" | "1", "n_orbitals": n,
"atoms": N, "orbital_order": ..., "shift_convention": ..., "parts": [{"file", "rank", "atoms" (count),
"first_atom", "last_atom", "rows" (count), "nnz", "images"}], "images": [[Rx, Ry, Rz], ...] (the union),
"nnz": total}. Part files are uncompressed npz with
    atoms  int64 [a]       the atoms whose rows the part holds (ascending global ids)
    rows   int64 [r]       their orbital rows (ascending global orbital ids)
    shifts int64 [K, 3]    the images R present in these rows
    indptr, indices, data  one CSR of shape [K·r, n]: the r rows of image k are rows k·r .. (k+1)·r−1
Every row of the matrix is in exactly one part. One process writes its parts in ascending atom
ranges; under torchrun each rank writes the atoms it owns, so parts of different ranks interleave
and atom_part.npy says where a row is. Values: H in eV, S unitless, float64; orbitals in
the input's atom order and CP2K's shell and m order; block (i, j) of image R couples atom i at x_i
with atom j at x_j + R·cell (the positions as given, not wrapped).

`RowsWriter` writes parts (temp-then-rename per file), `write_index` the index, `iter_parts` reads
a folder part by part, `load_rows` reassembles {shift: csr [n, n]}.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

FORMAT = "egnn-rows-1"
__all__ = ["RowBlock", "RowsWriter", "write_index", "read_index", "iter_parts", "load_rows", "assemble", "FORMAT"]


@dataclass
class RowBlock:
    """Rows `rows` (of atoms `atoms`) of every image: {shift: csr [len(rows), n]}."""
    atoms: np.ndarray
    rows: np.ndarray
    images: dict

    @property
    def nnz(self) -> int:
        return int(sum(M.nnz for M in self.images.values()))


class RowsWriter:
    """Writes the parts of one rank into `folder` (created); `parts` lists what was written."""

    def __init__(self, folder: str, n_orbitals: int, rank: int = 0):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.n, self.rank, self.parts = folder, int(n_orbitals), int(rank), []

    def write(self, block: RowBlock) -> None:
        keys = sorted(block.images)
        r = len(block.rows)
        big = sp.vstack([block.images[R] for R in keys], format="csr") if keys else sp.csr_matrix((0, self.n))
        name = f"part-r{self.rank:05d}-{len(self.parts):05d}.npz"
        tmp = os.path.join(self.folder, name + ".part")
        with open(tmp, "wb") as fh:
            np.savez(fh, atoms=np.asarray(block.atoms, np.int64), rows=np.asarray(block.rows, np.int64),
                     shifts=np.asarray(keys, np.int64).reshape(-1, 3), indptr=big.indptr, indices=big.indices,
                     data=big.data.astype(np.float64, copy=False))
        os.replace(tmp, os.path.join(self.folder, name))
        atoms = np.asarray(block.atoms)
        self.parts.append({"file": name, "rank": self.rank, "atoms": int(len(atoms)), "atom_ids": atoms.tolist(),
                           "first_atom": int(atoms[0]) if len(atoms) else None,
                           "last_atom": int(atoms[-1]) if len(atoms) else None, "rows": r, "nnz": int(big.nnz),
                           "images": [list(R) for R in keys]})


def write_index(folder: str, parts: list[dict], meta: dict, atom_part=None) -> str:
    """index.json of a folder from the parts of every rank (sorted by their first atom) and the
    matrix's meta; with `atom_part` ([atoms] part index of every atom, in the sorted order) also
    atom_part.npy, which finds the part of any row without opening the others."""
    order = sorted(range(len(parts)), key=lambda k: (parts[k]["first_atom"] is None, parts[k]["first_atom"] or 0))
    parts = [parts[k] for k in order]
    if atom_part is not None:
        remap = np.empty(len(order), np.int64)
        remap[np.asarray(order, np.int64)] = np.arange(len(order))
        ap = remap[np.asarray(atom_part, np.int64)].astype(np.int32)
        tmp = os.path.join(folder, "atom_part.npy.part")
        with open(tmp, "wb") as fh:
            np.save(fh, ap)
        os.replace(tmp, os.path.join(folder, "atom_part.npy"))
    images = sorted({tuple(R) for p in parts for R in p["images"]})
    doc = {"format": FORMAT, **meta, "nnz": int(sum(p["nnz"] for p in parts)), "images": [list(R) for R in images],
           "parts": [{k: v for k, v in p.items() if k not in ("images", "atom_ids")} | {"images": len(p["images"])}
                     for p in parts],
           "orbital_order": "input atom order; per atom CP2K's shells (basis file order) and m = -l..l",
           "shift_convention": "block (i, j) of image R couples atom i at x_i with atom j at x_j + R·cell "
                               "(positions as given, not wrapped)",
           "part_layout": "npz: atoms, rows (global ids), shifts [K,3], CSR indptr/indices/data of shape "
                          "[K·len(rows), n_orbitals]; rows of image k are k·len(rows) .. (k+1)·len(rows)-1"}
    path = os.path.join(folder, "index.json")
    with open(path + ".part", "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(path + ".part", path)
    return path


def read_index(folder: str) -> dict:
    path = os.path.join(folder, "index.json")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{folder}: not an egnn row-block folder (index.json: {exc})") from None
    if doc.get("format") != FORMAT:
        raise InputError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
    return doc


def iter_parts(folder: str):
    """RowBlock of every part, in index order (sorted by first atom; one part in memory at a time)."""
    doc = read_index(folder)
    n = int(doc["n_orbitals"])
    for p in doc["parts"]:
        path = os.path.join(folder, p["file"])
        try:
            with np.load(path, allow_pickle=False) as z:
                rows, shifts = z["rows"], z["shifts"]
                big = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=(len(shifts) * len(rows), n))
                atoms = z["atoms"]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: unreadable part of {folder} ({exc})") from None
        r = len(rows)
        yield RowBlock(atoms, rows, {tuple(int(x) for x in R): big[k * r:(k + 1) * r] for k, R in enumerate(shifts)})


def assemble(blocks, n: int) -> dict:
    """{shift: csr [n, n]} from RowBlocks (each row in exactly one block)."""
    acc: dict = {}
    for blk in blocks:
        for R, M in blk.images.items():
            C = M.tocoo()
            acc.setdefault(R, []).append((blk.rows[C.row], C.col, C.data))
    out = {}
    for R, trip in acc.items():
        r, c, v = (np.concatenate(x) for x in zip(*trip))
        out[R] = sp.csr_matrix((v, (r, c)), shape=(n, n))
    return out


def load_rows(folder: str) -> dict:
    """The whole matrix {shift: csr [n, n]} from a row-block folder (all parts together)."""
    return assemble(iter_parts(folder), int(read_index(folder)["n_orbitals"]))
