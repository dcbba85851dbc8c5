"""Dataset readers.  Every reader returns a FaceSet: all faces decoded once
into one (N, H, W) uint8 array (FER2013 train is 66 MB decoded), so training
never waits on JPEG decoding and augmentation can run on the GPU.

Bad input is skipped and counted in ``FaceSet.skipped`` as (source,
"category: detail"): corrupt, truncated, empty or oversized images (the
header is checked before decoding: fer_edge/data/images.py), files that are no
image, malformed CSV rows and RAF-DB list lines.  With ``strict=True`` the
first one is a UserError; a dataset with nothing usable is one too.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fer_edge import UserError
from fer_edge.data.classes import CANONICAL_CLASSES, FER2013_CLASSES, RAFDB_CLASSES, resolve_classes
from fer_edge.data.faceset import FaceSet
from fer_edge.data.fer2013_csv import FER2013_USAGES, read_fer2013_csv
from fer_edge.data.images import IMAGE_SUFFIXES, decode_image, read_face
from fer_edge.images import native_stderr_quiet

# CK+ file names: S010_004_00000017.png -> subject S010, sequence 004.
CKPLUS_NAME = re.compile(r"^(S\d+)_(\d+)_")
# RAF-DB list labels "1".."7" -> class.
RAFDB_LABELS = {str(i): c for i, c in enumerate(RAFDB_CLASSES, start=1)}
# Kept importable under their old names; the lists live in fer_edge.data.classes.
FER2013_CSV_CLASSES = FER2013_CLASSES

__all__ = ["FaceSet", "load_dataset", "read_fer2013_csv", "read_image_folder", "read_rafdb", "decode_image",
           "IMAGE_SUFFIXES", "FER2013_USAGES", "RAFDB_CLASSES", "CKPLUS_NAME"]


def _list_folder(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise UserError(f"{folder}: cannot list the folder: {exc.strerror or exc}") from None


def _usable(ok: np.ndarray, skipped: list, where) -> np.ndarray:
    """Indices of the decoded images; none at all is an error naming the first reason."""
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise UserError(f"{where}: none of the {len(ok)} images could be read{first}")
    return keep


def _decode_all(paths: list[str], size: int, strict: bool, desc: str, progress: bool):
    """Decode in threads (OpenCV releases the GIL); returns (images, ok mask, skipped)."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    reasons: list[str | None] = [None] * len(paths)

    def work(i):
        img, reasons[i] = read_face(paths[i], size)
        if img is not None:
            out[i] = img
            ok[i] = True
        return i

    with native_stderr_quiet(), ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(work, range(len(paths)))
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=desc, unit="img", leave=False)
        for _ in results:
            pass
    skipped = []
    for i in np.flatnonzero(~ok):
        if strict:
            raise UserError(f"cannot read image {paths[i]}: {reasons[i]}")
        skipped.append((paths[i], reasons[i]))
    return out, ok, skipped


