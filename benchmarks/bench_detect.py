"""Face detection and end-to-end expression accuracy on composite frames with
known faces: detection recall/precision per detector, and the classifier's
accuracy on the faces each detector found (through the whole pipeline: detect,
crop or align, classify) against its accuracy on the same faces' original crops.

    python benchmarks/bench_detect.py [--bundle DIR] [--frames 60] [--seed 0] [--json FILE]
    python benchmarks/bench_detect.py --framing     # measure each detector's crop framing

The frames: 640x480 scikit-image photographs without faces (coffee, rocket,
brick, grass, ...), with real FER2013 PublicTest faces (48x48 gray) enlarged
to 60-200 px, half of them rotated by up to +-20 degrees, pasted without
overlap at known places.  A detection is matched to a pasted face when its
centre lies inside the face's square and its size is 0.3-1.5x the square's
(a detector boxes the face inside the FER crop, which includes some
background); every unmatched detection is a false positive.

Without --bundle the classifier is the embedded default model converted here
to an Android int8 bundle (`fer-edge convert --target android --precision int8`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FER_EDGE_DATA", REPO.parent / "shared" / "data"))
# scikit-image photographs without a face (checked: no face in any of them).
BACKGROUNDS = ("coffee", "rocket", "brick", "grass", "gravel", "moon", "page", "immunohistochemistry", "retina",
               "text")
FRAME_HW = (480, 640)
# (detector, align) rows of the table.
CONFIGS = (("haar", False), ("blazeface-short", False), ("blazeface-short", True), ("blazeface-full", False),
           ("blazeface-full", True))


@dataclass
class PastedFace:
    box: tuple[float, float, float, float]   # x, y, side, side: the face's 48x48 square in the frame
    angle: float                             # degrees, positive = clockwise on screen
    label: str
    face48: np.ndarray                       # the original crop


def background(name: str, hw=FRAME_HW) -> np.ndarray:
    """A scikit-image photograph as a BGR frame, scaled to cover hw and centre-cropped."""
    import cv2
    from skimage import data as skdata

    img = getattr(skdata, name)()
    if img.dtype != np.uint8:
        img = (img * 255 if img.max() <= 1 else img).clip(0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
    else:
        img = np.ascontiguousarray(img[:, :, ::-1])
    h, w = hw
    s = max(h / img.shape[0], w / img.shape[1])
    img = cv2.resize(img, (max(w, round(img.shape[1] * s)), max(h, round(img.shape[0] * s))),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[y0:y0 + h, x0:x0 + w])


def publictest_faces(data: Path, n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """n PublicTest faces, round-robin over the classes, each class in a seeded order."""
    import cv2

    root = data / "fer2013" / "publictest"
    rng = np.random.default_rng(seed)
    per = {c.name: [c / f for f in rng.permutation(sorted(p.name for p in c.iterdir()))]
           for c in sorted(root.iterdir()) if c.is_dir()}
    out, i = [], 0
    while len(out) < n:
        for cls, files in per.items():
            if i < len(files) and len(out) < n:
                out.append((cv2.imread(str(files[i]), cv2.IMREAD_GRAYSCALE), cls))
        i += 1
    return out


def paste(frame: np.ndarray, face48: np.ndarray, cx: float, cy: float, side: int, angle: float) -> None:
    """The face enlarged to side x side (linear, as a camera would never blur it
    less), rotated by angle about its centre, pasted centred at (cx, cy)."""
    import cv2

    face = cv2.resize(face48, (side, side), interpolation=cv2.INTER_LINEAR)
    d = int(np.ceil(side * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))))) + 2
    m = cv2.getRotationMatrix2D((side / 2, side / 2), -angle, 1.0)   # cv2: positive = counter-clockwise
    m[:, 2] += (d - side) / 2
    patch = cv2.warpAffine(face, m, (d, d), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((side, side), np.float32), m, (d, d), flags=cv2.INTER_LINEAR)[..., None]
    x0, y0 = int(round(cx - d / 2)), int(round(cy - d / 2))
    region = frame[y0:y0 + d, x0:x0 + d].astype(np.float32)
    frame[y0:y0 + d, x0:x0 + d] = (mask * patch[..., None] + (1 - mask) * region).round().astype(np.uint8)


def composite_frames(data: Path, frames: int, seed: int = 0, per_frame: int = 3, sizes=(60, 200),
                     rotated: float = 0.5, max_angle: float = 20.0):
    """[(bgr frame, [PastedFace])]: faces of random size in sizes, a `rotated`
    fraction rotated uniformly within +-max_angle, never overlapping."""
    rng = np.random.default_rng(seed)
    faces = publictest_faces(data, frames * per_frame, seed)
    h, w = FRAME_HW
    out, k = [], 0
    for i in range(frames):
        frame = background(BACKGROUNDS[i % len(BACKGROUNDS)]).copy()
        placed: list[PastedFace] = []
        taken: list[tuple[float, float, float]] = []   # centre and half extent of what is pasted
        for _ in range(per_frame):
            face48, label = faces[k]
            k += 1
            side = int(rng.integers(sizes[0], sizes[1] + 1))
            angle = float(rng.uniform(-max_angle, max_angle)) if rng.random() < rotated else 0.0
            half = side * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))) / 2 + 2
            for _try in range(100):
                cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
                if all(abs(cx - ox) > half + oh + 8 or abs(cy - oy) > half + oh + 8 for ox, oy, oh in taken):
                    break
            else:
                continue   # no room left in this frame: fewer faces
            paste(frame, face48, cx, cy, side, angle)
            taken.append((cx, cy, half))
            placed.append(PastedFace((cx - side / 2, cy - side / 2, side, side), angle, label, face48))
        out.append((frame, placed))
    return out


def match(truth_boxes, det_boxes, size_range=(0.3, 1.5)) -> list[tuple[int, int]]:
    """(truth index, detection index) pairs: the detection's centre inside the
    truth square and its size within size_range of it; closest centres first,
    each box used once."""
    cands = []
    for ti, (tx, ty, ts, _) in enumerate(truth_boxes):
        for di, (dx, dy, dw, dh) in enumerate(det_boxes):
            cx, cy = dx + dw / 2, dy + dh / 2
            if tx <= cx <= tx + ts and ty <= cy <= ty + ts and size_range[0] <= max(dw, dh) / ts <= size_range[1]:
                cands.append((np.hypot(cx - tx - ts / 2, cy - ty - ts / 2), ti, di))
    used_t, used_d, pairs = set(), set(), []
    for _, ti, di in sorted(cands):
        if ti not in used_t and di not in used_d:
            used_t.add(ti)
            used_d.add(di)
            pairs.append((ti, di))
    return pairs


def open_classifier(bundle):
    from fer_edge.targets import load_bundle, open_artifact

    b = load_bundle(bundle)
    a = b.artifact()
    return open_artifact(a, threads=1), b.labels, b.preprocess, f"{a.runtime} {a.file}"


def classify_originals(backend, labels, pre, faces48) -> np.ndarray:
    """Predicted label index of each original 48x48 crop (no detector involved)."""
    from fer_edge.targets.bundle import preprocess_faces, resize_face

    size = tuple(pre["input_size"])
    x = preprocess_faces(np.stack([resize_face(f, size) for f in faces48]), pre)
    return backend.run(x).argmax(axis=1)


SIZE_BINS = ((60, 100), (100, 150), (150, 201))   # pasted face side, px


def evaluate(frames, detector: str, align: bool, backend, labels, pre) -> dict:
    """Detection recall/precision and expression accuracy of one pipeline configuration
    (with recall per face size and accuracy on the rotated faces alone)."""
    from fer_edge.targets.pipeline import Pipeline, make_detector

    pipe = Pipeline(backend, labels, pre, detector=make_detector(detector), align=align)
    tp = fp = fn = correct = correct_orig_found = 0
    found_by_size = {b: [0, 0] for b in SIZE_BINS}
    rotated = [0, 0]   # correct, found (rotated faces)
    t0 = time.perf_counter()
    for frame, truth in frames:
        pipe.reset()   # unrelated frames: no track carries over
        faces = pipe(frame)
        pairs = match([t.box for t in truth], [f.box for f in faces])
        tp += len(pairs)
        fp += len(faces) - len(pairs)
        fn += len(truth) - len(pairs)
        hit = {ti for ti, _ in pairs}
        for ti, t in enumerate(truth):
            b = next(b for b in SIZE_BINS if b[0] <= t.box[2] < b[1])
            found_by_size[b][0] += ti in hit
            found_by_size[b][1] += 1
        if pairs:
            orig = classify_originals(backend, labels, pre, [truth[ti].face48 for ti, _ in pairs])
            for (ti, di), o in zip(pairs, orig):
                ok = faces[di].raw_label == truth[ti].label
                correct += ok
                correct_orig_found += labels[o] == truth[ti].label
                if truth[ti].angle != 0:
                    rotated[0] += ok
                    rotated[1] += 1
    ms = 1e3 * (time.perf_counter() - t0) / max(1, len(frames))
    return {"detector": detector, "align": align, "faces": tp + fn, "found": tp, "false_positives": fp,
            "recall": tp / max(1, tp + fn), "precision": tp / max(1, tp + fp),
            "recall_by_size": {f"{a}-{b - 1}px": v[0] / max(1, v[1]) for (a, b), v in found_by_size.items()},
            "accuracy_detected": correct / max(1, tp),
            "accuracy_originals_of_detected": correct_orig_found / max(1, tp),
            "accuracy_detected_rotated": rotated[0] / max(1, rotated[1]), "rotated_found": rotated[1],
            "ms_per_frame": ms}


def framing(frames) -> list[dict]:
    """Per detector, on upright pasted faces: the FER square relative to the
    detector's box (median side ratio and centre offsets in box sizes), i.e.
    the crop margin and shift that reproduce FER2013's framing."""
    from fer_edge.targets.pipeline import make_detector

    rows = []
    for name in ("haar", "blazeface-short", "blazeface-full"):
        det = make_detector(name)
        ratio, dx, dy = [], [], []
        for frame, truth in frames:
            d = det.detect(frame)
            for ti, di in match([t.box for t in truth], d.boxes):
                if truth[ti].angle != 0:
                    continue
                tx, ty, ts, _ = truth[ti].box
                bx, by, bw, bh = d.boxes[di]
                s = max(bw, bh)
                ratio.append(ts / s)
                dx.append((tx + ts / 2 - bx - bw / 2) / s)
                dy.append((ty + ts / 2 - by - bh / 2) / s)
        r = float(np.median(ratio)) if ratio else float("nan")
        rows.append({"detector": name, "faces": len(ratio), "side_ratio": r, "margin": (r - 1) / 2,
                     "shift_x": float(np.median(dx)) if dx else float("nan"),
                     "shift_y": float(np.median(dy)) if dy else float("nan")})
    return rows


