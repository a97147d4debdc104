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

__all__ = ["OrbitalBasis", "CoupledEntry"]

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
