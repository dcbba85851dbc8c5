#!/usr/bin/env python
"""Time fer_edge's fused multi-scale convolution against PyTorch's best ways.

For the MACNN layer shapes L1-L5, batch 1 and 256, it times
  fused : our one-pass kernel with its weights packed once, as a merged model
          runs it: fused_ms_conv(..., wp=<its weight pack>) on CUDA, captured
          in a CUDA graph like baseline c (so the GPU's time is measured, not
          Python's launch), every kernel of ours timed apart; CpuPackedMsConv
          on the CPU
  eager : three convolutions + ReLU + cat                       (baseline a)
  pad5  : one convolution with 1x1/3x3 kernels zero-padded to 5x5 (baseline b)
  graph : `eager` captured in a CUDA graph (CUDA only)            (baseline c)
  graph5: `pad5` captured in a CUDA graph (CUDA only)             (baseline d)
  direct: (CPU only) `fused` forced to its direct algorithm; `fused` itself
          picks direct or Winograd F(4x4, 5x5) per shape (column `algo`)
and prints median microseconds, the speed-up of `fused` over each baseline and
over the best of them, and what `fused` achieves in GB/s and TFLOP/s.  The
table is printed last; --json writes the same rows.

At batch 8 or less a layer takes a few microseconds on a GPU, less than the
host needs to launch a graph, so each graphed method (ours, baselines c and
d) captures BACK_TO_BACK calls in one graph, as a model's graph runs its
layers one after another, and its time is a replay's divided by that count;
eager and pad5 stay one call at a time (an eager model launches each call).
The repeated calls find a layer's weights in L2 on both sides, as they
would not in a model whose every layer has its own.

    python benchmarks/bench_msconv.py --device cuda --json msconv.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fer_edge.kernels import (CUTLASS_KERNELS, PACKS, fused_ms_conv, kernel_buffers, kernel_unsupported, make_pack,
                              pack_kind, zero_state)

# name: (cin, height=width, c1, c3, c5) -- the merged MAConv layers of MACNN at 48x48 (L), and
# its plain 3x3 convolutions + ReLU (P: the single-branch case c1 = c5 = 0, on CUDA only; P3-P5
# stand for two layers each).
LAYERS = {
    "L1": (1, 48, 16, 24, 24),
    "L2": (64, 24, 32, 48, 48),
    "L3": (128, 12, 64, 96, 96),
    "L4": (256, 6, 128, 192, 192),
    "L5": (512, 3, 128, 192, 192),
    "P1": (64, 48, 0, 64, 0),
    "P2": (128, 24, 0, 128, 0),
    "P3": (256, 12, 0, 256, 0),
    "P4": (512, 6, 0, 512, 0),
    "P5": (512, 3, 0, 512, 0),
}


def single_branch(layer) -> bool:
    return layer[2] == 0 and layer[4] == 0
BASELINES = ("eager", "pad5", "graph", "graph5")   # make_dispatch.py reads the same
ROTATE = 4  # input sets cycled through so repeated runs do not just re-read the cache


def make_layer(cin, hw, c1, c3, c5, n, dtype, device, layout):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)

    xs = [rnd(n, cin, hw, hw).contiguous(memory_format=fmt) for _ in range(ROTATE)]
    w1, w3, w5 = (rnd(c, cin, k, k, scale=(cin * k * k) ** -0.5) for c, k in ((c1, 1), (c3, 3), (c5, 5)))
    b1, b3, b5 = rnd(c1), rnd(c3), rnd(c5)
    # Baseline (b): one 5x5 convolution whose 1x1 and 3x3 kernels are zero-padded.
    w_pad = torch.cat([F.pad(w1, (2, 2, 2, 2)), F.pad(w3, (1, 1, 1, 1)), w5]).contiguous(memory_format=fmt)
    b_pad = torch.cat([b1, b3, b5])
    fused_w = (w1, b1, w3, b3, w5, b5)  # fused_ms_conv takes plain OIHW weights
    # The baselines get weights in the input's memory format, as cuDNN prefers.
    w1, w3, w5 = (w.contiguous(memory_format=fmt) for w in (w1, w3, w5))
    return xs, fused_w, (w1, b1, w3, b3, w5, b5), (w_pad, b_pad)


CUDA_KERNELS = ("simt", "splitk", "mma", "wmma", "cutlass", "cutlass90", "cutlass_window", "cutlass90_window", "stem")


# Above batch 256 only the kernels made for large batches are timed: the others measured
# 0.01-0.6x cuDNN at batch 256 already, and at 1024 one of their rows costs seconds.
LARGE_BATCH_KERNELS = (*CUTLASS_KERNELS, "stem")


def cuda_kernels(dtype: str, x, fw) -> list[str]:
    """fer_edge's CUDA kernels that can run a layer: WMMA needs fp16, 16+ input channels (with
    fewer, most of each 16-channel step is zeros) and a 7.0 GPU; the others say themselves what
    they take (kernel_unsupported: the CUTLASS ones fp16 channels_last with channels in multiples
    of 8 on an 8.0+ GPU, cutlass90* a 9.0 one, and a build with them; mma the same in fp16 or
    fp32, in every build; stem at most 4 input channels)."""
    ok = [k for k in CUDA_KERNELS if k != "wmma" or (dtype == "fp16" and x.shape[1] >= 16
                                                      and torch.cuda.get_device_capability() >= (7, 0))]
    if x.shape[0] > 256:
        ok = [k for k in ok if k in LARGE_BATCH_KERNELS]
    return [k for k in ok if not kernel_unsupported(x, *fw, kernel=k)]


def eager(x, w1, b1, w3, b3, w5, b5):
    parts = [F.relu(F.conv2d(x, w, b, padding=w.shape[-1] // 2)) for w, b in ((w1, b1), (w3, b3), (w5, b5))
             if w.shape[0] > 0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # a plain conv + ReLU needs no cat


def time_fn(fn, inputs, device, repeat, warmup=5):
    """Median microseconds of fn(x) over `repeat` runs, cycling through inputs (per call
    of a graph that holds fn.calls calls)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for i in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for i in range(repeat):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times) / getattr(fn, "calls", 1)


