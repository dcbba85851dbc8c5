"""PNG plots people look at: confusion heat map, one-vs-rest ROC curves,
training curves.  matplotlib with the Agg backend (no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from fer_edge.fileio import write_atomic

    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"), force=True)
    _plt().close(fig)
    return path


MAX_ANNOTATED = 30   # classes up to which every cell of the confusion matrix is written out
MAX_LABELLED = 100   # classes up to which the axes name them (in a smaller font past MAX_ANNOTATED)
MAX_INCHES = 24      # a figure side: beyond it a plot of many classes only costs memory


def plain(text) -> str:
    """Text shown as it is: matplotlib would read "$...$" in a class name as math (and fail on it)."""
    return str(text).replace("$", r"\$")


def plot_confusion(cm, classes, path, title="Confusion matrix") -> Path:
    """Counts in each cell, colour = row-normalized (recall), so rare classes stay visible."""
    from fer_edge.metrics import normalize_rows

    plt = _plt()
    cm = np.asarray(cm)
    norm = normalize_rows(cm)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.8 * k, MAX_INCHES), min(0.8 + 0.7 * k, MAX_INCHES)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k if k <= MAX_ANNOTATED else 0):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    if k <= MAX_LABELLED:
        size = 10 if k <= MAX_ANNOTATED else 5
        ax.set_xticks(range(k), [plain(c) for c in classes], rotation=45 if k <= MAX_ANNOTATED else 90,
                      ha="right" if k <= MAX_ANNOTATED else "center", fontsize=size)
        ax.set_yticks(range(k), [plain(c) for c in classes], fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(plain(title))
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    return _save(fig, path)


def plot_roc(rocs: dict, aucs: dict, path, title="One-vs-rest ROC") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr) in rocs.items():
        ax.plot(fpr, tpr, label=f"{plain(name)} (AUC {aucs[name]:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(plain(title))
    if len(rocs) <= MAX_ANNOTATED:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def read_metrics(path) -> list[dict]:
    """The epoch rows of a metrics.jsonl (a line that is not one, e.g. cut by a crash, is left out)."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and "train_loss" in row:
            rows.append(row)
    return rows


def plot_training_curves(metrics_jsonl, path) -> Path:
    """Loss and accuracy per epoch (train and validation) from metrics.jsonl."""
    rows = read_metrics(metrics_jsonl)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [r["epoch"] for r in rows]
    a1.plot(ep, [r["train_loss"] for r in rows], label="train")
    if rows and "val_loss" in rows[0]:
        a1.plot(ep, [r["val_loss"] for r in rows], label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(ep, [100 * r["train_acc"] for r in rows], label="train")
    if rows and "val_acc" in rows[0]:
        a2.plot(ep, [100 * r["val_acc"] for r in rows], label="validation")
        a2.plot(ep, [100 * r["val_mean_class_acc"] for r in rows], label="validation, mean-class", ls="--")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    fig.suptitle(plain(Path(metrics_jsonl).parent.name))
    return _save(fig, path)
