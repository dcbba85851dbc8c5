"""The training loop: one function, ``train_run``, used by ``fer-edge train``
for a plain run, every fold of ``--folds K`` and every rank under torchrun.

Design choices (each one is what makes a promise of the command hold):

* The whole training set sits on the device as one uint8 tensor; a batch is an
  index gather + normalization + batched augmentation there.  No DataLoader
  workers, no JPEG decoding while the GPU waits.
* Data order and augmentation come from generators seeded by (seed, epoch,
  rank), dropout from the global RNG whose state is checkpointed.  A run
  resumed from the checkpoint of epoch e therefore draws exactly what the
  uninterrupted run drew: the final weights are equal, not just close.
* A checkpoint (model, optimizer, scheduler, scaler, RNG states of every rank,
  epoch, best score) is written atomically after every epoch; ``metrics.jsonl``
  is cut back to that epoch on resume, so a kill at any moment loses at most
  the epoch in flight.
* Under torchrun every rank sees the same global batch order and takes its own
  slice (DistributedSampler semantics without the sampler); BatchNorm buffers
  are broadcast from rank 0 at the end of each epoch so every rank ends with
  identical weights and buffers.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_edge import UserError, __version__
from fer_edge.checkpoint import write_json_atomic
from fer_edge.evaluate import normalize
from fer_edge.training.augment import augment, mix_batch
from fer_edge.training.distill import distillation_loss
from fer_edge.training.recipes import ADDED_KEYS, lr_factor

RESUME_FILE = "resume.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Files a run creates; --force removes exactly these (never the user's other files).
RUN_FILES = (RESUME_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, "best.safetensors", "last.safetensors",
             "val_eval.json", "folds.json")
# Test hook: SIGKILL this process right after the checkpoint of this epoch is on
# disk (how the resume test simulates a crash without racing a timer).
KILL_AFTER_EPOCH_ENV = "FER_EDGE_TEST_KILL_AFTER_EPOCH"
# Test hook "K:SECONDS": epoch K takes SECONDS longer (a run that slows down
# under a --time-budget, without racing the machine's real speed).
SLOW_EPOCH_ENV = "FER_EDGE_TEST_SLOW_EPOCH"
# Test hook: every rank writes its final weights here (DDP equality test).
DUMP_RANKS_ENV = "FER_EDGE_TEST_DUMP_RANKS"


@dataclass
class TrainSettings:
    model: str
    model_config: dict
    recipe: dict
    classes: list[str]
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"            # auto (bf16 from compute capability 8.0, fp16 + scaler below; off on CPU) | bf16 | fp16 | off
    channels_last: bool | None = None   # None = on CUDA only
    class_weights: bool = False
    compile: bool = False
    compile_mode: str = "default"       # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune...
    eval_batch_size: int = 512
    stem_weights: str | None = None     # HSNet: face-recognition stem to transfer and freeze
    init: dict | None = None            # fine-tuning: {"path", "sha256"} of the checkpoint to start from
    aux_weight: float = 0.0             # HSNet: weight of the mean CE of the ungated FGAL heads (0: the paper's loss)
    teacher: list[dict] | None = None   # distillation: [{"path", "sha256"}] of the teacher checkpoint(s)
    teacher_logits: list[dict] | None = None  # offline distillation: [{"path", "sha256"}] of teacher-logits files
    kd_weight: float = 0.5              # share of the distillation term in the loss (with a teacher)
    kd_temperature: float = 4.0         # softmax temperature of the distillation term
    time_budget: float | None = None    # minutes: as many epochs as fit, at most the recipe's (see epochs_within_budget)
    data: dict = field(default_factory=dict)  # where the data came from (recorded, compared on resume)

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption."""
        d = asdict(self)
        d.pop("eval_batch_size")
        d.pop("compile_mode")  # how the same computation is scheduled: a run may resume under another
        if d["teacher"] is None and d["teacher_logits"] is None:
            d.pop("kd_weight")  # runs without a teacher keep the fingerprint they always had
            d.pop("kd_temperature")
        for key in ("teacher", "teacher_logits"):
            if d[key] is None:
                d.pop(key)
        if d["time_budget"] is None:
            d.pop("time_budget")
        return d


def has_aux_heads(model: nn.Module) -> bool:
    """Whether the model has ungated per-level heads (HSNet's FGAL) that --aux-weight can train."""
    return bool(getattr(model, "has_aux_heads", False))


