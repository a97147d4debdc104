#!/usr/bin/env bash
# One-shot GPU validation, ready for a lent GPU (~8 min on one H200, compiles included). Steps in
# order of importance, each with a wall-clock cap, so a run cut short loses the least:
#   1. build egnn._C with CUDA (setup.py's default archs) and import it
#   2. pytest -m gpu: every op forward and backward against its PyTorch twin, fp32/bf16/fp16, on
#      cuda:0 (and cuda:1 when present); the fused layer against the reference layer
#   3. bench_kernels: one interaction layer, fused Triton vs the twins (messages/s, peak memory,
#      saved bytes per edge, rotate_to_edge's fraction of HBM bandwidth)
#   4. `egnn demo` on the GPU: training (device auto), evaluation and prediction end to end
#   5. `egnn predict --device cuda` on 3,000 and 12,000 atoms: time per stage, peak device memory
#   6. bench_message (the message transform, Triton vs twins vs an EquiformerV2-style dense-Wigner
#      reference); the compile lane's representative subset (resources on the real toolchain);
#      fairchem's UMA block vs egnn's swapped layers (when fairchem-core is installed)
#   7. one profile of a training step with the NVTX ranges (nsys when on PATH, else torch.profiler)
#   8. $OUT/gpu_check.json: one summary of everything above
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
  MAX_JOBS=16 capped 150 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || {
    # the Triton and PyTorch paths need no extension: install without it so the check goes on
    echo "egnn._C build FAILED (build.log): installing with EGNN_SKIP_EXT=1 for the remaining steps" | tee -a "$OUT/build.log"
    EGNN_SKIP_EXT=1 capped 60 $PY -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/build.log" 2>&1; }
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
    echo "shard '$k': $($PY -m pytest -q -m gpu $(grep -l "mark.gpu" tests/test_*.py) --collect-only -k "$k" 2>/dev/null | grep -c '::')" \
      "tests" | tee -a "$OUT/pytest_gpu.log"
  done
else
  step "pytest -m gpu"
  # the files that hold gpu-marked tests, named: collecting all of tests/ needs every test extra
  # (pyscf), which the GPU image lacks, and one collection error stops the whole session
  GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
  # three shards by dtype in parallel: the run is bound by Triton's (single-threaded) compiles
  for k in "fp32 or not forward_backward_match_twin" "bf16" "fp16"; do
    capped 210 $PY -m pytest -q -m gpu $GPU_TESTS -p no:cacheprovider -k "$k" > "$OUT/pytest_gpu.${k%% *}.log" 2>&1 &
  done
  wait
  for f in "$OUT"/pytest_gpu.*.log; do tail -n 1 "$f"; done | tee "$OUT/pytest_gpu.log"
fi

if [ "$DRY" = 1 ]; then SIZES="1e3"; MSIZES="1e3"; else SIZES="1e5 1e6"; MSIZES="1e5 1e6"; fi
step "bench_kernels ($SIZES)"
(cd profiling && capped 60 $PY bench_kernels.py --sizes $SIZES --channels 16 --reps 3 --out "$OUT/bench_kernels.json") \
  > "$OUT/bench_kernels.log" 2>&1; tail -n 4 "$OUT/bench_kernels.log"
# the whole job on the GPU: `egnn demo` trains on the shipped runs with device auto (so on cuda:0,
# through the Triton layers), evaluates the held-out run and predicts its 2x2x2 tile; its
# epochs per minute compare with a CPU's (README: 347 epochs in 8 min on one core)
if [ "$DRY" = 1 ]; then DEMO_MIN=0.2 DEMO_CAP=100; else DEMO_MIN=1 DEMO_CAP=150; fi
step "demo on the GPU ($DEMO_MIN min of training)"
capped $DEMO_CAP $PY -m egnn demo --out "$OUT/demo" --minutes $DEMO_MIN \
  > "$OUT/demo.log" 2>&1; grep -a -v "it/s\|s/it" "$OUT/demo.log" | tail -n 12

# `egnn predict --device cuda` at device scale: rattled monoclinic HfO2 (bench_predict's structure,
# untrained demo-size model), 3,000 atoms and the 2x2x1 tile of 12,000 atoms, rows format; the JSON
# report has the time per stage and the device's peak memory (peak_cuda_MB)
if [ "$DRY" = 1 ]; then PTILES="1x1x1"; else PTILES="1x1x1 2x2x1"; fi
step "predict on the GPU ($PTILES of 3,000 atoms)"
mkdir -p "$OUT/predict"
# (a dry run predicts the 12-atom cell instead: the same plumbing in seconds)
(cd profiling && $PY -c "import sys, bench_predict as b; from egnn.datagen import prototype
b.make_checkpoint(sys.argv[2])
if sys.argv[3] == '1': prototype('hfo2_m12').write(sys.argv[1], format='extxyz')
else: b.make_structure(sys.argv[1])" "$OUT/predict/structure.xyz" "$OUT/predict/untrained.pt" "$DRY") > "$OUT/predict.log" 2>&1
for t in $PTILES; do
  capped 100 $PY -m egnn predict --checkpoint "$OUT/predict/untrained.pt" "$OUT/predict/structure.xyz" \
    -o "$OUT/predict/rows_$t" --tile $t --device $( [ "$DRY" = 1 ] && echo cpu || echo cuda ) --edge-chunk 200000 \
    --format rows --json > "$OUT/predict_$t.json" 2>> "$OUT/predict.log"
  rm -rf "$OUT/predict/rows_$t"
  $PY -c "import json, sys; r = json.loads(open(sys.argv[1]).read().splitlines()[-1]); s = r['structures'][0]; \
print(sys.argv[2], s['atoms'], 'atoms', s['edges'], 'edges', round(s['total_s'], 1), 's', r.get('peak_cuda_MB'), 'MB on the device')" \
    "$OUT/predict_$t.json" $t 2>&1 | tee -a "$OUT/predict.log"
done

step "bench_message ($MSIZES)"
(cd profiling && capped 60 $PY bench_message.py --sizes $MSIZES --reps 3 --out "$OUT/bench_message.json") \
  > "$OUT/bench_message.log" 2>&1; tail -n 4 "$OUT/bench_message.log"

step "compile lane (representative subset)"
capped 60 $PY profiling/kernel_resources.py --subset --json --no-cache --jobs $( [ "$DRY" = 1 ] && echo 2 || echo 8 ) > "$OUT/lane.jsonl" 2> "$OUT/lane.log"

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
     "profile": load("profile_step.json"),
     "predict": {os.path.basename(p): json.loads(open(p).read().splitlines()[-1])
                 for p in glob.glob(os.path.join(out, "predict_*.json")) if os.path.getsize(p)},
     "demo": load("demo/summary.json")}
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
