"""CP2K run folders in, CP2K .csr files out.

* `read_run(run_dir)`  -> `Structure`: ase.Atoms (positions exactly as in &COORD, cell, pbc), the
  OrbitalBasis, and H(R), S(R) as {shift: scipy.sparse.csr_matrix} in eV (S unitless), orbitals
  in the internal e3nn basis, symmetrised, shifts relative to *our* positions.
* `read_csr(path, n)`   one .csr file (text or binary, plain/.gz/.xz, empty = zero) as raw COO.
* `write_csr(path, M, basis, numbers, ...)`  the inverse: CP2K orbital order and Hartree.
* `basis_shells(element, name, basis_file)`  shells of a CP2K basis set (file or embedded table).

Image shifts. CP2K wraps every atom to fractional s − ANINT(s) (ANINT rounds halves away from
zero) and writes M_ij(R) = <φ_i(r − τ_i)|M|φ_j(r − τ_j − R·cell)> with τ the wrapped positions.
With n = ANINT(s) per atom, τ = x − n·cell, so τ_j + R·cell − τ_i = x_j + (R + n_i − n_j)·cell − x_i:
the entry belongs to our shift R + n_i − n_j (row atom i, column atom j). Verified against PySCF
overlaps in tests/test_orbital_physics.py.
"""
from __future__ import annotations

import glob
import gzip
import lzma
import os
import re
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

# GTH-PBE valence charges of CP2K's MOLOPT(-SR) pseudopotentials (the -qN of POTENTIAL GTH-PBE-qN),
# used when the CP2K input is not at hand.
GTH_VALENCE = {
    "H": 1, "He": 2, "Li": 3, "Be": 4, "B": 3, "C": 4, "N": 5, "O": 6, "F": 7, "Ne": 8, "Na": 9, "Mg": 10,
    "Al": 3, "Si": 4, "P": 5, "S": 6, "Cl": 7, "Ar": 8, "K": 9, "Ca": 10, "Sc": 11, "Ti": 12, "V": 13,
    "Cr": 14, "Mn": 15, "Fe": 16, "Co": 17, "Ni": 18, "Cu": 11, "Zn": 12, "Ga": 13, "Ge": 4, "As": 5,
    "Se": 6, "Br": 7, "Kr": 8, "Rb": 9, "Sr": 10, "Y": 11, "Zr": 12, "Nb": 13, "Mo": 14, "Tc": 15,
    "Ru": 16, "Rh": 17, "Pd": 18, "Ag": 11, "Cd": 12, "In": 13, "Sn": 4, "Sb": 5, "Te": 6, "I": 7,
    "Xe": 8, "Cs": 9, "Ba": 10, "Hf": 12, "Ta": 13, "W": 14, "Re": 15, "Os": 16, "Ir": 17, "Pt": 18,
    "Au": 11, "Hg": 12, "Tl": 13, "Pb": 4, "Bi": 5, "Po": 6, "At": 7, "Rn": 8,
}

__all__ = ["valence_electrons", "read_run", "read_csr", "write_csr", "append_csr", "parse_inp", "parse_out", "basis_shells",
           "cp2k_wrap_offsets", "HARTREE_EV", "GTH_VALENCE"]

HARTREE_EV = 27.211386245988
DEFAULT_BASIS_FILE = "/usr/share/cp2k/BASIS_MOLOPT"
_RECORD = np.dtype([("m1", "<i4"), ("i", "<i4"), ("j", "<i4"), ("v", "<f8"), ("m2", "<i4")])

