"""What defines a run: ``TrainSettings`` (recorded in config.json and resume.safetensors,
compared on resume) and ``RunHooks`` (callbacks a caller passes in, e.g. a test
that simulates a crash; never read from the environment)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from fer_edge.training.recipes import ADDED_KEYS


@dataclass
class TrainSettings:
    model: str
    model_config: dict
    recipe: dict
    classes: list[str]
    seed: int = 0
    device: str = "cpu"          # the device type, cpu or cuda (which GPU is not part of the run)
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


@dataclass
class RunHooks:
    """Callbacks into a run at fixed points (all optional).  Tests use them to
    kill a run right after a checkpoint, slow an epoch down under a time
    budget, or collect every process's final weights."""
    epoch_trained: Callable[[int], None] | None = None      # epoch N trained and validated, before the budget check
    checkpoint_written: Callable[[int], None] | None = None  # the resume file of epoch N is on disk (main process)
    finished: Callable[[object, object], None] | None = None  # (trained model, DistContext) on every process

    def call(self, name: str, *args) -> None:
        fn = getattr(self, name)
        if fn is not None:
            fn(*args)


def has_aux_heads(model) -> bool:
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
    if isinstance(fp.get("data"), dict):
        # The same folder named another way (absolute, "./", a trailing slash) is the same data.
        fp["data"] = {k: same_place(v) if k in ("train", "val") else v for k, v in fp["data"].items()}
    return fp


def same_place(path):
    """A data path as compared between a run and its resume: resolved from here."""
    if not isinstance(path, str) or not path:
        return path
    try:
        return str(Path(path).resolve())
    except (OSError, ValueError, RuntimeError):
        return path


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """The first key whose value differs between two comparable fingerprints, or None."""
    return next((k for k in {**old, **new} if old.get(k) != new.get(k)), None)
