#!/usr/bin/env bash
# Both GPU checks in one call of about 9 minutes: a training stage of gpu_train.sh runs in the
# background while the CUDA kernels are built (into their own folder, so the training's install is
# untouched) and their correctness checks run beside it (tests, compute-sanitizer, an Nsight
# Compute profile: none of these is a timing); once the training is done, the layer benchmark
# runs alone on the GPU, since timings need a quiet one, then the whole merged model (ALONE_STEPS).
#
#   mkdir -p .data && cp ../shared/data/fer2013.zip .data/
#   bash benchmarks/gpu_both.sh full            (TRAIN_LIMIT=400 seconds of training stage)
#
# What comes back in $OUT: the training stage's files (see gpu_train.sh) and kernel.tar.gz
# (check.log, msconv.json, kernel_dispatch.json, splitk.ncu-rep, train-console.log).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
K=/tmp/fer-edge-kernel; KPKG=/tmp/fer-edge-cuda; mkdir -p "$K"

LIMIT=${TRAIN_LIMIT:-400} RESERVE=${TRAIN_RESERVE:-60} OUT=$OUT bash benchmarks/gpu_train.sh "${@:-full}" \
  > "$K/train-console.log" 2>&1 &
TRAIN=$!

echo "== kernel build ($(date +%T))"
source benchmarks/cutlass_headers.sh
timeout 300 python3 -m pip wheel -q --no-build-isolation --no-deps . -w /tmp/fer-edge-wheel \
  -C cmake.define.FER_EDGE_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES=native \
  -C build-dir=build/native 2>&1 | tail -5
python3 -m pip install -q --no-deps --target "$KPKG" /tmp/fer-edge-wheel/fer_edge-*.whl 2>&1 | tail -3
export PYTHONPATH=$KPKG   # the kernels' build for everything below; the training keeps its own
echo "   built after $(( $(date +%s) - START )) s"

# Beside the training: correctness, not speed.
OUT=$K STEPS="test sanitize profile" bash benchmarks/gpu_check.sh > /dev/null 2>&1
mv "$K/check.log" "$K/check-beside-training.log"
echo "== kernel checks done after $(( $(date +%s) - START )) s; waiting for the training"
grep -E "passed|failed|error|ERROR SUMMARY|RACECHECK SUMMARY" "$K/check-beside-training.log" | head -8

wait $TRAIN
echo "== training done after $(( $(date +%s) - START )) s"
tail -12 "$K/train-console.log"

# Alone on the GPU: the timings.
OUT=$K STEPS="${ALONE_STEPS:-bench model}" BATCHES=${BATCHES:-"1 256 1024"} bash benchmarks/gpu_check.sh > /dev/null 2>&1
grep -vE "^\s*$" "$K/check.log" | tail -60
tar czf "$OUT/kernel.tar.gz" -C "$K" .
echo "== all done after $(( $(date +%s) - START )) s"
ls -la "$OUT"