# Shell letters per element of the MOLOPT basis sets (CP2K order), from CP2K's BASIS_MOLOPT, so
# that no CP2K installation is needed; a real basis file, when given or present, takes precedence.
_EMBEDDED = {
    'DZVP-MOLOPT-GTH': "H:ssp C:ssppd N:ssppd O:ssppd F:ssppd Si:ssppd P:ssppd S:ssppd Cl:ssppd",
    'DZVP-MOLOPT-GTH-q1': "H:ssp",
    'DZVP-MOLOPT-GTH-q4': "C:ssppd Si:ssppd",
    'DZVP-MOLOPT-GTH-q5': "N:ssppd P:ssppd",
    'DZVP-MOLOPT-GTH-q6': "O:ssppd S:ssppd",
    'DZVP-MOLOPT-GTH-q7': "F:ssppd Cl:ssppd",
    'DZVP-MOLOPT-SR-GTH': "H:ssp He:ssp Li:sssp Be:sssp B:ssppd C:ssppd N:ssppd O:ssppd F:ssppd Ne:ssppd Na:ssspp Mg:ssspp Al:ssppd Si:ssppd P:ssppd S:ssppd Cl:ssppd Ar:ssppd K:sssppd Ca:sssppd Sc:sssppddf Ti:sssppddf V:sssppddf Cr:sssppddf Mn:sssppddf Fe:sssppddf Co:sssppddf Ni:sssppddf Cu:ssppddf Zn:ssppddf Ga:ssppddf Ge:ssppd As:ssppd Se:ssppd Br:ssppd Kr:ssppd Rb:sssppd Sr:sssppd Y:sssppddf Zr:sssppddf Nb:sssppddf Mo:sssppddf Tc:sssppddf Ru:sssppddf Rh:sssppddf Pd:ssppddf Ag:ssppddf Cd:ssppddf In:ssppddf Sn:ssppd Sb:ssppd Te:ssppd I:ssppd Xe:ssppd Cs:sssppd Ba:sssppd Hf:sssppddf Ta:sssppddf W:sssppddf Re:sssppddf Os:sssppddf Ir:sssppddf Pt:sssppddf Au:ssppddf Hg:ssppddf Tl:ssppddf Pb:ssppd Bi:ssppd Po:ssppd At:ssppd Rn:ssppd",
    'DZVP-MOLOPT-SR-GTH-q1': "H:ssp",
    'DZVP-MOLOPT-SR-GTH-q10': "Mg:ssspp Ca:sssppd Sr:sssppd Ba:sssppd",
    'DZVP-MOLOPT-SR-GTH-q11': "Sc:sssppddf Cu:ssppddf Y:sssppddf Ag:ssppddf Au:ssppddf",
    'DZVP-MOLOPT-SR-GTH-q12': "Ti:sssppddf Zn:ssppddf Zr:sssppddf Cd:ssppddf Hf:sssppddf Hg:ssppddf",
    'DZVP-MOLOPT-SR-GTH-q13': "V:sssppddf Ga:ssppddf Nb:sssppddf In:ssppddf Ta:sssppddf Tl:ssppddf",
    'DZVP-MOLOPT-SR-GTH-q14': "Cr:sssppddf Mo:sssppddf W:sssppddf",
    'DZVP-MOLOPT-SR-GTH-q15': "Mn:sssppddf Tc:sssppddf Re:sssppddf",
    'DZVP-MOLOPT-SR-GTH-q16': "Fe:sssppddf Ru:sssppddf Os:sssppddf",
    'DZVP-MOLOPT-SR-GTH-q17': "Co:sssppddf Rh:sssppddf Ir:sssppddf",
    'DZVP-MOLOPT-SR-GTH-q18': "Ni:sssppddf Pd:ssppddf Pt:sssppddf",
    'DZVP-MOLOPT-SR-GTH-q2': "He:ssp",
    'DZVP-MOLOPT-SR-GTH-q3': "Li:sssp B:ssppd Al:ssppd",
    'DZVP-MOLOPT-SR-GTH-q4': "Be:sssp C:ssppd Si:ssppd Ge:ssppd Sn:ssppd Pb:ssppd",
    'DZVP-MOLOPT-SR-GTH-q5': "N:ssppd P:ssppd As:ssppd Sb:ssppd Bi:ssppd",
    'DZVP-MOLOPT-SR-GTH-q6': "O:ssppd S:ssppd Se:ssppd Te:ssppd Po:ssppd",
    'DZVP-MOLOPT-SR-GTH-q7': "F:ssppd Cl:ssppd Br:ssppd I:ssppd At:ssppd",
    'DZVP-MOLOPT-SR-GTH-q8': "Ne:ssppd Ar:ssppd Kr:ssppd Xe:ssppd Rn:ssppd",
    'DZVP-MOLOPT-SR-GTH-q9': "Na:ssspp K:sssppd Rb:sssppd Rh:ssppddf Cs:sssppd",
    'SZV-MOLOPT-GTH': "H:s C:sp N:sp O:sp F:sp Si:sp P:sp S:sp Cl:sp",
    'SZV-MOLOPT-GTH-q1': "H:s",
    'SZV-MOLOPT-GTH-q4': "C:sp Si:sp",
    'SZV-MOLOPT-GTH-q5': "N:sp P:sp",
    'SZV-MOLOPT-GTH-q6': "O:sp S:sp",
    'SZV-MOLOPT-GTH-q7': "F:sp Cl:sp",
    'SZV-MOLOPT-SR-GTH': "H:s He:s Li:ss Be:ss B:sp C:sp N:sp O:sp F:sp Ne:sp Na:ssp Mg:ssp Al:sp Si:sp P:sp S:sp Cl:sp Ar:sp K:ssp Ca:ssp Sc:sspd Ti:sspd V:sspd Cr:sspd Mn:sspd Fe:sspd Co:sspd Ni:sspd Cu:spd Zn:spd Ga:spd Ge:sp As:sp Se:sp Br:sp Kr:sp Rb:ssp Sr:ssp Y:sspd Zr:sspd Nb:sspd Mo:sspd Tc:sspd Ru:sspd Rh:sspd Pd:spd Ag:spd Cd:spd In:spd Sn:sp Sb:sp Te:sp I:sp Xe:sp Cs:ssp Ba:ssp Hf:sspd Ta:sspd W:sspd Re:sspd Os:sspd Ir:sspd Pt:sspd Au:spd Hg:spd Tl:spd Pb:sp Bi:sp Po:sp At:sp Rn:sp",
    'SZV-MOLOPT-SR-GTH-q1': "H:s",
    'SZV-MOLOPT-SR-GTH-q10': "Mg:ssp Ca:ssp Sr:ssp Ba:ssp",
    'SZV-MOLOPT-SR-GTH-q11': "Sc:sspd Cu:spd Y:sspd Ag:spd Au:spd",
    'SZV-MOLOPT-SR-GTH-q12': "Ti:sspd Zn:spd Zr:sspd Cd:spd Hf:sspd Hg:spd",
    'SZV-MOLOPT-SR-GTH-q13': "V:sspd Ga:spd Nb:sspd In:spd Ta:sspd Tl:spd",
    'SZV-MOLOPT-SR-GTH-q14': "Cr:sspd Mo:sspd W:sspd",
    'SZV-MOLOPT-SR-GTH-q15': "Mn:sspd Tc:sspd Re:sspd",
    'SZV-MOLOPT-SR-GTH-q16': "Fe:sspd Ru:sspd Os:sspd",
    'SZV-MOLOPT-SR-GTH-q17': "Co:sspd Rh:sspd Ir:sspd",
    'SZV-MOLOPT-SR-GTH-q18': "Ni:sspd Pd:spd Pt:sspd",
    'SZV-MOLOPT-SR-GTH-q2': "He:s",
    'SZV-MOLOPT-SR-GTH-q3': "Li:ss B:sp Al:sp",
    'SZV-MOLOPT-SR-GTH-q4': "Be:ss C:sp Si:sp Ge:sp Sn:sp Pb:sp",
    'SZV-MOLOPT-SR-GTH-q5': "N:sp P:sp As:sp Sb:sp Bi:sp",
    'SZV-MOLOPT-SR-GTH-q6': "O:sp S:sp Se:sp Te:sp Po:sp",
    'SZV-MOLOPT-SR-GTH-q7': "F:sp Cl:sp Br:sp I:sp At:sp",
    'SZV-MOLOPT-SR-GTH-q8': "Ne:sp Ar:sp Kr:sp Xe:sp Rn:sp",
    'SZV-MOLOPT-SR-GTH-q9': "Na:ssp K:ssp Rb:ssp Rh:spd Cs:ssp",
}


