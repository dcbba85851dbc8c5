"""The preprocessing contract: how a camera face becomes a model input.

One place for both sides: training and evaluation (torch) and the device
runtime (numpy only) import this module, so a face is resized, scaled and laid
out the same way wherever the model runs.  A checkpoint stores the contract as
its ``preprocess`` dict; a bundle stores it as ``preprocess.json``.

    input = (pixel * scale - mean) / std      pixel: uint8 gray, resized to input_size
"""
from __future__ import annotations

import math

import numpy as np

# Every model takes one gray channel; hsnet replicates it into its RGB stem
# inside the network (the paper's 3 x 224 x 224 input).
GRAY_PIXEL_SCALE = 1 / 255.0
MEAN = 0.5
STD = 0.5
LAYOUTS = ("NCHW", "NHWC")
# |scale| and |std| below this turn every pixel into an overflow (a file's typo, not a contract).
MIN_SCALE = 1e-6
# |mean| / |std| beyond this is not an image normalization either.
MAX_NORMALIZED = 1e6


# A softmax temperature outside this range is a broken fit, not a calibration.
TEMPERATURE_RANGE = (1e-2, 1e2)


def temperature_problem(preprocess: dict) -> str | None:
    """Why a preprocess's ``temperature`` cannot divide logits (None: absent or fine)."""
    t = preprocess.get("temperature")
    lo, hi = TEMPERATURE_RANGE
    if t is None or (finite_number(t) and lo <= t <= hi):
        return None
    return f"temperature {str(t)[:40]} must be a number in {lo:g}..{hi:g}"


# Every field a preprocess may hold (checkpoint metadata, a bundle's preprocess.json): a
# reader refuses any other rather than carry a promise nothing keeps.
PREPROCESS_FIELDS = frozenset({"input_size", "gray", "scale", "mean", "std", "layout", "resize", "temperature",
                               "input_dtype", "normalization_inside_model"})
RESIZE = "area-or-linear"   # resize_face: the only resize the contract has


def fields_problem(preprocess: dict) -> str | None:
    """Why a preprocess's fields beyond the numbers are not this contract's (None: they are)."""
    unknown = sorted(str(k) for k in preprocess if k not in PREPROCESS_FIELDS)
    if unknown:
        return f"unknown field {unknown[0][:40]!r} (known: {', '.join(sorted(PREPROCESS_FIELDS))})"
    if preprocess.get("gray", True) is not True:
        return "gray must be true: every fer-edge model reads gray faces"
    if preprocess.get("resize", RESIZE) != RESIZE:
        return f"resize {str(preprocess.get('resize'))[:40]!r} must be {RESIZE!r}"
    uint8 = preprocess.get("input_dtype") == "uint8"
    if preprocess.get("normalization_inside_model", uint8) is not uint8:
        return "normalization_inside_model must be true exactly for a uint8 input"
    return None


def finite_number(x) -> bool:
    """A JSON number that is finite as a float (a 400-digit integer is not; a bool is not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def normalization_problem(preprocess: dict) -> str | None:
    """Why a preprocess's scale / mean / std cannot be a normalization (None: they can)."""
    values = [preprocess.get(k) for k in ("scale", "mean", "std")]
    if not all(finite_number(v) for v in values):
        return "scale, mean and std must be finite numbers"
    scale, mean, std = (float(v) for v in values)
    if abs(scale) < MIN_SCALE or abs(std) < MIN_SCALE:
        return f"scale and std must be at least {MIN_SCALE:g} in size"
    if abs(scale) / abs(std) > MAX_NORMALIZED or abs(mean) / abs(std) > MAX_NORMALIZED:
        return f"scale / std and mean / std must be at most {MAX_NORMALIZED:g}"
    return None


def default_preprocess(input_size: int) -> dict:
    """The contract of a model taking ``input_size`` x ``input_size`` faces."""
    size = int(input_size)
    return {"input_size": [size, size], "gray": True, "scale": GRAY_PIXEL_SCALE, "mean": MEAN, "std": STD,
            "layout": "NCHW", "resize": "area-or-linear"}


def affine(preprocess: dict) -> tuple[float, float]:
    """(a, b) with input = pixel * a - b: the normalization as one multiply-add
    (how exported models with uint8 input fold it into their first op)."""
    std = float(preprocess["std"])
    return float(preprocess["scale"]) / std, float(preprocess["mean"]) / std


def artifact_preprocess(preprocess: dict, nhwc: bool = False) -> dict:
    """A checkpoint's preprocess plus the input format of an artifact made from
    it: NCHW float32 normalized (default), or NHWC raw uint8 pixels with the
    normalization inside the model (``--nhwc``)."""
    return dict(preprocess, layout="NHWC" if nhwc else "NCHW", input_dtype="uint8" if nhwc else "float32",
                normalization_inside_model=nhwc)


def preprocess_faces(faces_u8: np.ndarray, preprocess: dict) -> np.ndarray:
    """(N, H, W) uint8 gray faces already at the input size -> the model's input
    array: float32 normalized NCHW/NHWC, or raw uint8 when the model takes uint8
    (normalization is then inside the model)."""
    faces = np.asarray(faces_u8)
    if faces.ndim == 2:
        faces = faces[None]
    h, w = preprocess["input_size"]
    if faces.shape[1:] != (h, w):
        raise ValueError(f"faces are {faces.shape[1:]}, the model takes {h}x{w} (resize first)")
    if preprocess.get("input_dtype", "float32") == "uint8":
        x = faces.astype(np.uint8)
    else:
        x = (faces.astype(np.float32) * np.float32(preprocess["scale"]) - np.float32(preprocess["mean"])) \
            / np.float32(preprocess["std"])
    return x[..., None] if preprocess.get("layout", "NCHW") == "NHWC" else x[:, None]


def resize_face(gray: np.ndarray, size) -> np.ndarray:
    """A gray crop resized to the model input: area when shrinking, linear when
    enlarging (the contract's ``resize: area-or-linear``)."""
    import cv2

    h, w = size
    if gray.shape == (h, w):
        return gray
    interp = cv2.INTER_AREA if max(gray.shape) > max(h, w) else cv2.INTER_LINEAR
    return cv2.resize(gray, (w, h), interpolation=interp)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
