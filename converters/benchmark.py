"""``fer-edge benchmark``'s measurements and table: one row per artifact (and
the PyTorch baseline), each a single step; converters/pipeline.py runs them
for every target x precision.

Status, in words (the JSON is read by scripts and people alike): "passed"
(exported and passed parity), "failed parity" (exported, missed a threshold),
"export failed" or "runtime missing" (the reason is in the JSON).  Accuracy
and parity are measured on the --data faces that calibrated no int8
artifact.  Latency is the median of batch-1 calls through the artifact's own
runtime, with 1 thread and with all cores; the PyTorch rows (train form, and merged with the fused kernel)
are the baseline measured in the same run.
"""
from __future__ import annotations

import copy

import numpy as np


def torch_latency(model, preprocess, in_chans, threads: int, runs: int) -> float:
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


def reference_rows(model, meta: dict, ref_acc: float, runs: int, cores: int) -> list[dict]:
    """The PyTorch baseline: the checkpoint as trained, and merged with the fused kernel."""
    from fer_edge.reparam import merge

    in_chans = meta["config"].get("in_chans", 1)
    merged = model if meta["form"] == "merged" else merge(model, use_kernel=True)
    rows = []
    for name, m in (("pytorch train form", model), ("pytorch merged (fused kernel)", merged)):
        rows.append({"target": "pytorch", "precision": "fp32", "name": name, "status": "reference",
                     "size_mb": sum(p.numel() * p.element_size() for p in m.parameters()) / 1e6,
                     "accuracy": ref_acc, "delta_accuracy_points": 0.0, "agreement": 1.0,
                     "ms_1_thread": torch_latency(m, meta["preprocess"], in_chans, 1, runs),
                     f"ms_{cores}_threads": torch_latency(m, meta["preprocess"], in_chans, cores, runs)})
    return rows


def format_row(fmt) -> dict:
    return {"target": fmt.target, "precision": fmt.precision, "name": fmt.file, "runtime": fmt.runtime}


def artifact_row(fmt, bundle, ref: np.ndarray, faces: np.ndarray, labels: np.ndarray, runs: int,
                 cores: int) -> dict:
    """One converted bundle measured: parity against ``ref`` on ``faces``, size, latency."""
    from fer_edge.contract import preprocess_faces
    from fer_edge.converters.parity import compare_logits
    from fer_edge.targets.backends import BackendUnavailable, open_artifact

    row = format_row(fmt)
    art = bundle.artifacts[0]
    try:
        backend = open_artifact(art)
    except BackendUnavailable as exc:
        return dict(row, status="runtime missing", error=str(exc))
    x = preprocess_faces(faces, bundle.preprocess)
    r = compare_logits(ref, backend.run(x), labels, fmt.thresholds)
    one = open_artifact(art, threads=1)
    return dict(row, status="passed" if r["passed"] else "failed parity", size_mb=art.path.stat().st_size / 1e6,
                accuracy=r["accuracy"], delta_accuracy_points=r["delta_accuracy_points"],
                agreement=r["agreement"], max_abs_logit_diff=r["max_abs_logit_diff"],
                flips=r["flips"], mcnemar_p=r["mcnemar_p"], failures=r["failures"],
                ms_1_thread=one.latency_ms(x[:1], runs), **{f"ms_{cores}_threads": backend.latency_ms(x[:1], runs)})


def with_throughput(rows: list[dict], cores: int) -> list[dict]:
    return [dict(r, img_per_s=1000.0 / r[f"ms_{cores}_threads"]) if f"ms_{cores}_threads" in r else r
            for r in rows]


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