def _truthy(tok: str) -> bool:
    return tok.upper().strip(".") in ("T", "TRUE", "YES", "ON", "")


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        if path.endswith(".xz"):
            with lzma.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise InputError(f"{path}: cannot read ({exc}); the file is missing or its compression is damaged") from None


def _find(run_dir: str, stem: str):
    for ext in ("", ".gz", ".xz"):
        f = os.path.join(run_dir, stem + ext)
        if os.path.exists(f):
            return f
    return None


# ----------------------------------------------------------------------------- basis sets
def _parse_basis_text(text: str, path: str) -> dict:
    """{(element, name): "shell letters"} of every entry of a CP2K basis file."""
    lines = text.splitlines()
    out, k = {}, 0
    while k < len(lines):
        t = lines[k].split()
        if len(t) >= 2 and not t[0].startswith("#") and t[0].capitalize() in _ELEMENTS:
            try:
                nset, p, ls = int(lines[k + 1].split()[0]), k + 2, ""
                for _ in range(nset):
                    h = [int(x) for x in lines[p].split()]
                    lmin, lmax, nexp = h[1], h[2], h[3]
                    if len(h) < 4 + lmax - lmin + 1:
                        raise ValueError("short set header")
                    for l, ns in zip(range(lmin, lmax + 1), h[4:4 + lmax - lmin + 1]):
                        ls += "spdfghi"[l] * ns
                    p += 1 + nexp
            except (ValueError, IndexError):
                k += 1
                continue
            for name in t[1:]:
                out.setdefault((t[0].capitalize(), name), ls)
            k = p
        else:
            k += 1
    return out


_ELEMENTS = None
_FILE_CACHE: dict = {}


def basis_shells(element: str, name: str, basis_file=None) -> list[int]:
    """Shell l values of CP2K basis set `name` for `element`, in CP2K's order."""
    global _ELEMENTS
    if _ELEMENTS is None:
        from ase.data import chemical_symbols
        _ELEMENTS = set(chemical_symbols[1:])
    files = [basis_file] if basis_file else ([DEFAULT_BASIS_FILE] if os.path.exists(DEFAULT_BASIS_FILE) else [])
    for f in files:
        if f not in _FILE_CACHE:
            _FILE_CACHE[f] = _parse_basis_text(_read_bytes(f).decode("utf-8", "replace"), f)
        ls = _FILE_CACHE[f].get((element, name))
        if ls is not None:
            return ["spdfghi".index(c) for c in ls]
    table = dict(x.split(":") for x in _EMBEDDED.get(name, "").split())
    if element in table:
        return ["spdfghi".index(c) for c in table[element]]
    where = f"{basis_file or DEFAULT_BASIS_FILE} or the embedded MOLOPT table"
    raise InputError(f"basis set {name!r} for element {element} is not in {where}; pass the CP2K basis "
                     "file that defines it (basis_file=... / --basis-file)")


# ----------------------------------------------------------------------------- .inp / .out
@dataclass
class Cp2kInput:
    path: str
    project: str
    cell: np.ndarray  # rows A, B, C in Å
    pbc: np.ndarray
    labels: list  # kind label per atom, &COORD order
    positions: np.ndarray  # Å, as written
    kinds: dict  # label -> {"element": str, "basis": str, "potential": str | None}
    upper_triangular: bool = False
    binary: bool = False
    real_space: bool = False
    kpoints: bool = False
    kpoint_mesh: tuple | None = None  # (n1, n2, n3) of SCHEME MONKHORST-PACK
    kpoint_list: list | None = None  # [[k1, k2, k3], ...] fractional KPOINT lines of SCHEME GENERAL (no weights)

    @property
    def symbols(self) -> list[str]:
        return [self.kinds.get(l, {}).get("element", _label_element(l)) for l in self.labels]


def _label_element(label: str) -> str:
    m = re.match(r"[A-Za-z]{1,2}", label)
    s = m.group(0).capitalize() if m else label
    return s if s in (_ELEMENTS or ()) else s[:1]


_BOHR = 0.529177210903


