"""egnn's layers swapped into fairchem's eSCN-MD / UMA backbones (egnn.interop.fairchem): the same
node embeddings, energies, forces and stress as fairchem's own layers (float64), for the gate and
the separable-S2 activation, in training mode too (forces inside the loss: second derivatives);
weights converted back exactly; forces against finite differences; the Triton kernels (interpreter)
inside the swapped model; what autograd keeps per edge.

Runs where fairchem-core is installed (`make install` installs it without its CUDA dependencies;
`pytest -m fairchem` selects these tests)."""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("fairchem.core.models.uma.escn_md",
                    reason="fairchem-core is not installed (pip install 'egnn[fairchem]', or make install)")
from ase.build import bulk  # noqa: E402
from fairchem.core.datasets.atomic_data import AtomicData  # noqa: E402
from fairchem.core.datasets.collaters.simple_collater import data_list_collater  # noqa: E402
from fairchem.core.models.uma.escn_md import MLP_EFS_Head, eSCNMDBackbone  # noqa: E402

from egnn import EgnnError  # noqa: E402
from egnn.interop.fairchem import UMAEdgewise, restore_layers, swap_layers  # noqa: E402
from egnn.nn.fused import saved_activation_bytes  # noqa: E402

pytestmark = [pytest.mark.fairchem, pytest.mark.filterwarnings("ignore")]


