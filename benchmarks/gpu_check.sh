#!/usr/bin/env bash
# The GPU machine (device tool): build for the local GPU, then
#   check: the CUDA tests and compute-sanitizer (memcheck, racecheck) on the kernel tests
#   bench: the layer benchmark, SIMT kernel and the tensor-core (WMMA) kernel
#   model: the whole-model table (train form, merged eager / CUDA graph / max-autotune, kernel eager / graph)
#   all:   check + bench (default; model separately: max-autotune compiles take minutes)
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
#   run(command="bash benchmarks/gpu_check.sh model", timeout_s=600)
# Logs and JSON land in $OUT (or ./gpu-out). `python3 -P`: never import the
# source folder (it has no compiled _C), always the installed package.
set -uo pipefail
STAGE=${1:-all}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-build-isolation --no-deps . -C cmake.define.CMAKE_CUDA_ARCHITECTURES="native" \
  2>&1 | tail -5 | tee "$OUT/build.log"
fer-edge info --json | tee "$OUT/info.json"
if [ "$STAGE" = all ] || [ "$STAGE" = check ]; then
  PYTHONUNBUFFERED=1 python3 -P -m pytest -q -p no:cacheprovider --import-mode=importlib tests/test_kernels.py \
    tests/test_models.py -k "cuda or merge or kernel" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
  compute-sanitizer --tool memcheck python3 -P -m pytest -q -x --import-mode=importlib tests/test_kernels.py \
    -k "cuda and not fuzz" 2>&1 | tail -8 | tee "$OUT/memcheck.log"
  compute-sanitizer --tool racecheck python3 -P -m pytest -q -x --import-mode=importlib tests/test_kernels.py \
    -k "cuda_fp16 and n1" 2>&1 | tail -8 | tee "$OUT/racecheck.log"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  python3 -P benchmarks/bench_msconv.py --device cuda --json "$OUT/msconv_cuda.json" 2>/dev/null | tee "$OUT/bench.txt"
  # the tensor-core (WMMA) fp16 kernel, opt-in until verified here
  FER_EDGE_CUDA_KERNEL=wmma python3 -P benchmarks/bench_msconv.py --device cuda --dtypes fp16 \
    --json "$OUT/msconv_cuda_wmma.json" 2>/dev/null | tee "$OUT/bench_wmma.txt"
fi
if [ "$STAGE" = model ]; then
  python3 -P benchmarks/bench_model.py --device cuda --json "$OUT/model_cuda.json" 2>&1 | tee "$OUT/model.txt" | tail -20
  FER_EDGE_CUDA_KERNEL=wmma python3 -P benchmarks/bench_model.py --device cuda --skip merged+compile \
    --json "$OUT/model_cuda_wmma.json" 2>&1 | tee "$OUT/model_wmma.txt" | tail -12
fi