def parse_inp(path: str) -> Cp2kInput:
    """The parts of a CP2K input egnn needs (no @include/@SET): PROJECT, &CELL (A/B/C or
    ABC + ALPHA_BETA_GAMMA, PERIODIC), &COORD (SCALED, UNIT), &KIND (BASIS_SET, ELEMENT), the
    UPPER_TRIANGULAR/BINARY/REAL_SPACE keys of &KS_CSR_WRITE / &S_CSR_WRITE, &KPOINTS (its
    Monkhorst-Pack mesh, or the KPOINT lines of SCHEME GENERAL)."""
    global _ELEMENTS
    if _ELEMENTS is None:
        from ase.data import chemical_symbols
        _ELEMENTS = set(chemical_symbols[1:])
    text = _read_bytes(path).decode("utf-8", "replace")
    sec: list[str] = []
    project, cell, abc, angles, periodic = None, {}, None, (90.0, 90.0, 90.0), "XYZ"
    labels, pos, kinds, kind = [], [], {}, None
    scaled, coord_unit = False, 1.0
    flags = {"UPPER_TRIANGULAR": False, "BINARY": False, "REAL_SPACE": False}
    kpoints, mesh, klist = False, None, []
    for ln_no, line in enumerate(text.splitlines(), 1):
        t = line.split("!")[0].split("#")[0].split()
        if not t:
            continue
        key = t[0].upper()
        if key.startswith("@"):
            raise InputError(f"{path}:{ln_no}: preprocessor directive {t[0]} is not supported; "
                             "expand @INCLUDE/@SET into one input file")
        if key.startswith("&END"):
            if sec:
                sec.pop()
            continue
        if key.startswith("&"):
            sec.append(key[1:])
            if key == "&KIND":
                if len(t) < 2:
                    raise InputError(f"{path}:{ln_no}: &KIND needs a kind name")
                kind = t[1]
                kinds[kind] = {"element": _label_element(kind), "basis": None, "potential": None}
            elif key == "&COORD":
                pass
            elif key == "&KPOINTS":
                kpoints = True
            continue
        cur = sec[-1] if sec else ""
        try:
            vals = [x for x in t[1:] if not x.startswith("[")]
            unit = next((x for x in t[1:] if x.startswith("[")), "[angstrom]").lower()
            scale = _BOHR if "bohr" in unit else 1.0
            if cur == "GLOBAL" and key == "PROJECT" or cur == "GLOBAL" and key == "PROJECT_NAME":
                project = t[1]
            elif cur == "CELL" and key in ("A", "B", "C"):
                cell[key] = [float(x) * scale for x in vals[:3]]
                if len(cell[key]) != 3:
                    raise ValueError
            elif cur == "CELL" and key == "ABC":
                abc = [float(x) * scale for x in vals[:3]]
            elif cur == "CELL" and key == "ALPHA_BETA_GAMMA":
                angles = tuple(float(x) for x in vals[:3])
            elif cur == "CELL" and key == "PERIODIC":
                periodic = t[1].upper()
            elif cur == "COORD" and key == "SCALED":
                scaled = _truthy(t[1] if len(t) > 1 else "T")
            elif cur == "COORD" and key == "UNIT":
                coord_unit = _BOHR if t[1].lower() == "bohr" else 1.0
            elif cur == "COORD":
                if len(t) < 4:
                    raise ValueError
                labels.append(t[0])
                pos.append([float(x) for x in t[1:4]])
            elif cur == "KIND" and key == "BASIS_SET":
                kinds[kind]["basis"] = t[-1]
            elif cur == "KIND" and key == "POTENTIAL":
                kinds[kind]["potential"] = t[-1]
            elif cur == "KIND" and key == "ELEMENT":
                kinds[kind]["element"] = t[1].capitalize()
            elif cur == "KPOINTS" and key == "SCHEME" and len(t) >= 5 and t[1].upper() == "MONKHORST-PACK":
                mesh = tuple(int(x) for x in t[2:5])
            elif cur == "KPOINTS" and key == "KPOINT":
                klist.append([float(x) for x in t[1:4]])
                if len(klist[-1]) != 3:
                    raise ValueError
            elif cur in ("KS_CSR_WRITE", "S_CSR_WRITE") and key in flags:
                flags[key] = flags[key] or _truthy(t[1] if len(t) > 1 else "T")
        except (ValueError, IndexError):
            raise InputError(f"{path}:{ln_no}: cannot parse {line.strip()!r} in &{cur}") from None
    if project is None:
        project = os.path.splitext(os.path.basename(path))[0]
    if abc is not None:
        from ase.geometry import cellpar_to_cell
        cellm = cellpar_to_cell(list(abc) + list(angles))
    elif set(cell) == {"A", "B", "C"}:
        cellm = np.array([cell["A"], cell["B"], cell["C"]], dtype=np.float64)
    else:
        raise InputError(f"{path}: &CELL needs A, B and C (or ABC); found {sorted(cell)}")
    if not labels:
        raise InputError(f"{path}: no atoms in &COORD")
    positions = np.array(pos, dtype=np.float64)
    positions = positions @ cellm if scaled else positions * coord_unit
    pbc = np.array([ax in periodic for ax in "XYZ"]) if periodic != "NONE" else np.zeros(3, bool)
    for lab in set(labels):
        if lab not in kinds:
            kinds[lab] = {"element": _label_element(lab), "basis": None, "potential": None}
    for lab, k in kinds.items():
        if k["element"] not in _ELEMENTS:
            raise InputError(f"{path}: kind {lab}: unknown element {k['element']!r}; set ELEMENT in &KIND {lab}")
        if k["basis"] is None and lab in labels:
            raise InputError(f"{path}: &KIND {lab} has no BASIS_SET; add one")
    return Cp2kInput(path, project, cellm, pbc, labels, positions, kinds,
                     flags["UPPER_TRIANGULAR"], flags["BINARY"], flags["REAL_SPACE"], kpoints, mesh,
                     klist or None)


@dataclass
class Cp2kOutput:
    path: str
    kind_counts: dict  # kind label -> (n_atoms, n_spherical_functions)
    n_orbitals: int | None
    images: dict = field(default_factory=dict)  # "KS"/"S" -> {index: (X, Y, Z)}


