#!/usr/bin/env bash
# Train on a GPU machine and pack the results for transfer: one stage per command, run
# from a copy of this working tree.  Each stage trains for $LIMIT seconds at most (540), then
# evaluates on PublicTest (plain and ten-crop) and packs what to keep into $OUT: a few
# files, the weights as float16 parts of at most 16 MiB (ship_weights.py --chunk-mib).
#
# Carry the data in the ignored .data/ folder (and, for `compact`, the logits of earlier stages),
# as fer2013.tar.xz (39 MB: xz shares the faces' identical JPEG headers) or as the 57 MB zip:
#   mkdir -p .data && tar -C ../shared/data/fer2013 -cJf .data/fer2013.tar.xz train publictest
#
# Stages, in the order of the accuracy plan (one run each):
#   full [SEED]  a) full-width MACNN, --recipe long, batch 256, lr 0.1, CUDA graphs
#                   (--compile reduce-overhead), up to $EPOCHS (300) epochs in the time budget
#   vgg16        b) the VGG16-BN baseline trained the same way (and the ensemble's second member;
#                   `full 2` trains a second MACNN seed instead)
#   compact      c) MACNN width 0.25 distilled offline from every .data/*-logits.safetensors
#                   (the ensemble of the stages above), --recipe long without batch mixing
#   paper        d) the MACNN paper's recipe (Adam 1e-4, batch 32, 100 epochs) for MACNN and VGG16
#                   side by side, CUDA graphs, time-boxed to the run: the comparison the paper makes
#   ckplus-ft INIT   10-fold subject-independent CK+ fine-tuning from INIT (a checkpoint in .data/)
#   hsnet        the HSNet paper's network, --recipe hsnet-paper then --recipe best, time-boxed like full
#                   (--no-ktl unless STEM=.data/FILE.safetensors holds Inception-ResNet-v1 face-recognition weights)
#   smoke        two epochs of a compact MACNN: the build, the data and the packing work
#
# What it writes to $OUT (gpu-out): NAME.tar.gz (log, metrics.jsonl, summary.json and the
# PublicTest report eval.json with ten-crop), NAME-logits.safetensors (the best checkpoint's
# face-and-mirror logits on the training faces, for `compact`) and the best weights as float16
# parts NAME.partNN (unpack: python benchmarks/ship_weights.py unpack gpu-out/NAME.part* NAME.safetensors,
# then re-evaluate in float32 before quoting a number).
#
# A dry run of any stage on this CPU (seconds to minutes):
#   DEVICE=cpu TRAIN=SMALL_FOLDER EXTRA="--width 0.125 --val-limit 300" EVAL_LIMIT=300 EPOCHS=1 \
#     bash benchmarks/gpu_train.sh full
set -uo pipefail
START=$(date +%s)
STAGE=${1:-smoke}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-540}; RESERVE=${RESERVE:-90}   # seconds: the run's training limit, and what eval + packing need
SEED=${SEED:-1}; [ "$STAGE" = full ] && SEED=${2:-$SEED}
DEV=${DEVICE:-cuda}
if [ "$DEV" = cuda ]; then COMPILE=${COMPILE-reduce-overhead}; else COMPILE=${COMPILE-}; fi
# Training never runs the fused kernel (train form): a CPU-only build takes seconds, not minutes.
# (-P: the repository's source folder must not hide the installed package.)
if ! python3 -P -c "import fer_edge._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps . -C cmake.define.FER_EDGE_CUDA=OFF \
    -C build-dir=build/cpu-only 2>&1 | tail -3
fi
D=.data
# either archive holds train/ and publictest/ at its top
if [ ! -d "$D/fer2013/train" ]; then
  mkdir -p "$D/fer2013"
  if [ -f "$D/fer2013.tar.xz" ]; then tar -C "$D/fer2013" -xJf "$D/fer2013.tar.xz"
  else python3 -c "import zipfile; zipfile.ZipFile('$D/fer2013.zip').extractall('$D/fer2013')"; fi
fi
TRAIN=${TRAIN:-$D/fer2013/train}; VAL=${VAL:-$D/fer2013/publictest}
EL=${EVAL_LIMIT:+--limit $EVAL_LIMIT}
T="fer-edge train --device $DEV --data $TRAIN --val $VAL --no-progress --force ${EXTRA:-}"
GPU="--batch-size ${BATCH:-256} --lr ${LR:-0.1}${COMPILE:+ --compile $COMPILE}"
budget() { python3 -c "print(max(0.5, ($LIMIT - $RESERVE - ($(date +%s) - $START)) / 60))"; }  # minutes left to train

