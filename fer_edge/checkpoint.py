"""Checkpoints: one safetensors file whose header carries JSON metadata.

Nothing is ever unpickled.  The metadata (architecture, its config, class
names, pre-processing, train or merged form) is enough to rebuild the model
from the file alone::

    save_checkpoint("macnn.safetensors", model, classes=CLASSES, preprocess=...)
    model, meta = load_checkpoint("macnn.safetensors")
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from fer_edge import UserError, __version__, contract, note
from fer_edge.data.classes import FER2013_CLASSES
from fer_edge.fileio import write_atomic, write_json_atomic

# Importable from here as before: FER2013_CLASSES (fer_edge.data.classes),
# write_atomic and write_json_atomic (fer_edge.fileio).
__all__ = ["FER2013_CLASSES", "write_atomic", "write_json_atomic", "default_preprocess", "build_meta",
           "save_checkpoint", "read_meta", "check_meta", "build_model", "load_checkpoint", "weights_or_default",
           "class_output_tensors", "transfer_state", "max_relative_logit_error"]

FORMAT = "fer-edge-checkpoint"
FORMAT_VERSION = 1
META_KEY = "fer_edge"
FORMS = ("train", "merged")
# Class names are short words; a checkpoint with longer ones is not ours.
MAX_CLASS_NAME = 64
# A stored softmax temperature outside this range would make every prediction certain or uniform.
TEMPERATURE_RANGE = contract.TEMPERATURE_RANGE


def default_preprocess(arch: str, config: dict) -> dict:
    """The preprocessing contract (fer_edge.contract) of a model: gray, resized
    to its ``input_size`` (hsnet: 224, hsnet-lite: 112, else 48), x/255, then
    (x - mean) / std."""
    return contract.default_preprocess(int(config.get("input_size", 48)))


def build_meta(model: nn.Module, *, classes=None, preprocess=None, form=None, extra=None) -> dict:
    from fer_edge.reparam import is_merged

    arch = getattr(model, "arch", None)
    config = dict(getattr(model, "config", {}))
    if arch is None:
        raise ValueError("model has no .arch: build it with fer_edge.models.create()")
    if classes is None:
        classes = FER2013_CLASSES[: config.get("num_classes", 7)]
    if len(classes) != config.get("num_classes", len(classes)):
        raise ValueError(f"{len(classes)} class names for a model with {config['num_classes']} outputs")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fer_edge_version": __version__,
        "arch": arch,
        "config": config,
        "form": form or ("merged" if is_merged(model) else "train"),
        "classes": list(classes),
        "preprocess": preprocess or default_preprocess(arch, config),
    }
    if extra:
        meta["extra"] = extra
    return meta


def save_checkpoint(path, model: nn.Module, *, classes=None, preprocess=None, extra=None, force=False,
                    meta: dict | None = None) -> dict:
    """Write model weights + metadata atomically; returns the metadata."""
    from safetensors.torch import save_file

    if meta is None:
        meta = build_meta(model, classes=classes, preprocess=preprocess, extra=extra)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomic(Path(path), lambda tmp: save_file(state, tmp, metadata={META_KEY: json.dumps(meta)}), force)
    return meta


def weights_or_default(weights, log=None) -> Path:
    """``weights`` as a Path, or the embedded default model (fer_edge.weights)
    with a note (fer_edge.note: on stderr after the command succeeds)."""
    from fer_edge.weights import default_card, default_weights

    if weights:
        return Path(weights)
    card = default_card()
    path = default_weights(card)
    acc = card.get("publictest", {}).get("accuracy")
    (log or note)(f"note: no --weights: used the embedded default model {card['name']}"
                  + (f" ({100 * acc:.1f}% on FER2013 PublicTest)" if acc else ""))
    return path


def check_checkpoint_file(path, flag: str = "") -> Path:
    """A checkpoint path the user gave must name a readable regular file; each
    other case is its own line (``flag``, e.g. "--weights ", leads it)."""
    path = Path(path)
    where = f"{flag}{path}"
    if path.is_dir():
        raise UserError(f"{where}: a folder, not a checkpoint file")
    if not path.exists():
        raise UserError(f"{where}: no such checkpoint file")
    if not path.is_file():
        raise UserError(f"{where}: not a regular file (a checkpoint is a .safetensors file)")
    if not os.access(path, os.R_OK):
        raise UserError(f"{where}: permission denied")
    return path


def read_meta(path) -> dict:
    """The metadata of a checkpoint, reading only its header, checked by
    ``check_meta``: every problem is one UserError line."""
    from safetensors import safe_open

    path = check_checkpoint_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001  (safetensors raises several types)
        raise UserError(f"{path}: not a readable safetensors checkpoint (corrupt or truncated?): "
                        f"{str(exc)[:200]}") from None
    if META_KEY not in header:
        raise UserError(f"{path}: safetensors file without fer-edge metadata (not a fer-edge checkpoint)")
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError):  # JSONDecodeError, a 5000-digit number, [[[[...]]]] nested too deep
        raise UserError(f"{path}: fer-edge metadata is not valid JSON") from None
    try:
        check_meta(meta)
    except ValueError as exc:
        raise UserError(f"{path}: bad checkpoint metadata: {exc}") from None
    return meta


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_number(x) -> bool:
    return contract.finite_number(x)


def check_meta(meta) -> None:
    """ValueError (one line) unless ``meta`` is metadata a model can be rebuilt
    from: the right types, a known architecture, a config inside the model
    registry's CONFIG_LIMITS, one class name per output, a sane preprocess."""
    from fer_edge import models
    from fer_edge.models.registry import check_config

    _need(isinstance(meta, dict), "not a JSON object")
    _need(meta.get("format") == FORMAT, f"unknown checkpoint format {meta.get('format')!r:.60}")
    version = meta.get("format_version", FORMAT_VERSION)
    _need(isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= FORMAT_VERSION,
          f"format_version {version!r:.40}: this fer-edge reads 1..{FORMAT_VERSION} (newer fer-edge?)")
    arch = meta.get("arch")
    _need(isinstance(arch, str) and arch in models.list_models(),
          f"unknown architecture {arch!r:.40} (known: {', '.join(models.list_models())})")
    config = meta.get("config")
    _need(isinstance(config, dict) and "num_classes" in config and "in_chans" in config,
          "config must be an object with num_classes and in_chans")
    check_config(config)
    _need(meta.get("form") in FORMS, f"form {meta.get('form')!r:.40}: must be one of {', '.join(FORMS)}")
    classes = meta.get("classes")
    _need(isinstance(classes, list) and len(classes) == config["num_classes"],
          f"classes must be a list of {config['num_classes']} names (one per output)")
    _need(all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME and c.isprintable() for c in classes)
          and len(set(classes)) == len(classes), f"classes must be distinct names of 1..{MAX_CLASS_NAME} characters")
    check_preprocess(meta.get("preprocess"))
    _need(isinstance(meta.get("extra", {}), dict), "extra must be an object")


