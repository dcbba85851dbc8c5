"""Deployment bundles: verify, describe, pre-process.  numpy only (no torch).

A bundle is the folder ``fer-edge convert`` writes::

    model_int8.onnx         the artifact(s)
    labels.json             class names, in output order
    preprocess.json         input size, gray, scaling, layout, input dtype
    parity.json             how each artifact compares with PyTorch
    manifest.json           sha256 + size of every file, versions, artifact table
    README.md               on-device commands

``load_bundle`` checks every file against the manifest before anything is
loaded, so a truncated copy or an edited model is refused, not run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that is missing, incomplete or altered (one line for the user)."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    file: str
    target: str
    precision: str
    runtime: str            # onnxruntime | tflite | tensorrt
    status: str             # passed | failed (parity)
    path: Path


@dataclass
class Bundle:
    path: Path
    manifest: dict
    labels: list[str]
    preprocess: dict
    artifacts: list[Artifact]

    def artifact(self, precision: str | None = None, runtime: str | None = None) -> Artifact:
        """The first artifact matching precision/runtime (the bundle's main one without arguments)."""
        for a in self.artifacts:
            if (precision is None or a.precision == precision) and (runtime is None or a.runtime == runtime):
                return a
        raise BundleError(f"{self.path}: no artifact with precision={precision} runtime={runtime}")


def verify_manifest(path: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}/{MANIFEST}: lists no files")
    for name, entry in files.items():
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{path}/{MANIFEST}: file name {name!r} points outside the bundle")
        if not f.is_file():
            raise BundleError(f"{path}: {name} is missing (listed in {MANIFEST})")
        if f.stat().st_size != entry["bytes"]:
            raise BundleError(f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or altered copy)")
        if sha256_file(f) != entry["sha256"]:
            raise BundleError(f"{path}: {name} does not match its sha256 in {MANIFEST} (altered or corrupt)")


def load_bundle(path, verify: bool = True, allow_failed: bool = False) -> Bundle:
    """Read a bundle after checking every file's sha256 against manifest.json."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no {MANIFEST} (not a fer-edge bundle)") from None
    except json.JSONDecodeError:
        raise BundleError(f"{path}/{MANIFEST}: not valid JSON") from None
    if verify:
        verify_manifest(path, manifest)
    labels = json.loads((path / "labels.json").read_text())["classes"]
    preprocess = json.loads((path / "preprocess.json").read_text())
    artifacts = [Artifact(a["file"], a["target"], a["precision"], a["runtime"], a.get("status", "unchecked"),
                          path / a["file"]) for a in manifest["artifacts"]]
    failed = [a.file for a in artifacts if a.status != "passed"]
    if failed and not allow_failed:
        raise BundleError(f"{path}: {', '.join(failed)} failed its parity check against PyTorch "
                          "(see parity.json); refusing to run it")
    return Bundle(path, manifest, labels, preprocess, artifacts)


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
    """A gray crop resized to the model input (area when shrinking, linear when enlarging),
    exactly as the training readers do."""
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