BACK_TO_BACK = 20   # calls per graph at batch <= 8 (see the module's docstring)


def graphed(fn, inputs, calls: int = 1):
    """Capture `calls` calls of fn, one after another, on a static input buffer; replaying
    copies the next input in first.  The result's `calls` says how many one replay runs."""
    static = inputs[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn(static)
    # The copy is part of what is timed; at these sizes it is ~1-2 us (once per replay).
    # Returns the last call's captured output buffer (overwritten by the next replay).
    def replay(x):
        static.copy_(x)
        g.replay()
        return out
    replay.calls = calls
    # A graph holds no reference to the tensors it uses: keep fn (and so the buffers and packs
    # it holds) alive as long as the graph, or their memory goes to other tensors while the
    # graph still writes it (a split-K kernel's counters overwritten: its output never written).
    replay.fn = fn
    return replay


def direct_call(x, fw, wp, kernel: str, buffers=(None, None), **options):
    """A callable that launches one of our CUDA kernels on inputs shaped like x (channels_last)
    straight through the extension, with msconv_cuda's launch options (mma_bm, mma_kchunk,
    mma_pdl, cutlass90_tile_n): what the tile sweeps time.  It keeps the pack, the biases and
    the buffers alive for as long as it lives (a CUDA graph of it reads them)."""
    from fer_edge import _C
    from fer_edge.dispatch import KERNELS

    w1, b1, w3, b3, w5, b5 = fw
    n, c, h, w = x.shape
    c1, c3, c5 = w1.shape[0], w3.shape[0], w5.shape[0]
    biases = [b.contiguous() for b in (b1, b3, b5)]
    ws, counters = buffers
    dtype = {torch.float32: 0, torch.float16: 1}[x.dtype]

    def call(xx):
        out = torch.empty(n, c1 + c3 + c5, h, w, dtype=xx.dtype, device=xx.device,
                          memory_format=torch.channels_last)
        _C.msconv_cuda(xx.data_ptr(), out.data_ptr(), w1.data_ptr(), biases[0].data_ptr(), w3.data_ptr(),
                       biases[1].data_ptr(), w5.data_ptr(), biases[2].data_ptr(), n, c, h, w, c1, c3, c5, 1, True,
                       dtype, torch.cuda.current_stream().cuda_stream, wp.data_ptr(), KERNELS[kernel],
                       ws.data_ptr() if ws is not None else 0, counters.data_ptr() if counters is not None else 0,
                       **options)
        return out

    call.keep = (wp, biases, buffers)
    return call


def dirty_buffers(kept: dict) -> list[str]:
    """Which kept buffers that must be zero between calls (kernels.zero_state) are
    not: one kernel disturbing another's state makes that one wrong from then on."""
    return [f"{kernel} {name}" for kernel, bufs in kept.items() for name, t in zero_state(kernel, bufs)
            if bool(t.any())]


def layer_cost(cin, hw, c1, c3, c5, n, itemsize):
    """Useful flops (no zero taps) and the fewest bytes: input, weights, output once."""
    flops = 2 * n * hw * hw * cin * (c1 + 9 * c3 + 25 * c5)
    nbytes = itemsize * (n * cin * hw * hw + cin * (c1 + 9 * c3 + 25 * c5) + (c1 + c3 + c5)
                         + n * (c1 + c3 + c5) * hw * hw)
    return flops, nbytes


def scaled(layer, width):
    """A layer of MACNN at channel width `width` (the stem keeps its 1 input channel)."""
    cin, hw, c1, c3, c5 = layer
    return (cin if cin == 1 else max(1, round(cin * width)), hw,
            *(0 if c == 0 else max(1, round(c * width)) for c in (c1, c3, c5)))


def run(args, on_rows=lambda rows: None) -> list[dict]:
    """The benchmark's rows; on_rows(rows so far) after each one (a time limit then keeps what was measured)."""
    device = args.device
    dtypes = ["fp32"] + (["fp16"] if device == "cuda" else [])
    if args.dtypes:
        dtypes = args.dtypes
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}
    if device == "cuda":
        # cuDNN autotuning picks its best algorithm for each shape, as a user would.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    # dtype, then batch, then layer: under a time limit the first dtype and batch asked for
    # (fp16 at batch 1 in the GPU scripts) are measured for every layer first.
    for dt, n, name in itertools.product(dtypes, args.batches, args.layers):
        cin, hw, c1, c3, c5 = scaled(LAYERS[name], args.width)
        xs, fw, ws, (w_pad, b_pad) = make_layer(cin, hw, c1, c3, c5, n, torch_dtype[dt], device, args.layout)
        ours = cuda_kernels(dt, xs[0], fw) if device == "cuda" else []
        if device == "cuda" and not ours:
            print(f"{name} n={n} {dt}: no kernel of ours takes it, not timed", file=sys.stderr)
            continue
        methods = {
            "fused": lambda x: fused_ms_conv(x, *fw),
            "eager": lambda x: eager(x, *ws),
            "pad5": lambda x: F.relu(F.conv2d(x, w_pad, b_pad, padding=2)),
        }
        if single_branch(LAYERS[name]):
            del methods["pad5"]  # a plain 3x3 convolution: padding it to 5x5 only adds work
        if device == "cuda":
            # What a merged model runs: weights packed once, split-K buffers made once
            # (FusedMultiScaleConv keeps both); every kernel of ours, timed apart.
            del methods["fused"]
            packs = {kind: make_pack(kind, *fw) for kind in PACKS}
            calls = BACK_TO_BACK if n <= 8 else 1
            kept = {}
            for k in ours:
                bufs = kept[k] = kernel_buffers(k, xs[0], c1, c3, c5)   # made once, before the capture
                methods[f"fused_{k}"] = graphed((lambda k, bufs, fw, wp: lambda x: fused_ms_conv(
                    x, *fw, wp=wp, kernel=k, buffers=bufs))(k, bufs, fw, packs[pack_kind(k)]), xs, calls)
            methods["graph"] = graphed(methods["eager"], xs, calls)
            if "pad5" in methods:
                methods["graph5"] = graphed(methods["pad5"], xs, calls)
        else:
            # What a merged model runs on the CPU: weights packed once, not per call.
            from fer_edge.kernels import CpuPackedMsConv

            methods["fused"] = CpuPackedMsConv(*fw)
            methods["direct"] = CpuPackedMsConv(*fw, algo="direct")
        with torch.inference_mode():
            ref = methods["eager"](xs[0]).float()
            errs = {m: ((f(xs[0]).float() - ref).norm() / ref.norm()).item()
                    for m, f in methods.items() if m.startswith("fused")}
            us = {m: time_fn(f, xs, device, args.repeat) for m, f in methods.items()}
        dirty = []
        if device == "cuda":  # `fused`: the fastest of our kernels, as the dispatch table would pick
            fastest = min((m for m in us if m.startswith("fused_")), key=us.get)
            us["fused"], errs["fused"] = us[fastest], errs[fastest]
            dirty = dirty_buffers(kept)
            if dirty:
                print(f"{name} n={n} {dt}: buffers not zero after the runs: {', '.join(dirty)}", file=sys.stderr)
        err = errs["fused"]
        flops, nbytes = layer_cost(cin, hw, c1, c3, c5, n, torch.finfo(torch_dtype[dt]).bits // 8)
        best = min(v for k, v in us.items() if k in BASELINES)
        if device == "cpu":
            algo = methods["fused"].algorithm_for(n, hw, hw)
        else:
            algo = fastest.removeprefix("fused_")
        row = {
            "layer": name, "batch": n, "dtype": dt, "layout": args.layout, "device": device,
            "width": args.width, "channels": [cin, c1, c3, c5], "hw": hw, "algo": algo,
            **({"cc": ".".join(map(str, torch.cuda.get_device_capability())), "graph_calls": calls}
               if device == "cuda" else {}),
            **{f"{m}_err": float(f"{e:.2e}") for m, e in errs.items() if m != "fused"},
            **{f"{m}_us": round(v, 2) for m, v in us.items()},
            **{f"speedup_vs_{m}": round(v / us["fused"], 3) for m, v in us.items()
               if m != "fused" and not m.startswith("fused_")},
            "speedup_vs_best": round(best / us["fused"], 3),
            "fused_GBps": round(nbytes / us["fused"] / 1e3, 1),
            "fused_TFLOPs": round(flops / us["fused"] / 1e6, 3),
            "rel_err_vs_eager": float(f"{err:.2e}"),
            **({"dirty_buffers": dirty} if dirty else {}),
        }
        rows.append(row)
        on_rows(rows)
        print(f"{name} n={n} {dt}: " + ", ".join(f"{m} {v:.1f} us" for m, v in us.items()), file=sys.stderr)
    return rows


def print_aligned(lines, left_last: bool = False):
    """Rows of strings as right-aligned columns, a rule under the first (the
    header); ``left_last`` leaves a free-text last column unpadded."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        cells = [c.rjust(w) for c, w in zip(line, widths)]
        if left_last:
            cells[-1] = line[-1]
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_table(rows):
    kernels = sorted({m[:-3] for r in rows for m in r
                      if m.startswith("fused_") and m.endswith("_us") and m[6:-3] in CUDA_KERNELS})
    methods = [m for m in ("fused", "direct", *BASELINES) if any(f"{m}_us" in r for r in rows)]
    head = ["layer", "n", "dtype", "algo"] + [f"{m} us" for m in methods] + \
        [f"x{m}" for m in methods[1:]] + ["x best", "GB/s", "TFLOP/s", "rel err"]
    lines = [head]
    for r in rows:
        lines.append([r["layer"], str(r["batch"]), r["dtype"], r["algo"]]
                     + [f"{r[f'{m}_us']:.1f}" if f"{m}_us" in r else "-" for m in methods]
                     + [f"{r[f'speedup_vs_{m}']:.2f}" if f"speedup_vs_{m}" in r else "-" for m in methods[1:]]
                     + [f"{r['speedup_vs_best']:.2f}", f"{r['fused_GBps']:.1f}", f"{r['fused_TFLOPs']:.3f}",
                        f"{r['rel_err_vs_eager']:.1e}"])
    print_aligned(lines)
    print("x<m> = time of baseline m / time of fused (higher is better); "
          "GB/s and TFLOP/s count the fewest bytes and the useful flops of fused.")
    if kernels:  # CUDA: each of our kernels apart (fused = the fastest of them, column algo)
        lines = [["layer", "n", "dtype"] + [f"{k} us" for k in kernels] + [f"{k} err" for k in kernels]]
        for r in rows:
            lines.append([r["layer"], str(r["batch"]), r["dtype"]]
                         + [f"{r[f'{k}_us']:.1f}" if f"{k}_us" in r else "-" for k in kernels]
                         + [f"{r[f'{k}_err']:.1e}" if f"{k}_err" in r else "-" for k in kernels])
        print()
        print_aligned(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the table's rows to this JSON file")
    p.add_argument("--layers", nargs="+", choices=list(LAYERS),
                   help="default: all on CUDA; L1-L5 on the CPU, whose kernel needs all three branches")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "fp16"])
    p.add_argument("--layout", choices=["nhwc", "nchw"], default="nhwc")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (0.25: the compact model)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per method (default 200 cuda, 10 cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.repeat is None:
        args.repeat = 200 if args.device == "cuda" else 10
    cpu_layers = [k for k, v in LAYERS.items() if not single_branch(v)]
    if args.layers is None:
        args.layers = list(LAYERS) if args.device == "cuda" else cpu_layers
    elif args.device == "cpu" and set(args.layers) - set(cpu_layers):
        p.error("the single-branch layers (P1-P5) run on CUDA only")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }

    def save(rows):
        if args.json:  # rewritten whole after every row, atomically (a reader never sees half a file)
            tmp = f"{args.json}.part"
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=2)
            os.replace(tmp, args.json)

    rows = run(args, on_rows=save)
    print(f"\n{meta['date']}  {meta['device']}  torch {meta['torch']}  layout {args.layout}  width {args.width}")
    print_table(rows)


if __name__ == "__main__":
    main()
