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
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from fer_edge.contract import (LAYOUTS, artifact_preprocess, fields_problem, finite_number,  # noqa: F401
                               normalization_problem, preprocess_faces, resize_face, softmax, temperature_problem)
from fer_edge.fileio import sha256_file
from fer_edge.targets.backends import BundleError, runtime_names
from fer_edge.targets.signing import SIGNATURE, verify_bundle_signature

# The contract and sha256_file are re-exported: device code imports them from here.
__all__ = ["Artifact", "Bundle", "BundleError", "load_bundle", "verify_manifest", "artifact_preprocess",
           "preprocess_faces", "resize_face", "softmax", "sha256_file"]

MANIFEST = "manifest.json"
FORMAT = "fer-edge-bundle"
FORMAT_VERSION = 2
REQUIRED_FILES = ("labels.json", "preprocess.json", "parity.json")
OPTIONAL_FILES = ("README.md",)
MANIFEST_KEYS = {"format", "format_version", "fer_edge_version", "target", "precision", "release",
                 "source_checkpoint", "calibration", "artifacts", "files"}
MAX_RELEASE = 2 ** 53      # a release number is a JSON integer every reader holds exactly
REQUIRED_KEYS = {"format", "format_version", "target", "precision", "artifacts", "files"}
ARTIFACT_KEYS = {"file", "target", "precision", "runtime", "status", "input", "output"}
STATUSES = ("passed", "failed")
INPUT_DTYPES = ("float32", "uint8")
# Class names are printed on frames and in events: one printable line each.
MAX_CLASSES = 1000
MAX_LABEL = 64
MAX_JSON_BYTES = 8 << 20   # a bundle's JSON files are kilobytes; far bigger is not one of them
MAX_ARTIFACT_BYTES = 2 << 30   # ONNX and TFLite files cannot exceed 2 GiB (protobuf / flatbuffer offsets)
MAX_INPUT_SIDE = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")


def __getattr__(name):
    # RUNTIMES is the backend table's names (fer_edge.targets.backends.BACKENDS), registrations included.
    if name == "RUNTIMES":
        return runtime_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def printable_line(text, max_len: int = MAX_LABEL) -> bool:
    """Text a bundle may have printed: 1 to max_len characters, every one
    printable (str.isprintable: no control characters such as ANSI escapes or
    carriage returns, no line separators, no invisible format characters such
    as direction marks, which make text read as something else)."""
    return isinstance(text, str) and 0 < len(text) <= max_len and text.isprintable()


def is_plain_name(name) -> bool:
    """A file name directly inside the bundle: no folder part, no "..", not hidden,
    not the manifest or its signature (which cannot list themselves), printable."""
    return (printable_line(name, 255) and name not in (".", "..", MANIFEST, SIGNATURE)
            and not name.startswith(".") and not any(c in name for c in "/\\"))


@dataclass
class Artifact:
    file: str
    target: str
    precision: str
    runtime: str            # a name in fer_edge.targets.backends.BACKENDS
    status: str             # passed | failed (from parity.json)
    path: Path
    sha256: str = ""        # as listed (and checked) in the manifest
    # The verified bytes (when the bundle was verified): runtimes load these, never
    # the file again, so a file swapped after the check is not what runs.
    content: bytes | None = None


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


def _short(value) -> str:
    return repr(value)[:80]


