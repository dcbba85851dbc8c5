"""Where frames come from (image, folder of images, video file, camera index)
and where annotated frames go (only when the user asks: --save).  OpenCV only.

Everything a user can hand in is checked before a pixel is decoded
(images.py: headers first, no decompression bombs); unusable files are
refused (a single image) or skipped and counted (a folder); outputs are
checked by ``check_sink`` before any work.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from fer_edge import UserError
from fer_edge.fileio import (check_writable_folder, check_writable_parent, os_error_line, refuse_existing,
                             write_bytes_atomic)
from fer_edge.targets.images import MAX_PIXELS, image_problem, opencv_silenced, read_image

MAX_CAMERA_INDEX = 1023
# FFmpeg and OpenCV's video backends print their own warnings on stderr ("moov
# atom not found", "can't open camera by index"); we report such failures in
# one line of our own, so keep theirs quiet unless the user asks for them.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
VIDEO_OUT_SUFFIXES = {".mp4": "mp4v", ".avi": "MJPG"}   # --save for a video or camera: suffix -> fourcc


class SourceError(UserError, ValueError):
    """A source or output that cannot be used (one line for the user)."""


# ------------------------------------------------------------------ sources
def frame_rate(cap) -> float:
    """The capture's frames per second; 30 when it does not say (or says nonsense)."""
    import cv2

    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    return fps if 0.0 < fps <= 1000.0 else 30.0


def source_kind(spec: str) -> str:
    """camera, folder, image or video, from the argument alone (nothing opened)."""
    if re.fullmatch(r"[0-9]+", spec):
        return "camera"
    path = Path(spec)
    if path.is_dir():
        return "folder"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"


