"""The conversion pipelines: library steps chained, for the commands in
fer_edge/commands/ and for Python users.

    convert:   checkpoint -> faces -> export one artifact -> parity against PyTorch -> bundle
    parity:    bundle + checkpoint -> faces -> every artifact against PyTorch (the new parity.json)
    benchmark: every format converted, measured and timed, plus the PyTorch baseline

Each step is a function of its own module (exporters, parity, facesets,
bundles, benchmark); only this module chains them.  Every check a user can
fail is made before the long work (export, calibration) starts.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from fer_edge import UserError
from fer_edge.converters.calibration import CALIB_METHODS
from fer_edge.converters.formats import FORMATS, PARITY_SIZE, lookup


def check_request(fmt, calib, dynamic_batch: bool) -> None:
    """What the format needs that the request lacks (one line each)."""
    if fmt.needs_calib and not calib:
        raise UserError(f"{fmt.target} {fmt.precision} needs --calib DIR: labelled face images (class folders) "
                        "to calibrate the int8 ranges")
    if dynamic_batch and fmt.runtime != "onnxruntime":
        raise UserError("--dynamic-batch applies to ONNX targets only (TFLite models have a fixed batch)")


def convert(weights, target: str, precision: str, out, *, calib=None, calib_size: int = 256, parity_data=None,
            parity_size: int | None = PARITY_SIZE, nhwc: bool = False, dynamic_batch: bool = False,
            force: bool = False, calib_method: str = CALIB_METHODS[0], int8_all_layers: bool = False,
            sign=None, release: int | None = None, progress: bool = False, log=print) -> dict:
    """Write a bundle; returns its parity report.  Raises UserError for anything the user can fix.
    sign: a private key file; the bundle then carries manifest.sig.  release: a
    number recorded in the (signed) manifest, which devices can require a minimum
    of (predict --min-release).  progress: stage lines and counters on stderr."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.contract import artifact_preprocess
    from fer_edge.converters.bundles import check_out, load_signing_key, staging, write_bundle
    from fer_edge.converters.exporters import InputSpec, export
    from fer_edge.converters.facesets import calibration_record, choose_faces
    from fer_edge.converters.parity import data_record, format_row, measure, parity_document
    from fer_edge.converters.progress import Progress

    fmt = lookup(target, precision)
    out = check_out(out, force)
    check_request(fmt, calib, dynamic_batch)
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
    try:
        with staging(out, force) as stage:
            artifact = stage / fmt.file
            t0 = time.perf_counter()
            export(fmt, model, artifact, spec)
            log(f"exported {fmt.file} in {time.perf_counter() - t0:.1f} s "
                f"({artifact.stat().st_size / 1e6:.2f} MB)")
            with bar.step(f"parity check on {'noise' if check is None else f'{len(check)} faces'}"):
                report = measure(model, meta, artifact, fmt, pre, check)
            log(format_row(fmt.file, report))
            write_bundle(stage, fmt, meta, weights, pre, parity_document([report], data_record(check)),
                         calibration_record(calib_sel, calib_method, fmt), dynamic_batch, key, release)
    finally:
        bar.close()
    return report