# ------------------------------------------------------------------ structure
def check_structure(path: Path, manifest) -> None:
    """The manifest's schema: known keys only, every artifact a plain listed file
    with a known runtime, every file the runtime reads listed, nothing unknown."""
    where = f"{path}/{MANIFEST}"
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not a fer-edge bundle manifest (format {_short(manifest.get('format'))})")
    if type(manifest.get("format_version")) is not int or manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format version {_short(manifest.get('format_version'))}, this "
                          f"fer-edge reads {FORMAT_VERSION} (convert the model again)")
    unknown = sorted(set(manifest) - MANIFEST_KEYS)
    missing = sorted(REQUIRED_KEYS - set(manifest))
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
        raise BundleError(f"{where}: {what}")
    if not all(printable_line(manifest[k]) for k in ("target", "precision")):
        raise BundleError(f"{where}: target and precision must be text of one printable line")
    if "release" in manifest and not (type(manifest["release"]) is int and 0 <= manifest["release"] <= MAX_RELEASE):
        raise BundleError(f"{where}: release must be a whole number from 0 to 2^53")
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
        if not (isinstance(entry, dict) and set(entry) == {"sha256", "bytes"} and type(entry["bytes"]) is int
                and entry["bytes"] >= 0 and isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
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
        raise BundleError(f"{where}: artifact {_short(a['file'])} is not a plain file name inside the bundle")
    if a["file"] not in files:
        raise BundleError(f"{where}: artifact {a['file']} is not listed with its sha256 in files")
    if not all(printable_line(a[k]) for k in ("target", "precision", "runtime")):
        raise BundleError(f"{where}: the target, precision and runtime of {a['file']} must be text of one "
                          "printable line")
    if a["runtime"] not in runtime_names():
        raise BundleError(f"{where}: unknown runtime {a['runtime']!r} for {a['file']}")
    if "status" in a and a["status"] not in STATUSES:
        raise BundleError(f"{where}: status of {a['file']} is {_short(a['status'])}, not passed or failed")
    for io in ("input", "output"):
        if io in a and not (isinstance(a[io], dict) and isinstance(a[io].get("shape"), list)):
            raise BundleError(f"{where}: the {io} of {a['file']} has no shape list")


def max_bytes(name: str, manifest: dict) -> int:
    """How big a listed file may be: an artifact up to what its format can hold, the rest kilobytes."""
    return MAX_ARTIFACT_BYTES if name in {a["file"] for a in manifest["artifacts"]} else MAX_JSON_BYTES


def read_listed(path: Path, name: str, entry: dict, limit: int) -> bytes:
    """A listed file's bytes, read once through one descriptor that is not a
    link, checked for size and sha256: what is returned is what was hashed."""
    if entry["bytes"] > limit:
        raise BundleError(f"{path}: {name} is listed with {entry['bytes']} bytes, more than a bundle's "
                          f"{name} can have")
    f = path / name
    try:
        before = os.lstat(f)
    except FileNotFoundError:
        raise BundleError(f"{path}: {name} is missing (listed in {MANIFEST})") from None
    except OSError as exc:
        raise BundleError(f"{path}: {name} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISLNK(before.st_mode):
        raise BundleError(f"{path}: {name} is a link (listed in {MANIFEST})")
    if not stat.S_ISREG(before.st_mode):   # a FIFO would block the open below, a device never ends
        raise BundleError(f"{path}: {name} is not a regular file (listed in {MANIFEST})")
    try:
        # O_NOFOLLOW where the OS has it; elsewhere the same file as lstat saw is checked below.
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_BINARY", 0))
    except OSError as exc:  # ELOOP: made a link since
        raise BundleError(f"{path}: {name} cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise BundleError(f"{path}: {name} was replaced while being read (listed in {MANIFEST})")
        if st.st_size != entry["bytes"]:
            raise BundleError(f"{path}: {name} has {st.st_size} bytes, the manifest says {entry['bytes']} "
                              "(truncated or altered copy)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(entry["bytes"] + 1)   # one byte more: a file that grew is caught too
    except OSError as exc:
        raise BundleError(f"{path}: {name} cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"{path}: {name} does not match its sha256 in {MANIFEST} (altered or corrupt)")
    return data


def verify_files(path: Path, manifest: dict) -> dict[str, bytes]:
    """Every listed file is a regular file (not a link) with the listed size and
    sha256; returns their verified bytes by name."""
    return {name: read_listed(path, name, entry, max_bytes(name, manifest))
            for name, entry in manifest["files"].items()}


def verify_manifest(path: Path, manifest) -> None:
    """Structure first, then every file's size and sha256."""
    check_structure(Path(path), manifest)
    verify_files(Path(path), manifest)


# ------------------------------------------------------------------ the JSON files
def read_bytes(path: Path, name: str) -> bytes:
    f = path / name
    try:
        if f.is_symlink() or not f.is_file():
            raise FileNotFoundError
        if f.stat().st_size > MAX_JSON_BYTES:
            raise BundleError(f"{path}/{name}: {f.stat().st_size} bytes, too big for a bundle's {name}")
        return f.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: {name} is missing") from None
    except OSError as exc:
        raise BundleError(f"{path}/{name}: cannot be read ({exc.strerror or exc})") from None


def parse_json(path: Path, name: str, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise BundleError(f"{path}/{name}: not valid JSON") from None


def read_json(path: Path, name: str):
    return parse_json(path, name, read_bytes(path, name))


def read_manifest_bytes(path: Path) -> bytes:
    f = path / MANIFEST
    if f.is_symlink() or not f.is_file():
        raise BundleError(f"{path}: no {MANIFEST} (not a fer-edge bundle)")
    return read_bytes(path, MANIFEST)


def parse_manifest(path: Path, data: bytes) -> dict:
    return parse_json(path, MANIFEST, data)


def check_labels(path: Path, labels) -> list[str]:
    classes = labels.get("classes") if isinstance(labels, dict) else None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise BundleError(f"{path}/labels.json: no list of class names")
    if len(classes) > MAX_CLASSES or not all(printable_line(c) for c in classes):
        raise BundleError(f"{path}/labels.json: class names must be at most {MAX_CLASSES}, each 1 to 64 "
                          "printable characters on one line")
    if len(set(classes)) != len(classes):
        raise BundleError(f"{path}/labels.json: a class name is given twice")
    return classes


def _number(x) -> bool:
    return finite_number(x)


def check_preprocess(path: Path, pre) -> dict:
    """preprocess.json: the input contract, every field of the right type and range."""
    where = f"{path}/preprocess.json"
    if not (isinstance(pre, dict) and {"input_size", "mean", "std", "scale"} <= set(pre)):
        raise BundleError(f"{where}: incomplete (needs input_size, mean, std, scale)")
    size = pre["input_size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(type(s) is int and 1 <= s <= MAX_INPUT_SIDE for s in size)):
        raise BundleError(f"{where}: input_size must be [height, width], whole numbers 1..{MAX_INPUT_SIDE}")
    problem = normalization_problem(pre) or temperature_problem(pre) or fields_problem(pre)
    if problem is not None:
        raise BundleError(f"{where}: {problem}")
    if pre.get("layout", "NCHW") not in LAYOUTS or pre.get("input_dtype", "float32") not in INPUT_DTYPES:
        raise BundleError(f"{where}: layout must be one of {', '.join(LAYOUTS)} and input_dtype one of "
                          f"{', '.join(INPUT_DTYPES)}")
    return pre


def check_io(path: Path, a: dict, pre: dict, labels: list[str]) -> None:
    """The artifact's input and output as the manifest lists them agree with
    preprocess.json and with labels.json (one class name per logit)."""
    out = a.get("output", {}).get("shape")
    if out is not None and (len(out) != 2 or out[-1] != len(labels)):
        raise BundleError(f"{path}/{MANIFEST}: the output of {a['file']} ({_short(out)}) does not match the "
                          f"{len(labels)} classes of labels.json")
    if "input" not in a:
        return
    h, w = pre["input_size"]
    nhwc = pre.get("layout", "NCHW") == "NHWC"
    shape = a["input"]["shape"]
    if len(shape) != 4 or list(shape[1:]) != ([h, w, 1] if nhwc else [1, h, w]) \
            or a["input"].get("dtype", pre.get("input_dtype", "float32")) != pre.get("input_dtype", "float32"):
        raise BundleError(f"{path}/{MANIFEST}: the input of {a['file']} ({_short(shape)}) does not match "
                          "preprocess.json")


def parity_status(path: Path, parity, files: list[str]) -> dict[str, str]:
    """passed | failed for each artifact, from parity.json's own verdicts."""
    reports = parity.get("artifacts") if isinstance(parity, dict) else None
    if not isinstance(reports, list):
        raise BundleError(f"{path}/parity.json: no artifact results")
    named = [r.get("artifact") for r in reports if isinstance(r, dict) and isinstance(r.get("artifact"), str)]
    if len(set(named)) != len(named):
        raise BundleError(f"{path}/parity.json: an artifact has two results")
    verdict = {r.get("artifact"): r.get("passed") for r in reports
               if isinstance(r, dict) and isinstance(r.get("artifact"), str)}
    out = {}
    for name in files:
        if not isinstance(verdict.get(name), bool):
            raise BundleError(f"{path}/parity.json: no parity result for {name}")
        out[name] = "passed" if verdict[name] else "failed"
    return out


def load_bundle(path, verify: bool = True, allow_failed: bool = False, trust=None,
                min_release: int | None = None) -> Bundle:
    """Read a bundle after checking its manifest and every file's sha256.

    trust: a public key (the ``.pub`` file's path, its bytes, or a key object):
    the bundle must then carry ``manifest.sig``, a valid Ed25519 signature of
    manifest.json made with the matching private key; an unsigned bundle or a
    bad signature is refused, saying which.  min_release (with trust): the
    signed manifest's ``release`` (convert --release) must be at least this, so
    an older bundle signed with the same key cannot be put back.  verify=False
    skips hashing the files (never with trust).  Every problem is a BundleError
    of one line."""
    try:
        return _load_bundle(Path(path), verify, allow_failed, trust, min_release)
    except OSError as exc:  # a path the OS refuses (too long, a loop of links), an unreadable folder
        raise BundleError(f"{str(path)[:200]}: {exc.strerror or exc}") from None


def check_release(path: Path, manifest: dict, min_release: int) -> None:
    """The signed release number is at least min_release (a replayed older bundle is refused)."""
    release = manifest.get("release")
    if release is None:
        raise BundleError(f"{path}: carries no release number, and releases from {min_release} on are accepted "
                          "(convert --release N)")
    if release < min_release:
        raise BundleError(f"{path}: release {release} is older than {min_release}, the oldest accepted here "
                          "(an earlier bundle put back?)")


def _load_bundle(path: Path, verify: bool, allow_failed: bool, trust, min_release: int | None = None) -> Bundle:
    path = Path(path)
    if min_release is not None and (trust is None or type(min_release) is not int or min_release < 0):
        raise BundleError("a minimum release needs a trusted key (an unsigned manifest's release can be edited) "
                          "and is a whole number >= 0")
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    data = read_manifest_bytes(path)
    signed_by = None
    if trust is not None:
        # The signature covers these exact bytes; they are parsed below, never re-read.
        signed_by = verify_bundle_signature(path, data, trust)
    manifest = parse_manifest(path, data)
    check_structure(path, manifest)
    if min_release is not None:
        check_release(path, manifest, min_release)
    # Verified: every file is read once and everything below uses those bytes (the
    # JSON files parsed from them, the runtimes handed them), so nothing swapped
    # in after the check is ever used.
    content = verify_files(path, manifest) if verify or trust is not None else None

    def json_file(name):
        if content is None:
            return read_json(path, name)
        return parse_json(path, name, content[name])

    labels = check_labels(path, json_file("labels.json"))
    preprocess = check_preprocess(path, json_file("preprocess.json"))
    parity = json_file("parity.json")
    status = parity_status(path, parity, [a["file"] for a in manifest["artifacts"]])
    artifacts = []
    for a in manifest["artifacts"]:
        check_io(path, a, preprocess, labels)
        said = a.get("status")
        if said is not None and said != status[a["file"]]:
            raise BundleError(f"{path}/{MANIFEST}: says {a['file']} {said}, but parity.json says "
                              f"{status[a['file']]} (altered manifest)")
        artifacts.append(Artifact(a["file"], a["target"], a["precision"], a["runtime"], status[a["file"]],
                                  path / a["file"], manifest["files"][a["file"]]["sha256"],
                                  None if content is None else content[a["file"]]))
    failed = [a.file for a in artifacts if a.status != "passed"]
    if failed and not allow_failed:
        raise BundleError(f"{path}: {', '.join(failed)} failed its parity check against PyTorch "
                          "(see parity.json); refusing to run it")
    return Bundle(path, manifest, labels, preprocess, artifacts, parity, signed_by)
