import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import random_rotation, rotate_blocks

from egnn import EgnnError, so3
from egnn.basis import OrbitalBasis
from egnn.graph import radius_graph
from egnn.model import HamiltonianModel, ModelConfig

HFO2 = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")


def hfo2(seed=1, r_cut=5.0):
    atoms = bulk("HfO2", "fluorite", 5.1)
    atoms.rattle(0.1, seed=seed)
    return atoms, radius_graph(atoms, r_cut)


def inputs(graph, basis=HFO2, dtype=torch.float64):
    t = torch.tensor
    return (t(basis.species_index(graph.numbers)), t(graph.src), t(graph.dst), t(graph.vec, dtype=dtype))


def model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = HamiltonianModel(ModelConfig(basis=HFO2, r_cut=5.0, **kw)).to(dtype)
    if m.reference is not None:  # a fitted reference is non-zero: give it random weights
        for b in (m.reference.edge_weight, m.reference.node_weight, m.reference.node_bias):
            b.copy_(torch.randn_like(b))
    return m


HEADS = [{}, {"onsite": "node+edges"}, {"node_head_input": "all"}, {"onsite": "node+edges", "node_head_input": "all"},
         {"reference": "two_centre"}, {"attention": "smooth"}]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("heads", HEADS)
def test_model_is_equivariant(dtype, tol, heads):
    m = model(dtype, **heads)
    _, g = hfo2()
    sp, src, dst, vec = inputs(g, dtype=dtype)
    with torch.no_grad():
        n1, e1 = m(sp, src, dst, vec)
        R = random_rotation(7, dtype)
        n2, e2 = m(sp, src, dst, vec @ R.T)
    D = so3.wigner_D_from_matrix(R, HFO2.L_max)
    for a, b in ((n1, n2), (e1, e2)):
        err = (rotate_blocks(a, D) - b).abs().max() / a.abs().max()
        assert err < tol, err


def test_outputs_have_the_basis_channels():
    m = model()
    _, g = hfo2()
    n, e = m(*inputs(g))
    assert n.shape == (g.num_nodes, 25, max(HFO2.node_channels()))
    assert e.shape == (g.num_edges, 25, max(HFO2.edge_channels()))


def test_translation_invariance_and_permutation_equivariance():
    m = model()
    atoms, g = hfo2()
    with torch.no_grad():
        n1, e1 = m(*inputs(g))
        moved = atoms.copy()
        moved.translate([0.37, -1.2, 2.9])
        moved.wrap()
        n2, _ = m(*inputs(radius_graph(moved, 5.0)))
        assert (n1 - n2).abs().max() < 1e-10
        perm = np.random.default_rng(0).permutation(len(atoms))
        g3 = radius_graph(atoms[perm], 5.0)
        n3, e3 = m(*inputs(g3))
    assert (n3 - n1[perm]).abs().max() < 1e-10
    # edge (s, d, R) of the permuted structure is edge (perm[s], perm[d], R) of the original
    key = {(s, d, tuple(r)): k for k, (s, d, r) in enumerate(zip(g.src, g.dst, g.shift))}
    idx = [key[(perm[s], perm[d], tuple(r))] for s, d, r in zip(g3.src, g3.dst, g3.shift)]
    assert (e3 - e1[idx]).abs().max() < 1e-10


