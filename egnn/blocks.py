"""H(R) <-> per-node / per-edge blocks <-> the coupled (L, M) basis the model predicts.

Conventions (DESIGN.md): node i holds block H[i, i](R=0); edge k = (src s, dst d, shift R) holds
H[d, s](R) — rows orbitals of d, columns of s — with M[i, j](R) = <φ_i(r − x_i)|M|φ_j(r − x_j − R·cell)>
(egnn.io readers deliver H(R) in exactly this form).

Coupling. A shell-pair sub-block B (2la+1 × 2lb+1) maps to ⊕_L c^L with c_M = Σ C[m1, m2, M] B[m1, m2],
C = so3.clebsch_gordan(la, lb, L); entry (i, j, L, c) of basis.pair_layout(a, b) goes to rows
L²..L²+2L, channel c of a [(L_max+1)², width] grid. Per species pair this is one orthogonal matrix
W [na·nb, na·nb] and a list of grid positions `target`, sorted ascending, so that
    compact = W @ block.ravel(),   grid.flat[target] = compact,   block = (Wᵀ @ compact).reshape
and `grid[mask]` (row-major) is exactly `compact`. Everything is vectorised per species pair.

Γ-only data. A Γ matrix holds Σ_R H(R). If no atom pair has more than one edge (cell >= 2·r_cut)
each Γ block is one edge's block ("direct" mode). Otherwise ("folded" mode) the target is per atom
pair (d, s): `fold_index` gives the pairs and the pair id of each edge and node, and the model's
prediction is folded — summed over the edges (and the node, for d == s) of each pair — before it is
compared; as the coupling is linear and the same for a species pair, folding works on coupled outputs.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import scipy.sparse as sp

from .errors import InputError

__all__ = ["pair_transform", "to_coupled", "from_coupled", "node_width", "edge_width", "extract",
           "node_blocks", "edge_blocks", "gamma_mode", "fold_index", "assemble", "gamma", "coverage",
           "compact_to_padded", "pair_mask", "fold"]

log = logging.getLogger("egnn")


def node_width(basis) -> int:
    return max(basis.node_channels())


def edge_width(basis) -> int:
    return max(basis.edge_channels())


@functools.lru_cache(maxsize=None)
def _pair_transform(basis, a: str, b: str, width: int):
    from .so3 import clebsch_gordan

    oa, ob = basis.shell_offsets(a), basis.shell_offsets(b)
    na, nb = basis.n_orbitals(a), basis.n_orbitals(b)
    rows, target = [], []
    for e in basis.pair_layout(a, b):
        if e.c >= width:
            raise InputError(f"coupled width {width} is too small for {a}-{b} (needs > {e.c} at L={e.L})")
        C = clebsch_gordan(e.la, e.lb, e.L).numpy()
        for M in range(2 * e.L + 1):
            w = np.zeros((na, nb))
            w[oa[e.i]:oa[e.i] + 2 * e.la + 1, ob[e.j]:ob[e.j] + 2 * e.lb + 1] = C[:, :, M]
            rows.append(w.ravel())
            target.append((e.L * e.L + M) * width + e.c)
    W, target = np.array(rows), np.array(target, np.int64)
    order = np.argsort(target)
    W, target = W[order], target[order]
    W.setflags(write=False)
    target.setflags(write=False)
    return W, target


@functools.lru_cache(maxsize=None)
def _pair_mask(basis, a: str, b: str, width: int) -> np.ndarray:
    """Grid positions [(L_max+1)², width] a species pair fills (no Clebsch-Gordan needed)."""
    m = np.zeros(((basis.L_max + 1) ** 2, width), bool)
    for e in basis.pair_layout(a, b):
        if e.c >= width:
            raise InputError(f"coupled width {width} is too small for {a}-{b} (needs > {e.c} at L={e.L})")
        m[e.L * e.L:(e.L + 1) ** 2, e.c] = True
    m.setflags(write=False)
    return m


def pair_mask(basis, a, b, width: int | None = None) -> np.ndarray:
    width = edge_width(basis) if width is None else width
    return _pair_mask(basis, basis._symbol(a), basis._symbol(b), int(width))


def pair_transform(basis, a, b, width: int | None = None):
    """(W, target) of species pair (a rows, b columns); see the module docstring."""
    width = edge_width(basis) if width is None else width
    return _pair_transform(basis, basis._symbol(a), basis._symbol(b), int(width))


def _grid(basis):
    return (basis.L_max + 1) ** 2


def _like(W, x):
    if isinstance(x, np.ndarray):
        return W.astype(x.dtype, copy=False)
    import torch
    return torch.tensor(np.array(W), dtype=x.dtype, device=x.device)


def to_coupled(blocks, a, b, basis, width: int | None = None):
    """blocks [K, na, nb] -> (coupled [K, (L_max+1)², width], mask [same] bool). numpy or torch."""
    width = edge_width(basis) if width is None else width
    W, target = pair_transform(basis, a, b, width)
    K = blocks.shape[0]
    comp = blocks.reshape(K, -1) @ _like(W, blocks).T
    G = _grid(basis) * width
    mask = np.zeros(G, bool)
    mask[target] = True
    if isinstance(blocks, np.ndarray):
        out = np.zeros((K, G), blocks.dtype)
        out[:, target] = comp
        return out.reshape(K, _grid(basis), width), np.broadcast_to(mask.reshape(_grid(basis), width),
                                                                    (K, _grid(basis), width)).copy()
    import torch
    out = blocks.new_zeros((K, G))
    out[:, torch.tensor(np.array(target), device=blocks.device)] = comp
    m = torch.as_tensor(mask.reshape(_grid(basis), width), device=blocks.device)
    return out.reshape(K, _grid(basis), width), m.expand(K, -1, -1).clone()


def from_coupled(coupled, a, b, basis):
    """coupled [K, (L_max+1)², width] -> blocks [K, na, nb] (padding ignored). numpy or torch."""
    width = coupled.shape[-1]
    W, target = pair_transform(basis, a, b, width)
    K = coupled.shape[0]
    flat = coupled.reshape(K, -1)
    comp = flat[:, target] if isinstance(flat, np.ndarray) else flat[:, _like(target, flat).long()]
    return (comp @ _like(W, coupled)).reshape(K, basis.n_orbitals(a), basis.n_orbitals(b))


def compact_to_padded(compact, pair_id, pairs, basis, width):
    """Scatter per-row compact values (concatenated, row-major grid order) into the padded tensor.

    `pair_id[k]` indexes `pairs` [(a, b)] for row k; `compact` is 1-D with the rows' values in row
    order. Returns (padded [K, G, width], mask). numpy or torch (like `compact`)."""
    G = _grid(basis)
    masks = [pair_mask(basis, a, b, width) for a, b in pairs]
    masks = np.stack(masks) if masks else np.zeros((0, G, width), bool)
    if isinstance(compact, np.ndarray):
        mask = masks[pair_id]
        out = np.zeros(mask.shape, compact.dtype)
        out[mask] = compact
        return out, mask
    import torch
    mask = torch.from_numpy(np.array(masks)).to(compact.device)[torch.as_tensor(pair_id, device=compact.device).long()]
    out = compact.new_zeros(mask.shape)
    out[mask] = compact
    return out, mask


# ----------------------------------------------------------------------------- H(R) -> blocks
def _shift_keys(shift) -> np.ndarray:
    s = np.asarray(shift, np.int64).reshape(-1, 3) + 1024
    return (s[:, 0] * 2048 + s[:, 1]) * 2048 + s[:, 2]


def _stack(HR: dict, n: int):
    """All images stacked as rows [(n_img + 1)·n, n] (the last n rows: a zero image)."""
    keys = sorted(HR)
    for R in keys:
        if HR[R].shape != (n, n):
            raise InputError(f"H({R}) is {HR[R].shape} but the basis gives {n} orbitals")
    mats = [sp.csr_matrix(HR[R]) for R in keys] + [sp.csr_matrix((n, n))]
    big = sp.vstack(mats, format="csr")
    big.sum_duplicates()
    k = _shift_keys(np.array(keys, np.int64).reshape(-1, 3))
    order = np.argsort(k)
    return big, k[order], order


def _sample(big, rows, cols, chunk=1 << 22):
    out = np.empty(rows.size, np.float64)
    r, c = rows.ravel(), cols.ravel()
    for s in range(0, r.size, chunk):
        out[s:s + chunk] = np.asarray(big[r[s:s + chunk], c[s:s + chunk]]).ravel()
    return out.reshape(rows.shape)


def _species_groups(numbers_a, numbers_b):
    """{(za, zb): indices} without a Python loop over items."""
    key = numbers_a.astype(np.int64) * 1000 + numbers_b
    uk, inv = np.unique(key, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(uk) + 1))
    return {(int(k // 1000), int(k % 1000)): order[bounds[g]:bounds[g + 1]] for g, k in enumerate(uk)}


def _blocks(HR, basis, numbers, rows_atom, cols_atom, shifts, out_dtype=np.float64):
    """{(za, zb): (indices, blocks [K, na, nb])} of M[rows_atom, cols_atom](shift)."""
    numbers = np.asarray(numbers)
    offs = basis.orbital_offsets(numbers)
    n = int(offs[-1])
    big, skeys, order = _stack(HR, n)
    k = _shift_keys(shifts)
    pos = np.searchsorted(skeys, k)
    pos = np.minimum(pos, max(len(skeys) - 1, 0))
    found = (skeys[pos] == k) if len(skeys) else np.zeros(len(k), bool)
    img = np.where(found, order[pos] if len(order) else 0, len(skeys))  # missing image -> zero rows
    out = {}
    for (za, zb), idx in _species_groups(numbers[rows_atom], numbers[cols_atom]).items():
        na, nb = basis.n_orbitals(za), basis.n_orbitals(zb)
        r = (img[idx] * n + offs[rows_atom[idx]])[:, None, None] + np.arange(na)[None, :, None]
        c = offs[cols_atom[idx]][:, None, None] + np.arange(nb)[None, None, :]
        r, c = np.broadcast_arrays(r, c)
        out[(za, zb)] = (idx, _sample(big, r, c).astype(out_dtype))
    return out


def node_blocks(HR, graph, basis):
    """{(z, z): (node indices, blocks [K, n, n])} of H[i, i](0)."""
    i = np.arange(graph.num_nodes)
    return _blocks(HR, basis, graph.numbers, i, i, np.zeros((len(i), 3), np.int64))


def edge_blocks(HR, graph, basis, image=None):
    """{(z_dst, z_src): (edge indices, blocks [K, n_d, n_s])} of H[d, s](R); `image` forces one
    image for every edge (a Γ matrix in direct mode: image=(0, 0, 0))."""
    shifts = graph.shift if image is None else np.broadcast_to(np.asarray(image, np.int64), graph.shift.shape)
    return _blocks(HR, basis, graph.numbers, graph.dst, graph.src, shifts)


def gamma_mode(graph) -> str:
    """'direct' when every atom pair has at most one edge and no atom sees its own image, else
    'folded' (a Γ block is then a sum over several edges)."""
    if np.any(graph.src == graph.dst):
        return "folded"
    key = graph.dst.astype(np.int64) * graph.num_nodes + graph.src
    return "direct" if len(np.unique(key)) == len(key) else "folded"


def fold_index(graph):
    """Atom pairs of a folded Γ target: (pair_dst, pair_src, edge_pair [E], node_pair [N]).
    Pairs are the nodes (i, i) first, then the distinct (d, s), d != s, of the edges sorted by (d, s)."""
    N = graph.num_nodes
    key = graph.dst.astype(np.int64) * N + graph.src
    self_key = np.arange(N, dtype=np.int64) * (N + 1)
    other = np.unique(key[graph.dst != graph.src])
    keys = np.concatenate([self_key, other])
    pair_dst, pair_src = keys // N, keys % N
    lookup = np.argsort(keys)
    edge_pair = lookup[np.searchsorted(keys[lookup], key)]
    return pair_dst, pair_src, edge_pair, np.arange(N, dtype=np.int64)


def extract(HR, graph, basis, gamma_only: bool = False, mode: str | None = None):
    """Targets of one structure as compact coupled values (see `compact_to_padded`).

    Returns a dict: mode ('real_space' | 'direct' | 'folded'), node (compact values, pair ids),
    and either edge (compact, pair ids) or, for 'folded', pair (dst, src, compact, pair ids) with
    edge_pair / node_pair fold indices. `pairs` lists the species pairs (element symbols)."""
    if gamma_only:
        mode = mode or gamma_mode(graph)
    else:
        mode = "real_space"
    wn, we = node_width(basis), edge_width(basis)
    species = [(a, b) for a in basis.elements for b in basis.elements]
    sid = {(basis._symbol(a), basis._symbol(b)): k for k, (a, b) in enumerate(species)}
    from ase.data import chemical_symbols as cs

    def compact(groups, n_rows, width):
        pair = np.zeros(n_rows, np.int64)
        sizes = np.zeros(n_rows, np.int64)
        for (za, zb), (idx, _) in groups.items():
            pair[idx] = sid[(cs[za], cs[zb])]
            sizes[idx] = basis.n_orbitals(za) * basis.n_orbitals(zb)
        start = np.concatenate([[0], np.cumsum(sizes)])
        vals = np.zeros(int(start[-1]))
        for (za, zb), (idx, blocks) in groups.items():
            W, _ = pair_transform(basis, cs[za], cs[zb], width)
            comp = blocks.reshape(len(idx), -1) @ W.T
            vals[(start[idx][:, None] + np.arange(comp.shape[1])).ravel()] = comp.ravel()
        return vals, pair

    out = {"mode": mode, "pairs": species, "node_width": wn, "edge_width": we}
    node = node_blocks(HR, graph, basis)
    if mode == "folded":
        pdst, psrc, edge_pair, node_pair = fold_index(graph)
        zero = np.zeros((len(pdst), 3), np.int64)
        groups = _blocks(HR, basis, graph.numbers, pdst, psrc, zero)
        out["pair_dst"], out["pair_src"] = pdst, psrc
        out["pair"] = compact(groups, len(pdst), we)
        out["edge_pair"], out["node_pair"] = edge_pair, node_pair
        return out
    out["node"] = compact(node, graph.num_nodes, wn)
    groups = edge_blocks(HR, graph, basis, image=(0, 0, 0) if mode == "direct" else None)
    out["edge"] = compact(groups, graph.num_edges, we)
    return out


# ----------------------------------------------------------------------------- blocks -> H(R)
def assemble(graph, node_out, edge_out, basis) -> dict:
    """Coupled node [N, G, wn] and edge [E, G, we] outputs -> {shift: csr} in the internal basis
    (numpy or torch inputs; torch is detached to float64 numpy)."""
    node_out, edge_out = _np(node_out), _np(edge_out)
    numbers = np.asarray(graph.numbers)
    offs = basis.orbital_offsets(numbers)
    n = int(offs[-1])
    rows, cols, vals, keys = [], [], [], []

    def add(groups_idx, out, ra, ca, shift_key):
        for (za, zb), idx in groups_idx.items():
            B = from_coupled(out[idx], za, zb, basis)
            na, nb = B.shape[1:]
            r = offs[ra[idx]][:, None, None] + np.arange(na)[None, :, None]
            c = offs[ca[idx]][:, None, None] + np.arange(nb)[None, None, :]
            r, c = np.broadcast_arrays(r, c)
            rows.append(r.ravel())
            cols.append(c.ravel())
            vals.append(B.ravel())
            keys.append(np.repeat(shift_key[idx], na * nb))

    i = np.arange(len(numbers))
    add(_species_groups(numbers, numbers), node_out, i, i, _shift_keys(np.zeros((len(i), 3), np.int64)))
    if graph.num_edges:
        add(_species_groups(numbers[graph.dst], numbers[graph.src]), edge_out, graph.dst, graph.src,
            _shift_keys(graph.shift))
    r, c, v, k = map(np.concatenate, (rows, cols, vals, keys))
    uk, inv = np.unique(k, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(uk) + 1))
    out = {}
    for g, key in enumerate(uk):
        sel = order[bounds[g]:bounds[g + 1]]
        R = (int(key // (2048 * 2048)) - 1024, int(key // 2048 % 2048) - 1024, int(key % 2048) - 1024)
        out[R] = sp.csr_matrix((v[sel], (r[sel], c[sel])), shape=(n, n))
    return out


def fold(node_out, edge_out, edge_fold, node_fold, num_pairs: int):
    """Γ-only targets: per atom pair, Σ over images of the edge outputs plus, for i == i pairs, the
    node output (zero-padded to the edge width). Torch tensors [N|E, G, w] -> [num_pairs, G, we]."""
    import torch

    out = edge_out.new_zeros((num_pairs,) + tuple(edge_out.shape[1:]))
    out.index_add_(0, edge_fold.to(edge_out.device), edge_out)
    pad = torch.nn.functional.pad(node_out, (0, edge_out.shape[-1] - node_out.shape[-1]))
    return out.index_add_(0, node_fold.to(edge_out.device), pad)


def gamma(HR: dict):
    """H(k=Γ) = Σ_R H(R)."""
    out = None
    for M in HR.values():
        out = sp.csr_matrix(M, copy=True) if out is None else out + M
    return out.tocsr()


def _np(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    return x.detach().to("cpu").double().numpy()


# ----------------------------------------------------------------------------- coverage
def _pair_shift_key(a, b, N, shift):
    """One int64 per (a, b, shift) for |shift| < 64 cells (57 bits for N up to ~10⁶ atoms)."""
    shift = np.asarray(shift, np.int64)
    if shift.size and np.abs(shift).max() >= 64:
        raise InputError("cell shifts of 64 cells or more: r_cut is far larger than the cell")
    s = shift + 64
    return (np.asarray(a, np.int64) * N + b) * (1 << 21) + (s[:, 0] << 14) + (s[:, 1] << 7) + s[:, 2]


def coverage(HR, graph, basis, gamma_only: bool = False, warn_below: float = 0.999, name: str = "") -> dict:
    """Fraction of ‖H‖_F (‖captured‖_F / ‖H‖_F) and of H's non-zeros that the graph's nodes and edges capture.

    Real space: entry (i, j) of H(R) is captured by the node (i = j, R = 0) or the edge
    (dst i, src j, shift R). Γ-only: by the node or any edge between j and i (the fold)."""
    numbers = np.asarray(graph.numbers)
    offs = basis.orbital_offsets(numbers)
    atom = np.repeat(np.arange(len(numbers)), np.diff(offs))
    N = graph.num_nodes
    if gamma_only:
        ekey = np.unique(graph.dst.astype(np.int64) * N + graph.src)
    else:
        ekey = np.unique(_pair_shift_key(graph.dst, graph.src, N, graph.shift))
    tot = cap = 0.0
    nnz = cap_nnz = 0
    for R, M in HR.items():
        C = sp.coo_matrix(M)
        keep = C.data != 0
        ai, aj, v = atom[C.row[keep]], atom[C.col[keep]], C.data[keep]
        if gamma_only:
            key = ai.astype(np.int64) * N + aj
            hit = ai == aj
        else:
            key = _pair_shift_key(ai, aj, N, np.broadcast_to(np.asarray(R, np.int64), (len(ai), 3)))
            hit = (ai == aj) & (not any(R))
        if len(ekey):
            p = np.minimum(np.searchsorted(ekey, key), len(ekey) - 1)
            hit |= ekey[p] == key
        tot += float(v @ v)
        cap += float(v[hit] @ v[hit])
        nnz += len(v)
        cap_nnz += int(hit.sum())
    res = {"frobenius": float(np.sqrt(cap / tot)) if tot else 1.0, "nonzeros": cap_nnz / nnz if nnz else 1.0,
           "nnz": nnz, "r_cut": float(graph.r_cut)}
    # the warning follows the norm: CP2K's thresholded files hold many tiny far elements, so the
    # fraction of non-zeros is reported but is no measure of what a model misses
    if res["frobenius"] < warn_below:
        log.warning("%sr_cut %.2f Å captures %.4f%% of ‖H‖_F and %.4f%% of its non-zeros (< %.1f%%): raise r_cut",
                    f"{name}: " if name else "", graph.r_cut, 100 * res["frobenius"], 100 * res["nonzeros"],
                    100 * warn_below)
    return res
