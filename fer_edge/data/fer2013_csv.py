"""The original FER2013 CSV (``emotion,pixels,Usage``), read line by line.

A malformed row (not UTF-8, too long, wrong column count, a label or pixel
string that is not what FER2013 has) is skipped with its reason; the file as
a whole is refused in one line only when its header is not FER2013's.  Lines
are read with a length limit, so a multi-gigabyte "field" is skipped in
bounded memory instead of being read whole.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from fer_edge import UserError
from fer_edge.contract import resize_face
from fer_edge.data.classes import FER2013_CLASSES
from fer_edge.data.faceset import FaceSet

FER2013_USAGES = ("Training", "PublicTest", "PrivateTest")
FER2013_SIDE = 48
FER2013_PIXELS = FER2013_SIDE * FER2013_SIDE
# A FER2013 row is under 10 000 characters (2304 pixels of at most "255 ");
# a line over this limit is skipped as "line too long" without being kept.
MAX_LINE_CHARS = 1 << 16
PIXEL_TEXT = re.compile(r"[0-9 \t]*")
LABEL_TEXT = re.compile(r"-?[0-9]{1,6}")


def bounded_lines(f, limit: int = MAX_LINE_CHARS):
    """(line, too_long) for each line of a text file; a line over ``limit``
    characters comes back as ("", True), read through in ``limit``-sized pieces."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(("\n", "\r")):
            yield line, False
            continue
        while line and not line.endswith(("\n", "\r")):
            line = f.readline(limit)
        yield "", True


def split_row(line: str) -> list[str] | str:
    """The fields of one CSV line, or the reason it cannot be read."""
    try:
        line.encode("utf-8")  # undecodable bytes survive as lone surrogates (errors="surrogateescape")
    except UnicodeEncodeError:
        return "not UTF-8: undecodable bytes"
    try:
        return next(csv.reader([line]), [])
    except csv.Error as exc:
        return f"unparsable row: {exc}"


def parse_row(fields: list[str], columns: dict[str, int]) -> tuple[int, np.ndarray] | str:
    """(label, 48x48 uint8 face) from one row's fields, or the reason it is skipped."""
    if len(fields) != len(columns):
        return f"wrong column count: {len(fields)} fields, the header has {len(columns)}"
    text = fields[columns["emotion"]].strip()
    if not LABEL_TEXT.fullmatch(text):
        return f"bad label: emotion {text[:20]!r} is not an integer"
    label = int(text)
    if not 0 <= label < len(FER2013_CLASSES):
        return f"label out of range: emotion {label} outside 0..{len(FER2013_CLASSES) - 1}"
    text = fields[columns["pixels"]]
    # Only digits and blanks (checked at C speed); numpy then saturates a number too
    # long for int64 at its maximum, which the range check below refuses.
    if not PIXEL_TEXT.fullmatch(text):
        return "bad pixel values: not integers in 0..255"
    pixels = np.fromstring(text, dtype=np.int64, sep=" ") if text.strip() else np.zeros(0, np.int64)
    if pixels.size != FER2013_PIXELS:
        return f"wrong pixel count: {pixels.size} pixels instead of {FER2013_PIXELS}"
    if pixels.max() > 255:
        return "bad pixel values: not integers in 0..255"
    return label, pixels.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE)


def row_usage(fields: list[str], columns: dict[str, int]) -> str:
    """A row's split; a CSV without the Usage column is all Training."""
    return fields[columns["Usage"]].strip() if "Usage" in columns else "Training"


def read_header(lines, path: Path) -> dict[str, int]:
    """Column name -> index from the first line; anything but a FER2013 header is one UserError."""
    first = next(lines, None)
    fields = None if first is None or first[1] else split_row(first[0])
    if isinstance(fields, list):
        names = [f.strip().lstrip("\ufeff") for f in fields]
        if {"emotion", "pixels"} <= set(names) and len(set(names)) == len(names):
            return {n: i for i, n in enumerate(names)}
    raise UserError(f"{path}: not a FER2013 CSV (needs a UTF-8 header line with the columns emotion,pixels[,Usage])")


def read_fer2013_csv(path, usage: str | None = "Training", strict: bool = False, size: int = 48) -> FaceSet:
    """The original FER2013 CSV; usage None = every row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if usage is not None and usage not in FER2013_USAGES:
        raise UserError(f"unknown FER2013 usage {usage!r}; choose {', '.join(FER2013_USAGES)}")
    images, labels, sources, skipped = [], [], [], []
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as exc:
        raise UserError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with f:
        lines = bounded_lines(f)
        columns = read_header(lines, path)
        for number, (line, too_long) in enumerate(lines, start=2):
            where = f"{path}:{number}"
            got = f"line too long: over {MAX_LINE_CHARS} characters" if too_long else split_row(line)
            if got == []:  # blank line
                continue
            if isinstance(got, list) and len(got) == len(columns):
                split = row_usage(got, columns)
                if split not in FER2013_USAGES:   # a malformed row, whichever split was asked for
                    got = f"unknown Usage {split[:20]!r} (FER2013's are {', '.join(FER2013_USAGES)})"
                elif usage is not None and split != usage:
                    continue
            if isinstance(got, list):
                got = parse_row(got, columns)
            if isinstance(got, str):
                if strict:
                    raise UserError(f"{where}: {got}")
                skipped.append((where, got))
                continue
            images.append(resize_face(got[1], (size, size)))
            labels.append(got[0])
            sources.append(where)
    if not images:
        raise UserError(f"{path}: no usable rows" + (f" with Usage {usage}" if usage else "")
                        + (f" ({len(skipped)} malformed, first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    return FaceSet(np.stack(images), np.asarray(labels, dtype=np.int64), list(FER2013_CLASSES), sources,
                   None, skipped)
