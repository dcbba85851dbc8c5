"""``fer-edge convert`` and ``fer-edge parity``: a checkpoint into a checked
device bundle, and a bundle re-checked against its checkpoint.  The steps are
chained in fer_edge.converters.pipeline; here the options are read and checked
before any long work starts."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fer_edge import UserError
from fer_edge.argtypes import int_in, non_negative_int, positive_int
from fer_edge.commands.common import check_output_file, check_outputs_spare_inputs

THREADS = int_in(1, 1024)
CALIB_SIZE = int_in(1, 1 << 20)
RELEASE = int_in(0, 2 ** 53)


def existing(path, what: str) -> Path:
    """A path given on the command line that must be there (file or folder)."""
    if not Path(path).exists():
        raise UserError(f"{what} {path}: no such file or folder")
    return Path(path)


def checkpoint_path(weights) -> Path:
    """--weights as given (it must be a file), or the embedded default model."""
    from fer_edge.checkpoint import check_checkpoint_file, weights_or_default  # imports torch: not at parser time

    if weights:
        check_checkpoint_file(weights, "--weights ")
    return weights_or_default(weights)


def check_json_out(path, force: bool) -> None:
    """--json: not overwritten unasked, and writable, before the work starts."""
    if path:
        check_output_file(path, force, "--json")


def cmd_convert(args: argparse.Namespace) -> int:
    from fer_edge.converters.calibration import CALIB_METHODS
    from fer_edge.converters.formats import format_table, lookup

    if args.list:
        print(format_table())
        return 0
    missing = [n for n in ("target", "out") if getattr(args, n) is None]
    if missing:
        raise UserError(f"missing --{missing[0]} (see fer-edge convert --help)")
    fmt = lookup(args.target, args.precision)
    if args.calib_method is not None and not fmt.uses_calib_method:
        # Said once, not an error: the conversion itself is still what was asked for.
        print(f"note: --calib-method applies to the ONNX int8 formats only; {fmt.key} ignores it", file=sys.stderr)
    from fer_edge.converters import pipeline
    from fer_edge.converters.bundles import check_out, load_signing_key

    # Every refusal is the one line, before the note about the weights and the long work.
    check_out(args.out, args.force)
    check_outputs_spare_inputs({"--out": args.out}, {"--weights": args.weights, "--calib": args.calib,
                                                     "--parity-data": args.parity_data, "--sign": args.sign})
    pipeline.check_request(fmt, args.calib, args.dynamic_batch)
    if args.sign:
        load_signing_key(args.sign)
    for flag, path in (("--calib", args.calib), ("--parity-data", args.parity_data)):
        if path:
            existing(path, flag)

    report = pipeline.convert(checkpoint_path(args.weights), args.target, args.precision, args.out,
                              calib=args.calib, calib_size=args.calib_size, parity_data=args.parity_data,
                              parity_size=args.parity_size or None, nhwc=args.nhwc,
                              dynamic_batch=args.dynamic_batch, force=args.force,
                              calib_method=args.calib_method or CALIB_METHODS[0],
                              int8_all_layers=args.int8_all_layers, sign=args.sign, release=args.release,
                              progress=not args.no_progress)
    if not report["passed"]:
        print(f"fer-edge convert: {report['artifact']} FAILED parity ({'; '.join(report['failures'])}); "
              f"the bundle in {args.out} is marked failed and devices will refuse it", file=sys.stderr)
        return 1
    print(f"wrote {args.out}" + (" (signed)" if args.sign else ""))
    return 0


def add_convert_parser(sub) -> None:
    from fer_edge.converters.calibration import CALIB_METHODS
    from fer_edge.converters.formats import PARITY_SIZE, keys, precisions, targets

    p = sub.add_parser("convert", help="merge, export and quantize a checkpoint into a device bundle",
                       description="Merge a checkpoint, export one artifact, check it against PyTorch and write "
                       "a bundle folder. Targets x precisions (fer-edge convert --list): " + ", ".join(keys()))
    p.add_argument("--weights", help="checkpoint (.safetensors, train or merged form; "
                   "default: the embedded default model)")
    p.add_argument("--target", choices=targets(), help="the device family (required unless --list)")
    p.add_argument("--precision", default="fp32", choices=precisions(), help="numeric precision (default fp32)")
    p.add_argument("--calib", help="labelled faces (class folders) for int8 calibration; the parity check uses "
                   "its other faces unless --parity-data is given")
    p.add_argument("--calib-size", type=CALIB_SIZE, default=256, help="faces used from --calib (default 256)")
    p.add_argument("--parity-data", help="labelled faces for the parity check (default: --calib's faces that "
                   "were not used for calibration); calibration faces are always left out")
    p.add_argument("--parity-size", type=non_negative_int, default=PARITY_SIZE,
                   help=f"class-stratified faces in the parity check (default {PARITY_SIZE}; 0 = all)")
    p.add_argument("--calib-method", default=None, choices=CALIB_METHODS,
                   help="activation range estimator for the ONNX int8 formats (onnx, jetson): entropy = "
                        "TensorRT's KL-divergence threshold (default), minmax = the full observed range, "
                        "percentile = the 99.999th percentile of |x|; TFLite int8 uses litert-torch's own")
    p.add_argument("--int8-all-layers", action="store_true",
                   help="ONNX int8: also quantize the first (image-reading) layer and the classifier, "
                        "which stay in float by default (about 1%% of the compute, most of the int8 error)")
    p.add_argument("--nhwc", action="store_true",
                   help="NHWC uint8 input (raw gray pixels, normalization inside the model) for camera pipelines")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: dynamic batch dimension (default batch 1)")
    p.add_argument("--sign", metavar="KEY", help="sign manifest.json with this Ed25519 private key "
                   "(fer-edge keygen) into manifest.sig; devices check it with predict --trust")
    p.add_argument("--release", type=RELEASE, metavar="N",
                   help="a release number for the manifest (with --sign: devices running predict --min-release N "
                        "refuse older bundles signed with the same key)")
    p.add_argument("--out", help="bundle folder to write (its parent folders are made)")
    p.add_argument("--force", action="store_true", help="replace an existing --out (a bundle or an empty folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--list", action="store_true", help="print the table of targets and precisions")
    p.set_defaults(func=cmd_convert)


def cmd_parity(args: argparse.Namespace) -> int:
    from fer_edge.converters import pipeline
    from fer_edge.converters.bundles import load_signing_key, open_bundle, remark
    from fer_edge.converters.parity import fewer_faces, format_row
    from fer_edge.fileio import write_json_atomic
    from fer_edge.targets.bundle import SIGNATURE

    check_json_out(args.json, args.force)
    check_outputs_spare_inputs({"--json": args.json}, {"--bundle": args.bundle, "--data": args.data,
                                                       "--weights": args.weights, "--sign": args.sign})
    if args.report_only and args.sign:
        raise UserError("--sign re-signs a re-marked bundle; --report-only leaves it untouched: give one")
    existing(args.data, "--data")
    signed = (Path(args.bundle) / SIGNATURE).is_file()
    if signed and not (args.sign or args.report_only):
        raise UserError(f"{args.bundle} is signed: re-marking it changes manifest.json and would invalidate "
                        f"{SIGNATURE}; pass --sign KEY to re-sign it, or --report-only")
    if args.sign and not signed:
        # Signing vouches for every file; parity checks the artifacts' logits only. A bundle
        # signed before by this key is known to be its signer's; any other is converted again.
        raise UserError(f"{args.bundle} is not signed: --sign only re-signs a bundle signed with that key; "
                        "sign a bundle when converting it (fer-edge convert --sign KEY)")
    key = load_signing_key(args.sign) if args.sign else None
    # Re-signing vouches for the whole bundle again: it must first verify with that
    # same key, so a tampered, re-hashed bundle is never laundered here.
    bundle = open_bundle(args.bundle, trust=key.public_key() if key is not None else None)
    rep = pipeline.parity(bundle, args.data, args.weights, args.limit, args.threads, not args.no_progress)
    d = rep["data"]
    print(f"{rep['images']} faces from {args.data} ({d['excluded_calibration_faces']} calibration faces left out); "
          f"PyTorch reference accuracy {100 * rep['reference_accuracy']:.2f}%")
    for r in rep["artifacts"]:
        print(format_row(r["artifact"], r))
    passed = all(r["passed"] for r in rep["artifacts"])
    if not args.report_only:
        fewer = fewer_faces(bundle.parity, rep["parity"])
        if fewer:
            raise UserError(f"not re-marked: {fewer}; a pass on fewer faces does not overturn a failure "
                            "(give at least as many faces, or --report-only)")
        remark(bundle, rep["parity"], key)
        print(f"re-marked {args.bundle}: {'passed' if passed else 'failed'}" + (" (re-signed)" if key else ""))
    if args.json:
        write_json_atomic(args.json, {k: v for k, v in rep.items() if k != "parity"}, force=True)
    return 0 if passed else 1


def add_parity_parser(sub) -> None:
    p = sub.add_parser("parity", help="re-check every artifact of a bundle against the PyTorch model on labelled "
                       "faces and re-mark the bundle passed or failed",
                       description="Run every artifact of a bundle in its own runtime and the source checkpoint "
                       "in PyTorch on the same labelled faces, judge them by the parity thresholds, and re-mark "
                       "the bundle passed or failed (--report-only: report without changing it).")
    p.add_argument("--bundle", required=True, help="bundle folder written by fer-edge convert")
    p.add_argument("--data", required=True, help="labelled faces (class folders or FER2013 CSV); the bundle's "
                   "calibration faces are left out")
    p.add_argument("--weights", help="the source checkpoint (default: the path recorded in the bundle's manifest)")
    p.add_argument("--limit", type=positive_int, help="use a seeded class-stratified subset of N faces")
    p.add_argument("--threads", type=THREADS, help="runtime threads (default: the runtime's)")
    p.add_argument("--report-only", action="store_true", help="report only; leave the bundle as it is")
    p.add_argument("--sign", metavar="KEY", help="re-sign the re-marked manifest (required for a signed bundle, "
                   "which must verify with this key first)")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_parity)
