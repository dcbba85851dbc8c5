"""The ``fer-edge`` command line.

Every sub-command is a function ``cmd_<name>(args) -> int`` registered in
``COMMANDS``; errors the user can fix are raised as ``fer_edge.UserError`` and
printed as one line on stderr with a non-zero exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from fer_edge import UserError, __version__


def cmd_info(args: argparse.Namespace) -> int:
    from fer_edge import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_text(data))
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show versions, compiled kernels, runtimes and GPU",
                      description="Versions of fer-edge, Python, torch and the runtimes; whether the CPU and "
                      "CUDA kernels were compiled in; the GPU torch sees; the embedded default model; the "
                      "kernel dispatch table.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_info)


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from fer_edge.checkpoint import load_checkpoint, max_relative_logit_error, save_checkpoint
    from fer_edge.reparam import merge

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    model, meta = load_checkpoint(args.weights)
    if meta["form"] == "merged":
        raise UserError(f"{args.weights} is already merged (nothing to do)")
    merged = merge(model, use_kernel=True)
    # A seeded sample in the model's normalized input space; float64 proves the
    # algebra (should be ~1e-15), float32 through the deployed path is what ships.
    size = meta["preprocess"]["input_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, meta["config"]["in_chans"], *size, generator=g)
    with torch.no_grad():
        ref = model(x)
        err32 = max_relative_logit_error(merged(x), ref)
        m64 = copy.deepcopy(model).double()
        err64 = max_relative_logit_error(merge(m64, use_kernel=False)(x.double()), m64(x.double()))
    print(f"max |logit difference| / max |logit| on {args.samples} samples: "
          f"{err32:.2e} (float32, deployed path), {err64:.2e} (float64)")
    if not (err32 <= args.tolerance and err64 <= 1e-9):
        raise UserError(f"merged model differs from the trained one by {err32:.2e} (tolerance "
                        f"{args.tolerance:.0e}); nothing written")
    save_checkpoint(out, merged, classes=meta["classes"], preprocess=meta["preprocess"],
                    extra=meta.get("extra"), force=args.force)
    n_train = sum(p.numel() for p in model.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    print(f"wrote {out} ({meta['arch']}, {n_train:,} -> {n_merged:,} parameters)")
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge a trained checkpoint into its deploy form (BN folded, square kernels)",
                      description="Write the deploy form of a train-form checkpoint (BatchNorm folded, asymmetric "
                      "kernels summed into square ones, multi-scale layers fused) after checking on a sample "
                      "that its logits match the trained model's within --tolerance; nothing is written "
                      "otherwise.")
    p.add_argument("--weights", required=True, help="train-form checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="merged checkpoint to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |logit difference| / max |logit| allowed in float32 (default 1e-4)")
    p.add_argument("--samples", type=int, default=8, help="inputs in the check (default 8)")
    p.set_defaults(func=cmd_merge)


# name -> function adding the sub-parser; one place lists every command.
# name -> "module:function adding the sub-parser"; one place lists every
# command, and a command's module (torch, onnx, ...) is imported only to build it.
COMMANDS = {
    "info": "fer_edge.cli:_add_info",
    "train": "fer_edge.training.command:add_train_parser",
    "eval": "fer_edge.training.command:add_eval_parser",
    "calibrate": "fer_edge.calibrate:add_calibrate_parser",
    "teacher-logits": "fer_edge.training.command:add_teacher_logits_parser",
    "merge": "fer_edge.cli:_add_merge",
    "convert": "fer_edge.converters.convert:add_convert_parser",
    "parity": "fer_edge.converters.convert:add_parity_parser",
    "benchmark": "fer_edge.converters.benchmark:add_benchmark_parser",
    "keygen": "fer_edge.converters.keys:add_keygen_parser",
    "predict": "fer_edge.predict:add_predict_parser",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the usage block is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fer-edge",
        description="Facial-expression recognition: train, merge, convert for Jetson/Android, run on device.",
    )
    parser.add_argument("--version", action="version", version=f"fer-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for target in COMMANDS.values():
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"fer-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fer-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
