"""``fer-edge convert``, ``fer-edge parity`` and ``fer-edge benchmark``.

convert: checkpoint -> (merge) -> export one artifact -> parity against
PyTorch on the calibration faces -> a bundle folder, built in a temp folder
beside ``--out`` and renamed into place only when complete, so a failure
never leaves half a bundle behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fer_edge import UserError, __version__
from fer_edge.converters.formats import (
    CALIB_METHODS,
    FORMATS,
    PRECISIONS,
    TARGETS,
    format_table,
    lookup,
    uses_calib_method,
)

BUNDLE_FORMAT = "fer-edge-bundle"


def _debug() -> bool:
    return os.environ.get("FER_EDGE_DEBUG") == "1"


def load_faces(path, size: int, classes: list[str], limit: int | None, seed: int = 0, what: str = "--data"):
    """(uint8 faces, labels as model class indices) from labelled class folders or a FER2013 CSV."""
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import remap_labels

    if not Path(path).exists():
        raise UserError(f"{what} {path}: no such file or folder")
    try:
        ds = load_dataset(path, size=size, usage="PublicTest")
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    labels = remap_labels(ds, classes)
    if limit is not None and limit < len(ds):
        # A seeded, class-stratified subset: every class is calibrated and checked.
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(ds))
        per_class = [order[labels[order] == c] for c in range(len(classes))]
        picked, k = [], 0
        while len(picked) < limit:
            for idx in per_class:
                if k < len(idx) and len(picked) < limit:
                    picked.append(idx[k])
            k += 1
        sel = np.sort(np.array(picked))
        return ds.images[sel], labels[sel]
    return ds.images, labels


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _readme(fmt, meta, artifact: str, pre: dict) -> str:
    h, w = pre["input_size"]
    shape = f"1x{h}x{w}x1 uint8 (raw gray pixels)" if pre["layout"] == "NHWC" else \
        f"1x1x{h}x{w} float32, (pixel/255 - {pre['mean']}) / {pre['std']}"
    lines = [f"# fer-edge bundle: {meta['arch']} for {fmt.target} ({fmt.precision})", "",
             f"{fmt.description}.", "",
             f"- input `input`: {shape}; a face crop, gray, resized to {h}x{w}",
             f"- output `logits`: 1x{len(meta['classes'])}, classes in `labels.json` order "
             f"({', '.join(meta['classes'])}); softmax for probabilities",
             "- `manifest.json` holds the sha256 of every file; `parity.json` how this artifact compares "
             "with the PyTorch model", ""]
    if fmt.target in ("jetson", "onnx"):
        flags = {"fp32": "", "fp16": " --fp16", "int8": " --int8 --fp16"}[fmt.precision]
        lines += ["## On the Jetson", "", "Build the engine on the device (engines are specific to the GPU and "
                  "the TensorRT version):", "", "```bash",
                  f"trtexec --onnx={artifact}{flags} --saveEngine=model.engine",
                  "# or, with the TensorRT Python API:",
                  f"python3 -c \"from fer_edge.targets.jetson import build_engine; "
                  f"build_engine('{artifact}', '{fmt.precision}', 'model.engine')\"",
                  "```", ""]
        if fmt.precision == "int8":
            lines += ["The int8 model is explicitly quantized (Q/DQ nodes with the calibrated scales): TensorRT "
                      "needs no calibrator and no calibration images on the device.", ""]
    if fmt.target in ("jetson", "onnx"):
        lines += ["Run the camera pipeline on the device (JetPack provides TensorRT and OpenCV; no PyTorch):", "",
                  "```bash", "pip install fer-edge   # the runtime needs only numpy + OpenCV + TensorRT/ONNX Runtime",
                  "fer-edge predict 0 --bundle .            # camera 0; builds and caches the engine on first use",
                  "fer-edge predict clip.mp4 --bundle . --jsonl events.jsonl", "```", ""]
    if fmt.target == "android":
        nhwc = pre["layout"] == "NHWC"
        if nhwc:
            feed = (f"a `ByteBuffer` of {h * w} bytes: the face crop's gray pixels, row by row "
                    "(uint8; the normalization is inside the model)")
        elif fmt.precision == "int8":
            feed = (f"a `ByteBuffer` of {h * w} int8 values: for each gray pixel p, "
                    f"`q = round(((p / 255 - {pre['mean']}) / {pre['std']}) / scale) + zeroPoint` with "
                    "`scale, zeroPoint` from `interpreter.getInputTensor(0).quantizationParams()`")
        else:
            feed = (f"a `FloatBuffer` of {h * w} floats (shape 1x1x{h}x{w}, NCHW): "
                    f"`(p / 255f - {pre['mean']}f) / {pre['std']}f` for each gray pixel p")
        lines += ["## On Android (LiteRT / TFLite Interpreter)", "",
                  f"1. Put `{artifact}` and `labels.json` in the app's `assets/`.",
                  "2. Detect the face (ML Kit or OpenCV), crop a square around it with a 15% margin, convert to "
                  f"gray and resize to {w}x{h} (area interpolation when shrinking).",
                  f"3. Input: {feed}.",
                  "4. `interpreter.run(input, output)`; output: 1x{0} logits".format(len(meta["classes"]))
                  + (" as int8: `(q - zeroPoint) * scale` with `getOutputTensor(0).quantizationParams()`"
                     if fmt.precision == "int8" else " (float32)")
                  + "; softmax, then the class names in `labels.json` order.", "",
                  "```kotlin",
                  f'val model = FileUtil.loadMappedFile(context, "{artifact}")',
                  "val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(2))  // XNNPACK by default",
                  f"val output = Array(1) {{ {'ByteArray' if fmt.precision == 'int8' else 'FloatArray'}"
                  f"({len(meta['classes'])}) }}",
                  "interpreter.run(input, output)",
                  "```", ""]
    lines += ["## Check it against PyTorch on a desktop (needs the source checkpoint)", "", "```bash",
              "fer-edge parity --bundle . --data FACES_DIR   # accuracy and agreement with the PyTorch model",
              "```", ""]
    return "\n".join(lines)


def _place_bundle(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temp bundle to --out (replacing an old one only with --force)."""
    if out.exists():
        if not force:
            raise UserError(f"{out} exists; pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def convert(weights, target: str, precision: str, out, *, calib=None, calib_size: int = 256, nhwc: bool = False,
            dynamic_batch: bool = False, force: bool = False, calib_method: str = CALIB_METHODS[0],
            int8_all_layers: bool = False, log=print) -> dict:
    """Write a bundle; returns its parity report.  Raises UserError for anything the user can fix."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters.exporters import EXPORTERS, InputSpec
    from fer_edge.converters.parity import artifact_logits, compare_logits, format_row, on_noise, reference_logits
    from fer_edge.targets.bundle import artifact_preprocess, sha256_file

    fmt = lookup(target, precision)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    if fmt.needs_calib and not calib:
        raise UserError(f"{target} {precision} needs --calib DIR: labelled face images (class folders) "
                        "to calibrate the int8 ranges")
    if dynamic_batch and fmt.runtime == "tflite":
        raise UserError("--dynamic-batch applies to ONNX targets only (TFLite models have a fixed batch)")
    model, meta = load_checkpoint(weights)
    size = tuple(meta["preprocess"]["input_size"])
    faces = labels = None
    if calib:
        faces, labels = load_faces(calib, size[0], meta["classes"], calib_size, what="--calib")
        log(f"calibration/parity set: {len(faces)} faces from {calib}")
    pre = artifact_preprocess(meta["preprocess"], nhwc)
    spec = InputSpec(size=size, in_chans=meta["config"].get("in_chans", 1), nhwc=nhwc,
                     dynamic_batch=dynamic_batch, preprocess=meta["preprocess"], calib=faces,
                     calib_method=calib_method, int8_all_layers=int8_all_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        artifact = tmp / fmt.file
        t0 = time.perf_counter()
        try:
            EXPORTERS[fmt.exporter](model, artifact, spec)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001  (exporters raise anything; the user gets one line)
            if _debug():
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"export to {target} {precision} failed: {type(exc).__name__}: {msg} "
                            "(FER_EDGE_DEBUG=1 shows the traceback)") from None
        seconds = time.perf_counter() - t0
        log(f"exported {fmt.file} in {seconds:.1f} s ({artifact.stat().st_size / 1e6:.2f} MB)")

        # Parity on the calibration faces (labelled), or seeded noise when none were given.
        if faces is None:
            rng = np.random.default_rng(0)
            check_faces, check_labels = rng.integers(0, 256, (64, *size), dtype=np.uint8), None
            data_note = "64 seeded random images (no --calib): logits only (fp32 also agreement)"
        else:
            check_faces, check_labels, data_note = faces, labels, f"{len(faces)} faces from --calib {calib}"
        ref = reference_logits(model, check_faces, meta["preprocess"])
        art = artifact_logits(artifact, fmt.runtime, check_faces, pre)
        report = compare_logits(ref, art, check_labels, precision)
        if check_labels is None:
            report = on_noise(report, precision)
        report.update({"artifact": fmt.file, "target": target, "precision": precision, "runtime": fmt.runtime,
                       "data": data_note})
        log(format_row(fmt.file, report))
        status = "passed" if report["passed"] else "failed"

        _write_json(tmp / "labels.json", {"classes": meta["classes"]})
        _write_json(tmp / "preprocess.json", pre)
        _write_json(tmp / "parity.json", {"reference": "PyTorch, float32, CPU", "artifacts": [report]})
        (tmp / "README.md").write_text(_readme(fmt, meta, fmt.file, pre))
        h, w = size
        in_shape = [None if dynamic_batch else 1, *((h, w, 1) if nhwc else (1, h, w))]
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": 1, "fer_edge_version": __version__,
            "target": target, "precision": precision,
            "source_checkpoint": {"file": Path(weights).name, "path": str(Path(weights).resolve()),
                                  "sha256": sha256_file(weights),
                                  "arch": meta["arch"], "form": meta["form"], "config": meta["config"]},
            "artifacts": [{"file": fmt.file, "target": target, "precision": precision, "runtime": fmt.runtime,
                           "status": status,
                           "input": {"name": "input", "shape": in_shape, "dtype": pre["input_dtype"],
                                     "layout": pre["layout"]},
                           "output": {"name": "logits", "shape": [in_shape[0], len(meta["classes"])]}}],
        }
        manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / "manifest.json", manifest)
        for p in tmp.iterdir():  # mkdtemp is 0700: a bundle is meant to be copied and shared
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        _place_bundle(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# ------------------------------------------------------------------ CLI
def cmd_convert(args: argparse.Namespace) -> int:
    if args.list:
        print(format_table())
        return 0
    missing = [n for n in ("target", "out") if getattr(args, n) is None]
    if missing:
        raise UserError(f"missing --{missing[0]} (see fer-edge convert --help)")
    fmt = lookup(args.target, args.precision)
    if args.calib_method is not None and not uses_calib_method(fmt):
        # Said once, not an error: the conversion itself is still what was asked for.
        print(f"note: --calib-method applies to the ONNX int8 formats only; {fmt.target}/{fmt.precision} "
              "ignores it", file=sys.stderr)
    from fer_edge.checkpoint import weights_or_default  # imports torch: not needed for --list

    report = convert(weights_or_default(args.weights), args.target, args.precision, args.out, calib=args.calib,
                     calib_size=args.calib_size, nhwc=args.nhwc, dynamic_batch=args.dynamic_batch,
                     force=args.force, calib_method=args.calib_method or CALIB_METHODS[0], int8_all_layers=args.int8_all_layers)
    if not report["passed"]:
        print(f"fer-edge convert: {report['artifact']} FAILED parity ({'; '.join(report['failures'])}); "
              f"the bundle in {args.out} is marked failed and devices will refuse it", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="merge, export and quantize a checkpoint into a device bundle",
                       description="Targets x precisions (fer-edge convert --list): " +
                                   ", ".join(f"{f.target}/{f.precision}" for f in FORMATS))
    p.add_argument("--weights", help="checkpoint (.safetensors, train or merged form; "
                   "default: the embedded default model)")
    p.add_argument("--target", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    p.add_argument("--calib", help="labelled faces (class folders) for int8 calibration and the parity check")
    p.add_argument("--calib-size", type=int, default=256, help="faces used from --calib (default 256)")
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
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--list", action="store_true", help="print the table of targets and precisions")
    p.set_defaults(func=cmd_convert)


def parity_bundle(bundle_path, data, weights=None, limit=None, threads=None) -> dict:
    """Run the PyTorch reference and every artifact of a bundle on labelled faces."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters.parity import artifact_logits, compare_logits, reference_logits
    from fer_edge.targets.bundle import BundleError, load_bundle, sha256_file

    try:
        bundle = load_bundle(bundle_path, allow_failed=True)
    except BundleError as exc:
        raise UserError(str(exc)) from None
    src = bundle.manifest["source_checkpoint"]
    weights = Path(weights) if weights else Path(src.get("path", src["file"]))
    if not weights.is_file():
        raise UserError(f"the PyTorch reference {weights} is not there: pass --weights (the checkpoint "
                        f"{src['file']} with sha256 {src['sha256'][:12]}…)")
    if sha256_file(weights) != src["sha256"]:
        raise UserError(f"{weights} is not the checkpoint this bundle was made from (sha256 differs)")
    model, meta = load_checkpoint(weights)
    faces, labels = load_faces(data, bundle.preprocess["input_size"][0], meta["classes"], limit)
    ref = reference_logits(model, faces, meta["preprocess"])
    results = []
    for a in bundle.artifacts:
        art = artifact_logits(a.path, a.runtime, faces, bundle.preprocess, threads)
        r = compare_logits(ref, art, labels, a.precision)
        r.update({"artifact": a.file, "target": a.target, "precision": a.precision, "runtime": a.runtime})
        results.append(r)
    return {"bundle": str(bundle_path), "data": str(data), "images": int(len(faces)),
            "reference_accuracy": float(np.mean(ref.argmax(1) == labels)), "artifacts": results}


def cmd_parity(args: argparse.Namespace) -> int:
    from fer_edge.checkpoint import write_json_atomic
    from fer_edge.converters.parity import format_row

    if args.json and Path(args.json).exists() and not args.force:
        raise UserError(f"{args.json} exists; pass --force to overwrite it")
    rep = parity_bundle(args.bundle, args.data, args.weights, args.limit, args.threads)
    print(f"{rep['images']} faces from {args.data}; PyTorch reference accuracy "
          f"{100 * rep['reference_accuracy']:.2f}%")
    for r in rep["artifacts"]:
        print(format_row(r["artifact"], r))
    if args.json:
        write_json_atomic(args.json, rep, force=True)
    return 0 if all(r["passed"] for r in rep["artifacts"]) else 1


def add_parity_parser(sub) -> None:
    p = sub.add_parser("parity", help="compare every artifact of a bundle with the PyTorch model on labelled faces")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="labelled faces (class folders or FER2013 CSV)")
    p.add_argument("--weights", help="the source checkpoint (default: the path recorded in the bundle's manifest)")
    p.add_argument("--limit", type=int, help="use a seeded class-stratified subset of N faces")
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's)")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.set_defaults(func=cmd_parity)
