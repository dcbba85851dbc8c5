"""``fer-edge calibrate``: fit a checkpoint's softmax temperature on held-out faces
and write the checkpoint again with it (its bundles then carry it to every
runtime)."""
from __future__ import annotations

from pathlib import Path

from fer_edge import UserError
from fer_edge.commands.common import (FER2013_USAGES, add_classes_option, add_device_option, add_progress_option,
                                      add_strict_option, check_output_file)


def cmd_calibrate(args) -> int:
    """Fit T on held-out faces, write the checkpoint with it."""
    from fer_edge.checkpoint import read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.devices import torch_device
    from fer_edge.evaluate import ECE_BINS, checkpoint_logits, set_checkpoint_temperature
    from fer_edge.metrics import expected_calibration_error, fit_temperature, nll, softmax

    out = check_output_file(args.out, args.force)
    device = str(torch_device(args.device))
    weights = weights_or_default(args.weights)
    if out.resolve() == Path(weights).resolve():
        raise UserError(f"--out {out} is the input checkpoint; write a new file")
    size = read_meta(weights)["preprocess"]["input_size"][0]
    data = load_dataset(args.data, size=size, classes=args.classes, strict=args.strict, usage=args.usage,
                        progress=not args.no_progress)
    if len(data) == 0:
        raise UserError(f"{args.data}: no labelled faces")
    logits, labels, _ = checkpoint_logits(weights, data, device)
    t = fit_temperature(logits, labels)
    before = expected_calibration_error(softmax(logits), labels, ECE_BINS)
    after = expected_calibration_error(softmax(logits, t), labels, ECE_BINS)
    set_checkpoint_temperature(weights, t, out, force=args.force)
    print(f"temperature T = {t:.4f} fitted on {len(labels)} faces of {args.data} "
          f"(NLL {nll(logits, labels):.4f} -> {nll(logits, labels, t):.4f}; ECE on these same faces "
          f"{100 * before:.2f}% -> {100 * after:.2f}%, optimistic: score calibration on other faces "
          f"with fer-edge eval)")
    print(f"wrote {out}")
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a softmax temperature on held-out faces and store it in a checkpoint",
                       description="Fits T minimizing the negative log-likelihood of softmax(logits / T) on "
                                   "--data and writes the checkpoint again with T in its metadata; bundles "
                                   "converted from it carry T to every runtime.  Use faces the model was "
                                   "neither trained nor will be tested on.")
    p.add_argument("--weights", help="checkpoint (default: the embedded default model)")
    p.add_argument("--data", required=True, help="held-out labelled faces (class folders, FER2013 .csv, ...)")
    p.add_argument("--usage", default="PublicTest", choices=FER2013_USAGES,
                   help="Usage rows when --data is a FER2013 CSV (default PublicTest)")
    p.add_argument("--out", required=True, help="the calibrated checkpoint to write")
    add_device_option(p)
    add_classes_option(p)
    add_strict_option(p)
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_progress_option(p)
    p.set_defaults(func=cmd_calibrate)
