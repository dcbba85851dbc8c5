#!/usr/bin/env python
"""Accuracy of several checkpoints and of their ensemble (mean of the
members' class probabilities) on one labelled set: what an ensemble teacher
knows before it is distilled into one model (``fer-edge train --teacher A
--teacher B ...``).  Members may store their classes in any order; they are
mapped by name onto the first member's.

    python benchmarks/eval_ensemble.py --weights runs/t1/best.safetensors runs/t2/best.safetensors \
        --data ../shared/data/fer2013/publictest [--tta] [--device cuda] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true", help="also the ten-crop test-time augmentation")
    p.add_argument("--limit", type=int, help="a seeded random subset of N faces (smoke runs)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    from fer_edge import UserError
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import predict_probs, remap_labels
    from fer_edge.metrics import summarize
    from fer_edge.training.setup import limit_set
    from fer_edge.training.distill import teacher_columns

    try:
        members = [load_checkpoint(w, device=args.device) for w in args.weights]
        classes = list(members[0][1]["classes"])
        size = members[0][1]["preprocess"]["input_size"][0]
        for path, (_, meta) in zip(args.weights, members):
            if meta["preprocess"]["input_size"][0] != size:
                raise UserError(f"{path}: input size {meta['preprocess']['input_size'][0]}, not {size} like "
                                f"{args.weights[0]}: score models of one input size together")
            try:
                teacher_columns(list(meta["classes"]), classes)
            except ValueError as exc:
                raise UserError(f"{path}: {exc}") from None
        data = load_dataset(args.data, size=size)
        data = limit_set(data, args.limit, 0)  # the subset `fer-edge eval --limit` scores
        labels = remap_labels(data, classes)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, sums = [], {}
    views = ("plain", "tta") if args.tta else ("plain",)
    torch.backends.cudnn.benchmark = args.device.startswith("cuda")
    for path, (model, meta) in zip(args.weights, members):
        cols = teacher_columns(list(meta["classes"]), classes)
        row = {"weights": str(path), "arch": meta["arch"]}
        for view in views:
            probs = predict_probs(model, data.images, meta["preprocess"], args.device, tta=view == "tta",
                                  channels_last=args.device.startswith("cuda"))[:, cols]
            sums[view] = sums.get(view, 0) + probs
            s = summarize(labels, probs, classes)
            row[view] = {"accuracy": s["accuracy"], "mean_class_accuracy": s["mean_class_accuracy"]}
        rows.append(row)
    ens = {"weights": f"ensemble of {len(rows)}", "arch": "+".join(r["arch"] for r in rows)}
    for view in views:
        s = summarize(labels, sums[view] / len(rows), classes)
        ens[view] = {"accuracy": s["accuracy"], "mean_class_accuracy": s["mean_class_accuracy"]}
    rows.append(ens)

    print(f"{len(labels)} faces from {args.data}")
    head = f"{'model':<48} " + " ".join(f"{v + ' acc':>9} {v + ' mc':>9}" for v in views)
    print(head + "\n" + "-" * len(head))
    for r in rows:
        name = r["weights"] if len(r["weights"]) <= 48 else "..." + r["weights"][-45:]
        print(f"{name:<48} " + " ".join(f"{100 * r[v]['accuracy']:>8.2f}% {100 * r[v]['mean_class_accuracy']:>8.2f}%"
                                           for v in views))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": str(args.data), "faces": len(labels), "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
