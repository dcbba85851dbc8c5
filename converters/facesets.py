"""Which labelled faces calibrate an int8 artifact and which check its parity.

Parity measured on the calibration faces is biased (the ranges were fitted to
them) and, on a few hundred faces, too coarse to resolve a point of accuracy.
So the check set is disjoint from the calibration set, by content: a face
whose pixels (after resizing to the model input) hash like a calibration
face's is never used, which also catches duplicates and overlapping folders.
The calibration faces' hashes are kept in the bundle manifest so that a later
``fer-edge parity`` run excludes them too.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer_edge import UserError

DIGEST_HEX = 16  # 64 bits of sha256 per face: collisions among millions of faces are negligible


def face_digests(faces: np.ndarray) -> list[str]:
    """A short sha256 of each face's uint8 pixels."""
    return [hashlib.sha256(np.ascontiguousarray(f, dtype=np.uint8).tobytes()).hexdigest()[:DIGEST_HEX]
            for f in faces]


def balanced_pick(labels: np.ndarray, n_classes: int, limit: int, seed: int = 0) -> np.ndarray:
    """A seeded subset of `limit` indices taken round-robin over the classes (as
    even as the classes allow): every class is calibrated.  Sorted."""
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = [order[labels[order] == c] for c in range(n_classes)]
    picked, k = [], 0
    while len(picked) < min(limit, len(labels)):
        for idx in per_class:
            if k < len(idx) and len(picked) < limit:
                picked.append(idx[k])
        k += 1
    return np.sort(np.array(picked, dtype=np.int64))


