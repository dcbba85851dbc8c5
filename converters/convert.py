"""``fer-edge convert``, ``fer-edge parity`` and ``fer-edge benchmark``.

convert: checkpoint -> (merge) -> export one artifact -> parity against
PyTorch on labelled faces disjoint from the calibration faces -> a bundle
folder (optionally signed), built in a temp folder beside ``--out`` and
renamed into place only when complete, so a failure never leaves half a
bundle behind.  parity: the same check again on any labelled faces, and the
bundle re-marked passed or failed accordingly.
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
    PARITY_SIZE,
    PRECISIONS,
    TARGETS,
    THRESHOLDS,
    format_table,
    lookup,
    uses_calib_method,
)

NOISE_FACES = 64
STATISTIC = ("thresholds compared with a tolerance of 1e-9; int8 fails when |Δaccuracy| > accuracy_drop "
             "points and the exact two-sided McNemar test on the flips gives p < alpha: with lost/gained the "
             "faces only the reference / only the artifact classifies right, n = lost + gained, "
             "p = min(1, 2 * sum_{i<=min(lost,gained)} C(n, i) / 2^n)")


def _debug() -> bool:
    return os.environ.get("FER_EDGE_DEBUG") == "1"


def load_faces(path, size: int, classes: list[str], limit: int | None, seed: int = 0, what: str = "--data"):
    """(uint8 faces, labels as model class indices) from labelled class folders or a FER2013 CSV;
    with limit, a seeded subset taken round-robin over the classes."""
    from fer_edge.converters.facesets import balanced_pick, read_labelled

    faces, labels, _ = read_labelled(path, size, classes, what)
    if limit is not None and limit < len(faces):
        idx = balanced_pick(labels, len(classes), limit, seed)
        return faces[idx], labels[idx]
    return faces, labels


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _install_lines(fmt) -> list[str]:
    """The device install for this bundle's runtime.  fer-edge is not on PyPI:
    the install is from the user's fer-edge source folder (or a wheel built
    from it); FER_EDGE_KERNELS=0 skips the compiled kernels (no compiler), and
    as an environment variable it works with any pip."""
    extra = "runtime-tflite" if fmt.target == "android" else "runtime-onnx"
    lines = ["# ./fer-edge = your fer-edge source folder (fer-edge is not on PyPI); no compiler, no PyTorch",
             f'FER_EDGE_KERNELS=0 pip install "./fer-edge[{extra}]"']
    if fmt.target == "jetson":
        lines.insert(0, "python3 -m venv --system-site-packages ~/fer-venv && . ~/fer-venv/bin/activate"
                        "   # sees JetPack's tensorrt")
        lines.append('pip install "cuda-python>=12,<13"   # JetPack 6 (CUDA 12): TensorRT runs the engine through it')
    return lines


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
                  "```bash", *_install_lines(fmt),
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
    if fmt.target == "android":
        lines += ["To run it with fer-edge's Python pipeline instead (a Linux board or a desktop; no PyTorch):", "",
                  "```bash", *_install_lines(fmt), "fer-edge predict photo.jpg --bundle .", "```", ""]
    lines += ["## Check it against PyTorch on a desktop (needs the source checkpoint)", "", "```bash",
              "fer-edge parity --bundle . --data FACES_DIR   # accuracy and agreement with the PyTorch model",
              "```", ""]
    return "\n".join(lines)


def replaceable_bundle(out: Path) -> bool:
    """Whether --force may replace ``out``: an empty folder or a bundle (it has a
    manifest) -- never a file or a folder of other things."""
    from fer_edge.targets.bundle import MANIFEST

    return out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())


def remove_stale_temps(out: Path) -> None:
    """Temp folders of an earlier convert into ``out`` that never finished (killed):
    ``.NAME.tmp-*`` beside it, and ``.NAME.old-*`` from an interrupted swap."""
    if not out.parent.is_dir():
        return
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


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


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def load_signing_key(path):
    """The Ed25519 private key for --sign, or one line saying what is wrong."""
    from fer_edge.targets.bundle import BundleError
    from fer_edge.targets.signing import load_private_key

    try:
        return load_private_key(path)
    except (ValueError, BundleError) as exc:
        raise UserError(str(exc)) from None


def choose_faces(fmt, calib, parity_data, size: int, classes: list[str], calib_size: int,
                 parity_size: int | None, log=print):
    """(calibration faces or None, parity faces or None): the parity faces are
    class-stratified, at most parity_size of --parity-data (or of --calib), never
    a calibration face.  None, None: no labelled faces, parity runs on noise."""
    from fer_edge.converters.facesets import calibration_subset, face_digests, parity_subset, read_labelled

    calib_data = read_labelled(calib, size, classes, "--calib") if calib else None
    calib_sel = calibration_subset(calib, calib_data, classes, calib_size) if fmt.needs_calib else None
    if calib_sel is not None:
        log(f"calibration: {len(calib_sel)} faces from {calib}")
    if parity_data and not (calib and Path(parity_data).resolve() == Path(calib).resolve()):
        source, data = parity_data, read_labelled(parity_data, size, classes, "--parity-data")
    else:
        source, data = calib, calib_data
    if data is None:
        return calib_sel, None
    exclude = set(face_digests(calib_sel.faces)) if calib_sel is not None else set()
    check = parity_subset(source, data, classes, parity_size, exclude)
    if len(check) == 0:
        raise UserError(f"no faces left for the parity check: all of {source} was used for calibration; "
                        "give --parity-data DIR (labelled faces) or a smaller --calib-size")
    note = "" if parity_size is None or len(check) >= parity_size else \
        f" (all that is left; fewer than {parity_size}: a coarse check, --parity-data DIR gives more)"
    log(f"parity: {len(check)} faces from {source}, none of them a calibration face{note}")
    return calib_sel, check


def noise_faces(size) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (NOISE_FACES, *size), dtype=np.uint8)


def measure_parity(model, meta, artifact: Path, fmt, pre: dict, check, threads=None) -> dict:
    """The artifact against PyTorch on the check faces (or seeded noise when None)."""
    from fer_edge.converters.parity import artifact_logits, compare_logits, on_noise, reference_logits

    faces = noise_faces(tuple(pre["input_size"])) if check is None else check.faces
    ref = reference_logits(model, faces, meta["preprocess"])
    art = artifact_logits(artifact, fmt.runtime, faces, pre, threads)
    report = compare_logits(ref, art, None if check is None else check.labels, fmt.precision)
    if check is None:
        report = on_noise(report, fmt.precision)
    report.update({"artifact": fmt.file, "target": fmt.target, "precision": fmt.precision, "runtime": fmt.runtime})
    return report


def parity_document(reports: list[dict], data: dict) -> dict:
    """parity.json: what was compared on which faces, how it was judged, the verdicts."""
    return {"reference": "PyTorch, float32, CPU", "data": data, "statistic": STATISTIC,
            "thresholds": THRESHOLDS, "artifacts": reports}


def data_record(check) -> dict:
    if check is None:
        return {"noise": NOISE_FACES, "selection": f"{NOISE_FACES} seeded random images (no labelled faces): "
                                                   "logits only (fp32 also agreement)"}
    return check.describe()


def calibration_record(calib_sel, calib_method: str, fmt) -> dict | None:
    """How the int8 ranges were calibrated; the faces' pixel hashes let a later
    `fer-edge parity` leave them out."""
    from fer_edge.converters.facesets import face_digests

    if calib_sel is None:
        return None
    rec = calib_sel.describe()
    rec.pop("excluded_calibration_faces", None)
    rec["method"] = calib_method if uses_calib_method(fmt) else "litert-torch PT2E observers"
    rec["face_sha256"] = face_digests(calib_sel.faces)
    return rec


def build_manifest(fmt, meta, weights, folder: Path, pre: dict, status: str, calibration: dict | None,
                   dynamic_batch: bool) -> dict:
    from fer_edge.targets.bundle import FORMAT, FORMAT_VERSION, sha256_file

    h, w = pre["input_size"]
    nhwc = pre["layout"] == "NHWC"
    in_shape = [None if dynamic_batch else 1, *((h, w, 1) if nhwc else (1, h, w))]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fer_edge_version": __version__,
        "target": fmt.target, "precision": fmt.precision,
        "source_checkpoint": {"file": Path(weights).name, "path": str(Path(weights).resolve()),
                              "sha256": sha256_file(weights),
                              "arch": meta["arch"], "form": meta["form"], "config": meta["config"]},
        "artifacts": [{"file": fmt.file, "target": fmt.target, "precision": fmt.precision, "runtime": fmt.runtime,
                       "status": status,  # for people; devices read the verdict from parity.json
                       "input": {"name": "input", "shape": in_shape, "dtype": pre["input_dtype"],
                                 "layout": pre["layout"]},
                       "output": {"name": "logits", "shape": [in_shape[0], len(meta["classes"])]}}],
    }
    if calibration is not None:
        manifest["calibration"] = calibration
    manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(folder.iterdir()) if p.is_file()}
    return manifest


def _export(fmt, model, artifact: Path, spec) -> None:
    """Run the format's exporter; anything it raises becomes one line."""
    from fer_edge.converters.exporters import EXPORTERS

    try:
        EXPORTERS[fmt.exporter](model, artifact, spec)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001  (exporters raise anything; the user gets one line)
        if _debug():
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"export to {fmt.target} {fmt.precision} failed: {type(exc).__name__}: {msg} "
                        "(FER_EDGE_DEBUG=1 shows the traceback)") from None


