"""K-fold splits: subject-grouped when subject ids exist (CK+), stratified otherwise.

A subject's images must all sit in one fold, or the same face is trained on
and tested on and the accuracy is inflated.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from fer_edge import UserError


def stratified_folds(labels, k: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each of k folds; every class spread as evenly as possible."""
    labels = np.asarray(labels)
    if k < 2 or k > len(labels):
        raise UserError(f"--folds {k}: need 2 <= folds <= {len(labels)} samples")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, i in enumerate(idx):
            folds[(offset + j) % k].append(int(i))
        offset += len(idx)  # continue the round-robin so small classes do not all start at fold 0
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def grouped_folds(labels, groups, k: int, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each of k folds with every group (subject) in exactly one
    fold; groups are placed largest first into the fold that has fewest samples."""
    labels = np.asarray(labels)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[str(g)].append(i)
    if k < 2 or k > len(members):
        raise UserError(f"--folds {k}: need 2 <= folds <= {len(members)} subjects")
    rng = np.random.default_rng(seed)
    names = list(members)
    rng.shuffle(names)  # seed decides ties between groups of equal size
    names.sort(key=lambda g: -len(members[g]))
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in names:
        target = min(range(k), key=lambda f: (len(folds[f]), f))
        folds[target].extend(members[g])
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def make_folds(dataset, k: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """(folds, kind): subject-grouped when the dataset has subject ids, else stratified."""
    if dataset.subjects is not None:
        return grouped_folds(dataset.labels, dataset.subjects, k, seed), "subject-grouped"
    return stratified_folds(dataset.labels, k, seed), "stratified"