def false_positives_on_backgrounds(detector: str) -> dict[str, int]:
    from fer_edge.targets.pipeline import make_detector

    det = make_detector(detector)
    return {name: len(det.detect(background(name))) for name in BACKGROUNDS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="classifier bundle (default: the embedded model, converted to android int8)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the data folder holding fer2013/publictest")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--framing", action="store_true", help="print each detector's crop framing and stop")
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="detectors and classifier run on the CPU")
    ap.add_argument("--json", help="write the table as JSON")
    args = ap.parse_args(argv)
    frames = composite_frames(Path(args.data), args.frames, args.seed)
    n_faces = sum(len(t) for _, t in frames)
    if args.framing:
        rows = framing(frames)
        print(f"crop framing on {n_faces} pasted faces ({args.frames} frames, upright ones only)")
        for r in rows:
            print(f"{r['detector']:<16} faces {r['faces']:4d}  side ratio {r['side_ratio']:.3f} -> margin "
                  f"{r['margin']:.3f}, shift x {r['shift_x']:+.3f}, shift y {r['shift_y']:+.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"framing": rows}, indent=2) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="fer-edge-detect-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from fer_edge.checkpoint import weights_or_default
            from fer_edge.converters.pipeline import convert

            bundle = Path(tmp) / "android-int8"
            convert(weights_or_default(None), "android", "int8", bundle,
                    calib=str(Path(args.data) / "fer2013" / "publictest"), calib_size=256, log=lambda *a: None)
        backend, labels, pre, desc = open_classifier(bundle)
        all_faces = [t for _, ts in frames for t in ts]
        orig = classify_originals(backend, labels, pre, [t.face48 for t in all_faces])
        acc_orig = float(np.mean([labels[o] == t.label for o, t in zip(orig, all_faces)]))
        rows = [evaluate(frames, d, a, backend, labels, pre) for d, a in CONFIGS]
        fps = {d: false_positives_on_backgrounds(d) for d in ("haar", "blazeface-short", "blazeface-full")}
    rotated = sum(t.angle != 0 for t in all_faces)
    print(f"{args.frames} composite 640x480 frames, {n_faces} FER2013 PublicTest faces (60-200 px, {rotated} rotated "
          f"up to 20 deg), classifier {desc}, temperature {pre.get('temperature', 1.0)}")
    print(f"classifier accuracy on the {n_faces} original 48x48 crops: {100 * acc_orig:.1f}%")
    head = (f"{'detector':<16} {'align':<5} {'found':>9} {'FP':>4} {'recall':>7} {'precision':>9} "
            f"{'acc(det)':>8} {'acc(orig)':>9} {'acc(rot)':>8}  {'recall by face size':<26} {'ms/frame':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        by_size = " ".join(f"{100 * v:.0f}%" for v in r["recall_by_size"].values())
        print(f"{r['detector']:<16} {'yes' if r['align'] else 'no':<5} {r['found']:>4}/{r['faces']:<4} "
              f"{r['false_positives']:>4} {100 * r['recall']:6.1f}% {100 * r['precision']:8.1f}% "
              f"{100 * r['accuracy_detected']:7.1f}% {100 * r['accuracy_originals_of_detected']:8.1f}% "
              f"{100 * r['accuracy_detected_rotated']:7.1f}%  {by_size:<26} {r['ms_per_frame']:8.1f}")
    print("acc(det): expression accuracy on the faces found, through the pipeline's crop; acc(orig): the same "
          "faces' original crops; acc(rot): acc(det) on the rotated faces found; recall by face size: "
          + ", ".join(f"{a}-{b - 1} px" for a, b in SIZE_BINS))
    for d, v in fps.items():
        print(f"false faces on the {len(v)} face-free backgrounds alone, {d}: {sum(v.values())} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": args.frames, "seed": args.seed, "faces": n_faces,
                                               "classifier": desc, "accuracy_originals": acc_orig, "rows": rows,
                                               "false_positives_backgrounds": fps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