def convert(weights, target: str, precision: str, out, *, calib=None, calib_size: int = 256, parity_data=None,
            parity_size: int | None = PARITY_SIZE, nhwc: bool = False, dynamic_batch: bool = False,
            force: bool = False, calib_method: str = CALIB_METHODS[0], int8_all_layers: bool = False,
            sign=None, progress: bool = False, log=print) -> dict:
    """Write a bundle; returns its parity report.  Raises UserError for anything the user can fix.
    sign: a private key file; the bundle then carries manifest.sig.  progress: stage
    lines and counters on stderr."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters.exporters import InputSpec
    from fer_edge.converters.parity import format_row
    from fer_edge.converters.progress import Progress
    from fer_edge.targets.bundle import MANIFEST, SIGNATURE, artifact_preprocess
    from fer_edge.targets.signing import signature_file

    fmt = lookup(target, precision)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    if out.exists() and not replaceable_bundle(out):
        raise UserError(f"{out} is not a fer-edge bundle (no {MANIFEST}); --force replaces bundles only: "
                        "choose another --out")
    remove_stale_temps(out)
    if fmt.needs_calib and not calib:
        raise UserError(f"{target} {precision} needs --calib DIR: labelled face images (class folders) "
                        "to calibrate the int8 ranges")
    if dynamic_batch and fmt.runtime == "tflite":
        raise UserError("--dynamic-batch applies to ONNX targets only (TFLite models have a fixed batch)")
    key = load_signing_key(sign) if sign else None  # before the long export: a bad key fails at once
    model, meta = load_checkpoint(weights)
    size = tuple(meta["preprocess"]["input_size"])
    calib_sel, check = choose_faces(fmt, calib, parity_data, size[0], meta["classes"], calib_size, parity_size, log)
    pre = artifact_preprocess(meta["preprocess"], nhwc)
    bar = Progress(progress)
    spec = InputSpec(size=size, in_chans=meta["config"].get("in_chans", 1), nhwc=nhwc,
                     dynamic_batch=dynamic_batch, preprocess=meta["preprocess"],
                     calib=None if calib_sel is None else calib_sel.faces,
                     calib_method=calib_method, int8_all_layers=int8_all_layers, progress=bar)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        artifact = tmp / fmt.file
        t0 = time.perf_counter()
        _export(fmt, model, artifact, spec)
        log(f"exported {fmt.file} in {time.perf_counter() - t0:.1f} s ({artifact.stat().st_size / 1e6:.2f} MB)")
        with bar.step(f"parity check on {NOISE_FACES if check is None else len(check)} faces"):
            report = measure_parity(model, meta, artifact, fmt, pre, check)
        log(format_row(fmt.file, report))
        status = "passed" if report["passed"] else "failed"

        _write_json(tmp / "labels.json", {"classes": meta["classes"]})
        _write_json(tmp / "preprocess.json", pre)
        _write_json(tmp / "parity.json", parity_document([report], data_record(check)))
        (tmp / "README.md").write_text(_readme(fmt, meta, fmt.file, pre))
        manifest = build_manifest(fmt, meta, weights, tmp, pre, status,
                                  calibration_record(calib_sel, calib_method, fmt), dynamic_batch)
        (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
        if key is not None:
            (tmp / SIGNATURE).write_bytes(signature_file(key, (tmp / MANIFEST).read_bytes()))
        for p in tmp.iterdir():  # mkdtemp is 0700: a bundle is meant to be copied and shared
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        _place_bundle(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
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
    if args.parity_size < 0:
        raise UserError("--parity-size must be 0 (every face) or more")
    if args.sign:
        load_signing_key(args.sign)  # a bad key is the one line, before any note about the weights
    from fer_edge.checkpoint import weights_or_default  # imports torch: not needed for --list

    report = convert(weights_or_default(args.weights), args.target, args.precision, args.out, calib=args.calib,
                     calib_size=args.calib_size, parity_data=args.parity_data,
                     parity_size=args.parity_size or None, nhwc=args.nhwc, dynamic_batch=args.dynamic_batch,
                     force=args.force, calib_method=args.calib_method or CALIB_METHODS[0],
                     int8_all_layers=args.int8_all_layers, sign=args.sign, progress=not args.no_progress)
    if not report["passed"]:
        print(f"fer-edge convert: {report['artifact']} FAILED parity ({'; '.join(report['failures'])}); "
              f"the bundle in {args.out} is marked failed and devices will refuse it", file=sys.stderr)
        return 1
    print(f"wrote {args.out}" + (" (signed)" if args.sign else ""))
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="merge, export and quantize a checkpoint into a device bundle",
                       description="Targets x precisions (fer-edge convert --list): " +
                                   ", ".join(f"{f.target}/{f.precision}" for f in FORMATS))
    p.add_argument("--weights", help="checkpoint (.safetensors, train or merged form; "
                   "default: the embedded default model)")
    p.add_argument("--target", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    p.add_argument("--calib", help="labelled faces (class folders) for int8 calibration; the parity check uses "
                   "its other faces unless --parity-data is given")
    p.add_argument("--calib-size", type=int, default=256, help="faces used from --calib (default 256)")
    p.add_argument("--parity-data", help="labelled faces for the parity check (default: --calib's faces that "
                   "were not used for calibration); calibration faces are always left out")
    p.add_argument("--parity-size", type=int, default=PARITY_SIZE,
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
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--list", action="store_true", help="print the table of targets and precisions")
    p.set_defaults(func=cmd_convert)


def _reference_checkpoint(bundle, weights):
    """The checkpoint the bundle was made from (its sha256 is in the manifest)."""
    from fer_edge.targets.bundle import sha256_file

    src = bundle.manifest.get("source_checkpoint") or {}
    if not src.get("sha256"):
        raise UserError(f"{bundle.path}: the manifest records no source checkpoint")
    weights = Path(weights) if weights else Path(src.get("path", src.get("file", "")))
    if not weights.is_file():
        raise UserError(f"the PyTorch reference {weights} is not there: pass --weights (the checkpoint "
                        f"{src.get('file')} with sha256 {src['sha256'][:12]}…)")
    if sha256_file(weights) != src["sha256"]:
        raise UserError(f"{weights} is not the checkpoint this bundle was made from (sha256 differs)")
    return weights


def open_for_parity(bundle_path, trust=None):
    from fer_edge.targets.bundle import BundleError, load_bundle

    try:
        return load_bundle(bundle_path, allow_failed=True, trust=trust)
    except BundleError as exc:
        raise UserError(str(exc)) from None


def parity_bundle(bundle_path, data, weights=None, limit=None, threads=None, bundle=None) -> dict:
    """Run the PyTorch reference and every artifact of a bundle on labelled faces,
    leaving out the faces the bundle was calibrated on.  Returns the report,
    whose "parity" is the new parity.json."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters.facesets import parity_subset, read_labelled
    from fer_edge.converters.parity import artifact_logits, compare_logits, reference_logits

    bundle = bundle or open_for_parity(bundle_path)
    model, meta = load_checkpoint(_reference_checkpoint(bundle, weights))
    calibration = bundle.manifest.get("calibration") or {}
    data_all = read_labelled(data, bundle.preprocess["input_size"][0], meta["classes"], "--data")
    check = parity_subset(data, data_all, meta["classes"], limit, set(calibration.get("face_sha256", [])))
    if len(check) == 0:
        raise UserError(f"--data {data}: every face was a calibration face of this bundle; give other faces")
    ref = reference_logits(model, check.faces, meta["preprocess"])
    results = []
    for a in bundle.artifacts:
        art = artifact_logits(a.path, a.runtime, check.faces, bundle.preprocess, threads)
        r = compare_logits(ref, art, check.labels, a.precision)
        r.update({"artifact": a.file, "target": a.target, "precision": a.precision, "runtime": a.runtime})
        results.append(r)
    doc = parity_document(results, check.describe())
    doc["reference_accuracy"] = float(np.mean(ref.argmax(1) == check.labels))
    return {"bundle": str(bundle_path), "data": check.describe(), "images": len(check),
            "reference_accuracy": doc["reference_accuracy"], "artifacts": results, "parity": doc}


