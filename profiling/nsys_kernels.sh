#!/usr/bin/env bash
# Nsight Systems profile of one training step of HamiltonianModel on a GPU, with NVTX ranges per op.
#
#   profiling/nsys_kernels.sh [ATOMS_REPEAT] [R_CUT]      # default 3 (324 atoms of HfO2), 8 Å
#   EGNN_BACKEND=torch profiling/nsys_kernels.sh          # the reference path, for comparison
#
# Ranges: egnn/node_update, egnn/edge_update, egnn/aggregate (the layers) and, per fused op,
# egnn/rotate_to_edge, egnn/so2_linear, egnn/rotate_back, egnn/attention_aggregate with their
# .../backward twins. Only the profiled step is captured (cudaProfilerStart/Stop around it,
# after warm-up steps that compile the Triton kernels). Report: $NSYS_OUT/kernels.nsys-rep
# (default profiling/results/nsys/). Open it in nsys-ui or run `nsys stats` on it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPEAT=${1:-3}
RCUT=${2:-8.0}
command -v nsys >/dev/null || { echo "nsys_kernels.sh: nsys not found; install Nsight Systems" >&2; exit 2; }
PYTHON=${PYTHON:-python}
OUT=${NSYS_OUT:-$HERE/results/nsys}
mkdir -p "$OUT"
exec nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true -o "$OUT/kernels" "$PYTHON" - "$REPEAT" "$RCUT" <<'PY'
import sys
import torch
from ase.build import bulk
from egnn.basis import OrbitalBasis
from egnn.graph import radius_graph
from egnn.model import HamiltonianModel, ModelConfig

repeat, r_cut = int(sys.argv[1]), float(sys.argv[2])
atoms = bulk("HfO2", "fluorite", 5.1).repeat(repeat)
atoms.rattle(0.1, seed=0)
g = radius_graph(atoms, r_cut)
basis = OrbitalBasis.explicit({"Hf": "sspd", "O": "sp"}, "SZV-MOLOPT-SR-GTH")
dev = torch.device("cuda")
t = lambda a, **k: torch.as_tensor(a, device=dev, **k)
species = t(basis.species_index(g.numbers))
src, dst, vec = t(g.src), t(g.dst), t(g.vec, dtype=torch.float32)
model = HamiltonianModel(ModelConfig(basis=basis, r_cut=r_cut)).to(dev)
opt = torch.optim.Adam(model.parameters(), 1e-3)
print(f"{len(atoms)} atoms, {len(g.src)} edges", flush=True)

def step():
    opt.zero_grad(set_to_none=True)
    node, edge = model(species, src, dst, vec)
    (node.square().mean() + edge.square().mean()).backward()
    opt.step()

for _ in range(3):  # warm-up: Triton compilation, allocator
    step()
torch.cuda.synchronize()
torch.cuda.profiler.start()
step()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
