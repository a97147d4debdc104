"""The two-centre reference (egnn.nn.reference): a closed-form fit that recovers a two-centre
Hamiltonian exactly, and the trainer's residual statistics around it."""
import numpy as np
import pytest
import torch
from ase.build import bulk

from egnn.basis import OrbitalBasis
from egnn.graph import radius_graph
from egnn.model import HamiltonianModel, ModelConfig
from egnn.nn.reference import TwoCentreReference, fit_reference
from egnn.train import Sample, fit_output_stats

HFO2 = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
R_CUT = 5.0


def structures(n, sigma=0.15):
    out = []
    for seed in range(n):
        atoms = bulk("HfO2", "fluorite", 5.1, cubic=True)  # 12 atoms: more onsite equations than unknowns
        atoms.rattle(sigma, seed=seed)
        out.append(radius_graph(atoms, R_CUT))
    return out


def reference(seed=None):
    model = HamiltonianModel(ModelConfig(basis=HFO2, r_cut=R_CUT, reference="two_centre"))
    ref = model.reference.double()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for b in (ref.edge_weight, ref.node_weight, ref.node_bias):
            b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
    return model, ref


def sample(graph, teacher, masks):
    t = torch.tensor
    sp, src, dst = t(HFO2.species_index(graph.numbers)), t(graph.src), t(graph.dst)
    vec = t(graph.vec, dtype=torch.float64)
    with torch.no_grad():
        node, edge = teacher(sp, src, dst, vec)
    nm, em = masks[0][sp], masks[1][sp[dst] * 2 + sp[src]]
    return Sample("t", sp, src, dst, vec, node * nm, nm, edge * em, em)


def layout_masks(model):
    """[species, (L+1)², Cn] and [pair, (L+1)², Ce] masks of the basis layout."""
    from egnn.blocks import pair_mask

    el = HFO2.elements
    Cn, Ce = model.node_shift.shape[1], model.edge_scale.shape[1]
    nm = torch.stack([torch.tensor(pair_mask(HFO2, a, a, Cn)) for a in el])
    em = torch.stack([torch.tensor(pair_mask(HFO2, a, b, Ce)) for a in el for b in el])
    return nm, em


def test_fit_recovers_a_two_centre_hamiltonian():
    """Targets made by a reference with random weights are reproduced by the fitted one on new
    structures (the fit is exact least squares, so only rounding and the ridge remain)."""
    model, teacher = reference(seed=3)
    masks = layout_masks(model)
    train = [sample(g, teacher, masks) for g in structures(6)]
    _, student = reference()
    assert fit_reference(student, train, ridge=1e-12)["structures"] == 6
    test = sample(structures(7, sigma=0.25)[-1], teacher, masks)
    with torch.no_grad():
        node, edge = student(test.species, test.src, test.dst, test.edge_vec)
    assert (node * test.node_mask - test.node_target).abs().max() < 1e-5 * test.node_target.abs().max()
    assert (edge * test.edge_mask - test.edge_target).abs().max() < 1e-5 * test.edge_target.abs().max()


def test_fit_skips_folded_samples_and_output_stats_use_the_residual():
    model, teacher = reference(seed=4)
    masks = layout_masks(model)
    train = [sample(g, teacher, masks) for g in structures(3)]
    model = model.double()
    fit_output_stats(model, train)
    # the targets are exactly two-centre: the residual is ~0 (up to the ridge), so the network's
    # scales of every channel that has data drop from O(1) eV to the 1 meV floor
    for scale, mask in ((model.node_scale, masks[0]), (model.edge_scale, masks[1])):
        rows = torch.tensor([l for l in range(HFO2.L_max + 1) for _ in range(2 * l + 1)])
        used = torch.zeros(scale.shape, dtype=torch.float64).index_add_(0, rows, mask.any(0).double()) > 0
        assert used.sum() > 10 and scale[used].max() < 5e-3
    assert model.node_shift.abs().max() < 1e-3  # vs O(1) eV targets
    folded = train[0]
    folded = Sample(**{**folded.__dict__, "fold": torch.zeros(len(folded.src), dtype=torch.long),
                       "fold_node": torch.zeros(len(folded.species), dtype=torch.long)})
    _, fresh = reference()
    assert fit_reference(fresh, [folded]) == {"structures": 0}
    assert fresh.edge_weight.abs().max() == 0


def test_reference_features_are_monotone_in_distance():
    """exp(-α (r − r0)) features: no bump where training had no data (short bonds extrapolate)."""
    ref = TwoCentreReference(2, 4, 6, 10, R_CUT)
    r = torch.linspace(0.8, 3.0, 50, dtype=torch.float64)
    _, phi = ref.features(torch.stack([r, 0 * r, 0 * r], 1))
    assert (phi.diff(dim=0) < 0).all()


@pytest.mark.parametrize("bad", ["two-centre", "slater"])
def test_bad_reference_name(bad):
    from egnn import EgnnError

    with pytest.raises(EgnnError, match="reference"):
        ModelConfig(basis=HFO2, reference=bad)


def test_old_configs_load_without_reference():
    d = ModelConfig(basis=HFO2).to_dict()
    d.pop("reference")
    assert ModelConfig.from_dict(d).reference == "none"
    assert not np.any(["reference" in k for k in HamiltonianModel(ModelConfig.from_dict(d)).state_dict()])


def test_bonds_shorter_than_the_fitted_data_do_not_extrapolate():
    """Below the shortest fitted distance of a species pair the radial features stay at their value
    there: a short bond gets the hopping of the shortest one seen (times its angular part), not a
    sum of exponentials pushed outside the data."""
    model, teacher = reference(seed=5)
    masks = layout_masks(model)
    train = [sample(g, teacher, masks) for g in structures(3, sigma=0.05)]
    _, student = reference()
    fit_reference(student, train)
    assert (student.r_min > 1.5).all()  # every pair of the fluorite cell occurs
    r_min = float(student.r_min[1 * 2 + 0])  # O (dst) <- Hf (src)
    sp = torch.tensor([1, 0])
    vecs = torch.tensor([[0.6 * r_min, 0.0, 0.0], [0.9 * r_min, 0.0, 0.0], [r_min, 0.0, 0.0]], dtype=torch.float64)
    src, dst = torch.tensor([1, 1, 1]), torch.tensor([0, 0, 0])
    _, edge = student(sp, src, dst, vecs)
    assert torch.allclose(edge[0], edge[2]) and torch.allclose(edge[1], edge[2]) and edge[2].abs().max() > 0
    _, edge_beyond = student(sp, src[:1], dst[:1], torch.tensor([[1.1 * r_min, 0.0, 0.0]], dtype=torch.float64))
    assert not torch.allclose(edge_beyond[0], edge[2])
