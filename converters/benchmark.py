"""``fer-edge benchmark``: every target x precision runnable here, converted,
checked for parity and timed, in one table (and JSON).

Status, in words (the JSON is read by scripts and people alike): "passed"
(exported and passed parity), "failed parity" (exported, missed a threshold),
"export failed" or "runtime missing" (the reason is in the JSON).  Accuracy
and parity are measured on the --data faces that calibrated no int8
artifact.  Latency is the median of batch-1 calls through the artifact's own
runtime, with 1 thread and with all cores; the PyTorch rows (train form, and merged with the fused kernel)
are the baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import numpy as np

from fer_edge import UserError


def _torch_latency(model, preprocess, in_chans, threads: int, runs: int) -> float:
    import torch

    from fer_edge.evaluate import measure_latency

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # channels_last, as fer-edge eval and predict run: the faster layout here too
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return measure_latency(model, preprocess, in_chans, "cpu", runs=runs, channels_last=True)["median_ms"]
    finally:
        torch.set_num_threads(old)


def run_benchmark(weights, data, calib=None, limit=None, calib_size=256, runs=200, formats=None, log=print) -> dict:
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.converters.convert import convert
    from fer_edge.converters.facesets import calibration_subset, face_digests, parity_subset, read_labelled
    from fer_edge.converters.formats import FORMATS
    from fer_edge.converters.parity import artifact_logits, compare_logits, reference_logits
    from fer_edge.reparam import merge
    from fer_edge.targets.backends import BackendUnavailable, open_backend
    from fer_edge.targets.bundle import load_bundle

    model, meta = load_checkpoint(weights)
    size, classes = meta["preprocess"]["input_size"][0], meta["classes"]
    data_all = read_labelled(data, size, classes, "--data")
    calib_all = read_labelled(calib, size, classes, "--calib") if calib else data_all
    # The faces every int8 conversion below calibrates on (same selection as convert's) stay out of the rows.
    exclude = set(face_digests(calibration_subset(calib or data, calib_all, classes, calib_size).faces))
    check = parity_subset(data, data_all, classes, limit, exclude)
    faces, labels = check.faces, check.labels
    log(f"{len(faces)} faces from {data}")
    ref = reference_logits(model, faces, meta["preprocess"])
    ref_acc = float(np.mean(ref.argmax(1) == labels))
    cores = os.cpu_count() or 1
    in_chans = meta["config"].get("in_chans", 1)
    rows = []
    merged = model if meta["form"] == "merged" else merge(model, use_kernel=True)
    for name, m in (("pytorch train form", model), ("pytorch merged (fused kernel)", merged)):
        rows.append({"target": "pytorch", "precision": "fp32", "name": name, "status": "reference",
                     "size_mb": sum(p.numel() * p.element_size() for p in m.parameters()) / 1e6,
                     "accuracy": ref_acc, "delta_accuracy_points": 0.0, "agreement": 1.0,
                     "ms_1_thread": _torch_latency(m, meta["preprocess"], in_chans, 1, runs),
                     f"ms_{cores}_threads": _torch_latency(m, meta["preprocess"], in_chans, cores, runs)})
    with tempfile.TemporaryDirectory(prefix="fer-edge-bench-") as tmp:
        for fmt in FORMATS:
            if formats and f"{fmt.target}/{fmt.precision}" not in formats:
                continue
            row = {"target": fmt.target, "precision": fmt.precision, "name": fmt.file, "runtime": fmt.runtime}
            out = Path(tmp) / f"{fmt.target}-{fmt.precision}"
            try:
                convert(weights, fmt.target, fmt.precision, out, calib=calib or data, calib_size=calib_size,
                        parity_data=data, log=lambda *_: None)
            except (UserError, Exception) as exc:  # noqa: BLE001  (a failed export is a row, not a crash)
                row.update(status="export failed",
                           error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                rows.append(row)
                log(f"{fmt.target}/{fmt.precision}: export failed: {row['error']}")
                continue
            bundle = load_bundle(out, allow_failed=True)
            art = bundle.artifacts[0]
            try:
                backend = open_backend(art.path, art.runtime)
            except BackendUnavailable as exc:
                row.update(status="runtime missing", error=str(exc))
                rows.append(row)
                continue
            logits = artifact_logits(art.path, art.runtime, faces, bundle.preprocess, backend=backend)
            r = compare_logits(ref, logits, labels, fmt.precision)
            sample = np.zeros((1, *bundle.manifest["artifacts"][0]["input"]["shape"][1:]),
                              dtype=np.uint8 if bundle.preprocess["input_dtype"] == "uint8" else np.float32)
            one = open_backend(art.path, art.runtime, threads=1)
            row.update(status="passed" if r["passed"] else "failed parity",
                       size_mb=art.path.stat().st_size / 1e6,
                       accuracy=r["accuracy"], delta_accuracy_points=r["delta_accuracy_points"],
                       agreement=r["agreement"], max_abs_logit_diff=r["max_abs_logit_diff"],
                       flips=r["flips"], mcnemar_p=r["mcnemar_p"],
                       failures=r["failures"], ms_1_thread=one.latency_ms(sample, runs),
                       **{f"ms_{cores}_threads": backend.latency_ms(sample, runs)})
            rows.append(row)
            log(format_line(row, cores))
    for row in rows:
        if f"ms_{cores}_threads" in row:
            row["img_per_s"] = 1000.0 / row[f"ms_{cores}_threads"]
    return {"weights": str(weights), "data": str(data), "images": int(len(faces)), "cores": cores,
            "excluded_calibration_faces": check.excluded,
            "reference_accuracy": ref_acc, "rows": rows}


def format_line(r: dict, cores: int) -> str:
    if "ms_1_thread" not in r:
        return f"{r['status']:<15} {r['target'] + '/' + r['precision']:<14} {r['name']:<30} {r.get('error', '')}"
    return (f"{r['status']:<15} {r['target'] + '/' + r['precision']:<14} {r['name']:<30} {r['size_mb']:7.2f} "
            f"{100 * r['accuracy']:7.2f} {r['delta_accuracy_points']:+6.2f} {100 * r['agreement']:7.2f} "
            f"{r['ms_1_thread']:8.3f} {r[f'ms_{cores}_threads']:8.3f} {1000 / r[f'ms_{cores}_threads']:8.0f}")


def format_table(rep: dict) -> str:
    c = rep["cores"]
    head = (f"{'status':<15} {'target':<14} {'artifact':<30} {'MB':>7} {'acc%':>7} {'Δacc':>6} {'agree%':>7} "
            f"{'ms 1thr':>8} {'ms ' + str(c) + 'thr':>8} {'img/s':>8}")
    return "\n".join([head, "-" * len(head)] + [format_line(r, c) for r in rep["rows"]])


def cmd_benchmark(args: argparse.Namespace) -> int:
    from fer_edge.checkpoint import weights_or_default, write_json_atomic

    if args.json and Path(args.json).exists() and not args.force:
        raise UserError(f"{args.json} exists; pass --force to overwrite it")
    formats = set(args.formats.split(",")) if args.formats else None
    rep = run_benchmark(weights_or_default(args.weights), args.data, calib=args.calib, limit=args.limit,
                        calib_size=args.calib_size, runs=args.runs, formats=formats, log=lambda m: None)
    print(format_table(rep))
    print(f"{rep['images']} faces from {args.data} ({rep['excluded_calibration_faces']} calibration faces left "
          "out); latency = median of batch-1 calls")
    if args.json:
        write_json_atomic(args.json, rep, force=True)
    return 0


def add_benchmark_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="convert to every target x precision, check parity, time each",
                       description="Convert a checkpoint to every target and precision in one run, measure "
                       "each artifact's accuracy and agreement with PyTorch on labelled faces, its size and its "
                       "batch-1 latency on one thread and on all cores, and print one table.")
    p.add_argument("--weights", help="checkpoint (default: the embedded default model)")
    p.add_argument("--data", required=True, help="labelled faces for accuracy and parity")
    p.add_argument("--calib", help="calibration faces for int8 (default: --data)")
    p.add_argument("--calib-size", type=int, default=256, help="faces used from --calib for int8 (default 256)")
    p.add_argument("--limit", type=int, help="use a seeded class-stratified subset of N faces of --data")
    p.add_argument("--formats", help="comma list like onnx/fp32,android/int8 (default: all)")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per measurement")
    p.add_argument("--json", help="write the table as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --json")
    p.set_defaults(func=cmd_benchmark)
