"""Model registry: ``create(name, num_classes=7, in_chans=1, **config)``."""
from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create(name: str, num_classes: int = 7, in_chans: int = 1, **config) -> nn.Module:
    """Build a model by name; the model remembers its name and config (for checkpoints)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, **config)
    model.arch = name
    return model
