#!/usr/bin/env bash
# Nsight Systems profile of a few steady-state distributed steps, one report per rank.
#
#   profiling/nsys_train.sh [NPROC] [-- PYTHON_ARGS...]
#
#   profiling/nsys_train.sh 4                                   # profiling/scaling.py, steps 5..9
#   profiling/nsys_train.sh 4 -- profiling/scaling.py --reps 4 4 2 --warmup 5 --steps 10
#   EGNN_CUDA_PROFILE=20:25 profiling/nsys_train.sh 4 -- -m egnn train CONFIG.yaml
#
# nsys only records between cudaProfilerStart and cudaProfilerStop (--capture-range=cudaProfilerApi);
# egnn calls them through torch.cuda.profiler when EGNN_CUDA_PROFILE="START:STOP" is set (0-based
# steps: scaling.py counts warm-up steps too, DistributedTrainer counts every compute() call).
# Reports: $NSYS_OUT/rank<R>.nsys-rep (default profiling/results/nsys/). Ranges to look for:
# egnn/pack, egnn/sendrecv, egnn/unpack, egnn/node_update, egnn/edge_update, egnn/aggregate.
set -euo pipefail

NPROC=2
if [[ $# -gt 0 && "$1" != "--" ]]; then NPROC=$1; shift; fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi
HERE=$(cd "$(dirname "$0")" && pwd)
if [[ $# -eq 0 ]]; then set -- "$HERE/scaling.py" --warmup 5 --steps 10; fi

command -v nsys >/dev/null || { echo "nsys_train.sh: nsys not found; install Nsight Systems" >&2; exit 2; }
PYTHON=${PYTHON:-python}
OUT=${NSYS_OUT:-$HERE/results/nsys}
export EGNN_CUDA_PROFILE=${EGNN_CUDA_PROFILE:-5:10}
mkdir -p "$OUT"

# torchrun starts one nsys per rank; %q{RANK} is expanded by nsys from the rank's environment
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" --no-python \
    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop \
    --trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none --force-overwrite=true \
    -o "$OUT/rank%q{RANK}" "$PYTHON" "$@"
