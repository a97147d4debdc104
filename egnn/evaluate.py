"""Accuracy of a model on DFT data, the way the field reports it.

All matrix-element errors are on the orbital-basis H blocks (the model's coupled outputs are turned
back into orbital blocks with `blocks.from_coupled`), in meV:

* `mae_meV`, `mae_node_meV`, `mae_edge_meV`: node blocks H[i, i](0), edge blocks H[d, s](R), both;
  for Γ-only data whose blocks fold several images (mode 'folded'), the Γ blocks per atom pair
  (Σ over the edges of the pair, plus the node block for d == s; "node" = the d == s pairs).
* per element pair (`per_pair`, edges, dst-src), per element (`per_element_node`), and vs
  interatomic distance (`vs_distance`, 1 Å bins; node blocks sit at 0).
* eigenvalues at Γ: H c = ε S c with the predicted H and the DFT S (both Σ_R), the occupied
  states (valence electrons / 2) and the first unoccupied one against DFT: `eig_mae_meV`,
  `eig_rel` = mean |Δε| / mean |ε_DFT| (a fraction; `eig_rel_percent`), `gap_mae_meV`.
* `ghost_levels`: how many more predicted Γ levels than occupied DFT ones lie below the DFT
  mid-gap: levels with no DFT counterpart. Where S has near-null directions (DZVP GeTe: smallest
  eigenvalue of S(Γ) ~4e-3, SZV HfO2 ~0.14) the S-normalised eigenvectors of the high levels along
  them are long (|v|² up to ~170), so an H error of 0.3 eV along one moves its level from +45 eV to
  −30 eV: into the gap or below every occupied level. Each ghost shifts the level count, so the
  eigenvalue and gap figures of a structure with ghosts are not level-by-level errors any more.
* `eig_by_distance`: where the Γ-level errors come from. The first-order shift v_kᵀ ΔH v_k (DFT
  eigenvectors) of the errors of the node blocks and of the edge blocks in distance shells, and of
  what r_cut leaves out: per shell the mean shift of the occupied levels and the gap change. The
  shells add up to the first-order error; a large shift from a far shell whose element MAE is tiny
  is a coherent bias, what `train.eig_weight` (egnn.spectral) trains away.
* every figure again after removing the best constant energy-zero shift c·S per structure,
  c = ⟨ΔH, S⟩ / ⟨S, S⟩ over the compared orbital elements (ΔH = H_pred − H_DFT): the `*_shifted_*`
  keys. Periodic DFT fixes the zero of energy only up to such a shift (it differs between cell
  sizes, k-point sets and codes). With H − c·S every eigenvalue moves by exactly −c.

The DFT reference for eigenvalues is the full H and S of the source CP2K run when its folder is
still there (`eig_reference: "cp2k run"`), else the dataset's matrices within r_cut
(`"dataset (r_cut)"`).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import blocks as B
from .errors import InputError, warn_once
from .io.cp2k import GTH_VALENCE, valence_electrons
from .spectral import dense

__all__ = ["evaluate", "evaluate_sample", "valence_electrons", "make_plots", "GTH_VALENCE"]


MAX_PLOT_POINTS = 200_000
BAND_PATH_POINTS = 60  # k-points along ase's standard path of each cell
GHOST_WINDOW = 16  # predicted levels above the occupied ones searched for ghosts


def ghost_levels(e_pred, e_dft, n_occ: int) -> int:
    """How many more predicted levels (e_pred: the lowest n_occ + GHOST_WINDOW or all) than the n_occ
    occupied DFT levels lie below the DFT mid-gap (e_dft: at least n_occ + 1 levels, ascending)."""
    mid = 0.5 * (e_dft[n_occ - 1] + e_dft[n_occ])
    return max(0, int((np.asarray(e_pred) < mid).sum()) - n_occ)


# ----------------------------------------------------------------------------- one structure
def _orbital_groups(numbers_rows, numbers_cols, pred, target, s_target, basis):
    """Per species pair: (row indices, pred blocks, DFT blocks, S blocks) in the orbital basis."""
    from ase.data import chemical_symbols as cs

    out = []
    for (za, zb), idx in B._species_groups(numbers_rows, numbers_cols).items():
        a, b = cs[za], cs[zb]
        out.append((a, b, idx, B.from_coupled(pred[idx], a, b, basis), B.from_coupled(target[idx], a, b, basis),
                    B.from_coupled(s_target[idx], a, b, basis)))
    return out


def _np64(t):
    return t.detach().to("cpu").double().numpy() if torch.is_tensor(t) else np.asarray(t, np.float64)


@torch.no_grad()
def evaluate_sample(model, x, edge_chunk: int | None = None, name: str = "", source: str | None = None,
                    keep: bool = False) -> dict:
    """Errors of one `egnn.dataset.Sample` (loaded with overlap=True). Returns per-structure
    figures plus raw arrays under "_arrays" (errors, S, |H|, distance, labels) for aggregation."""
    import scipy.linalg

    if not x.overlap:
        raise InputError(f"{name or source}: the dataset holds no S; re-run `egnn data convert` without "
                         "--no-overlap (the shift c·S and the eigenvalues need it)")
    basis = model.basis
    g = x.graph
    numbers = np.asarray(g.numbers)
    p0 = next(model.parameters())
    node, edge = model(x.species.long().to(p0.device), torch.from_numpy(g.src).to(p0.device),
                       torch.from_numpy(g.dst).to(p0.device), torch.from_numpy(g.vec).to(p0.device, p0.dtype),
                       edge_chunk=edge_chunk)
    P = len(x.pair_dst) if x.mode == "folded" else 0
    pairs = B.fold(node.double(), edge.double(), x.edge_fold.long(), x.node_fold.long(), P) if P else None
    node, edge = _np64(node), _np64(edge)
    dist_e = np.linalg.norm(g.vec, axis=1)
    if x.mode == "folded":
        pred = _np64(pairs)
        pd, ps = x.pair_dst.numpy().astype(np.int64), x.pair_src.numpy().astype(np.int64)
        dist = np.full(P, np.inf)
        np.minimum.at(dist, x.edge_fold.numpy(), dist_e)
        dist[pd == ps] = 0.0
        is_node = pd == ps
        rows, cols = pd, ps
        target, s_target = _np64(x.pair_target), _np64(x.overlap["pair_target"])
        sets = [(rows, cols, pred, target, s_target, dist, is_node)]
    else:
        i = np.arange(len(numbers))
        sets = [(i, i, node, _np64(x.node_target), _np64(x.overlap["node_target"]), np.zeros(len(i)),
                 np.ones(len(i), bool)),
                (g.dst, g.src, edge, _np64(x.edge_target), _np64(x.overlap["edge_target"]), dist_e,
                 np.zeros(len(dist_e), bool))]
    err, sval, habs, pabs, dist_all, kind, pair = [], [], [], [], [], [], []
    offs = basis.orbital_offsets(numbers)
    n = int(offs[-1])
    pred_groups, dft_groups, s_groups, err_groups = [], [], [], []
    labels = []
    for rows, cols, pr, tg, st, dist, nodeflag in sets:
        for a, b, idx, bp, bt, bs in _orbital_groups(numbers[rows], numbers[cols], pr, tg, st, basis):
            k = bp.shape[1] * bp.shape[2]
            err.append((bp - bt).ravel())
            sval.append(bs.ravel())
            habs.append(np.abs(bt).ravel())
            pabs.append(np.abs(bp).ravel())
            dist_all.append(np.repeat(dist[idx], k))
            kind.append(np.repeat(nodeflag[idx], k))
            lab = len(labels)
            labels.append((a, b))
            pair.append(np.full(len(idx) * k, lab, np.int32))
            pred_groups.append((rows, cols, idx, bp))
            err_groups.append((rows, cols, idx, bp - bt, np.where(nodeflag[idx], -1.0, dist[idx])))
            dft_groups.append((rows, cols, idx, bt))
            s_groups.append((rows, cols, idx, bs))
    err, sval, habs, pabs, dist_all, kind, pair = map(np.concatenate, (err, sval, habs, pabs, dist_all, kind, pair))
    c = float(err @ sval / (sval @ sval)) if sval @ sval > 0 else 0.0
    res = {"name": name, "mode": x.mode, "atoms": len(numbers), "edges": int(g.num_edges), "energy_shift_eV": c}
    sh = err - c * sval
    for key, m in (("", np.ones(err.size, bool)), ("_node", kind), ("_edge", ~kind)):
        res[f"mae{key}_meV"] = 1000 * float(np.abs(err[m]).mean()) if m.any() else float("nan")
        res[f"mae{key}_shifted_meV"] = 1000 * float(np.abs(sh[m]).mean()) if m.any() else float("nan")

    # --- eigenvalues at Γ
    def gamma_matrix(groups):
        M = np.zeros((n, n))
        for rows, cols, idx, blk in groups:
            M += dense(n, offs, rows, cols, [(idx, blk)])
        return M

    Hp = gamma_matrix(pred_groups)
    Hp = 0.5 * (Hp + Hp.T)  # the model's [d, s](R) and [s, d](−R) blocks agree only up to its error
    H_dft, S_dft, ref, st = None, None, "dataset (r_cut)", None
    if source and os.path.isdir(source):
        try:
            from .io.cp2k import read_run

            st = read_run(source)
            if len(st.atoms) == len(numbers) and np.array_equal(st.atoms.get_atomic_numbers(), numbers):
                H_dft, S_dft, ref = st.gamma("H").toarray(), st.gamma("S").toarray(), "cp2k run"
            else:
                st = None
        except InputError as exc:
            warn_once(f"evaluate-ref-{source}", f"{source}: cannot read the CP2K run ({exc}); eigenvalues use "
                      "the dataset's matrices within r_cut")
    if H_dft is None:
        H_dft, S_dft = gamma_matrix(dft_groups), gamma_matrix(s_groups)
        H_dft, S_dft = 0.5 * (H_dft + H_dft.T), 0.5 * (S_dft + S_dft.T)
    symbols = [basis._symbol(int(z)) for z in numbers]
    n_el, qsrc = valence_electrons(symbols, source)
    if n_el % 2:
        warn_once("evaluate-odd", f"{name}: {n_el} valence electrons (odd); counting {n_el // 2} occupied states")
    n_occ = n_el // 2
    if n_occ + 1 > n:
        raise InputError(f"{name}: {n_occ} occupied states need more than the {n} orbitals of the basis")
    try:
        e_dft, V = scipy.linalg.eigh(H_dft, S_dft, subset_by_index=[0, n_occ])
        e_wide = scipy.linalg.eigh(Hp, S_dft, eigvals_only=True, subset_by_index=[0, min(n - 1, n_occ + GHOST_WINDOW)])
    except np.linalg.LinAlgError as exc:
        raise InputError(f"{name}: the generalized eigenproblem failed ({exc}); is S positive definite? "
                         "(a too small r_cut can truncate S)") from None
    e_pred = e_wide[:n_occ + 1]
    d = e_pred - e_dft
    res.update(eig_reference=ref, valence_electrons=n_el, valence_from=qsrc, n_occupied=n_occ,
               eig_mae_meV=1000 * float(np.abs(d).mean()), eig_occ_mae_meV=1000 * float(np.abs(d[:-1]).mean()),
               eig_lumo_err_meV=1000 * float(d[-1]), eig_mae_shifted_meV=1000 * float(np.abs(d - c).mean()),
               eig_rel=float(np.abs(d).mean() / np.abs(e_dft).mean()),
               eig_rel_shifted=float(np.abs(d - c).mean() / np.abs(e_dft).mean()),
               ghost_levels=ghost_levels(e_wide, e_dft, n_occ),
               gap_dft_eV=float(e_dft[-1] - e_dft[-2]), gap_pred_eV=float(e_pred[-1] - e_pred[-2]),
               homo_dft_eV=float(e_dft[-2]), homo_pred_eV=float(e_pred[-2]))
    res["gap_err_meV"] = 1000 * (res["gap_pred_eV"] - res["gap_dft_eV"])
    trunc = H_dft - gamma_matrix(dft_groups) if ref == "cp2k run" else None
    res["eig_by_distance"] = _eig_by_distance(V, err_groups, n, offs, trunc)
    res["_arrays"] = {"err": err, "shifted": sh, "dist": dist_all, "node": kind, "pair": pair, "labels": labels,
                      "eig_d": d, "eig_dft": e_dft, "c": c}
    if st is not None and not st.gamma_only and x.mode != "folded":
        res.update(_band_figures(st, B.assemble(g, node, edge, basis), n_occ, c, res["_arrays"], keep))
    if keep:
        res["_arrays"].update(habs=habs, pabs=pabs, H_dft=H_dft, H_pred=Hp)
    return res


EIG_SHELLS = ((-1.0, 0.0), (0.0, 2.0), (2.0, 3.0), (3.0, 4.0), (4.0, 6.0), (6.0, np.inf))  # Å; -1: node blocks


def _eig_by_distance(V, err_groups, n, offs, trunc=None) -> list:
    """Where the Γ-level errors come from: the first-order shifts v_kᵀ ΔH_shell v_k (DFT vectors V, the
    occupied levels and the first empty one) of the errors of the blocks in each distance shell (node
    blocks first; Γ pairs by their shortest image), and with `trunc` (H_DFT beyond r_cut) what the
    cut-off leaves out. Per shell: the mean shift of the occupied levels and the change of the gap
    (meV); the shells add up to the whole first-order error, so a large mean shift in a far shell
    with a small element MAE there is a coherent bias (egnn.spectral)."""
    def shell_dH(lo, hi):
        dH = np.zeros((n, n))
        for rows, cols, idx, blk, d in err_groups:
            m = d < 0 if lo < 0 else (d >= lo) & (d < hi)
            if m.any():
                dH += dense(n, offs, rows, cols, [(idx[m], blk[m])])
        return dH

    parts = [("node" if lo < 0 else f"{lo:g}-{hi:g}", shell_dH(lo, hi)) for lo, hi in EIG_SHELLS]
    if trunc is not None:
        parts.append(("beyond r_cut", -trunc))
    out = []
    for label, dH in parts:
        d = np.einsum("ik,ij,jk->k", V, 0.5 * (dH + dH.T), V)
        out.append({"shell": label, "occ_shift_meV": 1000 * float(d[:-1].mean()),
                    "gap_meV": 1000 * float(d[-1] - d[-2])})
    return out


def _band_figures(st, HR_pred, n_occ, c, arrays, keep) -> dict:
    """Bands of predicted H(R) and DFT H(R) (both with the DFT S(R)) along ase's standard path and at
    the run's own k-points (its Monkhorst-Pack mesh or its listed KPOINTs; Γ for a Γ-only run); errors
    as in egnn.bands.compare (raw and shift-removed)."""
    from . import bands as BD
    from .io.cp2k import symmetrize

    HR_pred = symmetrize(HR_pred)  # the [d, s](R) and [s, d](−R) predictions agree only up to the error
    kp, x, xs, labels = BD.kpath(st.atoms, BAND_PATH_POINTS)
    mesh, listed = st.meta.get("kpoint_mesh"), st.meta.get("kpoint_list")
    mp = BD.monkhorst_pack(mesh) if mesh else np.array(listed) if listed else np.zeros((1, 3))
    kpts = np.concatenate([kp, mp])
    e_dft, e_pred = BD.bands(st.H, st.S, kpts), BD.bands(HR_pred, st.S, kpts)
    out = BD.compare(e_pred, e_dft, n_occ)
    out.update({k.replace("band_", "band_shifted_"): v for k, v in BD.compare(e_pred, e_dft, n_occ, shift=c).items()
                if k in ("band_mae_meV", "band_occ_mae_meV", "band_empty_mae_meV")})
    mp_only = BD.compare(e_pred[len(kp):], e_dft[len(kp):], n_occ)
    out.update(band_mp_mae_meV=mp_only["band_mae_meV"], band_mp_mesh=list(mesh) if mesh else None,
               band_mp_points=len(mp),
               band_path="".join(labels), band_kpoints=len(kpts))
    hi = min(e_dft.shape[1], n_occ + BD.N_EMPTY)
    arrays["band_d"] = (e_pred[:, :hi] - e_dft[:, :hi]).ravel()
    arrays["band_d_shifted"] = arrays["band_d"] - c
    arrays["band_occ"] = np.broadcast_to(np.arange(hi) < n_occ, (len(kpts), hi)).ravel()
    if keep:
        arrays["bands"] = {"x": x, "special_x": xs, "labels": labels, "dft": e_dft[:len(kp)], "pred": e_pred[:len(kp)],
                           "n_occ": n_occ}
    return out


# ----------------------------------------------------------------------------- aggregate
def _iter_samples(data, model):
    """(Sample, name, source) of every structure of Datasets / dataset paths / Samples."""
    from .dataset import Dataset
    from .dataset import Sample as DSample

    for d in data:
        if isinstance(d, DSample):
            yield d, os.path.basename(str(d.source).rstrip("/")), d.source
            continue
        path = d if isinstance(d, str) else d.path
        ds = Dataset(path, dtype=torch.float64, overlap=True)
        if ds.basis.to_dict()["shells"] != model.basis.to_dict()["shells"]:
            raise InputError(f"{path}: its orbital basis {ds.basis.shells} differs from the checkpoint's "
                             f"{model.basis.shells}; evaluate on data converted with the training basis sets")
        for i in range(len(ds)):
            src = ds.manifest["structures"][i]["source"]
            yield ds[i], os.path.basename(src.rstrip("/")), src


def evaluate(model, data, edge_chunk: int | None = None, bin_width: float = 1.0, keep_arrays: bool = False,
             progress: bool = False) -> dict:
    """Metrics of `model` over `data` (egnn.dataset.Dataset objects, dataset folders, or dataset
    Samples loaded with overlap=True). See the module docstring for the keys; element-weighted
    over all structures. With keep_arrays the raw arrays (for make_plots) are under "_arrays"."""
    model.eval()
    per = []
    it = _iter_samples(data, model)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="evaluate")
    for x, name, src in it:
        per.append(evaluate_sample(model, x, edge_chunk, name, src, keep=keep_arrays))
    if not per:
        raise InputError("evaluate: no structures in the given data")
    A = {k: [p["_arrays"][k] for p in per] for k in ("err", "shifted", "dist", "node")}
    err, sh, dist, node = (np.concatenate(A[k]) for k in ("err", "shifted", "dist", "node"))
    out = {"structures": len(per), "elements": int(err.size)}
    for key, m in (("", np.ones(err.size, bool)), ("_node", node), ("_edge", ~node)):
        out[f"mae{key}_meV"] = 1000 * float(np.abs(err[m]).mean()) if m.any() else float("nan")
        out[f"mae{key}_shifted_meV"] = 1000 * float(np.abs(sh[m]).mean()) if m.any() else float("nan")
    # per element pair / element
    per_pair, per_el = {}, {}
    for p in per:
        a = p["_arrays"]
        for lab_id, (ea, eb) in enumerate(a["labels"]):
            m = a["pair"] == lab_id
            for is_node, tgt, key in ((True, per_el, ea), (False, per_pair, f"{ea}-{eb}")):
                mm = m & (a["node"] == is_node)
                if mm.any():
                    acc = tgt.setdefault(key, [0.0, 0.0, 0])
                    acc[0] += float(np.abs(a["err"][mm]).sum())
                    acc[1] += float(np.abs(a["shifted"][mm]).sum())
                    acc[2] += int(mm.sum())
    fmt = lambda acc: {"mae_meV": 1000 * acc[0] / acc[2], "mae_shifted_meV": 1000 * acc[1] / acc[2], "n": acc[2]}
    out["per_pair"] = {k: fmt(v) for k, v in sorted(per_pair.items())}
    out["per_element_node"] = {k: fmt(v) for k, v in sorted(per_el.items())}
    # vs distance
    edges = np.arange(0.0, max(float(dist.max()), bin_width) + bin_width, bin_width)
    which = np.digitize(dist, edges) - 1
    out["vs_distance"] = []
    for b in range(len(edges) - 1):
        m = which == b
        if m.any():
            out["vs_distance"].append({"r_lo": float(edges[b]), "r_hi": float(edges[b + 1]), "n": int(m.sum()),
                                       "mae_meV": 1000 * float(np.abs(err[m]).mean()),
                                       "mae_shifted_meV": 1000 * float(np.abs(sh[m]).mean())})
    # eigenvalues: pooled over all compared states
    d = np.concatenate([p["_arrays"]["eig_d"] for p in per])
    ds = np.concatenate([p["_arrays"]["eig_d"] - p["_arrays"]["c"] for p in per])
    e = np.concatenate([p["_arrays"]["eig_dft"] for p in per])
    occ = np.concatenate([np.arange(len(p["_arrays"]["eig_d"])) < len(p["_arrays"]["eig_d"]) - 1 for p in per])
    out.update(eig_mae_meV=1000 * float(np.abs(d).mean()), eig_occ_mae_meV=1000 * float(np.abs(d[occ]).mean()),
               eig_lumo_mae_meV=1000 * float(np.abs(d[~occ]).mean()),
               eig_mae_shifted_meV=1000 * float(np.abs(ds).mean()),
               eig_occ_mae_shifted_meV=1000 * float(np.abs(ds[occ]).mean()),
               eig_rel=float(np.abs(d).mean() / np.abs(e).mean()),
               eig_rel_shifted=float(np.abs(ds).mean() / np.abs(e).mean()),
               gap_mae_meV=float(np.mean([abs(p["gap_err_meV"]) for p in per])),
               ghost_levels=sum(p["ghost_levels"] for p in per),
               ghost_structures=sum(p["ghost_levels"] > 0 for p in per))
    # per shell: mean over structures of the signed contributions, and of their size
    rows = {}
    for p in per:
        for b in p["eig_by_distance"]:
            rows.setdefault(b["shell"], []).append((b["occ_shift_meV"], b["gap_meV"]))
    out["eig_by_distance"] = []
    for shell, v in rows.items():
        v = np.array(v)
        out["eig_by_distance"].append({"shell": shell, "structures": len(v), "occ_shift_meV": float(v[:, 0].mean()),
                                       "occ_shift_meV_abs": float(np.abs(v[:, 0]).mean()),
                                       "gap_meV": float(v[:, 1].mean()), "gap_meV_abs": float(np.abs(v[:, 1]).mean())})
    banded = [p for p in per if "band_d" in p["_arrays"]]
    if banded:
        bd = np.concatenate([p["_arrays"]["band_d"] for p in banded])
        bds = np.concatenate([p["_arrays"]["band_d_shifted"] for p in banded])
        bo = np.concatenate([p["_arrays"]["band_occ"] for p in banded])
        out.update(band_structures=len(banded), band_mae_meV=1000 * float(np.abs(bd).mean()),
                   band_occ_mae_meV=1000 * float(np.abs(bd[bo]).mean()),
                   band_empty_mae_meV=1000 * float(np.abs(bd[~bo]).mean()),
                   band_mae_shifted_meV=1000 * float(np.abs(bds).mean()),
                   band_gap_mae_meV=float(np.mean([abs(p["band_gap_err_meV"]) for p in banded])),
                   band_mp_mae_meV=float(np.mean([p["band_mp_mae_meV"] for p in banded])))
    out["eig_rel_percent"] = 100 * out["eig_rel"]
    out["eig_rel_shifted_percent"] = 100 * out["eig_rel_shifted"]
    out["per_structure"] = [{k: v for k, v in p.items() if k != "_arrays"} for p in per]
    if keep_arrays:
        out["_arrays"] = [p["_arrays"] | {"name": p["name"]} for p in per]
    return out


# ----------------------------------------------------------------------------- plots
def make_plots(result: dict, out_dir: str, seed: int = 0) -> list[str]:
    """The Fig. 8 analogues from `evaluate(..., keep_arrays=True)`: |H| vs distance (DFT and
    predicted), error violins (node / edge, raw and shifted), log10|H(Γ)| predicted vs DFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "_arrays" not in result or "habs" not in result["_arrays"][0]:
        raise InputError("make_plots needs evaluate(..., keep_arrays=True)")
    os.makedirs(out_dir, exist_ok=True)
    arr = result["_arrays"]
    cat = {k: np.concatenate([a[k] for a in arr]) for k in ("habs", "pabs", "dist", "err", "shifted", "node")}
    rng = np.random.default_rng(seed)
    sel = np.arange(cat["dist"].size)
    if sel.size > MAX_PLOT_POINTS:
        sel = rng.choice(sel, MAX_PLOT_POINTS, replace=False)
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    floor = 1e-8
    ax.scatter(cat["dist"][sel], np.maximum(cat["habs"][sel], floor), s=2, alpha=0.4, label="DFT", rasterized=True)
    ax.scatter(cat["dist"][sel], np.maximum(cat["pabs"][sel], floor), s=2, alpha=0.4, label="predicted",
               rasterized=True)
    ax.set_yscale("log")
    ax.set_xlabel("interatomic distance (Å)")
    ax.set_ylabel("|H| (eV)")
    ax.legend(markerscale=4)
    ax.set_title("|H| matrix elements vs distance")
    files.append(_save(fig, out_dir, "H_vs_distance.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [("node", cat["node"]), ("edge", ~cat["node"])]
    data, names = [], []
    for label, m in groups:
        for key, tag in (("err", ""), ("shifted", " (shift removed)")):
            v = 1000 * cat[key][m]
            if v.size:
                data.append(v if v.size <= MAX_PLOT_POINTS else rng.choice(v, MAX_PLOT_POINTS, replace=False))
                names.append(label + tag)
    ax.violinplot(data, showmedians=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
    ax.set_ylabel("H_pred − H_DFT (meV)")
    ax.set_title(f"errors: MAE {result['mae_meV']:.1f} meV, shifted {result['mae_shifted_meV']:.1f} meV")
    files.append(_save(fig, out_dir, "error_violins.png"))

    a = arr[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    lo = -6
    panels = [(a["H_dft"], "DFT log10|H(Γ)|"), (a["H_pred"], "predicted log10|H(Γ)|"),
              (a["H_pred"] - a["H_dft"], "log10|pred − DFT|")]
    for axx, (M, title) in zip(axes, panels):
        im = axx.imshow(np.log10(np.maximum(np.abs(M), 10.0 ** lo)), vmin=lo, vmax=2, cmap="viridis")
        axx.set_title(title)
        axx.set_xlabel("orbital")
    axes[0].set_ylabel(a["name"])
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 eV")
    files.append(_save(fig, out_dir, "logH_pred_vs_dft.png"))
    from .bands import plot_bands

    for a in arr:
        b = a.get("bands")
        if b is not None:
            name = f"bands_{a['name']}.png"
            files.append(plot_bands(b["x"], b["special_x"], b["labels"], b["dft"], b["pred"], b["n_occ"],
                                    os.path.join(out_dir, name), title=f"{a['name']}: DFT (solid), egnn (dashed)"))
    return files


def _save(fig, out_dir, name):
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    tmp = path + ".part.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path
