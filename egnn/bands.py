"""Band structures from real-space matrices: what the users of H look at first.

    M(k) = Σ_R M(R) · exp(2πi k·R)        k in fractional reciprocal coordinates, R integer shifts

with M(R) the {shift: sparse} matrices of egnn's convention (block [d, s](R) couples x_d with
x_s + R·cell; egnn.io readers and egnn.blocks.assemble deliver exactly this). The generalized
eigenproblem H(k) c = ε S(k) c gives the bands. Eigenvalues do not depend on the sign of the
phase or on whether atom positions enter it (both change H(k) by a unitary similarity), so the
plain lattice phase is used.

* `kpath(atoms, npoints)`       ase's standard band path of the cell (special points and labels)
* `monkhorst_pack(mesh)`        the k-points of a Monkhorst-Pack mesh (CP2K's FULL_GRID, no symmetry)
* `bands(HR, SR, kpts)`         ε [K, n_orbitals] in eV (ascending per k)
* `compare(pred, dft, n_occ)`   band MAE (occupied, first empty bands), band gaps and their errors
* `plot_bands(...)`             predicted over DFT bands along the path
"""
from __future__ import annotations

import os

import numpy as np
import scipy.linalg

from .errors import InputError

__all__ = ["kpath", "monkhorst_pack", "bloch_sum", "bands", "compare", "plot_bands", "N_EMPTY"]

# "the first empty bands": how many conduction bands above the occupied ones enter the band MAE
N_EMPTY = 4


def kpath(atoms, npoints: int = 60):
    """ase's standard path for the cell's Bravais lattice: (kpts [K, 3] fractional, x [K],
    special x positions, labels)."""
    path = atoms.cell.bandpath(npoints=npoints)
    x, xs, labels = path.get_linear_kpoint_axis()
    return np.asarray(path.kpts), np.asarray(x), np.asarray(xs), list(labels)


def monkhorst_pack(mesh) -> np.ndarray:
    """Fractional k-points of an n1 × n2 × n3 Monkhorst-Pack mesh (all of them, no symmetry)."""
    from ase.dft.kpoints import monkhorst_pack as mp

    return np.asarray(mp(tuple(int(n) for n in mesh)))


def _stack(MR: dict):
    """(shifts [nR, 3], dense images [nR, n, n]) of {shift: matrix}."""
    shifts = np.array(list(MR), dtype=float).reshape(-1, 3)
    dense = np.stack([M.toarray() if hasattr(M, "toarray") else np.asarray(M, float) for M in MR.values()])
    return shifts, dense


def bloch_sum(MR: dict, k) -> np.ndarray:
    """Dense complex M(k) = Σ_R M(R) exp(2πi k·R)."""
    shifts, dense = _stack(MR)
    return np.tensordot(np.exp(2j * np.pi * (shifts @ np.asarray(k, float))), dense, axes=1)


def bands(HR: dict, SR: dict, kpts) -> np.ndarray:
    """All band energies [K, n] (eV, ascending) of H(k) c = ε S(k) c at fractional k-points."""
    (rh, h), (rs, s) = _stack(HR), _stack(SR)
    out = []
    for k in np.atleast_2d(np.asarray(kpts, float)):
        H = np.tensordot(np.exp(2j * np.pi * (rh @ k)), h, axes=1)
        S = np.tensordot(np.exp(2j * np.pi * (rs @ k)), s, axes=1)
        H, S = 0.5 * (H + H.conj().T), 0.5 * (S + S.conj().T)
        try:
            out.append(scipy.linalg.eigh(H, S, eigvals_only=True))
        except np.linalg.LinAlgError as exc:
            raise InputError(f"bands: S(k) at k = {np.round(k, 4).tolist()} is not positive definite ({exc}); "
                             "is S truncated by a too small r_cut?") from None
    return np.array(out)


def _gap(e, n_occ):
    vbm, cbm = e[:, n_occ - 1].max(), e[:, n_occ].min()
    return float(cbm - vbm), float(vbm), float(cbm)


def compare(pred: np.ndarray, dft: np.ndarray, n_occ: int, n_empty: int = N_EMPTY, shift: float = 0.0) -> dict:
    """Band errors (meV) over all k: the occupied bands and the first `n_empty` empty bands, and the
    (indirect) gap over these k-points. `shift` (eV) is subtracted from the predicted bands first
    (the energy-zero shift c of egnn.evaluate, for the `*_shifted` figures)."""
    n = dft.shape[1]
    if not 0 < n_occ < n:
        raise InputError(f"bands: {n_occ} occupied bands of {n} leave no gap to compare")
    hi = min(n, n_occ + n_empty)
    d = (pred[:, :hi] - shift) - dft[:, :hi]
    gp, gd = _gap(pred, n_occ), _gap(dft, n_occ)
    return {"band_mae_meV": 1000 * float(np.abs(d).mean()),
            "band_occ_mae_meV": 1000 * float(np.abs(d[:, :n_occ]).mean()),
            "band_empty_mae_meV": 1000 * float(np.abs(d[:, n_occ:]).mean()),
            "band_max_err_meV": 1000 * float(np.abs(d).max()),
            "band_gap_dft_eV": gd[0], "band_gap_pred_eV": gp[0], "band_gap_err_meV": 1000 * (gp[0] - gd[0]),
            "n_empty_bands": hi - n_occ}


def plot_bands(path_x, special_x, labels, dft, pred, n_occ, out_file, title="", n_empty: int = N_EMPTY,
               mp_x=None):
    """DFT bands (solid) with predicted bands (dashed) over the path, energies relative to the DFT
    valence band maximum; occupied and the first empty bands only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hi = min(dft.shape[1], n_occ + n_empty)
    ref = dft[:, n_occ - 1].max()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lo = max(0, n_occ - 12)  # the top valence bands: the full valence manifold is unreadable
    for b in range(lo, hi):
        ax.plot(path_x, dft[:, b] - ref, color="k", lw=1.2, label="DFT" if b == lo else None)
        ax.plot(path_x, pred[:, b] - ref, color="tab:red", lw=1.0, ls="--", label="egnn" if b == lo else None)
    for x in special_x:
        ax.axvline(x, color="0.8", lw=0.6)
    ax.axhline(0.0, color="0.6", lw=0.5, ls=":")
    ax.set_xticks(special_x)
    ax.set_xticklabels([("Γ" if s == "G" else s) for s in labels])
    ax.set_xlim(path_x[0], path_x[-1])
    ax.set_ylabel("E − E_VBM(DFT) (eV)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    tmp = out_file + ".part.png"  # never a half-written figure under the final name
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_file)
    return out_file
