#!/usr/bin/env bash
# Both GPU checks in one run of about 9 minutes: a training stage of gpu_train.sh runs in the
# background while the CUDA kernels are built (into their own folder, so the training's install is
# untouched) and their correctness checks run beside it (the CUDA tests and compute-sanitizer
# memcheck and racecheck: none of these is a timing); once the training is done, the layer benchmark runs alone
# on the GPU, since timings need a quiet one, then the whole merged model (ALONE_STEPS).
#
#   mkdir -p .data && tar -C ../shared/data/fer2013 -cJf .data/fer2013.tar.xz train publictest
#   bash benchmarks/gpu_both.sh full            (TRAIN_LIMIT=400 seconds of training stage)
#   TRAIN_LIMIT=300 bash benchmarks/gpu_both.sh compact   (more of the run left for the timings)
#
# What it writes to $OUT: the training stage's files (see gpu_train.sh) and kernel/ (check.log,
# check-beside-training.log, compile-warm.log, msconv.json, kernel_dispatch.json, model.json, mma_planned.json, mma_sweep.json,
# cutlass90_sweep.json, train-console.log; with PROFILE=1 mma-L2/L4.ncu-rep).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
TMP=${TMPDIR:-/tmp}
K=$OUT/kernel; KPKG=$TMP/fer-edge-cuda; mkdir -p "$K"   # under $OUT: kept even if the run is cut

LIMIT=${TRAIN_LIMIT:-400} RESERVE=${TRAIN_RESERVE:-60} OUT=$OUT bash benchmarks/gpu_train.sh "${@:-full}" \
  > "$K/train-console.log" 2>&1 &
TRAIN=$!

echo "== kernel build ($(date +%T))"
rm -rf "$TMP/fer-edge-wheel" "$KPKG"   # never install over an earlier run's build
source benchmarks/gpu_build.sh
gpu_build wheel -v . -w "$TMP/fer-edge-wheel"
python3 -m pip install -q --no-deps --target "$KPKG" "$TMP"/fer-edge-wheel/fer_edge-*.whl 2>&1 | tail -3
export PYTHONPATH=$KPKG   # the kernels' build for everything below; the training keeps its own
echo "   built after $(( $(date +%s) - START )) s"

# torch.compile(max-autotune) of the merged model, the end-to-end baseline, takes minutes to
# compile: compile it now, beside the training (mostly CPU work, at a lower priority than the
# checks; its autotuning then times candidates on a shared GPU), so that the whole-model
# benchmark alone below finds it in inductor's caches and times it in the same run as the
# kernels (COMPILE=1 there).
TORCHINDUCTOR_COMPILE_THREADS=8 timeout ${WARM_LIMIT:-330} nice -n 10 python3 -P benchmarks/bench_model.py --device cuda \
  --dtype fp16 --batches 1 1024 --repeat 1 --only merged+compile > "$K/compile-warm.log" 2>&1 &
WARM=$!

# Beside the training: correctness, not speed (bounded so that the timings below keep most of
# what is left of the run).
OUT=$K STEPS="${BESIDE_STEPS:-test sanitize}" TEST_LIMIT=${TEST_LIMIT:-150} MEMCHECK_LIMIT=${MEMCHECK_LIMIT:-80} \
  RACECHECK_LIMIT=${RACECHECK_LIMIT:-50} bash benchmarks/gpu_check.sh > /dev/null 2>&1
mv "$K/check.log" "$K/check-beside-training.log"
echo "== kernel checks done after $(( $(date +%s) - START )) s; waiting for the training"
grep -E "passed|failed|error|ERROR SUMMARY|RACECHECK SUMMARY" "$K/check-beside-training.log" | head -16

wait $TRAIN
echo "== training done after $(( $(date +%s) - START )) s"
# Both batches compiled and timed once, or the timings below leave the compiled model out (a compile
# started there would take their time).
wait $WARM; WARMED=""
[ "$(grep -cE "^n=(1|1024) merged\+compile: [0-9.]+ ms" "$K/compile-warm.log")" = 2 ] && WARMED=1
echo "== max-autotune compile ahead: $([ -n "$WARMED" ] && echo done || echo "not finished: the timings leave it out")"
grep -E "merged\+compile" "$K/compile-warm.log" | head -2
tail -12 "$K/train-console.log"

# Alone on the GPU: the timings, in what is left of the run (CALL_LIMIT seconds, 580).  With 200 s
# or more left, 75 s go to the tile sweeps (the mma kernel's planned tiles and its tiles at batch 8,
# 25 s each, the Hopper CUTLASS kernels' 25 s); of the rest a third to the whole-model benchmark
# (at most 100 s), the rest to the layer benchmark (at most 300 s; it keeps what it measured); none
# under a minute left.  (PROFILE=1: the mma kernel's Nsight Compute profile too, 30 s.)
LEFT=$(( ${CALL_LIMIT:-580} - ($(date +%s) - START) - 15 ))
if [ "$LEFT" -ge 60 ]; then
  EXTRA=0; PROF=""
  if [ "$LEFT" -ge 200 ]; then EXTRA=75; [ -n "${PROFILE:-}" ] && EXTRA=105 && PROF=" profile"; fi
  LEFT=$(( LEFT - EXTRA ))
  MODEL_LIMIT=$(( LEFT / 3 > 100 ? 100 : LEFT / 3 ))
  BENCH_LIMIT=$(( LEFT - MODEL_LIMIT > 300 ? 300 : LEFT - MODEL_LIMIT ))
  STEPS="bench model"; [ "$EXTRA" -gt 0 ] && STEPS="bench model sweep$PROF"
  echo "== timings alone: layer benchmark ${BENCH_LIMIT} s, whole model ${MODEL_LIMIT} s, tile sweeps${PROF:+ and profile} ${EXTRA} s"
  OUT=$K STEPS="${ALONE_STEPS:-$STEPS}" BATCHES=${BATCHES:-"1 256 1024"} BENCH_LIMIT=$BENCH_LIMIT COMPILE=$WARMED \
    MODEL_LIMIT=$MODEL_LIMIT SWEEP_LIMIT=25 SWEEP90_LIMIT=25 PROFILE_LIMIT=15 bash benchmarks/gpu_check.sh > /dev/null 2>&1
  grep -vE "^\s*$" "$K/check.log" | tail -60
else
  echo "== no time left for the timings ($LEFT s)"
fi
echo "== all done after $(( $(date +%s) - START )) s"
ls -la "$OUT"
