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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_logits([t(x) for t in self.teachers], self.temperature)