def remark_bundle(bundle, parity_doc: dict, key=None) -> None:
    """Write the new parity.json and a manifest with its hash and the new
    statuses (and, with key, a new manifest.sig), each through a temp file
    renamed into place.  Written in that order, every state in between is
    refused by load_bundle (parity.json's hash, then the old signature, no
    longer match) rather than accepted with a stale verdict."""
    import copy
    import hashlib

    from fer_edge.checkpoint import write_atomic
    from fer_edge.targets.bundle import MANIFEST, SIGNATURE
    from fer_edge.targets.signing import signature_file

    parity_bytes = _json_bytes(parity_doc)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["files"]["parity.json"] = {"sha256": hashlib.sha256(parity_bytes).hexdigest(),
                                        "bytes": len(parity_bytes)}
    verdict = {r["artifact"]: r["passed"] for r in parity_doc["artifacts"]}
    for a in manifest["artifacts"]:
        a["status"] = "passed" if verdict[a["file"]] else "failed"
    manifest_bytes = _json_bytes(manifest)
    for name, data in (("parity.json", parity_bytes), (MANIFEST, manifest_bytes)) + \
            (((SIGNATURE, signature_file(key, manifest_bytes)),) if key is not None else ()):
        write_atomic(bundle.path / name, lambda tmp, data=data: Path(tmp).write_bytes(data), force=True)