def stratified_counts(counts: np.ndarray, limit: int) -> np.ndarray:
    """How many faces of each class a sample of `limit` takes: proportional to the
    class sizes (largest remainder), never more than a class holds."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if limit >= total:
        return counts.copy()
    exact = counts * limit / total
    take = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - take), kind="stable")[: limit - int(take.sum())]:
        take[c] += 1
    return np.minimum(take, counts)


def stratified_pick(labels: np.ndarray, n_classes: int, limit: int, seed: int = 0) -> np.ndarray:
    """A seeded class-stratified subset of `limit` indices (each class in its
    share of the data).  Sorted."""
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = [order[labels[order] == c] for c in range(n_classes)]
    take = stratified_counts(np.array([len(i) for i in per_class]), limit)
    picked = np.concatenate([idx[:k] for idx, k in zip(per_class, take)] or [np.array([], np.int64)])
    return np.sort(picked.astype(np.int64))


def files_sha256(sources: list[str], root) -> str:
    """sha256 of the sorted list of the faces' files, relative to the data root
    (CSV faces are "file:line"): which faces were used, checkable later."""
    root = str(Path(root).resolve())
    rel = sorted(os.path.relpath(s, root) if os.path.isabs(s) and s.startswith(root) else s for s in sources)
    return hashlib.sha256("\n".join(rel).encode()).hexdigest()


@dataclass
class FaceSelection:
    faces: np.ndarray        # (N, H, W) uint8
    labels: np.ndarray       # (N,) model class indices
    sources: list[str]
    root: str
    how: str                 # how the subset was chosen (recorded in the bundle)
    excluded: int = 0        # faces left out because they were calibration faces
    duplicates: int = 0      # faces left out because an identical face was already in

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        return {"path": self.root, "count": len(self), "files_sha256": files_sha256(self.sources, self.root),
                "selection": self.how, "excluded_calibration_faces": self.excluded,
                "duplicate_faces": self.duplicates}


def read_labelled(path, size: int, classes: list[str], what: str):
    """(faces, labels as model class indices, sources) of class folders or a FER2013 CSV."""
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import remap_labels

    if not Path(path).exists():
        raise UserError(f"{what} {path}: no such file or folder")
    try:
        ds = load_dataset(path, size=size, usage="PublicTest")
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    return ds.images, remap_labels(ds, classes), list(ds.sources)


def calibration_subset(path, data, classes: list[str], limit: int, seed: int = 0) -> FaceSelection:
    faces, labels, sources = data
    idx = balanced_pick(labels, len(classes), limit, seed)
    return FaceSelection(faces[idx], labels[idx], [sources[i] for i in idx], str(path),
                         f"{len(idx)} faces, round-robin over the classes, seed {seed}")


def parity_subset(path, data, classes: list[str], limit: int | None, exclude: set[str] | frozenset = frozenset(),
                  seed: int = 0) -> FaceSelection:
    """Faces of `data` whose digest is not in `exclude`, each distinct face once
    (600 copies of one face are one piece of evidence, not 600), class-stratified
    down to `limit` (None: all of them)."""
    faces, labels, sources = data
    digests = face_digests(faces)
    calibration = np.array([d in exclude for d in digests], dtype=bool)
    first = np.zeros(len(digests), dtype=bool)
    first[np.unique(np.array(digests, dtype=object), return_index=True)[1].astype(np.int64)] = True
    keep = first & ~calibration
    pool = np.flatnonzero(keep)
    if limit is not None and limit < len(pool):
        pool = pool[stratified_pick(labels[pool], len(classes), limit, seed)]
        how = f"{len(pool)} faces, class-stratified, seed {seed}"
    else:
        how = "every face"
    if exclude:
        how += ", none of them a calibration face (by pixel sha256)"
    return FaceSelection(faces[pool], labels[pool], [sources[i] for i in pool], str(path), how,
                         int(calibration.sum()), int((~first & ~calibration).sum()))


def choose_faces(fmt, calib, parity_data, size: int, classes: list[str], calib_size: int,
                 parity_size: int | None, log=print):
    """(calibration faces or None, parity faces or None): the parity faces are
    class-stratified, at most parity_size of --parity-data (or of --calib), never
    a calibration face.  None, None: no labelled faces, parity runs on noise."""
    calib_data = read_labelled(calib, size, classes, "--calib") if calib else None
    calib_sel = calibration_subset(calib, calib_data, classes, calib_size) if fmt.needs_calib else None
    if calib_sel is not None:
        log(f"calibration: {len(calib_sel)} faces from {calib}")
    if parity_data and not (calib and Path(parity_data).resolve() == Path(calib).resolve()):
        source, data = parity_data, read_labelled(parity_data, size, classes, "--parity-data")
    else:
        source, data = calib, calib_data
    if data is None:
        return calib_sel, None
    exclude = set(face_digests(calib_sel.faces)) if calib_sel is not None else set()
    check = parity_subset(source, data, classes, parity_size, exclude)
    if len(check) == 0:
        raise UserError(f"no faces left for the parity check: all of {source} was used for calibration; "
                        "give --parity-data DIR (labelled faces) or a smaller --calib-size")
    from fer_edge.converters.parity import too_few_faces

    few = too_few_faces(len(check), [fmt])
    if few:   # said before the export, not after minutes of it
        raise UserError(f"{few} (of {source}, after leaving out calibration faces and copies); give --parity-data "
                        "DIR with more labelled faces, a larger --parity-size, or a smaller --calib-size")
    note = "" if parity_size is None or len(check) >= parity_size else \
        f" (all that is left; fewer than {parity_size}: a coarse check, --parity-data DIR gives more)"
    log(f"parity: {len(check)} faces from {source}, none of them a calibration face{note}")
    return calib_sel, check


def calibration_record(calib_sel: FaceSelection | None, calib_method: str, fmt) -> dict | None:
    """How the int8 ranges were calibrated (the manifest's "calibration"); the
    faces' pixel hashes let a later `fer-edge parity` leave them out."""
    if calib_sel is None:
        return None
    rec = calib_sel.describe()
    rec.pop("excluded_calibration_faces", None)
    rec["method"] = calib_method if fmt.uses_calib_method else fmt.observers
    rec["face_sha256"] = face_digests(calib_sel.faces)
    return rec
