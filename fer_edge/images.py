"""Image files, safely: the header is read before a pixel is decoded.

A few hundred bytes of PNG can declare 100000 x 100000 pixels (a
decompression bomb), and decoding it would take tens of gigabytes.
``probe_header`` reads the declared width and height of every format fer-edge
reads, picked by the content's magic bytes, not the file's name; ``read_image``
refuses an image over ``MAX_IMAGE_PIXELS`` without decoding it, and says in
one "category: detail" reason why any file was not read.  Used by the
training readers and by the device runtime alike (numpy and OpenCV only).
"""
from __future__ import annotations

import contextlib
import os
import struct
import sys

import numpy as np

# Faces are cropped to at most a few hundred pixels; 50 megapixels is twice a
# 24-MP camera frame, and decoding one takes 150 MB in RGB (four decode
# threads: 600 MB).  Anything larger is a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 50_000_000
# A 50-MP uncompressed 24-bit BMP is 150 MB; no accepted image is larger.
MAX_IMAGE_BYTES = 256 << 20

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (every SOFn except DHT C4, JPG C8 and DAC CC): they carry the size.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field (SOI, TEM, RST0-7).
JPEG_NO_LENGTH = {0xD8, 0x01, *range(0xD0, 0xD8)}


def _png(data: bytes):
    # The IHDR chunk comes first: length, "IHDR", width, height (big-endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    complete = data.rfind(b"IEND") != -1  # a file cut short has lost its IEND chunk
    return w, h, complete


def _jpeg(data: bytes):
    """Walk the marker segments (APPn can hold an embedded thumbnail, so no
    blind search) to the frame header; complete when an EOI marker follows
    the first scan (entropy-coded data never contains FF D9)."""
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in JPEG_SOF and pos + 9 <= len(data):
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (w, h)
        if marker == 0xDA:  # start of scan
            if size is None:
                return None
            return size[0], size[1], data.find(b"\xff\xd9", pos + 2 + length) != -1
        if length < 2:
            return None
        pos += 2 + length
    # Cut before its scan: the declared size still counts (a bomb is refused as
    # too large before it is called truncated).
    return None if size is None else (size[0], size[1], False)


def _bmp(data: bytes):
    if len(data) < 26:
        return None
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # BITMAPCOREHEADER: 16-bit sizes
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h), True  # a negative height is a top-down bitmap


def _webp(data: bytes):
    if len(data) < 30 or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF, True
    if chunk == b"VP8L":  # lossless: 14-bit width - 1 and height - 1 after the signature byte
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, True
    if chunk == b"VP8X":  # extended: 24-bit canvas width - 1 and height - 1
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h, True
    return None


def _pnm(data: bytes):
    """P1-P6: magic, width, height as text tokens (``#`` comments allowed);
    P7 (PAM): WIDTH and HEIGHT lines."""
    head = data[:4096].decode("latin-1")
    if head[1] == "7":
        fields = dict(line.split(None, 1) for line in head.splitlines()[1:] if len(line.split(None, 1)) == 2)
        w, h = fields.get("WIDTH", ""), fields.get("HEIGHT", "")
    else:
        tokens = " ".join(line.split("#", 1)[0] for line in head.splitlines()).split()
        if len(tokens) < 3:
            return None
        w, h = tokens[1], tokens[2]
    if not (w.strip().isdigit() and h.strip().isdigit()):
        return None
    return int(w), int(h), True


