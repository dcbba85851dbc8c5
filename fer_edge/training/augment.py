"""Batched augmentation on whatever device the batch lives on (the GPU when
training there), driven by an explicit ``torch.Generator`` so a run is
reproducible and a resumed run draws exactly the numbers the uninterrupted one
would have.

Every function takes a normalized float batch (N, C, H, W) and returns one of
the same shape; none touches global RNG state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(n: int, g: torch.Generator, device) -> torch.Tensor:
    # Draw on the generator's device, then move: CPU and CUDA generators give
    # different streams, and the generator decides which one we get.
    return torch.rand(n, generator=g, device=g.device).to(device)


def random_flips(x: torch.Tensor, g: torch.Generator, p_h: float, p_v: float) -> torch.Tensor:
    """Horizontal flip with probability p_h and vertical with p_v, per image (exact, no resampling)."""
    n = x.shape[0]
    h = (_rand(n, g, x.device) < p_h).view(n, 1, 1, 1)
    v = (_rand(n, g, x.device) < p_v).view(n, 1, 1, 1)
    if p_h > 0:
        x = torch.where(h, x.flip(3), x)
    if p_v > 0:
        x = torch.where(v, x.flip(2), x)
    return x


def affine_matrices(n: int, g: torch.Generator, device, size: tuple[int, int], *, shift: int = 0,
                    degrees: float = 0.0, scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """(n, 2, 3) matrices for ``F.affine_grid`` (output -> input coordinates in [-1, 1]).

    shift: integer pixel translation in [-shift, shift] on each axis; with no
    rotation/scale this samples exact pixel centres, i.e. the classic
    "pad by `shift` and random-crop" augmentation.
    """
    h, w = size
    u = torch.rand(n, 4, generator=g, device=g.device).to(device)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = torch.floor(u[:, 2] * (2 * shift + 1)) - shift
    ty = torch.floor(u[:, 3] * (2 * shift + 1)) - shift
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([
        torch.stack([cos, -sin * h / w, tx * 2 / w], dim=1),
        torch.stack([sin * w / h, cos, ty * 2 / h], dim=1),
    ], dim=1)
    return theta


def random_affine(x: torch.Tensor, g: torch.Generator, *, shift: int = 0, degrees: float = 0.0,
                  scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Random shift / rotation / zoom in one resampling; outside pixels become 0
    (the dataset mean after normalization)."""
    if shift == 0 and degrees == 0 and scale == (1.0, 1.0):
        return x
    theta = affine_matrices(x.shape[0], g, x.device, x.shape[-2:], shift=shift, degrees=degrees, scale=scale)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float, area: tuple[float, float] = (0.02, 0.25),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Zero one random rectangle per image with probability p (Zhong et al.),
    vectorized: a mask built from per-image boxes, no Python loop over images."""
    if p <= 0:
        return x
    n, _, h, w = x.shape
    u = torch.rand(n, 5, generator=g, device=g.device).to(x.device)
    a = (area[0] + u[:, 0] * (area[1] - area[0])) * h * w
    log_r = math.log(ratio[0]) + u[:, 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    r = torch.exp(log_r)
    eh = torch.sqrt(a * r).round().clamp(1, h)
    ew = torch.sqrt(a / r).round().clamp(1, w)
    top = torch.floor(u[:, 2] * (h - eh + 1))
    left = torch.floor(u[:, 3] * (w - ew + 1))
    on = (u[:, 4] < p).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)) & on)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def augment(x: torch.Tensor, g: torch.Generator, aug: dict) -> torch.Tensor:
    """Apply a recipe's augmentation dict (see ``recipes.RECIPES``) to a batch."""
    x = random_flips(x, g, aug.get("hflip", 0.0), aug.get("vflip", 0.0))
    x = random_affine(x, g, shift=aug.get("shift", 0), degrees=aug.get("degrees", 0.0),
                      scale=tuple(aug.get("scale", (1.0, 1.0))))
    return random_erasing(x, g, aug.get("erasing", 0.0))


def beta_draw(alpha: float, g: torch.Generator) -> float:
    """One Beta(alpha, alpha) sample from the generator (torch.distributions ignores generators)."""
    a = torch._standard_gamma(torch.full((2,), alpha, device=g.device), generator=g)
    return float(a[0] / a.sum())


def mixup(x: torch.Tensor, y_onehot: torch.Tensor, g: torch.Generator, alpha: float):
    """Mixup (Zhang et al.) with one Beta(alpha, alpha) draw per batch, partner = reversed batch."""
    if alpha <= 0:
        return x, y_onehot
    lam = beta_draw(alpha, g)
    return lam * x + (1 - lam) * x.flip(0), lam * y_onehot + (1 - lam) * y_onehot.flip(0)


def cutmix_box(lam: float, h: int, w: int, cy: float, cx: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pasted box: area (1 - lam) of the image,
    centred at (cy, cx) in [0, 1), clipped to the image (Yun et al.)."""
    r = (1.0 - lam) ** 0.5
    bh, bw = int(round(h * r)), int(round(w * r))
    y, x = int(cy * h), int(cx * w)
    return max(0, y - bh // 2), min(h, y + bh - bh // 2), max(0, x - bw // 2), min(w, x + bw - bw // 2)


def cutmix(x: torch.Tensor, y_onehot: torch.Tensor, g: torch.Generator, alpha: float):
    """CutMix (Yun et al.): one box per batch from the reversed batch; the targets
    are mixed by the box's real (clipped) area."""
    if alpha <= 0:
        return x, y_onehot
    lam = beta_draw(alpha, g)
    cy, cx = torch.rand(2, generator=g, device=g.device).tolist()
    h, w = x.shape[-2:]
    t, b, l, r = cutmix_box(lam, h, w, cy, cx)
    out = x.clone()
    out[..., t:b, l:r] = x.flip(0)[..., t:b, l:r]
    kept = 1.0 - (b - t) * (r - l) / (h * w)
    return out, kept * y_onehot + (1 - kept) * y_onehot.flip(0)


def mix_batch(x: torch.Tensor, y_onehot: torch.Tensor, g: torch.Generator, mixup_alpha: float,
              cutmix_alpha: float):
    """A recipe's batch mixing: mixup, CutMix, or with both on one of the two per
    batch at even odds (as timm does).  Nothing is drawn when both are off, so
    recipes without mixing keep their random streams."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = bool(torch.rand(1, generator=g, device=g.device).item() < 0.5)
        return cutmix(x, y_onehot, g, cutmix_alpha) if use_cutmix else mixup(x, y_onehot, g, mixup_alpha)
    if cutmix_alpha > 0:
        return cutmix(x, y_onehot, g, cutmix_alpha)
    return mixup(x, y_onehot, g, mixup_alpha)
