"""Helpers shared by the tests (imported by path: tests run in importlib mode)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FER_EDGE_DATA", REPO.parent / "shared" / "data"))
FER_PUBLICTEST = DATA / "fer2013" / "publictest"


@torch.no_grad()
def randomize_bn(model: nn.Module, input_shape, seed=0, batches=3):
    """Give every BatchNorm non-trivial statistics and affine parameters.

    First a few batches in train mode (real running statistics), then random
    running mean/var and affine terms, so a merge bug cannot hide behind
    mean 0 / var 1 / gamma 1 / beta 0.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    model.train()
    for _ in range(batches):
        model(torch.randn(*input_shape, generator=g).to(dtype))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.add_((torch.randn(c, generator=g) * 0.2).to(dtype))
            m.running_var.mul_((torch.rand(c, generator=g) + 0.5).to(dtype))
            m.weight.copy_(torch.randn(c, generator=g) * 0.3 + 1.0)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def load_fer_images(n=500, size=48, folder=FER_PUBLICTEST):
    """n real FER2013 faces, spread over the class folders, as a normalized
    float tensor (n, 1, size, size), and their labels (folder index)."""
    import cv2

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = []
    per = [sorted((folder / c).iterdir()) for c in classes]
    i = 0
    while len(files) < n:
        for label, lst in enumerate(per):
            if i < len(lst) and len(files) < n:
                files.append((lst[i], label))
        i += 1
    imgs = []
    for path, _ in files:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        assert img is not None, f"cannot read {path}"
        if img.shape != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        imgs.append(img)
    x = torch.from_numpy(np.stack(imgs)).float().div_(255).sub_(0.5).div_(0.5).unsqueeze(1)
    return x, torch.tensor([lab for _, lab in files])


def copy_subset(src: Path, dst: Path, per_class: int, offset: int = 0, classes=None) -> Path:
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        if classes and d.name not in classes:
            continue
        (dst / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[offset:offset + per_class]:
            shutil.copy(f, dst / d.name / f.name)
    return dst


# The console script pip installed beside this interpreter (venv/bin/fer-edge).
SCRIPT = Path(sys.executable).with_name("fer-edge")


def run_cli(*args, cwd=None, timeout=900):
    """`fer-edge ARGS` in a subprocess (2 OpenMP threads), output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def one_line_error(proc, expect):
    """A refused command: non-zero exit, no traceback, exactly one stderr line naming the problem."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr


# ---------------------------------------------------------------- crafted hostile images
def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG of ``width`` x ``height`` gray pixels, all zero: a few kB
    whatever the size, because zlib compresses the zero rows ~1000:1 (only
    the first 200 rows are stored; a decoder would fail there, after
    allocating the whole image)."""
    import struct
    import zlib

    rows = zlib.compress(b"\x00" * ((width + 1) * min(height, 200)), 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG whose frame header (after an APP0 segment) declares width x height."""
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + bytes(9)
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"
