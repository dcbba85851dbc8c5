"""Frame -> faces -> expressions, for the device.  numpy + OpenCV + one backend.

Per frame: detect faces (BlazeFace full or short range by default, run by
LiteRT; OpenCV's Haar cascade or YuNet on request; detectors.py) -> square
crop with the detector's margin, optionally rotated so the eyes are level ->
gray -> model input size -> ONE batched inference for all faces ->
softmax(logits / T), T the bundle's fitted temperature -> per-track
exponential moving average (tracks matched by IoU, expired after a gap) so
labels do not flicker.

Every stage is timed; ``Pipeline.stats()`` reports frames/s and the mean
milliseconds of detect / preprocess / infer / postprocess.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from fer_edge.contract import preprocess_faces, resize_face, softmax
# The detectors live in detectors.py (one DETECTORS table); re-exported here
# for callers of the earlier layout.
from fer_edge.targets.detectors import (  # noqa: F401
    DEFAULT_DETECTOR, DETECTORS, BlazeFaceDetector, Detections, HaarDetector, YuNetDetector, make_detector)

STAGES = ("detect", "preprocess", "infer", "postprocess")


# ------------------------------------------------------------------ crops
def square_box(box, margin: float, frame_shape, shift: float = 0.0) -> tuple[int, int, int]:
    """(x0, y0, side) of the square around a box, enlarged by ``margin`` of its
    size on every side (detectors box the face tightly; FER crops include the
    forehead and chin) and moved down by ``shift`` of its size."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2 + shift * max(w, h)
    return int(round(cx - side / 2)), int(round(cy - side / 2)), max(1, int(round(side)))