def _tiff(data: bytes):
    """Width (tag 256) and height (257) from the first image file directory,
    classic TIFF or BigTIFF."""
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", data[2:4])
    big = version == 43
    try:
        if big:
            (ifd,) = struct.unpack(order + "Q", data[8:16])
            (count,) = struct.unpack(order + "Q", data[ifd:ifd + 8])
            first, step = ifd + 8, 20
        else:
            (ifd,) = struct.unpack(order + "I", data[4:8])
            (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
            first, step = ifd + 2, 12
        dims = {}
        for k in range(min(count, 4096)):
            e = first + k * step
            tag, kind = struct.unpack(order + "HH", data[e:e + 4])
            if tag in (256, 257):
                value = e + (12 if big else 8)
                fmt = "H" if kind == 3 else ("Q" if kind == 16 else "I")
                (dims[tag],) = struct.unpack(order + fmt, data[value:value + struct.calcsize(fmt)])
    except struct.error:  # offsets pointing past the end of the file
        return None
    if 256 not in dims or 257 not in dims:
        return None
    return dims[256], dims[257], True


# Signature -> header reader, for every format read here.
FORMATS = (
    (PNG_SIGNATURE, "png", _png),
    (b"\xff\xd8", "jpeg", _jpeg),
    (b"BM", "bmp", _bmp),
    (b"RIFF", "webp", _webp),
    (b"II*\x00", "tiff", _tiff),
    (b"MM\x00*", "tiff", _tiff),
    (b"II+\x00", "tiff", _tiff),
    (b"MM\x00+", "tiff", _tiff),
    *((f"P{k}".encode(), "pnm", _pnm) for k in range(1, 8)),
)


def probe_header(data: bytes) -> tuple[str, int | None, int | None, bool] | None:
    """(format, width, height, complete) declared by an image's header, or
    None when the bytes are no format fer-edge reads.  A known signature with
    a broken or cut header gives (format, None, None, False).  complete: False
    when the file visibly ends early (PNG without IEND, JPEG without an
    end-of-image marker after its scan)."""
    for signature, name, read in FORMATS:
        if data.startswith(signature):
            try:
                got = read(data)
            except (struct.error, IndexError, ValueError):
                got = None
            return (name, None, None, False) if got is None else (name, *got)
    return None


IMAGE_FORMATS = "JPEG, PNG, BMP, TIFF, WebP or PNM"
# OpenCV's own limit, a second line of defence (read when cv2 loads).  A value
# the user set is kept when it is a sane pixel count; anything else (which makes
# OpenCV abort the process, or refuse every image) is replaced.
def _valid_pixel_limit(text) -> bool:
    return isinstance(text, str) and text.isascii() and text.isdigit() and 1 << 16 <= int(text) <= 1 << 40


if not _valid_pixel_limit(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")):
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(MAX_IMAGE_PIXELS)


@contextlib.contextmanager
def native_stderr_quiet():
    """What native decoders write straight to file descriptor 2 (libpng's
    "libpng warning: iCCP: known incorrect sRGB profile", "libpng error: Not
    enough image data") goes nowhere meanwhile, while Python's own stderr
    (progress bars, warnings) still reaches the terminal: every image that
    fails is reported once, in fer-edge's words.  Process-wide, for the main
    thread to wrap a whole decoding phase."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):   # no real stderr (embedded, captured): nothing to quiet
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    python_err, stream = sys.stderr, open(saved, "w", buffering=1, closefd=False,
                                          encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                          errors="backslashreplace")
    os.dup2(devnull, 2)
    sys.stderr = stream
    try:
        yield
    finally:
        stream.flush()
        sys.stderr = python_err
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def opencv_silenced():
    """OpenCV's own log lines off (a broken PNG prints "[ERROR] readHeader ..."):
    the caller reports the failure in one line of its own."""
    import cv2

    log = getattr(getattr(cv2, "utils", None), "logging", None)
    if log is None:
        yield
        return
    level = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        log.setLogLevel(level)


def read_checked_bytes(path) -> tuple[bytes | None, tuple | None, str | None]:
    """(bytes, (format, width, height), None) for a file that may be decoded, or
    (None, None, "category: detail") for one that must not be.  Never raises."""
    try:
        if not os.path.isfile(path):
            return None, None, "not a file"
        nbytes = os.path.getsize(path)
        if nbytes == 0:
            return None, None, "empty file: 0 bytes"
        if nbytes > MAX_IMAGE_BYTES:
            return None, None, f"too large: {nbytes} bytes (limit {MAX_IMAGE_BYTES >> 20} MiB)"
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        return None, None, f"unreadable: {getattr(exc, 'strerror', None) or exc}"
    head = probe_header(data)
    if head is None:
        return None, None, f"not an image: no {IMAGE_FORMATS} header"
    kind, w, h, complete = head
    if w is None:
        return None, None, f"corrupt or truncated: broken {kind} header"
    if w * h > MAX_IMAGE_PIXELS:
        return None, None, (f"too large: header declares {w} x {h} pixels (limit "
                            f"{MAX_IMAGE_PIXELS // 10**6} megapixels), not decoded")
    if w == 0 or h == 0 or not complete:
        return None, None, f"corrupt or truncated: {kind} {w} x {h}" + ("" if complete else ", ends early")
    return data, (kind, w, h), None


def read_image(path, flags: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """(decoded image, None) or (None, "category: detail"); flags: a cv2.IMREAD_*
    (default colour, BGR).  The header is checked first; never raises for a bad file."""
    import cv2

    data, head, problem = read_checked_bytes(path)
    if problem is not None:
        return None, problem
    try:
        with opencv_silenced():
            img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8),
                               cv2.IMREAD_COLOR if flags is None else flags)
    except (cv2.error, MemoryError) as exc:
        return None, f"corrupt or truncated: {head[0]} decoder failed ({type(exc).__name__})"
    if img is None or img.size == 0:
        return None, f"corrupt or truncated: the {head[0]} decoder could not read it"
    return img, None