def parity(bundle, data, weights=None, limit: int | None = None, threads: int | None = None,
           progress: bool = False) -> dict:
    """Run the PyTorch reference and every artifact of a bundle (a loaded Bundle)
    on labelled faces, leaving out the faces the bundle was calibrated on.
    Returns the report, whose "parity" is the new parity.json."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters.bundles import (bundle_formats, calibration_digests, check_matches_checkpoint,
                                             source_checkpoint)
    from fer_edge.converters.facesets import parity_subset, read_labelled
    from fer_edge.converters.parity import (artifact_logits, compare_logits, parity_document, reference_logits,
                                            too_few_faces)
    from fer_edge.converters.progress import Progress
    from fer_edge.targets.bundle import BundleError

    formats = bundle_formats(bundle)  # the thresholds each is judged by
    model, meta = load_checkpoint(source_checkpoint(bundle, weights))
    check_matches_checkpoint(bundle, meta)
    data_all = read_labelled(data, bundle.preprocess["input_size"][0], meta["classes"], "--data")
    check = parity_subset(data, data_all, meta["classes"], limit, calibration_digests(bundle))
    if len(check) == 0:
        raise UserError(f"--data {data}: every face was a calibration face of this bundle; give other faces")
    if check.excluded > len(data_all[0]) // 2:
        # The bundle names the faces to leave out: it must not get to pick most of the test.
        raise UserError(f"--data {data}: the bundle lists {check.excluded} of its {len(data_all[0])} faces as "
                        "calibration faces; check it on faces it was not calibrated on")
    few = too_few_faces(len(check), formats)
    if few:
        raise UserError(f"--data {data}: {few} (give more faces, or a larger --limit)")
    bar = Progress(progress, prefix="parity")
    results = []
    try:
        with bar.step(f"PyTorch reference on {len(check)} faces"):
            ref = reference_logits(model, check.faces, meta["preprocess"])
        for a, fmt in zip(bundle.artifacts, formats):
            with bar.step(f"{a.file} in {a.runtime}"):
                try:
                    art = artifact_logits(a.path, a.runtime, check.faces, bundle.preprocess, threads,
                                          content=a.content)
                except BundleError as exc:
                    raise UserError(f"{a.path}: {exc}" if a.file not in str(exc) else str(exc)) from None
            r = compare_logits(ref, art, check.labels, fmt.thresholds)
            r.update({"artifact": a.file, "target": a.target, "precision": a.precision, "runtime": a.runtime})
            results.append(r)
    finally:
        bar.close()
    doc = parity_document(results, check.describe())
    doc["reference_accuracy"] = float(np.mean(ref.argmax(1) == check.labels))
    return {"bundle": str(bundle.path), "data": check.describe(), "images": len(check),
            "reference_accuracy": doc["reference_accuracy"], "artifacts": results, "parity": doc}


def benchmark(weights, data, calib=None, limit: int | None = None, calib_size: int = 256, runs: int = 200,
              formats=None, progress: bool = False) -> dict:
    """Every format (or those of ``formats``, "target/precision" keys) converted,
    checked and timed on the --data faces no int8 artifact was calibrated on."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters import benchmark as B
    from fer_edge.converters.facesets import calibration_subset, face_digests, parity_subset, read_labelled
    from fer_edge.converters.parity import reference_logits
    from fer_edge.converters.progress import Progress
    from fer_edge.targets.bundle import load_bundle

    if runs < 1:
        raise UserError("--runs must be at least 1")
    model, meta = load_checkpoint(weights)
    size, classes = meta["preprocess"]["input_size"][0], meta["classes"]
    chosen = [f for f in FORMATS if not formats or f.key in formats]
    data_all = read_labelled(data, size, classes, "--data")
    exclude = set()
    if any(f.precision == "int8" for f in chosen):
        calib_all = read_labelled(calib, size, classes, "--calib") if calib else data_all
        # The faces every int8 conversion below calibrates on (same selection as convert's) stay out of the rows.
        exclude = set(face_digests(calibration_subset(calib or data, calib_all, classes, calib_size).faces))
    check = parity_subset(data, data_all, classes, limit, exclude)
    if len(check) == 0:
        raise UserError(f"no faces of {data} are left to score: all were used to calibrate the int8 formats; "
                        "give --calib DIR (other labelled faces) or a smaller --calib-size")
    ref = reference_logits(model, check.faces, meta["preprocess"])
    ref_acc = float(np.mean(ref.argmax(1) == check.labels))
    cores = os.cpu_count() or 1
    bar = Progress(progress, prefix="benchmark")
    try:
        with bar.step("PyTorch baseline"):
            rows = B.reference_rows(model, meta, ref_acc, runs, cores)
        with tempfile.TemporaryDirectory(prefix="fer-edge-bench-") as tmp:
            for fmt in chosen:
                out = Path(tmp) / f"{fmt.target}-{fmt.precision}"
                with bar.step(fmt.key):
                    try:
                        convert(weights, fmt.target, fmt.precision, out, calib=calib or data, calib_size=calib_size,
                                parity_data=data, log=lambda *_: None)
                    except Exception as exc:  # noqa: BLE001  (a failed export is a row, not a crash)
                        rows.append(dict(B.format_row(fmt), status="export failed",
                                         error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                        continue
                    rows.append(B.artifact_row(fmt, load_bundle(out, allow_failed=True), ref, check.faces,
                                               check.labels, runs, cores))
                bar.say(B.format_line(rows[-1], cores))
    finally:
        bar.close()
    return {"weights": str(weights), "data": str(data), "images": int(len(check)), "cores": cores,
            "excluded_calibration_faces": check.excluded, "reference_accuracy": ref_acc,
            "rows": B.with_throughput(rows, cores)}
