"""How much of the site potential lies beyond a model's reach, in randomly displaced cells of growing size.

    .venv/bin/python profiling/long_range.py [--repeat 1 2 3 4] [--sigma 0.1 0.2] [--reach 8 16] [--out JSON]

HfO2 (the monoclinic prototype of egnn.datagen) repeated n×n×n, every atom displaced by N(0, σ) in
each direction (as `egnn data generate` rattles its cells), formal charges Hf +4, O −2. Per atom, the
Ewald potential φ (erfc real space over 12 Å, α = 0.3/Å, plus profiling/site_potential.py's
reciprocal term and the self term) minus what a model that sees neighbours within the reach R can
sum itself: the charge-neutral, shifted and damped Coulomb sum over them (Wolf, α_w = 0.1/Å, which
keeps most of the bare Coulomb sum within R). The RMS of that remainder over the atoms of each element
is a potential no model of reach R can know; the onsite levels follow it screened (docs/accuracy.md:
slopes 0.3-0.5 of the formal-charge potential). Uncorrelated displacements put as much weight on long
wavelengths as on short ones; thermal (MD) displacements do not, as the macroscopic field of a long
polarisation wave costs energy, so this bounds rattled cells, not physical snapshots.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from scipy.special import erfc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from site_potential import KE, long_wavelength_potential  # noqa: E402

CHARGES = {72: 4.0, 8: -2.0}
ALPHA, ALPHA_W, REAL_CUT = 0.3, 0.1, 12.0


def _pairs(atoms, cutoff):
    from vesin import NeighborList

    return NeighborList(cutoff=cutoff, full_list=True).compute(atoms.positions, atoms.cell[:], True, "ijd")


def ewald(atoms, q):
    """φ [N] in eV of charges q in the periodic cell (Ewald: real + reciprocal + self)."""
    i, j, d = _pairs(atoms, REAL_CUT)
    real = np.zeros(len(q))
    np.add.at(real, i, q[j] * erfc(ALPHA * d) / d)
    return KE * (real - 2 * ALPHA / np.sqrt(np.pi) * q) + long_wavelength_potential(atoms.positions, atoms.cell, q,
                                                                                      ALPHA)


def within(atoms, q, reach):
    """The Wolf sum over neighbours within `reach` (what a model of that reach can form)."""
    i, j, d = _pairs(atoms, reach)
    w = np.zeros(len(q))
    np.add.at(w, i, q[j] * (erfc(ALPHA_W * d) / d - erfc(ALPHA_W * reach) / reach))
    return KE * (w - q * (erfc(ALPHA_W * reach) / reach + 2 * ALPHA_W / np.sqrt(np.pi)))


def main(argv=None) -> int:
    from egnn.datagen import prototype

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--sigma", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--reach", type=float, nargs="+", default=[8.0, 16.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    print(f"{'atoms':>6s} {'cell Å':>7s} {'σ Å':>5s} {'reach Å':>8s}  RMS beyond reach, meV: Hf / O   (RMS of φ: Hf / O)")
    for n in a.repeat:
        for sigma in a.sigma:
            atoms = prototype("hfo2_m12").repeat((n, n, n))
            atoms.positions += np.random.default_rng([a.seed, n]).normal(0.0, sigma, atoms.positions.shape)
            q = np.array([CHARGES[int(z)] for z in atoms.numbers])
            phi = ewald(atoms, q)
            for reach in a.reach:
                rest = phi - within(atoms, q, reach)
                row = {"atoms": len(atoms), "cell_A": float(atoms.cell.lengths().min()), "sigma_A": sigma,
                       "reach_A": reach}
                for z, el in ((72, "Hf"), (8, "O")):
                    m = atoms.numbers == z
                    row[f"beyond_{el}_meV"] = 1000 * float(rest[m].std())
                    row[f"phi_{el}_meV"] = 1000 * float(phi[m].std())
                rows.append(row)
                print(f"{row['atoms']:6d} {row['cell_A']:7.1f} {sigma:5.2f} {reach:8.1f}  {row['beyond_Hf_meV']:8.0f} / "
                      f"{row['beyond_O_meV']:5.0f}   ({row['phi_Hf_meV']:5.0f} / {row['phi_O_meV']:5.0f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"alpha": ALPHA, "alpha_wolf": ALPHA_W, "charges": {"Hf": 4.0, "O": -2.0}, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
