"""Parity: does the device artifact behave like the PyTorch model?

Pure comparisons on logits (numpy in, dict out) plus the two producers of
logits: the PyTorch reference and an artifact run by its own runtime (the
same ``fer_edge.targets`` backends the device uses, so what is checked here
is what runs there).
"""
from __future__ import annotations

import math

import numpy as np

from fer_edge.converters.formats import MIN_PARITY_FACES, NOISE_MAX_REL_LOGIT, THRESHOLDS

# Without labelled faces, parity runs on this many seeded noise images.
NOISE_FACES = 64
STATISTIC = ("thresholds compared with a tolerance of 1e-9; int8 fails when |Δaccuracy| > accuracy_drop "
             "points and the exact two-sided McNemar test on the flips gives p < alpha: with lost/gained the "
             "faces only the reference / only the artifact classifies right, n = lost + gained, "
             "p = min(1, 2 * sum_{i<=min(lost,gained)} C(n, i) / 2^n)")

# Threshold comparisons allow this much: Δaccuracy is a difference of float
# means (3/300 - 0 came out as -1.0000000000000009 points, "failing" a 1.0 limit).
TOLERANCE = 1e-9


def statistical(thresholds: dict) -> bool:
    """Whether a gate judges top-1 agreement by statistics (fp16, int8), which
    need enough faces, rather than every face exactly (fp32: each logit within
    1e-4 on every face, strong evidence of the same function on any number)."""
    return thresholds.get("agreement") is not None and thresholds["agreement"] < 1.0


def too_few_faces(n: int, formats) -> str | None:
    """Why n distinct labelled faces cannot judge these formats (checked before the long work)."""
    if n < MIN_PARITY_FACES and any(statistical(f.thresholds) for f in formats):
        return (f"only {n} distinct labelled faces for the parity check; the {', '.join(f.precision for f in formats)} "
                f"gate needs at least {MIN_PARITY_FACES}")
    return None


def exceeds(value: float, limit: float, tol: float = TOLERANCE) -> bool:
    return value > limit + tol


def falls_short(value: float, limit: float, tol: float = TOLERANCE) -> bool:
    return value < limit - tol


def flips(ref_correct: np.ndarray, art_correct: np.ndarray) -> tuple[int, int]:
    """The discordant pairs of a paired comparison: (lost, gained) = faces the
    reference got right and the artifact wrong, and the reverse.  Faces both get
    right or both wrong say nothing about a change in accuracy."""
    ref_correct, art_correct = np.asarray(ref_correct, bool), np.asarray(art_correct, bool)
    return int(np.sum(ref_correct & ~art_correct)), int(np.sum(~ref_correct & art_correct))


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar test of "the artifact is as accurate as the reference".

    Under that null every discordant face is a fair coin, so with n = lost + gained
    and k = min(lost, gained):  p = min(1, 2 * sum_{i=0..k} C(n, i) / 2^n).
    Exact (integer) arithmetic: no normal approximation at small n."""
    n, k = lost + gained, min(lost, gained)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def delta_accuracy_ci(lost: int, gained: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Approximate 95% confidence interval of Δaccuracy (points) for paired data:
    Δ = (gained - lost) / n,  se = sqrt((lost + gained) / n - Δ²) / sqrt(n)."""
    if n == 0:
        return 0.0, 0.0
    d = (gained - lost) / n
    se = math.sqrt(max((lost + gained) / n - d * d, 0.0) / n)
    return 100 * (d - z * se), 100 * (d + z * se)


def agreement_upper_bound(agree: float, n: int, z: float = 1.645) -> float:
    """One-sided 95% upper confidence bound of the true top-1 agreement, from
    ``agree`` measured on n faces (Wilson score interval):

        (p + z²/2n + z * sqrt(p(1 - p)/n + z²/4n²)) / (1 + z²/n),  z = 1.645.

    The agreement gate fails when even this bound is under the threshold: on
    376 faces 13 disagreements (96.5%) are no evidence of a model under 97%,
    on 1,000 faces 40 (96.0%) are."""
    if n == 0:
        return 1.0
    p, zz = agree, z * z
    centre = p + zz / (2 * n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + zz / (4 * n * n))
    return min(1.0, (centre + half) / (1 + zz / n))