def parse_out(path: str) -> Cp2kOutput:
    text = _read_bytes(path).decode("utf-8", "replace")
    counts = {}
    for m in re.finditer(r"Atomic kind:\s+(\S+)\s+Number of atoms:\s+(\d+)(.*?)Number of spherical basis functions:\s+(\d+)",
                         text, re.S):
        counts[m.group(1)] = (int(m.group(2)), int(m.group(4)))
    m = re.search(r"Number of orbital functions:\s+(\d+)", text)
    images = {}
    for prefix in ("KS", "S"):
        m2 = re.search(rf"^\s*{prefix} CSR write\|\s+(\d+) periodic images\s*\n\s*Number\s+X\s+Y\s+Z\s*\n", text, re.M)
        if not m2:
            continue
        n_img = int(m2.group(1))
        start_line = text.count("\n", 0, m2.end()) + 1
        body = text[m2.end():].split("\n", n_img)[:n_img]
        table = {}
        for k, ln in enumerate(body):
            t = ln.split()
            if len(t) != 4:
                raise InputError(f"{path}:{start_line + k}: the {prefix} image table should have {n_img} rows "
                                 f"'index X Y Z'; found {ln.strip()!r}. Is the .out truncated?")
            table[int(t[0])] = tuple(int(x) for x in t[1:])
        images[prefix] = table
    return Cp2kOutput(path, counts, int(m.group(1)) if m else None, images)


# ----------------------------------------------------------------------------- .csr
def read_csr(path: str, n: int, upper_triangular: bool = False, binary=None, limit: float | None = None):
    """One CP2K .csr file as 0-based COO (rows, cols, values) in the file's units and AO order.

    Text '(2(I8),E23.14E3)' or binary 24-byte records (detected from the first record marker),
    plain/.gz/.xz; an empty file is an all-zero matrix. Entries are never mirrored unless
    `upper_triangular` is True (only when the input said UPPER_TRIANGULAR T). A text file must end
    with a newline, a binary one with a whole record; values must be finite and, with `limit`, at
    most that large: each is an InputError naming the line or record.
    """
    raw = _read_bytes(path)
    if not raw.strip():
        e = np.zeros(0, np.int64)
        return e, e.copy(), np.zeros(0)
    if binary is None:
        binary = raw[:4] == b"\x10\x00\x00\x00"
    if binary:
        if len(raw) % _RECORD.itemsize:
            k = len(raw) // _RECORD.itemsize + 1
            raise InputError(f"{path}: record {k}: truncated binary record ({len(raw)} bytes is not a multiple "
                             f"of {_RECORD.itemsize}); the file is cut short, re-copy or re-run CP2K")
        d = np.frombuffer(raw, dtype=_RECORD)
        bad = np.flatnonzero((d["m1"] != 16) | (d["m2"] != 16))
        if len(bad):
            raise InputError(f"{path}: record {bad[0] + 1}: corrupt binary record (markers {d['m1'][bad[0]]}, "
                             f"{d['m2'][bad[0]]} instead of 16, 16); not a CP2K BINARY T .csr file")
        i, j, v = d["i"].astype(np.int64), d["j"].astype(np.int64), d["v"].astype(np.float64)
        unit = "record"
    else:
        if not raw.endswith(b"\n"):
            k = raw.count(b"\n") + 1
            raise InputError(f"{path}:{k}: the last line has no newline: the file was cut short inside a record "
                             "(an interrupted copy or a full disk); re-copy it or re-run CP2K")
        lines = raw.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        tok = raw.split()
        if len(tok) != 3 * len(lines):
            for k, ln in enumerate(lines):
                nt = len(ln.split())
                if nt != 3:
                    hint = " (4 columns: a k-space file; write REAL_SPACE T)" if nt == 4 else ""
                    raise InputError(f"{path}:{k + 1}: expected 3 columns 'row col value', found {nt}{hint}")
        arr = np.array(tok).reshape(-1, 3)
        try:
            i, j = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
            v = arr[:, 2].astype(np.float64)
        except ValueError:
            for k, ln in enumerate(lines):
                a, b, c = ln.split()
                try:
                    int(a), int(b), float(c)
                except ValueError:
                    raise InputError(f"{path}:{k + 1}: cannot parse {ln.decode(errors='replace').strip()!r} "
                                     "as 'row col value'") from None
            raise
        unit = "line"
    bad = np.flatnonzero((i < 1) | (i > n) | (j < 1) | (j > n))
    if len(bad):
        k = bad[0]
        raise InputError(f"{path}: {unit} {k + 1}: index ({i[k]}, {j[k]}) is outside the {n}x{n} matrix the "
                         "basis gives; the basis set or the run folder does not match this file")
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise InputError(f"{path}: {unit} {bad[0] + 1}: value {v[bad[0]]} is not finite; the run diverged "
                         "or the file is corrupt")
    if limit is not None:
        bad = np.flatnonzero(np.abs(v) > limit)
        if len(bad):
            raise InputError(f"{path}: {unit} {bad[0] + 1}: value {v[bad[0]]:.3e} is beyond any physical matrix "
                             f"element (|value| <= {limit:g} in the file's units); the file is corrupt")
    i, j = i - 1, j - 1
    if upper_triangular:
        off = i != j
        i, j, v = np.concatenate([i, j[off]]), np.concatenate([j, i[off]]), np.concatenate([v, v[off]])
    return i, j, v


