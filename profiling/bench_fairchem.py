"""egnn's swapped layers vs fairchem's own, one eSCN-MD / UMA message-passing block (Edgewise), in
the same process: time ratios (interleaved rounds, median of the per-round ratios) and what
autograd keeps per edge beyond the block's inputs.

For each (lmax, mmax, channels): a one-layer UMA backbone on an FCC copper supercell; the block's
real inputs (node embeddings, radial features, fairchem's Wigner matrices with their graph to the
edge vectors) are captured once, then per round:
  fairchem          Edgewise as fairchem runs it (general backend, no checkpointing)
  fairchem+ckpt     the same with fairchem's activation checkpointing (one chunk)
  egnn              UMAEdgewise (egnn.interop.fairchem), memory_lean=False
  egnn+recompute    UMAEdgewise, memory_lean=True (the default of swap_layers)
forward only; forward + backward with gradients to the node embeddings, the radial features and
the weights ("f+b", training on energies); and the same plus gradients to the Wigner matrices
("f+b F", forces and stress through the frames). Ratios are egnn / fairchem (< 1: egnn faster).
egnn+recompute's backward reruns the block only up to the activation (UMAEdgewise on the PyTorch
backend), and the second SO(2) linear once more without a graph in the "F" case.

    OMP_NUM_THREADS=1 python profiling/bench_fairchem.py [--lmax 4 6] [--mmax 2] [--channels 64 128]
                                                         [--repeat 3] [--rounds 7] [--threads 1] [--device cpu]
Prints a table, writes profiling/results/bench_fairchem.json. Needs fairchem-core.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
from _common import write_json

from egnn.interop.fairchem import UMAEdgewise
from egnn.nn.fused import saved_activation_bytes


def capture(lmax, mmax, C, repeat, dtype=torch.float32, device="cpu"):
    from ase.build import bulk
    from fairchem.core.datasets.atomic_data import AtomicData
    from fairchem.core.datasets.collaters.simple_collater import data_list_collater
    from fairchem.core.models.uma.escn_md import eSCNMDBackbone

    torch.manual_seed(0)
    bb = eSCNMDBackbone(max_num_elements=100, sphere_channels=C, lmax=lmax, mmax=mmax, otf_graph=True, cutoff=5.0,
                        edge_channels=C, num_distance_basis=64, num_layers=1, hidden_channels=C, direct_forces=False,
                        regress_forces=True, use_dataset_embedding=False, chg_spin_emb_type="rand_emb", act_type="gate",
                        ff_type="spectral", norm_type="rms_norm_sh").to(dtype).to(device)
    atoms = bulk("Cu", "fcc", 3.6, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=1)
    b = data_list_collater([AtomicData.from_ase(atoms, task_name="omat", r_edges=False, max_neigh=300, radius=5.0)],
                           otf_graph=True)
    for k in ("pos", "cell", "cell_offsets"):
        b[k] = b[k].to(dtype)
    b = b.to(device)
    ew = bb.blocks[0].edge_wise
    got = {}
    h = ew.register_forward_pre_hook(lambda m, a, kw: got.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        bb(b)
    h.remove()
    x, x_edge, edge_index, wigner, wigner_inv = got["args"][:5]
    target = got["kwargs"].get("scatter_target")
    target = edge_index[1] if target is None else target
    return ew, (x.detach(), x_edge.detach(), edge_index, wigner.detach(), wigner_inv.detach()), target, len(atoms)


def step(layer, ins, target, n, backward, forces=True):
    x, x_edge, ei, w, wi = [t.detach().requires_grad_(backward) if t.is_floating_point() else t for t in ins]
    w, wi = w.requires_grad_(backward and forces), wi.requires_grad_(backward and forces)
    with torch.set_grad_enabled(backward):
        out = layer(x, x_edge, ei, w, wi, total_atoms_across_gp_ranks=n, scatter_target=target)
        if backward:
            out.square().sum().backward()
    return out


def forward_with_grad(layer, ins, target, n):
    x, x_edge, ei, w, wi = [t.detach().requires_grad_() if t.is_floating_point() else t for t in ins]
    return layer(x, x_edge, ei, w, wi, total_atoms_across_gp_ranks=n, scatter_target=target)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu"):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def peak_bytes(fn, device):
    """Peak allocated CUDA memory during fn above what was allocated before (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lmax", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--mmax", type=int, nargs="+", default=[2])
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeat", type=int, default=3, help="FCC Cu supercell repeat (3: 108 atoms, ~9.5k edges)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (egnn's backend auto: Triton on CUDA)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_fairchem.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    print(f"{'lmax':>4} {'mmax':>4} {'C':>4} {'edges':>6}  {'fwd':>5} {'f+b':>5} {'lean':>5} {'fc ckpt':>7} "
          f"{'f+b F':>6} {'lean F':>6} {'fc ckpt F':>9}   {'fc B/edge':>9} {'fc ckpt B/edge':>14} "
          f"{'egnn lean B/edge':>16}   max|diff|")
    for lmax in a.lmax:
        for mmax in a.mmax:
            for C in a.channels:
                ew, ins, target, n = capture(lmax, mmax, C, a.repeat, device=a.device)
                E = ins[2].shape[1]
                ck = copy.deepcopy(ew)
                ck.activation_checkpoint_chunk_size = E  # fairchem's own checkpointing, one chunk
                eg, lean = UMAEdgewise(ew, memory_lean=False), UMAEdgewise(ew, memory_lean=True)
                paths = {"fc": ew, "fc_ckpt": ck, "egnn": eg, "egnn_lean": lean}
                with torch.no_grad():
                    diff = float((step(eg, ins, target, n, False) - step(ew, ins, target, n, False)).abs().max())
                r = dict(lmax=lmax, mmax=mmax, channels=C, edges=E, atoms=n, threads=a.threads, max_abs_diff=diff,
                         device=str(a.device), gpu=torch.cuda.get_device_name(a.device) if "cuda" in a.device else None)
                for name in paths:  # warm-up
                    step(paths[name], ins, target, n, True)
                for mode, bwd, forces in (("fwd", False, False), ("fwdbwd", True, False), ("fwdbwdF", True, True)):
                    t = {k: [] for k in paths}
                    for _ in range(a.rounds):  # interleaved: the machine's load hits every path alike
                        for k, layer in paths.items():
                            t[k].append(timed(lambda layer=layer: step(layer, ins, target, n, bwd, forces), a.device))
                    for k in paths:
                        r[f"{k}_{mode}_s"] = statistics.median(t[k])
                        if k != "fc":
                            r[f"{k}_{mode}_ratio"] = statistics.median(x / y for x, y in zip(t[k], t["fc"]))
                for k, layer in paths.items():  # what a training forward leaves for its backward, beyond
                    # the block's inputs (node embeddings, radial features, Wigner matrices: the model
                    # holds them anyway, the Wigner matrices once for all blocks)
                    nbytes = saved_activation_bytes(lambda *i, layer=layer: forward_with_grad(layer, i, target, n),
                                                       *ins, exclude=list(layer.parameters()) +
                                                       [t for t in ins if t.is_floating_point()])[0]
                    r[f"{k}_saved_B_per_edge"] = nbytes / E
                    peak = peak_bytes(lambda layer=layer: step(layer, ins, target, n, True, True), a.device)
                    if peak is not None:  # forward + backward with forces: peak above the inputs
                        r[f"{k}_peak_MiB"] = peak / 2**20
                rows.append(r)
                print(f"{lmax:>4} {mmax:>4} {C:>4} {E:>6}  {r['egnn_fwd_ratio']:>5.2f} {r['egnn_fwdbwd_ratio']:>5.2f} "
                      f"{r['egnn_lean_fwdbwd_ratio']:>5.2f} {r['fc_ckpt_fwdbwd_ratio']:>7.2f} "
                      f"{r['egnn_fwdbwdF_ratio']:>6.2f} {r['egnn_lean_fwdbwdF_ratio']:>6.2f} "
                      f"{r['fc_ckpt_fwdbwdF_ratio']:>9.2f}   "
                      f"{r['fc_saved_B_per_edge']:>9.0f} {r['fc_ckpt_saved_B_per_edge']:>14.0f} "
                      f"{r['egnn_lean_saved_B_per_edge']:>16.0f}   {diff:.1e}", flush=True)
    if "cuda" in a.device:
        print("peak MiB (f+b F) fairchem / fc ckpt / egnn / egnn lean: " + "; ".join(
            f"lmax {r['lmax']} C {r['channels']}: " + " / ".join(f"{r[k + '_peak_MiB']:.0f}" for k in
                                                                ("fc", "fc_ckpt", "egnn", "egnn_lean")) for r in rows))
    print("ratios: time / fairchem's own Edgewise (fwd: forward only; f+b: forward + backward; F: with gradients "
          "to the Wigner matrices), median of "
          f"{a.rounds} interleaved rounds, {a.threads} thread(s), {a.device}")
    write_json(rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
