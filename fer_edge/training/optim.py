"""What an optimizer step is made of: mixed precision (``amp_dtype``), the
optimizer and its schedule, the loss (``label_loss``, class weights)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_edge import UserError
from fer_edge.training.recipes import lr_factor

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def amp_dtype(amp: str, device: torch.device, capability: tuple[int, int] | None = None, log=None):
    """The autocast dtype for --amp on this device, or None for float32.

    auto follows the GPU: bfloat16 from compute capability 8.0 (Ampere) on,
    float16 below it (Pascal such as the P100, Volta, Turing: no bfloat16
    arithmetic), where the caller's GradScaler (enabled for float16) keeps
    small gradients from flushing to zero.  ``capability`` is the GPU's
    (major, minor); None asks torch for ``device``'s.  A forced bf16 on an
    older GPU is kept (the user asked for it) but noted once through ``log``.
    """
    if amp not in AMP_CHOICES:
        raise UserError(f"unknown --amp {amp!r}; choose {', '.join(AMP_CHOICES)}")
    if device.type != "cuda" or amp == "off":
        return None  # fp32 on CPU: bf16 autocast on CPU is slower than fp32 on most CPUs
    if amp == "fp16":
        return torch.float16
    if capability is None:
        capability = tuple(torch.cuda.get_device_capability(device))
    native_bf16 = tuple(capability) >= (8, 0)
    if amp == "auto":
        return torch.bfloat16 if native_bf16 else torch.float16
    if not native_bf16 and log is not None:
        log(f"note: --amp bf16 on a GPU of compute capability {capability[0]}.{capability[1]}, which has no "
            "native bfloat16 (8.0+ has): it is emulated, slowly, where it runs at all; --amp auto trains "
            "in float16 with gradient scaling here")
    return torch.bfloat16


def build_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    # No weight decay on BN affine terms and biases (1-D tensors): decaying them only hurts.
    # On CUDA the fused implementations update every tensor in one kernel (the
    # per-tensor loop is ~80 launches a step); CPU keeps the reference loop.
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    name = recipe["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=True, **fused)
    betas = tuple(recipe["betas"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=recipe["lr"], betas=betas, **fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=recipe["lr"], betas=betas, **fused)
    raise UserError(f"unknown optimizer {name!r}")


def make_scheduler(optimizer, recipe: dict, plan: dict, warmup_steps: int):
    """The recipe's schedule: ReduceLROnPlateau (stepped once per epoch with the
    validation loss) for "plateau", else a LambdaLR stepped after every optimizer
    step, whose length follows ``plan`` (read at every step: --time-budget)."""
    if recipe["schedule"] == "plateau":
        if warmup_steps:
            raise UserError(f"recipe {recipe['name']}: the plateau schedule has no warm-up")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **recipe["plateau"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, total_steps=plan["total_steps"], warmup_steps=warmup_steps, schedule=recipe["schedule"]))


def replan_lr(optimizer, scheduler) -> None:
    """After the plan's length changed (--time-budget), the next step's learning
    rate from the re-planned schedule (a plateau does not depend on the epochs)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)


def class_weight_vector(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights with mean 1 over the classes present (absent classes weigh 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def label_loss(logits, head_logits, target, weight, label_smoothing: float, aux_weight: float):
    """Cross-entropy of the model's output against the (soft) targets: for
    HSNet, the gated sum of its FGAL heads (the paper's Eq. 21).  With
    aux_weight > 0, plus aux_weight x the mean cross-entropy of the ungated
    heads (``head_logits``), an option of ours, not the paper's."""
    loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)
    if head_logits and aux_weight > 0:
        aux = sum(F.cross_entropy(y.float(), target, weight=weight, label_smoothing=label_smoothing)
                  for y in head_logits) / len(head_logits)
        loss = loss + aux_weight * aux
    return loss
