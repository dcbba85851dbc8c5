"""Deployment bundles: verify, describe, pre-process.  numpy only (no torch).

A bundle is the folder ``fer-edge convert`` writes::

    model_int8.onnx         the artifact(s)
    labels.json             class names, in output order
    preprocess.json         input size, gray, scaling, layout, input dtype
    parity.json             how each artifact compares with PyTorch (pass/fail comes from here)
    manifest.json           sha256 + size of every file, versions, artifact table
    manifest.sig            optional: Ed25519 signature of manifest.json's bytes
    README.md               on-device commands

``load_bundle`` checks the manifest's structure and every file it lists
before anything is loaded: every file the runtime reads must be listed, by a
plain name inside the folder, with its sha256; a bundle listing an unknown or
missing entry, an altered file, or an artifact whose parity (read from the
hash-checked parity.json, never from a manifest field) failed is refused.
The manifest itself is only as trustworthy as the folder: whoever can edit
files can also re-hash them, so devices that must not run a swapped model
pass ``trust=`` a public key and accept only a manifest signed with its
private key (``fer-edge convert --sign``; docs/trust.md).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "fer-edge-bundle"
FORMAT_VERSION = 2
REQUIRED_FILES = ("labels.json", "preprocess.json", "parity.json")
OPTIONAL_FILES = ("README.md",)
RUNTIMES = ("onnxruntime", "tflite", "tensorrt")
MANIFEST_KEYS = {"format", "format_version", "fer_edge_version", "target", "precision", "source_checkpoint",
                 "calibration", "artifacts", "files"}
REQUIRED_KEYS = {"format", "format_version", "target", "precision", "artifacts", "files"}
ARTIFACT_KEYS = {"file", "target", "precision", "runtime", "status", "input", "output"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """A bundle that is missing, incomplete or altered (one line for the user)."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_plain_name(name) -> bool:
    """A file name directly inside the bundle: no folder part, no "..", not hidden,
    not the manifest or its signature (which cannot list themselves)."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST, SIGNATURE)
            and not name.startswith(".") and not any(c in name for c in "/\\\0"))


@dataclass
class Artifact:
    file: str
    target: str
    precision: str
    runtime: str            # onnxruntime | tflite | tensorrt
    status: str             # passed | failed (from parity.json)
    path: Path
    sha256: str = ""        # as listed (and checked) in the manifest


@dataclass
class Bundle:
    path: Path
    manifest: dict
    labels: list[str]
    preprocess: dict
    artifacts: list[Artifact]
    parity: dict | None = None
    signed_by: str | None = None   # key id of the trusted key that verified manifest.sig

    def artifact(self, precision: str | None = None, runtime: str | None = None) -> Artifact:
        """The first artifact matching precision/runtime (the bundle's main one without arguments)."""
        for a in self.artifacts:
            if (precision is None or a.precision == precision) and (runtime is None or a.runtime == runtime):
                return a
        raise BundleError(f"{self.path}: no artifact with precision={precision} runtime={runtime}")


# ------------------------------------------------------------------ structure
def check_structure(path: Path, manifest) -> None:
    """The manifest's schema: known keys only, every artifact a plain listed file
    with a known runtime, every file the runtime reads listed, nothing unknown."""
    where = f"{path}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not a fer-edge bundle manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {manifest.get('format_version')!r}, this fer-edge "
                          f"reads {FORMAT_VERSION} (convert the model again)")
    unknown = sorted(set(manifest) - MANIFEST_KEYS)
    missing = sorted(REQUIRED_KEYS - set(manifest))
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise BundleError(f"{where}: {what}")
    artifacts, files = manifest["artifacts"], manifest["files"]
    if not isinstance(artifacts, list) or not artifacts:
        raise BundleError(f"{where}: lists no artifacts")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: lists no files")
    for a in artifacts:
        check_artifact_entry(where, a, files)
    for name, entry in files.items():
        if not is_plain_name(name):
            raise BundleError(f"{where}: file name {name!r} is not a plain file name inside the bundle")
        if not (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"} and isinstance(entry["bytes"], int)
                and isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
            raise BundleError(f"{where}: the entry of {name} is not {{sha256, bytes}}")
    known = set(REQUIRED_FILES) | set(OPTIONAL_FILES) | {a["file"] for a in artifacts}
    extra = sorted(set(files) - known)
    if extra:
        raise BundleError(f"{where}: lists an unknown file {extra[0]!r}")
    absent = sorted(set(REQUIRED_FILES) - set(files))
    if absent:
        raise BundleError(f"{where}: does not list {absent[0]} (every file the runtime reads must be hashed)")


def check_artifact_entry(where: str, a, files: dict) -> None:
    if not isinstance(a, dict) or not {"file", "target", "precision", "runtime"} <= set(a) \
            or set(a) - ARTIFACT_KEYS:
        raise BundleError(f"{where}: malformed artifact entry {str(a)[:80]}")
    if not is_plain_name(a["file"]):
        raise BundleError(f"{where}: artifact {a['file']!r} is not a plain file name inside the bundle")
    if a["file"] not in files:
        raise BundleError(f"{where}: artifact {a['file']} is not listed with its sha256 in files")
    if a["runtime"] not in RUNTIMES:
        raise BundleError(f"{where}: unknown runtime {a['runtime']!r} for {a['file']}")


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file is a regular file (not a link) with the listed size and sha256."""
    for name, entry in manifest["files"].items():
        f = path / name
        if f.is_symlink() or not f.is_file():
            what = "a link" if f.is_symlink() else "missing"
            raise BundleError(f"{path}: {name} is {what} (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{path}: {name} has {size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or altered copy)")
        if sha256_file(f) != entry["sha256"]:
            raise BundleError(f"{path}: {name} does not match its sha256 in {MANIFEST} (altered or corrupt)")


def verify_manifest(path: Path, manifest) -> None:
    """Structure first, then every file's size and sha256."""
    check_structure(Path(path), manifest)
    verify_files(Path(path), manifest)


def read_json(path: Path, name: str):
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: {name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path}/{name}: not valid JSON") from None


def parity_status(path: Path, parity, files: list[str]) -> dict[str, str]:
    """passed | failed for each artifact, from parity.json's own verdicts."""
    reports = parity.get("artifacts") if isinstance(parity, dict) else None
    if not isinstance(reports, list):
        raise BundleError(f"{path}/parity.json: no artifact results")
    verdict = {r.get("artifact"): r.get("passed") for r in reports if isinstance(r, dict)}
    out = {}
    for name in files:
        if not isinstance(verdict.get(name), bool):
            raise BundleError(f"{path}/parity.json: no parity result for {name}")
        out[name] = "passed" if verdict[name] else "failed"
    return out


def read_manifest_bytes(path: Path) -> bytes:
    f = path / MANIFEST
    if f.is_symlink() or not f.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (not a fer-edge bundle)")
    return f.read_bytes()


def parse_manifest(path: Path, data: bytes) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path}/{MANIFEST}: not valid JSON") from None