def cp2k_wrap_offsets(positions, cell, pbc) -> np.ndarray:
    """n = ANINT(s) per atom (Fortran ANINT: halves away from zero) on periodic axes: CP2K's
    wrapped fractional position is s − n. Zero on open axes (a molecule without a cell: all zero)."""
    pbc = np.asarray(pbc, bool)
    positions = np.asarray(positions, np.float64)
    if not pbc.any():
        return np.zeros((len(positions), 3), np.int64)
    s = np.linalg.lstsq(np.asarray(cell, np.float64).T, positions.T, rcond=None)[0].T
    n = np.sign(s) * np.floor(np.abs(s) + 0.5)
    return (n * np.asarray(pbc, bool)).astype(np.int64)


def symmetrize(images: dict) -> dict:
    """M(R) <- (M(R) + M(−R)ᵀ)/2 for every image (Γ: (M + Mᵀ)/2); a missing −R counts as zero."""
    out = {}
    for R, M in images.items():
        mR = tuple(-x for x in R)
        other = images.get(mR)
        out[R] = ((M + other.T) * 0.5 if other is not None else M * 0.5).tocsr()
    for R in list(out):  # images only present as −R
        mR = tuple(-x for x in R)
        if mR not in out:
            out[mR] = (images[R].T * 0.5).tocsr()
    return out


# ----------------------------------------------------------------------------- run folders
# |value| bounds of a sane file (Hartree for KS): beyond any matrix element (all-electron core levels of
# heavy atoms reach ~1e4 Ha), far below garbage such as 1e300
VALUE_LIMIT = {"KS": 1e6, "S": 1e6}


def _image_files(run_dir, project, prefix, table, n, upper, matrix_name):
    """({CP2K image vector: COO}, Γ-only?, {image vector: file}) of one matrix of a run."""
    lim = VALUE_LIMIT[prefix]
    g = _find(run_dir, f"{project}-{prefix}_SPIN_1-1_0.csr")
    if g is not None:
        return {(0, 0, 0): read_csr(g, n, upper, limit=lim)}, True, {(0, 0, 0): g}
    first = _find(run_dir, f"{project}-{prefix}_SPIN_1_R_1-1_0.csr")
    if first is None:
        raise InputError(f"{run_dir}: no {matrix_name} file {project}-{prefix}_SPIN_1-1_0.csr[.gz|.xz] nor "
                         f"{project}-{prefix}_SPIN_1_R_<n>-1_0.csr: add &{prefix}_CSR_WRITE to the input")
    if table is None:
        raise InputError(f"{run_dir}: real-space {prefix} files but no '{prefix} CSR write| N periodic images' "
                         "table in the .out; the image vectors are only in the .out")
    if upper:
        raise InputError(f"{run_dir}: UPPER_TRIANGULAR T with REAL_SPACE images loses M(R) for R != 0; "
                         "rerun with UPPER_TRIANGULAR F")
    out, files = {}, {}
    for idx, R in table.items():
        f = _find(run_dir, f"{project}-{prefix}_SPIN_1_R_{idx}-1_0.csr")
        if f is None:
            raise InputError(f"{run_dir}: image {idx} {R} of the .out table has no file "
                             f"{project}-{prefix}_SPIN_1_R_{idx}-1_0.csr[.gz|.xz]; copy the whole run folder")
        out[R] = read_csr(f, n, False, limit=lim)
        files[R] = f
    return out, False, files


def check_images(images: dict, files: dict, n: int, kind: str, gamma_only: bool, atom_of_ao=None) -> None:
    """Cheap physics checks of one matrix as read (file units, CP2K AO order and image vectors):
    the R = 0 image holds every onsite diagonal element (non-zero; S(0) normalised to 1 for
    real-space runs), M(−R) = M(R)ᵀ up to the grid noise CP2K leaves, and S(Γ) is positive definite.
    A file cut at a record boundary, an empty R = 0 file or swapped files fail here."""
    mats = {R: sp.csr_matrix((v, (i, j)), shape=(n, n)) for R, (i, j, v) in images.items()}
    R0 = (0, 0, 0)
    f0 = files.get(R0, "the R = 0 file")
    if R0 not in mats or mats[R0].nnz == 0:
        raise InputError(f"{f0}: the R = 0 {kind} matrix is empty, but it always holds the onsite blocks; the "
                         "file is missing its data (re-copy it or re-run CP2K)")
    diag = mats[R0].diagonal()
    missing = np.flatnonzero(diag == 0)
    if len(missing):
        where = f" (atom {atom_of_ao[missing[0]] + 1})" if atom_of_ao is not None else ""
        raise InputError(f"{f0}: {len(missing)} onsite diagonal element(s) of {kind} are missing or zero, first "
                         f"orbital {missing[0] + 1}{where}; the file was cut short or damaged")
    if kind == "S" and not gamma_only and np.abs(diag - 1.0).max() > 1e-4:
        k = int(np.argmax(np.abs(diag - 1.0)))
        raise InputError(f"{f0}: S(R=0) diagonal element {k + 1} is {diag[k]:.6f}, not 1 (CP2K's contracted "
                         "functions are normalised); the file is damaged or not an overlap matrix")
    tol = 1e-5 if kind == "KS" else 1e-6  # Hartree / unitless: Γ grid noise is <= 2.1e-7 Ha in our data
    for R, M in mats.items():
        mR = tuple(-x for x in R)
        if mR < R and mR in mats:
            continue  # each pair (R, −R) once
        other = mats.get(mR)
        if other is None:
            if mR == R or M.nnz == 0:
                other = sp.csr_matrix((n, n)) if mR != R else M
            else:
                raise InputError(f"{files.get(R)}: image {R} has no partner {mR} in the .out table; the image "
                                 "table and the files do not belong together")
        d = abs(M - other.T)
        if d.nnz and d.max() > tol:
            r, c = (d == d.max()).nonzero()
            raise InputError(f"{files.get(R)}: {kind}(R={R}) and {kind}(R={mR})ᵀ differ by {d.max():.3e} at "
                             f"({r[0] + 1}, {c[0] + 1}) (tolerance {tol:g}); a file is cut short, damaged or swapped")
    if kind == "S" and n > 4000:
        from ..errors import warn_once

        warn_once("s-gamma-pd", f"S(Γ) of runs with more than 4000 orbitals ({f0}) is not checked for "
                  "positive definiteness (a dense factorisation would cost more than reading the run)")
    if kind == "S" and n <= 4000:
        import scipy.linalg

        G = sum(mats.values()).toarray()
        G = 0.5 * (G + G.T)
        try:
            scipy.linalg.cholesky(G, lower=True, check_finite=False)  # ~3x cheaper than eigenvalues
        except np.linalg.LinAlgError:
            w = np.linalg.eigvalsh(G)[0]
            raise InputError(f"{f0}: S(Γ) = Σ_R S(R) is not positive definite (smallest eigenvalue {w:.3e}); an "
                             "overlap matrix always is: the files are damaged or incomplete") from None


