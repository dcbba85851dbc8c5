#!/usr/bin/env python
"""Pack a checkpoint into float16 parts of at most --chunk-mib MiB for
transfer from a GPU machine, and join the parts back into a float32
checkpoint: a full-width MACNN is 76 MB in float32, 38 MB as float16.

  pack:   float tensors stored as float16 (half the bytes; a trained
          network's weights and BN statistics are well inside float16's
          range, and a tensor that is not stays float32), the bytes split
          into parts of at most --chunk-mib:
              python benchmarks/ship_weights.py pack runs/macnn-best/best.safetensors $OUT/macnn-best
          -> $OUT/macnn-best.part00, .part01, ...
  unpack: the parts joined, float tensors back to float32, the checkpoint's
          metadata kept (with a note that the weights went through float16):
              python benchmarks/ship_weights.py unpack gpu-out/macnn-best.part* macnn-best.safetensors

Re-evaluate an unpacked model before quoting its accuracy: float16 rounding
of the weights moves logits by ~1e-3 relative, rarely a prediction.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import load, save

META_KEY = "fer_edge"
FP16_MAX = torch.finfo(torch.float16).max


def to_half(state: dict) -> tuple[dict, list[str]]:
    """Float32 tensors as float16 where they fit; returns (state, names kept float32)."""
    out, kept = {}, []
    for name, t in state.items():
        fits = t.numel() == 0 or t.abs().max().item() < FP16_MAX
        if t.dtype == torch.float32 and fits:
            out[name] = t.half()
        else:
            if t.dtype == torch.float32:
                kept.append(name)
            out[name] = t
    return out, kept


def header_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors byte string (its JSON header)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


def pack(src: Path, prefix: Path, chunk_mib: float) -> list[Path]:
    blob_src = src.read_bytes()
    meta = header_metadata(blob_src)
    if META_KEY not in meta:
        raise SystemExit(f"{src}: not a fer-edge checkpoint")
    state, kept = to_half(load(blob_src))
    info = json.loads(meta[META_KEY])
    info.setdefault("extra", {})["shipped_as_float16"] = {
        "source_sha256": hashlib.sha256(blob_src).hexdigest(), "kept_float32": kept}
    blob = save(state, metadata={META_KEY: json.dumps(info)})
    step = int(chunk_mib * 2**20)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(blob), step):
        part = prefix.with_name(f"{prefix.name}.part{i // step:02d}")
        part.write_bytes(blob[i:i + step])
        parts.append(part)
    print(f"{src} ({len(blob_src) / 2**20:.1f} MiB) -> {len(parts)} part(s), {len(blob) / 2**20:.1f} MiB as float16"
          + (f"; kept float32: {', '.join(kept)}" if kept else ""))
    return parts


def unpack(parts: list[Path], dst: Path) -> None:
    parts = sorted(parts)
    numbers = [int(p.name.rsplit(".part", 1)[-1]) for p in parts]
    if numbers != list(range(len(parts))):
        raise SystemExit(f"parts {numbers} are not .part00 ... .part{len(parts) - 1:02d}: one is missing")
    blob = b"".join(p.read_bytes() for p in parts)
    (n,) = struct.unpack("<Q", blob[:8])
    if len(blob) < 8 + n:
        raise SystemExit("the joined parts end inside the header: the last part is missing")
    meta = header_metadata(blob)
    state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in load(blob).items()}
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(save(state, metadata=meta))
    tmp.replace(dst)
    print(f"{len(parts)} part(s) -> {dst} ({dst.stat().st_size / 2**20:.1f} MiB, float32)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("checkpoint", type=Path)
    a.add_argument("prefix", type=Path, help="parts are written as PREFIX.part00, PREFIX.part01, ...")
    a.add_argument("--chunk-mib", type=float, default=15.5)
    b = sub.add_parser("unpack")
    b.add_argument("parts", type=Path, nargs="+")
    b.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.checkpoint, args.prefix, args.chunk_mib)
    else:
        unpack(args.parts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