run() {  # run NAME CMD...: train into runs/NAME, cut at $LIMIT s; everything it writes goes to runs/NAME
  local name=$1; shift
  echo "== $name: $*"; SECONDS=0
  PYTHONUNBUFFERED=1 timeout "$LIMIT" "$@" > "runs/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" | tee -a "runs/$name.log"
  grep -E "epoch|best|error" "runs/$name.log" | tail -6
}
evaluate() {  # evaluate NAME: the best checkpoint on PublicTest, plain and ten-crop -> runs/NAME/eval.json
  local w=runs/$1/best.safetensors
  [ -f "$w" ] || { echo "no $w"; return 0; }
  fer-edge eval --weights "$w" --data "$VAL" --device "$DEV" --tta $EL --json "runs/$1/eval.json" --force \
    >> "runs/$1.log" 2>&1
  grep -E "^(accuracy|mean-class|with ten-crop)" "runs/$1.log" | tail -3
}
logits() {  # logits NAME: the best checkpoint's logits on the training faces -> $OUT/NAME-logits.safetensors
  local w=runs/$1/best.safetensors
  [ -f "$w" ] && fer-edge teacher-logits --weights "$w" --data "$TRAIN" --device "$DEV" --force \
    --out "$OUT/$1-logits.safetensors" >> "runs/$1.log" 2>&1
  tail -1 "runs/$1.log"
}
pack() {  # pack NAME: text results as NAME.tar.gz, best weights as float16 parts NAME.partNN
  local name=$1 files=()
  cp "runs/$name.log" "runs/$name/train.log" 2>/dev/null
  for f in train.log metrics.jsonl summary.json eval.json folds.json config.json; do
    [ -f "runs/$name/$f" ] && files+=("$f")
  done
  tar czf "$OUT/$name.tar.gz" -C "runs/$name" "${files[@]}"
  [ -f "runs/$name/best.safetensors" ] && python3 benchmarks/ship_weights.py pack "runs/$name/best.safetensors" "$OUT/$name"
  return 0
}
full() {  # full NAME MODEL: the long recipe at full width
  run "$1" $T --model "$2" --recipe long $GPU --seed "$SEED" --epochs "${EPOCHS:-300}" \
    --time-budget "$(budget)" --out "runs/$1"
  evaluate "$1"; logits "$1"; pack "$1"
}

mkdir -p runs
case "$STAGE" in
  smoke)
    run smoke $T --model macnn --width 0.25 --epochs "${EPOCHS:-2}" $GPU --out runs/smoke
    evaluate smoke; pack smoke ;;
  full)  full "full-s$SEED" macnn ;;
  hsnet)  # the HSNet paper's network: its recipe (half the time), then ours; KTL only with STEM=face-recognition weights
    K=${STEM:+--stem-weights $STEM}; for r in hsnet-paper best; do [ $r = best ] && tb=$(budget) || tb=$(python3 -c "print($(budget) / 2)")
      run "hsnet-$r" $T --model hsnet ${K:---no-ktl} --recipe $r --seed "$SEED" ${COMPILE:+--compile $COMPILE} --time-budget "$tb" --out "runs/hsnet-$r"; evaluate "hsnet-$r"; pack "hsnet-$r"; done ;;
  vgg16) full "vgg16-s$SEED" vgg16 ;;
  compact)
    kd=(); for f in "$D"/*-logits.safetensors; do [ -f "$f" ] && kd+=(--teacher-logits "$f"); done
    [ ${#kd[@]} -gt 0 ] || { echo "compact: carry the logits of earlier stages in $D/ (NAME-logits.safetensors)"; exit 2; }
    run compact $T --model macnn --width 0.25 --recipe long --mixup 0 --cutmix 0 $GPU --seed "$SEED" \
      "${kd[@]}" --epochs "${EPOCHS:-300}" --time-budget "$(budget)" --out runs/compact
    evaluate compact; pack compact ;;
  paper)  # two runs side by side: each is launch-bound at batch 32, so they share the GPU well
    THREADS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
    PB=$(budget)
    for model in macnn vgg16; do
      OMP_NUM_THREADS=$THREADS run "paper-$model" $T --model "$model" --recipe paper --seed "$SEED" \
        ${COMPILE:+--compile $COMPILE} ${EPOCHS:+--epochs $EPOCHS} --time-budget "$PB" --out "runs/paper-$model" &
    done
    wait
    for model in macnn vgg16; do evaluate "paper-$model"; done
    # Text only: nothing ships from these runs, and two full-width models' parts exceed the file count.
    for model in macnn vgg16; do
      cp "runs/paper-$model.log" "runs/paper-$model/train.log"
      tar czf "$OUT/paper-$model.tar.gz" -C "runs/paper-$model" train.log metrics.jsonl summary.json eval.json 2>/dev/null
    done ;;
  ckplus-ft)
    INIT=${2:?"ckplus-ft INIT: the FER2013 checkpoint to start from, e.g. .data/default.safetensors"}
    [ -d "$D/ckplus48" ] || { echo "ckplus-ft: carry ../shared/data/ckplus48 in $D/"; exit 2; }
    run ckplus-ft fer-edge train --device "$DEV" --init "$INIT" --data "$D/ckplus48" --folds 10 --recipe best \
      --epochs "${EPOCHS:-60}" --batch-size 32 --lr 0.01 --no-progress --force ${EXTRA:-} --out runs/ckplus-ft
    pack ckplus-ft ;;
  *) echo "unknown stage $STAGE (smoke | full [SEED] | vgg16 | compact | paper | ckplus-ft INIT)"; exit 2 ;;
esac
echo "== done after $(( $(date +%s) - START )) s"
ls -la "$OUT"
