"""``fer-edge merge``: a train-form checkpoint into its deploy form (BN folded,
square kernels), written only when its logits match the trained model's."""
from __future__ import annotations

import argparse
import copy

from fer_edge import UserError
from fer_edge.argtypes import float_in, int_in

SAMPLES = int_in(1, 1024)
TOLERANCE = float_in(0, 1, low_open=True)


def cmd_merge(args: argparse.Namespace) -> int:
    from fer_edge.commands.common import check_output_file, check_outputs_spare_inputs
    from fer_edge.commands.convert import checkpoint_path

    out = check_output_file(args.out, args.force)
    check_outputs_spare_inputs({"--out": args.out}, {"--weights": args.weights})
    weights = checkpoint_path(args.weights)

    import torch

    from fer_edge.checkpoint import load_checkpoint, max_relative_logit_error, save_checkpoint
    from fer_edge.reparam import merge

    model, meta = load_checkpoint(weights)
    if meta["form"] == "merged":
        raise UserError(f"{weights} is already merged (nothing to do)")
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
    try:
        save_checkpoint(out, merged, classes=meta["classes"], preprocess=meta["preprocess"],
                        extra=meta.get("extra"), force=args.force)
    except OSError as exc:
        from fer_edge.fileio import os_error_line

        raise UserError(os_error_line(exc, out)) from None
    n_train = sum(p.numel() for p in model.parameters())
    n_merged = sum(p.numel() for p in merged.parameters())
    print(f"wrote {out} ({meta['arch']}, {n_train:,} -> {n_merged:,} parameters)")
    return 0


def add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge a trained checkpoint into its deploy form (BN folded, square kernels)",
                       description="Write the deploy form of a train-form checkpoint (BatchNorm folded, asymmetric "
                       "kernels summed into square ones, multi-scale layers fused) after checking on a sample "
                       "that its logits match the trained model's within --tolerance; nothing is written "
                       "otherwise.")
    p.add_argument("--weights", required=True, help="train-form checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="merged checkpoint to write (its parent folders are made)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--tolerance", type=TOLERANCE, default=1e-4,
                   help="max |logit difference| / max |logit| allowed in float32, in (0, 1] (default 1e-4)")
    p.add_argument("--samples", type=SAMPLES, default=8, help="inputs in the check, 1 to 1024 (default 8)")
    p.set_defaults(func=cmd_merge)
