"""The model embedded in the package (no torch needed to find it).

eval, convert, predict and benchmark use it when no --weights is given.  Its
model card is the JSON beside the weights, written out in docs/model-card.md
and summarised by ``fer-edge info``.
"""
from __future__ import annotations

import json
from pathlib import Path

from fer_edge import UserError

DEFAULT_MODEL = "macnn-w0.25-fer2013"
WEIGHTS_DIR = Path(__file__).resolve().parent


def default_card() -> dict:
    """The default model's card (name, file, sha256, data, commands, accuracy)."""
    path = WEIGHTS_DIR / f"{DEFAULT_MODEL}.json"
    if not path.is_file():
        raise UserError(f"the embedded default model is missing from this installation ({path}); pass --weights")
    return json.loads(path.read_text(encoding="utf-8"))


def default_weights(card: dict | None = None) -> Path:
    """Path of the default model's safetensors file (``card``: default_card(), if already read)."""
    path = WEIGHTS_DIR / (card or default_card())["file"]
    if not path.is_file():
        raise UserError(f"the embedded default model is missing from this installation ({path}); pass --weights")
    return path
