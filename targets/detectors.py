"""Face detectors for the device pipeline: BlazeFace (MediaPipe's models, shipped
in ``models/``, run by LiteRT), OpenCV's Haar cascade, YuNet.  No torch.

Every detector's ``detect(bgr, gray)`` returns a :class:`Detections` (boxes in
frame pixels, scores, and eye/nose/mouth keypoints where the model has them);
``detector(bgr, gray)`` returns just the (N, 4) int boxes, as before.

BlazeFace is decoded here, in small pure functions, the way MediaPipe's
face-detection graph does it:

* ``ssd_anchors``: one anchor centre per feature-map cell and anchor; the
  anchors are unit-size ("fixed anchor size"), so regressors are offsets in
  input pixels from the anchor centre;
* ``decode``: box centre/size and 6 keypoints (right eye, left eye, nose tip,
  mouth, right ear tragion, left ear tragion; "right" = the person's right,
  the left of the image) in [0, 1] letterboxed-input coordinates;
* scores ``sigmoid(clip(logit, -100, 100))``;
* ``weighted_nms``: MediaPipe's "blending" suppression: boxes overlapping the
  best remaining one by IoU > 0.3 are averaged, weighted by score.

The input is the frame letterboxed (padded to a square, centred) to 128x128
(short range) or 192x192 (full range), RGB scaled to [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent / "models"
KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")


@dataclass(frozen=True)
class DetectorSpec:
    kind: str                          # blazeface | haar | yunet
    # Framing of the classifier's crop: the square around the box is enlarged
    # by crop_margin of the box size on every side and moved down by crop_shift
    # of it, so that it frames a face as FER2013's 48x48 crops do (each
    # detector boxes a face differently; measured on real FER2013 faces pasted
    # at known squares, benchmarks/bench_detect.py --framing).
    crop_margin: float
    crop_shift: float
    min_size: int = 32                 # smallest face kept, frame pixels (the classifier reads 48x48)
    score_threshold: float | None = None
    model: str | None = None           # BlazeFace: file in MODELS
    input_size: int = 0                # BlazeFace: square input, pixels
    strides: tuple[int, ...] = ()      # BlazeFace: one per SSD layer; equal consecutive strides share a map
    anchors_per_layer: int = 0         # BlazeFace: 2 = aspect 1 + MediaPipe's interpolated scale; 1 = aspect 1


# One table: every detector the pipeline knows, by its --detector name.
DETECTORS = {
    # Faces up to ~5 m: a robot's or a room's camera (the default).
    "blazeface-full": DetectorSpec("blazeface", 0.08, -0.05, 32, 0.6, "face_detection_full_range_sparse.tflite",
                                   192, (4,), 1),
    # Faces within ~2 m of the camera (selfie/phone distance).
    "blazeface-short": DetectorSpec("blazeface", 0.12, -0.07, 32, 0.5, "face_detection_short_range.tflite",
                                    128, (8, 16, 16, 16), 2),
    # OpenCV's frontal-face cascade (ships with opencv-python): frontal, upright faces only.
    # min_size: its tuned 24 px on the 360-px copy it searches, in a 640x480 frame.
    "haar": DetectorSpec("haar", 0.02, 0.0, 43),
    # YuNet from the user's face_detection_yunet_*.onnx (--yunet-model), through cv2.FaceDetectorYN.
    # Framing not measured (no YuNet model here): the earlier fixed 15% margin.
    "yunet": DetectorSpec("yunet", 0.15, 0.0, 32, 0.7),
}
DEFAULT_DETECTOR = "blazeface-full"


@dataclass
class Detections:
    boxes: np.ndarray                  # (N, 4) float x, y, w, h in frame pixels
    scores: np.ndarray                 # (N,)
    keypoints: np.ndarray | None = None  # (N, K, 2) frame pixels; K >= 2, [0] and [1] the eyes

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, keep) -> "Detections":
        return Detections(self.boxes[keep], self.scores[keep],
                          None if self.keypoints is None else self.keypoints[keep])

    @staticmethod
    def empty(k: int | None = None) -> "Detections":
        return Detections(np.zeros((0, 4)), np.zeros(0), None if k is None else np.zeros((0, k, 2)))


# ------------------------------------------------------------------ pure math
def ssd_anchors(input_size: int, strides, anchors_per_layer: int) -> np.ndarray:
    """(A, 2) anchor centres in [0, 1], in the model's output order: feature maps
    by stride, cells row-major, then the anchors of the cell (consecutive layers
    with the same stride share one map, their anchors side by side)."""
    out, i = [], 0
    while i < len(strides):
        stride, per_cell = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            per_cell += anchors_per_layer
            i += 1
        n = int(np.ceil(input_size / stride))
        c = (np.arange(n) + 0.5) / n
        yy, xx = np.meshgrid(c, c, indexing="ij")
        cells = np.stack([xx.ravel(), yy.ravel()], axis=1)
        out.append(np.repeat(cells, per_cell, axis=0))
    return np.concatenate(out).astype(np.float32)


def sigmoid_scores(logits: np.ndarray, clip: float = 100.0) -> np.ndarray:
    """MediaPipe's score: sigmoid of the logit clipped to +-100 (no overflow)."""
    z = np.clip(np.asarray(logits, dtype=np.float64), -clip, clip)   # float64: exp(100) overflows float32
    return 1.0 / (1.0 + np.exp(-z))


