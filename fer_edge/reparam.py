"""Re-parameterization: train-time branches -> deploy-time square kernels.

Small pure functions, tensor in, tensor out (the style of DiverseBranchBlock's
dbb_transforms.py).  A kernel is OIHW; a bias is (O,).  ``merge(model)``
applies them to a whole network by duck typing: every module that has a
``merged()`` method is replaced by what that method returns (as timm's
``reparameterize_model`` does with ``switch_to_deploy``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "fuse_bn",
    "pad_kernel_to",
    "add_to_center",
    "acblock_kernel",
    "fold_conv_bn",
    "merge",
    "is_merged",
]


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None = None):
    """Fold eval-mode BatchNorm into the convolution before it.

    bn(conv(x) + c) = gamma * (conv(x) + c - mean) / sqrt(var + eps) + beta
                    = conv_{kernel * t}(x) + beta + (c - mean) * t,   t = gamma / sqrt(var + eps)
    """
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    t = gamma / std
    mean = bn.running_mean if conv_bias is None else bn.running_mean - conv_bias
    return kernel * t.reshape(-1, 1, 1, 1), beta - mean * t


def pad_kernel_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (possibly non-square) kernel symmetrically to size x size.

    The kernel's centre stays the centre: a convolution with padding k//2 and
    the padded kernel with padding size//2 compute the same thing.
    """
    kh, kw = kernel.shape[-2:]
    if (size - kh) % 2 or (size - kw) % 2 or kh > size or kw > size:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {size}x{size}")
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def add_to_center(square: torch.Tensor, thin: torch.Tensor) -> torch.Tensor:
    """Add a d x 1 or 1 x d kernel into the centre column/row of a d x d kernel."""
    return square + pad_kernel_to(thin, square.shape[-1])


def acblock_kernel(square, bn_square, ver, bn_ver, hor, bn_hor):
    """ACNet: the three BN-folded kernels d x d + d x 1 + 1 x d as one d x d kernel and bias."""
    k, b = fuse_bn(square, bn_square)
    kv, bv = fuse_bn(ver, bn_ver)
    kh, bh = fuse_bn(hor, bn_hor)
    return add_to_center(add_to_center(k, kv), kh), b + bv + bh


def fold_logit_affine(weight: torch.Tensor, bias: torch.Tensor, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear layer (weight, bias) followed by per-class ``logit * scale + shift``
    (vector scaling) as one Linear layer: rows scaled, bias scaled and shifted."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    shift = torch.as_tensor(shift, dtype=torch.float64)
    new_weight = (weight.double() * scale[:, None]).to(weight.dtype)
    new_bias = (bias.double() * scale + shift).to(bias.dtype)
    return new_weight, new_bias


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to bn(conv(x)) in eval mode."""
    kernel, bias = fuse_bn(conv.weight, bn, conv.bias)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    ).to(device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
    return fused


@torch.no_grad()
def merge(model: nn.Module, use_kernel: bool = True) -> nn.Module:
    """A merged deep copy of ``model``: every block with a ``merged()`` method
    is replaced by its deploy form (BN folded, asymmetric kernels summed into
    square ones).  The original stays untouched and trainable.

    use_kernel: merged MAConv layers run fer_edge's fused kernel; pass False
    for the plain three-convolution path (ONNX/TFLite export).
    """
    out = copy.deepcopy(model).eval()
    if hasattr(out, "merged") and callable(out.merged):
        return out.merged(use_kernel=use_kernel)
    _merge_children(out, use_kernel)
    if hasattr(out, "on_merged"):
        out.on_merged()
    return out


def _merge_children(module: nn.Module, use_kernel: bool) -> None:
    for name, child in list(module.named_children()):
        if hasattr(child, "merged") and callable(child.merged):
            setattr(module, name, child.merged(use_kernel=use_kernel))
        else:
            _merge_children(child, use_kernel)


def is_merged(model: nn.Module) -> bool:
    """True when no BatchNorm (nor anything with a merged() form) is left."""
    return not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) or (m is not model and hasattr(m, "merged"))
        for m in model.modules()
    )
