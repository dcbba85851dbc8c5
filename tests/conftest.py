"""Shared test setup.

The tests exercise the *installed* package (with its compiled ``fer_edge._C``),
never the source folder: pyproject sets ``--import-mode=importlib`` so the
repository root is not put on sys.path.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FER_EDGE_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    import fer_edge

    where = Path(fer_edge.__file__).resolve().parent
    if where == REPO / "fer_edge":
        pytest.exit(
            "fer_edge is imported from the source folder, not the installed package: "
            "run `pip install '.[all]'` and then `pytest` from the repository root",
            returncode=4,
        )


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU visible on this machine")
