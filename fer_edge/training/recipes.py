"""Training recipes: one table, every number that defines a recipe in one place.

``paper``: the MACNN paper's setting (Adam, lr 1e-4, batch 32, 100 epochs,
30% horizontal and 30% vertical flips, constant learning rate).

``best``: our strongest for 48x48 gray faces: SGD with Nesterov momentum, one
warm-up epoch then cosine decay, label smoothing, pad-4 random crop (integer
shifts), horizontal flip, small rotation/zoom and random erasing.  Vertical
flips are left out: upside-down faces never reach the model on a device.
"""
from __future__ import annotations

import copy

from fer_edge import UserError

RECIPES: dict[str, dict] = {
    "paper": {
        "epochs": 100,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "schedule": "constant",
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "mixup": 0.0,
        "augment": {"hflip": 0.3, "vflip": 0.3},
    },
    "best": {
        "epochs": 60,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "label_smoothing": 0.1,
        "mixup": 0.0,
        "augment": {"hflip": 0.5, "vflip": 0.0, "shift": 4, "degrees": 10.0, "scale": [0.9, 1.1],
                    "erasing": 0.25},
    },
}


def get_recipe(name: str, **overrides) -> dict:
    """A copy of the named recipe with the user's non-None overrides applied."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose {', '.join(RECIPES)}")
    recipe = copy.deepcopy(RECIPES[name])
    recipe["name"] = name
    for key, value in overrides.items():
        if value is not None:
            if key not in recipe:
                raise KeyError(key)
            recipe[key] = value
    if recipe["epochs"] < 1 or recipe["batch_size"] < 1 or recipe["lr"] <= 0:
        raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")
    return recipe


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at an optimizer step (pure, for LambdaLR)."""
    import math

    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"unknown schedule {schedule!r}")
