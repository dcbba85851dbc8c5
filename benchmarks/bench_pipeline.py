"""Frames/s of the whole on-device pipeline (decode -> detect -> crop -> infer
-> track) on a 640x480 video made from real images, per backend, with the
per-stage breakdown, against the PyTorch checkpoint run in the same script.

    python benchmarks/bench_pipeline.py --weights RUN/best.safetensors --calib DIR [--frames 120] [--json FILE]

With --detectors: per-frame latency of one 640x480 frame with one face, on one
thread, int8 classifier, for each face detector (the old default, Haar, in the
same run): median ms of detect / align+crop / classify and their total.

    python benchmarks/bench_pipeline.py --detectors [--bundle INT8_BUNDLE] [--runs 300] [--json FILE]

The video: scikit-image's astronaut photograph and three real FER2013 faces
(enlarged to 120 px) drifting across a gray background, written as MJPG and
decoded back through the same Source class `fer-edge predict` uses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("FER_EDGE_DATA", REPO.parent / "shared" / "data"))


def make_video(path: Path, frames: int, data: Path) -> None:
    import cv2
    from skimage import data as skdata

    astro = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    astro = cv2.resize(astro, (240, 240), interpolation=cv2.INTER_AREA)
    faces = []
    for cls in ("happy", "surprise", "neutral"):
        f = sorted((data / "fer2013" / "publictest" / cls).iterdir())[0]
        g = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (120, 120), interpolation=cv2.INTER_LINEAR)
        faces.append(cv2.cvtColor(g, cv2.COLOR_GRAY2BGR))
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for i in range(frames):
        frame = np.full((480, 640, 3), 90, np.uint8)
        dx = int(20 * np.sin(i / 15))
        frame[20:260, 30 + dx:270 + dx] = astro
        for k, face in enumerate(faces):
            x, y = 290 + k * 100 - dx, 300 if k != 1 else 60
            frame[y:y + 120, x:x + 120] = face
        w.write(frame)
    w.release()


def run_pipeline(backend, labels, pre, video: Path) -> dict:
    from fer_edge.targets.pipeline import Pipeline
    from fer_edge.targets.sources import Source

    pipe = Pipeline(backend, labels, pre)
    warm = Source(str(video), max_frames=5)
    for _, _, frame, _ in warm:  # warm-up: first calls allocate / pack weights
        pipe(frame)
    pipe = Pipeline(backend, labels, pre)
    t0 = time.perf_counter()
    n = 0
    for _, _, frame, _ in Source(str(video)):
        pipe(frame)
        n += 1
    wall = time.perf_counter() - t0
    s = pipe.stats()
    s["fps_with_decode"] = n / wall
    return s


# (detector, align) rows of the --detectors table.
DETECTOR_ROWS = (("haar", False), ("blazeface-short", False), ("blazeface-short", True), ("blazeface-full", False),
                 ("blazeface-full", True))


def one_face_frame():
    """640x480, gray background, scikit-image's astronaut (her face ~90 px) in the middle."""
    import cv2
    from skimage import data as skdata

    frame = np.full((480, 640, 3), 90, np.uint8)
    frame[:, 80:560] = cv2.resize(np.ascontiguousarray(skdata.astronaut()[:, :, ::-1]), (480, 480),
                                  interpolation=cv2.INTER_AREA)
    return frame


def detector_latency(backend, labels, pre, frame, runs: int) -> list[dict]:
    """Median per-stage ms of Pipeline.__call__ on the same frame, per detector."""
    from fer_edge.targets.pipeline import Pipeline, make_detector

    rows = []
    for name, align in DETECTOR_ROWS:
        pipe = Pipeline(backend, labels, pre, detector=make_detector(name, threads=1), align=align)
        for _ in range(20):   # warm-up: first calls allocate and pack weights
            pipe(frame)
        stages, faces = [], 0
        for _ in range(runs):
            pipe.reset()
            faces += len(pipe(frame))
            stages.append([1e3 * pipe.last_times[s] for s in ("detect", "preprocess", "infer", "postprocess")])
        med = np.median(np.array(stages), axis=0)
        tot = np.median(np.array(stages).sum(axis=1))
        rows.append({"detector": name, "align": align, "faces_per_frame": faces / runs, "detect_ms": med[0],
                     "align_crop_ms": med[1], "classify_ms": med[2], "post_ms": med[3], "total_ms": tot})
    return rows


