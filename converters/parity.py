"""Parity: does the device artifact behave like the PyTorch model?

Pure comparisons on logits (numpy in, dict out) plus the two producers of
logits: the PyTorch reference and an artifact run by its own runtime (the
same ``fer_edge.targets`` backends the device uses, so what is checked here
is what runs there).
"""
from __future__ import annotations

import numpy as np

from fer_edge.converters.formats import NOISE_MAX_REL_LOGIT, THRESHOLDS


def compare_logits(ref: np.ndarray, art: np.ndarray, labels: np.ndarray | None, precision: str) -> dict:
    """Accuracy of each, Δaccuracy (points), top-1 agreement, max/mean |Δlogit|,
    and whether the precision's thresholds hold (with the reasons when not)."""
    ref, art = np.asarray(ref, np.float64), np.asarray(art, np.float64)
    diff = np.abs(ref - art)
    agree = float(np.mean(ref.argmax(1) == art.argmax(1)))
    out = {"images": int(len(ref)), "agreement": agree, "max_abs_logit_diff": float(diff.max()),
           "mean_abs_logit_diff": float(diff.mean()), "max_abs_logit": float(np.abs(ref).max())}
    if labels is not None:
        out["accuracy_reference"] = float(np.mean(ref.argmax(1) == labels))
        out["accuracy"] = float(np.mean(art.argmax(1) == labels))
        out["delta_accuracy_points"] = 100 * (out["accuracy"] - out["accuracy_reference"])
    t = THRESHOLDS[precision]
    failures = []
    if t["max_logit"] is not None and out["max_abs_logit_diff"] > t["max_logit"]:
        failures.append(f"max |Δlogit| {out['max_abs_logit_diff']:.2e} > {t['max_logit']:.0e}")
    if t["agreement"] is not None and agree < t["agreement"]:
        failures.append(f"agreement {100 * agree:.2f}% < {100 * t['agreement']:.1f}%")
    if t["accuracy_drop"] is not None and labels is not None \
            and abs(out["delta_accuracy_points"]) > t["accuracy_drop"]:
        failures.append(f"|Δaccuracy| {abs(out['delta_accuracy_points']):.2f} points > {t['accuracy_drop']}")
    out["thresholds"] = t
    out["passed"] = not failures
    out["failures"] = failures
    return out


def on_noise(report: dict, precision: str) -> dict:
    """A compare_logits report made on unlabelled noise: agreement is not a
    criterion there (except fp32's 100%, which any exact export meets), and
    fp16 is held to NOISE_MAX_REL_LOGIT instead.  Returns a new report."""
    out = dict(report)
    failures = list(report["failures"])
    if precision != "fp32":
        out["agreement_checked"] = False
        failures = [f for f in failures if not f.startswith("agreement")]
    limit = NOISE_MAX_REL_LOGIT.get(precision)
    if limit is not None:
        rel = report["max_abs_logit_diff"] / max(report["max_abs_logit"], 1e-12)
        out["max_rel_logit_diff"] = rel
        if rel > limit:
            failures.append(f"max |Δlogit| / max |logit| {rel:.2e} > {limit:.0e} (on noise)")
    out["failures"], out["passed"] = failures, not failures
    return out


def reference_logits(model, faces_u8: np.ndarray, preprocess: dict, batch: int = 256) -> np.ndarray:
    """The PyTorch model's float32 logits on CPU (the checkpoint as trained)."""
    import torch

    from fer_edge.evaluate import normalize

    out = []
    model = model.float().eval()
    with torch.no_grad():
        for s in range(0, len(faces_u8), batch):
            out.append(model(normalize(torch.from_numpy(faces_u8[s:s + batch]), preprocess)).numpy())
    return np.concatenate(out).astype(np.float32)


def artifact_logits(path, runtime: str, faces_u8: np.ndarray, preprocess: dict, threads: int | None = None,
                    backend=None) -> np.ndarray:
    """The artifact's logits (dequantized for int8) through its runtime."""
    from fer_edge.targets.backends import open_backend
    from fer_edge.targets.bundle import preprocess_faces

    backend = backend or open_backend(path, runtime, threads)
    return backend.run(preprocess_faces(faces_u8, preprocess))


def format_row(name: str, r: dict) -> str:
    acc = (f"acc {100 * r['accuracy']:6.2f}% (Δ {r['delta_accuracy_points']:+.2f})  "
           if "accuracy" in r else "")
    return (f"{name:<24} {'PASS' if r['passed'] else 'FAIL'}  {acc}agreement {100 * r['agreement']:6.2f}%  "
            f"max|Δlogit| {r['max_abs_logit_diff']:.2e}  mean {r['mean_abs_logit_diff']:.2e}"
            + ("" if r["passed"] else "  <- " + "; ".join(r["failures"])))
