"""The model a run starts from: created from the seed, with a transferred
face-recognition stem (--stem-weights, HSNet's KTL) and, when fine-tuning,
the weights of a trained checkpoint (--init), head rows matched by class name."""
from __future__ import annotations

import math

import torch
from torch import nn

from fer_edge import UserError
from fer_edge.training.settings import TrainSettings, has_aux_heads


def model_facts(name: str, config: dict, stem_weights=None) -> dict:
    """What the command checks before any data loads: the model's input size,
    whether it has auxiliary heads and a transferable stem (one cheap build),
    and that --stem-weights loads into it."""
    from fer_edge import models

    try:
        model = models.create(name, **config)
    except (ValueError, TypeError) as exc:
        raise UserError(f"--model {name}: {exc}") from None
    facts = {"input_size": int(model.config.get("input_size", 48)), "aux_heads": has_aux_heads(model),
             "stem": hasattr(model, "load_stem")}
    if stem_weights and facts["stem"]:
        load_stem(model, stem_weights, name)
    return facts


def check_model_options(name: str, facts: dict, aux_weight: float, stem_weights) -> None:
    if stem_weights and not facts["stem"]:
        raise UserError(f"--stem-weights: {name} has no transferable stem (hsnet and hsnet-lite have)")
    if not (aux_weight >= 0 and math.isfinite(aux_weight)):
        raise UserError(f"--aux-weight {aux_weight}: must be a finite number >= 0")
    if aux_weight > 0 and not facts["aux_heads"]:
        raise UserError(f"--aux-weight {aux_weight:g}: {name} has no auxiliary heads "
                        "(hsnet with FGAL and hsnet-lite have)")


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


def load_stem(model: nn.Module, path, name: str) -> None:
    """--stem-weights: the transferred stem, frozen (KTL)."""
    if not hasattr(model, "load_stem"):
        raise UserError(f"--stem-weights: {name} has no transferable stem (hsnet and hsnet-lite have)")
    try:
        model.load_stem(path, freeze=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (a foreign file: torch and safetensors raise several types)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--stem-weights {path}: {first[:200]}") from None
    model.config["freeze_stem"] = True


def build_model(settings: TrainSettings, *, fresh: bool, log=lambda msg: None) -> nn.Module:
    """The run's model, identical on every rank (same seed).  A resumed run
    (``fresh`` False) restores its own weights later: --init is only read for a fresh one."""
    from fer_edge import models

    num_classes = len(settings.classes)
    torch.manual_seed(settings.seed)
    model = models.create(settings.model, num_classes=num_classes, in_chans=1, **settings.model_config)
    if settings.stem_weights:
        load_stem(model, settings.stem_weights, settings.model)
    check_model_options(settings.model, {"aux_heads": has_aux_heads(model), "stem": True}, settings.aux_weight,
                        None)
    if settings.init and fresh:
        report = init_from_checkpoint(model, settings.init["path"], settings.classes)
        log(f"initialised from {settings.init['path']}: {len(report['shared_classes'])} of "
            f"{num_classes} classes' head rows transferred"
            + (f"; new: {', '.join(report['new_classes'])}" if report["new_classes"] else "")
            + (f"; dropped: {', '.join(report['dropped_classes'])}" if report["dropped_classes"] else ""))
    if settings.init and not settings.stem_weights and model.config.get("ktl") and hasattr(model, "freeze_stem"):
        # KTL (Eq. 19): the stem a fine-tuned HSNet starts from stays the transferred one.
        model.freeze_stem()
        model.config["freeze_stem"] = True
    return model