class Model(torch.nn.Module):
    """Backbone + fairchem's energy/forces/stress head, as fairchem's own model wraps them."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, MLP_EFS_Head(backbone)

    def forward(self, batch):
        emb = self.backbone(batch)
        return {"embedding": emb["node_embedding"], **{k: v[k] for k, v in self.head(batch, emb).items()
                                                      if k != "embeddings"}}


def uma(lmax=2, mmax=2, act="gate", C=8, layers=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    bb = eSCNMDBackbone(max_num_elements=100, sphere_channels=C, lmax=lmax, mmax=mmax, otf_graph=True, cutoff=5.0,
                        edge_channels=8, num_distance_basis=16, num_layers=layers, hidden_channels=C,
                        direct_forces=False, regress_forces=True, regress_stress=True, use_dataset_embedding=False,
                        chg_spin_emb_type="rand_emb", act_type=act, ff_type="spectral", norm_type="rms_norm_sh")
    return Model(bb).to(dtype)


def batch(dtype=torch.float64, repeat=1, seed=1):
    atoms = bulk("Cu", "fcc", 3.6, cubic=True).repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    atoms.numbers[::3] = 29 + 1  # two elements
    data = AtomicData.from_ase(atoms, task_name="omat", r_edges=False, max_neigh=300, radius=5.0)
    b = data_list_collater([data], otf_graph=True)
    for k in ("pos", "cell", "cell_offsets"):
        b[k] = b[k].to(dtype)
    return b


def run(model, b, seed=3):
    torch.manual_seed(seed)  # fairchem draws a random roll per edge: the same draws for both models
    return model(b.clone())


def rel(a, r):
    return float((a - r).abs().max() / r.abs().max())


@pytest.mark.parametrize("lmax,mmax,act", [(2, 2, "gate"), (3, 1, "gate"), (3, 2, "s2")])
def test_swapped_model_equals_fairchem(lmax, mmax, act):
    ref = uma(lmax, mmax, act)
    swapped = swap_layers(copy.deepcopy(ref))
    assert sum(isinstance(m, UMAEdgewise) for m in swapped.modules()) == 2
    b = batch()
    out, want = run(swapped, b), run(ref.eval(), b)
    for k in ("embedding", "energy", "forces", "stress"):
        assert rel(out[k], want[k]) < 1e-12, (k, rel(out[k], want[k]))


def test_training_with_forces_matches_fairchem():
    """Training mode: fairchem takes forces and stress with create_graph=True, so a force loss needs
    second derivatives through the swapped (recompute) layers."""
    ref = uma(3, 2, "gate").train()
    swapped = swap_layers(copy.deepcopy(ref))
    grads = []
    for m in (ref, swapped):
        o = run(m, batch())
        loss = o["energy"].sum() + 10 * o["forces"].square().sum() + 10 * o["stress"].square().sum()
        grads.append(torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad], allow_unused=True))
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    swapped_names = [n for n, p in swapped.named_parameters() if p.requires_grad]
    by_name = dict(zip(swapped_names, grads[1]))
    for n, g in zip(names, grads[0]):  # parameters outside the swapped layers keep their names
        if g is not None and n in by_name:
            assert rel(by_name[n], g) < 1e-10, n
    conv = swapped.backbone.blocks[0].edge_wise.conv
    fc = ref.backbone.blocks[0].edge_wise.so2_conv_1
    g_fc = dict(zip(names, grads[0]))["backbone.blocks.0.edge_wise.so2_conv_1.fc_m0.weight"]
    g_eg = by_name["backbone.blocks.0.edge_wise.conv.lin1.m0.weight"]
    assert conv.lin1.m0.weight.shape == fc.fc_m0.weight.shape and rel(g_eg, g_fc) < 1e-10


def test_restore_layers_converts_the_weights_back():
    ref = uma(3, 2, "gate")
    swapped = swap_layers(copy.deepcopy(ref))
    with torch.no_grad():  # "training" the swapped layers
        for m in swapped.modules():
            if isinstance(m, UMAEdgewise):
                for p in m.conv.parameters():
                    p.add_(0.01 * torch.randn_like(p))
    b = batch()
    trained = run(swapped, b)
    restored = restore_layers(swapped)
    assert not any(isinstance(m, UMAEdgewise) for m in restored.modules())
    again = run(restored, b)
    for k in ("embedding", "energy", "forces"):
        assert rel(again[k], trained[k]) < 1e-12
    with pytest.raises(EgnnError, match="no layer swapped"):
        restore_layers(restored)
    with pytest.raises(EgnnError, match="no fairchem"):
        swap_layers(torch.nn.Linear(2, 2))


def test_forces_equal_finite_differences():
    """F = −dE/dx through the memory-lean swapped layers equals central differences of the energy."""
    model = swap_layers(uma(2, 1, "gate", layers=1)).eval()
    b = batch(repeat=1)
    force = run(model, b)["forces"]

    def energy(pos):
        bb = b.clone()
        bb["pos"] = pos
        return float(run(model, bb)["energy"].sum())

    h, fd = 1e-5, torch.zeros_like(force)
    for i in range(b["pos"].shape[0]):
        for k in range(3):
            dp = torch.zeros_like(b["pos"])
            dp[i, k] = h
            fd[i, k] = -(energy(b["pos"] + dp) - energy(b["pos"] - dp)) / (2 * h)
    assert rel(force, fd) < 1e-6


def test_triton_kernels_inside_the_swapped_model():
    """backend="triton" (Triton's interpreter here) against the PyTorch twins, float32."""
    ref = uma(2, 2, "gate", dtype=torch.float32)
    b = batch(torch.float32, repeat=1)
    twin = run(swap_layers(copy.deepcopy(ref), backend="torch").eval(), b)
    tri = run(swap_layers(copy.deepcopy(ref), backend="triton").eval(), b)
    for k in ("embedding", "energy", "forces", "stress"):
        assert rel(tri[k], twin[k]) < 1e-4, (k, rel(tri[k], twin[k]))


def test_memory_lean_layers_keep_less_per_edge():
    ref = uma(2, 2, "gate", C=16, layers=1).eval()
    b = batch(repeat=2)
    nbytes = {}
    for name, m in (("fairchem", ref), ("egnn", swap_layers(copy.deepcopy(ref)))):
        ew = m.backbone.blocks[0].edge_wise
        inputs = {}

        def grab(mod, args, kwargs, inputs=inputs):
            inputs["args"], inputs["kwargs"] = args, kwargs

        h = ew.register_forward_pre_hook(grab, with_kwargs=True)
        run(m, b)
        h.remove()
        args = [a.detach().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in inputs["args"]]
        kw = dict(inputs["kwargs"])
        if "scatter_target" not in kw or kw["scatter_target"] is None:
            kw["scatter_target"] = args[2][1]
        E = args[2].shape[1]
        total, _ = saved_activation_bytes(lambda *a: ew(*a, **kw), *args, exclude=list(ew.parameters()) + args[:2] +
                                          args[3:5])
        nbytes[name] = total / E
    assert nbytes["egnn"] * 8 < nbytes["fairchem"], nbytes