class Source:
    """Iterate ``(frame_index, time_seconds, bgr_frame, name)``.  Images a folder
    cannot use are skipped: ``skipped`` lists why, one line each."""

    def __init__(self, spec: str, max_frames: int | None = None):
        self.spec, self.max_frames, self.skipped, self._decoded = str(spec), max_frames, [], {}
        self.fps, self.total = None, None
        if not self.spec.strip():
            raise SourceError("give an image, a folder of images, a video or a camera index")
        self.kind = source_kind(self.spec)
        if self.kind == "camera":
            self._open_camera()
        elif self.kind == "folder":
            self._open_folder(Path(self.spec))
        else:
            path = Path(self.spec)
            if not path.exists():
                raise SourceError(f"{path}: no such file, folder or camera index")
            if not path.is_file():
                raise SourceError(f"{path}: not a regular file (give an image, folder, video or camera index)")
            self._open_image(path) if self.kind == "image" else self._open_video(path)
        if self.max_frames is not None and self.total is not None:
            self.total = min(self.total, self.max_frames)

    def _open_camera(self) -> None:
        import cv2

        index = int(self.spec)
        if index > MAX_CAMERA_INDEX:
            raise SourceError(f"camera {self.spec}: give an index from 0 to {MAX_CAMERA_INDEX}")
        with opencv_silenced():
            self.cap = cv2.VideoCapture(index)
        if not self.cap.isOpened():
            raise SourceError(f"camera {self.spec} does not open (no such device, or it is busy)")
        self.fps = frame_rate(self.cap)

    def _open_folder(self, path: Path) -> None:
        try:
            candidates = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise SourceError(os_error_line(exc, path, action="cannot list")) from None
        self.files = []
        for p in candidates:
            problem = image_problem(p)
            if problem is None:
                self.files.append(p)
            else:
                self.skipped.append(problem)
        if not self.files:
            found = f"; {len(self.skipped)} unusable, e.g. {self.skipped[0]}" if self.skipped else ""
            raise SourceError(f"{path}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))}){found}")
        self.total = len(self.files)

    def _open_image(self, path: Path) -> None:
        img, problem = read_image(path)
        if img is None:
            raise SourceError(problem)
        self.files, self._decoded, self.total = [path], {path: img}, 1   # decoded once, reused by __iter__

    def _open_video(self, path: Path) -> None:
        import cv2

        from fer_edge.targets.runtime import native_output_silenced

        # OpenCV's AVI reader writes its complaints about a broken file to std::cerr:
        # the one line the user gets is ours.
        with opencv_silenced(), native_output_silenced():
            self.cap = cv2.VideoCapture(str(path))
        ok = self.cap.isOpened()
        w, h = (int(self.cap.get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
        if ok and w * h > MAX_PIXELS:
            raise SourceError(f"{path}: {w}x{h} video frames, over the {MAX_PIXELS // 10**6} megapixels read here")
        first = self.cap.read() if ok else (False, None)
        if not first[0]:
            raise SourceError(f"{path}: cannot read this video (corrupt, or a format OpenCV cannot decode)")
        self._first = first[1]
        self.fps = frame_rate(self.cap)
        count = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)   # 0, negative or garbage for streams and odd containers
        self.total = int(count) if 0 < count < 1e9 else None

    def __iter__(self):
        if self.kind in ("image", "folder"):
            yield from self._images()
        elif self.kind == "video":
            yield from self._frames(self._first, lambda n: n / self.fps, Path(self.spec).name)
        else:
            t0 = time.time()
            ok, frame = self.cap.read()
            yield from self._frames(frame if ok else None, lambda n: time.time() - t0, f"camera{self.spec}")

    def _images(self):
        n = 0
        for p in self.files:
            if self.max_frames is not None and n >= self.max_frames:
                return
            img, problem = (self._decoded.pop(p), None) if p in self._decoded else read_image(p)
            if img is None:
                self.skipped.append(problem)
                continue
            yield n, time.time(), img, p.name
            n += 1

    def _frames(self, frame, clock, name):
        n = 0
        while frame is not None and (self.max_frames is None or n < self.max_frames):
            yield n, clock(n), frame, name
            n += 1
            ok, frame = self.cap.read()
            frame = frame if ok else None
        self.cap.release()


# ------------------------------------------------------------------ outputs
def check_sink(out, kind: str, force: bool = False) -> Path:
    """Refuse, before any work, a --save that cannot be written: its folder is
    a file or not writable, it exists (without force) or is not a regular file,
    or its suffix has no encoder (an image) or is not .mp4/.avi (a video)."""
    import cv2

    out = Path(out)
    if kind == "folder":
        if out.exists() and not out.is_dir():
            raise SourceError(f"--save {out}: is a file; a folder of images is saved into a folder")
        if out.is_dir():
            check_writable_folder(out, "--save")
            if any(out.iterdir()) and not force:
                raise SourceError(f"{out} exists and is not empty; pass --force to write into it")
        else:
            check_writable_parent(out, "--save")
        return out
    check_writable_parent(out, "--save")
    if out.exists() and not out.is_file():
        raise SourceError(f"--save {out}: exists and is not a regular file")
    refuse_existing(out, force, "--save")
    if kind in ("video", "camera"):
        if out.suffix.lower() not in VIDEO_OUT_SUFFIXES:
            raise SourceError(f"--save {out}: use a .mp4 or .avi file for video")
    elif not cv2.haveImageWriter(str(out)):
        raise SourceError(f"--save {out}: no image encoder for {out.suffix or 'a name without a suffix'} "
                          f"(use {', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


class Sink:
    """Writes annotated frames for --save: an image file for one image, a folder
    for a folder of images, a video file for a video or camera.  Files appear
    under their final name only when complete (temp file + rename)."""

    def __init__(self, out, source: Source, force: bool = False):
        self.out, self.kind, self.writer, self.fps = Path(out), source.kind, None, source.fps or 30.0
        check_sink(self.out, self.kind, force)
        self.tmp, self.frames, self.made_folder = None, 0, False
        self.written: list[Path] = []   # images of a folder run, removed if it does not finish

    def write(self, frame: np.ndarray, name: str) -> None:
        if self.kind == "image":
            self._write_image(self.out, frame)
        elif self.kind == "folder":
            try:
                if not self.out.is_dir():
                    self.out.mkdir(parents=True)
                    self.made_folder = True
            except OSError as exc:
                raise SourceError(os_error_line(exc, self.out)) from None
            self._write_image(self.out / name, frame)
            self.written.append(self.out / name)
        else:
            if self.writer is None:
                self._open_video(frame.shape[:2])
            self.writer.write(frame)
            self.frames += 1

    def _open_video(self, hw) -> None:
        import cv2

        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.out.stem}.", suffix=self.out.suffix,
                                            dir=self.out.parent)
            os.close(fd)
        except OSError as exc:
            raise SourceError(os_error_line(exc, self.out)) from None
        fourcc = cv2.VideoWriter_fourcc(*VIDEO_OUT_SUFFIXES[self.out.suffix.lower()])
        self.writer = cv2.VideoWriter(self.tmp, fourcc, self.fps, (hw[1], hw[0]))
        if not self.writer.isOpened():
            raise SourceError(f"--save {self.out}: OpenCV cannot write this video here")

    @staticmethod
    def _write_image(path: Path, frame) -> None:
        import cv2

        ok, buf = cv2.imencode(path.suffix if path.suffix else ".jpg", frame)
        if not ok:
            raise SourceError(f"cannot encode {path}")
        write_bytes_atomic(path, buf.tobytes(), force=True)   # existing files: refused by check_sink

    def close(self, ok: bool = True) -> None:
        """Rename the finished video into place (ok), or remove what a failed or
        interrupted run left: the temp video, the folder this Sink made while still empty."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        if not ok:   # a folder run that did not finish leaves none of its images (a rerun is not refused)
            for path in self.written:
                path.unlink(missing_ok=True)
            self.written = []
        if self.made_folder and not ok and not any(self.out.iterdir()):
            self.out.rmdir()
        if self.tmp is None:
            return
        try:
            if ok:
                self._check_video()
                os.replace(self.tmp, self.out)
        except OSError as exc:
            raise SourceError(os_error_line(exc, self.out)) from None
        finally:
            Path(self.tmp).unlink(missing_ok=True)
            self.tmp = None

    def _check_video(self) -> None:
        """OpenCV's writer reports no write error (a full disk gives a truncated
        file): read the finished file's header back before it takes its name."""
        import cv2

        from fer_edge.targets.runtime import native_output_silenced

        with opencv_silenced(), native_output_silenced():   # its AVI reader complains on std::cerr
            cap = cv2.VideoCapture(self.tmp)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if count < self.frames:
            raise SourceError(f"cannot write {self.out}: the video came out incomplete ({count} of {self.frames} "
                              "frames; disk full or a file size limit?)")


def display_available() -> bool:
    """A display to --show on, and an OpenCV built with a GUI (opencv-python-headless has none)."""
    import cv2

    has_screen = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or os.name == "nt"
    return has_screen and bool(getattr(cv2, "currentUIFramework", lambda: "")())
