#!/usr/bin/env python
"""Turn GPU runs of ``bench_msconv.py --json`` into the package's kernel
dispatch table (``fer_edge/kernel_dispatch.json``): for each measured shape,
dtype and batch bucket, the fastest correct fer_edge kernel where it beats
the best cuDNN way by at least ``--margin``, else ``cudnn``.

    python benchmarks/make_dispatch.py gpu-out/msconv_cuda.json --out fer_edge/kernel_dispatch.json \
        --device "NVIDIA H200" --command "bash benchmarks/gpu_check.sh"

Rows of other GPUs already in --out are kept (the key starts with the compute
capability); rows of the GPU just measured are replaced.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from fer_edge.dispatch import CUDNN, KERNELS, TABLE_FORMAT, batch_bucket, key_of, parse_table

# A kernel whose output differs from the reference by more than this (relative
# L2 norm) is never chosen, however fast: fp16 rounding is ~1e-3.
MAX_REL_ERROR = {"fp32": 1e-4, "fp16": 5e-3}
# cuDNN's ways in a benchmark row (bench_msconv.BASELINES): the fastest is what a kernel must beat.
CUDNN_WAYS = ("eager", "pad5", "graph", "graph5")


def choose_row(bench: dict, margin: float) -> dict:
    """One table row from one benchmark row (a layer, batch and dtype on one GPU)."""
    cin, c1, c3, c5 = bench["channels"]
    cudnn_us = min(bench[f"{b}_us"] for b in CUDNN_WAYS if f"{b}_us" in bench)
    # A kernel whose kept buffers the run found dirty ("splitk counters") was not measured as it runs.
    dirty = {entry.split()[0] for entry in bench.get("dirty_buffers", [])}
    candidates = {k: bench[f"fused_{k}_us"] for k in KERNELS
                  if f"fused_{k}_us" in bench and k not in dirty
                  and bench.get(f"fused_{k}_err", 1.0) <= MAX_REL_ERROR[bench["dtype"]]}
    best = min(candidates, key=candidates.get) if candidates else None
    speedup = cudnn_us / candidates[best] if best else 0.0
    choice = best if best and speedup >= margin else CUDNN
    return {"cc": bench["cc"], "cin": cin, "c1": c1, "c3": c3, "c5": c5, "h": bench["hw"], "w": bench["hw"],
            "dtype": bench["dtype"], "batch": batch_bucket(bench["batch"]), "choice": choice,
            "speedup": round(speedup if choice != CUDNN else 1.0, 3),
            "us": round(candidates[best] if choice != CUDNN else cudnn_us, 2), "cudnn_us": round(cudnn_us, 2)}


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Old rows of other GPUs, then the new rows (a new row replaces an old one with its key)."""
    measured = {r["cc"] for r in new}
    keep = [r for r in old if r["cc"] not in measured]
    rows = {key_of(r): r for r in keep + new}
    return sorted(rows.values(), key=lambda r: (r["cc"], r["dtype"], r["cin"], r["h"], r["batch"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", nargs="+", help="bench_msconv.py --json files (from one GPU)")
    p.add_argument("--out", default="fer_edge/kernel_dispatch.json")
    p.add_argument("--margin", type=float, default=1.05, help="a kernel must be this much faster than cuDNN")
    p.add_argument("--device", required=True, help="the GPU's name, for the record")
    p.add_argument("--command", required=True, help="the command that produced the benchmark, for the record")
    args = p.parse_args(argv)
    try:
        rows = [r for f in args.bench for r in json.loads(Path(f).read_text())["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"make_dispatch: cannot read the benchmark rows ({exc})", file=sys.stderr)
        return 2
    new = [choose_row(r, args.margin) for r in rows if r.get("device") == "cuda"]
    if not new:
        print("make_dispatch: no CUDA rows in the benchmark files", file=sys.stderr)
        return 2
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"format": TABLE_FORMAT, "version": 1,
                                                               "measured_on": [], "entries": []}
    doc["entries"] = merge_rows(doc.get("entries", []), new)
    doc["measured_on"] = [m for m in doc.get("measured_on", []) if m["cc"] not in {r["cc"] for r in new}] + [
        {"cc": new[0]["cc"], "device": args.device, "date": datetime.date.today().isoformat(),
         "command": args.command}]
    parse_table(doc)  # what the package will read must parse
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    won = sum(r["choice"] != CUDNN for r in new)
    print(f"{out}: {len(new)} shapes measured, fer_edge's kernel chosen for {won}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
