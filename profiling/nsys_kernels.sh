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
# the step is profile_step.py's (training_step); --nsys: warm-up, then one step under cudaProfilerStart/Stop
exec nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop \
    --force-overwrite=true -o "$OUT/kernels" "$PYTHON" "$HERE/profile_step.py" --nsys --repeat "$REPEAT" --r-cut "$RCUT"