def read_image_folder(root, size: int = 48, classes: list[str] | None = None, strict: bool = False,
                      subjects: bool | None = None, progress: bool = False) -> FaceSet:
    """Class-named folders ``root/<class>/*`` (JPEG, PNG, BMP, TIFF, WebP, PGM/PPM).

    subjects: parse CK+ subject ids from the file names (S010_004_...); None =
    automatically when every file name has that form.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    folders = sorted(p for p in _list_folder(root) if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root}: no class folders inside (expected {root}/<class>/<images>)")
    class_list, index = resolve_classes([p.name for p in folders], classes)
    paths, labels = [], []
    for folder in folders:
        # Anything named like an image is tried, so that a link, a fifo or a folder named x.png is
        # counted as skipped ("not a file") rather than silently left out.
        files = sorted(p for p in _list_folder(folder) if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [index[folder.name]] * len(files)
    if not paths:
        raise UserError(f"{root}: the class folders hold no images")
    images, ok, skipped = _decode_all(paths, size, strict, f"decode {root.name}", progress)
    names = [Path(p).name for p in paths]
    if subjects is None:
        subjects = all(CKPLUS_NAME.match(n) for n in names)
    subject_ids = None
    if subjects:
        bad = [n for n in names if not CKPLUS_NAME.match(n)]
        if bad:
            raise UserError(f"{root}: file {bad[0]} has no subject id (expected names like S010_004_00000017.png)")
        subject_ids = [CKPLUS_NAME.match(n).group(1) for n in names]
    keep = _usable(ok, skipped, root)
    return FaceSet(images[keep], np.asarray(labels, dtype=np.int64)[keep], class_list,
                   [paths[i] for i in keep], None if subject_ids is None else [subject_ids[i] for i in keep],
                   skipped)


def read_rafdb(root, split: str = "train", size: int = 48, strict: bool = False, progress: bool = False) -> FaceSet:
    """RAF-DB basic: ``list_patition_label.txt`` (``train_00001.jpg 5``) and the
    aligned images (``aligned/train_00001_aligned.jpg``); labels 1..7 =
    surprise, fear, disgust, happy, sad, angry, neutral, mapped to the
    canonical order."""
    root = Path(root)
    lst = _find_rafdb_list(root)
    if lst is None:
        raise UserError(f"{root}: no list_patition_label.txt found (RAF-DB basic layout)")
    img_dir = next((d for d in (lst.parent / "aligned", lst.parent.parent / "Image" / "aligned", root / "aligned")
                    if d.is_dir()), None)
    if img_dir is None:
        raise UserError(f"{root}: no aligned/ image folder next to {lst.name}")
    entries, skipped = _read_rafdb_list(lst, img_dir, split, strict)
    if not entries:
        raise UserError(f"{lst}: no {split} entries")
    present = {c for _, c in entries}
    classes = [c for c in CANONICAL_CLASSES if c in present]
    paths = [p for p, _ in entries]
    images, ok, bad_images = _decode_all(paths, size, strict, "decode RAF-DB", progress)
    skipped += bad_images
    keep = _usable(ok, bad_images, root)
    labels = np.asarray([classes.index(c) for _, c in entries], dtype=np.int64)
    return FaceSet(images[keep], labels[keep], classes, [paths[i] for i in keep], None, skipped)


def _read_rafdb_list(lst: Path, img_dir: Path, split: str, strict: bool) -> tuple[list[tuple[str, str]], list]:
    """(image path, class) of each ``split`` entry, and the malformed lines skipped."""
    try:
        text = lst.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise UserError(f"{lst}: cannot read it: {exc.strerror or exc}") from None
    entries, skipped = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in RAFDB_LABELS or not (parts[0].isascii() and parts[0].isprintable()):
            reason = f"malformed list line: expected '<name> <label 1..7>', got {line[:60]!r}"
            if strict:
                raise UserError(f"{lst}:{n}: {reason}")
            skipped.append((f"{lst}:{n}", reason))
            continue
        name, label = parts[0], RAFDB_LABELS[parts[1]]
        if name.startswith(split + "_"):
            path = img_dir / f"{Path(name).stem}_aligned{Path(name).suffix}"
            entries.append((str(path), label))
    return entries, skipped


def _find_rafdb_list(root: Path) -> Path | None:
    for cand in (root / "list_patition_label.txt", root / "EmoLabel" / "list_patition_label.txt",
                 root / "basic" / "EmoLabel" / "list_patition_label.txt"):
        if cand.is_file():
            return cand
    return None


def note_fixed_classes(path, classes, what: str) -> None:
    """--classes names and orders class folders; a CSV or RAF-DB has its own fixed
    classes: said once (a note at the end), not silently ignored."""
    if classes:
        from fer_edge import note

        note(f"note: --classes applies to class folders; {path} is {what}, which has its own classes")


def load_dataset(path, size: int = 48, classes: list[str] | None = None, strict: bool = False,
                 usage: str | None = None, split: str = "train", progress: bool = False) -> FaceSet:
    """Pick the reader from what ``path`` is: a FER2013 CSV (``usage``, default
    Training), a RAF-DB folder (``split``), or class folders (CK+ subject ids
    are found automatically)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if not (path.is_file() or path.is_dir()):   # a pipe, a device: never read as data
        raise UserError(f"{path}: not a regular file or a folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            note_fixed_classes(path, classes, "a FER2013 CSV")
            return read_fer2013_csv(path, usage=usage or "Training", strict=strict, size=size)
        raise UserError(f"{path}: expected a FER2013 .csv file or a folder of class folders")
    if _find_rafdb_list(path) is not None:
        note_fixed_classes(path, classes, "a RAF-DB folder")
        return read_rafdb(path, split=split, size=size, strict=strict, progress=progress)
    return read_image_folder(path, size=size, classes=classes, strict=strict, progress=progress)
