"""``fer-edge eval`` (score a checkpoint on labelled faces) and
``fer-edge teacher-logits`` (store a teacher's logits for offline distillation).
Every input and output is checked before the data loads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fer_edge import UserError, argtypes
from fer_edge.commands.common import (FER2013_USAGES, add_classes_option, add_device_option, add_progress_option,
                                      add_strict_option, check_output_file, check_outputs_spare_inputs,
                                      check_plots_folder, report_skipped)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def training_metrics(weights: Path) -> Path | None:
    """The metrics.jsonl beside a run's checkpoint, for the training-curves plot;
    None (with a warning) when it has lines that are not epoch records."""
    from fer_edge.training.rundir import METRICS_FILE, parse_metrics_line

    path = Path(weights).parent / METRICS_FILE
    if not path.is_file():
        return None
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    rows = [parse_metrics_line(x) for x in lines]
    if not rows or any(r is None or not {"train_loss", "train_acc"} <= r.keys() for r in rows):
        print(f"warning: {path}: not a readable training log; no training curves plotted", flush=True)
        return None
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    from fer_edge.checkpoint import load_checkpoint, read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.devices import torch_device
    from fer_edge.evaluate import evaluate, format_report, write_report
    from fer_edge.training.setup import limit_set

    if args.json:
        check_output_file(args.json, args.force, "--json")
    if args.plots:
        check_plots_folder(args.plots, args.force)
    check_outputs_spare_inputs({"--json": args.json, "--plots": args.plots},
                               {"--weights": args.weights, "--data": args.data})
    device = str(torch_device(args.device))
    args.weights = weights_or_default(args.weights)
    meta = read_meta(args.weights)
    data = load_dataset(args.data, size=meta["preprocess"]["input_size"][0], classes=args.classes,
                        strict=args.strict, usage=args.usage, progress=not args.no_progress)
    report_skipped(args.data, data, _warn)
    if args.limit is not None and args.limit < len(data):
        print(f"scoring a seeded random subset of {args.limit} of {len(data)} faces (--limit)")
    data = limit_set(data, args.limit, 0)
    model, meta = load_checkpoint(args.weights, device=device)
    report = evaluate(model, meta, data, device=device, batch_size=args.batch_size, tta=args.tta,
                      progress=not args.no_progress)
    report["weights"] = str(args.weights)
    report["data"] = str(args.data)
    print(format_report(report))
    metrics = training_metrics(args.weights) if args.plots else None
    for path in write_report(report, args.json, args.plots, metrics, force=True):
        print(f"wrote {path}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, per-class metrics, confusion matrix, ROC/AUC, latency, plots",
                       description="Score a checkpoint on labelled faces: accuracy, mean-class accuracy, "
                       "per-class precision/recall/F1/AUC, the confusion matrix, batch-1 latency; optionally "
                       "ten-crop test-time augmentation, a JSON report and plots.")
    p.add_argument("--weights", help="checkpoint (.safetensors, train or merged form; "
                   "default: the embedded default model)")
    p.add_argument("--data", required=True, help="labelled faces: class folders, FER2013 .csv, CK+, RAF-DB")
    p.add_argument("--usage", default="PublicTest", choices=FER2013_USAGES,
                   help="Usage rows when --data is a FER2013 CSV (default PublicTest)")
    p.add_argument("--json", help="write the full report as JSON")
    p.add_argument("--plots", help="folder for confusion.png, roc.png (and training_curves.png from the "
                                   "run's metrics.jsonl)")
    p.add_argument("--tta", action="store_true", help="also report ten-crop test-time augmentation")
    p.add_argument("--limit", type=argtypes.positive_int, help="score a seeded random subset of N faces "
                   "(quick checks)")
    add_device_option(p)
    p.add_argument("--batch-size", type=argtypes.batch_size, default=256,
                   help="faces per batch when scoring (default 256)")
    add_classes_option(p)
    add_strict_option(p)
    p.add_argument("--force", action="store_true", help="overwrite --json / plots")
    add_progress_option(p)
    p.set_defaults(func=cmd_eval)


def cmd_teacher_logits(args: argparse.Namespace) -> int:
    from fer_edge.checkpoint import read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.devices import torch_device
    from fer_edge.fileio import sha256_file
    from fer_edge.training.distill import Teacher, compute_teacher_logits, face_keys, save_teacher_logits

    out = check_output_file(args.out, args.force)
    check_outputs_spare_inputs({"--out": args.out}, {"--weights": args.weights, "--data": args.data})
    device = torch_device(args.device)
    args.weights = weights_or_default(args.weights)
    meta = read_meta(args.weights)
    data = load_dataset(args.data, size=meta["preprocess"]["input_size"][0], classes=args.classes,
                        strict=args.strict, usage=args.usage, progress=not args.no_progress)
    report_skipped(args.data, data, _warn)
    if len(data) == 0:
        raise UserError(f"{args.data}: no labelled faces")
    teacher = Teacher(args.weights, list(meta["classes"]), meta["preprocess"], device)
    logits = compute_teacher_logits(teacher, data.images, meta["preprocess"], flip=not args.no_flip)
    acc = float("nan")  # the teacher's top-1 on these faces, as a check that they are the ones it knows
    if all(c in meta["classes"] for c in data.classes):
        columns = [list(meta["classes"]).index(c) for c in data.classes]
        acc = float((logits[:, columns].argmax(1).numpy() == data.labels).mean())
    info = {"classes": list(meta["classes"]), "flip": not args.no_flip, "data": str(args.data),
            "teacher": {"sha256": sha256_file(args.weights), "arch": meta["arch"], "config": meta["config"],
                        "form": meta["form"], "preprocess": meta["preprocess"]},
            "teacher_accuracy_on_data": acc}
    save_teacher_logits(out, logits, face_keys(data.sources, args.data), info, force=args.force)
    print(f"wrote {out}: {len(data)} faces x {logits.shape[1]} classes, teacher top-1 on them {100 * acc:.2f}% "
          f"({'face and mirror averaged' if not args.no_flip else 'faces as they are'})")
    return 0


def add_teacher_logits_parser(sub) -> None:
    p = sub.add_parser("teacher-logits", help="store a teacher's logits on training faces, for "
                       "`fer-edge train --teacher-logits` (offline distillation)",
                       description="Score every training face with a teacher checkpoint (by default the mean "
                       "of the face's and its mirror image's logits) and store the logits keyed by path under "
                       "--data, for `fer-edge train --teacher-logits` where the teacher itself cannot be.")
    p.add_argument("--weights", help="the teacher checkpoint (default: the embedded default model)")
    p.add_argument("--data", required=True, help="the training faces the student will use (same --data)")
    p.add_argument("--out", required=True, help="logits file to write (.safetensors)")
    p.add_argument("--usage", default="Training", choices=FER2013_USAGES,
                   help="Usage rows when --data is a FER2013 CSV (default Training)")
    p.add_argument("--no-flip", action="store_true",
                   help="score the faces only (default: the mean of each face's and its mirror image's logits)")
    add_device_option(p)
    add_classes_option(p)
    add_strict_option(p)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_progress_option(p)
    p.set_defaults(func=cmd_teacher_logits)
