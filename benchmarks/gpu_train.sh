#!/usr/bin/env bash
# Issue-4/8 training runs on the GPU machine, one stage per device call (a call
# is capped at 10 minutes; $LIMIT seconds of it train, the rest builds,
# evaluates and packs).  Carry the data in the ignored .data/ folder:
#   mkdir -p .data && cp ../shared/data/fer2013.zip .data/ && cp -r ../shared/data/ckplus48 .data/
#   run(command="bash benchmarks/gpu_train.sh macnn-best", carry=[".data"], timeout_s=600)
# Stages: smoke | speed | macnn-paper | vgg16-paper | macnn-best | vgg16-best | compact | compact-kd TEACHER [EPOCHS]
#         | hsnet | ckplus | ckplus-ft INIT | ensemble | chain | long | compact-offline [LOGITS] | paper
#   speed:      training img/s of MACNN (issue 7): eager, --compile, --compile reduce-overhead, each
#               $EPOCHS (3) epochs (the first includes compilation) -> speed.log, speed.json
#   compact:    MACNN width 0.25 with the best recipe (the embedded default model's successor)
#   compact-kd: the same, distilled from TEACHER (a checkpoint carried in .data/, e.g. macnn-best's,
#               unpacked here: python benchmarks/ship_weights.py unpack gpu-out/macnn-best.part* .data/teacher.safetensors)
#   ckplus-ft:  10-fold CK+ fine-tuned from INIT, a FER2013 checkpoint carried in .data/
#   ensemble:   issue 8 in one call.  Phase 1: $K (3) full-width MACNN teachers (seeds 1..K) and the
#               VGG16 baseline, --recipe best, side by side, each time-boxed (--time-budget, at most $TEPOCHS
#               epochs); their ensemble is scored (benchmarks/eval_ensemble.py).  Phase 2: the ensemble
#               distilled (--teacher x K) into a full-width MACNN, a width-0.25 MACNN and a VGG16 (same
#               recipe, for the comparison), side by side.  The budgets (TBUDGET, SBUDGET seconds) default
#               to what keeps the call within DEADLINE (540) s: ~45% of what is left to the teachers.  Returns
#               ensemble.tar.gz (every log, metrics, summary and eval JSON) and the weights of the two
#               MACNN students as float16 parts (5 files, ~41 MB).
#   long:       issue 8.1: a full-width MACNN alone for the whole call (run it with LIMIT=540), then its
#               logits on the training faces ($OUT/teacher-logits.safetensors) for compact-offline
#   compact-offline [LOGITS]: the compact MACNN alone, distilled offline from carried logits (default
#               .data/teacher-logits.safetensors: copy long's there), LIMIT=540 too
#   paper:      issue 4.5 in one call: macnn-paper, vgg16-paper and hsnet side by side, time-boxed to
#               DEADLINE like ensemble (PBUDGET s each); returns paper.tar.gz only (no weights)
#   chain:      issue 8 in one call, each run alone on the GPU: a full-width MACNN teacher, then the
#               compact (width 0.25) MACNN distilled from it; --batch-size $BATCH (256) --lr $LR (0.1).
#               Returns chain.tar.gz and both models' weights (compact first; 4 files, ~39 MB).
# $EPOCHS overrides a stage's epochs (e.g. EPOCHS=120 bash benchmarks/gpu_train.sh macnn-best); the ensemble
# and chain stages take TEPOCHS / SEPOCHS (caps), TBUDGET / SBUDGET (seconds), K, DEADLINE instead.
# What comes back ($OUT, at most 8 files): NAME.log, NAME-metrics.jsonl, NAME-summary.json,
# NAME-eval.json (best checkpoint on PublicTest, with ten-crop TTA), and the best weights as
# float16 parts NAME.partNN (ship_weights.py; a full-width MACNN is 76 MB in float32, over the
# 16 MiB-per-file limit).  A run cut at $LIMIT still returns its best epoch so far.
set -uo pipefail
START=$(date +%s)
STAGE=${1:-smoke}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
LIMIT=${LIMIT:-450}
EP=${EPOCHS:+--epochs $EPOCHS}
# Training never runs the fused kernel (train form): a CPU-only build takes seconds, not minutes.
# (-P: the repo root's source folder must not hide the installed package; its own
# build folder, so this OFF never sticks to the CUDA build that gpu_check.sh makes.)
if ! python3 -P -c "import fer_edge._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps . -C cmake.define.FER_EDGE_CUDA=OFF \
    -C build-dir=build/cpu-only 2>&1 | tail -3
