"""EquiformerV2 (fairchem-core 1.x) against egnn's swapped layers, run in its own process.

fairchem 2.x (the suite's fairchem) no longer ships EquiformerV2, so tests/test_fairchem.py runs
this script with a fairchem-core 1.x installed in a separate folder (`make install`:
`pip install --no-deps --target .fairchem1 fairchem-core==1.10.0 torch-geometric`) first on
sys.path; `fairchem.core` then resolves to 1.x here only. Only EquiformerV2's modules are imported:
the packages `fairchem` and `fairchem.core` are set up without running fairchem.core/__init__.py
(whose relaxation and dataset imports need lmdb and friends), and torch_scatter, which
fairchem.core.common.utils imports but EquiformerV2's energy and force path never calls, is a
stub that raises if called.

    python tests/fairchem1_check.py FOLDER CASE...    # prints one JSON object: {case: result}

Each case builds a small EquiformerV2 (2 blocks, energy and force heads), runs it on a rattled
two-element fcc cell and reports the max |difference| relative to the max |value| of fairchem's
outputs (node embeddings, energy, direct forces, -dE/dx) for the swapped model, and for the
restored one after the swapped weights were changed.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import types


def load(folder: str) -> None:
    sys.path.insert(0, folder)
    for name in ("fairchem", "fairchem.core"):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(folder, *name.split("."))]
        sys.modules[name] = mod
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torch_scatter")

        def scatter(*args, **kwargs):
            raise NotImplementedError("torch_scatter stub (tests/fairchem1_check.py)")

        stub.scatter = scatter
        sys.modules["torch_scatter"] = stub


def main(folder: str, cases: list[str]) -> dict:
    load(folder)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import numpy as np
    import torch
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    try:
        from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone
        from fairchem.core.models.equiformer_v2.heads import EqV2ScalarHead, EqV2VectorHead
        from torch_geometric.data import Batch, Data
    except ImportError as exc:
        print(f"fairchem-core 1.x in {folder} cannot be imported: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc

    from egnn import EgnnError
    from egnn.interop.fairchem import EqV2Attention, restore_layers, swap_layers

    class Model(torch.nn.Module):
        def __init__(self, lmax, mmax, act, **kw):
            super().__init__()
            cfg = dict(num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
                       attn_value_channels=8, ffn_hidden_channels=16, lmax_list=[lmax], mmax_list=[mmax],
                       edge_channels=16, num_distance_basis=32, max_radius=5.0, max_neighbors=50, alpha_drop=0.0,
                       drop_path_rate=0.0, use_pbc=True, otf_graph=False, use_gate_act=act == "gate",
                       use_sep_s2_act=act == "separable_s2")
            cfg.update(kw)
            self.backbone = EquiformerV2Backbone(**cfg)
            self.energy, self.force = EqV2ScalarHead(self.backbone), EqV2VectorHead(self.backbone)

        def forward(self, b):
            emb = self.backbone(b)
            return {"embedding": emb["node_embedding"].embedding, **self.energy(b, emb), **self.force(b, emb)}

    def batch(dtype):
        atoms = bulk("Cu", "fcc", 3.6, cubic=True)
        atoms.rattle(0.1, seed=1)
        atoms.numbers[::3] = 30
        i, j, S = neighbor_list("ijS", atoms, 5.0)  # edge j -> i, vector x_j + S·cell - x_i (fairchem's)
        d = Data(pos=torch.tensor(atoms.positions, dtype=dtype), cell=torch.tensor(atoms.cell.array, dtype=dtype)[None],
                 atomic_numbers=torch.tensor(atoms.numbers), natoms=torch.tensor([len(atoms)]),
                 edge_index=torch.tensor(np.stack([j, i])), cell_offsets=torch.tensor(S, dtype=dtype),
                 neighbors=torch.tensor([len(i)]))
        return Batch.from_data_list([d])

    def run(model, b, seed=3, grad=True):
        b = b.clone()
        b.pos.requires_grad_(True)
        torch.manual_seed(seed)  # EquiformerV2 draws a random roll per edge: the same draws for both models
        out = model(b)
        out["dE_dx"] = torch.autograd.grad(out["energy"].sum(), b.pos, create_graph=grad)[0]
        return out

    def rel(a, r):
        return float((a - r).abs().max() / r.abs().max())

    def compare(out, want, keys=("embedding", "energy", "forces", "dE_dx")):
        return {k: rel(out[k].detach(), want[k].detach()) for k in keys}

    def make(lmax, mmax, act, dtype=torch.float64, **kw):
        torch.set_default_dtype(dtype)
        torch.manual_seed(0)
        return Model(lmax, mmax, act, **kw).to(dtype).eval()

    results = {}
    for case in cases:
        name, *args = case.split(":")
        if name == "equal":  # equal:lmax:mmax:act[:option=1]
            lmax, mmax, act, *opts = args
            kw = {k: bool(int(v)) for k, v in (o.split("=") for o in opts)}
            ref = make(int(lmax), int(mmax), act, **kw)
            swapped = swap_layers(copy.deepcopy(ref))
            b = batch(torch.float64)
            res = compare(run(swapped, b), run(ref, b))
            res["swapped"] = sum(isinstance(m, EqV2Attention) for m in swapped.modules())
            with torch.no_grad():  # "training" the swapped layers, then back into fairchem's modules
                for m in swapped.modules():
                    if isinstance(m, EqV2Attention):
                        for p in m.conv.parameters():
                            p.add_(0.01 * torch.randn_like(p))
            trained = run(swapped, b)
            restored = restore_layers(swapped)
            res["restored"] = max(compare(run(restored, b), trained).values())
            res["left"] = sum(isinstance(m, EqV2Attention) for m in restored.modules())
            results[case] = res
        elif name == "train":  # training mode: attention dropout and drop path, gradients of a force loss
            drop = [float(a) for a in args] or [0.1, 0.05]
            ref = make(3, 2, "separable_s2", alpha_drop=drop[0], drop_path_rate=drop[1]).train()
            swapped = swap_layers(copy.deepcopy(ref))
            b = batch(torch.float64)
            grads = []
            for m in (ref, swapped):
                o = run(m, b)
                loss = o["energy"].sum() + 10 * o["forces"].square().sum() + 10 * o["dE_dx"].square().sum()
                ps = dict(m.named_parameters())
                grads.append(dict(zip(ps, torch.autograd.grad(loss, list(ps.values()), allow_unused=True))))
            g_ref, g_eg = grads
            shared = [n for n in g_ref if n in g_eg and g_ref[n] is not None]
            res = {"max_rel_grad": max(rel(g_eg[n], g_ref[n]) for n in shared if g_ref[n].abs().max() > 0),
                   "shared_params": len(shared)}
            fc = "backbone.blocks.0.ga.so2_conv_1.so2_m_conv.0.fc.weight"
            eg = "backbone.blocks.0.ga.conv.lin1.w.0"
            res["so2_m1_weight_grad"] = rel(g_eg[eg].t(), g_ref[fc])
            results[case] = res
        elif name == "triton":  # the Triton kernels (interpreter) inside the swapped model, float32
            ref = make(2, 2, "separable_s2", dtype=torch.float32)
            b = batch(torch.float32)
            twin = run(swap_layers(copy.deepcopy(ref), backend="torch"), b, grad=False)
            tri = run(swap_layers(copy.deepcopy(ref), backend="triton"), b, grad=False)
            results[case] = {"vs_twin": compare(tri, twin), "vs_fairchem": compare(tri, run(ref, b, grad=False))}
        elif name == "memory":  # what autograd keeps per edge in one block's graph attention, beyond its inputs
            res = {}
            ref = make(4, 2, "separable_s2")
            for tag, m in (("fairchem", ref), ("egnn", swap_layers(copy.deepcopy(ref)))):
                got = {}
                ga = m.backbone.blocks[0].ga
                h = ga.register_forward_pre_hook(lambda mod, a, got=got: got.update(args=a))
                run(m, batch(torch.float64), grad=False)
                h.remove()
                x, z, dist, ei = got["args"][:4]
                x = x.clone()
                x.embedding = x.embedding.detach().requires_grad_()
                dist = dist.detach().requires_grad_()
                rot = m.backbone.SO3_rotation[0]
                skip = {t.untyped_storage().data_ptr() for t in [*m.parameters(), x.embedding, dist, rot.wigner,
                                                                   rot.wigner_inv]}
                E, seen = ei.shape[1], {}

                def pack(t, skip=skip, seen=seen, E=E):  # per-edge tensors (leading dimension E or edge_index)
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in skip and t.dim() and (t.shape[0] == E or t.untyped_storage().nbytes() % (8 * E) == 0):
                        seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    ga(x, z, dist, ei)
                res[tag] = sum(seen.values()) / E
            results[case] = res
        elif name == "errors":
            res = {}
            try:
                swap_layers(make(2, 2, "gate", lmax_list=[2, 2], mmax_list=[2, 2]))
            except EgnnError as exc:
                res["resolutions"] = str(exc)
            results[case] = res
        else:
            raise SystemExit(f"unknown case {case!r}")
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
