"""One epoch of training, validation, and the --time-budget plan.

* The whole training set sits on the device as one uint8 tensor; a batch is an
  index gather + normalization + batched augmentation there.  No DataLoader
  workers, no JPEG decoding while the GPU waits.
* Data order and augmentation come from generators seeded by (seed, epoch,
  rank), dropout from the global RNG whose state is checkpointed: a resumed
  run draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_edge import UserError
from fer_edge.evaluate import normalize
from fer_edge.training.augment import augment, mix_batch
from fer_edge.training.distill import distillation_loss
from fer_edge.training.distributed import DistContext, from_main, sum_over_ranks, sync_buffers
from fer_edge.training.optim import label_loss, replan_lr


@dataclass
class Env:
    """Where and how the run computes (the same for every epoch)."""
    device: torch.device
    dtype: torch.dtype | None          # autocast dtype, None = float32
    channels_last: bool
    ctx: DistContext
    preprocess: dict
    num_classes: int
    log: object = print                # the main process's log (a no-op on the others)
    progress: bool = True


@dataclass
class DeviceData:
    """The training (and validation) faces and labels, on the device once."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @classmethod
    def of(cls, train_set, val_set, device: torch.device) -> "DeviceData":
        def put(a):
            return torch.from_numpy(a).to(device)

        return cls(put(train_set.images), put(train_set.labels),
                   put(val_set.images) if val_set is not None else None,
                   put(val_set.labels) if val_set is not None else None)


@dataclass
class Step:
    """Everything an optimizer step touches."""
    model: nn.Module          # the trained weights
    step_model: nn.Module     # the model as a step calls it (aux heads routed out, DDP, torch.compile)
    evaluated: nn.Module      # what is validated and saved: the weight average when the recipe has one
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    plateau: bool             # the schedule steps once per epoch, on the validation loss
    ema: object = None
    teacher: object = None
    class_weights: torch.Tensor | None = None


@dataclass
class Position:
    """Where the run stands (saved in resume.safetensors after every epoch)."""
    epochs: int                      # planned epochs (fewer once a --time-budget run has timed itself)
    plan: dict                       # {"total_steps", "decided"}: the LambdaLR schedule reads it at every step
    epoch: int = 0                   # epochs done
    best_acc: float = -1.0
    best_epoch: int = 0
    spent_before: float = 0.0        # seconds of the loop in earlier processes of this run
    started: int = 0                 # the epoch this process started at
    loop_start: float = field(default_factory=time.perf_counter)

    def spent(self) -> float:
        return self.spent_before + time.perf_counter() - self.loop_start


def epoch_batches(n: int, batch: int, epoch: int, seed: int, ctx: DistContext) -> torch.Tensor:
    """(steps, batch) indices of this rank for an epoch.  Every rank draws the
    same permutation and takes its slice of each global batch; the last
    incomplete global batch is dropped (tiny last batches upset BatchNorm)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    global_batch = batch * ctx.world
    steps = n // global_batch
    if steps == 0:
        raise UserError(f"{n} training images are fewer than one batch of {global_batch}: "
                        "lower --batch-size")
    return perm[: steps * global_batch].view(steps, ctx.world, batch)[:, ctx.rank]


def epochs_within_budget(budget_s: float, elapsed_s: float, epoch_s: float, done: int, cap: int) -> int:
    """How many epochs a time-boxed run trains in all: those done plus as many
    more of ``epoch_s`` seconds as fit in what is left of the budget, never
    more than ``cap`` (the recipe's or --epochs) nor fewer than ``done``."""
    more = int(max(0.0, budget_s - elapsed_s) // max(epoch_s, 1e-9))
    return max(done, min(cap, done + more))


def train_step(s: Step, env: Env, data: DeviceData, recipe: dict, settings, idx, g_aug):
    """One optimizer step on the batch ``idx``; (loss, logits, labels), detached."""
    y = data.train_labels[idx]
    x = augment(normalize(data.train_images[idx], env.preprocess), g_aug, recipe["augment"])
    target = F.one_hot(y, env.num_classes).float()
    x, target = mix_batch(x, target, g_aug, recipe["mixup"], recipe["cutmix"])
    if env.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype is not None):
        logits, ys = s.step_model(x)
    logits = logits.float()
    loss = label_loss(logits, ys, target, s.class_weights, recipe["label_smoothing"], settings.aux_weight)
    if s.teacher is not None:  # every label term gets (1 - w), the teacher's term w
        loss = ((1.0 - settings.kd_weight) * loss
                + settings.kd_weight * distillation_loss(logits, s.teacher(x, idx), settings.kd_temperature))
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if not s.plateau:
        s.scheduler.step()
    if s.ema is not None:
        s.ema.update()
    return loss.detach(), logits.detach(), y


def train_epoch(s: Step, env: Env, data: DeviceData, settings, epoch: int, epochs: int) -> dict:
    """Train one epoch; its metrics row (summed over every rank)."""
    recipe, ctx, device = settings.recipe, env.ctx, env.device
    s.model.train()
    batches = epoch_batches(len(data.train_labels), recipe["batch_size"], epoch, settings.seed, ctx).to(device)
    g_aug = torch.Generator(device=device).manual_seed((settings.seed * 1_000_003 + epoch) * 1009 + ctx.rank)
    it, bar = range(len(batches)), None
    if env.progress and ctx.main:
        from tqdm import tqdm

        it = bar = tqdm(it, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    sync()
    t0 = time.perf_counter()
    for step in it:
        loss, logits, y = train_step(s, env, data, recipe, settings, batches[step], g_aug)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if bar is not None and (step % 20 == 0 or step == len(batches) - 1):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen * ctx.world / max(time.perf_counter() - t0, 1e-9):.0f}")
    sync()
    train_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if not math.isfinite(loss_sum.item()):
        raise UserError(f"training diverged at epoch {epoch + 1} (loss is NaN/Inf): lower --lr")
    sync_buffers(s.model, ctx)
    loss_total, correct_total, seen_total = sum_over_ranks([loss_sum, correct, seen], ctx, device)
    return {"epoch": epoch + 1, "train_loss": loss_total / seen_total, "train_acc": correct_total / seen_total,
            "lr": s.optimizer.param_groups[0]["lr"], "img_per_s": seen_total / train_time,
            "epoch_seconds": round(train_time, 3)}


@torch.no_grad()
def validate(model, images: torch.Tensor, labels: torch.Tensor, preprocess: dict, batch: int,
             channels_last: bool, dtype, num_classes: int) -> dict:
    """Loss, accuracy and mean-class accuracy on a device-resident labelled set."""
    from fer_edge.metrics import confusion_matrix, mean_class_accuracy

    model.eval()
    if not channels_last and images.device.type == "cpu":
        # CPU runs train NCHW (faster for the backward pass here) but infer
        # channels_last (1.1-1.5x faster, and what `fer-edge eval` runs, so the
        # logged accuracy is the one eval reports): validate a channels_last copy.
        import copy

        model, channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last), True
    loss_sum, preds = 0.0, []
    for s in range(0, len(labels), batch):
        x = normalize(images[s:s + batch], preprocess)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, labels[s:s + batch], reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    y = labels.cpu().numpy()
    cm = confusion_matrix(y, torch.cat(preds).numpy(), num_classes)
    return {"val_loss": loss_sum / len(y), "val_acc": float(np.trace(cm) / cm.sum()),
            "val_mean_class_acc": mean_class_accuracy(cm)}


