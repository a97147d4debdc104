"""The exact kinetic blocks (egnn.nn.kinetic): PySCF's integrals on a real structure, equivariant,
fitted around by the reference, and carried by a checkpoint so that prediction needs no PySCF."""
import os

import numpy as np
import pytest
import torch

import egnn.blocks as B
from egnn.graph import radius_graph
from egnn.io.cp2k import read_run
from egnn.model import HamiltonianModel, ModelConfig
from egnn.nn.kinetic import KineticTable, tabulate
from egnn.so3 import wigner_D_from_matrix

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cp2k")
GETE = os.path.join(FIX, "gete_rs8_rattled_s0003")
R_CUT = 6.0


@pytest.fixture(scope="module")
def gete():
    st = read_run(GETE)
    table = KineticTable(len(st.basis.elements), st.basis.L_max, B.node_width(st.basis), B.edge_width(st.basis),
                         R_CUT).double()
    tabulate(table, st.basis)
    return st, table


def outputs(table, graph, basis, vec=None):
    t = torch.tensor
    species = t(basis.species_index(graph.numbers))
    vec = t(graph.vec if vec is None else vec, dtype=torch.float64)
    return table.node(species), table.edge(species, t(graph.src), t(graph.dst), vec)


def test_the_blocks_are_pyscfs_kinetic_integrals(gete):
    """Every node and edge block of a rattled GeTe cell (DZVP: s, s, p, p, d shells) equals PySCF's
    analytic T(R) to 1e-5 eV, although the table holds only radial functions on a 0.02 Å grid."""
    from egnn.io.pyscf import kinetic

    st, table = gete
    graph = radius_graph(st.atoms, R_CUT)
    node, edge = outputs(table, graph, st.basis)
    TR = kinetic(st.atoms, "gth-dzvp-molopt-sr", R_CUT + 1.0)
    worst, scale = 0.0, 0.0
    for (za, zb), (idx, blocks) in B.edge_blocks(TR, graph, st.basis).items():
        got = B.from_coupled(edge[idx].numpy(), za, zb, st.basis)
        worst, scale = max(worst, np.abs(got - blocks).max()), max(scale, np.abs(blocks).max())
    for (za, zb), (idx, blocks) in B.node_blocks(TR, graph, st.basis).items():
        got = B.from_coupled(node[idx].numpy(), za, zb, st.basis)
        worst, scale = max(worst, np.abs(got - blocks).max()), max(scale, np.abs(blocks).max())
    assert scale > 1.0, scale  # eV: the blocks are not trivially small
    assert worst < 1e-5, worst


def test_the_blocks_rotate_with_the_structure(gete):
    """Edge blocks of rotated edge vectors are the Wigner-D rotated blocks (any table values)."""
    st, t = gete
    g = torch.Generator().manual_seed(0)
    noisy = KineticTable(t.num_species, t.L_max, t.onsite.shape[2], t.table.shape[2] // (t.L_max + 1), R_CUT).double()
    noisy.table.copy_(torch.randn(noisy.table.shape, generator=g, dtype=torch.float64))
    graph = radius_graph(st.atoms, R_CUT)
    R = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0.5], [0.3, 0, -1.1], [-0.5, 1.1, 0]], dtype=torch.float64))
    _, e = outputs(noisy, graph, st.basis)
    _, e_rot = outputs(noisy, graph, st.basis, graph.vec @ R.numpy().T)
    D = torch.block_diag(*wigner_D_from_matrix(R, t.L_max))
    torch.testing.assert_close(e_rot, torch.einsum("ij,ejc->eic", D, e), atol=1e-10, rtol=1e-10)


def test_edges_shorter_than_the_table_are_refused(gete):
    from egnn.errors import InputError

    st, table = gete
    sp = torch.tensor([0, 1])
    with pytest.raises(InputError, match="shorter than the kinetic table"):
        table.edge(sp, torch.tensor([0]), torch.tensor([1]), torch.tensor([[0.0, 0.1, 0.0]], dtype=torch.float64))


