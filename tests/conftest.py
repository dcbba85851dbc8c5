"""Shared test setup.

The tests exercise the *installed* package (with its compiled ``fer_edge._C``),
never the source folder: pyproject sets ``--import-mode=importlib`` so the
repository root is not put on sys.path.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    import fer_edge
    import torch

    # fp32 references on CUDA must be fp32: cuDNN convolutions default to TF32
    # (10-bit mantissa), ~1e-3 relative error, which no fp32 tolerance here allows.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    where = Path(fer_edge.__file__).resolve().parent
    if where == REPO / "fer_edge":
        pytest.exit(
            "fer_edge is imported from the source folder, not the installed package: "
            "run `pip install '.[all]'` and then `pytest` from the repository root",
            returncode=4,
        )



# ---------------------------------------------------------------- shared fixtures
# A briefly trained model and its bundles, built once per test session and used
# by the converter and on-device runtime tests.
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import DATA, copy_subset  # noqa: E402
from helpers import run_cli as run  # noqa: E402

FER = DATA / "fer2013"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A MACNN (width 0.25) trained for a few epochs on 4,000 real FER2013 faces:
    random weights predict one class, which would make agreement meaningless."""
    if not FER.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    root = tmp_path_factory.mktemp("conv")
    calib = copy_subset(FER / "publictest", root / "calib", 40)
    proc = run("train", "--model", "macnn", "--width", "0.25", "--data", FER / "train", "--limit", "4000",
               "--val", calib, "--epochs", "4", "--batch-size", "32", "--recipe", "paper", "--lr", "1e-3",
               "--out", root / "run", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = root / "run" / "best.safetensors"
    rep = json.loads((root / "run" / "val_eval.json").read_text())
    # calib is class-balanced: chance is 1/7; a useful model spreads its predictions over classes
    assert rep["accuracy"] > 0.25, f"the briefly trained model should beat chance (14%), got {rep['accuracy']:.3f}"
    assert (np.array(rep["confusion_matrix"]).sum(axis=0) > 0).sum() >= 3, "predicts almost one class"
    return weights, calib, root


@pytest.fixture(scope="session")
def bundles(trained):
    weights, calib, root = trained
    out = {}
    from fer_edge.converters.formats import FORMATS

    for f in FORMATS:
        b = root / f"bundle-{f.target}-{f.precision}"
        proc = run("convert", "--weights", weights, "--target", f.target, "--precision", f.precision,
                   "--calib", calib, "--out", b)
        out[(f.target, f.precision)] = (b, proc)
    return out


