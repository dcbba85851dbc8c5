"""Evaluate a checkpoint on labelled faces: metrics, calibration (ECE before and
after temperature scaling), optional ten-crop TTA, latency, and the JSON/PNG
outputs of ``fer-edge eval``; fitting and storing a checkpoint's softmax
temperature (``fer-edge calibrate``, and after training)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fer_edge import UserError
from fer_edge.contract import affine


def normalize(images_u8: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float: pixel * a - b, the checkpoint's
    preprocess as one multiply-add (fer_edge.contract.affine)."""
    a, b = affine(preprocess)
    return images_u8.unsqueeze(1).float() * a - b


def ten_crop_views(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """(10, N, C, H, W): the image shifted by +-pad pixels to the four corners
    and centred, each with its mirror image.  The input is zero-padded (the
    mean after normalization) so each view keeps the model's input size, which
    matches the pad-and-crop training augmentation of the ``best`` recipe."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    offsets = [(0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad), (pad, pad)]
    crops = [xp[:, :, i:i + h, j:j + w] for i, j in offsets]
    return torch.stack(crops + [v.flip(3) for v in crops])


@torch.no_grad()
def predict_probs(model, images_u8: np.ndarray, preprocess: dict, device="cpu", batch_size: int = 256,
                  tta: bool = False, channels_last: bool = False, progress: bool = False) -> np.ndarray:
    """Softmax probabilities (N, K); with tta the mean over the ten views."""
    model.eval()
    out = []
    starts = range(0, len(images_u8), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval" + (" (ten-crop)" if tta else ""), unit="batch", leave=False)
    for s in starts:
        x = normalize(torch.from_numpy(images_u8[s:s + batch_size]).to(device), preprocess)
        views = ten_crop_views(x) if tta else x.unsqueeze(0)
        p = 0
        for v in views:
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            p = p + torch.softmax(model(v).float(), dim=1)
        out.append((p / len(views)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_logits(model, images_u8: np.ndarray, preprocess: dict, device="cpu", batch_size: int = 256,
                   channels_last: bool = False, progress: bool = False) -> np.ndarray:
    """Raw logits (N, K), float32 (what temperature scaling divides)."""
    model.eval()
    out = []
    starts = range(0, len(images_u8), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False)
    for s in starts:
        x = normalize(torch.from_numpy(images_u8[s:s + batch_size]).to(device), preprocess)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def measure_latency(model, preprocess: dict, in_chans: int = 1, device="cpu", runs: int = 50,
                    warmup: int = 10, channels_last: bool = False) -> dict:
    """Median and mean ms per image at batch 1 (the on-device case)."""
    h, w = preprocess["input_size"]
    x = torch.zeros(1, in_chans, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"batch": 1, "median_ms": float(np.median(times)), "mean_ms": float(np.mean(times)),
            "threads": torch.get_num_threads(), "device": str(device)}


def remap_labels(dataset, classes: list[str]):
    """The dataset's labels as indices into the model's classes; a class the model
    does not know is an error (accuracy on it would be silently 0)."""
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise UserError(f"data has class(es) {', '.join(unknown)} that the model was not trained on "
                        f"(model classes: {', '.join(classes)})")
    lut = np.array([classes.index(c) for c in dataset.classes], dtype=np.int64)
    return lut[dataset.labels]


def evaluate(model, meta: dict, dataset, device="cpu", batch_size: int = 256, tta: bool = False,
             latency: bool = True, progress: bool = False) -> dict:
    """The full report: plain metrics, and with tta the ten-crop ones separately.
    The model is switched to channels_last in place (Module.to), the layout it
    runs fastest in."""
    from fer_edge.metrics import summarize

    classes = meta["classes"]
    labels = remap_labels(dataset, classes)
    # channels_last is the faster layout for these networks on the CPU too (oneDNN and
    # the fused kernel: 1.1-1.5x measured on the 2-core CI machine), as it is on CUDA.
    model = model.to(memory_format=torch.channels_last)
    logits = predict_logits(model, dataset.images, meta["preprocess"], device, batch_size,
                            channels_last=True, progress=progress)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    report = {"classes": classes, "arch": meta["arch"], "form": meta["form"], **summarize(labels, probs, classes)}
    report["calibration"], report["_reliability"] = calibration_report(
        logits, labels, meta["preprocess"].get("temperature"))
    if tta:
        probs_tta = predict_probs(model, dataset.images, meta["preprocess"], device, batch_size, tta=True,
                                  channels_last=True, progress=progress)
        t = summarize(labels, probs_tta, classes)
        report["tta"] = {"kind": "ten-crop (4 px shifts x mirror)", "accuracy": t["accuracy"],
                         "mean_class_accuracy": t["mean_class_accuracy"], "macro_f1": t["macro_f1"],
                         "macro_auc": t["macro_auc"]}
    if latency:
        report["latency"] = measure_latency(model, meta["preprocess"], meta["config"].get("in_chans", 1), device,
                                            channels_last=True)
    return report


def write_report(report: dict, json_path=None, plots_dir=None, metrics_jsonl=None, force: bool = True) -> list[Path]:
    """JSON (without the raw ROC points) and PNGs; returns the files written."""
    from fer_edge import plots
    from fer_edge.fileio import write_json_atomic

    written = []
    if json_path:
        clean = {k: v for k, v in report.items() if not k.startswith("_")}
        json_path = Path(json_path)
        write_json_atomic(json_path, clean, force=force)
        written.append(json_path)
    if plots_dir:
        d = Path(plots_dir)
        d.mkdir(parents=True, exist_ok=True)
        written.append(plots.plot_confusion(np.array(report["confusion_matrix"]), report["classes"],
                                            d / "confusion.png",
                                            f"{report['arch']}: accuracy {100 * report['accuracy']:.2f}%"))
        if report["_roc"]:
            aucs = {k: v["auc"] for k, v in report["per_class"].items()}
            written.append(plots.plot_roc(report["_roc"], aucs, d / "roc.png",
                                          f"{report['arch']}: one-vs-rest ROC, macro AUC {report['macro_auc']:.3f}"))
        if report.get("_reliability"):
            written.append(plot_reliability(report["_reliability"], d / "reliability.png",
                                            f"{report['arch']}: reliability (top label, "
                                            f"{report['calibration']['bins']} bins)"))
        if metrics_jsonl and Path(metrics_jsonl).is_file():
            written.append(plots.plot_training_curves(metrics_jsonl, d / "training_curves.png"))
    return written


def format_report(report: dict) -> str:
    lines = [f"{report['images']} images, {report['arch']} ({report['form']} form)",
             f"accuracy            {100 * report['accuracy']:6.2f}%",
             f"mean-class accuracy {100 * report['mean_class_accuracy']:6.2f}%",
             f"macro F1 {report['macro_f1']:.4f}" + (f", macro AUC {report['macro_auc']:.4f}"
                                                      if report["macro_auc"] is not None else "")]
    if "calibration" in report:
        c = report["calibration"]
        text = f"calibration error (ECE, {c['bins']} bins, top label): {100 * c['ece']:.2f}% of the softmax as stored"
        if c["temperature"] is not None:
            text += f", {100 * c['ece_scaled']:.2f}% with the stored temperature T={c['temperature']:.3f}"
        cf = c["cross_fitted"]
        text += (f"; {100 * cf['ece']:.2f}% with T fitted on the other half of these faces "
                 f"(2-fold; T={cf['temperatures'][0]:.3f}, {cf['temperatures'][1]:.3f})")
        if "cross_fitted_vector" in c:
            cv = c["cross_fitted_vector"]
            text += f"; {100 * cv['ece']:.2f}% with vector scaling, same way (accuracy {100 * cv['accuracy']:.2f}%)"
        lines.append(text)
    if "tta" in report:
        lines.append(f"with ten-crop TTA:  accuracy {100 * report['tta']['accuracy']:.2f}%, "
                     f"mean-class {100 * report['tta']['mean_class_accuracy']:.2f}%")
    lines.append(f"{'class':<10} {'support':>7} {'precision':>9} {'recall':>7} {'F1':>6} {'AUC':>6}")
    for name, e in report["per_class"].items():
        auc = f"{e['auc']:.3f}" if e["auc"] is not None else "  -  "
        lines.append(f"{name:<10} {e['support']:>7} {e['precision']:>9.3f} {e['recall']:>7.3f} {e['f1']:>6.3f} {auc:>6}")
    if "latency" in report:
        lat = report["latency"]
        lines.append(f"latency, batch 1 on {lat['device']} ({lat['threads']} threads): "
                     f"{lat['median_ms']:.3f} ms median, {lat['mean_ms']:.3f} ms mean")
    return "\n".join(lines)


# ------------------------------------------------------------------ calibration
ECE_BINS = 15


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature=None, bins: int = ECE_BINS):
    """(JSON part, reliability bins for the plot).  ECE of the raw softmax; with
    the checkpoint's stored temperature if it has one; and cross-fitted (T fitted
    on one half of these faces, scored on the other), which says what fitting a
    temperature would give without scoring on the faces it was fitted on.
    UserError when some logits are not finite (nothing to calibrate)."""
    from fer_edge.metrics import cross_fitted_probs, expected_calibration_error, nll, reliability_bins, softmax

    broken = int((~np.isfinite(logits).all(axis=1)).sum())
    if broken:
        raise UserError(f"the model's logits of {broken} of {len(logits)} faces are not finite (NaN or inf): "
                        f"its weights are broken")
    raw = softmax(logits)
    crossed, temps = cross_fitted_probs(logits, labels)
    # Vector scaling (fer-edge calibrate --method vector) can change predictions: its accuracy is reported with it.
    vector, _ = cross_fitted_probs(logits, labels, method="vector")
    out = {"bins": bins, "kind": "top-label, equal-width confidence bins",
           "ece": expected_calibration_error(raw, labels, bins), "nll": nll(logits, labels),
           "temperature": None if temperature is None else float(temperature), "ece_scaled": None,
           "nll_scaled": None,
           "cross_fitted": {"ece": expected_calibration_error(crossed, labels, bins), "temperatures": temps},
           "cross_fitted_vector": {"ece": expected_calibration_error(vector, labels, bins),
                                   "accuracy": float((vector.argmax(axis=1) == labels).mean())}}
    curves = {"softmax as stored": reliability_bins(raw, labels, bins),
              "T fitted on the other half": reliability_bins(crossed, labels, bins),
              "vector scaling fitted on the other half": reliability_bins(vector, labels, bins)}
    if temperature is not None:
        scaled = softmax(logits, temperature)
        out["ece_scaled"] = expected_calibration_error(scaled, labels, bins)
        out["nll_scaled"] = nll(logits, labels, temperature)
        curves[f"stored T = {temperature:.3f}"] = reliability_bins(scaled, labels, bins)
    return out, curves


def plot_reliability(curves: dict, path, title: str) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin (the
    diagonal is perfect calibration), one line per curve, with the ECE."""
    from fer_edge import plots

    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    for name, r in curves.items():
        used = r["count"] > 0
        n = r["count"].sum()
        ece = float(np.sum(r["count"][used] / n * np.abs(r["accuracy"][used] - r["confidence"][used])))
        ax.plot(r["confidence"][used], r["accuracy"][used], "o-", ms=4, label=f"{name} (ECE {100 * ece:.1f}%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return plots._save(fig, path)


def checkpoint_logits(weights, dataset, device="cpu", batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, dict]:
    """(logits, labels as model class indices, metadata) of a checkpoint on labelled faces."""
    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.reparam import merge

    model, meta = load_checkpoint(weights, device=device)
    # The merged form computes the same logits (to ~1e-5, fer-edge merge's check), several times faster.
    model = model if meta["form"] == "merged" else merge(model, use_kernel=True)
    labels = remap_labels(dataset, meta["classes"])
    model = model.to(memory_format=torch.channels_last)
    logits = predict_logits(model, dataset.images, meta["preprocess"], device, batch_size, channels_last=True)
    return logits, labels, meta


def set_checkpoint_temperature(src, temperature: float, out=None, force: bool = True) -> dict:
    """Write ``src`` again (to ``out``, default in place) with
    ``preprocess["temperature"] = T`` in its metadata, atomically; the weights are
    copied unchanged.  Converters copy the checkpoint's preprocess into the
    bundle's preprocess.json, so every runtime divides its logits by T."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fer_edge.checkpoint import META_KEY, read_meta
    from fer_edge.fileio import write_atomic

    src = Path(src)
    meta = read_meta(src)
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata() or {})
    state = load_file(str(src))
    meta["preprocess"] = dict(meta["preprocess"], temperature=round(float(temperature), 4))
    header[META_KEY] = json.dumps(meta)
    write_atomic(Path(out) if out else src, lambda tmp: save_file(state, tmp, metadata=header), force=force)
    return meta


def set_checkpoint_vector_scaling(src, scale, shift, out, record: dict, force: bool = True) -> dict:
    """Write ``src`` to ``out`` with vector scaling folded into its logit layer
    (``LOGIT_LAYERS``): every runtime then computes calibrated logits with no
    change, since the bundle's graph is made from these weights.  The stored
    temperature becomes 1 (the scales include it); ``record`` (what was fitted,
    on what) goes into the metadata's ``calibration``, relative to ``src``'s
    logits, with ``src``'s own record as its ``previous``.  UserError for a model
    without one logit layer."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fer_edge.checkpoint import META_KEY, read_meta
    from fer_edge.fileio import write_atomic
    from fer_edge.models.registry import LOGIT_LAYERS
    from fer_edge.reparam import fold_logit_affine

    src = Path(src)
    meta = read_meta(src)
    layer = LOGIT_LAYERS.get(meta["arch"])
    if layer is None:
        raise UserError(f"vector scaling folds into a model's last linear layer and {meta['arch']} has no single one "
                        f"(models that do: {', '.join(sorted(LOGIT_LAYERS))}); use --method temperature")
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata() or {})
    state = load_file(str(src))
    w, b = state[f"{layer}.weight"], state[f"{layer}.bias"]
    state[f"{layer}.weight"], state[f"{layer}.bias"] = fold_logit_affine(w, b, scale, shift)
    if not all(torch.isfinite(state[f"{layer}.{k}"]).all() for k in ("weight", "bias")):
        kind = str(w.dtype).removeprefix("torch.")
        raise UserError(f"{src}: vector scaling folded into {layer} overflows its {kind} weights; "
                        f"use --method temperature")
    meta["preprocess"] = dict(meta["preprocess"], temperature=1.0)
    earlier = meta.get("calibration")
    meta["calibration"] = dict(record, method="vector", scale=[round(float(v), 6) for v in scale],
                               shift=[round(float(v), 6) for v in shift])
    if earlier:  # already folded into the weights: kept, so the record still describes them all
        meta["calibration"]["previous"] = earlier
    header[META_KEY] = json.dumps(meta)
    write_atomic(Path(out), lambda tmp: save_file(state, tmp, metadata=header), force=force)
    return meta


def fit_checkpoint_temperature(weights, dataset, device="cpu", out=None, force: bool = True) -> float:
    """Fit the softmax temperature on labelled faces (minimum NLL) and store it in
    the checkpoint's metadata (``out``, default in place).  Returns T."""
    from fer_edge.metrics import fit_temperature

    logits, labels, _ = checkpoint_logits(weights, dataset, device)
    t = fit_temperature(logits, labels)
    set_checkpoint_temperature(weights, t, out, force)
    return t
