"""Training recipes: one table, every number that defines a recipe in one place.

``paper``: the MACNN paper's setting (Adam, lr 1e-4, batch 32, 100 epochs).
Two readings are ours, not the paper's word: the paper names no schedule
(we keep the learning rate constant), and it "applies a 30% vertical and
horizontal flipping to the images in the dataset" (RAF-DB) without saying
how; here every training image is flipped each way with probability 0.3
whenever it is drawn.

``hsnet-paper``: the HSNet paper's setting (Adam, lr 0.01, betas 0.9 and
0.999, batch 32, 500 epochs, ReduceLROnPlateau when the validation loss has
not improved for 20 epochs, random horizontal flips and 5 degree rotations).
Ours where the paper gives no number: the plateau's factor and threshold
(PyTorch's defaults, 0.1 and a relative 1e-4), a flip probability of 0.5 and
rotations drawn uniformly in [-5, 5] degrees.

``best``: our strongest for 48x48 gray faces: SGD with Nesterov momentum, one
warm-up epoch then cosine decay, label smoothing, pad-4 random crop (integer
shifts), horizontal flip, small rotation/zoom and random erasing.  Vertical
flips are left out: upside-down faces never reach the model on a device.

``long``: ``best`` stretched for a GPU: 300 epochs of cosine decay, the
regularizers that won equal short CPU runs (stronger label smoothing and
weight decay), and an exponential moving average of the weights (the averaged
weights are the ones validated and saved).  Each is also a flag of
``fer-edge train``.

Every recipe carries every key (``RECIPE_KEYS``): 0 turns a regularizer off.
``schedule`` is "constant" or "cosine" (a factor of the learning rate at every
optimizer step, after ``warmup_epochs``) or "plateau" (ReduceLROnPlateau on
the validation loss, stepped once per epoch, with the ``plateau`` parameters).
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
        "cutmix": 0.0,
        "ema": 0.0,
        "augment": {"hflip": 0.3, "vflip": 0.3},
        "betas": [0.9, 0.999],
        "plateau": None,
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
        "cutmix": 0.0,
        "ema": 0.0,
        "augment": {"hflip": 0.5, "vflip": 0.0, "shift": 4, "degrees": 10.0, "scale": [0.9, 1.1],
                    "erasing": 0.25},
        "betas": [0.9, 0.999],
        "plateau": None,
    },
    "hsnet-paper": {
        "epochs": 500,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.01,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "schedule": "plateau",
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "ema": 0.0,
        "augment": {"hflip": 0.5, "vflip": 0.0, "degrees": 5.0},
        "betas": [0.9, 0.999],
        "plateau": {"mode": "min", "patience": 20, "factor": 0.1, "threshold": 1e-4, "threshold_mode": "rel"},
    },
}
# The winners of equal short CPU runs (docs/results.md, "Regularizers"): label
# smoothing 0.2 and weight decay 1e-3 beat `best`'s 0.1 and 5e-4; mixup and
# CutMix lost there and stay flags.  The weight average costs nothing and is
# reported beside the trained weights every epoch.
RECIPES["long"] = {**RECIPES["best"], "epochs": 300, "ema": 0.999, "label_smoothing": 0.2, "weight_decay": 1e-3}
# Keys added after runs were recorded, with the values those runs used: a run
# recorded without them resumes as if it had them (Adam's betas were PyTorch's
# defaults, 0.9 and 0.999; no plateau).
ADDED_KEYS = {"betas": [0.9, 0.999], "plateau": None}
RECIPE_KEYS = tuple(RECIPES["best"])

# (key, lowest, highest, whether the highest is allowed): what a user's override may be.
RANGES = {
    "epochs": (1, 100_000, True),
    "batch_size": (1, 1 << 20, True),
    "lr": (0.0, 10.0, True),
    "weight_decay": (0.0, 1.0, True),
    "label_smoothing": (0.0, 1.0, False),
    "mixup": (0.0, 100.0, True),
    "cutmix": (0.0, 100.0, True),
    "ema": (0.0, 1.0, False),
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
    for key, (lo, hi, hi_ok) in RANGES.items():
        check_range(key, recipe[key], lo, hi, hi_ok, exclusive_low=key == "lr")
    return recipe


def check_range(key: str, value, lo, hi, hi_ok: bool, exclusive_low: bool = False) -> None:
    """One line for a value out of its range (NaN and infinity included)."""
    import math

    flag = "--" + key.replace("_", "-")
    low_ok = value > lo if exclusive_low else value >= lo
    high_ok = value <= hi if hi_ok else value < hi
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low_ok and high_ok):
        lo_s = f"> {lo}" if exclusive_low else f">= {lo}"
        hi_s = f"<= {hi}" if hi_ok else f"< {hi}"
        raise UserError(f"{flag} {value}: must be a finite number {lo_s} and {hi_s}")


def ema_decay(decay: float, updates: int) -> float:
    """The averaging weight after ``updates`` optimizer steps: ``decay``, but
    smaller at first so that the average is not dominated by the random
    initial weights ((1 + n) / (10 + n), as TensorFlow's ExponentialMovingAverage
    with num_updates does)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


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
