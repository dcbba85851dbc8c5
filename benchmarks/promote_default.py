#!/usr/bin/env python
"""Make a trained checkpoint the package's embedded default model: check it,
score it on the validation set it was chosen on (plain and ten-crop), copy
it into fer_edge/weights/ and write its model card (the JSON `fer-edge info`,
eval, convert and predict read), with the commands that reproduce each
number.  docs/model-card.md is then updated by hand from the printout.

    python benchmarks/promote_default.py runs/gpu/compact-student.safetensors \
        --data ../shared/data/fer2013/publictest \
        --train-command "bash benchmarks/gpu_train.sh ensemble  (compact-student)" \
        --status "GPU-trained: distilled from an ensemble of three full-width MACNNs" [--force]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MAX_MB = 10.0  # the embedded model must stay small enough to ship in the wheel


def r4(v):
    return None if v is None else round(float(v), 4)


def main(argv=None) -> int:
    from fer_edge.weights import DEFAULT_MODEL, WEIGHTS_DIR

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="train-form MACNN checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="the labelled set the best epoch was chosen on (PublicTest)")
    p.add_argument("--train-command", required=True, help="the command that trained it (goes on the card)")
    p.add_argument("--status", required=True, help="one line on where the model comes from")
    p.add_argument("--dest", default=str(WEIGHTS_DIR), help="folder of the embedded model (default: the package's)")
    p.add_argument("--name", default=DEFAULT_MODEL, help="card and file name (fer_edge.weights.DEFAULT_MODEL)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="replace the model already there")
    args = p.parse_args(argv)

    from fer_edge import UserError
    from fer_edge.checkpoint import load_checkpoint, write_atomic, write_json_atomic
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import evaluate
    from fer_edge.targets.bundle import sha256_file

    try:
        src = Path(args.weights)
        model, meta = load_checkpoint(src, expect_arch="macnn", device=args.device)
        if meta["form"] != "train":
            raise UserError(f"{src}: give the train-form checkpoint (convert merges it; eval reports the train form)")
        size_mb = src.stat().st_size / 1e6
        if size_mb > MAX_MB:
            raise UserError(f"{src}: {size_mb:.1f} MB, over the {MAX_MB:g} MB an embedded model may take")
        dest = Path(args.dest)
        weights_out, card_out = dest / f"{args.name}.safetensors", dest / f"{args.name}.json"
        if (weights_out.exists() or card_out.exists()) and not args.force:
            raise UserError(f"{dest} already holds {args.name}; pass --force to replace it")
        data = load_dataset(args.data, size=meta["preprocess"]["input_size"][0])
        report = evaluate(model, meta, data, device=args.device, tta=True, latency=False, progress=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_atomic(weights_out, lambda tmp: shutil.copyfile(src, tmp), force=True)
    config = meta["config"]
    card = {
        "name": args.name,
        "file": weights_out.name,
        "sha256": sha256_file(weights_out),
        "status": args.status,
        "arch": meta["arch"],
        "width": config.get("width", 1.0),
        "form": meta["form"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": f"FER2013 train (48x48 gray); best epoch chosen on {args.data} ({len(data)} faces). "
                "FER2013 is for research use (Kaggle ICML 2013 challenge terms): so is this model.",
        "train_command": args.train_command,
        "eval_command": f"fer-edge eval --data {args.data} --tta",
        "benchmark_command": f"fer-edge benchmark --data {args.data} --calib ../shared/data/fer2013/train",
        "publictest": {
            "accuracy": r4(report["accuracy"]),
            "mean_class_accuracy": r4(report["mean_class_accuracy"]),
            "macro_f1": r4(report["macro_f1"]),
            "macro_auc": r4(report["macro_auc"]),
            "tta_ten_crop_accuracy": r4(report["tta"]["accuracy"]),
        },
    }
    calibration = report["calibration"]
    card["publictest"]["ece"] = r4(calibration["ece"] if calibration["temperature"] is None
                                   else calibration["ece_scaled"])
    if "calibration" in meta:  # fer-edge calibrate --method vector: folded into the weights
        card["calibration"] = meta["calibration"]
    if "distilled_from" in meta.get("extra", {}):
        card["distilled_from"] = meta["extra"]["distilled_from"]
    write_json_atomic(card_out, card, force=True)
    t = card["publictest"]
    print(f"{card['name']}: {100 * t['accuracy']:.2f}% ({100 * t['mean_class_accuracy']:.2f}% mean-class, "
          f"ten-crop {100 * t['tta_ten_crop_accuracy']:.2f}%), {card['parameters']:,} parameters, "
          f"{size_mb:.1f} MB -> {weights_out}, card {card_out}")
    print("next: `fer-edge benchmark` (int8 parity, latency) and docs/model-card.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
