"""Frame -> faces -> expressions, for the device.  numpy + OpenCV + one backend.

Per frame: detect faces (Haar cascade shipped with OpenCV, or YuNet from its
ONNX file) -> square crop with margin -> gray -> model input size -> ONE
batched inference for all faces -> probabilities -> per-track exponential
moving average (tracks matched by IoU) so labels do not flicker.

Every stage is timed; ``Pipeline.stats()`` reports frames/s and the mean
milliseconds of detect / preprocess / infer / postprocess.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_edge.targets.bundle import preprocess_faces, resize_face, softmax

STAGES = ("detect", "preprocess", "infer", "postprocess")


# ------------------------------------------------------------------ detection
class HaarDetector:
    """OpenCV's frontal-face Haar cascade (ships with opencv-python; no download).

    Runs on a copy of the frame scaled so its longer side is ``max_side``
    pixels (a 640x480 frame: about 4x faster, faces of 40+ px still found) and
    maps the boxes back to frame pixels."""

    name = "haar"

    def __init__(self, min_size: int = 24, scale_factor: float = 1.1, min_neighbors: int = 4,
                 max_side: int = 360):
        import cv2

        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade {path}")
        self.min_size, self.scale_factor, self.min_neighbors = min_size, scale_factor, min_neighbors
        self.max_side = max_side

    def __call__(self, bgr: np.ndarray, gray: np.ndarray) -> np.ndarray:
        """(N, 4) int boxes x, y, w, h in frame pixels."""
        import cv2

        scale = min(1.0, self.max_side / max(gray.shape))
        small = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        faces = self.cascade.detectMultiScale(small, self.scale_factor, self.min_neighbors,
                                              minSize=(self.min_size, self.min_size))
        return np.round(np.asarray(faces, dtype=np.float64).reshape(-1, 4) / scale).astype(np.int64)


class YuNetDetector:
    """YuNet (``cv2.FaceDetectorYN``) from the user's ``face_detection_yunet_*.onnx``."""

    name = "yunet"

    def __init__(self, onnx_path, score_threshold: float = 0.7):
        import cv2

        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f"YuNet model {onnx_path} not found")
        self.det = cv2.FaceDetectorYN.create(str(onnx_path), "", (320, 320), score_threshold)
        self.size = None

    def __call__(self, bgr, gray):
        h, w = bgr.shape[:2]
        if self.size != (w, h):
            self.det.setInputSize((w, h))
            self.size = (w, h)
        _, faces = self.det.detect(bgr)
        if faces is None:
            return np.zeros((0, 4), dtype=np.int64)
        return np.round(faces[:, :4]).astype(np.int64)


def make_detector(spec: str | None):
    """'haar' (default) or the path of a YuNet .onnx file."""
    if spec in (None, "", "haar"):
        return HaarDetector()
    return YuNetDetector(spec)