def test_deterministic_with_seed_and_finite_gradients():
    _, g = hfo2()
    outs = []
    for _ in range(2):
        m = model(seed=11)
        n, e = m(*inputs(g))
        outs.append((n.detach(), e.detach()))
        (n.square().mean() + e.square().mean()).backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
        assert sum(p.grad.abs().sum() > 0 for p in m.parameters() if p.grad is not None) > 0.9 * len(list(m.parameters()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_tiny_overfit_loss_falls_100x():
    basis = OrbitalBasis.explicit({"Si": "sp", "C": "sp"})
    atoms = bulk("SiC", "zincblende", 4.36)
    atoms.rattle(0.05, seed=0)
    g = radius_graph(atoms, 4.0)
    sp, src, dst, vec = inputs(g, basis, torch.float32)
    cfg = ModelConfig(basis=basis, r_cut=4.0, lmax=2, mmax=2, channels=8, layers=1, heads=2, hidden=16, num_rbf=16)
    torch.manual_seed(0)
    with torch.no_grad():
        tn, te = HamiltonianModel(cfg)(sp, src, dst, vec)  # a teacher gives equivariant targets
    m = HamiltonianModel(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        n, e = m(sp, src, dst, vec)
        loss = (n - tn).square().mean() + (e - te).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100


def test_bad_config_and_input():
    with pytest.raises(EgnnError, match="lmax=2 is smaller"):
        ModelConfig(basis=HFO2, lmax=2, mmax=2)
    with pytest.raises(EgnnError, match="mmax"):
        ModelConfig(basis=HFO2, lmax=4, mmax=5)
    with pytest.raises(EgnnError, match="unknown key"):
        ModelConfig.from_dict({"basis": HFO2.to_dict(), "lmaxx": 3})
    m = model()
    _, g = hfo2()
    sp, src, dst, vec = inputs(g)
    vec = vec.clone()
    vec[3] = 0.0
    with pytest.raises(EgnnError, match="zero length"):
        m(sp, src, dst, vec)
    vec[3] = float("nan")
    with pytest.raises(EgnnError, match="NaN"):
        m(sp, src, dst, vec)
    with pytest.raises(EgnnError, match="NaN"):
        atoms, _ = hfo2()
        atoms.positions[0, 0] = float("nan")
        radius_graph(atoms, 5.0)


@pytest.mark.parametrize("heads", HEADS)
def test_chunked_inference_equals_full_forward(heads):
    m = model(**heads)
    _, g = hfo2(r_cut=5.0)
    with torch.no_grad():
        n1, e1 = m(*inputs(g))
        n2, e2 = m(*inputs(g), edge_chunk=37)
    assert (n1 - n2).abs().max() < 1e-12 and (e1 - e2).abs().max() < 1e-12


@pytest.mark.parametrize("attention", ["softmax", "smooth"])
def test_fused_model_equals_reference_forward_and_gradients(attention):
    _, g = hfo2()
    ref = model(seed=5, attention=attention)
    torch.manual_seed(5)
    fused = HamiltonianModel(ModelConfig(basis=HFO2, r_cut=5.0, fused=True, attention=attention)).double()
    fused.load_state_dict(ref.state_dict())
    outs = []
    for m in (ref, fused):
        n, e = m(*inputs(g))
        (n.square().sum() + e.square().sum()).backward()
        outs.append((n.detach(), e.detach(), [p.grad.clone() for p in m.parameters()]))
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-10 and (outs[0][1] - outs[1][1]).abs().max() < 1e-10
    for a, b in zip(outs[0][2], outs[1][2]):
        assert (a - b).abs().max() <= 1e-9 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("fused", [False, True])
def test_smooth_attention_is_continuous_when_an_edge_leaves_r_cut(fused):
    """An edge just inside r_cut (envelope ~1e-7) and the same graph without it: "smooth" attention
    gives the same node blocks (what a user moving atoms across r_cut needs), "softmax" jumps, since
    the edge still held its share of the normaliser."""
    atoms = bulk("HfO2", "fluorite", 5.1, cubic=True)
    atoms.rattle(0.1, seed=4)
    g = radius_graph(atoms, 5.0)
    sp, src, dst, vec = inputs(g)
    k = int(vec.norm(dim=-1).argmax())
    vec = vec.clone()
    vec[k] *= (5.0 - 1e-3) / vec[k].norm()  # envelope 1 - cos(pi d / r_cut) ~ 2e-7
    keep = torch.arange(len(src)) != k
    jumps = {}
    for attention in ("softmax", "smooth"):
        m = model(attention=attention, fused=fused)
        with torch.no_grad():
            n0, _ = m(sp, src, dst, vec)
            n1, _ = m(sp, src[keep], dst[keep], vec[keep])
        jumps[attention] = ((n1 - n0)[dst[k]].abs().max() / n0[dst[k]].abs().max()).item()
    assert jumps["smooth"] < 1e-5 < 1e-3 < jumps["softmax"], jumps
    with pytest.raises(EgnnError, match="attention"):
        ModelConfig(basis=HFO2, attention="sharp")
    from egnn.nn import InteractionLayer
    with pytest.raises(EgnnError, match="attention"):  # the layer alone, as users lift it, refuses it too
        InteractionLayer(4, 4, 16, 32, 2, 32, attention="sharp")


def test_onsite_edge_head_sums_over_incoming_edges():
    """With onsite "node+edges" the node blocks change when a neighbour moves, through the edge sum
    alone (the node head's input is unchanged when only the last layer is ablated away)."""
    m = model(onsite="node+edges", layers=1)
    _, g = hfo2()
    sp, src, dst, vec = inputs(g)
    with torch.no_grad():
        n1, _ = m(sp, src, dst, vec)
        m.onsite_head.lin2.weight.zero_()
        m.onsite_head.lin2.bias.zero_()
        n0, _ = m(sp, src, dst, vec)
    assert (n1 - n0).abs().max() > 1e-3  # the edge sum contributes
    assert model(onsite="node+edges").state_dict().keys() > model().state_dict().keys()
    with pytest.raises(EgnnError, match="onsite"):
        ModelConfig(basis=HFO2, onsite="edges")
    with pytest.raises(EgnnError, match="node_head_input"):
        ModelConfig(basis=HFO2, node_head_input="first")


@pytest.mark.parametrize("fused", [False, True])
def test_grown_model_predicts_what_the_checkpoint_did_and_learns(fused):
    """load_grown: a 3-layer model from a 2-layer one's weights gives the same blocks (the added
    layer is the identity), its zeroed projections get gradients, and it stays equivariant once they
    have moved."""
    _, g = hfo2()
    small = model(layers=2, reference="two_centre")
    torch.manual_seed(3)
    big = HamiltonianModel(ModelConfig(basis=HFO2, r_cut=5.0, layers=3, reference="two_centre", fused=fused)).double()
    big.load_grown(small.state_dict(), 2)
    n0, e0 = small(*inputs(g))
    n1, e1 = big(*inputs(g))
    assert (n0 - n1).abs().max() < 1e-12 and (e0 - e1).abs().max() < 1e-12
    (n1.square().sum() + e1.square().sum()).backward()
    new = big.layers[2]
    for m in (new.node_proj, new.ffn.lin2, new.edge_msg.conv.lin2):
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.parameters() if p.requires_grad)
    with torch.no_grad():  # a step's worth of weights in the added layer: still equivariant
        for p in new.parameters():
            p.add_(1e-2 * torch.randn_like(p))
        sp, src, dst, vec = inputs(g)
        n2, e2 = big(sp, src, dst, vec)
        assert (n2 - n0).abs().max() > 1e-6  # the added layer now does something
        R = random_rotation(11, torch.float64)
        n3, e3 = big(sp, src, dst, vec @ R.T)
    D = so3.wigner_D_from_matrix(R, HFO2.L_max)
    for a, b in ((n2, n3), (e2, e3)):
        assert (rotate_blocks(a, D) - b).abs().max() / a.abs().max() < 1e-10


def test_grow_refuses_what_it_cannot_grow():
    small = model(layers=2)
    with pytest.raises(EgnnError, match="node_head_input 'last'"):
        model(layers=3, node_head_input="all").load_grown(small.state_dict(), 2)
    with pytest.raises(EgnnError, match="more layers than it had"):
        model(layers=2).load_grown(small.state_dict(), 2)
    with pytest.raises(EgnnError, match="do not fit this model"):
        model(layers=3, channels=8, heads=2).load_grown(small.state_dict(), 2)
