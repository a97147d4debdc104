"""Orbital bases: per element the list of shells (l values) and the coupled-basis layout of blocks.

A block H[d, s] between an atom of element a (rows) and one of element b (columns) is made of
shell-pair sub-blocks l_a x l_b. Each couples to ⊕ L, L = |l_a − l_b| .. l_a + l_b (Clebsch-Gordan).
The model predicts, for every degree L, `channels[L]` channels; the layout says which channel of
which L holds which (shell pair, L) for a given species pair, and the rest is padding (masked).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from .errors import InputError

__all__ = ["OrbitalBasis", "CoupledEntry", "code_to_e3nn"]

SHELL_LETTERS = "spdfghi"


@dataclass(frozen=True)
class CoupledEntry:
    """Shell pair (i of the row element, j of the column element) coupled to degree L at channel c."""

    i: int
    j: int
    la: int
    lb: int
    L: int
    c: int


@dataclass(frozen=True)
class OrbitalBasis:
    """Element symbol -> tuple of shell l values in the code's order, e.g. {"O": (0, 1)}."""

    shells: dict = field(hash=False)
    name: str = ""

    def __post_init__(self):
        clean = {}
        for el, ls in self.shells.items():
            if el not in atomic_numbers:
                raise InputError(f"OrbitalBasis: unknown element {el!r}; use chemical symbols like 'Hf'")
            ls = tuple(int(l) for l in ls)
            if not ls or min(ls) < 0:
                raise InputError(f"OrbitalBasis: element {el} needs a non-empty list of shell l >= 0, got {ls}")
            clean[el] = ls
        object.__setattr__(self, "shells", dict(sorted(clean.items(), key=lambda kv: atomic_numbers[kv[0]])))

    def __hash__(self):
        return hash((self.name, tuple((k, v) for k, v in self.shells.items())))

    # ---------------------------------------------------------------- per element / structure
    @property
    def elements(self) -> list[str]:
        return list(self.shells)

    @property
    def lmax(self) -> int:
        """Largest shell l of any element."""
        return max(max(ls) for ls in self.shells.values())

    @property
    def L_max(self) -> int:
        """Largest coupled degree L any block needs (2·lmax): the model's lmax must reach it."""
        return 2 * self.lmax

    def n_orbitals(self, element) -> int:
        return sum(2 * l + 1 for l in self.shells[self._symbol(element)])

    def shell_offsets(self, element) -> list[int]:
        off, out = 0, []
        for l in self.shells[self._symbol(element)]:
            out.append(off)
            off += 2 * l + 1
        return out

    def _symbol(self, element) -> str:
        el = chemical_symbols[int(element)] if isinstance(element, (int, np.integer)) else element
        if el not in self.shells:
            raise InputError(f"element {el} is not in the orbital basis {self.name or ''} "
                             f"(it has {', '.join(self.shells)}); add its shells to the basis")
        return el

    def orbital_offsets(self, numbers) -> np.ndarray:
        """Start of every atom's orbitals in the global AO order (atoms contiguous), plus the total."""
        counts = [self.n_orbitals(int(z)) for z in numbers]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def species_index(self, numbers) -> np.ndarray:
        """Index of each atom's element in `elements` (the model's species ids)."""
        lookup = {atomic_numbers[e]: k for k, e in enumerate(self.elements)}
        try:
            return np.array([lookup[int(z)] for z in numbers], dtype=np.int64)
        except KeyError as exc:
            raise InputError(f"element {chemical_symbols[exc.args[0]]} is not in the orbital basis "
                             f"(it has {', '.join(self.elements)}); add its shells") from None

    # ---------------------------------------------------------------- coupled layout
    def pair_layout(self, a, b) -> tuple[CoupledEntry, ...]:
        return _pair_layout(self, self._symbol(a), self._symbol(b))

    def channels(self, pairs=None) -> list[int]:
        """Channels needed per L = 0..L_max: the largest count over the species pairs (all ordered
        pairs by default)."""
        pairs = pairs if pairs is not None else [(a, b) for a in self.elements for b in self.elements]
        n = [0] * (self.L_max + 1)
        for a, b in pairs:
            for e in self.pair_layout(a, b):
                n[e.L] = max(n[e.L], e.c + 1)
        return n

    def node_channels(self) -> list[int]:
        return self.channels([(a, a) for a in self.elements])

    def edge_channels(self) -> list[int]:
        return self.channels()

    @classmethod
    def explicit(cls, shells: dict, name: str = "") -> "OrbitalBasis":
        """From {element: [l, ...]} or {element: "ssppd"}."""
        parsed = {el: [SHELL_LETTERS.index(c) for c in ls] if isinstance(ls, str) else list(ls)
                  for el, ls in shells.items()}
        return cls(parsed, name)

    def to_dict(self) -> dict:
        return {"name": self.name, "shells": {el: list(ls) for el, ls in self.shells.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "OrbitalBasis":
        return cls(d["shells"], d.get("name", ""))

    @classmethod
    def from_cp2k(cls, basis_file, kinds: dict, name: str = "") -> "OrbitalBasis":
        """From CP2K basis-set names, {element: "DZVP-MOLOPT-SR-GTH"} (the &KIND ... BASIS_SET).

        `basis_file` is a CP2K basis file (BASIS_MOLOPT format) or None: then
        /usr/share/cp2k/BASIS_MOLOPT when present, else the shell structures embedded in
        egnn.io.cp2k (MOLOPT SZV/DZVP, with and without -SR). Shell order is CP2K's: set by set,
        l = lmin..lmax inside a set, nshell(l) shells each.
        """
        from .io.cp2k import basis_shells

        shells = {el: basis_shells(el, bname, basis_file) for el, bname in kinds.items()}
        return cls(shells, name or "+".join(sorted(set(kinds.values()))))

    @classmethod
    def from_pyscf(cls, cell, name: str = "") -> "OrbitalBasis":
        """From a pyscf Mole/Cell: the shells of each element in PySCF's AO order (a shell with
        several contractions counts once per contraction, as PySCF orders them)."""
        shells: dict = {}
        for ib in range(cell.nbas):
            el = cell.atom_pure_symbol(cell.bas_atom(ib))
            shells.setdefault(cell.bas_atom(ib), (el, []))[1].extend(
                [cell.bas_angular(ib)] * cell.bas_nctr(ib))
        out: dict = {}
        for ia, (el, ls) in shells.items():
            if el in out and out[el] != ls:
                raise InputError(f"PySCF cell: atoms of element {el} carry different bases ({out[el]} vs {ls}); "
                                 "egnn needs one basis per element")
            out[el] = ls
        if not name:
            b = cell.basis
            name = b if isinstance(b, str) else "pyscf"
        return cls(out, name)

    def transform(self, numbers, code: str = "cp2k"):
        """Sparse block-diagonal T [n_orb, n_orb] mapping a code's orbitals to the internal basis:
        M_internal = T M_code Tᵀ and M_code = Tᵀ M_internal T (T is orthogonal)."""
        import scipy.sparse as sp

        rows, cols, vals = [], [], []
        per_el = {}
        for el in self.elements:
            blocks = [code_to_e3nn(l, code) for l in self.shells[el]]
            per_el[atomic_numbers[el]] = _block_diag_coo(blocks)
        offsets = self.orbital_offsets(numbers)
        for z, o in zip(numbers, offsets[:-1]):
            r, c, v = per_el[int(z)] if int(z) in per_el else (None, None, None)
            if r is None:
                self._symbol(int(z))  # raises the standard message
            rows.append(r + o)
            cols.append(c + o)
            vals.append(v)
        n = int(offsets[-1])
        return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


@functools.lru_cache(maxsize=None)
def _pair_layout(basis: OrbitalBasis, a: str, b: str) -> tuple[CoupledEntry, ...]:
    count: dict[int, int] = {}
    out = []
    for i, la in enumerate(basis.shells[a]):
        for j, lb in enumerate(basis.shells[b]):
            for L in range(abs(la - lb), la + lb + 1):
                c = count.get(L, 0)
                count[L] = c + 1
                out.append(CoupledEntry(i, j, la, lb, L, c))
    return tuple(out)


# ----------------------------------------------------------------------------- code <-> e3nn harmonics
def _code_harmonics(l: int, v: np.ndarray) -> np.ndarray:
    """Real solid harmonics of CP2K/PySCF (z polar, no Condon-Shortley phase), m = -l..l, up to
    normalisation, at points v [P, 3]. p is returned as (py, pz, px) (CP2K's order)."""
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    r2 = x * x + y * y + z * z
    if l == 0:
        f = [np.ones_like(x)]
    elif l == 1:
        f = [y, z, x]
    elif l == 2:
        f = [x * y, y * z, 3 * z * z - r2, x * z, x * x - y * y]
    elif l == 3:
        f = [y * (3 * x * x - y * y), x * y * z, y * (5 * z * z - r2), z * (5 * z * z - 3 * r2),
             x * (5 * z * z - r2), z * (x * x - y * y), x * (x * x - 3 * y * y)]
    else:
        raise InputError(f"orbital shells with l = {l} > 3 are not supported (CP2K/PySCF g functions); "
                         "use a basis with s, p, d, f shells")
    return np.stack(f, axis=1)


@functools.lru_cache(maxsize=None)
def code_to_e3nn(l: int, code: str = "cp2k") -> np.ndarray:
    """Orthogonal T [2l+1, 2l+1] with (internal orbitals) = T (code orbitals) for one shell.

    Fitted by least squares: e3nn's harmonics Y (y polar) = A f with f the code's solid harmonics
    (z polar) at random points; then f = A⁻¹ Y and normalising the rows of A⁻¹ gives the code's
    normalised orbitals as g = U Y with U orthogonal, so T = Uᵀ. For p this is the permutation
    (py, pz, px) -> (x, y, z); for d and f a genuine rotation of the m components. PySCF differs
    from CP2K only in p, which it orders (px, py, pz).
    """
    import torch

    from .so3 import spherical_harmonics

    if code not in ("cp2k", "pyscf"):
        raise InputError(f"orbital convention must be 'cp2k' or 'pyscf', not {code!r}")
    rng = np.random.default_rng(12345)
    v = rng.normal(size=(64, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    Y = spherical_harmonics(torch.from_numpy(v), l).numpy()[:, l * l:(l + 1) ** 2]
    f = _code_harmonics(l, v)
    A = np.linalg.lstsq(f, Y, rcond=None)[0].T  # Y = A f (rows of A: e3nn m)
    B = np.linalg.inv(A)  # f = B Y
    U = B / np.linalg.norm(B, axis=1, keepdims=True)
    U[np.abs(U) < 1e-14] = 0.0
    if l == 1 and code == "pyscf":
        U = U[[2, 0, 1]]  # PySCF p = (px, py, pz) = CP2K rows (px is CP2K's third)
    return np.ascontiguousarray(U.T)


def _block_diag_coo(blocks):
    rows, cols, vals, off = [], [], [], 0
    for b in blocks:
        r, c = np.nonzero(np.ones_like(b, dtype=bool))
        rows.append(r + off)
        cols.append(c + off)
        vals.append(b[r, c])
        off += b.shape[0]
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