def comparable_fingerprint(fp: dict, aux_heads: bool) -> dict:
    """A stored or new fingerprint in the form two of them are compared in:
    recipe keys added since a run was recorded take the values that run used
    (``ADDED_KEYS``), and a model without auxiliary heads never used aux_weight."""
    fp = json.loads(json.dumps(fp))
    if isinstance(fp.get("recipe"), dict):
        fp["recipe"] = {**json.loads(json.dumps(ADDED_KEYS)), **fp["recipe"]}
    if not aux_heads:
        fp.pop("aux_weight", None)
    return fp


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


def epochs_within_budget(budget_s: float, elapsed_s: float, epoch_s: float, done: int, cap: int) -> int:
    """How many epochs a time-boxed run trains in all: those done plus as many
    more of ``epoch_s`` seconds as fit in what is left of the budget, never
    more than ``cap`` (the recipe's or --epochs) nor fewer than ``done``."""
    more = int(max(0.0, budget_s - elapsed_s) // max(epoch_s, 1e-9))
    return max(done, min(cap, done + more))


# ----------------------------------------------------------------- distributed
@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(rank, world, local)


def resolve_device(name: str, ctx: DistContext) -> torch.device:
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch (use --device cpu)")
        return torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
    if name != "cpu":
        raise UserError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device("cpu")


# ----------------------------------------------------------------- pieces
def class_weight_vector(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights with mean 1 over the classes present (absent classes weigh 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / (counts > 0).sum(), 0.0)
    return torch.tensor(w, dtype=torch.float32)


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


def amp_dtype(amp: str, device: torch.device, capability: tuple[int, int] | None = None, log=None):
    """The autocast dtype for --amp on this device, or None for float32.

    auto follows the GPU: bfloat16 from compute capability 8.0 (Ampere) on,
    float16 below it (Pascal such as the P100, Volta, Turing: no bfloat16
    arithmetic), where the caller's GradScaler (enabled for float16) keeps
    small gradients from flushing to zero.  ``capability`` is the GPU's
    (major, minor); None asks torch for ``device``'s.  A forced bf16 on an
    older GPU is kept (the user asked for it) but noted once through ``log``.
    """
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"unknown --amp {amp!r}; choose auto, bf16, fp16 or off")
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


def save_torch_atomic(path: Path, obj) -> None:
    from fer_edge.checkpoint import write_atomic

    write_atomic(path, lambda tmp: torch.save(obj, tmp), force=True)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, main: bool, clean: bool = True) -> None:
    """Refuse to clobber a run unless told: --resume continues it, --force starts over.
    ``clean=False`` only checks (before the inputs are read); the files of the old
    run go only when called again with ``clean=True``, once every input is valid."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / RESUME_FILE).is_file() and not (run_dir / "fold01").is_dir():
            raise UserError(f"{run_dir}: nothing to resume (no {RESUME_FILE}); start without --resume")
        return
    if exists and not force:
        raise UserError(f"{run_dir} exists and is not empty; pass --resume to continue that run "
                        "or --force to start over")
    if not clean:
        return
    if exists and force and main:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        import shutil

        for sub in ("plots", *(p.name for p in run_dir.glob("fold[0-9][0-9]"))):
            if (run_dir / sub).is_dir():
                shutil.rmtree(run_dir / sub)
    run_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------- the run
def init_from_checkpoint(model: nn.Module, path, classes: list[str]) -> dict:
    """Load a trained train-form checkpoint into ``model`` (fine-tuning),
    mapping classifier rows by class name.  Returns transfer_state's report."""
    from fer_edge.checkpoint import class_output_tensors, load_checkpoint, transfer_state

    src, meta = load_checkpoint(path, expect_arch=model.arch)
    if meta["form"] != "train":
        raise UserError(f"--init {path}: a {meta['form']}-form checkpoint cannot be trained; "
                        "give the train-form best.safetensors of a run")
    try:
        state, report = transfer_state(src.state_dict(), list(meta["classes"]), model.state_dict(), classes,
                                       class_output_tensors(model, len(classes)))
    except ValueError as exc:
        raise UserError(f"--init {path}: {exc}") from None
    model.load_state_dict(state)
    return report