def agreement_failure(agree: float, n: int, limit: float | None) -> str | None:
    """The agreement gate.  An exact limit (1.0, float32) is held exactly; below
    1 the measured agreement must not be significantly under the limit."""
    if limit is None:
        return None
    if limit >= 1.0:
        return f"agreement {100 * agree:.2f}% < {100 * limit:.1f}%" if falls_short(agree, limit) else None
    upper = agreement_upper_bound(agree, n)
    if falls_short(upper, limit):
        return (f"agreement {100 * agree:.2f}% < {100 * limit:.1f}% (95% upper bound {100 * upper:.2f}% "
                f"on {n} faces)")
    return None


def accuracy_change(ref_pred: np.ndarray, art_pred: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracies, Δaccuracy (points), the flips and their paired statistics."""
    ref_ok, art_ok = ref_pred == labels, art_pred == labels
    lost, gained = flips(ref_ok, art_ok)
    lo, hi = delta_accuracy_ci(lost, gained, len(labels))
    return {"accuracy_reference": float(np.mean(ref_ok)), "accuracy": float(np.mean(art_ok)),
            "delta_accuracy_points": 100 * (gained - lost) / len(labels),
            "flips": {"lost": lost, "gained": gained}, "mcnemar_p": mcnemar_exact_p(lost, gained),
            "delta_accuracy_ci95_points": [lo, hi]}


def accuracy_failure(r: dict, t: dict) -> str | None:
    """The int8 accuracy gate: fails only when |Δaccuracy| is beyond the limit AND
    the change is real by the exact McNemar test (p < alpha).  A few flips on a
    few hundred faces move Δaccuracy by a point without meaning anything."""
    if t["accuracy_drop"] is None or "delta_accuracy_points" not in r:
        return None
    d = abs(r["delta_accuracy_points"])
    if exceeds(d, t["accuracy_drop"]) and r["mcnemar_p"] < t.get("alpha", 0.05):
        return (f"|Δaccuracy| {d:.2f} points > {t['accuracy_drop']} and significant "
                f"(McNemar p = {r['mcnemar_p']:.3g} < {t.get('alpha', 0.05)})")
    return None


def compare_logits(ref: np.ndarray, art: np.ndarray, labels: np.ndarray | None, thresholds: str | dict) -> dict:
    """Accuracy of each, Δaccuracy (points) with its paired statistics, top-1
    agreement, max/mean |Δlogit|, and whether the thresholds (a dict like
    THRESHOLDS' rows, or a precision naming one) hold, with the reasons when not."""
    ref, art = np.asarray(ref, np.float64), np.asarray(art, np.float64)
    diff = np.abs(ref - art)
    agree = float(np.mean(ref.argmax(1) == art.argmax(1)))
    out = {"images": int(len(ref)), "agreement": agree,
           "agreement_upper95": agreement_upper_bound(agree, len(ref)), "max_abs_logit_diff": float(diff.max()),
           "mean_abs_logit_diff": float(diff.mean()), "max_abs_logit": float(np.abs(ref).max())}
    if labels is not None:
        out.update(accuracy_change(ref.argmax(1), art.argmax(1), np.asarray(labels)))
    t = THRESHOLDS[thresholds] if isinstance(thresholds, str) else thresholds
    failures = []
    if not np.isfinite(art).all():   # NaN compares false with every limit, and argmax takes it as the top
        failures.append("the artifact's logits are not all finite (NaN or inf)")
    if labels is not None and statistical(t) and len(ref) < MIN_PARITY_FACES:
        failures.append(f"only {len(ref)} distinct labelled faces: a pass needs at least {MIN_PARITY_FACES}")
    if t["max_logit"] is not None and exceeds(out["max_abs_logit_diff"], t["max_logit"]):
        failures.append(f"max |Δlogit| {out['max_abs_logit_diff']:.2e} > {t['max_logit']:.0e}")
    agreement = agreement_failure(agree, len(ref), t["agreement"])
    if agreement:
        failures.append(agreement)
    acc = accuracy_failure(out, t)
    if acc:
        failures.append(acc)
    out["thresholds"] = dict(t, tolerance=TOLERANCE)
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
        if exceeds(rel, limit):
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
                    backend=None, content: bytes | None = None) -> np.ndarray:
    """The artifact's logits (dequantized for int8) through its runtime
    (content: its verified bytes, what the runtime then loads)."""
    from fer_edge.contract import preprocess_faces
    from fer_edge.targets.backends import open_backend

    backend = backend or open_backend(path, runtime, threads, content=content)
    return backend.run(preprocess_faces(faces_u8, preprocess))


def format_row(name: str, r: dict) -> str:
    acc = (f"acc {100 * r['accuracy']:6.2f}% (Δ {r['delta_accuracy_points']:+.2f}, "
           f"flips -{r['flips']['lost']}/+{r['flips']['gained']}, McNemar p {r['mcnemar_p']:.2f})  "
           if "accuracy" in r else "")
    return (f"{name:<24} {'PASS' if r['passed'] else 'FAIL'}  {acc}agreement {100 * r['agreement']:6.2f}%  "
            f"max|Δlogit| {r['max_abs_logit_diff']:.2e}  mean {r['mean_abs_logit_diff']:.2e}"
            + ("" if r["passed"] else "  <- " + "; ".join(r["failures"])))


def noise_faces(size) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (NOISE_FACES, *size), dtype=np.uint8)


