#!/usr/bin/env bash
# The fused kernels on a GPU machine.  Each step has its own time limit, so a slow step costs its
# own result, not the run's; all of them together may take longer than ten minutes, so
# pick STEPS (or use gpu_both.sh, which bounds them to its run):
#   1. build for the local GPU (benchmarks/gpu_build.sh: its architecture by number, with the
#      CUTLASS paths when .data/cutlass-include.tar.xz is there, which benchmarks/cutlass_headers.py
#      makes: the machine has no internet to fetch nvidia-cutlass)
#   2. the layer benchmark (every kernel of ours against cuDNN's best way, fp16 and fp32,
#      batch 1, 8, 256 and 1024: the whole-model benchmark runs 1024) -> msconv.json, and from it the measured dispatch table
#      -> kernel_dispatch.json (copy it to fer_edge/ to ship it), installed for what follows
#   3. the whole merged model at batch 1 and 1024, following that table -> model.json
#   4. the CUDA tests: kernels, dispatch choices against the reference, merged models
#   5. compute-sanitizer memcheck and racecheck on the small-batch, CUTLASS and stem kernels' tests
#   6. the mma kernel's tile sweep (benchmarks/sweep_mma.py) -> mma_sweep.json, and an Nsight
#      Compute profile of it at batch 1 (L2 and L4, fp16)
# Everything printed goes to check.log; what it writes to $OUT: check.log, msconv.json, model.json,
# kernel_dispatch.json, mma_sweep.json, mma-L2.ncu-rep, mma-L4.ncu-rep.  STEPS="bench model" runs a subset.
#   STEPS="build bench model" bash benchmarks/gpu_check.sh   (the timings: about 8 minutes)
#   STEPS=model COMPILE=1 bash benchmarks/gpu_check.sh   (adds torch.compile max-autotune: minutes)
# BENCH_LIMIT / MODEL_LIMIT (300 / 120 s) bound the two benchmarks; the layer benchmark keeps the
# rows it measured before its limit (fp16 at batch 1 first).  TEST_LIMIT, MEMCHECK_LIMIT and
# RACECHECK_LIMIT (200 / 90 / 120 s; 0 skips racecheck) bound the checks, SWEEP_LIMIT (60 s) the
# sweep (it keeps the tiles it measured) and PROFILE_LIMIT (30 s) each profile.
# `python3 -P`: never the source folder (it has no compiled _C), always the installed package.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
STEPS=${STEPS:-"build bench model test sanitize sweep profile"}
export PYTHONUNBUFFERED=1
LOG="$OUT/check.log"
PY="python3 -P"
PYTEST="$PY -m pytest -q -p no:cacheprovider --import-mode=importlib"
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "== $1 ($(date +%T))"; }
sanitize() {  # sanitize TOOL LIMIT SELECTION...: compute-sanitizer on test selections, the time left shared out
  local tool=$1 limit=$2 start left
  shift 2
  start=$(date +%s)
  while [ $# -gt 0 ]; do
    left=$(( (limit - ($(date +%s) - start)) / $# ))
    step "compute-sanitizer $tool: $1"
    timeout $(( left > 10 ? left : 10 )) compute-sanitizer --tool "$tool" $PYTEST -x tests/test_kernels_cuda.py -k "$1" \
      2>&1 | tail -6
    shift
  done
}
{
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv
  if want build; then
    step build
    source benchmarks/gpu_build.sh
    gpu_build install -v .
  fi
  fer-edge info
  PKG=$($PY -c "import fer_edge, os; print(os.path.dirname(fer_edge.__file__))")
  if want bench; then
    step "layer benchmark"
    timeout ${BENCH_LIMIT:-300} $PY benchmarks/bench_msconv.py --device cuda --dtypes fp16 fp32 --batches ${BATCHES:-1 8 256 1024} --repeat 50 \
      --json "$OUT/msconv.json" 2>/dev/null
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    cp "$PKG/kernel_dispatch.json" "$OUT/kernel_dispatch.json"
    $PY benchmarks/make_dispatch.py "$OUT/msconv.json" --out "$OUT/kernel_dispatch.json" --device "$GPU" \
      --command "bash benchmarks/gpu_check.sh" && cp "$OUT/kernel_dispatch.json" "$PKG/kernel_dispatch.json"
    fer-edge info | sed -n '/kernel dispatch/,/^default model/p'
  fi
  if want model; then
    step "whole model (fp16, channels_last)"
    skip="merged+compile"; [ -n "${COMPILE:-}" ] && skip=""
    timeout ${MODEL_LIMIT:-120} $PY benchmarks/bench_model.py --device cuda --dtype fp16 --batches 1 1024 --repeat 100 \
      ${skip:+--skip $skip} --json "$OUT/model.json"
  fi
  if want test; then
    step "CUDA tests"
    timeout ${TEST_LIMIT:-200} $PYTEST tests/test_kernels.py tests/test_kernels_cuda.py tests/test_models.py tests/test_dispatch.py \
      tests/test_benchmarks.py \
      -k "cuda or dispatch or splitk or mma or merge or cutlass or stem" 2>&1 | tail -15
  fi
  if want sanitize; then
    # Each tool: a few small cases of each kernel, the newest first.
    sanitize memcheck ${MEMCHECK_LIMIT:-90} \
      "(mma_matches and (n1-c8-5px or n2-c16) and True) or (mma_matches and n1-c256 and True and fp16) or mma_in_a_cuda_graph or mma_chain" \
      "(cutlass_matches and (n1- or n5-) and not window) or (cutlass_matches and n5- and window) or cutlass_split or (stem_matches and n1-cin1) or stem_refuses" \
      "(splitk or fp16_close_to_fp32_reference) and not fuzz and not n64 and not n256"
    # Inside the caching allocator's blocks memcheck sees no bounds between tensors; with the
    # stream-ordered allocator each tensor is a driver allocation of its own, so a kernel writing
    # into another tensor (another kernel's kept buffers) is reported.
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync sanitize memcheck ${POOLCHECK_LIMIT:-40} \
      "(mma_matches and n1-c256 and fp16) or (one_process and L4 and fp16)"
    [ "${RACECHECK_LIMIT:-120}" -gt 0 ] && sanitize racecheck ${RACECHECK_LIMIT:-120} \
      "mma_matches and (n1-c8-5px or n2-c16) and True" \
      "(cutlass_matches and n5- and True) or (stem_matches and n1-cin1-48x48)" \
      "fp16_close_to_fp32_reference and splitk"
  fi
  if want sweep; then
    # The planned tile at batch 1 to 8 (as launched, and as an ordinary launch on 9.0+), then every tile
    # at batch 8 (the tiles at batch 1 were measured before: 16 rows x 128-deep chunks fastest).
    step "the mma kernel's planned tiles (fp16, batch 1 to 8)"
    timeout ${SWEEP_LIMIT:-60} $PY benchmarks/sweep_mma.py --planned-only --batches 1 2 4 8 --repeat 20 \
      --json "$OUT/mma_planned.json" 2>/dev/null
    step "the mma kernel's tiles (fp16, batch 8)"
    timeout ${SWEEP_LIMIT:-60} $PY benchmarks/sweep_mma.py --batches 8 --layers L2 L3 L4 L5 --repeat 20 \
      --json "$OUT/mma_sweep.json" 2>/dev/null
    step "the Hopper CUTLASS kernels' channel tiles (fp16, batch 256 and 1)"
    timeout ${SWEEP90_LIMIT:-30} $PY benchmarks/sweep_cutlass90.py --json "$OUT/cutlass90_sweep.json" 2>/dev/null
  fi
  if want profile; then
    # One launch of the mma kernel per layer (its first, a warm-up), all metrics of the basic set.
    for layer in L2 L4; do
      step "Nsight Compute: the mma kernel, $layer, batch 1, fp16"
      timeout ${PROFILE_LIMIT:-30} ncu --clock-control none --kernel-name regex:mma_kernel -c 1 --set basic -f \
        -o "$OUT/mma-$layer" $PY benchmarks/bench_msconv.py --device cuda --dtypes fp16 --batches 1 --layers $layer \
        --repeat 1 > /dev/null 2>&1
      [ -f "$OUT/mma-$layer.ncu-rep" ] && ncu --import "$OUT/mma-$layer.ncu-rep" --page details 2>/dev/null \
        | grep -E "mma_kernel|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers|Grid Size" | head -12
    done
  fi
  step done
} 2>&1 | tee "$LOG"
