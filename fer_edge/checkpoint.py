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
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from fer_edge import UserError, __version__

FORMAT = "fer-edge-checkpoint"
FORMAT_VERSION = 1
META_KEY = "fer_edge"

# The seven FER2013 expressions, in FER2013's label order (0..6).
FER2013_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def default_preprocess(arch: str, config: dict) -> dict:
    """How a face becomes the model input: gray, resized to the model's
    ``input_size`` (hsnet: 224, hsnet-lite: 112, else 48), x/255, then
    (x - mean) / std.  Every model takes this one gray channel: hsnet
    replicates it into the three channels of its RGB stem inside the network
    (the paper's 3 x 224 x 224 input), so bundles and exports need nothing else."""
    size = int(config.get("input_size", 48))
    return {"input_size": [size, size], "gray": True, "scale": 1 / 255.0, "mean": 0.5, "std": 0.5,
            "layout": "NCHW", "resize": "area-or-linear"}


def write_atomic(path: Path, write_fn, force: bool = False) -> None:
    """Write through a temp file in the same folder, then rename: readers never
    see a half-written file and nothing is overwritten without force."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, data, force: bool = False) -> None:
    """JSON (indented, UTF-8) through write_atomic."""
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(
        json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"), force=force)


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
    with a note on stderr, so that a command's own output stays clean."""
    from fer_edge.weights import default_card, default_weights

    if weights:
        return Path(weights)
    card = default_card()
    path = default_weights(card)
    acc = card.get("publictest", {}).get("accuracy")
    (log or (lambda m: print(m, file=sys.stderr)))(
        f"note: no --weights: using the embedded default model {card['name']}"
        + (f" ({100 * acc:.1f}% on FER2013 PublicTest)" if acc else ""))
    return path


def read_meta(path) -> dict:
    """The metadata of a checkpoint, reading only its header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001  (safetensors raises several types)
        raise UserError(f"{path}: not a readable safetensors checkpoint (corrupt or truncated?): {exc}") from None
    if META_KEY not in header:
        raise UserError(f"{path}: safetensors file without fer-edge metadata (not a fer-edge checkpoint)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        raise UserError(f"{path}: fer-edge metadata is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


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


def load_checkpoint(path, *, expect_arch: str | None = None, use_kernel: bool = True, device="cpu"):
    """(model in eval mode, metadata).  Every problem is a UserError with one plain line."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    if expect_arch is not None and meta["arch"] != expect_arch:
        raise UserError(f"{path}: checkpoint of a {meta['arch']} model, expected {expect_arch}")
    try:
        model = build_model(meta, use_kernel=use_kernel)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path}: cannot rebuild {meta.get('arch')!r} from its metadata: {exc}") from None
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: weights unreadable (corrupt or truncated?): {exc}") from None
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{path}: tensor {name} contains NaN or Inf: refusing to use these weights")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(expected[k].shape)})")
        raise UserError(f"{path}: weights do not match a {meta['form']}-form {meta['arch']} with config "
                        f"{meta['config']}: " + ", ".join(parts))
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