def measure(model, meta: dict, artifact, fmt, pre: dict, check, threads=None) -> dict:
    """The artifact against PyTorch on the check faces (a FaceSelection), or on
    seeded noise when check is None; the report names the artifact."""
    faces = noise_faces(tuple(pre["input_size"])) if check is None else check.faces
    ref = reference_logits(model, faces, meta["preprocess"])
    art = artifact_logits(artifact, fmt.runtime, faces, pre, threads)
    report = compare_logits(ref, art, None if check is None else check.labels, fmt.thresholds)
    if check is None:
        report = on_noise(report, fmt.precision)
    report.update({"artifact": fmt.file, "target": fmt.target, "precision": fmt.precision, "runtime": fmt.runtime})
    return report


def data_record(check) -> dict:
    """parity.json's "data": which faces were compared."""
    if check is None:
        return {"noise": NOISE_FACES, "selection": f"{NOISE_FACES} seeded random images (no labelled faces): "
                                                   "logits only (fp32 also agreement)"}
    return check.describe()


def fewer_faces(old: dict | None, new: dict) -> str | None:
    """Whether a new parity.json would overturn a failure with a pass judged on
    fewer faces than the failure was (a pass on a handful of faces proves less
    than a failure on hundreds): the first such artifact in words, else None."""
    failed = {r.get("artifact"): r.get("images") for r in (old or {}).get("artifacts", [])
              if isinstance(r, dict) and r.get("passed") is False}
    for r in new["artifacts"]:
        n = failed.get(r["artifact"])
        if r["passed"] and isinstance(n, int) and r["images"] < n:
            return f"{r['artifact']} passed on {r['images']} faces, but failed its bundle's check on {n}"
    return None


def parity_document(reports: list[dict], data: dict) -> dict:
    """parity.json: what was compared on which faces, how it was judged, the verdicts."""
    return {"reference": "PyTorch, float32, CPU", "data": data, "statistic": STATISTIC,
            "thresholds": THRESHOLDS, "artifacts": reports}
