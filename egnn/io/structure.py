"""Structures from files: any ase-readable file, a CP2K input, or a CP2K run folder; and tiling."""
from __future__ import annotations

import glob
import os

from ..errors import InputError

__all__ = ["read_input", "parse_tile", "tile"]


def read_input(path: str):
    """(ase.Atoms, stem) of a structure file (anything ase.io.read reads), a CP2K .inp, or a CP2K
    run folder (its one *.inp). CP2K positions are taken exactly as in &COORD (not wrapped)."""
    from ase import Atoms

    if os.path.isdir(path):
        inps = sorted(glob.glob(os.path.join(path, "*.inp")))
        if len(inps) != 1:
            raise InputError(f"{path}: a folder must hold exactly one CP2K input *.inp (found {len(inps)}); "
                             "give a structure file or the .inp instead")
        atoms, _ = read_input(inps[0])
        return atoms, os.path.basename(os.path.normpath(path))
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such structure file or CP2K run folder")
    stem = os.path.basename(path)
    for ext in (".gz", ".xz", ".bz2"):
        stem = stem[:-len(ext)] if stem.endswith(ext) else stem
    stem = os.path.splitext(stem)[0] or stem
    if path.lower().endswith(".inp"):
        from .cp2k import parse_inp

        inp = parse_inp(path)
        return Atoms(symbols=inp.symbols, positions=inp.positions, cell=inp.cell, pbc=inp.pbc), stem
    import ase.io

    try:
        atoms = ase.io.read(path)
    except Exception as exc:  # ase raises many types (StopIteration, ValueError, KeyError, ...)
        raise InputError(f"{path}: ase cannot read this structure ({type(exc).__name__}: {exc}); give an "
                         "extended XYZ, CIF, POSCAR or another ase-readable file, or a CP2K .inp") from None
    if isinstance(atoms, list):
        atoms = atoms[0]
    if len(atoms) == 0:
        raise InputError(f"{path}: the structure has no atoms")
    return atoms, stem


def parse_tile(text) -> tuple[int, int, int]:
    """'2x2x2' (or '2,2,2', or '2' for 2x2x2, or a sequence) -> (2, 2, 2); None -> (1, 1, 1)."""
    if text is None:
        return (1, 1, 1)
    parts = list(text) if isinstance(text, (tuple, list)) else str(text).lower().replace(",", "x").split("x")
    try:
        reps = tuple(int(p) for p in parts)
    except ValueError:
        reps = ()
    if len(reps) == 1:
        reps = reps * 3
    if len(reps) != 3 or min(reps) < 1:
        raise InputError(f"--tile {text!r}: expected three positive integers like 2x2x2")
    return reps


def tile(atoms, reps):
    """atoms.repeat(reps), refusing to repeat along a non-periodic axis."""
    reps = parse_tile(reps)
    if reps == (1, 1, 1):
        return atoms
    pbc = atoms.get_pbc()
    for d, r in enumerate(reps):
        if r > 1 and not pbc[d]:
            raise InputError(f"--tile: axis {'abc'[d]} is not periodic; tile only periodic axes")
    return atoms.repeat(reps)
