"""Where a training step's time goes: images/s of one optimizer step per model
and memory format (synthetic data already on the device, the trainer's AMP
and optimizer), then a torch.profiler table of the slowest model's kernels.

    python benchmarks/profile_train.py --device cuda --models macnn vgg16 --json FILE

Why: on the H100 (2026-11-23) MACNN's train form trained at ~5,000 img/s
against VGG16's ~15,000 with the same recipe, and four runs side by side each
kept that rate, so the step is not bound by the GPU's arithmetic.  This table
says which of memory format, batch size or single kernels is to blame.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def step_fn(model, opt, dtype, channels_last):
    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def images_per_s(step, x, y, device, steps):
    """(images/s of `steps` timed steps, loss of the first step, loss of the last):
    every step trains on the same batch, so the loss must fall (a real step is timed)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = step(x, y)
    for _ in range(2):  # cuDNN autotuning and allocator warm-up
        step(x, y)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step(x, y)
    sync()
    wall = time.perf_counter() - t0
    return x.shape[0] * steps / wall, first.item(), last.item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["macnn", "vgg16"], choices=["macnn", "vgg16"])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--profile", default="macnn", choices=["macnn", "vgg16", ""],
                    help="model whose channels_last step is profiled ('' = none)")
    ap.add_argument("--json", help="write the rows (and the profile table) to this JSON file")
    args = ap.parse_args(argv)
    from fer_edge import models

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    print(f"{'model':8} {'batch':>5} {'layout':>13} {'img/s':>9} {'loss 1st':>10} {'last':>9}")
    for name in args.models:
        cfg = {"width": args.width}
        for bs in args.batch_sizes:
            for cl in (True, False):
                torch.manual_seed(0)
                model = models.create(name, num_classes=7, in_chans=1, **cfg).to(device)
                if cl:
                    model.to(memory_format=torch.channels_last)
                opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
                x = torch.randn(bs, 1, 48, 48, device=device)
                y = torch.randint(0, 7, (bs,), device=device)
                rate, first, last = images_per_s(step_fn(model, opt, dtype, cl), x, y, device, args.steps)
                layout = "channels_last" if cl else "nchw"
                rows.append({"model": name, "batch": bs, "layout": layout, "img_per_s": round(rate, 1),
                             "loss_first": round(first, 4), "loss_last": round(last, 4)})
                print(f"{name:8} {bs:5d} {layout:>13} {rate:9.0f} {first:10.4f} {last:9.4f}", flush=True)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "width": args.width, "rows": rows}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        cfg = {"width": args.width}
        model = models.create(args.profile, num_classes=7, in_chans=1, **cfg).to(device)
        model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
        bs = max(args.batch_sizes)
        x = torch.randn(bs, 1, 48, 48, device=device)
        y = torch.randint(0, 7, (bs,), device=device)
        step = step_fn(model, opt, dtype, True)
        for _ in range(3):
            step(x, y)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
        print(table)
        out["profile"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
