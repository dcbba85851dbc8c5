"""Classification metrics as small pure numpy functions (no sklearn needed on a device).

Conventions: confusion matrix rows = true class, columns = predicted class;
mean-class accuracy = mean recall over the classes present in the data.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (recall per true class); empty rows stay 0."""
    support = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)


def precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(cm).astype(np.float64)
    pred, true = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def mean_class_accuracy(cm: np.ndarray) -> float:
    true = cm.sum(axis=1)
    present = true > 0
    return float(np.mean(np.diag(cm)[present] / true[present])) if present.any() else 0.0


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of a one-vs-rest score, one point per distinct threshold, from (0,0) to (1,1)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    # Keep the last index of each run of equal scores: ties move together.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(p)[last].astype(np.float64)
    fp = np.cumsum(~p)[last].astype(np.float64)
    n_pos, n_neg = p.sum(), (~p).sum()
    tpr = np.r_[0.0, tp / n_pos] if n_pos else np.r_[0.0, np.zeros_like(tp)]
    fpr = np.r_[0.0, fp / n_neg] if n_neg else np.r_[0.0, np.zeros_like(fp)]
    return fpr, tpr


def auc(fpr, tpr) -> float:
    """Area under a curve by the trapezoid rule."""
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def summarize(y_true, probs, classes: list[str]) -> dict:
    """Everything ``fer-edge eval`` reports, from labels and class probabilities (N, K)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    k = len(classes)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    precision, recall, f1 = precision_recall_f1(cm)
    per_class, rocs = {}, {}
    for i, name in enumerate(classes):
        positive = y_true == i
        entry = {"support": int(positive.sum()), "precision": float(precision[i]),
                 "recall": float(recall[i]), "f1": float(f1[i]), "auc": None}
        if 0 < positive.sum() < len(y_true):  # AUC is undefined with one class only
            fpr, tpr = roc_curve(probs[:, i], positive)
            entry["auc"] = auc(fpr, tpr)
            rocs[name] = (fpr, tpr)
        per_class[name] = entry
    aucs = [e["auc"] for e in per_class.values() if e["auc"] is not None]
    return {
        "images": int(len(y_true)),
        "accuracy": accuracy(cm),
        "mean_class_accuracy": mean_class_accuracy(cm),
        "macro_f1": float(np.mean([f1[i] for i in range(k) if cm[i].sum() > 0])) if len(y_true) else 0.0,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": normalize_rows(cm).round(6).tolist(),
        "_roc": rocs,  # curves for the plots; dropped from JSON
    }


# ------------------------------------------------------------------ calibration
def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability_bins(probs, y_true, bins: int = 15) -> dict:
    """Top-label reliability: the predicted class's probability (confidence) in
    equal-width bins over (0, 1]; per bin the count, mean confidence and
    accuracy (empty bins: count 0, the others NaN)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 (impossible for a softmax) goes to bin 0.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def expected_calibration_error(probs, y_true, bins: int = 15) -> float:
    """Top-label ECE (Guo et al., 2017): sum over equal-width confidence bins of
    (fraction of samples in the bin) * |accuracy - mean confidence|."""
    r = reliability_bins(probs, y_true, bins)
    n = r["count"].sum()
    used = r["count"] > 0
    if n == 0:
        return 0.0
    return float(np.sum(r["count"][used] / n * np.abs(r["accuracy"][used] - r["confidence"][used])))


def nll(logits, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(z)), np.asarray(y_true, dtype=np.int64)].mean())


def fit_temperature(logits, y_true, lo: float = 0.05, hi: float = 20.0, tol: float = 1e-4) -> float:
    """The T minimizing nll(logits / T): golden-section search on beta = 1/T, where
    the NLL is convex (a log-sum-exp of linear functions of beta minus a linear
    term), so the 1-D search finds the global minimum within [1/hi, 1/lo]."""
    if len(logits) == 0:
        return 1.0
    g = (np.sqrt(5.0) - 1) / 2
    a, b = 1.0 / hi, 1.0 / lo
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, y_true, 1 / c), nll(logits, y_true, 1 / d)
    while b - a > tol * max(1.0, a):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, y_true, 1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, y_true, 1 / d)
    return float(1.0 / ((a + b) / 2))


def vector_scale(logits, scale, shift) -> np.ndarray:
    """Vector scaling's logits: each class's logit times its own scale plus its own shift."""
    return np.asarray(logits, dtype=np.float64) * np.asarray(scale, dtype=np.float64) + np.asarray(shift, dtype=np.float64)


