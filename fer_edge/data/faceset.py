"""FaceSet: a dataset decoded once into one uint8 array, with what was skipped."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


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

    def skip_counts(self) -> dict[str, int]:
        """How many items were skipped for each reason category ("too large", "not UTF-8", ...)."""
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.skipped))

    def skip_summary(self) -> str:
        """One line: "3 skipped (2 too large, 1 corrupt or truncated)", or "" when none were."""
        if not self.skipped:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skip_counts().items(), key=lambda kv: -kv[1]))
        return f"{len(self.skipped)} skipped ({parts})"

    def subset(self, index) -> "FaceSet":
        index = np.asarray(index)
        return FaceSet(self.images[index], self.labels[index], list(self.classes),
                       [self.sources[i] for i in index],
                       None if self.subjects is None else [self.subjects[i] for i in index])
