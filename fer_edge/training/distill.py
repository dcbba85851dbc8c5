"""Knowledge distillation: a trained teacher's softened predictions guide a
student (Hinton, Vinyals & Dean 2015).  This is how a compact model (width
0.25, the embedded default) gets closer to a full-width one than it does by
learning the hard labels alone.

The loss of a training step becomes ``(1 - a) * CE(student, labels) +
a * distillation_loss(student, teacher, T)``.  Several teachers act as one
ensemble: their softened predictions are averaged (``ensemble_logits``), the
usual way to distil an ensemble into one network, which is how a single model
gets most of an ensemble's accuracy at one model's cost.  The teacher sees exactly the
augmented batch the student sees (online distillation), runs frozen in eval
mode, in its merged form (no BatchNorm: the same outputs, fewer kernels), and
under the same autocast as the student.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fer_edge import UserError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The T^2 factor keeps the gradient's scale independent of T (the soft
    targets' gradients shrink as 1/T^2), so the mixing weight means the same
    at every temperature."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)


def ensemble_logits(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Logits whose softmax at ``temperature`` is the mean of the members'
    softmaxes at that temperature: T * log(mean_i softmax(z_i / T)).

    Averaging probabilities (not logits) is the ensemble's own prediction; the
    result is a log-probability times T, a valid logit vector (softmax is
    shift-invariant).  One member is returned as it is, unchanged."""
    if len(logits) == 1:
        return logits[0]
    t = float(temperature)
    logp = torch.stack([F.log_softmax(z.float() / t, dim=1) for z in logits])
    return (torch.logsumexp(logp, dim=0) - math.log(len(logits))) * t


def teacher_columns(teacher_classes: list[str], student_classes: list[str]) -> list[int]:
    """For each student class, the column of the teacher's logits with that
    name.  The teacher may know more classes (they are dropped: the softmax is
    taken over the student's classes only); it must know all of the student's."""
    missing = [c for c in student_classes if c not in teacher_classes]
    if missing:
        raise ValueError(f"the teacher has no {', '.join(missing)} class (it knows {', '.join(teacher_classes)})")
    return [teacher_classes.index(c) for c in student_classes]


def check_teacher(meta: dict, path, classes: list[str], preprocess: dict) -> list[int]:
    """The teacher's logit columns for ``classes``; a UserError when it
    cannot teach this student (a missing class, other pixel scaling)."""
    try:
        columns = teacher_columns(list(meta["classes"]), classes)
    except ValueError as exc:
        raise UserError(f"--teacher {path}: {exc}") from None
    tp = meta["preprocess"]
    for key in ("scale", "mean", "std", "gray"):
        if tp.get(key) != preprocess.get(key):
            raise UserError(f"--teacher {path}: its pre-processing differs from the student's "
                            f"({key} {tp.get(key)!r} vs {preprocess.get(key)!r})")
    return columns


class Teacher:
    """A frozen checkpoint that returns logits for the student's classes on
    the student's (normalized, augmented) input batch."""

    def __init__(self, path, classes: list[str], preprocess: dict, device: torch.device, *,
                 dtype=None, channels_last: bool = False, compile: bool = False):
        from fer_edge.checkpoint import load_checkpoint
        from fer_edge.reparam import merge

        # Plain convolutions, never the fused kernel: the teacher must compute
        # exactly what it was validated with, whatever kernel build is installed.
        model, meta = load_checkpoint(path, use_kernel=False)
        self.columns = check_teacher(meta, path, classes, preprocess)
        tp = meta["preprocess"]
        if meta["form"] == "train":
            model = merge(model, use_kernel=False)  # exact; BN folded away
        for p in model.parameters():
            p.requires_grad_(False)
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: nn.Module = torch.compile(model) if compile else model
        self.size = tuple(tp["input_size"])
        self.student_size = tuple(preprocess["input_size"])
        self.device, self.dtype = device, dtype
        self.meta = meta

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != self.student_size:
            # A teacher trained at another input size (HSNet at 112) sees the same
            # faces resized (antialiased when shrinking, as the data readers' area resize).
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                              antialias=self.size[0] < self.student_size[0])
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(x)
        return logits.float()[:, self.columns]


