"""H(R) <-> node/edge blocks <-> coupled basis, on real CP2K files (Γ and real space, SZV and DZVP)."""
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from egnn import blocks as B
from egnn.basis import OrbitalBasis
from egnn.graph import radius_graph
from egnn.io.cp2k import read_run
from egnn.so3 import wigner_D_from_matrix

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")


@pytest.fixture(scope="module", params=["hfo2_m12_rattled_s0000", "gete_rs8_rattled_s0003"])
def kp(request):
    s = read_run(os.path.join(FIX, request.param))
    return s, radius_graph(s.atoms, 13.0)


def _coupled(HR, g, basis):
    G = (basis.L_max + 1) ** 2
    node = np.zeros((g.num_nodes, G, B.node_width(basis)))
    edge = np.zeros((g.num_edges, G, B.edge_width(basis)))
    for (za, zb), (idx, bl) in B.node_blocks(HR, g, basis).items():
        node[idx] = B.to_coupled(bl, za, zb, basis, node.shape[-1])[0]
    for (za, zb), (idx, bl) in B.edge_blocks(HR, g, basis).items():
        edge[idx] = B.to_coupled(bl, za, zb, basis, edge.shape[-1])[0]
    return node, edge


def test_real_space_roundtrip_exact(kp):
    s, g = kp
    node, edge = _coupled(s.H, g, s.basis)
    HR = B.assemble(g, node, edge, s.basis)
    for R, M in s.H.items():
        assert abs(HR.get(R, 0 * M) - M).max() <= 1e-12
    for R, M in HR.items():
        if R not in s.H:
            assert abs(M).max() == 0.0
    # and Γ of the assembled equals Γ of the original
    assert abs(B.gamma(HR) - s.gamma("H")).max() <= 1e-11


def test_gamma_roundtrip_exact_szv_and_dzvp():
    for run in ("hfo2_m12_szv", "si2_prim_dzvp"):
        s = read_run(os.path.join(FIX, run))
        g = radius_graph(s.atoms, 4.0)
        ex = B.extract(s.H, g, s.basis, gamma_only=True)
        assert ex["mode"] == "folded"
        vals, pair = ex["pair"]
        pad, mask = B.compact_to_padded(vals, pair, ex["pairs"], s.basis, ex["edge_width"])
        assert mask.sum() == len(vals)
        # back: every pair block, then the Γ matrix
        offs = s.basis.orbital_offsets(s.atoms.numbers)
        M = np.zeros((s.n_orbitals,) * 2)
        for k, (d, src) in enumerate(zip(ex["pair_dst"], ex["pair_src"])):
            za, zb = s.atoms.numbers[d], s.atoms.numbers[src]
            blk = B.from_coupled(pad[k:k + 1], za, zb, s.basis)[0]
            M[offs[d]:offs[d + 1], offs[src]:offs[src + 1]] = blk
        assert np.abs(M - s.H[(0, 0, 0)].toarray()).max() <= 1e-12


def test_coupled_blocks_rotate_as_irreps():
    """Equivariance of the coupling: D_a B D_bᵀ couples to D_L c for every (shell pair, L)."""
    basis = OrbitalBasis.explicit({"Hf": "sspd", "Ge": "ssppd"})
    rng = np.random.default_rng(0)
    Bl = rng.normal(size=(3, 10, 13))
    q = rng.normal(size=4)
    from scipy.spatial.transform import Rotation
    R = Rotation.from_quat(q / np.linalg.norm(q)).as_matrix()
    D = [d.numpy() for d in wigner_D_from_matrix(torch.from_numpy(R), 4)]

    def big(el):
        return sp.block_diag([D[l] for l in basis.shells[el]]).toarray()
    Br = big("Hf") @ Bl @ big("Ge").T
    c, mask = B.to_coupled(Bl, "Hf", "Ge", basis)
    cr, _ = B.to_coupled(Br, "Hf", "Ge", basis)
    for L in range(5):
        assert np.abs(cr[:, L * L:(L + 1) ** 2] - D[L] @ c[:, L * L:(L + 1) ** 2]).max() < 1e-12
    assert np.abs(np.where(mask, 0, c)).max() == 0 and mask.sum() == 3 * 130
    # torch path agrees
    ct, mt = B.to_coupled(torch.from_numpy(Bl), "Hf", "Ge", basis)
    assert torch.equal(mt, torch.from_numpy(mask)) and np.abs(ct.numpy() - c).max() < 1e-14
    assert np.abs(B.from_coupled(ct, "Hf", "Ge", basis).numpy() - Bl).max() < 1e-13


def test_gamma_folding_of_kpoint_run(kp):
    """Σ over images of the per-edge blocks (plus nodes) equals the Γ matrix of the same run."""
    s, g = kp
    ex_rs = B.extract(s.H, g, s.basis)
    ex_g = B.extract({(0, 0, 0): s.gamma("H")}, g, s.basis, gamma_only=True)
    assert ex_rs["mode"] == "real_space" and ex_g["mode"] == "folded"
    we = ex_g["edge_width"]
    node, nmask = B.compact_to_padded(torch.from_numpy(ex_rs["node"][0]), ex_rs["node"][1], ex_rs["pairs"],
                                      s.basis, ex_rs["node_width"])
    edge, _ = B.compact_to_padded(torch.from_numpy(ex_rs["edge"][0]), ex_rs["edge"][1], ex_rs["pairs"], s.basis, we)
    target, tmask = B.compact_to_padded(torch.from_numpy(ex_g["pair"][0]), ex_g["pair"][1], ex_g["pairs"], s.basis, we)
    from egnn.dataset import Sample
    smp = Sample(atoms=s.atoms, graph=g, species=None, mode="folded", pair_dst=ex_g["pair_dst"],
                 edge_fold=torch.from_numpy(ex_g["edge_pair"]), node_fold=torch.from_numpy(ex_g["node_pair"]))
    folded = smp.fold(node, edge)
    assert torch.abs(folded - target).max() < 1e-10
    assert torch.abs(target).max() > 1.0


def test_coverage_and_mode(kp, caplog):
    s, g = kp
    cov = B.coverage(s.H, g, s.basis)
    assert cov["frobenius"] == pytest.approx(1.0, abs=1e-12) and cov["nonzeros"] == 1.0
    for r in (4.0, 5.0, 8.0):  # the warning follows the norm, not the count of tiny far elements
        caplog.clear()
        with caplog.at_level("WARNING", logger="egnn"):
            c = B.coverage(s.H, radius_graph(s.atoms, r), s.basis, name="x")
        assert c["nonzeros"] < c["frobenius"] < 1.0
        assert ("raise r_cut" in caplog.text) == (c["frobenius"] < 0.999)
    # a big cell with a small cutoff decomposes directly, a small cell folds
    assert B.gamma_mode(radius_graph(s.atoms, 2.5)) == "direct"
    assert B.gamma_mode(g) == "folded"


def test_block_convention_dst_rows_src_columns(kp):
    s, g = kp
    cand = np.flatnonzero(g.shift.any(axis=1) & (g.src != g.dst))
    k = int(cand[np.argmin(g.distance[cand])])  # the closest periodic-image edge: its block is stored
    d, src, R = g.dst[k], g.src[k], tuple(g.shift[k])
    offs = s.basis.orbital_offsets(s.atoms.numbers)
    groups = B.edge_blocks(s.H, g, s.basis)
    for (za, zb), (idx, bl) in groups.items():
        if k in idx:
            blk = bl[list(idx).index(k)]
    ref = s.H[R].toarray()[offs[d]:offs[d + 1], offs[src]:offs[src + 1]]
    assert np.array_equal(blk, ref)