def load_bundle(path, verify: bool = True, allow_failed: bool = False, trust=None) -> Bundle:
    """Read a bundle after checking its manifest and every file's sha256.

    trust: a public key (the ``.pub`` file's path, its bytes, or a key object):
    the bundle must then carry ``manifest.sig``, a valid Ed25519 signature of
    manifest.json made with the matching private key; an unsigned bundle or a
    bad signature is refused, saying which.  verify=False skips hashing the
    files (never with trust)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    data = read_manifest_bytes(path)
    signed_by = None
    if trust is not None:
        from fer_edge.targets.signing import verify_bundle_signature

        # The signature covers these exact bytes; they are parsed below, never re-read.
        signed_by = verify_bundle_signature(path, data, trust)
    manifest = parse_manifest(path, data)
    check_structure(path, manifest)
    if verify or trust is not None:
        verify_files(path, manifest)
    labels = read_json(path, "labels.json")
    labels = labels.get("classes") if isinstance(labels, dict) else None
    if not (isinstance(labels, list) and labels and all(isinstance(c, str) for c in labels)):
        raise BundleError(f"{path}/labels.json: no list of class names")
    preprocess = read_json(path, "preprocess.json")
    if not (isinstance(preprocess, dict) and {"input_size", "mean", "std", "scale"} <= set(preprocess)):
        raise BundleError(f"{path}/preprocess.json: incomplete (needs input_size, mean, std, scale)")
    parity = read_json(path, "parity.json")
    status = parity_status(path, parity, [a["file"] for a in manifest["artifacts"]])
    artifacts = []
    for a in manifest["artifacts"]:
        said = a.get("status")
        if said is not None and said != status[a["file"]]:
            raise BundleError(f"{path}/{MANIFEST}: says {a['file']} {said}, but parity.json says "
                              f"{status[a['file']]} (altered manifest)")
        artifacts.append(Artifact(a["file"], a["target"], a["precision"], a["runtime"], status[a["file"]],
                                  path / a["file"], manifest["files"][a["file"]]["sha256"]))
    failed = [a.file for a in artifacts if a.status != "passed"]
    if failed and not allow_failed:
        raise BundleError(f"{path}: {', '.join(failed)} failed its parity check against PyTorch "
                          "(see parity.json); refusing to run it")
    return Bundle(path, manifest, labels, preprocess, artifacts, parity, signed_by)


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
