"""A training run's state (model, optimizer, scheduler, scaler, RNG states, ...:
nested dicts, lists and tuples of tensors and plain values) as one safetensors
file: the tensors as its tensors, the structure as JSON in its metadata.

Reading it back unpickles nothing (a run folder may come from anywhere a
checkpoint does), and every value it gives is a tensor, a number, a string,
None, or a dict, list or tuple of those.  Tuples and integer dict keys (an
optimizer's per-parameter state) are marked in the JSON so they come back as
they were.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

STATE_KEY = "fer_edge_state"
TENSOR, TUPLE, INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"
MARKERS = (TENSOR, TUPLE, INT_KEYS)


class StateFileError(ValueError):
    """A state file that is not one, or is damaged (the reader's one line)."""


def flatten_state(obj, tensors: dict) -> object:
    """The JSON form of ``obj``; its tensors go into ``tensors`` (name -> CPU copy)."""
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().to("cpu").contiguous().clone()   # no shared storage: safetensors refuses it
        return {TENSOR: name}
    if isinstance(obj, np.generic):
        return flatten_state(obj.item(), tensors)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {TUPLE: [flatten_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {INT_KEYS: [[k, flatten_state(v, tensors)] for k, v in obj.items()]}
        if all(isinstance(k, str) and k not in MARKERS for k in obj):
            return {k: flatten_state(v, tensors) for k, v in obj.items()}
        raise TypeError(f"a state file holds dicts with all-string or all-integer keys, not {list(obj)[:4]}")
    raise TypeError(f"a state file cannot hold a {type(obj).__name__}")


def unflatten_state(doc, tensors: dict) -> object:
    """flatten_state's inverse; StateFileError for anything it could not have written."""
    if isinstance(doc, list):
        return [unflatten_state(v, tensors) for v in doc]
    if isinstance(doc, dict):
        marked = [k for k in doc if k in MARKERS]
        if not marked:
            return {k: unflatten_state(v, tensors) for k, v in doc.items()}
        if len(doc) != 1:
            raise StateFileError(f"a marker ({marked[0]}) beside other keys")
        ((key, value),) = doc.items()
        if key == TENSOR:
            if not isinstance(value, str) or value not in tensors:
                raise StateFileError(f"names a tensor the file does not hold ({str(value)[:20]!r})")
            return tensors[value]
        if not isinstance(value, list):
            raise StateFileError(f"{key} does not hold a list")
        if key == TUPLE:
            return tuple(unflatten_state(v, tensors) for v in value)
        if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
                   for p in value):
            raise StateFileError(f"{INT_KEYS} does not hold [integer, value] pairs")
        return {k: unflatten_state(v, tensors) for k, v in value}
    if doc is None or isinstance(doc, (bool, int, float, str)):
        return doc
    raise StateFileError(f"an unexpected {type(doc).__name__}")   # (json.loads gives nothing else)


def write_state(path, obj) -> None:
    """``obj`` into ``path`` as one safetensors file, atomically (a temp file renamed into place)."""
    from safetensors.torch import save_file

    from fer_edge.fileio import write_atomic

    tensors: dict = {}
    doc = json.dumps(flatten_state(obj, tensors))
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={STATE_KEY: doc}), force=True)


def read_state(path) -> object:
    """What write_state wrote.  OSError for a file that cannot be opened;
    StateFileError for one that is not a state file or is damaged."""
    from safetensors import safe_open

    path = Path(path)
    with open(path, "rb"):   # the OS's own error first (missing, a folder, permission denied)
        pass
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises several types for a damaged file)
        raise StateFileError(f"not a readable safetensors file (truncated or corrupt?): {str(exc)[:120]}") from None
    if STATE_KEY not in meta:
        raise StateFileError("a safetensors file without a fer-edge state in its metadata")
    try:
        doc = json.loads(meta[STATE_KEY])
    except (ValueError, RecursionError):
        raise StateFileError("its state is not valid JSON") from None
    try:
        return unflatten_state(doc, tensors)
    except RecursionError:
        raise StateFileError("its state is nested too deep") from None
