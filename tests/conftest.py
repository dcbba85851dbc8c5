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
import sys  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import DATA, copy_subset  # noqa: E402
from helpers import run_cli as run  # noqa: E402

FER = DATA / "fer2013"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The embedded default model (MACNN width 0.25, trained on FER2013) with
    real calibration faces and disjoint parity faces: a converged model, as
    users convert, in no time.  (A briefly trained one sits near its decision
    boundaries on every face, so int8 rounding flips it far more often than
    it flips a real model: its agreement measures the fixture, not the export.)"""
    import shutil

    from fer_edge.weights import default_weights

    if not FER.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    root = tmp_path_factory.mktemp("conv")
    calib = copy_subset(FER / "publictest", root / "calib", 40)
    # Parity faces disjoint from the calibration faces (convert --parity-data): the next 60 of each class.
    copy_subset(FER / "publictest", root / "check", 60, offset=40)
    weights = root / "model.safetensors"
    shutil.copy(default_weights(), weights)
    return weights, calib, root


@pytest.fixture(scope="session")
def bundles(trained):
    weights, calib, root = trained
    out = {}
    from fer_edge.converters.formats import FORMATS

    for f in FORMATS:
        b = root / f"bundle-{f.target}-{f.precision}"
        proc = run("convert", "--weights", weights, "--target", f.target, "--precision", f.precision,
                   "--calib", calib, "--parity-data", root / "check", "--out", b)
        out[(f.target, f.precision)] = (b, proc)
    return out


