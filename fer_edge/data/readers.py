"""Dataset readers.  Every reader returns a FaceSet: all faces decoded once
into one (N, H, W) uint8 array (FER2013 train is 66 MB decoded), so training
never waits on JPEG decoding and augmentation can run on the GPU.

Corrupt or unreadable images (and malformed CSV rows) are skipped and counted
in ``FaceSet.skipped``; with ``strict=True`` the first one is an error.
"""
from __future__ import annotations

import csv
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_edge import UserError
from fer_edge.data.classes import CANONICAL_CLASSES, resolve_classes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
# CK+ file names: S010_004_00000017.png -> subject S010, sequence 004.
CKPLUS_NAME = re.compile(r"^(S\d+)_(\d+)_")
# FER2013 CSV labels (0..6) are the canonical order's first seven.
FER2013_CSV_CLASSES = CANONICAL_CLASSES[:7]
FER2013_USAGES = ("Training", "PublicTest", "PrivateTest")
# RAF-DB basic: labels 1..7.
RAFDB_CLASSES = ["surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"]


@dataclass
class FaceSet:
    images: np.ndarray                  # (N, H, W) uint8
    labels: np.ndarray                  # (N,) int64, index into classes
    classes: list[str]
    sources: list[str]                  # file path (or CSV line) of each face
    subjects: list[str] | None = None   # subject id per face (CK+), for grouped folds
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def subset(self, index) -> "FaceSet":
        index = np.asarray(index)
        return FaceSet(self.images[index], self.labels[index], list(self.classes),
                       [self.sources[i] for i in index],
                       None if self.subjects is None else [self.subjects[i] for i in index])


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    # The device pipeline's resize, so training and deployment see the same pixels.
    from fer_edge.targets.bundle import resize_face

    return resize_face(img, (size, size))


def decode_image(path: str, size: int) -> np.ndarray | None:
    """Gray uint8 (size, size), or None when OpenCV cannot read the file."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None or img.size == 0:
        return None
    return _fit(img, size)


def _decode_all(paths: list[str], size: int, strict: bool, desc: str, progress: bool):
    """Decode in threads (OpenCV releases the GIL); returns (images, ok mask, skipped)."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    skipped = []

    def work(i):
        img = decode_image(paths[i], size)
        if img is not None:
            out[i] = img
            ok[i] = True
        return i

    iterator = range(len(paths))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(work, iterator)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=desc, unit="img", leave=False)
        for _ in results:
            pass
    for i in np.flatnonzero(~ok):
        if strict:
            raise UserError(f"cannot read image {paths[i]} (corrupt, truncated or not an image)")
        skipped.append((paths[i], "unreadable image"))
    return out, ok, skipped


def read_image_folder(root, size: int = 48, classes: list[str] | None = None, strict: bool = False,
                      subjects: bool | None = None, progress: bool = False) -> FaceSet:
    """Class-named folders ``root/<class>/*`` (any format OpenCV reads).

    subjects: parse CK+ subject ids from the file names (S010_004_...); None =
    automatically when every file name has that form.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{root}: no class folders inside (expected {root}/<class>/<images>)")
    class_list, index = resolve_classes([p.name for p in folders], classes)
    paths, labels = [], []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
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
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise UserError(f"{root}: none of the {len(paths)} images could be read")
    return FaceSet(images[keep], np.asarray(labels, dtype=np.int64)[keep], class_list,
                   [paths[i] for i in keep], None if subject_ids is None else [subject_ids[i] for i in keep],
                   skipped)


def read_fer2013_csv(path, usage: str | None = "Training", strict: bool = False, size: int = 48) -> FaceSet:
    """The original FER2013 CSV (``emotion,pixels,Usage``); usage None = every row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if usage is not None and usage not in FER2013_USAGES:
        raise UserError(f"unknown FER2013 usage {usage!r}; choose {', '.join(FER2013_USAGES)}")
    images, labels, sources, skipped = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"emotion", "pixels"} <= set(reader.fieldnames):
            raise UserError(f"{path}: not a FER2013 CSV (needs the columns emotion,pixels[,Usage])")
        for line, row in enumerate(reader, start=2):
            if usage is not None and row.get("Usage", "Training") != usage:
                continue
            where = f"{path}:{line}"
            try:
                label = int(row["emotion"])
                pixels = np.array(row["pixels"].split(), dtype=np.int64)
            except (ValueError, AttributeError):
                reason = "unparsable row"
            else:
                if not 0 <= label < 7:
                    reason = f"emotion {label} outside 0..6"
                elif pixels.size != 48 * 48:
                    reason = f"{pixels.size} pixels instead of 2304"
                elif pixels.min() < 0 or pixels.max() > 255:
                    reason = "pixel values outside 0..255"
                else:
                    img = pixels.astype(np.uint8).reshape(48, 48)
                    images.append(_fit(img, size))
                    labels.append(label)
                    sources.append(where)
                    continue
            if strict:
                raise UserError(f"{where}: {reason}")
            skipped.append((where, reason))
    if not images:
        raise UserError(f"{path}: no usable rows" + (f" with Usage {usage}" if usage else ""))
    return FaceSet(np.stack(images), np.asarray(labels, dtype=np.int64), list(FER2013_CSV_CLASSES), sources,
                   None, skipped)


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
    present = set()
    entries = []
    for n, line in enumerate(lst.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 7:
            if strict:
                raise UserError(f"{lst}:{n}: expected '<name> <label 1..7>', got {line!r}")
            continue
        name, label = parts[0], int(parts[1])
        if not name.startswith(split + "_"):
            continue
        stem = Path(name).stem
        entries.append((str(img_dir / f"{stem}_aligned{Path(name).suffix}"), RAFDB_CLASSES[label - 1]))
        present.add(RAFDB_CLASSES[label - 1])
    if not entries:
        raise UserError(f"{lst}: no {split} entries")
    classes = [c for c in CANONICAL_CLASSES if c in present]
    paths = [p for p, _ in entries]
    images, ok, skipped = _decode_all(paths, size, strict, "decode RAF-DB", progress)
    keep = np.flatnonzero(ok)
    labels = np.asarray([classes.index(c) for _, c in entries], dtype=np.int64)
    return FaceSet(images[keep], labels[keep], classes, [paths[i] for i in keep], None, skipped)


def _find_rafdb_list(root: Path) -> Path | None:
    for cand in (root / "list_patition_label.txt", root / "EmoLabel" / "list_patition_label.txt",
                 root / "basic" / "EmoLabel" / "list_patition_label.txt"):
        if cand.is_file():
            return cand
    return None


def load_dataset(path, size: int = 48, classes: list[str] | None = None, strict: bool = False,
                 usage: str | None = None, split: str = "train", progress: bool = False) -> FaceSet:
    """Pick the reader from what ``path`` is: a FER2013 CSV (``usage``, default
    Training), a RAF-DB folder (``split``), or class folders (CK+ subject ids
    are found automatically)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return read_fer2013_csv(path, usage=usage or "Training", strict=strict, size=size)
        raise UserError(f"{path}: expected a FER2013 .csv file or a folder of class folders")
    if _find_rafdb_list(path) is not None:
        return read_rafdb(path, split=split, size=size, strict=strict, progress=progress)
    return read_image_folder(path, size=size, classes=classes, strict=strict, progress=progress)