# ------------------------------------------------------------------ crops
def square_box(box, margin: float, frame_shape) -> tuple[int, int, int]:
    """(x0, y0, side) of the square around a box, enlarged by ``margin`` of its
    size on every side (detectors box the face tightly; FER crops include the
    forehead and chin)."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), max(1, int(round(side)))


def crop_square(gray: np.ndarray, box, margin: float, size) -> np.ndarray:
    """The square crop, resized to the model input; parts outside the frame replicate the border."""
    import cv2

    x0, y0, side = square_box(box, margin, gray.shape)
    H, W = gray.shape
    pad = max(0, -x0, -y0, x0 + side - W, y0 + side - H)
    src = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else gray
    crop = src[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
    return resize_face(crop, size)


# ------------------------------------------------------------------ tracking
def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    id: int
    box: np.ndarray
    probs: np.ndarray
    last_frame: int
    hits: int = 1


class Tracker:
    """Greedy IoU matching of this frame's faces to live tracks; each track keeps
    an exponential moving average of the class probabilities (alpha = weight of
    the new frame), so one odd frame does not flip the label."""

    def __init__(self, alpha: float = 0.4, iou_threshold: float = 0.3, max_age: int = 15):
        self.alpha, self.iou_threshold, self.max_age = alpha, iou_threshold, max_age
        self.tracks: list[Track] = []
        self.next_id = 1

    def update(self, boxes: np.ndarray, probs: np.ndarray, frame: int) -> list[Track]:
        pairs = sorted(((iou(t.box, b), ti, bi) for ti, t in enumerate(self.tracks) for bi, b in enumerate(boxes)),
                       reverse=True)
        used_t, used_b, assigned = set(), set(), {}
        for score, ti, bi in pairs:
            if score < self.iou_threshold:
                break
            if ti in used_t or bi in used_b:
                continue
            used_t.add(ti)
            used_b.add(bi)
            assigned[bi] = self.tracks[ti]
        out = []
        for bi, (box, p) in enumerate(zip(boxes, probs)):
            t = assigned.get(bi)
            if t is None:
                t = Track(self.next_id, box, p.copy(), frame)
                self.next_id += 1
                self.tracks.append(t)
            else:
                t.probs = self.alpha * p + (1 - self.alpha) * t.probs
                t.box, t.last_frame, t.hits = box, frame, t.hits + 1
            out.append(t)
        self.tracks = [t for t in self.tracks if frame - t.last_frame <= self.max_age]
        return out


# ------------------------------------------------------------------ the pipeline
@dataclass
class Face:
    box: list[int]            # x, y, w, h in frame pixels
    label: str                # smoothed (track) label
    confidence: float
    probs: dict[str, float]   # smoothed probabilities
    raw_label: str            # this frame's own prediction
    track_id: int


@dataclass
class Pipeline:
    backend: object                     # a targets.backends.Backend (or anything with .run(x) -> logits)
    labels: list[str]
    preprocess: dict
    detector: object = field(default_factory=HaarDetector)
    margin: float = 0.15
    tracker: Tracker = field(default_factory=Tracker)
    times: dict = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    frames: int = 0
    faces_seen: int = 0

    def __call__(self, frame_bgr: np.ndarray) -> list[Face]:
        import cv2

        t0 = time.perf_counter()
        gray = frame_bgr if frame_bgr.ndim == 2 else cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
        boxes = self.detector(frame_bgr, gray)
        # OpenCV's parallel detectors return faces in varying order: sort them
        # (top-to-bottom rows, left to right) so output and events are stable.
        if len(boxes) > 1:
            boxes = boxes[np.lexsort((boxes[:, 0], boxes[:, 1] // 64))]
        t1 = time.perf_counter()
        size = tuple(self.preprocess["input_size"])
        faces = np.stack([crop_square(gray, b, self.margin, size) for b in boxes]) if len(boxes) else None
        x = preprocess_faces(faces, self.preprocess) if faces is not None else None
        t2 = time.perf_counter()
        logits = self.backend.run(x) if x is not None else np.zeros((0, len(self.labels)), np.float32)
        t3 = time.perf_counter()
        probs = softmax(logits)
        tracks = self.tracker.update(boxes, probs, self.frames)
        out = []
        for box, p, t in zip(boxes, probs, tracks):
            k = int(np.argmax(t.probs))
            out.append(Face([int(v) for v in box], self.labels[k], float(t.probs[k]),
                            {c: float(v) for c, v in zip(self.labels, t.probs)}, self.labels[int(np.argmax(p))],
                            t.id))
        t4 = time.perf_counter()
        for s, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.times[s] += dt
        self.frames += 1
        self.faces_seen += len(out)
        return out

    def stats(self) -> dict:
        n = max(1, self.frames)
        total = sum(self.times.values())
        return {"frames": self.frames, "faces": self.faces_seen,
                "fps": self.frames / total if total > 0 else 0.0,
                "ms_per_frame": {s: 1e3 * self.times[s] / n for s in STAGES}, "ms_total": 1e3 * total / n}


def annotate(frame_bgr: np.ndarray, faces: list[Face]) -> np.ndarray:
    """Boxes, labels and confidence drawn on a copy of the frame."""
    import cv2

    img = frame_bgr.copy() if frame_bgr.ndim == 3 else cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    for f in faces:
        x, y, w, h = f.box
        cv2.rectangle(img, (x, y), (x + w, y + h), (0, 200, 0), 2)
        text = f"#{f.track_id} {f.label} {100 * f.confidence:.0f}%"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        cv2.rectangle(img, (x, max(0, y - th - 6)), (x + tw + 4, y), (0, 200, 0), -1)
        cv2.putText(img, text, (x + 2, y - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return img