def _to_our_shifts(images: dict, atom_of_ao, wrap, n, scale, T) -> dict:
    """CP2K images -> {our shift: csr in the internal basis}, entry (i, j) of image R moves to
    R + n_i − n_j (see the module docstring)."""
    rows, cols, vals, shifts = [], [], [], []
    for R, (i, j, v) in images.items():
        rows.append(i)
        cols.append(j)
        vals.append(v)
        shifts.append(np.asarray(R, np.int64) + wrap[atom_of_ao[i]] - wrap[atom_of_ao[j]])
    i, j, v, s = (np.concatenate(rows), np.concatenate(cols), np.concatenate(vals),
                  np.concatenate(shifts).reshape(-1, 3))
    if len(s) == 0:
        return {(0, 0, 0): sp.csr_matrix((n, n))}
    keys, inv = np.unique(s, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(keys) + 1))
    out = {}
    for k, key in enumerate(keys):
        sel = order[bounds[k]:bounds[k + 1]]
        M = sp.csr_matrix((v[sel] * scale, (i[sel], j[sel])), shape=(n, n))
        out[tuple(int(x) for x in key)] = (T @ M @ T.T).tocsr()
    return out


def read_run(run_dir: str, basis_file=None, matrices=("H", "S"), symmetrise: bool = True):
    """Read a CP2K run folder (see the module docstring) into an egnn.io.Structure."""
    from ase import Atoms

    from ..basis import OrbitalBasis
    from . import Structure

    if not os.path.isdir(run_dir):
        raise InputError(f"{run_dir}: not a directory; give a CP2K run folder")
    inps = sorted(glob.glob(os.path.join(run_dir, "*.inp")))
    if len(inps) != 1:
        raise InputError(f"{run_dir}: expected exactly one CP2K input *.inp, found {len(inps)}")
    inp = parse_inp(inps[0])
    P = inp.project
    outp = _find(run_dir, f"{P}.out") or next(iter(sorted(glob.glob(os.path.join(run_dir, "*.out*")))), None)
    if outp is None:
        raise InputError(f"{run_dir}: no CP2K output {P}.out; it holds the basis counts and the image table")
    out = parse_out(outp)
    kinds = {k["element"]: k["basis"] for lab, k in inp.kinds.items() if lab in set(inp.labels)}
    els = {}
    for lab, k in inp.kinds.items():
        if lab in set(inp.labels):
            if els.setdefault(k["element"], k["basis"]) != k["basis"]:
                raise InputError(f"{inps[0]}: element {k['element']} has two basis sets ({els[k['element']]}, "
                                 f"{k['basis']}); egnn needs one basis per element")
    basis = OrbitalBasis.from_cp2k(basis_file, kinds)
    for lab, (n_at, n_sph) in out.kind_counts.items():
        el = inp.kinds.get(lab, {}).get("element", _label_element(lab))
        if el in basis.shells and basis.n_orbitals(el) != n_sph:
            raise InputError(f"{outp}: kind {lab} has {n_sph} spherical basis functions but basis "
                             f"{kinds.get(el)} gives {basis.n_orbitals(el)} ({basis.shells[el]}); pass the "
                             "basis file the run used (basis_file=...)")
    symbols = inp.symbols
    atoms = Atoms(symbols=symbols, positions=inp.positions, cell=inp.cell, pbc=inp.pbc)
    numbers = atoms.get_atomic_numbers()
    offsets = basis.orbital_offsets(numbers)
    n = int(offsets[-1])
    if out.n_orbitals is not None and out.n_orbitals != n:
        raise InputError(f"{outp}: 'Number of orbital functions: {out.n_orbitals}' but the basis gives {n}; "
                         "the basis file or the input does not match this run")
    atom_of_ao = np.repeat(np.arange(len(numbers)), np.diff(offsets))
    wrap = cp2k_wrap_offsets(inp.positions, inp.cell, inp.pbc)
    T = basis.transform(numbers, "cp2k")
    result, gamma_flags = {}, []
    for name in matrices:
        prefix, scale = {"H": ("KS", HARTREE_EV), "S": ("S", 1.0)}[name]
        raw, gamma, files = _image_files(run_dir, P, prefix, out.images.get(prefix), n, inp.upper_triangular, name)
        check_images(raw, files, n, prefix, gamma, atom_of_ao)
        gamma_flags.append(gamma)
        M = _to_our_shifts(raw, atom_of_ao, np.zeros_like(wrap) if gamma else wrap, n, scale, T)
        result[name] = symmetrize(M) if symmetrise else M
    if len(set(gamma_flags)) > 1:
        raise InputError(f"{run_dir}: KS is {'Γ-only' if gamma_flags[0] else 'real-space'} but S is not; "
                         "write both with the same REAL_SPACE setting")
    return Structure(atoms=atoms, basis=basis, H=result.get("H"), S=result.get("S"),
                     gamma_only=bool(gamma_flags and gamma_flags[0]), source=os.path.abspath(run_dir),
                     meta={"code": "cp2k", "project": P, "basis_sets": kinds, "kpoint_mesh": inp.kpoint_mesh,
                           "kpoint_list": inp.kpoint_list})