def score_epoch(s: Step, env: Env, data: DeviceData, eval_batch_size: int) -> dict:
    """The validation columns of an epoch's row (main process; none without --val).
    In float32, not the training autocast: the accuracy that picks `best` must be
    the one `fer-edge eval` reports (bf16 validation read 67.09% for a model that
    evaluates at 66.90% on the H100)."""
    if data.val_images is None:
        return {}
    row = validate(s.evaluated, data.val_images, data.val_labels, env.preprocess, eval_batch_size,
                   env.channels_last, None, env.num_classes)
    if s.ema is not None:  # the trained weights too: what the average adds, epoch by epoch
        row["val_acc_raw"] = validate(s.model, data.val_images, data.val_labels, env.preprocess, eval_batch_size,
                                      env.channels_last, None, env.num_classes)["val_acc"]
    return row


def step_plateau(s: Step, env: Env, row: dict) -> None:
    """Once per epoch, on rank 0's validation loss, the same on every rank."""
    if s.plateau:
        s.scheduler.step(from_main(row.get("val_loss", 0.0), env.ctx, env.device))


def replan_for_budget(s: Step, env: Env, pos: Position, settings, epoch_start: float, steps_per_epoch: int) -> None:
    """--time-budget: decided on this process's second epoch (the first pays for
    compilation and autotuning), then re-checked after every later epoch with
    that epoch's time, so a run that slows down (on the H100, runs sharing the
    GPU overshot 190 s budgets by 35-78 s when more runs started) still ends
    in time: the plan only ever shrinks, the cosine schedule with it."""
    done = pos.epoch + 1
    if settings.time_budget is None or not ((done - pos.started >= 2 or done >= pos.epochs)
                                            and (not pos.plan["decided"] or done < pos.epochs)):
        return
    epoch_s, spent = time.perf_counter() - epoch_start, pos.spent()
    new = epochs_within_budget(60.0 * settings.time_budget, spent, epoch_s, done, pos.epochs)
    # every rank must stop at the same epoch: rank 0's clock decides
    new = int(from_main(new, env.ctx, env.device, dtype=torch.int64))
    if pos.plan["decided"] and new >= pos.epochs:
        return
    env.log(f"time budget {settings.time_budget:g} min: epoch {done} took {epoch_s:.1f} s, "
            f"{spent:.1f} s so far -> {new} epochs" + (f" (of {pos.epochs})" if new < pos.epochs else ""))
    pos.epochs = new
    pos.plan.update(total_steps=steps_per_epoch * new, decided=True)
    replan_lr(s.optimizer, s.scheduler)


def epoch_message(row: dict, epochs: int, improved: bool) -> str:
    msg = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, train acc {100 * row['train_acc']:.2f}%"
    if "val_acc" in row:
        msg += (f", val acc {100 * row['val_acc']:.2f}% (mean-class {100 * row['val_mean_class_acc']:.2f}%)"
                + (f", without the average {100 * row['val_acc_raw']:.2f}%" if "val_acc_raw" in row else "")
                + (" *" if improved else ""))
    return msg + f", {row['img_per_s']:.0f} img/s"
