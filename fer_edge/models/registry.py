"""Model registry: ``create(name, num_classes=7, in_chans=1, **config)``."""
from __future__ import annotations

from typing import Callable

from torch import nn

from fer_edge.contract import finite_number

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Sane bounds on every model config value, checked before a single layer is
# built.  A config comes from a checkpoint's metadata (untrusted: "width": 1e6
# asks for ~10**18 parameters, "num_classes": 10**9 for a head of billions of
# rows) or from a command line.  The bounds are far above anything fer-edge
# trains (MACNN width 0.125-1, 7-8 classes, HSNet 224 px) and low enough that
# the largest model allowed still fits in a few GB: width 2 is VGG16 at twice
# its channels (60M parameters).
# key -> (element type, lowest, highest, list length or None for a single value)
CONFIG_LIMITS: dict[str, tuple[type, float, float, int | None]] = {
    "num_classes": (int, 1, 1000, None),     # one head row per class
    "in_chans": (int, 1, 3, None),           # gray or RGB
    "input_size": (int, 32, 1024, None),     # MACNN's five 2x2 pools need 32 px; a face needs no more than 1024
    "width": (float, 0.01, 2.0, None),       # channel multiplier (MACNN, VGG16, hsnet-lite)
    "fpn_dim": (int, 4, 2048, None),         # hsnet-lite's lateral channels
    "dropout": (float, 0.0, 1.0, None),      # a probability
    "maconv_stages": (int, 1, 5, 5),         # which of MACNN's five stages get an MAConv
    "split": (float, 1e-3, 1e3, 3),          # MAConv's 1x1 : 3x3 : 5x5 channel ratios
    "dib": (bool, 0, 1, None),               # HSNet's ablation switches
    "fgal": (bool, 0, 1, None),
    "ktl": (bool, 0, 1, None),
    "freeze_stem": (bool, 0, 1, None),
}


def _check_value(key: str, value, kind: type, low: float, high: float) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        ok = False
    else:
        ok = finite_number(value) and low <= value <= high
    if not ok:
        what = "true or false" if kind is bool else f"{'an integer' if kind is int else 'a number'} in {low}..{high}"
        raise ValueError(f"model config {key}={value!r:.40}: must be {what}")


def check_config(config: dict) -> None:
    """ValueError (one line) for a config value outside ``CONFIG_LIMITS`` or of the
    wrong type; keys the table does not know are left to the model, which refuses them."""
    for key, value in config.items():
        if key not in CONFIG_LIMITS:
            continue
        kind, low, high, length = CONFIG_LIMITS[key]
        if length is None:
            _check_value(key, value, kind, low, high)
            continue
        if not isinstance(value, (list, tuple)) or len(value) > length:
            raise ValueError(f"model config {key}={value!r:.40}: must be a list of at most {length} values")
        for v in value:
            _check_value(key, v, kind, low, high)


# model name -> the Linear layer whose output is the logits, for models that have
# one: calibrations that act on each class's logit (vector scaling) fold into it.
LOGIT_LAYERS: dict[str, str] = {}


def register_model(name: str, logit_layer: str | None = None):
    def deco(fn):
        _MODELS[name] = fn
        if logit_layer is not None:
            LOGIT_LAYERS[name] = logit_layer
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create(name: str, num_classes: int = 7, in_chans: int = 1, **config) -> nn.Module:
    """Build a model by name; the model remembers its name and config (for
    checkpoints).  A bad name or config is a ValueError, raised before any
    layer is allocated."""
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"unknown model {name!r:.40}; known models: {', '.join(list_models())}")
    check_config(dict(config, num_classes=num_classes, in_chans=in_chans))
    try:
        model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, **config)
    except TypeError as exc:  # a config key this model does not take
        raise ValueError(f"{name}: {exc}") from None
    model.arch = name
    return model
