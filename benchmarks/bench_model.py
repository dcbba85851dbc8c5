#!/usr/bin/env python
"""Whole-model inference speed of MACNN: train form, merged, merged with the
fused kernel, with and without CUDA graphs and torch.compile.

Rows (each timed in the same run, same input, same weights):
  train          the train-form model (BatchNorm, asymmetric branches), eager
  merged         merge(model, use_kernel=False): square convs, three per MAConv + cat
  merged+graph   `merged` captured in one CUDA graph (CUDA only)
  kernel         merge(model): every MAConv runs fer_edge's fused kernel on the CPU;
                 on CUDA each runs what the kernel dispatch table chooses for its
                 shape, dtype and batch (cuDNN where nothing was measured faster)
  kernel+graph   `kernel` captured in one CUDA graph (CUDA only)
  splitk+graph   every MAConv forced to the small-batch split-K kernel, in a CUDA graph (CUDA only)
  mma+graph      every MAConv and plain 3x3 convolution with channels in multiples of 8 forced to
                 the small-batch tensor-core kernel, in a CUDA graph (fp16 or fp32, sm_80+)
  cutlass+graph  every MAConv with channels in multiples of 8 forced to the large-batch CUTLASS
                 path, in a CUDA graph (fp16, sm_80+, builds with it)
  cutlass90+graph  the same on Hopper's wgmma and TMA (compute capability 9.0)
  merged+compile torch.compile(`merged`, mode=--compile-mode)  (the baseline: max-autotune on CUDA;
                 last, since its compile can take minutes: --only merged+compile fills
                 inductor's caches ahead, in another process)
Columns: median milliseconds per batch, images/s, speed-up over
`merged+compile` (x compile) and over `train`, and the relative error of the
logits against the float32 merged model (a speed trick may not change results).
The table is printed last; --json writes the same rows.

    python benchmarks/bench_model.py --device cuda --json model_cuda.json
    python benchmarks/bench_model.py --device cpu --batches 1 32 --width 0.25
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_msconv import graphed, print_aligned, time_fn  # noqa: E402

from fer_edge import models  # noqa: E402
from fer_edge.kernels import build_info  # noqa: E402
from fer_edge.reparam import merge  # noqa: E402

ROTATE = 4


def build(width: float, weights: str | None):
    """The train-form model: a checkpoint's, or random weights with non-trivial BN statistics."""
    if weights:
        from fer_edge.checkpoint import load_checkpoint

        model, meta = load_checkpoint(weights, expect_arch="macnn")
        if meta["form"] != "train":
            raise SystemExit(f"{weights}: give a train-form checkpoint (the benchmark merges it itself)")
        return model.eval()
    torch.manual_seed(0)
    model = models.create("macnn", num_classes=7, width=width)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.normal_(1, 0.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()


def variants(train, device: str, dtype, compile_mode: str, sample):
    """name -> callable(x), all on `device` in `dtype`, channels_last."""
    def prep(m):
        return m.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()

    plain = prep(merge(train, use_kernel=False))
    fused = prep(merge(train, use_kernel=True))
    out = {"train": prep(copy.deepcopy(train)), "merged": plain}
    if device == "cuda":
        out["merged+graph"] = lambda: graphed(plain, sample)
    out["kernel"] = fused
    if device == "cuda":
        out["kernel+graph"] = lambda: graphed(fused, sample)
        out["splitk+graph"] = lambda: graphed(forced(prep(merge(train, use_kernel=True)), "splitk"), sample)
        if dtype in (torch.float16, torch.float32) and torch.cuda.get_device_capability() >= (8, 0):
            out["mma+graph"] = lambda: graphed(forced(prep(merge(train, use_kernel=True)), "mma"), sample)
        if dtype == torch.float16 and build_info().get("cutlass") and torch.cuda.get_device_capability() >= (8, 0):
            out["cutlass+graph"] = lambda: graphed(forced(prep(merge(train, use_kernel=True)), "cutlass"), sample)
        if dtype == torch.float16 and build_info().get("cutlass_sm90") and torch.cuda.get_device_capability() == (9, 0):
            out["cutlass90+graph"] = lambda: graphed(forced(prep(merge(train, use_kernel=True)), "cutlass90"),
                                                     sample)
    # Last: its compile can take minutes (max-autotune), and a time limit then keeps the rest.
    out["merged+compile"] = lambda: torch.compile(plain, mode=compile_mode)
    return out


def forced(model, kernel: str):
    """Every multi-scale layer of a merged model runs `kernel`, whatever the dispatch table says
    (mma and cutlass: every one whose channels they take, in multiples of 8, and for mma the
    plain 3x3 convolutions too; the table decides the others)."""
    from fer_edge.kernels import IGEMM_KERNELS
    from fer_edge.models.layers import ConvAct, FusedMultiScaleConv

    for m in model.modules():
        if isinstance(m, FusedMultiScaleConv):
            channels = (m.w1.shape[1], *m.channels)
        elif isinstance(m, ConvAct) and kernel == "mma" and m._single_branch():
            channels = (m.conv.in_channels, m.conv.out_channels)
        else:
            continue
        if kernel in IGEMM_KERNELS and any(c % 8 for c in channels):
            continue
        m.cuda_kernel = kernel
    return model


def run(args, on_rows=lambda rows: None) -> list[dict]:
    device = args.device
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        # A float32 reference must be float32, not TF32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    train = build(args.width, args.weights)
    size = train.config.get("input_size", 48) if hasattr(train, "config") else 48
    compile_mode = args.compile_mode or ("max-autotune" if device == "cuda" else "default")
    reference = merge(train, use_kernel=False).to(device).eval()  # float32 logits to compare with
    rows = []
    for n in args.batches:
        g = torch.Generator().manual_seed(n)
        xs = [torch.randn(n, 1, size, size, generator=g).to(device=device, dtype=dtype)
              .contiguous(memory_format=torch.channels_last) for _ in range(ROTATE)]
        with torch.inference_mode():
            ref = reference(xs[0].float())
        methods = variants(train, device, dtype, compile_mode, xs)
        times, errors, notes = {}, {}, {}
        for name, fn in methods.items():
            if not wanted(args, name):
                continue
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    if not isinstance(fn, torch.nn.Module):
                        fn = fn()  # capture the graph / wrap for compilation
                    y = fn(xs[0])  # torch.compile compiles here
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if name.endswith(("graph", "compile")):
                        notes[name] = f"ready in {time.perf_counter() - t0:.1f} s (not timed)"
                    errors[name] = float(((y.float() - ref).norm() / ref.norm()).item())
                    times[name] = time_fn(fn, xs, device, args.repeat) / 1e3  # ms
            except Exception as exc:  # noqa: BLE001  (one failing variant must not hide the others)
                notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            print(f"n={n} {name}: " + (f"{times[name]:.3f} ms" if name in times else notes[name]),
                  file=sys.stderr)
        base = times.get("merged+compile")
        for name in methods:
            if not wanted(args, name):
                continue
            ms = times.get(name)
            rows.append({
                "batch": n, "variant": name, "dtype": args.dtype, "device": device, "width": args.width,
                "ms": None if ms is None else round(ms, 4),
                "images_per_s": None if ms is None else round(n / ms * 1e3, 1),
                "speedup_vs_compile": None if ms is None or base is None else round(base / ms, 3),
                "speedup_vs_train": None if ms is None or "train" not in times else round(times["train"] / ms, 3),
                "rel_err_vs_fp32_merged": errors.get(name),
                "note": notes.get(name, ""),
            })
        on_rows(rows)  # written after every batch size: a run cut short keeps what it measured
    return rows


def wanted(args, name: str) -> bool:
    """Whether a variant runs: not in --skip, and in --only when that is given."""
    return name not in args.skip and (not args.only or name in args.only)


def print_table(rows):
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ["n", "variant", "ms", "images/s", "x compile", "x train", "rel err", "note"]
    lines = [head] + [[str(r["batch"]), r["variant"], f(r["ms"], ".3f"), f(r["images_per_s"], ".0f"),
                       f(r["speedup_vs_compile"], ".2f"), f(r["speedup_vs_train"], ".2f"),
                       f(r["rel_err_vs_fp32_merged"], ".1e"), r["note"]] for r in rows]
    print_aligned(lines, left_last=True)
    print("x compile = merged+compile time / this time; x train = train time / this time; "
          "rel err = |logits - fp32 merged| / |fp32 merged|")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the table's rows to this JSON file")
    p.add_argument("--batches", nargs="+", type=int, help="default: 1 1024 on cuda, 1 32 on cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--width", type=float, default=1.0, help="MACNN width multiplier (random weights)")
    p.add_argument("--weights", help="a train-form MACNN checkpoint instead of random weights")
    p.add_argument("--compile-mode", help="torch.compile mode (default: max-autotune on cuda, default on cpu)")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out, e.g. merged+compile")
    p.add_argument("--only", nargs="*", default=[],
                   help="run only these variants, e.g. merged+compile (to fill torch.compile's caches ahead)")
    p.add_argument("--repeat", type=int, help="timed runs per variant (default 200 cuda, 30 cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and args.dtype not in (None, "fp32"):
        p.error("--device cpu benchmarks float32 only (the CPU kernel is float32)")
    args.batches = args.batches or ([1, 1024] if args.device == "cuda" else [1, 32])
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.repeat = args.repeat or (200 if args.device == "cuda" else 30)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
            "torch": torch.__version__, "command": " ".join(sys.argv)}

    def write(rows):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=2)

    rows = run(args, write)
    print(f"\n{meta['date']}  {meta['device']}  torch {meta['torch']}  MACNN width {args.width}  {args.dtype}")
    print_table(rows)


if __name__ == "__main__":
    main()
