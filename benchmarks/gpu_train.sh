#!/usr/bin/env bash
# Issue-4 training runs on the GPU machine, one stage per device call (each
# call is capped at 10 minutes).  Carry the data in the ignored .data/ folder:
#   mkdir -p .data && cp ../shared/data/fer2013.zip .data/ && cp -r ../shared/data/ckplus48 .data/
#   run(command="bash benchmarks/gpu_train.sh smoke", carry=[".data"], timeout_s=600)
# Stages: smoke | macnn-paper | vgg16-paper | macnn-best | vgg16-best | compact | compact-kd TEACHER [EPOCHS]
#         | hsnet | ckplus | ckplus-ft INIT
#   compact:    MACNN width 0.25 with the best recipe (the embedded default model's successor)
#   compact-kd: the same, distilled from TEACHER (e.g. macnn-best's best.safetensors carried in .data/)
#   ckplus-ft:  10-fold CK+ fine-tuned from INIT, a FER2013 checkpoint carried in .data/
#               (e.g. cp gpu-out/macnn-best/best.safetensors .data/fer-init.safetensors)
# Each writes its run folder, summary and log into $OUT (or ./gpu-out).
set -uo pipefail
STAGE=${1:-smoke}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if ! python3 -c "import fer_edge._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps . -C cmake.define.CMAKE_CUDA_ARCHITECTURES="native" \
    2>&1 | tail -3
fi
D=.data
if [ ! -d "$D/fer2013/train" ]; then (cd "$D" && python3 -c "import zipfile; zipfile.ZipFile('fer2013.zip').extractall('.')"); fi
TRAIN="$D/fer2013/train"; VAL="$D/fer2013/publictest"
[ -d "$TRAIN" ] || TRAIN=$(dirname "$(find "$D" -type d -name train | head -1)")/train
[ -d "$VAL" ] || VAL=$(dirname "$TRAIN")/publictest
T="fer-edge train --device cuda --data $TRAIN --val $VAL --no-progress --force"
run() { local name=$1; shift; echo "== $name: $*"; /usr/bin/time -v "$@" 2>&1 | tee "$OUT/$name.log" | \
  grep -E "epoch|best|throughput|Elapsed|error" | tail -8; cp -r "runs/$name" "$OUT/" 2>/dev/null || true; }
case "$STAGE" in
  smoke)  # AMP bf16 + channels_last + torch.compile, 2 epochs, then eval with TTA on the GPU
    run smoke $T --model macnn --epochs 2 --compile --out runs/smoke
    fer-edge eval --weights runs/smoke/best.safetensors --data "$VAL" --device cuda --tta --json "$OUT/smoke_eval.json" | tail -5 ;;
  macnn-paper) run macnn-paper $T --model macnn --recipe paper --out runs/macnn-paper ;;
  vgg16-paper) run vgg16-paper $T --model vgg16 --recipe paper --out runs/vgg16-paper ;;
  macnn-best)  run macnn-best $T --model macnn --recipe best --out runs/macnn-best
               fer-edge eval --weights runs/macnn-best/best.safetensors --data "$VAL" --device cuda --tta \
                 --json "$OUT/macnn-best-eval.json" | head -8 ;;
  vgg16-best)  run vgg16-best $T --model vgg16 --recipe best --out runs/vgg16-best ;;
  compact)     run compact $T --model macnn --width 0.25 --recipe best --out runs/compact
               fer-edge eval --weights runs/compact/best.safetensors --data "$VAL" --device cuda --tta \
                 --json "$OUT/compact-eval.json" | head -8 ;;
  compact-kd)  TEACHER=${2:?"compact-kd TEACHER: e.g. .data/teacher.safetensors"}; EPOCHS=${3:-60}
               run compact-kd $T --model macnn --width 0.25 --recipe best --epochs "$EPOCHS" --teacher "$TEACHER" \
                 --out runs/compact-kd
               fer-edge eval --weights runs/compact-kd/best.safetensors --data "$VAL" --device cuda --tta \
                 --json "$OUT/compact-kd-eval.json" | head -8 ;;
  hsnet)       run hsnet $T --model hsnet --recipe best --epochs 40 --out runs/hsnet ;;
  ckplus)      run ckplus fer-edge train --device cuda --data "$D/ckplus48" --folds 10 --model macnn --recipe best \
                 --epochs 40 --batch-size 64 --no-progress --force --out runs/ckplus ;;
  ckplus-ft)   INIT=${2:?"ckplus-ft INIT: the FER2013 checkpoint to start from, e.g. .data/fer-init.safetensors"}
               run ckplus-ft fer-edge train --device cuda --init "$INIT" --data "$D/ckplus48" --folds 10 \
                 --recipe best --epochs 30 --batch-size 32 --lr 0.01 --no-progress --force --out runs/ckplus-ft ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