def check_preprocess(pre) -> None:
    """The preprocessing contract's fields: input size, scale, mean, std (std not 0),
    optional temperature, layout."""
    from fer_edge.models.registry import CONFIG_LIMITS

    _need(isinstance(pre, dict), "preprocess must be an object")
    _, low, high, _ = CONFIG_LIMITS["input_size"]
    size = pre.get("input_size")
    _need(isinstance(size, list) and len(size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in size),
          f"preprocess input_size {size!r:.40}: must be [height, width], each {low}..{high}")
    # Faces are square crops resized to one side (every reader and exporter uses input_size[0]).
    _need(size[0] == size[1], f"preprocess input_size {size!r:.40}: must be square (faces are square crops)")
    problem = contract.normalization_problem(pre)
    _need(problem is None, f"preprocess: {problem}")
    t = pre.get("temperature")
    lo, hi = TEMPERATURE_RANGE
    _need(t is None or (_is_number(t) and lo <= t <= hi), f"preprocess temperature {t!r:.40}: must be in {lo}..{hi}")
    _need(pre.get("layout", "NCHW") in contract.LAYOUTS,
          f"preprocess layout {pre.get('layout')!r:.40}: must be one of {', '.join(contract.LAYOUTS)}")
    problem = contract.fields_problem(pre)
    _need(problem is None, f"preprocess: {problem}")


def build_model(meta: dict, use_kernel: bool = True) -> nn.Module:
    """An untrained model with the structure the metadata describes (train or merged form)."""
    from fer_edge import models
    from fer_edge.reparam import merge

    config = dict(meta["config"])
    num_classes, in_chans = config.pop("num_classes"), config.pop("in_chans")
    config.pop("freeze_stem", None)  # a loaded model's stem is already trained
    model = models.create(meta["arch"], num_classes=num_classes, in_chans=in_chans, **config)
    if meta["form"] == "merged":
        model = merge(model, use_kernel=use_kernel)
        model.arch = meta["arch"]
    return model