def crop_square(gray: np.ndarray, box, margin: float, size, shift: float = 0.0) -> np.ndarray:
    """The square crop, resized to the model input; parts outside the frame replicate the border."""
    import cv2

    x0, y0, side = square_box(box, margin, gray.shape, shift)
    H, W = gray.shape
    pad = max(0, -x0, -y0, x0 + side - W, y0 + side - H)
    src = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else gray
    crop = src[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
    return resize_face(crop, size)


def eye_angle(eye_a, eye_b) -> float:
    """Degrees the face is rolled: the angle of the line from the eye on the image's
    left to the one on its right (positive = clockwise on screen, y points down).
    Sorting by x makes it independent of which eye the detector calls "right"."""
    (x1, y1), (x2, y2) = sorted([tuple(map(float, eye_a)), tuple(map(float, eye_b))])
    return float(np.degrees(np.arctan2(y2 - y1, x2 - x1)))


def alignment_matrix(centre, angle_deg: float, side: float, out_size: int) -> np.ndarray:
    """2x3 affine map from frame pixels to an ``out_size`` square crop: rotate by
    ``angle_deg`` about ``centre`` (undoing a roll of that angle: eyes level),
    scale the ``side`` square to ``out_size``, centre it."""
    a = np.radians(angle_deg)
    s = out_size / side
    c, si = np.cos(a) * s, np.sin(a) * s
    cx, cy = centre
    # Rows: x' = c*x + si*y + tx, y' = -si*x + c*y + ty, with centre -> out_size/2.
    return np.array([[c, si, out_size / 2 - c * cx - si * cy],
                     [-si, c, out_size / 2 + si * cx - c * cy]], dtype=np.float64)


def aligned_crop(gray: np.ndarray, box, eyes, margin: float, size, shift: float = 0.0) -> np.ndarray:
    """The crop of crop_square, rotated about the box centre so the eyes are level.

    The square is warped at its own resolution and then resized exactly as
    training faces are (resize_face: area when shrinking), so only the rotation
    differs from the unaligned crop."""
    import cv2

    angle = eye_angle(*eyes)
    x0, y0, side = square_box(box, margin, gray.shape, shift)
    m = alignment_matrix((x0 + side / 2, y0 + side / 2), angle, side, side)
    crop = cv2.warpAffine(gray, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
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
    last_time: float | None = None   # seconds, the clock of the frames (cameras: wall time)


def clip_box(box, width: int, height: int) -> list[int]:
    """x, y, w, h cut to the frame: a face at the edge is boxed where it is
    seen (tracks and crops keep the detector's whole box)."""
    x0, y0 = min(max(int(box[0]), 0), width), min(max(int(box[1]), 0), height)
    x1, y1 = min(max(int(box[0]) + int(box[2]), x0), width), min(max(int(box[1]) + int(box[3]), y0), height)
    return [x0, y0, x1 - x0, y1 - y0]


def missed_frames(last_seen: int, frame: int) -> int:
    """Frames between a face's last sighting and ``frame`` in which it was not seen."""
    return frame - last_seen - 1


class Tracker:
    """Greedy IoU matching of this frame's faces to live tracks; each track keeps
    an exponential moving average of the class probabilities (alpha = weight of
    the new frame), so one odd frame does not flip the label.  A track missing
    from more than ``max_age`` frames in a row expires (its face left, or a new
    face in the same place must not inherit its probabilities); with 0, a face
    keeps its track only from one frame to the next.  With ``max_seconds`` the
    gap is time instead, on the frames' clock (``now``): a camera delivers fewer
    frames than its nominal rate when processing is slower, so a gap in seconds
    counted in frames would stretch."""

    def __init__(self, alpha: float = 0.4, iou_threshold: float = 0.3, max_age: int = 15,
                 max_seconds: float | None = None):
        self.alpha, self.iou_threshold, self.max_age, self.max_seconds = alpha, iou_threshold, max_age, max_seconds
        self.tracks: list[Track] = []
        self.next_id = 1

    def alive(self, t: Track, frame: int, now: float | None) -> bool:
        if self.max_seconds is not None and now is not None and t.last_time is not None:
            return now - t.last_time <= self.max_seconds
        return missed_frames(t.last_frame, frame) <= self.max_age

    def update(self, boxes: np.ndarray, probs: np.ndarray, frame: int, now: float | None = None) -> list[Track]:
        # Expire first: a track older than the gap must not match this frame's faces.
        self.tracks = [t for t in self.tracks if self.alive(t, frame, now)]
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
                t = Track(self.next_id, box, p.copy(), frame, last_time=now)
                self.next_id += 1
                self.tracks.append(t)
            else:
                t.probs = self.alpha * p + (1 - self.alpha) * t.probs
                t.box, t.last_frame, t.last_time, t.hits = box, frame, now, t.hits + 1
            out.append(t)
        return out


MAX_TRACK_GAP_S = 3600   # longer gaps are typing mistakes (and at 1000 frames/s still a sane count)


def track_gap_seconds(spec) -> float | None:
    """--track-gap in seconds when it was given in seconds ("0.5s"), else None."""
    text = str(spec).strip().lower()
    return float(text[:-1]) if text.endswith("s") else None


def track_gap_frames(spec, fps: float | None) -> int:
    """--track-gap as frames: "15" is 15 frames, "0.5s" half a second at the
    source's frame rate (30 frames/s when it does not say)."""
    text = str(spec).strip().lower()
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if not (math.isfinite(seconds) and 0 <= seconds <= MAX_TRACK_GAP_S):
                raise ValueError
            return int(round(seconds * (fps or 30.0)))
        frames = int(text, 10)
        if not 0 <= frames <= MAX_TRACK_GAP_S * 1000:
            raise ValueError
        return frames
    except ValueError:
        raise ValueError(f"--track-gap {spec}: give frames (15) or seconds (0.5s), from 0 to an hour") from None


# ------------------------------------------------------------------ the pipeline
UNCERTAIN = "uncertain"


@dataclass
class Face:
    box: list[int]            # x, y, w, h in frame pixels
    label: str                # smoothed (track) label; "uncertain" below min_confidence
    confidence: float
    probs: dict[str, float]   # smoothed probabilities
    raw_label: str            # this frame's own prediction
    track_id: int
    score: float = 1.0        # the detector's score


@dataclass
class Pipeline:
    backend: object                     # a targets.backends.Backend (or anything with .run(x) -> logits)
    labels: list[str]
    preprocess: dict
    detector: object = field(default_factory=make_detector)
    margin: float | None = None         # None: the detector's own (its boxes differ in tightness)
    align: bool = False                 # rotate crops so the eyes are level (detectors with eye keypoints)
    temperature: float | None = None    # None: the bundle's preprocess["temperature"] (1 when absent)
    min_confidence: float = 0.0         # below it a face is labelled "uncertain"
    tracker: Tracker = field(default_factory=Tracker)
    times: dict = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    frames: int = 0
    faces_seen: int = 0

    def __post_init__(self):
        if self.margin is None:
            self.margin = getattr(self.detector, "crop_margin", 0.15)
        self.shift = getattr(self.detector, "crop_shift", 0.0)
        if self.temperature is None:
            self.temperature = float(self.preprocess.get("temperature", 1.0))
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"temperature {self.temperature}: must be a finite number > 0")
        if not -0.4 < self.margin < 2:
            raise ValueError(f"margin {self.margin}: give a fraction of the face size between -0.4 and 2")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence {self.min_confidence}: give a probability in [0, 1]")

    def check_model(self) -> None:
        """Run one blank face through the preprocessing and the model before any
        frame: an artifact that cannot take what preprocess.json makes, or gives
        other than one finite logit per label, fails here (BundleError), not
        midway through a video."""
        from fer_edge.targets.runtime import BundleError

        blank = np.zeros((1, *tuple(self.preprocess["input_size"])), np.uint8)
        logits = np.asarray(self.backend.run(preprocess_faces(blank, self.preprocess)))
        finite = bool(np.isfinite(logits).all())
        if logits.shape != (1, len(self.labels)) or not finite:
            raise BundleError(f"the model gives logits of shape {logits.shape}{'' if finite else ' (not finite)'} "
                              f"for one face, not (1, {len(self.labels)}) for its {len(self.labels)} labels")

    def reset(self) -> None:
        """Forget every track (a new, unrelated image: nothing carries over)."""
        t = self.tracker
        self.tracker = Tracker(t.alpha, t.iou_threshold, t.max_age, t.max_seconds)

    def crops(self, gray: np.ndarray, det) -> np.ndarray | None:
        """(N, H, W) uint8 model-size crops of the detections."""
        if len(det) == 0:
            return None
        size = tuple(self.preprocess["input_size"])
        if self.align and det.keypoints is not None:
            return np.stack([aligned_crop(gray, b, k[:2], self.margin, size, self.shift)
                             for b, k in zip(det.boxes, det.keypoints)])
        return np.stack([crop_square(gray, b, self.margin, size, self.shift) for b in det.boxes])

    def __call__(self, frame_bgr: np.ndarray, now: float | None = None) -> list[Face]:
        """The faces of one frame; ``now``: the frame's time in seconds (a time-based track gap uses it)."""
        import cv2

        t0 = time.perf_counter()
        gray = frame_bgr if frame_bgr.ndim == 2 else cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
        det = self.detector.detect(frame_bgr, gray)
        # Parallel detectors return faces in varying order: sort them (top-to-bottom
        # rows, left to right) so output and events are stable.
        if len(det) > 1:
            b = det.boxes
            det = det.select(np.lexsort((b[:, 0], np.floor(b[:, 1] / 64))))
        boxes = np.round(det.boxes).astype(np.int64)
        t1 = time.perf_counter()
        faces = self.crops(gray, det)
        x = preprocess_faces(faces, self.preprocess) if faces is not None else None
        t2 = time.perf_counter()
        logits = self.backend.run(x) if x is not None else np.zeros((0, len(self.labels)), np.float32)
        t3 = time.perf_counter()
        probs = softmax(logits / np.float32(self.temperature))
        tracks = self.tracker.update(boxes, probs, self.frames, now)
        out = []
        for box, p, t, s in zip(boxes, probs, tracks, det.scores):
            k = int(np.argmax(t.probs))
            conf = float(t.probs[k])
            out.append(Face(clip_box(box, frame_bgr.shape[1], frame_bgr.shape[0]), self.labels[k] if conf >= self.min_confidence else UNCERTAIN,
                            conf, {c: float(v) for c, v in zip(self.labels, t.probs)},
                            self.labels[int(np.argmax(p))], t.id, float(s)))
        t4 = time.perf_counter()
        self.last_times = dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))   # seconds, this frame
        for s, dt in self.last_times.items():
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
