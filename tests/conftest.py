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

    where = Path(fer_edge.__file__).resolve().parent
    if where == REPO / "fer_edge":
        pytest.exit(
            "fer_edge is imported from the source folder, not the installed package: "
            "run `pip install '.[all]'` and then `pytest` from the repository root",
            returncode=4,
        )