class TeacherEnsemble:
    """One or more Teachers on the same batch; their ensemble's logits at
    the distillation temperature (see ``ensemble_logits``)."""

    def __init__(self, teachers: list[Teacher], temperature: float):
        if not teachers:
            raise ValueError("TeacherEnsemble needs at least one teacher")
        self.teachers, self.temperature = list(teachers), float(temperature)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return ensemble_logits([t(x) for t in self.teachers], self.temperature)


# ---------------------------------------------------------------- offline logits
# Offline distillation: a teacher's logits on the training faces, computed once
# (`fer-edge teacher-logits`) and read by `fer-edge train --teacher-logits`.
# Why: on the GPU machine a full-width teacher (36 MB even as float16) and the
# FER2013 images do not fit in one 64 MiB carry, so a teacher trained in one
# device call cannot teach in the next; its logits (1.8 MB) can.  Each face's
# target is the teacher's prediction for the un-augmented face (averaged with
# its mirror image, as the student sees flips), whatever augmentation the
# student's batch then gets: weaker than online distillation, which scores the
# augmented batch itself, but free (no teacher forward pass per step).
LOGITS_META_KEY = "fer_edge_teacher_logits"


def face_keys(sources: list[str], root) -> list[str]:
    """Keys that match a face across runs: its path relative to the data
    root, '/'-separated (an absolute path would tie the file to one machine)."""
    from pathlib import Path

    root = Path(root).resolve()
    keys = []
    for s in sources:
        p = Path(s)
        try:
            keys.append(p.resolve().relative_to(root).as_posix())
        except (ValueError, OSError):  # a CSV line or a file outside root: the source as it is
            keys.append(str(s))
    return keys


@torch.no_grad()
def compute_teacher_logits(teacher: "Teacher", images, preprocess: dict, *, batch: int = 512,
                           flip: bool = True) -> torch.Tensor:
    """The teacher's logits on uint8 faces (N, H, W), float32 (N, C) on the CPU;
    with ``flip``, the mean of the face's and its mirror image's logits."""
    from fer_edge.evaluate import normalize

    out = []
    for s in range(0, len(images), batch):
        x = normalize(torch.from_numpy(images[s:s + batch]).to(teacher.device), preprocess)
        z = teacher(x)
        if flip:
            z = 0.5 * (z + teacher(torch.flip(x, dims=[3])))
        out.append(z.float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(teacher.columns))


def save_teacher_logits(path, logits: torch.Tensor, keys: list[str], info: dict, *, force: bool = False) -> None:
    """logits (N, C) and their face keys and provenance, as safetensors (atomic)."""
    import json

    from safetensors.torch import save_file

    from fer_edge.fileio import write_atomic

    if len(keys) != len(logits) or len(set(keys)) != len(keys):
        raise ValueError("one distinct key per row of logits")
    meta = {LOGITS_META_KEY: json.dumps({**info, "keys": keys})}
    tensors = {"logits": logits.float().contiguous()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), force=force)


def read_teacher_logits(path) -> tuple[torch.Tensor, dict]:
    """(logits, info incl. keys) of a teacher-logits file; UserError for anything else."""
    import json

    from safetensors import SafetensorError, safe_open

    if Path(path).exists() and not Path(path).is_file():   # a pipe would block the read, a folder is not one
        raise UserError(f"--teacher-logits {path}: not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if LOGITS_META_KEY not in meta or "logits" not in f.keys():
                raise UserError(f"--teacher-logits {path}: not a teacher-logits file "
                                "(make one with `fer-edge teacher-logits`)")
            logits = f.get_tensor("logits")
        info = json.loads(meta[LOGITS_META_KEY])
    except (SafetensorError, OSError, ValueError, RecursionError) as exc:
        raise UserError(f"--teacher-logits {path}: cannot be read ({str(exc)[:200]})") from None
    keys, classes = info.get("keys") if isinstance(info, dict) else None, \
        info.get("classes") if isinstance(info, dict) else None
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and isinstance(classes, list)
            and all(isinstance(c, str) for c in classes) and len(set(classes)) == len(classes)
            and isinstance(info.get("teacher") or {}, dict)):
        raise UserError(f"--teacher-logits {path}: damaged (no list of face keys and distinct class names, "
                        "or a teacher record that is not an object)")
    if logits.ndim != 2 or logits.shape != (len(keys), len(classes)) or not torch.isfinite(logits).all():
        raise UserError(f"--teacher-logits {path}: damaged (logits of shape {tuple(logits.shape)} for "
                        f"{len(keys)} keys and {len(classes)} classes, or non-finite values)")
    return logits, info


