"""How much H depends on the Brillouin-zone sampling, for one fixed geometry
(docs/accuracy.md, "k-point sampling").

    .venv/bin/python profiling/kpoint_sampling.py [--material hfo2 gete] [--work DIR] [--out JSON]

Needs CP2K (`apt-get install cp2k`; ~10 CPU-minutes for both materials). One structure per material
(the plan's first cell of hfo2_m12_d05 / gete_rs8_d05, σ = 0.05 Å) is computed with the plan's CP2K
settings at several samplings:

  mp2       the training data's: Monkhorst-Pack 2x2x2 (shifted, no Γ)
  mp4       Monkhorst-Pack 4x4x4: is mp2 converged?
  gamma     Γ only (what the shared hfo2_gamma 12-atom runs are)
  gc2       Γ-centred 2x2x2 (CP2K SCHEME GENERAL): what the 2x2x2 supercell at Γ samples
  sc_gamma  the 2x2x2 supercell at Γ (GeTe only: 64 atoms)
  sc_fold   the 2x2x2 supercell on the folded point (1/2, 1/2, 1/2) (egnn.datagen.folded_kpoints; GeTe)

and prints, against mp2, the mean difference of the onsite diagonals per element (supercell atoms
matched to the cell's by position) and the MAE over the whole onsite blocks, in meV. Finished runs
in --work are reused.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = {"hfo2": "hfo2_m12_d05", "gete": "gete_rs8_d05"}


def _inputs(material: str) -> dict:
    """name -> (atoms, CP2K input text) of every sampling of one structure."""
    from egnn import datagen

    fam = datagen.select([material], [FAMILY[material]])[0]
    cell = datagen.make_structure(fam, fam.seeds[0])
    gc2 = "      SCHEME GENERAL\n" + "".join(f"      KPOINT {a} {b} {c} 1.0\n"
                                           for a, b, c in itertools.product((0.0, 0.5), repeat=3))
    mp2 = datagen.cp2k_input(cell, "x", fam.basis, (2, 2, 2))
    runs = {"mp2": (cell, mp2), "mp4": (cell, datagen.cp2k_input(cell, "x", fam.basis, (4, 4, 4))),
            "gamma": (cell, datagen.cp2k_input(cell, "x", fam.basis, None)),
            "gc2": (cell, mp2.replace("      SCHEME MONKHORST-PACK 2 2 2\n", gc2))}
    if material == "gete":
        sc = cell.repeat((2, 2, 2))
        runs["sc_gamma"] = (sc, datagen.cp2k_input(sc, "x", fam.basis, None))
        runs["sc_fold"] = (sc, datagen.cp2k_input(sc, "x", fam.basis, (2, 2, 2), (2, 2, 2)))
    return runs


def _run(folder: str, text: str) -> float:
    """Run CP2K on `text` in folder (project name = folder name) unless it finished before; seconds."""
    from egnn import datagen

    name = os.path.basename(folder)
    text = text.replace("  PROJECT x\n", f"  PROJECT {name}\n")
    if datagen.is_complete(folder, name, text):
        return 0.0
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.inp"), "w") as f:
        f.write(text)
    return datagen.run_cp2k(folder, name)


def _onsite(st) -> list[np.ndarray]:
    """The onsite blocks [n_i, n_i] of every atom (meV): the R = 0 image, or the Γ matrix of a Γ run."""
    off = st.basis.orbital_offsets(st.atoms.get_atomic_numbers())
    H = st.H[(0, 0, 0)]
    H = H.toarray() if hasattr(H, "toarray") else np.asarray(H)
    return [1000 * H[off[i]:off[i + 1], off[i]:off[i + 1]] for i in range(len(st.atoms))]


def compare(ref, other) -> dict:
    """Per element: mean (and range over atoms) of the onsite diagonal difference other − ref, and the
    MAE over whole onsite blocks, in meV. Atoms of a supercell are matched to the cell's by position."""
    a, b = _onsite(ref), _onsite(other)
    frac = ref.atoms.get_scaled_positions() % 1.0
    rows: dict = {}
    for j, pos in enumerate(other.atoms.positions):
        f = np.linalg.solve(ref.atoms.cell[:].T, pos) % 1.0
        d = np.abs((frac - f + 0.5) % 1.0 - 0.5).sum(1)
        i = int(d.argmin())
        if d[i] > 1e-6:
            raise ValueError(f"atom {j} of the supercell matches no atom of the cell")
        diag = np.diag(b[j]) - np.diag(a[i])
        rows.setdefault(ref.atoms[i].symbol, []).append((diag.mean(), np.abs(b[j] - a[i]).mean()))
    out = {}
    for el, r in rows.items():
        r = np.array(r)
        out[el] = {"diag_shift_meV": float(r[:, 0].mean()), "diag_shift_min_meV": float(r[:, 0].min()),
                   "diag_shift_max_meV": float(r[:, 0].max()), "block_mae_meV": float(r[:, 1].mean())}
    return out


def main(argv=None) -> int:
    from egnn.io.cp2k import read_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--material", nargs="+", default=["hfo2", "gete"], choices=sorted(FAMILY))
    ap.add_argument("--work", default=os.path.join(ROOT, "data", "kpoint_sampling"))
    ap.add_argument("--out", default=os.path.join(ROOT, "profiling", "results", "kpoint_sampling.json"))
    args = ap.parse_args(argv)
    result = {}
    for mat in args.material:
        runs = _inputs(mat)
        secs = {k: _run(os.path.join(args.work, f"{mat}_{k}"), text) for k, (_, text) in runs.items()}
        st = {k: read_run(os.path.join(args.work, f"{mat}_{k}"), matrices=("H",)) for k in runs}
        result[mat] = {"structure": f"{FAMILY[mat]}_s0000", "cp2k_seconds": secs,
                       "vs_mp2": {k: compare(st["mp2"], st[k]) for k in runs if k != "mp2"}}
        if "sc_gamma" in st:
            result[mat]["sc_gamma_vs_gc2"] = compare(st["gc2"], st["sc_gamma"])
        print(f"{mat} ({FAMILY[mat]}_s0000): onsite diagonal shift against mp2, mean per element "
              "(range over atoms) / onsite block MAE, meV")
        for k, per in result[mat]["vs_mp2"].items():
            print(f"  {k:9s}" + "".join(f"  {el} {v['diag_shift_meV']:+7.1f} ({v['diag_shift_min_meV']:+.0f} .. "
                                         f"{v['diag_shift_max_meV']:+.0f}) / {v['block_mae_meV']:5.1f}"
                                         for el, v in per.items()))
        if "sc_gamma_vs_gc2" in result[mat]:
            worst = max(v["block_mae_meV"] for v in result[mat]["sc_gamma_vs_gc2"].values())
            print(f"  supercell at Γ against gc2: onsite block MAE ≤ {worst:.3f} meV (the same sampling)")
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
