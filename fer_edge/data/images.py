"""One image file -> one gray face, or the reason it was skipped (see fer_edge.images:
the header is checked before anything is decoded)."""
from __future__ import annotations

import numpy as np

from fer_edge.contract import resize_face
from fer_edge.images import MAX_IMAGE_PIXELS, probe_header, read_image  # noqa: F401  (re-exported)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def read_face(path: str, size: int) -> tuple[np.ndarray | None, str | None]:
    """(gray uint8 (size, size), None) or (None, "category: detail") for a file
    that is skipped.  Never raises for a bad file."""
    import cv2

    img, problem = read_image(path, cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None, problem
    return resize_face(img, (size, size)), None


def decode_image(path: str, size: int) -> np.ndarray | None:
    """Gray uint8 (size, size), or None when the file is skipped (see read_face)."""
    return read_face(path, size)[0]