# ----------------------------------------------------------------------------- writer
def write_csr(path: str, matrix, basis=None, numbers=None, *, kind: str = "H", binary: bool = False,
              upper_triangular: bool = False, threshold: float = 0.0) -> int:
    """Write one matrix as a CP2K .csr file (text '(2(I8),E23.14E3)'-compatible or binary records;
    .gz/.xz by the file name). With `basis` and `numbers` the matrix is in the internal basis and
    is converted back to CP2K's orbital order; kind "H" converts eV to Hartree, "S" writes as is.
    `threshold` drops |value| < threshold (in the file's units, like CP2K's THRESHOLD). Returns
    the number of records written."""
    M = sp.csr_matrix(matrix, dtype=np.float64)
    if not np.isfinite(M.data).all():
        raise InputError(f"write_csr {path}: the matrix holds NaN/Inf; nothing written")
    if basis is not None:
        if numbers is None:
            raise InputError("write_csr: give `numbers` (atomic numbers) together with `basis`")
        T = basis.transform(numbers, "cp2k")
        if T.shape != M.shape:
            raise InputError(f"write_csr {path}: matrix is {M.shape} but the basis gives {T.shape}")
        M = (T.T @ M @ T).tocsr()
    if kind not in ("H", "S"):
        raise InputError(f"write_csr: kind must be 'H' or 'S', not {kind!r}")
    if kind == "H":
        M = M / HARTREE_EV
    C = M.tocoo()
    i, j, v = C.row.astype(np.int64), C.col.astype(np.int64), C.data
    keep = np.abs(v) >= threshold if threshold > 0 else np.ones(len(v), bool)
    if upper_triangular:
        keep &= i <= j
    data = _records(i[keep], j[keep], v[keep], binary)
    tmp = path + ".part"
    opener = gzip.open if path.endswith(".gz") else lzma.open if path.endswith(".xz") else open
    with opener(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return int(keep.sum())


def _records(i, j, v, binary: bool) -> bytes:
    """CP2K .csr records of 0-based (i, j, v), sorted by (i, j): binary (24-byte Fortran records)
    or text ('(2(I8),E23.14E3)'-compatible lines)."""
    order = np.lexsort((j, i))
    i, j, v = np.asarray(i, np.int64)[order] + 1, np.asarray(j, np.int64)[order] + 1, np.asarray(v)[order]
    if binary:
        rec = np.empty(len(v), dtype=_RECORD)
        rec["m1"], rec["i"], rec["j"], rec["v"], rec["m2"] = 16, i, j, v, 16
        return rec.tobytes()
    return "".join(f"{a:8d}{b:8d}{c:23.14E}\n" for a, b, c in zip(i.tolist(), j.tolist(), v.tolist())).encode()


def append_csr(path: str, rows, cols, values, *, kind: str = "H", binary: bool = False) -> int:
    """Append records (0-based global rows and columns, values in eV for kind "H") to a CP2K .csr
    file, in (row, col) order: blocks of rows appended in ascending order give a valid file."""
    if kind not in ("H", "S"):
        raise InputError(f"append_csr: kind must be 'H' or 'S', not {kind!r}")
    v = np.asarray(values, np.float64)
    if not np.isfinite(v).all():
        raise InputError(f"append_csr {path}: values hold NaN/Inf; nothing written")
    with open(path, "ab") as fh:
        fh.write(_records(rows, cols, v / HARTREE_EV if kind == "H" else v, binary))
    return len(v)


# ----------------------------------------------------------------------------- valence
def _potential_valence(inp_path: str) -> dict:
    """{element: q} from the POTENTIAL GTH-...-qN names of a CP2K input's &KIND sections."""
    out = {}
    for k in parse_inp(inp_path).kinds.values():
        m = re.search(r"-q(\d+)\b", k.get("potential") or "", re.I)
        if m:
            out[k["element"]] = int(m.group(1))
    return out


def valence_electrons(symbols, source: str | None = None) -> tuple[int, str]:
    """(valence electron count, where the charges came from): the CP2K input of a run folder
    `source` when it names GTH-...-qN potentials, else GTH_VALENCE."""
    table, where = {}, "GTH_VALENCE table"
    if source and os.path.isdir(source):
        inps = sorted(glob.glob(os.path.join(source, "*.inp")))
        if len(inps) == 1:
            table = _potential_valence(inps[0])
            where = inps[0]
    total = 0
    for s in symbols:
        q = table.get(s, GTH_VALENCE.get(s))
        if q is None:
            raise InputError(f"no valence charge known for element {s}: give the CP2K run folder (its .inp "
                             "names POTENTIAL GTH-...-qN) or add it to egnn.io.cp2k.GTH_VALENCE")
        total += q
    return total, where