def stored_logits_for(path, keys: list[str], classes: list[str]) -> tuple[torch.Tensor, dict]:
    """One teacher-logits file's rows for ``keys`` in the student's class order, and its info."""
    logits, info = read_teacher_logits(path)
    try:
        columns = teacher_columns(list(info["classes"]), classes)
    except ValueError as exc:
        raise UserError(f"--teacher-logits {path}: {exc}") from None
    # (No pre-processing check: the teacher scored the faces with its own.)
    row = {k: i for i, k in enumerate(info["keys"])}
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(f"--teacher-logits {path}: no logits for {len(missing)} of the {len(keys)} training "
                        f"faces (e.g. {missing[0]}); make them on the same --data")
    return logits[[row[k] for k in keys]][:, columns], info


class OfflineTeacher:
    """Stored teacher logits for the training faces: ``teacher(x, idx)``
    returns the rows of batch ``idx`` (indices into the training set) in the
    student's class order; ``x`` is not looked at.  Several files are one
    ensemble, combined as online teachers are (``ensemble_logits`` at the
    distillation temperature)."""

    def __init__(self, paths, keys: list[str], classes: list[str], device, temperature: float = 4.0):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        members = [stored_logits_for(p, keys, classes) for p in paths]
        self.members = [info for _, info in members]
        self.meta = self.members[0]
        self.logits = ensemble_logits([z for z, _ in members], temperature).to(device)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.logits[idx]


# ---------------------------------------------------------------- a run's teacher
def build_teacher(settings, train_set, env, announce: bool = True):
    """The teacher of a run (checkpoints, or stored logits) and what its
    checkpoints record of it (``distilled_from``); (None, {}) without one.
    ``env``: the run's device, dtype, layout, pre-processing and log."""
    if settings.teacher:
        return _online_teacher(settings, env, announce)
    if settings.teacher_logits:
        return _offline_teacher(settings, train_set, env, announce)
    return None, {}


def _ensemble_words(n: int) -> str:
    return (f"{n} teacher{'s' if n > 1 else ''}"
            + (" (ensemble: mean of their softened predictions)" if n > 1 else ""))


def _online_teacher(settings, env, announce: bool):
    members = [Teacher(t["path"], settings.classes, env.preprocess, env.device, dtype=env.dtype,
                       channels_last=env.channels_last, compile=settings.compile) for t in settings.teacher]
    distilled = {"distilled_from": {
        "teachers": [{"sha256": t["sha256"], "arch": m.meta["arch"], "config": m.meta["config"]}
                     for t, m in zip(settings.teacher, members)],
        "kd_weight": settings.kd_weight, "kd_temperature": settings.kd_temperature}}
    if announce:
        for t, m in zip(settings.teacher, members):
            tc = m.meta["config"]
            env.log(f"distilling from {t['path']} ({m.meta['arch']}"
                    + (f" width {tc['width']}" if "width" in tc else "") + f", {m.meta['form']} form)")
        env.log(f"distillation: {_ensemble_words(len(members))}, weight {settings.kd_weight}, "
                f"temperature {settings.kd_temperature}")
    return TeacherEnsemble(members, settings.kd_temperature), distilled


def _offline_teacher(settings, train_set, env, announce: bool):
    recipe = settings.recipe
    if recipe["mixup"] > 0 or recipe["cutmix"] > 0:  # a mixed face has no stored prediction
        raise UserError("--teacher-logits cannot be used with mixup or CutMix (use --teacher)")
    keys = face_keys(train_set.sources, settings.data.get("train", "."))
    teacher = OfflineTeacher([t["path"] for t in settings.teacher_logits], keys, settings.classes, env.device,
                             settings.kd_temperature)
    distilled = {"distilled_from": {
        "teacher_logits": [{"sha256": t["sha256"], "teacher": m.get("teacher"), "flip": m.get("flip")}
                           for t, m in zip(settings.teacher_logits, teacher.members)],
        "kd_weight": settings.kd_weight, "kd_temperature": settings.kd_temperature}}
    if announce:
        for t, m in zip(settings.teacher_logits, teacher.members):
            env.log(f"distilling offline from {t['path']} (stored logits of "
                    f"{(m.get('teacher') or {}).get('arch', '?')})")
        env.log(f"offline distillation: {_ensemble_words(len(teacher.members))}, weight {settings.kd_weight}, "
                f"temperature {settings.kd_temperature}")
    return teacher, distilled
