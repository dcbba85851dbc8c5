#!/usr/bin/env python
"""The Hopper CUTLASS kernels' channel tiles, measured: what igemm90_tile should pick.

For MACNN's layers at batch 256 and 1 (fp16, channels_last, compute capability
9.0, a build with the sm_90a kernels), `cutlass90` (one launch per branch)
and `cutlass90_window` (one launch over the zero-padded 5x5 window) with the
rule's channel tile per launch (csrc/msconv_cuda_igemm.h) and with 64 and 128
on every launch (128 pixels x 64 of K per step either way), each checked
against the three convolutions and timed as bench_msconv.py times kernels
(one call per CUDA graph replay: the batch-1 figures include a graph launch),
next to cuDNN's best way in the same run.  --json writes every row.

    python benchmarks/sweep_cutlass90.py --batches 256 --json cutlass90_sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_msconv import (LAYERS, direct_call, eager, graphed, make_layer, print_aligned,  # noqa: E402
                          single_branch, time_fn)

from fer_edge import _C  # noqa: E402
from fer_edge.kernels import kernel_unsupported, make_pack, pack_kind  # noqa: E402

TILES_N = (0, 64, 128)   # 0: the rule's choice per launch
MAX_REL_ERROR = 5e-3   # fp16, as make_dispatch.py accepts a kernel


def launch_couts(kernel: str, c1: int, c3: int, c5: int) -> list[int]:
    """The channels of each launch: one per non-empty branch, or the whole layer for a window kernel."""
    return [c1 + c3 + c5] if kernel.endswith("_window") else [c for c in (c5, c3, c1) if c]


def cutlass90_call(x, fw, kernel: str, tile_n: int):
    """fused_ms_conv's launch of a Hopper CUTLASS kernel with this channel tile."""
    return direct_call(x, fw, make_pack(pack_kind(kernel), *fw), kernel, cutlass90_tile_n=tile_n)


def sweep(layers, batches, repeat: int, on_rows=lambda rows: None) -> list[dict]:
    rows = []
    for n in batches:
        for name in layers:
            cin, hw, c1, c3, c5 = LAYERS[name]
            xs, fw, ws, (w_pad, b_pad) = make_layer(cin, hw, c1, c3, c5, n, torch.float16, "cuda", "nhwc")
            with torch.inference_mode():
                ref = eager(xs[0], *ws).float()
                cudnn = {"eager": time_fn(lambda x: eager(x, *ws), xs, "cuda", repeat),
                         "graph": time_fn(graphed(lambda x: eager(x, *ws), xs), xs, "cuda", repeat)}
                if not single_branch(LAYERS[name]):
                    pad5 = lambda x: F.relu(F.conv2d(x, w_pad, b_pad, padding=2))  # noqa: E731
                    cudnn["pad5"] = time_fn(pad5, xs, "cuda", repeat)
                    cudnn["graph5"] = time_fn(graphed(pad5, xs), xs, "cuda", repeat)
                best = min(cudnn.values())
                for kernel in ("cutlass90", "cutlass90_window"):
                    if why := kernel_unsupported(xs[0], *fw, kernel=kernel):
                        print(f"{name} n={n}: {kernel} cannot run it ({why})", file=sys.stderr)
                        continue
                    m, sms = n * hw * hw, _C.sm_count(0)
                    picks = [_C.igemm90_tile(m, c, sms)["n"] for c in launch_couts(kernel, c1, c3, c5)]
                    for tile_n in TILES_N:
                        replay = graphed(cutlass90_call(xs[0], fw, kernel, tile_n), xs)
                        err = ((replay(xs[0]).float() - ref).norm() / ref.norm()).item()
                        us = time_fn(replay, xs, "cuda", repeat)
                        rows.append({
                            "layer": name, "batch": n, "channels": [cin, c1, c3, c5], "hw": hw,
                            "kernel": kernel, "tile_n": tile_n, "rule_tiles": picks,
                            "us": round(us, 2), "rel_err": float(f"{err:.2e}"), "ok": err <= MAX_REL_ERROR,
                            "cudnn_best_us": round(best, 2), "speedup_vs_best": round(best / us, 3)})
                        on_rows(rows)
            print(f"{name} n={n}: cuDNN best {best:.1f} us", file=sys.stderr)
    return rows


def print_table(rows) -> None:
    lines = [["layer", "n", "kernel", "tile_n", "rule", "us", "x cudnn", "rel err", ""]]
    for r in rows:
        lines.append([r["layer"], str(r["batch"]), r["kernel"], str(r["tile_n"] or "rule"),
                      "/".join(map(str, r["rule_tiles"])), f"{r['us']:.1f}", f"{r['speedup_vs_best']:.2f}",
                      f"{r['rel_err']:.1e}", "" if r["ok"] else "WRONG"])
    print_aligned(lines, left_last=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", choices=[k for k in LAYERS if k != "L1"],
                   default=["L2", "L3", "L4", "L5", "P1", "P3", "P4"])
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1])
    p.add_argument("--repeat", type=int, default=20, help="timed replays per tile")
    p.add_argument("--json", help="write every row to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not hasattr(_C, "msconv_cuda"):
        print("sweep_cutlass90: needs a CUDA GPU and fer_edge built with CUDA", file=sys.stderr)
        return 2
    if torch.cuda.get_device_capability() != (9, 0) or not _C.build_info().get("cutlass_sm90"):
        print("sweep_cutlass90: needs compute capability 9.0 and a build with the sm_90a CUTLASS kernels",
              file=sys.stderr)
        return 2
    if any(b < 1 for b in args.batches) or args.repeat < 1:
        print("sweep_cutlass90: batches and --repeat must be >= 1", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True    # cuDNN's best algorithm per shape, as bench_msconv.py lets it

    def save(rows):  # after every row, so a time limit keeps what was measured
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            tmp.replace(args.json)

    rows = sweep(args.layers, args.batches, args.repeat, save)
    save(rows)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16 channels_last, one call per graph")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