def main_detectors(args) -> int:
    import cv2

    from fer_edge.targets import load_bundle, open_artifact, open_backend

    cv2.setNumThreads(1)   # one thread: OpenCV's resize and the Haar cascade would use every core
    with tempfile.TemporaryDirectory(prefix="fer-edge-pipe-") as tmp:
        bundle = args.bundle
        if bundle is None:
            from fer_edge.checkpoint import weights_or_default
            from fer_edge.converters.pipeline import convert

            bundle = Path(tmp) / "android-int8"
            convert(weights_or_default(args.weights), "android", "int8", bundle,
                    calib=args.calib or str(DEFAULT_DATA / "fer2013" / "publictest"), calib_size=256,
                    log=lambda *a: None)
        b = load_bundle(bundle)
        a = b.artifact()
        backend = open_artifact(a, threads=1)
        rows = detector_latency(backend, b.labels, b.preprocess, one_face_frame(), args.runs)
    import platform

    cpu = platform.processor() or platform.machine()
    print(f"one 640x480 frame, one face, one thread, classifier {a.runtime} {a.file} ({a.precision}); "
          f"median of {args.runs} frames; {os.cpu_count()} cores ({cpu})")
    head = (f"{'detector':<16} {'align':<5} {'faces':>5} {'detect':>7} {'align+crop':>10} {'classify':>8} "
            f"{'total':>7}  (ms)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['detector']:<16} {'yes' if r['align'] else 'no':<5} {r['faces_per_frame']:5.2f} "
              f"{r['detect_ms']:7.2f} {r['align_crop_ms']:10.2f} {r['classify_ms']:8.2f} {r['total_ms']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": "cpu", "threads": 1, "runs": args.runs,
                                               "classifier": a.file, "rows": rows}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="checkpoint (required without --detectors; there: default the embedded model)")
    ap.add_argument("--detectors", action="store_true", help="per-detector stage latency of one frame (see above)")
    ap.add_argument("--bundle", help="--detectors: the int8 bundle to classify with (default: convert one)")
    ap.add_argument("--runs", type=int, default=300, help="--detectors: frames timed per detector")
    ap.add_argument("--calib", help="labelled faces for int8 calibration (default: FER2013 PublicTest)")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the Jetson bundles run through TensorRT (needs tensorrt)")
    ap.add_argument("--threads", type=int, help="runtime threads (default: the runtime's choice)")
    ap.add_argument("--json", help="write the table as JSON")
    args = ap.parse_args(argv)
    if args.detectors:
        return main_detectors(args)
    if not args.weights:
        ap.error("--weights is required (or --detectors)")

    from fer_edge.converters.pipeline import convert
    from fer_edge.predict import TorchBackend
    from fer_edge.targets import load_bundle, open_artifact, open_backend

    calib = args.calib or str(DEFAULT_DATA / "fer2013" / "publictest")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fer-edge-pipe-") as tmp:
        video = Path(tmp) / "faces.avi"
        make_video(video, args.frames, DEFAULT_DATA)
        tb = TorchBackend(args.weights)
        rows.append({"backend": "pytorch (merged, fused kernel)", "artifact": Path(args.weights).name,
                     **run_pipeline(tb, tb.meta["classes"], tb.preprocess, video)})
        for target, precision in (("onnx", "fp32"), ("onnx", "int8"), ("jetson", "int8"), ("android", "fp32"),
                                  ("android", "int8")):
            out = Path(tmp) / f"{target}-{precision}"
            convert(args.weights, target, precision, out, calib=calib, calib_size=256, log=lambda *a: None)
            b = load_bundle(out, allow_failed=True)
            a = b.artifact()
            if args.device == "cuda" and target == "jetson":
                from fer_edge.targets.jetson import cached_engine

                engine = cached_engine(a.path, precision, onnx_sha256=a.sha256, onnx_bytes=a.content)
                backend, name = open_backend(engine, "tensorrt"), "tensorrt"
            else:
                backend, name = open_artifact(a, args.threads), a.runtime
            rows.append({"backend": f"{name} {target}/{precision}", "artifact": a.file,
                         **run_pipeline(backend, b.labels, b.preprocess, video)})
    base = rows[0]["fps"]
    head = (f"{'backend':<32} {'fps':>7} {'vs torch':>8} {'fps+dec':>8} {'detect':>7} {'prep':>6} {'infer':>7} "
            f"{'post':>6}  (ms per frame, {rows[0]['faces'] // max(1, rows[0]['frames'])} faces/frame)")
    print(f"pipeline on a 640x480 video of {args.frames} frames, device {args.device}, {os.cpu_count()} cores")
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = r["ms_per_frame"]
        r["ratio_vs_pytorch"] = r["fps"] / base
        print(f"{r['backend']:<32} {r['fps']:7.1f} {r['ratio_vs_pytorch']:7.2f}x {r['fps_with_decode']:8.1f} "
              f"{ms['detect']:7.2f} {ms['preprocess']:6.2f} {ms['infer']:7.2f} {ms['postprocess']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "frames": args.frames, "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