def fit_vector_scaling(logits, y_true, ridge: float = 1e-4, steps: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (scale, shift) minimizing nll(vector_scale(logits, scale, shift))
    (Guo et al., 2017): 2K numbers where temperature scaling has one, so it can
    fix a model over-confident in some classes and not in others; it may change
    a few predictions.  The NLL is convex in (scale, shift) (the logits are
    linear in them), so damped Newton steps find its minimum; the small ridge
    pulls towards (1/T, 0) and fixes the shifts' common offset, which softmax
    ignores.  ValueError for logits that are not finite; logits so large that a
    Newton step cannot be taken (float64 overflow, a singular Hessian) end
    the steps where they are."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    n, k = z.shape
    if not np.isfinite(z).all():
        raise ValueError("logits are not finite")
    if n == 0:
        return np.ones(k), np.zeros(k)
    prior = np.r_[np.full(k, 1.0 / fit_temperature(z, y)), np.zeros(k)]
    onehot = np.eye(k)[y]

    def loss(theta):
        zz = vector_scale(z, theta[:k], theta[k:])
        zz = zz - zz.max(axis=1, keepdims=True)
        lse = np.log(np.exp(zz).sum(axis=1))
        return float((lse - zz[np.arange(n), y]).mean() + ridge * np.sum((theta - prior) ** 2))

    theta = prior.copy()
    with np.errstate(all="ignore"):
        current = loss(theta)
    for _ in range(steps):
        with np.errstate(all="ignore"):
            p = softmax(vector_scale(z, theta[:k], theta[k:]))
            r = p - onehot                                        # dNLL/dlogit, per face
            grad = np.r_[(r * z).mean(axis=0), r.mean(axis=0)] + 2 * ridge * (theta - prior)
            # Hessian of the mean NLL in the scaled logits, diag(p) - p p^T, carried to
            # (scale, shift) by the Jacobian [diag(z), I].
            jac = np.concatenate([z[:, :, None] * np.eye(k), np.broadcast_to(np.eye(k), (n, k, k))], axis=2)
            h = np.einsum("nai,nab,nbj->ij", jac, p[:, :, None] * np.eye(k) - p[:, :, None] * p[:, None, :],
                          jac) / n
        if not (np.isfinite(current) and np.isfinite(grad).all() and np.isfinite(h).all()):
            break
        try:
            step = np.linalg.solve(h + 2 * ridge * np.eye(2 * k), grad)
        except np.linalg.LinAlgError:
            break
        if not np.isfinite(step).all():
            break
        t = 1.0
        # "not <=" so that a NaN loss (overflow) is a failed try, never a step taken.
        with np.errstate(all="ignore"):
            while t > 1e-4 and not loss(theta - t * step) <= current - 1e-4 * t * grad @ step:
                t /= 2
        if t <= 1e-4:
            break
        theta = theta - t * step
        with np.errstate(all="ignore"):
            new = loss(theta)
        if current - new < 1e-10:
            current = new
            break
        current = new
    return theta[:k], theta[k:]


# How a calibrator is fitted on held-out logits and applied to others:
# name -> (fit(logits, y) -> params, apply(logits, params) -> probabilities).
CALIBRATORS = {
    "temperature": (fit_temperature, lambda logits, t: softmax(logits, t)),
    "vector": (fit_vector_scaling, lambda logits, st: softmax(vector_scale(logits, *st))),
}


def cross_fitted_probs(logits, y_true, seed: int = 0, method: str = "temperature") -> tuple[np.ndarray, list]:
    """Calibrated probabilities without scoring a face with a calibrator fitted on
    it: the data is split in two seeded halves; the calibrator (``CALIBRATORS``)
    fitted on each half scales the other.  Returns (probs, [params of half 1,
    params of half 2]): for temperature scaling, the two temperatures."""
    fit, apply = CALIBRATORS[method]
    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y_true))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    probs = np.zeros_like(logits)
    params = []
    for fit_on, score_on in (halves, halves[::-1]):
        fitted = fit(logits[fit_on], y_true[fit_on])
        params.append(fitted)
        probs[score_on] = apply(logits[score_on], fitted)
    return probs, params


def cross_fitted_ece(logits, y_true, bins: int = 15, seed: int = 0) -> dict:
    """ECE of all faces, each scaled by the T of the other half (cross_fitted_probs)."""
    probs, temps = cross_fitted_probs(logits, y_true, seed)
    return {"ece": expected_calibration_error(probs, y_true, bins), "temperatures": temps}
