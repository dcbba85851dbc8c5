"""``fer-edge calibrate``: fit a checkpoint's calibration on held-out faces and
write the checkpoint again with it (its bundles then carry it to every runtime):
a softmax temperature in its metadata, or vector scaling folded into its weights."""
from __future__ import annotations

from pathlib import Path

from fer_edge import UserError
from fer_edge.commands.common import (FER2013_USAGES, add_classes_option, add_device_option, add_progress_option,
                                      add_strict_option, check_output_file,
                                      check_outputs_spare_inputs)


def cmd_calibrate(args) -> int:
    """Fit the calibration on held-out faces, write the checkpoint with it."""
    import numpy as np

    from fer_edge.checkpoint import read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.devices import torch_device
    from fer_edge.evaluate import (ECE_BINS, checkpoint_logits, remap_labels, set_checkpoint_temperature,
                                   set_checkpoint_vector_scaling)
    from fer_edge.metrics import CALIBRATORS, cross_fitted_probs, expected_calibration_error, softmax
    from fer_edge.models.registry import LOGIT_LAYERS

    out = check_output_file(args.out, args.force)
    device = str(torch_device(args.device))
    weights = weights_or_default(args.weights)
    check_outputs_spare_inputs({"--out": out}, {"--weights": weights, "--data": args.data})
    meta = read_meta(weights)
    if args.method == "vector" and meta["arch"] not in LOGIT_LAYERS:  # before reading any face
        raise UserError(f"--method vector folds into a model's last linear layer and {meta['arch']} has no single one "
                        f"(models that do: {', '.join(sorted(LOGIT_LAYERS))}); use --method temperature")
    data = load_dataset(args.data, size=meta["preprocess"]["input_size"][0], classes=args.classes,
                        strict=args.strict, usage=args.usage, progress=not args.no_progress)
    if len(data) == 0:
        raise UserError(f"{args.data}: no labelled faces")
    if args.method == "vector":  # a class with no faces would get a shift that removes it
        counts = np.bincount(remap_labels(data, meta["classes"]), minlength=len(meta["classes"]))
        missing = [c for c, n in zip(meta["classes"], counts) if n == 0]
        if missing:
            raise UserError(f"--method vector fits a scale and a shift per class and {args.data} has no faces of "
                            f"{', '.join(missing)}; use faces of every class, or --method temperature")
    logits, labels, _ = checkpoint_logits(weights, data, device)
    broken = int((~np.isfinite(logits).all(axis=1)).sum())
    if broken:
        raise UserError(f"{weights}: the logits of {broken} of {len(logits)} faces are not finite "
                        f"(NaN or inf): the checkpoint's weights are broken")
    fit, apply = CALIBRATORS[args.method]
    params = fit(logits, labels)
    before = expected_calibration_error(softmax(logits), labels, ECE_BINS)
    after = expected_calibration_error(apply(logits, params), labels, ECE_BINS)
    crossed, _ = cross_fitted_probs(logits, labels, method=args.method)
    held_out = expected_calibration_error(crossed, labels, ECE_BINS)
    if args.method == "temperature":
        set_checkpoint_temperature(weights, params, out, force=args.force)
        what = f"temperature T = {params:.4f}"
    else:
        record = {"faces": int(len(labels)), "data": Path(args.data).name, "ece_before": round(before, 5),
                  "ece_cross_fitted": round(held_out, 5)}
        set_checkpoint_vector_scaling(weights, *params, out, record, force=args.force)
        accuracy = float((apply(logits, params).argmax(axis=1) == labels).mean())
        what = (f"vector scaling (a scale and a shift per class, folded into the last layer; accuracy on these "
                f"faces {100 * float((logits.argmax(axis=1) == labels).mean()):.2f}% -> {100 * accuracy:.2f}%)")
    print(f"{what} fitted on {len(labels)} faces of {args.data}: ECE {100 * before:.2f}% -> {100 * after:.2f}% "
          f"on these same faces (optimistic), {100 * held_out:.2f}% fitting on one half and scoring the other")
    print(f"wrote {out}")
    return 0


def add_calibrate_parser(sub) -> None:
    from fer_edge.metrics import CALIBRATORS  # numpy only

    p = sub.add_parser("calibrate", help="fit the model's confidence calibration on held-out faces and store it "
                                         "in a checkpoint",
                       description="Fits the calibration minimizing the negative log-likelihood on --data and "
                                   "writes the checkpoint again with it; bundles converted from it carry it to "
                                   "every runtime.  temperature: softmax(logits / T), T in the metadata, never "
                                   "changes a prediction.  vector: a scale and a shift per class folded into the "
                                   "last layer's weights; fixes classes that are over-confident unequally, may "
                                   "change a few predictions.  Use faces the model was neither trained nor will "
                                   "be tested on.")
    p.add_argument("--method", choices=sorted(CALIBRATORS), default="temperature",
                   help="temperature (default) or vector scaling")
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
