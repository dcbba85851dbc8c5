"""An exponential moving average of a model's weights, the model that is
validated and saved when a recipe sets ``ema``.

Averaged are the parameters and the BatchNorm running statistics (every
floating-point entry of the state dict); integer entries (BatchNorm's batch
counter) are copied.  The averaged copy is never trained: it only follows.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fer_edge.training.recipes import ema_decay


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs = self._float_pairs(model)

    def _float_pairs(self, model: nn.Module):
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        others = [k for k, v in ours.items() if not v.is_floating_point()]
        return ([ours[k] for k in floats], [theirs[k] for k in floats],
                [ours[k] for k in others], [theirs[k] for k in others])

    @torch.no_grad()
    def update(self) -> None:
        """One optimizer step later: avg <- d * avg + (1 - d) * weights (one fused kernel on CUDA)."""
        self.updates += 1
        avg, cur, avg_int, cur_int = self._pairs
        torch._foreach_lerp_(avg, cur, 1.0 - ema_decay(self.decay, self.updates))
        for a, c in zip(avg_int, cur_int):
            a.copy_(c)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.module.load_state_dict(state["module"])
