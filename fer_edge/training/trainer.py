"""``train_run``: one training run, used by ``fer-edge train`` for a plain run,
every fold of ``--folds K`` and every rank under torchrun.  Its steps live in
their own modules: the settings (``settings``), processes (``distributed``),
precision, optimizer and loss (``optim``), the model it starts from
(``finetune``), the epoch (``loop``) and the run folder (``rundir``).

A checkpoint (model, optimizer, scheduler, scaler, RNG states of every rank,
epoch, best score) is written atomically after every epoch; ``metrics.jsonl``
is cut back to that epoch on resume, so a kill at any moment loses at most the
epoch in flight, and the resumed run ends with the uninterrupted run's weights.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fer_edge import UserError, __version__
from fer_edge.training import rundir
from fer_edge.training.distributed import DistContext, gather_rng, set_rng_state
from fer_edge.training.finetune import build_model
from fer_edge.training.loop import (DeviceData, Env, Position, Step, epoch_message, epochs_within_budget,  # noqa: F401
                                    replan_for_budget, score_epoch, step_plateau, train_epoch, validate)
from fer_edge.training.optim import (amp_dtype, build_optimizer, class_weight_vector, label_loss,  # noqa: F401
                                     make_scheduler)
from fer_edge.training.rundir import RESUME_FILE, SUMMARY_FILE  # noqa: F401
from fer_edge.training.settings import (RunHooks, TrainSettings, comparable_fingerprint,  # noqa: F401
                                        fingerprint_difference, has_aux_heads)


class WithAuxHeads(nn.Module):
    """forward(x) -> (logits, auxiliary head logits).  DDP and torch.compile
    only see ``forward``, so HSNet's ``forward_all`` is routed through here
    (the ungated heads feed only the optional --aux-weight term of the loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if hasattr(self.model, "forward_all"):
            logits, ys, _ = self.model.forward_all(x)
            return logits, ys
        return self.model(x), []


def check_schedule(recipe: dict, has_val: bool, select_best: bool) -> None:
    if recipe["schedule"] == "plateau" and (not has_val or not select_best):
        raise UserError(f"recipe {recipe['name']}: the plateau schedule steps on the validation loss and needs "
                        "--val (a k-fold run's held-out fold must not steer its own training)")


def make_env(settings: TrainSettings, ctx: DistContext, device, log, progress: bool) -> Env:
    from fer_edge.checkpoint import default_preprocess
    from fer_edge.devices import torch_device

    if device is None:
        device = torch_device(settings.device, ctx.local_rank if ctx.enabled else None)
    if device.type == "cuda":
        # Every step has the same shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda" if settings.channels_last is None else settings.channels_last
    return Env(device=device, dtype=amp_dtype(settings.amp, device, log=log), channels_last=channels_last, ctx=ctx,
               preprocess=default_preprocess(settings.model, settings.model_config),
               num_classes=len(settings.classes), log=log, progress=progress)


def make_step(model: nn.Module, settings: TrainSettings, env: Env, train_set, pos_epochs: int):
    """The optimizer, schedule and gradient scaler of a run, and its Position."""
    recipe = settings.recipe
    model.to(env.device)
    if env.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    steps_per_epoch = len(train_set) // (recipe["batch_size"] * env.ctx.world)
    # epochs: the recipe's, or fewer once a --time-budget run has timed its
    # second epoch; the schedule's length follows it (plan is read at every step).
    pos = Position(epochs=pos_epochs, plan={"total_steps": steps_per_epoch * pos_epochs,
                                            "decided": settings.time_budget is None})
    scheduler = make_scheduler(optimizer, recipe, pos.plan, recipe["warmup_epochs"] * steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)
    weights = (class_weight_vector(train_set.labels, env.num_classes).to(env.device)
               if settings.class_weights else None)
    step = Step(model=model, step_model=model, evaluated=model, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, plateau=recipe["schedule"] == "plateau", class_weights=weights)
    return step, pos, steps_per_epoch


def resume_from(state: dict, s: Step, pos: Position, settings: TrainSettings, env: Env, run_dir: Path,
                steps_per_epoch: int) -> None:
    """Continue from the resume file: the same settings (else one line naming what differs), then every state back."""
    path = run_dir / RESUME_FILE
    old = comparable_fingerprint(state["fingerprint"], has_aux_heads(s.model))
    new = comparable_fingerprint(json.loads(json.dumps(settings.fingerprint())), has_aux_heads(s.model))
    diff = fingerprint_difference(old, new)
    if diff is not None:
        recorded, given = state["fingerprint"].get(diff), settings.fingerprint().get(diff)
        hint = (" (a relative path is read from the folder you run in: resume from the folder the run started "
                "in, or give the same data)") if diff == "data" else ""
        raise UserError(f"{run_dir}: cannot resume: '{diff}' differs from the original run "
                        f"({recorded!r} vs {given!r}){hint}")
    for what, target in (("model", s.model), ("optimizer", s.optimizer), ("scheduler", s.scheduler),
                         ("scaler", s.scaler)):
        rundir.restore(path, what, target.load_state_dict, state[what])
    pos.epoch = pos.started = state["epoch"]
    pos.best_acc, pos.best_epoch = float(state["best_acc"]), state["best_epoch"]
    pos.epochs = int(state.get("epochs", pos.epochs))
    pos.spent_before = float(state.get("train_seconds", 0.0))  # a budget counts the killed process's time too
    pos.plan.update(total_steps=steps_per_epoch * pos.epochs, decided=bool(state.get("epochs_decided",
                                                                                     pos.plan["decided"])))
    rngs, ctx = state["rng"], env.ctx
    if len(rngs) == ctx.world:
        rundir.restore(path, "RNG", lambda r: set_rng_state(r, env.device), rngs[ctx.rank])
    else:
        env.log(f"note: the run had {len(rngs)} processes, now {ctx.world}: dropout RNG reseeded")
        torch.manual_seed(settings.seed + 7919 * pos.epoch + ctx.rank)
    if ctx.main:
        rundir.truncate_metrics(run_dir / rundir.METRICS_FILE, pos.epoch, env.log)
    env.log(f"resumed {run_dir} after epoch {pos.epoch}/{pos.epochs}")


def start_fresh(settings: TrainSettings, env: Env, run_dir: Path) -> None:
    torch.manual_seed(settings.seed + env.ctx.rank)  # dropout differs per rank, as in any DDP run
    if env.ctx.main:
        rundir.write_config(run_dir, {"fer_edge_version": __version__, "torch": torch.__version__,
                                      "world_size": env.ctx.world, **json.loads(json.dumps(settings.fingerprint()))})


def wrap_for_steps(s: Step, settings: TrainSettings, env: Env, state: dict | None, path: Path) -> None:
    """The weight average (recipe "ema": what is validated and saved; it starts from
    the initialised or resumed model and follows every step), DDP, torch.compile."""
    if settings.recipe["ema"] > 0:
        from fer_edge.training.ema import WeightEMA

        s.ema = WeightEMA(s.model, settings.recipe["ema"])
        if state is not None:
            if "ema" not in state:
                raise UserError(f"{path}: the run averages its weights but the resume file holds no average")
            rundir.restore(path, "weight average", s.ema.load_state_dict, state["ema"])
        s.evaluated = s.ema.module
    train_model = WithAuxHeads(s.model)
    if env.ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    s.step_model = torch.compile(train_model, mode=settings.compile_mode) if settings.compile else train_model


def save_epoch(s: Step, env: Env, pos: Position, row: dict, run_dir: Path, settings: TrainSettings,
               distilled: dict, select_best: bool) -> bool:
    """last.safetensors, best.safetensors when the epoch improved, the metrics row; whether it improved."""
    from fer_edge.checkpoint import build_meta, save_checkpoint

    recipe = settings.recipe
    meta = build_meta(s.evaluated, classes=settings.classes, preprocess=env.preprocess,
                      extra={"epoch": row["epoch"], "recipe": recipe["name"], **distilled,
                             **({"ema": recipe["ema"]} if s.ema is not None else {}),
                             **{k: row[k] for k in ("val_acc", "val_mean_class_acc") if k in row}})
    save_checkpoint(run_dir / "last.safetensors", s.evaluated, meta=meta, force=True)
    improved = select_best and "val_acc" in row and row["val_acc"] > pos.best_acc
    if improved:
        pos.best_acc, pos.best_epoch = row["val_acc"], row["epoch"]
        save_checkpoint(run_dir / "best.safetensors", s.evaluated, meta=meta, force=True)
    rundir.append_metrics(run_dir, row)
    return improved


def resume_state(s: Step, pos: Position, fingerprint: dict, rngs: list) -> dict:
    return {"epoch": pos.epoch + 1, "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(), "rng": rngs,
            "best_acc": pos.best_acc, "best_epoch": pos.best_epoch, "fingerprint": fingerprint,
            "epochs": pos.epochs, "epochs_decided": pos.plan["decided"],
            **({"ema": s.ema.state_dict()} if s.ema is not None else {}), "train_seconds": pos.spent()}


def run_epochs(s: Step, env: Env, pos: Position, data: DeviceData, settings: TrainSettings, run_dir: Path,
               distilled: dict, select_best: bool, steps_per_epoch: int, hooks: RunHooks) -> None:
    fingerprint = json.loads(json.dumps(settings.fingerprint()))  # as stored: tuples become lists
    pos.loop_start = time.perf_counter()
    while pos.epoch < pos.epochs:
        epoch_start = time.perf_counter()
        row = train_epoch(s, env, data, settings, pos.epoch, pos.epochs)
        improved = False
        if env.ctx.main:
            row.update(score_epoch(s, env, data, settings.eval_batch_size))
            improved = save_epoch(s, env, pos, row, run_dir, settings, distilled, select_best)
        step_plateau(s, env, row)
        hooks.call("epoch_trained", pos.epoch + 1)
        replan_for_budget(s, env, pos, settings, epoch_start, steps_per_epoch)
        rngs = gather_rng(env.device, env.ctx)
        if env.ctx.main:
            rundir.write_resume_state(run_dir / RESUME_FILE, resume_state(s, pos, fingerprint, rngs))
            env.log(epoch_message(row, pos.epochs, improved))
            hooks.call("checkpoint_written", pos.epoch + 1)
        pos.epoch += 1


def summarize(settings: TrainSettings, env: Env, pos: Position, run_dir: Path, n_train: int) -> dict:
    """The run's summary (written to summary.json by the main process)."""
    recipe = settings.recipe
    summary = {"run_dir": str(run_dir), "arch": settings.model, "epochs": pos.epochs, "recipe": recipe["name"],
               **({"time_budget_min": settings.time_budget, "recipe_epochs": recipe["epochs"]}
                  if settings.time_budget is not None else {}),
               "train_images": n_train, "world_size": env.ctx.world, "device": str(env.device),
               "amp": str(env.dtype).replace("torch.", "") if env.dtype else "fp32",
               "channels_last": env.channels_last, "best_epoch": pos.best_epoch,
               "best_val_acc": pos.best_acc if pos.best_epoch else None}
    if env.ctx.main:
        rows = [r for r in rundir.read_rows(run_dir / rundir.METRICS_FILE, env.log) if "img_per_s" in r]
        if rows:
            last = rows[-1]
            summary.update({k: last[k] for k in ("val_acc", "val_mean_class_acc") if k in last})
            summary["img_per_s_mean"] = float(np.mean([r["img_per_s"] for r in rows]))
        rundir.write_summary(run_dir, summary)
    return summary


def train_run(settings: TrainSettings, train_set, val_set, run_dir, *, resume: bool = False,
              ctx: DistContext | None = None, progress: bool = True, select_best: bool = True,
              log=print, device: torch.device | None = None, hooks: RunHooks | None = None) -> dict:
    """Train one model; returns the summary (also written to summary.json).

    ``val_set`` is used for monitoring and, with ``select_best``, to choose
    ``best.safetensors``; k-fold runs pass select_best=False and report the
    last epoch, so no test fold ever picks its own model.  ``device``: the
    torch device (default: from ``settings.device``); ``hooks``: see RunHooks.
    """
    from fer_edge.training.distill import build_teacher

    ctx, hooks, run_dir = ctx or DistContext(), hooks or RunHooks(), Path(run_dir)
    check_schedule(settings.recipe, val_set is not None, select_best)
    env = make_env(settings, ctx, device, log if ctx.main else (lambda msg: None), progress)
    state = None
    if resume and (run_dir / RESUME_FILE).is_file():
        state = rundir.read_resume_state(run_dir / RESUME_FILE)
    model = build_model(settings, fresh=state is None, log=env.log)
    s, pos, steps_per_epoch = make_step(model, settings, env, train_set, settings.recipe["epochs"])
    data = DeviceData.of(train_set, val_set, env.device)
    # Before the RNG is seeded or restored: building a teacher draws from it.
    s.teacher, distilled = build_teacher(settings, train_set, env, announce=state is None)
    if state is not None:
        resume_from(state, s, pos, settings, env, run_dir, steps_per_epoch)
    else:
        start_fresh(settings, env, run_dir)
    wrap_for_steps(s, settings, env, state, run_dir / RESUME_FILE)
    run_epochs(s, env, pos, data, settings, run_dir, distilled, select_best, steps_per_epoch, hooks)
    hooks.call("finished", s.model, ctx)
    return summarize(settings, env, pos, run_dir, len(train_set))
