"""Message transform (rotate -> SO(2) convolution -> rotate back), egnn vs an EquiformerV2-style
reference written here, messages/s in the same run, plus saved-activation bytes per edge and (on
CUDA) the forward's compulsory traffic as a fraction of HBM bandwidth.

lmax 4, E = 16 channels: messages [E, 25, 3·16] -> SO(2) conv 48 -> 32 -> 16 -> [E, 25, 16].
* egnn: EdgeRotation + SO2Convolution (backend "auto": Triton on CUDA, the PyTorch twins on CPU);
  on CUDA also the twins themselves (backend "torch") as a third column.
* reference (EquiformerV2 style): a dense (lmax+1)^2 x (lmax+1)^2 block-diagonal Wigner matrix per
  edge, bmm into the edge frame, per-m index gathers, the same per-m weights, scatter + bmm back.
Both use the same weights; the outputs are checked equal. Goal: >= 3x.

    python profiling/bench_message.py [--sizes 1e4 1e5 1e6]
Prints a table, writes profiling/results/bench_message.json.
"""
import argparse
import os
import sys

import torch
from _common import best_time, write_json

from egnn import so3
from egnn.nn import EdgeRotation, SO2Convolution
from egnn.nn.fused import saved_activation_bytes


class DenseReference(torch.nn.Module):
    """EquiformerV2-style transform sharing `conv`'s weights."""

    def __init__(self, conv: SO2Convolution, lmax: int, mmax: int):
        super().__init__()
        self.conv, self.lmax, self.mmax = conv, lmax, mmax
        perm = so3.l_to_m_major(lmax, mmax)
        self.register_buffer("perm", perm)
        sizes, idx, row = so3.m_major_sizes(lmax, mmax), [], 0
        for m, n in enumerate(sizes):  # per-m gather indices into the l-major rows
            k = n if m == 0 else 2 * n
            idx.append(perm[row:row + k])
            row += k
        self.idx = idx

    def dense_wigner(self, vec):
        blocks = so3.wigner_D(vec, self.lmax)
        D = vec.new_zeros(vec.shape[0], (self.lmax + 1) ** 2, (self.lmax + 1) ** 2)  # [E, K, K], mostly zeros
        for l, b in enumerate(blocks):
            D[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] = b
        return D

    def forward(self, msg, vec, scale):
        D = self.dense_wigner(vec)
        x = torch.bmm(D, msg)
        parts = [x.index_select(1, i.to(x.device)) for i in self.idx]  # per-m gathers
        y, _ = self.conv(torch.cat(parts, 1), scale)
        out = y.new_zeros(y.shape[0], msg.shape[1], y.shape[2])
        out[:, self.perm] = y
        return torch.bmm(D.transpose(1, 2), out)


def egnn_transform(rot, conv, msg, vec, scale, backend="auto"):
    for m in [rot, *conv.modules()]:
        if hasattr(m, "backend"):
            m.backend = backend
    D = rot.wigner(vec)
    y, _ = conv(rot.to_edge(msg, D), scale)
    return rot.from_edge(y, D)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=float, nargs="+", default=None)
    ap.add_argument("--lmax", type=int, default=4)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM peak in TB/s (H200: 4.8) for the bandwidth fraction")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_message.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes or ([1e4, 1e5, 1e6] if device.type == "cuda" else [1e4, 1e5])
    lmax, C = args.lmax, args.channels
    K = (lmax + 1) ** 2
    torch.manual_seed(0)
    conv = SO2Convolution(lmax, lmax, 3 * C, 2 * C, C).to(device)
    rot = EdgeRotation(lmax, lmax).to(device)
    ref = DenseReference(conv, lmax, lmax).to(device)
    params = list(conv.parameters())
    rows = []
    print(f"message transform lmax {lmax}, E {C}, {device}")
    print(f"{'messages':>9} {'egnn fwd/s':>11} {'ref fwd/s':>11} {'x':>5} {'egnn f+b/s':>11} {'ref f+b/s':>11} {'x':>5} "
          f"{'egnn B/edge':>11} {'ref B/edge':>11} {'max|diff|':>9}")
    for E in sizes:
        E = int(E)
        g = torch.Generator().manual_seed(1)
        msg = torch.randn(E, K, 3 * C, generator=g).to(device)
        vec = torch.randn(E, 3, generator=g).to(device)
        scale = torch.rand(E, 1, 3 * C, generator=g).to(device)
        r = dict(messages=E, lmax=lmax, channels=C, device=str(device))
        with torch.no_grad():
            r["max_abs_diff"] = float((egnn_transform(rot, conv, msg, vec, scale) - ref(msg, vec, scale)).abs().max())
            egnn_transform(rot, conv, msg, vec, scale)  # back to "auto" after the check
        paths = [("egnn", lambda m: egnn_transform(rot, conv, m, vec, scale)), ("ref", lambda m: ref(m, vec, scale))]
        if device.type == "cuda":  # the twins on the GPU too: what the kernels replace
            paths.append(("twin", lambda m: egnn_transform(rot, conv, m, vec, scale, "torch")))
        for name, fn in paths:
            with torch.no_grad():
                r[f"{name}_fwd_per_s"] = E / best_time(lambda: fn(msg), args.reps, device)
            m = msg.clone().requires_grad_()
            r[f"{name}_fwdbwd_per_s"] = E / best_time(lambda: fn(m).square().sum().backward(), args.reps, device)
            nbytes = saved_activation_bytes(fn, m, exclude=params)[0]  # its output freed at once
            r[f"{name}_saved_B_per_edge"] = nbytes / E
        if device.type == "cuda":  # compulsory traffic only: messages in, rotated-back messages out, edge vectors
            nbytes = E * (K * 4 * C * msg.element_size() + 3 * vec.element_size())
            for name in ("egnn", "ref"):
                r[f"{name}_fwd_frac_hbm"] = nbytes * r[f"{name}_fwd_per_s"] / E / (args.hbm_tbs * 1e12)
        r["speedup_fwd"] = r["egnn_fwd_per_s"] / r["ref_fwd_per_s"]
        r["speedup_fwdbwd"] = r["egnn_fwdbwd_per_s"] / r["ref_fwdbwd_per_s"]
        if "twin_fwd_per_s" in r:
            r["speedup_fwd_vs_twin"] = r["egnn_fwd_per_s"] / r["twin_fwd_per_s"]
            r["speedup_fwdbwd_vs_twin"] = r["egnn_fwdbwd_per_s"] / r["twin_fwdbwd_per_s"]
        rows.append(r)
        print(f"{E:>9} {r['egnn_fwd_per_s']:>11.3g} {r['ref_fwd_per_s']:>11.3g} {r['speedup_fwd']:>5.2f} "
              f"{r['egnn_fwdbwd_per_s']:>11.3g} {r['ref_fwdbwd_per_s']:>11.3g} {r['speedup_fwdbwd']:>5.2f} "
              f"{r['egnn_saved_B_per_edge']:>11.0f} {r['ref_saved_B_per_edge']:>11.0f} {r['max_abs_diff']:>9.1e}")
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
