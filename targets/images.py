"""Images from files for the device runtime: the checks of fer_edge.images
(header read before a pixel is decoded; bombs, empty, oversized, unreadable
and non-image files refused with one reason), phrased with the file's path."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_edge.images import IMAGE_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, opencv_silenced, probe_header  # noqa: F401
from fer_edge.images import read_checked_bytes
from fer_edge.images import read_image as _read_image

MAX_PIXELS = MAX_IMAGE_PIXELS


def image_size(path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding it; None
    when the content is none of the formats read here."""
    try:
        head = probe_header(Path(path).read_bytes())
    except OSError:
        return None
    return None if head is None or head[1] is None else (head[1], head[2])


def image_problem(path) -> str | None:
    """Why this file will not be decoded (None: it may be)."""
    problem = read_checked_bytes(path)[2]
    return None if problem is None else f"{path}: {problem}"


def read_image(path) -> tuple[np.ndarray | None, str | None]:
    """(BGR frame, None) or (None, "PATH: why not")."""
    img, problem = _read_image(path)
    return (img, None) if problem is None else (None, f"{path}: {problem}")