def test_a_kinetic_model_carries_its_table_and_predicts_without_pyscf(gete, monkeypatch):
    """`reference: two_centre+kinetic`: the model's output before any fit is T itself; a model
    rebuilt from the state dict gives the same blocks with PySCF unavailable."""
    import egnn.io.pyscf as P
    from egnn.errors import InputError

    st, table = gete
    cfg = ModelConfig(basis=st.basis, r_cut=R_CUT, layers=1, channels=8, hidden=8, num_rbf=8,
                      reference="two_centre+kinetic")
    model = HamiltonianModel(cfg).double()
    tabulate(model.reference.kinetic, st.basis)
    graph = radius_graph(st.atoms, R_CUT)
    _, e_T = outputs(table, graph, st.basis)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the network adds nothing: the output is the reference (zero fit) plus T
        t = torch.tensor
        args = (t(st.basis.species_index(graph.numbers)), t(graph.src), t(graph.dst), t(graph.vec))
        node, edge = model(*args)
    torch.testing.assert_close(edge, e_T, atol=1e-9, rtol=0)

    def no_pyscf():
        raise InputError("PySCF is not installed")

    monkeypatch.setattr(P, "_pyscf", no_pyscf)
    again = HamiltonianModel(cfg).double()
    again.load_state_dict(model.state_dict())
    assert bool(again.reference.kinetic.filled)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
        node2, edge2 = again(*args)
    torch.testing.assert_close(edge2, edge)
    torch.testing.assert_close(node2, node)


def test_the_reference_is_fitted_to_v(gete):
    """With targets T + a two-centre V (random Slater-Koster weights), the fit reproduces the targets:
    it subtracts T before the normal equations (T is not a sum of its exponentials, so a fit that
    left T in would not), and the residual left for the network is 0."""
    from egnn.blocks import pair_mask
    from egnn.nn.reference import fit_reference
    from egnn.train import Sample

    st, table = gete
    basis = st.basis
    cfg = ModelConfig(basis=basis, r_cut=R_CUT, layers=1, channels=8, hidden=8, num_rbf=8,
                      reference="two_centre+kinetic")
    teacher = HamiltonianModel(cfg).double().reference
    teacher.kinetic.load_state_dict(table.state_dict())
    g = torch.Generator().manual_seed(1)
    teacher.edge_weight.copy_(torch.randn(teacher.edge_weight.shape, generator=g, dtype=torch.float64) * 0.1)
    el, Cn, Ce = basis.elements, table.onsite.shape[2], table.table.shape[2] // (table.L_max + 1)
    nm = torch.stack([torch.tensor(pair_mask(basis, a, a, Cn)) for a in el])
    em = torch.stack([torch.tensor(pair_mask(basis, a, b, Ce)) for a in el for b in el])
    samples = []
    for seed in range(3):
        atoms = st.atoms.copy()
        atoms.rattle(0.1, seed=seed)
        gr = radius_graph(atoms, R_CUT)
        t = torch.tensor
        sp, src, dst = t(basis.species_index(gr.numbers)), t(gr.src), t(gr.dst)
        vec = t(gr.vec, dtype=torch.float64)
        with torch.no_grad():
            node, edge = teacher(sp, src, dst, vec)
        n_m, e_m = nm[sp], em[sp[dst] * 2 + sp[src]]
        samples.append(Sample("t", sp, src, dst, vec, node * n_m, n_m, edge * e_m, e_m))
    student = HamiltonianModel(cfg).double().reference
    student.kinetic.load_state_dict(table.state_dict())
    fit_reference(student, samples, ridge=1e-12)
    for s in samples:
        with torch.no_grad():
            _, edge = student(s.species, s.src, s.dst, s.edge_vec)
        scale = s.edge_target.abs().max()
        assert (edge * s.edge_mask - s.edge_target).abs().max() < 1e-6 * scale


def test_training_fills_the_table_and_its_checkpoint_carries_it(tmp_path):
    """`egnn train` with reference two_centre+kinetic tabulates T before fitting the reference; the
    checkpoint holds the filled table (predict and evaluate then need no PySCF)."""
    import yaml

    from egnn.cli import main
    from egnn.train import model_from_checkpoint

    kp = os.path.join(FIX, "hfo2_m12_rattled_s0000")
    cfg = {"data": {"train": [kp], "val": [kp], "r_cut": 5.0, "cache": str(tmp_path / "cache")},
           "model": {"channels": 8, "layers": 1, "hidden": 8, "heads": 1, "num_rbf": 8,
                     "reference": "two_centre+kinetic"},
           "train": {"epochs": 1, "lr": 3e-3, "seed": 3}, "output": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--json"]) == 0
    model = model_from_checkpoint(str(tmp_path / "run" / "best.pt"))
    kinetic = model.reference.kinetic
    fresh = KineticTable(kinetic.num_species, kinetic.L_max, kinetic.onsite.shape[2],
                         kinetic.table.shape[2] // (kinetic.L_max + 1), kinetic.r_cut)
    tabulate(fresh, model.basis)
    assert bool(kinetic.filled) and fresh.table.abs().max() > 1.0
    torch.testing.assert_close(kinetic.table, fresh.table)
    torch.testing.assert_close(kinetic.onsite, fresh.onsite)
