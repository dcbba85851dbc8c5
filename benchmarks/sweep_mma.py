#!/usr/bin/env python
"""The mma kernel's tiles, measured: what its plan's rules should pick.

For MACNN's layers at batch 1 and 8 (fp16, channels_last, CUDA, sm_80+), every
pixel tile (16, 32, 48 or 64 rows) and K chunk (128 doubling up to the
layer's longest K), each timed as bench_msconv.py times kernels (BACK_TO_BACK
calls in one CUDA graph, per call), checked against the three-convolution
result, next to cuDNN's best way in the same run (the fastest of eager,
the zero-padded 5x5 and the CUDA graphs of both).  Per layer it prints the
fastest tiles and the one the plan picks (csrc/msconv_cuda_mma.h), that one
also as an ordinary launch on compute capability 9.0+ (the kernel launches as
a programmatic dependent of the one before it there), and --json writes every row.

    python benchmarks/sweep_mma.py --json mma_sweep.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_msconv import (BACK_TO_BACK, LAYERS, direct_call, eager, graphed, make_layer,  # noqa: E402
                          print_aligned, time_fn)

from fer_edge import _C  # noqa: E402
from fer_edge.kernels import kernel_unsupported, pack_krsc_weights  # noqa: E402

TILES_M = (16, 32, 48, 64)
MAX_REL_ERROR = 5e-3   # fp16, as make_dispatch.py accepts a kernel


def chunks_for(cin: int, c1: int, c3: int, c5: int) -> list[int]:
    """K chunks from 128, doubling, up to the first that holds the longest K whole."""
    kmax = max(k * k * cin for k, c in ((1, c1), (3, c3), (5, c5)) if c)
    out = [128]
    while out[-1] < kmax:
        out.append(out[-1] * 2)
    return out


def mma_call(x, fw, wp, bm: int, kchunk: int, pdl: bool = True):
    """fused_ms_conv's mma launch with this pixel tile and K chunk (its own buffers); pdl=False:
    an ordinary launch instead of a programmatic dependent one (compute capability 9.0+)."""
    n, c, h, w = x.shape
    c1, c3, c5 = (t.shape[0] for t in fw[::2])
    plan = _C.mma_plan(n, c, h, w, c1, c3, c5, _C.sm_count(x.device.index or 0), bm, kchunk)
    ws = torch.zeros(max(1, plan["workspace_floats"]), dtype=torch.float32, device=x.device)
    counters = torch.zeros(max(1, plan["counters"]), dtype=torch.int32, device=x.device)
    return direct_call(x, fw, wp, "mma", (ws, counters), mma_bm=bm, mma_kchunk=kchunk, mma_pdl=pdl), plan


def sweep(layers, batches, repeat: int, on_rows=lambda rows: None, planned_only: bool = False) -> list[dict]:
    rows = []
    sms = _C.sm_count(0)
    for n in batches:   # every layer at the first batch before the next batch: a time limit keeps those
        for name in layers:
            cin, hw, c1, c3, c5 = LAYERS[name]
            xs, fw, ws, (w_pad, b_pad) = make_layer(cin, hw, c1, c3, c5, n, torch.float16, "cuda", "nhwc")
            if why := kernel_unsupported(xs[0], *fw, kernel="mma"):
                print(f"{name} n={n}: the mma kernel cannot run it ({why})", file=sys.stderr)
                continue
            calls = BACK_TO_BACK if n <= 8 else 1
            with torch.inference_mode():
                ref = eager(xs[0], *ws).float()
                cudnn = {"eager": time_fn(lambda x: eager(x, *ws), xs, "cuda", repeat),
                         "graph": time_fn(graphed(lambda x: eager(x, *ws), xs, calls), xs, "cuda", repeat)}
                if c1 or c5:
                    pad5 = lambda x: F.relu(F.conv2d(x, w_pad, b_pad, padding=2))  # noqa: E731
                    cudnn["pad5"] = time_fn(pad5, xs, "cuda", repeat)
                    cudnn["graph5"] = time_fn(graphed(pad5, xs, calls), xs, "cuda", repeat)
                best = min(cudnn.values())
                wp = pack_krsc_weights(fw[0], fw[2], fw[4])
                chosen = _C.mma_plan(n, cin, hw, hw, c1, c3, c5, sms)
                # The planned tile first, as launched and (on 9.0+) as an ordinary launch: what
                # programmatic dependent launch gains; then every other tile (a time limit
                # keeps the first ones).
                planned = (chosen["tile_m"], chosen["kchunk"])
                tiles = [(*planned, True)] + ([(*planned, False)] if torch.cuda.get_device_capability() >= (9, 0)
                                              else [])
                if not planned_only:
                    tiles += [(bm, kchunk, True) for bm in TILES_M for kchunk in chunks_for(cin, c1, c3, c5)
                              if (bm, kchunk) != planned]
                for bm, kchunk, pdl in tiles:
                    call, plan = mma_call(xs[0], fw, wp, bm, kchunk, pdl)
                    replay = graphed(call, xs, calls)   # checked as timed: back to back in a graph
                    err = ((replay(xs[0]).float() - ref).norm() / ref.norm()).item()
                    us = time_fn(replay, xs, "cuda", repeat)
                    rows.append({
                        "layer": name, "batch": n, "channels": [cin, c1, c3, c5], "hw": hw,
                        "cc": ".".join(map(str, torch.cuda.get_device_capability())), "sm_count": sms,
                        "tile_m": bm, "kchunk": kchunk, "pdl": pdl, "units": plan["units"],
                        "workspace_floats": plan["workspace_floats"], "us": round(us, 2),
                        "rel_err": float(f"{err:.2e}"), "ok": err <= MAX_REL_ERROR,
                        "planned": bm == chosen["tile_m"] and kchunk == chosen["kchunk"] and pdl,
                        "cudnn_best_us": round(best, 2), "speedup_vs_best": round(best / us, 3),
                        "graph_calls": calls})
                    on_rows(rows)
            print(f"{name} n={n}: cuDNN best {best:.1f} us, planned tile {chosen['tile_m']}x{chosen['kchunk']}",
                  file=sys.stderr)
    return rows


def print_table(rows, top: int) -> None:
    """Per layer and batch: the `top` fastest correct tiles and the planned one."""
    lines = [["layer", "n", "tile_m", "kchunk", "blocks", "us", "x cudnn", "rel err", ""]]
    groups = {}
    for r in rows:
        groups.setdefault((r["layer"], r["batch"]), []).append(r)
    for group in groups.values():
        ranked = sorted((r for r in group if r["ok"]), key=lambda r: r["us"])
        shown = ranked[:top] + [r for r in group if (r["planned"] or not r.get("pdl", True))
                                and r not in ranked[:top]]
        wrong = [r for r in group if not r["ok"]]
        for r in shown + wrong:
            note = (("planned " if r["planned"] else "") + ("" if r.get("pdl", True) else "ordinary launch ")
                    + ("" if r["ok"] else "WRONG"))
            lines.append([r["layer"], str(r["batch"]), str(r["tile_m"]), str(r["kchunk"]), str(r["units"]),
                          f"{r['us']:.1f}", f"{r['speedup_vs_best']:.2f}", f"{r['rel_err']:.1e}", note.strip()])
    print_aligned(lines, left_last=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", choices=[k for k in LAYERS if k != "L1"],
                   default=["L2", "L3", "L4", "L5", "P2", "P3", "P4", "P5"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeat", type=int, default=30, help="timed replays per tile")
    p.add_argument("--top", type=int, default=4, help="fastest tiles shown per layer")
    p.add_argument("--planned-only", action="store_true",
                   help="time only the planned tile (and, on 9.0+, it as an ordinary launch)")
    p.add_argument("--json", help="write every row to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or not hasattr(_C, "msconv_cuda"):
        print("sweep_mma: needs a CUDA GPU and fer_edge built with CUDA", file=sys.stderr)
        return 2
    if torch.cuda.get_device_capability() < (8, 0):
        print("sweep_mma: the mma kernel needs compute capability 8.0+", file=sys.stderr)
        return 2
    if any(b < 1 for b in args.batches) or args.repeat < 1 or args.top < 1:
        print("sweep_mma: batches, --repeat and --top must be >= 1", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True    # cuDNN's best algorithm per shape, as bench_msconv.py lets it
    torch.backends.cudnn.allow_tf32 = False

    def save(rows):  # after every tile, so a time limit keeps what was measured
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            tmp.replace(args.json)

    rows = sweep(args.layers, args.batches, args.repeat, save, planned_only=args.planned_only)
    save(rows)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, fp16 channels_last, "
          f"{BACK_TO_BACK} calls per graph at batch <= 8")
    print_table(rows, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
