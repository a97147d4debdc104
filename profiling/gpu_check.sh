#!/usr/bin/env bash
# One-shot GPU validation of egnn's kernels, ready for the first lent GPU (< 8 min on one H200,
# compiles included, so a 15-minute device session can run it twice):
#   1. build egnn._C with CUDA (setup.py's default archs) and import it
#   2. pytest -m gpu: every op forward and backward against its PyTorch twin, fp32/bf16/fp16, on
#      cuda:0 (and cuda:1 when present); the fused layer against the reference layer
#   3. the compile lane's representative subset (resources on the real toolchain)
#   4. benchmarks: one interaction layer, fused Triton vs the twins (messages/s, peak memory, saved
#      bytes per edge, rotate_to_edge's fraction of HBM bandwidth); the message transform, Triton
#      vs twins vs an EquiformerV2-style dense-Wigner reference; fairchem's UMA block vs egnn's
#      swapped layers (bench_fairchem.py, fp32, when fairchem-core is installed; a no-op otherwise)
#   5. one profile of a training step with the NVTX ranges (nsys when on PATH, else torch.profiler)
#   6. $OUT/gpu_check.json: one summary of everything above
#
#   bash profiling/gpu_check.sh                 # on the GPU machine (OUT defaults to out/gpu_check)
#   GPU_CHECK_DRY=1 bash profiling/gpu_check.sh # on a CPU: the same plumbing with tiny sizes, no pytest -m gpu
#
# The lent H200 has torch and Triton but no network: carry the missing wheels (ase, vesin, pymetis,
# nvtx) in .whl/ (profiling/gpu_wheels.sh downloads them here) and name .whl in `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # benchmarks run from profiling/
DRY=${GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRITON_INTERPRET=0
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; echo "{\"step\": \"$1\", \"t_s\": $(( $(date +%s) - T0 ))}" >> "$OUT/steps.jsonl"; }
# every step has a wall-clock cap (seconds) so the whole check stays under 8 minutes on one H200;
# a step that hits its cap is recorded (exit 124 in steps.jsonl) and the check goes on
capped() { local cap=$1; shift; timeout --kill-after=10 "$cap" "$@"; local rc=$?; echo "{\"rc\": $rc, \"cap_s\": $cap}" >> "$OUT/steps.jsonl"; return $rc; }
: > "$OUT/steps.jsonl"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/egnn-site .whl/*.whl \
    && export PYTHONPATH=/tmp/egnn-site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build"
if [ "$DRY" = 1 ]; then
  $PY -c "import egnn" > "$OUT/build.log" 2>&1
else
  MAX_JOBS=16 capped 150 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
fi
$PY - > "$OUT/env.json" <<'PY'
import json, torch, triton, egnn
from egnn import _ext
d = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
     "egnn_C": _ext.AVAILABLE, "egnn_C_cuda": bool(_ext.AVAILABLE and torch.cuda.is_available() and hasattr(torch.ops.egnn, "halo_pack"))}
print(json.dumps(d))
PY
cat "$OUT/env.json"

if [ "$DRY" = 1 ]; then
  step "pytest -m gpu shards (collect only)"
  for k in "fp32 or not forward_backward_match_twin" "bf16" "fp16"; do
    echo "shard '$k': $($PY -m pytest -q -m gpu tests --collect-only -k "$k" 2>/dev/null | grep -c '::')" \
      "tests" | tee -a "$OUT/pytest_gpu.log"
  done
else
  step "pytest -m gpu"
  # three shards by dtype in parallel: the run is bound by Triton's (single-threaded) compiles
  for k in "fp32 or not forward_backward_match_twin" "bf16" "fp16"; do
    capped 210 $PY -m pytest -q -m gpu tests -p no:cacheprovider -k "$k" > "$OUT/pytest_gpu.${k%% *}.log" 2>&1 &
  done
  wait
  for f in "$OUT"/pytest_gpu.*.log; do tail -n 1 "$f"; done | tee "$OUT/pytest_gpu.log"
fi

step "compile lane (representative subset)"
capped 60 $PY profiling/kernel_resources.py --subset --json --no-cache --jobs $( [ "$DRY" = 1 ] && echo 2 || echo 8 ) > "$OUT/lane.jsonl" 2> "$OUT/lane.log"

if [ "$DRY" = 1 ]; then SIZES="1e3"; MSIZES="1e3"; else SIZES="1e5 1e6"; MSIZES="1e5 1e6"; fi
step "bench_kernels ($SIZES)"
(cd profiling && capped 60 $PY bench_kernels.py --sizes $SIZES --channels 16 --reps 3 --out "$OUT/bench_kernels.json") \
  > "$OUT/bench_kernels.log" 2>&1; tail -n 4 "$OUT/bench_kernels.log"
step "bench_message ($MSIZES)"
(cd profiling && capped 60 $PY bench_message.py --sizes $MSIZES --reps 3 --out "$OUT/bench_message.json") \
  > "$OUT/bench_message.log" 2>&1; tail -n 4 "$OUT/bench_message.log"

# fairchem's UMA message passing vs egnn's swapped layers (egnn.interop.fairchem), fp32, forward
# and forward + backward (with and without gradients to the Wigner matrices), peak memory. Needs
# fairchem-core (not on the lent GPU unless its wheel and small deps are carried in .whl): a no-op
# that says so otherwise
if $PY -c "import fairchem.core.models.uma.escn_md" > /dev/null 2>&1; then
  if [ "$DRY" = 1 ]; then FC_ARGS="--device cpu --lmax 2 --channels 16 --repeat 2 --rounds 1";
  else FC_ARGS="--device cuda --lmax 4 6 --channels 64 128 --repeat 6 --rounds 5"; fi
  step "bench_fairchem ($FC_ARGS)"
  (cd profiling && capped 120 $PY bench_fairchem.py $FC_ARGS --out "$OUT/bench_fairchem.json") \
    > "$OUT/bench_fairchem.log" 2>&1; tail -n 8 "$OUT/bench_fairchem.log"
else
  step "bench_fairchem skipped"
  echo "fairchem-core is not installed here: bench_fairchem (fairchem vs egnn's swapped layers) skipped; carry the" \
    "fairchem-core wheel and its small dependencies in .whl to run it" | tee "$OUT/bench_fairchem.log"
fi

step "profile of one training step"
if [ "$DRY" != 1 ] && command -v nsys >/dev/null; then
  NSYS_OUT="$OUT" capped 60 bash profiling/nsys_kernels.sh 3 8.0 > "$OUT/nsys.log" 2>&1
  nsys stats --report nvtx_sum --format json --output "$OUT/nvtx" "$OUT/kernels.nsys-rep" >> "$OUT/nsys.log" 2>&1
else
  echo "nsys not on PATH (or dry run): torch.profiler instead" > "$OUT/nsys.log"
  capped 60 $PY profiling/profile_step.py --out "$OUT/profile_step.json" $( [ "$DRY" = 1 ] && echo --repeat 1 ) >> "$OUT/nsys.log" 2>&1
fi

step "summary"
$PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return [json.loads(l) for l in f if l.strip()] if name.endswith(".jsonl") else json.load(f)
s = {"steps": load("steps.jsonl"), "env": load("env.json"), "lane": load("lane.jsonl"), "bench_kernels": load("bench_kernels.json"),
     "bench_message": load("bench_message.json"), "bench_fairchem": load("bench_fairchem.json"),
     "profile": load("profile_step.json")}
log = os.path.join(out, "pytest_gpu.log")
if os.path.isfile(log):
    lines = open(log).read().splitlines()
    s["pytest_gpu"] = [l for l in lines if " passed" in l or " failed" in l or " error" in l]
if s["lane"]:
    s["lane_over_budget"] = [r for r in s["lane"] if r["error"] or r["spill_bytes"] or r["stack_bytes"]
                             or (r["registers"] or 0) > 128]
nvtx = glob.glob(os.path.join(out, "nvtx*.json"))
s["nvtx"] = json.load(open(nvtx[0])) if nvtx else None
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(s, f, indent=1)
print(json.dumps({k: (v if k in ("env", "pytest_gpu", "lane_over_budget") else bool(v)) for k, v in s.items()}))
PY
step "done"
