"""Rank training regularizers in short, equal runs: every candidate is the
``best`` recipe plus one change, trained with the same seed, data subset and
epochs, then scored on the validation faces.

    python benchmarks/rank_recipes.py --data ../shared/data/fer2013/train \
        --val ../shared/data/fer2013/publictest --limit 6000 --epochs 6 --out runs/rank

Writes OUT/ranking.md (a table: last-epoch and best-epoch accuracy, the
difference to the baseline, seconds), OUT/ranking.json and OUT/ranking.png
(validation accuracy per epoch, one line per candidate).  A finished
candidate is not trained again when the command is rerun (its summary is
read back), so an interrupted ranking continues where it stopped.

Short runs favour what helps early; regularizers that pay off only in long
schedules (mixup, CutMix, weight averaging) can rank low here and still win
at 300 epochs.  Read the table as evidence for what to carry to a GPU, not as
the GPU result.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name -> the flags it adds to the baseline (one table: add a row to rank a candidate).
CANDIDATES: dict[str, list[str]] = {
    "baseline (best)": [],
    "ema 0.99": ["--ema", "0.99"],
    "mixup 0.2": ["--mixup", "0.2"],
    "cutmix 1.0": ["--cutmix", "1.0"],
    "weight decay 1e-3": ["--weight-decay", "1e-3"],
    "label smoothing 0.2": ["--label-smoothing", "0.2"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def train(name: str, flags: list[str], args, out: Path) -> dict:
    run = out / slug(name)
    rows = read_rows(run)
    if not (len(rows) == args.epochs and (run / "summary.json").is_file()):
        cmd = ["fer-edge", "train", "--data", args.data, "--val", args.val, "--model", "macnn", "--width",
               str(args.width), "--recipe", "best", "--epochs", str(args.epochs), "--batch-size",
               str(args.batch_size), "--seed", str(args.seed), "--limit", str(args.limit), "--no-progress",
               "--force", "--out", str(run), *flags]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, text=True, capture_output=True)
        (out / f"{slug(name)}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.exit(f"{name}: fer-edge train failed (exit {proc.returncode}); see {out / slug(name)}.log")
        rows = read_rows(run)
    last, best = rows[-1], max(rows, key=lambda r: r["val_acc"])
    return {"name": name, "flags": flags, "last_acc": last["val_acc"], "best_acc": best["val_acc"],
            "best_epoch": best["epoch"], "last_mean_class": last["val_mean_class_acc"],
            "train_acc": last["train_acc"], "last_acc_without_average": last.get("val_acc_raw"),
            "seconds": sum(r["epoch_seconds"] for r in rows), "curve": [r["val_acc"] for r in rows]}


def table(results: list[dict]) -> str:
    base = results[0]
    lines = ["| candidate | flags | last epoch % | Δ last | best epoch % (epoch) | Δ best | train % | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: -r["last_acc"]):
        raw = (f" ({100 * r['last_acc_without_average']:.2f} without the average)"
               if r["last_acc_without_average"] is not None else "")
        lines.append(f"| {r['name']} | `{' '.join(r['flags']) or '-'}` | {100 * r['last_acc']:.2f}{raw} | "
                     f"{100 * (r['last_acc'] - base['last_acc']):+.2f} | {100 * r['best_acc']:.2f} "
                     f"({r['best_epoch']}) | {100 * (r['best_acc'] - base['best_acc']):+.2f} | "
                     f"{100 * r['train_acc']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], marker="o", ms=3, label=r["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Regularizers in equal short runs (MACNN width 0.25)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="training faces (class folders or FER2013 CSV)")
    p.add_argument("--val", required=True, help="validation faces")
    p.add_argument("--out", required=True, help="folder for the runs and the ranking")
    p.add_argument("--limit", type=int, default=6000, help="training faces per run (seeded subset)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="rank only these candidates (names as in CANDIDATES)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in CANDIDATES if not args.only or n in args.only or n == "baseline (best)"]
    results = [train(n, CANDIDATES[n], args, out) for n in names]
    md = (f"MACNN width {args.width}, `--recipe best --epochs {args.epochs} --batch-size {args.batch_size} "
          f"--limit {args.limit} --seed {args.seed}`, validated on {args.val}; threads: "
          f"{os.environ.get('OMP_NUM_THREADS', 'all')}\n\n" + table(results))
    (out / "ranking.md").write_text(md)
    (out / "ranking.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "ranking.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