def cmd_parity(args: argparse.Namespace) -> int:
    from fer_edge.checkpoint import write_json_atomic
    from fer_edge.converters.parity import format_row
    from fer_edge.targets.bundle import SIGNATURE

    if args.json and Path(args.json).exists() and not args.force:
        raise UserError(f"{args.json} exists; pass --force to overwrite it")
    if args.report_only and args.sign:
        raise UserError("--sign re-signs a re-marked bundle; --report-only leaves it untouched: give one")
    signed = (Path(args.bundle) / SIGNATURE).is_file()
    if signed and not (args.sign or args.report_only):
        raise UserError(f"{args.bundle} is signed: re-marking it changes manifest.json and would invalidate "
                        f"{SIGNATURE}; pass --sign KEY to re-sign it, or --report-only")
    key = load_signing_key(args.sign) if args.sign else None
    # Re-signing vouches for the whole bundle again: a signed one must first verify
    # with that same key, so a tampered, re-hashed bundle is never laundered here.
    bundle = open_for_parity(args.bundle, trust=key.public_key() if signed and key is not None else None)
    rep = parity_bundle(args.bundle, args.data, args.weights, args.limit or None, args.threads, bundle=bundle)
    d = rep["data"]
    print(f"{rep['images']} faces from {args.data} ({d['excluded_calibration_faces']} calibration faces left out); "
          f"PyTorch reference accuracy {100 * rep['reference_accuracy']:.2f}%")
    for r in rep["artifacts"]:
        print(format_row(r["artifact"], r))
    if not args.report_only:
        remark_bundle(bundle, rep["parity"], key)
        passed = all(r["passed"] for r in rep["artifacts"])
        print(f"re-marked {args.bundle}: {'passed' if passed else 'failed'}" + (" (re-signed)" if key else ""))
    if args.json:
        write_json_atomic(args.json, {k: v for k, v in rep.items() if k != "parity"}, force=True)
    return 0 if all(r["passed"] for r in rep["artifacts"]) else 1


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
    p.add_argument("--limit", type=int, help="use a seeded class-stratified subset of N faces")
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's)")
    p.add_argument("--report-only", action="store_true", help="report only; leave the bundle as it is")
    p.add_argument("--sign", metavar="KEY", help="re-sign the re-marked manifest (required for a signed bundle)")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.set_defaults(func=cmd_parity)
