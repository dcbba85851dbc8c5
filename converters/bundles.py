"""Writing a bundle folder: one step of ``fer-edge convert`` (see
fer_edge.targets.bundle for reading one).

The bundle is built in a temp folder beside ``--out`` (``staging``) and
renamed into place only when complete, so a failure never leaves half a
bundle behind; ``--force`` replaces only a bundle (or an empty folder).
``remark`` rewrites a bundle's verdicts after ``fer-edge parity``.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from fer_edge import UserError, __version__
from fer_edge.fileio import (check_writable_folder, check_writable_parent, json_bytes, os_error_line,
                             refuse_existing, sha256_file, write_bytes_atomic)
from fer_edge.targets.bundle import FORMAT, FORMAT_VERSION, MANIFEST, SIGNATURE


# Files a device adds to a bundle it runs: the TensorRT engine cache (targets/jetson.py, engine_paths).
DEVICE_CACHE_SUFFIXES = (".engine", ".engine.json")


def bundle_files(out: Path) -> set[str] | None:
    """The names a fer-edge bundle in ``out`` consists of (its manifest, signature
    and every file the manifest lists), or None when ``out`` holds no readable
    fer-edge manifest."""
    import json

    try:
        manifest = json.loads((out / MANIFEST).read_bytes()[: 1 << 24])
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = manifest.get("files")
    if not isinstance(files, (dict, list)) or not all(isinstance(f, str) for f in files):
        return None
    return {MANIFEST, SIGNATURE, *files}


def replaceable_bundle(out: Path) -> bool:
    """Whether --force may replace ``out``: an empty folder, or a fer-edge bundle
    and nothing else (files its manifest lists, its signature, engine caches a
    device built from it) -- never a file, a link, or a folder holding anything
    a new bundle would not bring back."""
    if not out.is_dir() or out.is_symlink():
        return False
    entries = list(out.iterdir())
    if not entries:
        return True
    ours = bundle_files(out)
    if ours is None:
        return False
    return all(e.is_file() and not e.is_symlink() and (e.name in ours or e.name.endswith(DEVICE_CACHE_SUFFIXES))
               for e in entries)


def check_out(out, force: bool) -> Path:
    """Refuse, before any long work, a --out that cannot become a bundle."""
    if not str(out).strip():   # Path("") is the current folder: never what an empty argument meant
        raise UserError("--out: give a folder name")
    out = Path(out)
    try:
        return _check_out(out, force)
    except OSError as exc:  # a name the file system refuses (too long, ...)
        raise UserError(os_error_line(exc, out)) from None


def _check_out(out: Path, force: bool) -> Path:
    refuse_existing(out, force)
    if out.exists() or out.is_symlink():
        if not replaceable_bundle(out):
            raise UserError(f"{out} is not a fer-edge bundle, or holds files a bundle does not list; --force "
                            "replaces bundles only: choose another --out")
        check_writable_folder(out.parent, "--out", out)
    else:
        check_writable_parent(out, "--out")
    return out


def remove_stale_temps(out: Path) -> None:
    """Temp folders of an earlier convert into ``out`` that never finished (killed):
    ``.NAME.tmp-*`` beside it, and ``.NAME.old-*`` from an interrupted swap."""
    if not out.parent.is_dir():
        return
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _place(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temp bundle to --out (replacing an old one only with --force)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    refuse_existing(out, force)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextlib.contextmanager
def staging(out, force: bool):
    """A temp folder beside ``out`` to build the bundle in; renamed to ``out`` when
    the block ends without error, removed otherwise.  OS errors are one line."""
    out = Path(out)
    remove_stale_temps(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise UserError(os_error_line(exc, out)) from None
    try:
        yield tmp
        for p in tmp.iterdir():  # mkdtemp is 0700: a bundle is meant to be copied and shared
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        _place(tmp, out, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(os_error_line(exc, out)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_manifest(fmt, meta: dict, weights, folder: Path, pre: dict, status: str, calibration: dict | None,
                   dynamic_batch: bool, release: int | None = None) -> dict:
    """manifest.json: versions, the release number (when given), the source
    checkpoint, the artifact table and the sha256 of every file already in ``folder``."""
    h, w = pre["input_size"]
    nhwc = pre["layout"] == "NHWC"
    in_shape = [None if dynamic_batch else 1, *((h, w, 1) if nhwc else (1, h, w))]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fer_edge_version": __version__,
        "target": fmt.target, "precision": fmt.precision,
        **({} if release is None else {"release": int(release)}),
        "source_checkpoint": {"file": Path(weights).name, "path": str(Path(weights).resolve()),
                              "sha256": sha256_file(weights),
                              "arch": meta["arch"], "form": meta["form"], "config": meta["config"]},
        "artifacts": [{"file": fmt.file, "target": fmt.target, "precision": fmt.precision, "runtime": fmt.runtime,
                       "status": status,  # for people; devices read the verdict from parity.json
                       "input": {"name": "input", "shape": in_shape, "dtype": pre["input_dtype"],
                                 "layout": pre["layout"]},
                       "output": {"name": "logits", "shape": [in_shape[0], len(meta["classes"])]}}],
    }
    if calibration is not None:
        manifest["calibration"] = calibration
    manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(folder.iterdir()) if p.is_file()}
    return manifest


def write_bundle(folder: Path, fmt, meta: dict, weights, pre: dict, parity_doc: dict, calibration: dict | None,
                 dynamic_batch: bool = False, key=None, release: int | None = None) -> None:
    """Everything beside the artifact (already in ``folder``): labels, preprocess,
    parity, README, then the manifest hashing them all, and its signature with ``key``."""
    from fer_edge.converters.guides import readme
    from fer_edge.targets.signing import signature_file

    status = "passed" if all(r["passed"] for r in parity_doc["artifacts"]) else "failed"
    (folder / "labels.json").write_bytes(json_bytes({"classes": meta["classes"]}))
    (folder / "preprocess.json").write_bytes(json_bytes(pre))
    (folder / "parity.json").write_bytes(json_bytes(parity_doc))
    (folder / "README.md").write_text(readme(fmt, meta, pre), encoding="utf-8")
    manifest = build_manifest(fmt, meta, weights, folder, pre, status, calibration, dynamic_batch, release)
    data = json_bytes(manifest)
    (folder / MANIFEST).write_bytes(data)
    if key is not None:
        (folder / SIGNATURE).write_bytes(signature_file(key, data))


def load_signing_key(path):
    """The Ed25519 private key for --sign, or one line saying what is wrong."""
    from fer_edge.targets.bundle import BundleError
    from fer_edge.targets.signing import load_private_key

    try:
        return load_private_key(path)
    except (ValueError, BundleError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"--sign {path}: {exc.strerror or exc}") from None


def open_bundle(path, trust=None):
    """A bundle to re-check (failed ones included), or one line saying why not."""
    from fer_edge.targets.bundle import BundleError, load_bundle

    try:
        return load_bundle(path, allow_failed=True, trust=trust)
    except BundleError as exc:
        raise UserError(str(exc)) from None


def source_checkpoint(bundle, weights=None) -> Path:
    """The checkpoint the bundle was made from (its sha256 is in the manifest):
    ``weights``, or the path the manifest records."""
    src = bundle.manifest.get("source_checkpoint")
    if not (isinstance(src, dict) and isinstance(src.get("sha256"), str) and src["sha256"]):
        raise UserError(f"{bundle.path}: the manifest records no source checkpoint")
    recorded = src.get("path", src.get("file", ""))
    weights = Path(weights) if weights else Path(recorded if isinstance(recorded, str) else "")
    if not weights.is_file():
        raise UserError(f"the PyTorch reference {str(weights)!r} is not there: pass --weights (the checkpoint "
                        f"{str(src.get('file'))[:200]!r} with sha256 {str(src['sha256'])[:12]!r}…)")
    if sha256_file(weights) != src["sha256"]:
        raise UserError(f"{weights} is not the checkpoint this bundle was made from (sha256 differs)")
    return weights


def calibration_digests(bundle) -> set[str]:
    """The pixel hashes of the faces the bundle was calibrated on (left out of
    parity).  Only int8 artifacts are calibrated: a bundle without one has none."""
    from fer_edge.converters.formats import lookup

    if not any(lookup(a.target, a.precision).needs_calib for a in bundle.artifacts):
        return set()
    cal = bundle.manifest.get("calibration")
    digests = cal.get("face_sha256") if isinstance(cal, dict) else None
    return {d for d in digests if isinstance(d, str)} if isinstance(digests, list) else set()


def bundle_formats(bundle) -> list:
    """The format-table row of each artifact, which sets the thresholds it is
    judged by.  The row is found by the listed target and precision, and the
    artifact must be that row's file and runtime (what the listing says is only
    as trustworthy as the bundle: a signed one is verified before this)."""
    from fer_edge.converters.formats import lookup

    rows = []
    for a in bundle.artifacts:
        fmt = lookup(a.target, a.precision)
        if (a.file, a.runtime) != (fmt.file, fmt.runtime):
            raise UserError(f"{bundle.path}: {a.file!r} ({a.runtime!r}) is listed as {fmt.key}, whose artifact is "
                            f"{fmt.file} run by {fmt.runtime}: not a bundle convert wrote")
        rows.append(fmt)
    return rows


def check_matches_checkpoint(bundle, meta: dict) -> None:
    """The bundle's labels.json and preprocess.json are exactly what convert
    writes for this checkpoint: parity compares logits only, so a reordered
    class list or another temperature would pass it unseen."""
    from fer_edge.contract import artifact_preprocess

    if list(bundle.labels) != list(meta["classes"]):
        raise UserError(f"{bundle.path}: labels.json ({', '.join(bundle.labels)}) is not the checkpoint's class "
                        f"list ({', '.join(meta['classes'])}): not this checkpoint's bundle, or altered")
    want = artifact_preprocess(meta["preprocess"], nhwc=bundle.preprocess.get("layout") == "NHWC")
    diff = sorted(k for k in set(want) | set(bundle.preprocess) if want.get(k) != bundle.preprocess.get(k))
    if diff:
        raise UserError(f"{bundle.path}: preprocess.json differs from the checkpoint's pre-processing "
                        f"({', '.join(map(repr, diff[:8]))[:300]}): not this checkpoint's bundle, altered, or made "
                        "by an older fer-edge (convert it again)")


def remark(bundle, parity_doc: dict, key=None) -> None:
    """Write the new parity.json and a manifest with its hash and the new
    statuses (and, with key, a new manifest.sig), each through a temp file
    renamed into place.  Written in that order, every state in between is
    refused by load_bundle (parity.json's hash, then the old signature, no
    longer match) rather than accepted with a stale verdict."""
    from fer_edge.targets.signing import signature_file

    parity_bytes = json_bytes(parity_doc)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["files"]["parity.json"] = {"sha256": hashlib.sha256(parity_bytes).hexdigest(),
                                        "bytes": len(parity_bytes)}
    verdict = {r["artifact"]: r["passed"] for r in parity_doc["artifacts"]}
    for a in manifest["artifacts"]:
        a["status"] = "passed" if verdict[a["file"]] else "failed"
    manifest_bytes = json_bytes(manifest)
    writes = [("parity.json", parity_bytes), (MANIFEST, manifest_bytes)]
    if key is not None:
        writes.append((SIGNATURE, signature_file(key, manifest_bytes)))
    for name, data in writes:
        write_bytes_atomic(bundle.path / name, data, force=True)