def header_shapes(path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises several types)
        raise UserError(f"{path}: weights unreadable (corrupt or truncated?): {str(exc)[:200]}") from None


def mismatch_line(found: dict, expected: dict) -> str:
    """'' when ``found`` (name -> shape) has exactly the tensors of ``expected``;
    else what differs, for one error line."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0][:80]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(found[k])} vs {tuple(expected[k])})")
    return ", ".join(parts)


def load_checkpoint(path, *, expect_arch: str | None = None, use_kernel: bool = True, device="cpu"):
    """(model in eval mode, metadata).  Every problem is a UserError with one
    plain line: the metadata is checked (read_meta) before the model is built,
    and the tensor names and shapes in the header before a weight is read."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if expect_arch is not None and meta["arch"] != expect_arch:
        raise UserError(f"{path}: checkpoint of a {meta['arch']} model, expected {expect_arch}")
    try:
        model = build_model(meta, use_kernel=use_kernel)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: cannot rebuild {meta['arch']!r} from its metadata: {exc}") from None
    expected = model.state_dict()
    problem = mismatch_line(header_shapes(path), {k: v.shape for k, v in expected.items()})
    if problem:
        raise UserError(f"{path}: weights do not match a {meta['form']}-form {meta['arch']} with config "
                        f"{meta['config']}: {problem}")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: weights unreadable (corrupt or truncated?): {str(exc)[:200]}") from None
    for name, t in state.items():
        if t.is_floating_point() != expected[name].is_floating_point():
            raise UserError(f"{path}: tensor {name} is {t.dtype}, the model's is {expected[name].dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{path}: tensor {name} contains NaN or Inf: refusing to use these weights")
    model.load_state_dict(state, strict=True)
    model.arch = meta["arch"]
    return model.to(device).eval(), meta


def class_output_tensors(model: nn.Module, num_classes: int) -> set[str]:
    """State-dict names of the tensors with one row per class: the weight and
    bias of every Linear layer that outputs class logits (MACNN's head, each
    of HSNet's FGAL heads)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features == num_classes:
            prefix = f"{mod_name}." if mod_name else ""
            names.add(prefix + "weight")
            if mod.bias is not None:
                names.add(prefix + "bias")
    return names


def transfer_state(src: dict, src_classes: list[str], dst: dict, dst_classes: list[str],
                   class_tensors: set[str]) -> tuple[dict, dict]:
    """Weights of a trained model mapped onto a new model of the same
    architecture whose classes may differ (fine-tuning, e.g. FER2013 -> CK+,
    which trade 'neutral' for 'contempt' at the same count of 7).

    Tensors in ``class_tensors`` (one row per class) are copied row by row
    for the classes both share, matched by name; rows of new classes keep the
    new model's initialisation.  Every other tensor is copied whole and must
    have the same shape.  A mismatch is a ValueError.  Returns (new state,
    report of shared / new / dropped classes).
    """
    missing = sorted(set(dst) - set(src))
    if missing:
        raise ValueError(f"{len(missing)} tensors of the new model are not in it (e.g. {missing[0]}): "
                         "another architecture or configuration")
    shared = [c for c in dst_classes if c in src_classes]
    out = {}
    for name, d in dst.items():
        s = src[name]
        if name in class_tensors:
            if s.shape[0] != len(src_classes) or s.shape[1:] != d.shape[1:]:
                raise ValueError(f"tensor {name}: shape {tuple(s.shape)} is not a head for "
                                 f"{len(src_classes)} classes of this model")
            t = d.detach().clone()
            for c in shared:
                t[dst_classes.index(c)] = s[src_classes.index(c)]
            out[name] = t
        elif s.shape == d.shape:
            out[name] = s.detach().clone()
        else:
            raise ValueError(f"tensor {name}: shape {tuple(s.shape)} cannot initialise {tuple(d.shape)}")
    return out, {"shared_classes": shared, "new_classes": [c for c in dst_classes if c not in src_classes],
                 "dropped_classes": [c for c in src_classes if c not in dst_classes]}


def max_relative_logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the merge tolerance is stated in these units."""
    denom = b.abs().max().item()
    return (a - b).abs().max().item() / denom if denom > 0 and math.isfinite(denom) else float("inf")
