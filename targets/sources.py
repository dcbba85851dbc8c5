"""Where frames come from (image, folder of images, video file, camera index)
and where annotated frames go (only when the user asks: --save).  OpenCV only."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

# FFmpeg and OpenCV's video backends print their own warnings on stderr ("moov
# atom not found", "can't open camera by index"); we report such failures in
# one line of our own, so keep theirs quiet unless the user asks for them.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv"}


class SourceError(ValueError):
    """A source that cannot be read (one line for the user)."""


class Source:
    """Iterate ``(frame_index, time_seconds, bgr_frame, name)``."""

    def __init__(self, spec: str, max_frames: int | None = None):
        import cv2

        self.spec, self.max_frames, self.skipped, self._decoded = str(spec), max_frames, [], {}
        self.fps = None
        if self.spec.isdigit():
            self.kind = "camera"
            self.cap = cv2.VideoCapture(int(self.spec))
            if not self.cap.isOpened():
                raise SourceError(f"camera {self.spec} does not open (no such device, or it is busy)")
            self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 30.0
            return
        path = Path(self.spec)
        if not path.exists():
            raise SourceError(f"{path}: no such file, folder or camera index")
        if path.is_dir():
            self.kind = "folder"
            self.files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise SourceError(f"{path}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            self.kind = "image"
            self.files = [path]
            self._decoded = {path: _read_image(path)}  # checked now, reused by __iter__ (read once)
            if self._decoded[path] is None:
                raise SourceError(f"{path}: cannot read this image (corrupt, truncated or not an image)")
        else:
            self.kind = "video"
            self.cap = cv2.VideoCapture(str(path))
            ok = self.cap.isOpened()
            first = self.cap.read() if ok else (False, None)
            if not first[0]:
                raise SourceError(f"{path}: cannot read this video (corrupt, or a format OpenCV cannot decode)")
            self._first = first[1]
            self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 30.0

    def __iter__(self):
        n = 0
        if self.kind in ("image", "folder"):
            for p in self.files:
                if self.max_frames is not None and n >= self.max_frames:
                    return
                img = self._decoded.pop(p) if p in self._decoded else _read_image(p)
                if img is None:
                    self.skipped.append(str(p))
                    continue
                yield n, time.time(), img, p.name
                n += 1
            return
        t0 = time.time()
        if self.kind == "video":
            frame = self._first
            while frame is not None and (self.max_frames is None or n < self.max_frames):
                yield n, n / self.fps, frame, Path(self.spec).name
                n += 1
                ok, frame = self.cap.read()
                frame = frame if ok else None
            self.cap.release()
            return
        while self.max_frames is None or n < self.max_frames:  # camera
            ok, frame = self.cap.read()
            if not ok:
                break
            yield n, time.time() - t0, frame, f"camera{self.spec}"
            n += 1
        self.cap.release()


def _read_image(path) -> np.ndarray | None:
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


class Sink:
    """Writes annotated frames for --save: an image file for one image, a folder
    for a folder of images, a video file for a video or camera.  Files appear
    under their final name only when complete (temp file + rename)."""

    def __init__(self, out, source: Source, force: bool = False):
        self.out, self.kind, self.writer, self.fps = Path(out), source.kind, None, source.fps or 30.0
        if self.out.exists() and not force and not (self.kind == "folder" and self.out.is_dir()
                                                   and not any(self.out.iterdir())):
            raise SourceError(f"{self.out} exists; pass --force to overwrite it")
        if self.kind == "folder":
            self.out.mkdir(parents=True, exist_ok=True)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.kind in ("video", "camera") and self.out.suffix.lower() not in (".mp4", ".avi"):
                raise SourceError(f"--save {self.out}: use a .mp4 or .avi file for video")
        self.tmp = None

    def write(self, frame: np.ndarray, name: str) -> None:
        import cv2

        if self.kind == "image":
            self._atomic_image(self.out, frame)
        elif self.kind == "folder":
            self._atomic_image(self.out / name, frame)
        else:
            if self.writer is None:
                fd, self.tmp = tempfile.mkstemp(prefix=f".{self.out.stem}.", suffix=self.out.suffix,
                                                dir=self.out.parent)
                os.close(fd)
                fourcc = cv2.VideoWriter_fourcc(*("mp4v" if self.out.suffix.lower() == ".mp4" else "MJPG"))
                h, w = frame.shape[:2]
                self.writer = cv2.VideoWriter(self.tmp, fourcc, self.fps, (w, h))
            self.writer.write(frame)

    @staticmethod
    def _atomic_image(path: Path, frame) -> None:
        import cv2

        ok, buf = cv2.imencode(path.suffix if path.suffix else ".jpg", frame)
        if not ok:
            raise SourceError(f"cannot encode {path}")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.release()
            if ok:
                os.replace(self.tmp, self.out)
            else:
                Path(self.tmp).unlink(missing_ok=True)


def display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.name == "nt"