def train_run(settings: TrainSettings, train_set, val_set, run_dir, *, resume: bool = False,
              ctx: DistContext | None = None, progress: bool = True, select_best: bool = True,
              log=print) -> dict:
    """Train one model; returns the summary (also written to summary.json).

    ``val_set`` is used for monitoring and, with ``select_best``, to choose
    ``best.safetensors``; k-fold runs pass select_best=False and report the
    last epoch, so no test fold ever picks its own model.
    """
    from fer_edge import models
    from fer_edge.checkpoint import build_meta, default_preprocess, save_checkpoint

    ctx = ctx or DistContext()
    run_dir = Path(run_dir)
    recipe = settings.recipe
    plateau = recipe["schedule"] == "plateau"
    if plateau and (val_set is None or not select_best):
        raise UserError(f"recipe {recipe['name']}: the plateau schedule steps on the validation loss and needs "
                        "--val (a k-fold run's held-out fold must not steer its own training)")
    device = resolve_device(settings.device, ctx)
    dtype = amp_dtype(settings.amp, device, log=log if ctx.main else None)
    channels_last = device.type == "cuda" if settings.channels_last is None else settings.channels_last
    num_classes = len(settings.classes)
    if device.type == "cuda":
        # Every step has the same shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True

    # ---- model, optimizer, schedule (identical on every rank: same seed)
    torch.manual_seed(settings.seed)
    model = models.create(settings.model, num_classes=num_classes, in_chans=1, **settings.model_config)
    if settings.stem_weights:
        if not hasattr(model, "load_stem"):
            raise UserError(f"--stem-weights: {settings.model} has no transferable stem (hsnet and hsnet-lite have)")
        try:
            model.load_stem(settings.stem_weights, freeze=True)
        except (ValueError, RuntimeError, OSError) as exc:
            raise UserError(f"--stem-weights {settings.stem_weights}: {exc}") from None
        model.config["freeze_stem"] = True
    if not (settings.aux_weight >= 0 and math.isfinite(settings.aux_weight)):
        raise UserError(f"--aux-weight {settings.aux_weight}: must be a finite number >= 0")
    if settings.aux_weight > 0 and not has_aux_heads(model):
        raise UserError(f"--aux-weight {settings.aux_weight:g}: {settings.model} has no auxiliary heads "
                        "(hsnet with FGAL and hsnet-lite have)")
    # A resumed run restores its own weights: the --init checkpoint is only read for a fresh one.
    resuming = resume and (run_dir / RESUME_FILE).is_file()
    if settings.init and not resuming:
        report = init_from_checkpoint(model, settings.init["path"], settings.classes)
        if ctx.main:
            log(f"initialised from {settings.init['path']}: {len(report['shared_classes'])} of "
                f"{num_classes} classes' head rows transferred"
                + (f"; new: {', '.join(report['new_classes'])}" if report["new_classes"] else "")
                + (f"; dropped: {', '.join(report['dropped_classes'])}" if report["dropped_classes"] else ""))
    if settings.init and not settings.stem_weights and model.config.get("ktl") and hasattr(model, "freeze_stem"):
        # KTL (Eq. 19): the stem a fine-tuned HSNet starts from stays the transferred one.
        model.freeze_stem()
        model.config["freeze_stem"] = True
    arch = model.arch
    preprocess = default_preprocess(arch, model.config)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    n_train = len(train_set)
    steps_per_epoch = n_train // (recipe["batch_size"] * ctx.world)
    # epochs: the recipe's, or fewer once a --time-budget run has timed its
    # second epoch; the schedule's length follows it (plan is read at every step).
    epochs = recipe["epochs"]
    plan = {"total_steps": steps_per_epoch * epochs, "decided": settings.time_budget is None}
    warmup_steps = recipe["warmup_epochs"] * steps_per_epoch
    scheduler = make_scheduler(optimizer, recipe, plan, warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    weights = class_weight_vector(train_set.labels, num_classes).to(device) if settings.class_weights else None

    # ---- data on the device, once
    train_images = torch.from_numpy(train_set.images).to(device)
    train_labels = torch.from_numpy(train_set.labels).to(device)
    val_images = torch.from_numpy(val_set.images).to(device) if val_set is not None else None
    val_labels = torch.from_numpy(val_set.labels).to(device) if val_set is not None else None

    # ---- resume or start
    start_epoch, best_acc, best_epoch = 0, -1.0, 0
    spent_before = 0.0  # seconds of the training loop in earlier processes of this run
    # As stored in resume.pt: tuples become lists, so compare the JSON form.
    fingerprint = json.loads(json.dumps(settings.fingerprint()))
    if resuming:
        state = torch.load(run_dir / RESUME_FILE, map_location="cpu", weights_only=True)
        old = comparable_fingerprint(state["fingerprint"], has_aux_heads(model))
        new = comparable_fingerprint(fingerprint, has_aux_heads(model))
        if old != new:
            diff = next(k for k in {**old, **new} if old.get(k) != new.get(k))
            raise UserError(f"{run_dir}: cannot resume: '{diff}' differs from the original run "
                            f"({old.get(diff)!r} vs {new.get(diff)!r})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_acc, best_epoch = state["epoch"], state["best_acc"], state["best_epoch"]
        epochs = state.get("epochs", epochs)
        spent_before = state.get("train_seconds", 0.0)  # a budget counts the killed process's time too
        plan.update(total_steps=steps_per_epoch * epochs, decided=state.get("epochs_decided", plan["decided"]))
        rngs = state["rng"]
        if len(rngs) == ctx.world:
            set_rng_state(rngs[ctx.rank], device)
        else:
            log(f"note: the run had {len(rngs)} processes, now {ctx.world}: dropout RNG reseeded")
            torch.manual_seed(settings.seed + 7919 * start_epoch + ctx.rank)
        if ctx.main:
            _truncate_metrics(run_dir / METRICS_FILE, start_epoch)
            log(f"resumed {run_dir} after epoch {start_epoch}/{epochs}")
    else:
        torch.manual_seed(settings.seed + ctx.rank)  # dropout differs per rank, as in any DDP run
        if ctx.main:
            config = {"fer_edge_version": __version__, "torch": torch.__version__, "world_size": ctx.world,
                      **fingerprint}
            write_json_atomic(run_dir / CONFIG_FILE, config, force=True)
    # The averaged weights (recipe "ema") are what is validated and saved; they
    # start from the (initialised or resumed) model and follow every step.
    ema = None
    if recipe["ema"] > 0:
        from fer_edge.training.ema import WeightEMA

        ema = WeightEMA(model, recipe["ema"])
        if resuming:
            ema.load_state_dict(state["ema"])
    evaluated = ema.module if ema is not None else model

    train_model = WithAuxHeads(model)
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(train_model, mode=settings.compile_mode) if settings.compile else train_model
    teacher, distilled = None, {}
    if settings.teacher:
        from fer_edge.training.distill import Teacher, TeacherEnsemble

        members = [Teacher(t["path"], settings.classes, preprocess, device, dtype=dtype,
                           channels_last=channels_last, compile=settings.compile) for t in settings.teacher]
        teacher = TeacherEnsemble(members, settings.kd_temperature)
        distilled = {"distilled_from": {
            "teachers": [{"sha256": t["sha256"], "arch": m.meta["arch"], "config": m.meta["config"]}
                         for t, m in zip(settings.teacher, members)],
            "kd_weight": settings.kd_weight, "kd_temperature": settings.kd_temperature}}
        if ctx.main and start_epoch == 0:
            for t, m in zip(settings.teacher, members):
                tc = m.meta["config"]
                log(f"distilling from {t['path']} ({m.meta['arch']}"
                    + (f" width {tc['width']}" if "width" in tc else "") + f", {m.meta['form']} form)")
            log(f"distillation: {len(members)} teacher{'s' if len(members) > 1 else ''}"
                + (" (ensemble: mean of their softened predictions)" if len(members) > 1 else "")
                + f", weight {settings.kd_weight}, temperature {settings.kd_temperature}")
    elif settings.teacher_logits:
        from fer_edge.training.distill import OfflineTeacher, face_keys

        if recipe["mixup"] > 0 or recipe["cutmix"] > 0:  # a mixed face has no stored prediction
            raise UserError("--teacher-logits cannot be used with mixup or CutMix (use --teacher)")
        keys = face_keys(train_set.sources, settings.data.get("train", "."))
        teacher = OfflineTeacher([t["path"] for t in settings.teacher_logits], keys, settings.classes, device,
                                 settings.kd_temperature)
        distilled = {"distilled_from": {
            "teacher_logits": [{"sha256": t["sha256"], "teacher": m.get("teacher"), "flip": m.get("flip")}
                               for t, m in zip(settings.teacher_logits, teacher.members)],
            "kd_weight": settings.kd_weight, "kd_temperature": settings.kd_temperature}}
        if ctx.main and start_epoch == 0:
            for t, m in zip(settings.teacher_logits, teacher.members):
                log(f"distilling offline from {t['path']} (stored logits of "
                    f"{(m.get('teacher') or {}).get('arch', '?')})")
            log(f"offline distillation: {len(teacher.members)} teacher{'s' if len(teacher.members) > 1 else ''}"
                + (" (ensemble: mean of their softened predictions)" if len(teacher.members) > 1 else "")
                + f", weight {settings.kd_weight}, temperature {settings.kd_temperature}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    aug_cfg = recipe["augment"]

    loop_start = time.perf_counter()
    epoch = start_epoch
    while epoch < epochs:
        epoch_start = time.perf_counter()
        model.train()
        batches = epoch_batches(n_train, recipe["batch_size"], epoch, settings.seed, ctx).to(device)
        g_aug = torch.Generator(device=device).manual_seed(
            (settings.seed * 1_000_003 + epoch) * 1009 + ctx.rank)
        it = range(len(batches))
        bar = None
        if progress and ctx.main:
            from tqdm import tqdm

            bar = tqdm(it, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                       dynamic_ncols=True)
            it = bar
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        sync()
        t0 = time.perf_counter()
        for step in it:
            idx = batches[step]
            y = train_labels[idx]
            x = augment(normalize(train_images[idx], preprocess), g_aug, aug_cfg)
            target = F.one_hot(y, num_classes).float()
            x, target = mix_batch(x, target, g_aug, recipe["mixup"], recipe["cutmix"])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits, ys = step_model(x)
            logits = logits.float()
            loss = label_loss(logits, ys, target, weights, recipe["label_smoothing"], settings.aux_weight)
            if teacher is not None:  # every label term gets (1 - w), the teacher's term w
                loss = ((1.0 - settings.kd_weight) * loss
                        + settings.kd_weight * distillation_loss(logits, teacher(x, idx), settings.kd_temperature))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not plateau:
                scheduler.step()
            if ema is not None:
                ema.update()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if bar is not None and (step % 20 == 0 or step == len(batches) - 1):
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen * ctx.world / max(elapsed, 1e-9):.0f}")
        sync()
        train_time = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if not math.isfinite(loss_sum.item()):
            raise UserError(f"training diverged at epoch {epoch + 1} (loss is NaN/Inf): lower --lr")
        if ctx.enabled:
            _sync_buffers(model)
            totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)])
            import torch.distributed as dist

            dist.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())

        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
               "lr": optimizer.param_groups[0]["lr"], "img_per_s": seen / train_time,
               "epoch_seconds": round(train_time, 3)}
        if ctx.main:
            if val_set is not None:
                # In float32, not the training autocast: the accuracy that picks `best` must be
                # the one `fer-edge eval` reports (bf16 validation read 67.09% for a model
                # that evaluates at 66.90% on the H100).
                row.update(validate(evaluated, val_images, val_labels, preprocess, settings.eval_batch_size,
                                    channels_last, None, num_classes))
                if ema is not None:  # the trained weights too: what the average adds, epoch by epoch
                    row["val_acc_raw"] = validate(model, val_images, val_labels, preprocess,
                                                  settings.eval_batch_size, channels_last, None,
                                                  num_classes)["val_acc"]
            meta = build_meta(evaluated, classes=settings.classes, preprocess=preprocess,
                              extra={"epoch": epoch + 1, "recipe": recipe["name"], **distilled,
                                     **({"ema": recipe["ema"]} if ema is not None else {}),
                                     **{k: row[k] for k in ("val_acc", "val_mean_class_acc") if k in row}})
            save_checkpoint(run_dir / "last.safetensors", evaluated, meta=meta, force=True)
            improved = select_best and "val_acc" in row and row["val_acc"] > best_acc
            if improved:
                best_acc, best_epoch = row["val_acc"], epoch + 1
                save_checkpoint(run_dir / "best.safetensors", evaluated, meta=meta, force=True)
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
        if plateau:  # once per epoch, on rank 0's validation loss, the same on every rank
            val_loss = torch.tensor([row.get("val_loss", 0.0)], dtype=torch.float64, device=device)
            if ctx.enabled:
                import torch.distributed as dist

                dist.broadcast(val_loss, 0)
            scheduler.step(val_loss.item())
        slow = os.environ.get(SLOW_EPOCH_ENV, "")
        if slow.startswith(f"{epoch + 1}:"):
            time.sleep(float(slow.split(":", 1)[1]))
        # --time-budget: decided on this process's second epoch (the first pays for
        # compilation and autotuning), then re-checked after every later epoch with
        # that epoch's time, so a run that slows down (on the H100, runs sharing the
        # GPU overshot 190 s budgets by 35-78 s when more runs started) still ends
        # in time: the plan only ever shrinks, the cosine schedule with it.
        if (settings.time_budget is not None and (epoch + 1 - start_epoch >= 2 or epoch + 1 >= epochs)
                and (not plan["decided"] or epoch + 1 < epochs)):
            now = time.perf_counter()
            new = epochs_within_budget(60.0 * settings.time_budget, spent_before + now - loop_start,
                                       now - epoch_start, epoch + 1, epochs)
            if ctx.enabled:  # every rank must stop at the same epoch: rank 0's clock decides
                import torch.distributed as dist

                t = torch.tensor([new], device=device)
                dist.broadcast(t, 0)
                new = int(t.item())
            if not plan["decided"] or new < epochs:
                if ctx.main:
                    log(f"time budget {settings.time_budget:g} min: epoch {epoch + 1} took {now - epoch_start:.1f} s, "
                        f"{spent_before + now - loop_start:.1f} s so far -> {new} epochs"
                        + (f" (of {epochs})" if new < epochs else ""))
                epochs = new
                plan.update(total_steps=steps_per_epoch * epochs, decided=True)
                if not plateau:  # the next step's lr, re-planned (a plateau does not depend on the epochs)
                    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                        group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        rngs = _gather_rng(device, ctx)
        if ctx.main:
            save_torch_atomic(run_dir / RESUME_FILE, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                "best_acc": best_acc, "best_epoch": best_epoch, "fingerprint": fingerprint,
                "epochs": epochs, "epochs_decided": plan["decided"],
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "train_seconds": spent_before + time.perf_counter() - loop_start})
            msg = (f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}, "
                   f"train acc {100 * row['train_acc']:.2f}%")
            if "val_acc" in row:
                msg += (f", val acc {100 * row['val_acc']:.2f}% (mean-class {100 * row['val_mean_class_acc']:.2f}%)"
                        + (f", without the average {100 * row['val_acc_raw']:.2f}%" if "val_acc_raw" in row else "")
                        + (" *" if improved else ""))
            log(msg + f", {row['img_per_s']:.0f} img/s")
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(epoch + 1) and ctx.main:
            os.kill(os.getpid(), signal.SIGKILL)
        epoch += 1

    if os.environ.get(DUMP_RANKS_ENV):
        _dump_rank(model, Path(os.environ[DUMP_RANKS_ENV]), ctx)
    summary = {"run_dir": str(run_dir), "arch": arch, "epochs": epochs, "recipe": recipe["name"],
               **({"time_budget_min": settings.time_budget, "recipe_epochs": recipe["epochs"]}
                  if settings.time_budget is not None else {}),
               "train_images": n_train, "world_size": ctx.world, "device": str(device),
               "amp": str(dtype).replace("torch.", "") if dtype else "fp32", "channels_last": channels_last,
               "best_epoch": best_epoch, "best_val_acc": best_acc if best_epoch else None}
    if ctx.main:
        rows = _read_rows(run_dir / METRICS_FILE)
        if rows:
            last = rows[-1]
            summary.update({k: last[k] for k in ("val_acc", "val_mean_class_acc") if k in last})
            summary["img_per_s_mean"] = float(np.mean([r["img_per_s"] for r in rows]))
        write_json_atomic(run_dir / SUMMARY_FILE, summary, force=True)
    return summary


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


def _sync_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, 0)


def _gather_rng(device, ctx: DistContext) -> list:
    state = rng_state(device)
    if not ctx.enabled:
        return [state]
    import torch.distributed as dist

    out = [None] * ctx.world
    dist.all_gather_object(out, state)
    return out


def _dump_rank(model: nn.Module, folder: Path, ctx: DistContext) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / f"rank{ctx.rank}.safetensors"))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop lines of epochs after the checkpoint (written before a crash, redone now)."""
    rows = [r for r in _read_rows(path) if r["epoch"] <= epoch]
    write_json_lines(path, rows)


def write_json_lines(path: Path, rows: list[dict]) -> None:
    from fer_edge.checkpoint import write_atomic

    write_atomic(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)), force=True)
