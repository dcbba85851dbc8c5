"""What a run is made of, resolved from the command's choices and checked
before any data loads or any file is written: the model and its
configuration (or the --init checkpoint's), the teachers, the data subsets."""
from __future__ import annotations

import numpy as np

from fer_edge import UserError
from fer_edge.fileio import sha256_file

# HSNet's ablation switches (the paper's Table 6): flag -> model config key.
ABLATIONS = {"no_dib": "dib", "no_fgal": "fgal", "no_ktl": "ktl"}
# --aux-weight when not given: hsnet trains on the paper's loss alone; hsnet-lite
# keeps the weight its runs were trained with.
DEFAULT_AUX_WEIGHT = {"hsnet-lite": 0.3}
DEFAULT_MODEL = "macnn"
# Config keys a fine-tuned model takes from its --init checkpoint's, not from the flags.
INIT_OWN_KEYS = ("num_classes", "in_chans", "freeze_stem")


def limit_set(dataset, n: int | None, seed: int):
    """A seeded random subset of n faces (all when n is None or larger)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise UserError("--limit must be >= 1")
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return dataset.subset(idx)


def align_val_classes(train, val, log):
    """Validation labels as indices into the training classes.  A class the
    model never saw is an error; a training class missing from validation is
    only a note (its recall cannot be measured)."""
    from fer_edge.evaluate import remap_labels

    extra = [c for c in val.classes if c not in train.classes]
    if extra:
        raise UserError(f"validation classes differ from training classes: {', '.join(extra)} not in "
                        f"training ({', '.join(train.classes)})")
    missing = [c for c in train.classes if c not in val.classes]
    if missing:
        log(f"note: validation data has no {', '.join(missing)} images")
    val.labels = remap_labels(val, train.classes)
    val.classes = list(train.classes)
    return val


def model_config(model: str | None, ablations: list[str], width=None, input_size=None, dropout=None,
                 init=None) -> dict:
    """The configuration the flags ask for (ablations: names in ABLATIONS that are switched off)."""
    if ablations and (model or DEFAULT_MODEL) != "hsnet" and not init:
        raise UserError(f"--{ablations[0].replace('_', '-')}: the DIB/FGAL/KTL switches are HSNet's (--model hsnet)")
    config = {ABLATIONS[flag]: False for flag in ablations}
    for key, value in (("width", width), ("input_size", input_size), ("dropout", dropout)):
        if value is not None:
            config[key] = value
    if "dropout" in config and not 0.0 <= config["dropout"] < 1.0:
        raise UserError(f"--dropout {config['dropout']}: must be >= 0 and < 1")
    return config


def resolve_model(model: str | None, config: dict, init=None) -> tuple[str, dict, dict | None]:
    """(architecture, its config, init) from the flags' choices, or from the
    --init checkpoint, whose architecture and configuration a fine-tuned model
    keeps (a conflicting flag is an error, not a silent pick)."""
    if not init:
        return model or DEFAULT_MODEL, config, None
    from fer_edge.checkpoint import load_checkpoint

    _, meta = load_checkpoint(init)  # weights too: a damaged file fails now, not once the data is read
    if meta["form"] != "train":
        raise UserError(f"--init {init}: a {meta['form']}-form checkpoint cannot be trained; "
                        "give the train-form best.safetensors of a run")
    if model and model != meta["arch"]:
        raise UserError(f"--init {init} is a {meta['arch']} checkpoint, not --model {model}")
    init_config = {k: v for k, v in meta["config"].items() if k not in INIT_OWN_KEYS}
    for key, value in config.items():
        if init_config.get(key) != value:
            raise UserError(f"--init {init} has {key} {init_config.get(key)}, not {value}: "
                            "a fine-tuned model keeps the architecture it starts from")
    return meta["arch"], init_config, {"path": str(init), "sha256": sha256_file(init)}


def resolve_teacher(teacher: list | None, teacher_logits: list | None, kd_weight: float | None,
                    kd_temperature: float | None) -> dict:
    """The distillation settings: each teacher's path and sha256 (a resumed run
    must use the same files), weight and temperature.  The files and the numbers
    are checked before any data loads, their classes once the data is known."""
    if teacher and teacher_logits:
        raise UserError("--teacher and --teacher-logits: give one (stored logits already are a teacher)")
    if not teacher and not teacher_logits:
        if kd_weight is not None or kd_temperature is not None:
            raise UserError("--kd-weight/--kd-temperature need --teacher CKPT or --teacher-logits FILE")
        return {}
    from fer_edge.checkpoint import read_meta
    from fer_edge.training.distill import read_teacher_logits

    for path in teacher_logits or ():
        read_teacher_logits(path)  # a missing or foreign file fails here, in one line
    for path in teacher or ():
        read_meta(path)  # a missing or foreign file fails here, in one line
    weight = 0.5 if kd_weight is None else kd_weight
    temperature = 4.0 if kd_temperature is None else kd_temperature
    if not 0.0 < weight <= 1.0:
        raise UserError(f"--kd-weight {weight}: must be in (0, 1] (0 would run the teacher for nothing)")
    if not temperature > 0.0:
        raise UserError(f"--kd-temperature {temperature}: must be > 0")
    # Sorted by content: the ensemble is the same whatever order the flags came in (so is a resume).
    key = "teacher_logits" if teacher_logits else "teacher"
    members = sorted(({"path": str(p), "sha256": sha256_file(p)} for p in teacher_logits or teacher),
                     key=lambda t: t["sha256"])
    if len({t["sha256"] for t in members}) < len(members):
        raise UserError(f"--{key.replace('_', '-')}: the same file is given twice (an ensemble needs different "
                        "members)")
    return {key: members, "kd_weight": weight, "kd_temperature": temperature}


def check_teachers_fit(settings, train_set, data_root) -> None:
    """Before the run folder gets its first file: every teacher knows the
    student's classes and pre-processing; stored logits cover every training face."""
    from fer_edge.checkpoint import default_preprocess, read_meta
    from fer_edge.training.distill import OfflineTeacher, check_teacher, face_keys

    for t in settings.teacher or ():
        check_teacher(read_meta(t["path"]), t["path"], settings.classes,
                      default_preprocess(settings.model, settings.model_config))
    if settings.teacher_logits:
        recipe = settings.recipe
        if recipe["mixup"] > 0 or recipe["cutmix"] > 0:  # a mixed face has no stored prediction
            raise UserError("--teacher-logits cannot be used with mixup or CutMix (use --teacher)")
        OfflineTeacher([t["path"] for t in settings.teacher_logits], face_keys(train_set.sources, data_root),
                       settings.classes, "cpu", settings.kd_temperature)


def check_batches(n_train: int, batch_size: int, world: int, folds: int | None) -> None:
    """At least one whole batch per step for every process (a k-fold run trains on (K-1)/K of the faces)."""
    n = n_train - (n_train + folds - 1) // folds if folds else n_train
    if n < batch_size * world:
        raise UserError(f"{n} training images are fewer than one batch of {batch_size * world}: "
                        "lower --batch-size")