fi
D=.data
if [ ! -d "$D/fer2013/train" ]; then (cd "$D" && python3 -c "import zipfile; zipfile.ZipFile('fer2013.zip').extractall('.')"); fi
TRAIN="$D/fer2013/train"; VAL="$D/fer2013/publictest"
[ -d "$TRAIN" ] || TRAIN=$(dirname "$(find "$D" -type d -name train | head -1)")/train
[ -d "$VAL" ] || VAL=$(dirname "$TRAIN")/publictest
DEV=${DEVICE:-cuda}   # DEVICE=cpu EXTRA="--limit 600 --val-limit 300" EVAL_LIMIT=300 EPOCHS=1: a dry run of a stage here
EL=${EVAL_LIMIT:+--limit $EVAL_LIMIT}
T="fer-edge train --device $DEV --data $TRAIN --val $VAL --no-progress --force ${EXTRA:-}"
run() {  # run NAME CMD...: train into runs/NAME (cut at $LIMIT s); log, metrics and summary into $OUT
  local name=$1; shift
  echo "== $name: $*"; SECONDS=0
  PYTHONUNBUFFERED=1 timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after ${SECONDS}s" | tee -a "$OUT/$name.log"
  grep -E "epoch|best|throughput|error|fold" "$OUT/$name.log" | tail -12
  cp "runs/$name/metrics.jsonl" "$OUT/$name-metrics.jsonl" 2>/dev/null
  cp "runs/$name/summary.json" "$OUT/$name-summary.json" 2>/dev/null
  cp "runs/$name/folds.json" "$OUT/$name-folds.json" 2>/dev/null
  return 0
}
evaluate_run() {  # evaluate_run NAME: best.safetensors on $VAL, plain and ten-crop -> $OUT/NAME-eval.json
  local name=$1 w=runs/$1/best.safetensors  # (cut at $EVAL_TIMEOUT s when set)
  [ -f "$w" ] || { echo "no $w"; return 0; }
  # (never pipe fer-edge into head: its report would end in a broken pipe before the JSON is written)
  ${EVAL_TIMEOUT:+timeout "$EVAL_TIMEOUT"} fer-edge eval --weights "$w" --data "$VAL" --device "$DEV" --tta $EL \
    --json "$OUT/$name-eval.json" >>"$OUT/$name.log" 2>&1
  grep -E "^(accuracy|mean-class|with ten-crop)" "$OUT/$name.log" | tail -3
}
pack_run() {  # pack_run NAME: best.safetensors as float16 parts $OUT/NAME.partNN
  local w=runs/$1/best.safetensors
  [ -f "$w" ] && python3 benchmarks/ship_weights.py pack "$w" "$OUT/$1"
  return 0
}
finish() { evaluate_run "$1"; pack_run "$1"; }  # finish NAME: both, into $OUT
# The time-boxed, many-run stages (chain, ensemble).  The device ends a call at 600 s and
# returns only (at most 8 of) the files in $OUT by then.  So: logs go to a staging folder that
# is archived into $OUT/NAME.tar.gz after every step; weights are packed before anything else
# runs after their training; every phase is time-boxed so the call ends by $DEADLINE s, with
# $RESERVE s per phase for data loading and final reports; every later step is cut at $HARD s.
DEADLINE=${DEADLINE:-540}; RESERVE=${RESERVE:-50}; HARD=${HARD:-$((DEADLINE + 40))}
# long, compact-offline, chain, hsnet in paper: batch 256 (profile_train.py: MACNN at 128 is CPU-bound
# on the H100); COMPILE=reduce-overhead adds --compile reduce-overhead (CUDA graphs: 2.9x eager at
# batch 128 in the speed stage, session 7)
GPU="--batch-size ${BATCH:-256} --lr ${LR:-0.1}${COMPILE:+ --compile $COMPILE}"
now() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(now) - RESERVE )); }
hard() { local t=$(( HARD - $(now) )); echo $(( t > 1 ? t : 1 )); }
minutes() { python3 -c "print($1 / 60)"; }
staging() {  # staging NAME: LOGS=runs/NAME-logs (fresh), DEST=$OUT, snapshot -> $DEST/NAME.tar.gz
  ARCHIVE=$1; DEST=$OUT; LOGS=runs/$1-logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
}
snapshot() { tar czf "$DEST/.$ARCHIVE.tgz" -C "$LOGS" . && mv "$DEST/.$ARCHIVE.tgz" "$DEST/$ARCHIVE.tar.gz"; }
beside() {  # beside NAME CMD...: `run` in the background, logs staged, $THREADS CPU threads; `wait` for it
  OUT=$LOGS OMP_NUM_THREADS=$THREADS LIMIT=$(hard) run "$@" &
}
evaluate_staged() {  # evaluate_staged NAME...: evaluate_run each (cut at the hard deadline), one line each
  local name             # into $LOGS/$ARCHIVE.log, a snapshot after each: a call cut short keeps what it has
  for name in "$@"; do
    echo "$name: $(OUT=$LOGS EVAL_TIMEOUT=$(hard) evaluate_run "$name" | tr '\n' ' ')" | tee -a "$LOGS/$ARCHIVE.log"
    snapshot
  done
  echo "== done: $(now) s" | tee -a "$LOGS/$ARCHIVE.log"; snapshot
}
case "$STAGE" in
  smoke)  # AMP bf16 + channels_last + torch.compile, 2 epochs
    run smoke $T --model macnn --epochs 2 --compile --out runs/smoke; finish smoke ;;
  speed)  # one log and one JSON for the three ways, each cut at LIMIT/3 seconds
    for mode in eager default reduce-overhead; do
      flag=""; [ "$mode" = eager ] || flag="--compile $mode"
      echo "== speed $mode" | tee -a "$OUT/speed.log"
      PYTHONUNBUFFERED=1 timeout $((LIMIT / 3)) $T --model macnn --epochs "${EPOCHS:-3}" --val-limit 500 $flag \
        --out "runs/speed-$mode" >> "$OUT/speed.log" 2>&1
      grep -E "^epoch" "$OUT/speed.log" | tail -"${EPOCHS:-3}"
    done
    python3 - "$OUT/speed.json" <<'PY'
