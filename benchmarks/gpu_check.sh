#!/usr/bin/env bash
# The GPU machine (device tool): build for the local GPU, then
#   check: the CUDA tests and compute-sanitizer (memcheck, racecheck) on the kernel tests -> check.log
#   bench: the layer benchmark, SIMT and tensor-core (WMMA) kernels -> bench.log, msconv_cuda*.json
#   model: the whole-model table (train form; merged eager / CUDA graph / max-autotune; kernel
#          eager / graph) -> model.log, model_cuda*.json  (separately: max-autotune compiles take minutes)
#   all:   check + bench (default; if the sanitizers run long, call check and bench separately)
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#   run(command="bash benchmarks/gpu_check.sh model", timeout_s=600)
# At most 8 files come back from $OUT (or ./gpu-out) per call: logs are merged per stage.
# `python3 -P`: never import the source folder (it has no compiled _C), always the installed package.
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  # SKIP_BUILD=1: the caller installed this build already (e.g. before starting training beside it)
  [ -n "${SKIP_BUILD:-}" ] || python3 -m pip install -q --no-build-isolation --no-deps . -C cmake.define.FER_EDGE_CUDA=ON \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="native" 2>&1 | tail -5
  fer-edge info --json
} 2>&1 | tee "$OUT/check.log"
PYTEST="python3 -P -m pytest -q -p no:cacheprovider --import-mode=importlib"
if [ "$STAGE" = all ] || [ "$STAGE" = check ]; then
  {
    echo "== pytest (CUDA)"
    $PYTEST tests/test_kernels.py tests/test_models.py -k "cuda or merge or kernel" 2>&1 | tail -25
    echo "== compute-sanitizer memcheck"
    compute-sanitizer --tool memcheck $PYTEST -x tests/test_kernels.py -k "cuda and not fuzz" 2>&1 | tail -8
    echo "== compute-sanitizer racecheck"
    compute-sanitizer --tool racecheck $PYTEST -x tests/test_kernels.py -k "cuda_fp16 and n1" 2>&1 | tail -8
  } 2>&1 | tee -a "$OUT/check.log"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  {
    python3 -P benchmarks/bench_msconv.py --device cuda --json "$OUT/msconv_cuda.json" 2>/dev/null
    # the tensor-core (WMMA) fp16 kernel, opt-in until verified here
    FER_EDGE_CUDA_KERNEL=wmma python3 -P benchmarks/bench_msconv.py --device cuda --dtypes fp16 \
      --json "$OUT/msconv_cuda_wmma.json" 2>/dev/null
  } 2>&1 | tee "$OUT/bench.log"
fi
if [ "$STAGE" = model ]; then
  {
    python3 -P benchmarks/bench_model.py --device cuda --json "$OUT/model_cuda.json"
    FER_EDGE_CUDA_KERNEL=wmma python3 -P benchmarks/bench_model.py --device cuda --skip merged+compile \
      --json "$OUT/model_cuda_wmma.json"
  } 2>&1 | tee "$OUT/model.log"
fi