def decode(raw: np.ndarray, anchors: np.ndarray, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Regressors (N, 4 + 2K) -> boxes (N, 4) x0, y0, x1, y1 and keypoints (N, K, 2),
    all in [0, 1] of the (letterboxed) input.  Offsets are input pixels from
    the anchor centre; w and h are input pixels (unit anchors)."""
    r = raw.astype(np.float32) / np.float32(input_size)
    centre = r[:, 0:2] + anchors
    half = r[:, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    kps = r[:, 4:].reshape(len(r), -1, 2) + anchors[:, None, :]
    return boxes, kps


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a (N, 4) against every box of b (M, 4), both x0, y0, x1, y1."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, iou_threshold: float = 0.3):
    """MediaPipe's WEIGHTED suppression: take the best remaining detection, average
    it with every remaining one overlapping it by IoU > threshold (weights = scores),
    keep the best score; repeat.  A single model's many near-duplicate anchors
    become one steadier box.  Returns (boxes, scores, keypoints), best first."""
    order = np.argsort(-scores, kind="stable")
    boxes, scores, keypoints = boxes[order], scores[order], keypoints[order]
    out_b, out_s, out_k = [], [], []
    remaining = np.arange(len(scores))
    while remaining.size:
        top = remaining[0]
        overlap = iou_matrix(boxes[top:top + 1], boxes[remaining])[0]
        group = remaining[overlap > iou_threshold]
        group = group if group.size else remaining[:1]   # a degenerate (zero-area) box stays alone
        w = scores[group][:, None]
        out_b.append((boxes[group] * w).sum(0) / w.sum())
        out_k.append((keypoints[group] * w[:, :, None]).sum(0) / w.sum())
        out_s.append(scores[top])
        remaining = remaining[~np.isin(remaining, group)]
    if not out_s:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0,) + keypoints.shape[1:])
    return np.array(out_b), np.array(out_s), np.array(out_k)


def letterbox_geometry(frame_hw, input_size: int) -> tuple[float, int, int, int, int]:
    """(scale, new_w, new_h, pad_x, pad_y): the frame scaled to fit the square
    input, centred; the rest is padding (MediaPipe keeps the aspect ratio)."""
    h, w = frame_hw
    scale = input_size / max(h, w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    return scale, nw, nh, (input_size - nw) // 2, (input_size - nh) // 2


def shrink(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """img resized to (w, h): halved by exact 2x area averaging while it stays at
    least twice the target, then linear for the last (< 2x) step.  Same
    detections as one INTER_AREA resize (measured on the composite frames) at
    a tenth of its cost: area resizing by a non-integer factor (640 -> 192:
    3.33x) is OpenCV's slow path, by exactly 2x its fast one."""
    import cv2

    while img.shape[1] >= 2 * w and img.shape[0] >= 2 * h:
        H, W = img.shape[:2]
        img = cv2.resize(img[:H - H % 2, :W - W % 2], (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------ BlazeFace
def _litert_interpreter(path: Path, threads: int):
    from fer_edge.targets.backends import BackendUnavailable, _tflite_interpreter_class, native_output_silenced

    try:
        Interpreter = _tflite_interpreter_class()
    except BackendUnavailable:
        raise RuntimeError("BlazeFace needs the LiteRT runtime: pip install ai-edge-litert "
                           "(or use --detector haar)") from None
    with native_output_silenced():
        interp = Interpreter(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
    return interp


class BlazeFaceDetector:
    """MediaPipe's BlazeFace (short or full range) in the LiteRT interpreter."""

    def __init__(self, name: str = DEFAULT_DETECTOR, score_threshold: float | None = None,
                 min_size: int | None = None, iou_threshold: float = 0.3, threads: int = 1):
        self.name, self.spec = name, DETECTORS[name]
        self.crop_margin, self.crop_shift = self.spec.crop_margin, self.spec.crop_shift
        path = MODELS / self.spec.model
        if not path.is_file():
            raise RuntimeError(f"{path}: the {name} model is missing from this installation")
        self.score_threshold = self.spec.score_threshold if score_threshold is None else float(score_threshold)
        self.min_size = self.spec.min_size if min_size is None else int(min_size)
        self.iou_threshold = iou_threshold
        self.interp = _litert_interpreter(path, threads)
        inp = self.interp.get_input_details()[0]
        n = self.spec.input_size
        if tuple(inp["shape"]) != (1, n, n, 3):
            raise RuntimeError(f"{path}: input {tuple(inp['shape'])}, expected (1, {n}, {n}, 3)")
        self.input_index = inp["index"]
        # Identify the two outputs by shape, not by position (names differ between the models).
        outs = {int(o["shape"][-1]): o["index"] for o in self.interp.get_output_details()}
        self.reg_index, self.score_index = outs[16], outs[1]
        self.anchors = ssd_anchors(n, self.spec.strides, self.spec.anchors_per_layer)
        self.buf = np.full((1, n, n, 3), -1.0, np.float32)   # padding = black after scaling to [-1, 1]
        self._geometry = None

    def input_tensor(self, bgr: np.ndarray):
        """The letterboxed [-1, 1] RGB input, and (scale, pad_x, pad_y) to map back."""
        import cv2

        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        if self._geometry is None or self._geometry[0] != bgr.shape[:2]:
            self._geometry = (bgr.shape[:2], letterbox_geometry(bgr.shape[:2], self.spec.input_size))
            self.buf.fill(-1.0)
        scale, nw, nh, px, py = self._geometry[1]
        small = shrink(bgr, nw, nh)
        rgb = self.buf[0, py:py + nh, px:px + nw]
        np.multiply(small[:, :, ::-1], np.float32(1 / 127.5), out=rgb, casting="unsafe")
        rgb -= np.float32(1.0)
        return self.buf, (scale, px, py)

    def raw(self, bgr: np.ndarray):
        """(regressors (A, 16), score logits (A,), (scale, pad_x, pad_y)) for a frame."""
        x, geom = self.input_tensor(bgr)
        self.interp.set_tensor(self.input_index, x)
        self.interp.invoke()
        return (self.interp.get_tensor(self.reg_index)[0], self.interp.get_tensor(self.score_index)[0, :, 0], geom)

    def detect(self, bgr: np.ndarray, gray: np.ndarray | None = None) -> Detections:
        reg, logits, (scale, px, py) = self.raw(bgr)
        scores = sigmoid_scores(logits)
        keep = np.flatnonzero(scores >= self.score_threshold)   # decode only the candidates
        if keep.size == 0:
            return Detections.empty(len(KEYPOINTS))
        boxes, kps = decode(reg[keep], self.anchors[keep], self.spec.input_size)
        boxes, scores, kps = weighted_nms(boxes, scores[keep], kps, self.iou_threshold)
        n = self.spec.input_size
        off = np.array([px, py], np.float64)
        corners = (boxes.reshape(-1, 2, 2) * n - off) / scale
        kps = (kps * n - off) / scale
        xywh = np.concatenate([corners[:, 0], corners[:, 1] - corners[:, 0]], axis=1)
        d = Detections(xywh, scores, kps)
        return d.select(np.minimum(xywh[:, 2], xywh[:, 3]) >= self.min_size)

    def __call__(self, bgr, gray=None) -> np.ndarray:
        return np.round(self.detect(bgr, gray).boxes).astype(np.int64)


# ------------------------------------------------------------------ OpenCV detectors
class HaarDetector:
    """OpenCV's frontal-face Haar cascade (ships with opencv-python; no download).

    Runs on a copy of the frame scaled so its longer side is ``max_side``
    pixels (a 640x480 frame: about 4x faster, faces of 40+ px still found) and
    maps the boxes back to frame pixels.  No keypoints: crops are not aligned.
    min_size: frame pixels; None = 24 px in the scaled copy (43 px of a 640x480 frame)."""

    name = "haar"

    def __init__(self, min_size: int | None = None, scale_factor: float = 1.1, min_neighbors: int = 4,
                 max_side: int = 360):
        import cv2

        self.crop_margin, self.crop_shift = DETECTORS["haar"].crop_margin, DETECTORS["haar"].crop_shift

        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise RuntimeError(f"cannot load the Haar cascade {path}")
        self.min_size, self.scale_factor, self.min_neighbors = min_size, scale_factor, min_neighbors
        self.max_side = max_side

    def detect(self, bgr, gray=None) -> Detections:
        import cv2

        if gray is None:
            gray = bgr if bgr.ndim == 2 else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        scale = min(1.0, self.max_side / max(gray.shape))
        small = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        # min_size is in frame pixels; the cascade sees the scaled copy.
        m = 24 if self.min_size is None else max(1, int(round(self.min_size * scale)))
        faces = self.cascade.detectMultiScale(small, self.scale_factor, self.min_neighbors, minSize=(m, m))
        boxes = np.asarray(faces, dtype=np.float64).reshape(-1, 4) / scale
        return Detections(boxes, np.ones(len(boxes)))

    def __call__(self, bgr, gray=None) -> np.ndarray:
        return np.round(self.detect(bgr, gray).boxes).astype(np.int64)


class YuNetDetector:
    """YuNet (``cv2.FaceDetectorYN``) from the user's ``face_detection_yunet_*.onnx``;
    its five landmarks start with the two eyes, so crops can be aligned."""

    name = "yunet"

    def __init__(self, onnx_path, score_threshold: float | None = None, min_size: int = 32):
        import cv2

        if not onnx_path:
            raise FileNotFoundError("YuNet model not given: --detector yunet needs --yunet-model FILE.onnx")
        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f"YuNet model {onnx_path} not found")
        spec = DETECTORS["yunet"]
        self.crop_margin, self.crop_shift = spec.crop_margin, spec.crop_shift
        self.score_threshold = spec.score_threshold if score_threshold is None else float(score_threshold)
        from fer_edge.targets.runtime import native_output_silenced

        try:
            # OpenCV's DNN module prints its own "[ERROR] ..." lines for a model it cannot
            # run; the one line below says what is wrong.
            with native_output_silenced():
                self.det = cv2.FaceDetectorYN.create(str(onnx_path), "", (320, 320), self.score_threshold)
                # Any ONNX file loads; only running it shows whether it is YuNet (its outputs).
                _, faces = self.det.detect(np.zeros((320, 320, 3), np.uint8))
        except cv2.error:
            raise RuntimeError(f"{onnx_path}: not a YuNet model OpenCV can load and run") from None
        if faces is not None and (faces.ndim != 2 or faces.shape[1] != 15):
            raise RuntimeError(f"{onnx_path}: not a YuNet model (it gives {faces.shape[1:]} values per face, not 15)")
        self.size, self.min_size = (320, 320), min_size

    def detect(self, bgr, gray=None) -> Detections:
        import cv2

        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        h, w = bgr.shape[:2]
        if self.size != (w, h):
            self.det.setInputSize((w, h))
            self.size = (w, h)
        _, faces = self.det.detect(bgr)
        if faces is None:
            return Detections.empty(5)
        faces = faces.astype(np.float64)
        d = Detections(faces[:, :4], faces[:, 14], faces[:, 4:14].reshape(-1, 5, 2))
        return d.select(np.minimum(d.boxes[:, 2], d.boxes[:, 3]) >= self.min_size)

    def __call__(self, bgr, gray=None) -> np.ndarray:
        return np.round(self.detect(bgr, gray).boxes).astype(np.int64)


def make_detector(spec: str | None = None, *, score_threshold: float | None = None, min_size: int | None = None,
                  yunet_model=None, threads: int = 1):
    """A detector by its DETECTORS name (default blazeface-full); yunet runs ``yunet_model``."""
    spec = spec or DEFAULT_DETECTOR
    if spec not in DETECTORS:
        raise ValueError(f"unknown detector {spec!r} (choose from {', '.join(DETECTORS)})")
    if spec == "haar":
        return HaarDetector(min_size=min_size)
    if spec == "yunet":
        return YuNetDetector(yunet_model, score_threshold, 32 if min_size is None else min_size)
    return BlazeFaceDetector(spec, score_threshold, min_size, threads=threads)