import json, sys
from pathlib import Path
out = {}
for mode in ("eager", "default", "reduce-overhead"):
    f = Path(f"runs/speed-{mode}/metrics.jsonl")
    rows = [json.loads(l) for l in f.read_text().splitlines()] if f.is_file() else []
    later = [r["img_per_s"] for r in rows[1:]]  # epoch 1 includes compilation and cuDNN autotuning
    out[mode] = {"epochs": len(rows), "img_per_s": [round(r["img_per_s"]) for r in rows],
                 "img_per_s_after_first": round(sum(later) / len(later)) if later else None,
                 "val_acc": [round(r.get("val_acc", 0), 4) for r in rows]}
Path(sys.argv[1]).write_text(json.dumps(out, indent=2))
print(json.dumps(out, indent=2))
PY
    ;;
  macnn-paper) run macnn-paper $T --model macnn --recipe paper $EP --out runs/macnn-paper; finish macnn-paper ;;
  vgg16-paper) run vgg16-paper $T --model vgg16 --recipe paper $EP --out runs/vgg16-paper; finish vgg16-paper ;;
  macnn-best)  run macnn-best $T --model macnn --recipe best $EP --out runs/macnn-best; finish macnn-best ;;
  vgg16-best)  run vgg16-best $T --model vgg16 --recipe best $EP --out runs/vgg16-best; finish vgg16-best ;;
  compact)     run compact $T --model macnn --width 0.25 --recipe best $EP --out runs/compact; finish compact ;;
  compact-kd)  TEACHER=${2:?"compact-kd TEACHER: e.g. .data/teacher.safetensors"}
               run compact-kd $T --model macnn --width 0.25 --recipe best ${3:+--epochs $3} $EP \
                 --teacher "$TEACHER" --out runs/compact-kd; finish compact-kd ;;
  hsnet)       run hsnet $T --model hsnet --recipe best ${EP:---epochs 40} --out runs/hsnet; finish hsnet ;;
  ckplus)      run ckplus fer-edge train --device "$DEV" --data "$D/ckplus48" --folds 10 --model macnn --recipe best \
                 ${EP:---epochs 40} --batch-size 64 --no-progress --force --out runs/ckplus ;;
  ckplus-ft)   INIT=${2:?"ckplus-ft INIT: the FER2013 checkpoint to start from, e.g. .data/fer-init.safetensors"}
               run ckplus-ft fer-edge train --device "$DEV" --init "$INIT" --data "$D/ckplus48" --folds 10 \
                 --recipe best ${EP:---epochs 60} --batch-size 32 --lr 0.01 --no-progress --force --out runs/ckplus-ft ;;
  long)  # issue 8.1: one full-width MACNN alone for the whole call (--time-budget LIMIT - 60 s), then its
          # logits on the training faces for `compact-offline` in a later call (a full-width teacher
          # cannot travel back in beside the data; its logits, 1.8 MB, can)
    run long $T --model macnn --recipe best $GPU --seed 1 ${EP:---epochs 300} \
      --time-budget "$(minutes $(( LIMIT - 60 )))" --out runs/long
    if [ -f runs/long/best.safetensors ]; then  # ~10 s on the H100 (a CPU dry run: EXTRA="--width 0.125")
      timeout "${TL_TIMEOUT:-120}" fer-edge teacher-logits --weights runs/long/best.safetensors --data "$TRAIN" \
        --device "$DEV" --out "$OUT/teacher-logits.safetensors" --force >> "$OUT/long.log" 2>&1
      echo "teacher-logits: exit $?"; tail -1 "$OUT/long.log"
    fi
    finish long ;;
  compact-offline)  # issue 8.3: the compact MACNN alone, distilled from carried teacher logits (`long`'s)
    LOGITS=${2:-.data/teacher-logits.safetensors}
    run compact-offline $T --model macnn --width 0.25 --recipe best $GPU --seed 1 ${EP:---epochs 300} \
      --teacher-logits "$LOGITS" --time-budget "$(minutes $(( LIMIT - 60 )))" --out runs/compact-offline
    finish compact-offline ;;
  chain)
    # Issue 8 in one call: one full-width MACNN teacher alone on the GPU, then the compact
    # (width 0.25) MACNN distilled from it, alone (runs side by side share the GPU, and a
    # full-width checkpoint cannot travel in beside the data).  Both time-boxed like the
    # ensemble stage; returns chain.tar.gz (logs, metrics, eval JSON), the compact model's
    # weights (first) and the teacher's (float16 parts).
    TEPOCHS=${TEPOCHS:-200}; SEPOCHS=${SEPOCHS:-200}
    staging chain
    TBUDGET=${TBUDGET:-$(( ($(left) - RESERVE) * 45 / 100 ))}
    echo "== chain: $(now) s in; the teacher gets ${TBUDGET} s" | tee "$LOGS/chain.log"
    OUT=$LOGS LIMIT=$(hard) run chain-teacher $T --model macnn --recipe best $GPU --seed 1 \
      --epochs "$TEPOCHS" --time-budget "$(minutes "$TBUDGET")" --out runs/chain-teacher
    snapshot
    [ -f runs/chain-teacher/best.safetensors ] || { echo "the teacher did not finish"; exit 1; }
    SBUDGET=${SBUDGET:-$(left)}
    echo "== distillation: $(now) s in; the compact student gets ${SBUDGET} s" | tee -a "$LOGS/chain.log"
    OUT=$LOGS LIMIT=$(hard) run chain-compact $T --model macnn --width 0.25 --recipe best $GPU --seed 1 \
      --teacher runs/chain-teacher/best.safetensors --epochs "$SEPOCHS" --time-budget "$(minutes "$SBUDGET")" \
      --out runs/chain-compact
    for name in chain-compact chain-teacher; do OUT=$DEST pack_run "$name"; snapshot; done
    evaluate_staged chain-compact chain-teacher
    ;;
  paper)
    # Issue 4.5 in one call: MACNN and VGG16 with the paper's recipe (Adam 1e-4, batch 32: each
    # step is CPU-launch-bound on the H100, so three runs side by side cost little more than one)
    # and HSNet with the best recipe, all time-boxed to the call; returns paper.tar.gz (logs,
    # metrics, summaries, PublicTest eval JSON with ten-crop).  No weights: nothing ships from these.
    staging paper
    PBUDGET=${PBUDGET:-$(left)}; PM=$(minutes "$PBUDGET")
    echo "== paper: $(now) s in; each run gets ${PBUDGET} s" | tee "$LOGS/paper.log"
    THREADS=$(( $(nproc) / 3 > 0 ? $(nproc) / 3 : 1 ))
    beside macnn-paper $T --model macnn --recipe paper $EP \
      --time-budget "$PM" --out runs/macnn-paper
    beside vgg16-paper $T --model vgg16 --recipe paper $EP \
      --time-budget "$PM" --out runs/vgg16-paper
    beside hsnet $T --model hsnet --recipe best $GPU \
      ${EP:---epochs 60} --time-budget "$PM" --out runs/hsnet
    wait; snapshot
    evaluate_staged macnn-paper vgg16-paper hsnet
    ;;
  ensemble)
    K=${K:-3}; TEPOCHS=${TEPOCHS:-200}; SEPOCHS=${SEPOCHS:-200}
    staging ensemble
    TBUDGET=${TBUDGET:-$(( ($(left) - RESERVE) * 45 / 100 ))}; TM=$(minutes "$TBUDGET")
    echo "== ensemble: $(now) s in; teachers get ${TBUDGET} s" | tee "$LOGS/ensemble.log"
    NCPU=$(nproc); THREADS=$(( NCPU / (K + 1) > 0 ? NCPU / (K + 1) : 1 ))
    teachers=()
    for s in $(seq 1 "$K"); do
      beside teacher$s $T --model macnn --recipe best --seed "$s" \
        --epochs "$TEPOCHS" --time-budget "$TM" --out "runs/teacher$s"
      teachers+=("runs/teacher$s/best.safetensors")
    done
    beside vgg16-best $T --model vgg16 --recipe best \
      --epochs "$TEPOCHS" --time-budget "$TM" --out runs/vgg16-best
    wait; snapshot
    have=(); for w in "${teachers[@]}"; do [ -f "$w" ] && have+=("$w"); done
    [ ${#have[@]} -gt 0 ] || { echo "no teacher finished"; exit 1; }
    timeout "$(hard)" python3 -P benchmarks/eval_ensemble.py --weights "${have[@]}" --data "$VAL" --device "$DEV" \
      $EL --json "$LOGS/teachers-eval.json" > "$LOGS/teachers-eval.log" 2>&1; tail -6 "$LOGS/teachers-eval.log"
    snapshot
    kd=(); for w in "${have[@]}"; do kd+=(--teacher "$w"); done
    SBUDGET=${SBUDGET:-$(left)}; SM=$(minutes "$SBUDGET")
    echo "== distillation: $(now) s in; students get ${SBUDGET} s" | tee -a "$LOGS/ensemble.log"
    THREADS=$(( NCPU / 3 > 0 ? NCPU / 3 : 1 ))
    beside student $T --model macnn --recipe best "${kd[@]}" \
      --epochs "$SEPOCHS" --time-budget "$SM" --out runs/student
    beside compact-student $T --model macnn --width 0.25 \
      --recipe best "${kd[@]}" --epochs "$SEPOCHS" --time-budget "$SM" --out runs/compact-student
    beside vgg16-student $T --model vgg16 --recipe best "${kd[@]}" \
      --epochs "$SEPOCHS" --time-budget "$SM" --out runs/vgg16-student
    wait
    for name in student compact-student; do OUT=$DEST pack_run "$name"; done  # first: they cannot be redone here
    snapshot
    # Ten-crop evaluation on the GPU while time is left (the CPU redoes it after unpacking anyway).
    evaluate_staged student compact-student vgg16-best vgg16-student
    ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
ls -la "$OUT"
