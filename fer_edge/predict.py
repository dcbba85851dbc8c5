"""``fer-edge predict``: faces and expressions from an image, a folder, a video
or a camera, through a bundle's runtime (no torch) or a checkpoint (PyTorch).

Privacy: nothing is written unless asked (--save for annotated frames,
--jsonl for events); the frames of children filmed never leave the device
otherwise.  ONNX Runtime's telemetry is off (fer_edge/__init__ sets
ORT_DISABLE_TELEMETRY before it can be imported); the only file a bundle run
may create is a Jetson's TensorRT engine cache, inside the bundle folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from fer_edge import UserError

BACKENDS = ("auto", "tensorrt", "onnxruntime", "tflite")


class TorchBackend:
    """A checkpoint run by PyTorch (merged, fused kernel on CPU): for trying a
    model before converting it."""

    name = "pytorch"

    def __init__(self, weights):
        import torch

        from fer_edge.checkpoint import load_checkpoint
        from fer_edge.reparam import merge

        from fer_edge.targets.bundle import artifact_preprocess

        model, self.meta = load_checkpoint(weights)
        model = model if self.meta["form"] == "merged" else merge(model, use_kernel=True)
        # channels_last: the faster layout on the CPU too (see fer_edge.evaluate.evaluate)
        self.model = model.to(memory_format=torch.channels_last)
        self.preprocess = artifact_preprocess(self.meta["preprocess"])  # NCHW float, like an fp32 bundle

    def run(self, x):
        import torch

        with torch.no_grad():
            y = self.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            return y.numpy()


def open_runtime(bundle=None, weights=None, backend: str = "auto", log=print, trust=None):
    """(backend, labels, preprocess, description).  trust: a public key file; the
    bundle must then be signed with its private key."""
    if bundle and weights:
        raise UserError("give one of --bundle (a converted model) or --weights (a checkpoint), not both")
    if trust and not bundle:
        raise UserError("--trust applies to --bundle (a signed bundle); --weights runs a checkpoint in PyTorch")
    if not bundle:
        from fer_edge.checkpoint import weights_or_default

        if backend not in ("auto",):
            raise UserError("--backend applies to --bundle; --weights runs in PyTorch")
        weights = weights_or_default(weights)
        b = TorchBackend(weights)
        return b, b.meta["classes"], b.preprocess, f"PyTorch ({Path(weights).name})"
    from fer_edge.targets import BackendUnavailable, BundleError, load_bundle, open_backend

    try:
        bun = load_bundle(bundle, trust=trust)
    except BundleError as exc:
        raise UserError(str(exc)) from None
    art = bun.artifact()
    runtime = art.runtime
    if backend == "auto" and runtime == "onnxruntime" and art.target == "jetson":
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            backend = "tensorrt"
    if backend != "auto" and backend != runtime:
        onnx_ok = backend == "tensorrt" and art.file.endswith(".onnx")
        if not onnx_ok:
            raise UserError(f"--backend {backend} cannot run {art.file} (a {runtime} artifact)")
    chosen = runtime if backend == "auto" else backend
    try:
        if chosen == "tensorrt":
            from fer_edge.targets.jetson import cached_engine

            engine = cached_engine(art.path, art.precision, log=log, onnx_sha256=art.sha256)
            be = open_backend(engine, "tensorrt")
        else:
            be = open_backend(art.path, chosen)
    except BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    return be, bun.labels, bun.preprocess, f"{chosen} ({art.file}, {art.precision})"


def check_options(args: argparse.Namespace) -> None:
    """Numbers out of range are one line, before anything is opened."""
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise UserError(f"--min-confidence {args.min_confidence}: give a probability in [0, 1]")
    if args.det_threshold is not None and not 0.0 < args.det_threshold < 1.0:
        raise UserError(f"--det-threshold {args.det_threshold}: give a score in (0, 1)")
    if args.min_face is not None and args.min_face < 1:
        raise UserError(f"--min-face {args.min_face}: give a size in pixels (>= 1)")
    if args.temperature is not None and not args.temperature > 0:
        raise UserError(f"--temperature {args.temperature}: must be > 0")
    if args.det_threads < 1:
        raise UserError(f"--det-threads {args.det_threads}: give 1 or more")
    if args.margin is not None and not -0.4 < args.margin < 2:
        raise UserError(f"--margin {args.margin}: give a fraction of the face size (e.g. 0.1)")


def cmd_predict(args: argparse.Namespace) -> int:
    from fer_edge.targets.pipeline import Pipeline, Tracker, annotate, make_detector, track_gap_frames
    from fer_edge.targets.sources import Sink, Source, SourceError, display_available

    check_options(args)
    if args.jsonl and Path(args.jsonl).exists() and not args.force:
        raise UserError(f"{args.jsonl} exists; pass --force to overwrite it")
    try:
        source = Source(args.source, max_frames=args.max_frames)
        gap = track_gap_frames(args.track_gap, source.fps)
        detector = make_detector(args.detector, score_threshold=args.det_threshold, min_size=args.min_face,
                                 yunet_model=args.yunet_model, threads=args.det_threads)
    except (SourceError, FileNotFoundError, RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    backend, labels, pre, desc = open_runtime(args.bundle, args.weights, args.backend, trust=args.trust)
    pipe = Pipeline(backend, labels, pre, detector=detector, margin=args.margin, align=args.align,
                    temperature=args.temperature, min_confidence=args.min_confidence or 0.0,
                    tracker=Tracker(max_age=gap))
    # Images of a folder are unrelated: a face in one must never continue a track of another.
    still = source.kind in ("image", "folder")
    try:
        sink = Sink(args.save, source, force=args.force) if args.save else None
    except SourceError as exc:
        raise UserError(str(exc)) from None
    show = args.show and display_available()
    if args.show and not show:
        print("note: no display here, --show ignored", file=sys.stderr)
    events = None
    if args.jsonl:
        fd, events_tmp = tempfile.mkstemp(prefix=f".{Path(args.jsonl).name}.", dir=Path(args.jsonl).parent or ".")
        events = os.fdopen(fd, "w")
    ok = False
    try:
        for index, t, frame, name in source:
            if still:
                pipe.reset()
            faces = pipe(frame)
            if not args.quiet:
                found = ", ".join(f"#{f.track_id} {f.label} {100 * f.confidence:.0f}%" for f in faces) or "no face"
                print(f"{name} [{index}]: {found}")
            if events is not None:
                for f in faces:
                    events.write(json.dumps({"time": round(t, 4), "frame": index, "source": name,
                                             "track_id": f.track_id, "box": f.box, "face_score": round(f.score, 4),
                                             "label": f.label,
                                             "confidence": round(f.confidence, 5), "raw_label": f.raw_label,
                                             "probs": {k: round(v, 5) for k, v in f.probs.items()}}) + "\n")
            if sink is not None or show:
                drawn = annotate(frame, faces)
                if sink is not None:
                    sink.write(drawn, name)
                if show:
                    import cv2

                    cv2.imshow("fer-edge", drawn)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
        ok = True
    finally:
        if sink is not None:
            sink.close(ok)
        if events is not None:
            events.close()
            if ok:
                os.replace(events_tmp, args.jsonl)
            else:
                Path(events_tmp).unlink(missing_ok=True)
    if source.skipped:
        print(f"warning: skipped {len(source.skipped)} unreadable image(s) (first: {source.skipped[0]})",
              file=sys.stderr)
    s = pipe.stats()
    ms = s["ms_per_frame"]
    print(f"{s['frames']} frames, {s['faces']} faces, {desc}, detector {detector.name}"
          f"{', aligned' if args.align else ''}, temperature {pipe.temperature:g}: {s['fps']:.1f} frames/s; "
          f"ms per frame: detect {ms['detect']:.2f}, preprocess {ms['preprocess']:.2f}, "
          f"infer {ms['infer']:.2f}, postprocess {ms['postprocess']:.2f}")
    return 0


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="faces and expressions from an image, folder, video or camera",
                       description="Nothing is written unless you ask (--save, --jsonl): the people filmed, "
                                   "often children, stay on the device.")
    p.add_argument("source", help="image file, folder of images, video file, or camera index (0, 1, ...)")
    p.add_argument("--bundle", help="a bundle from fer-edge convert (runs without PyTorch)")
    p.add_argument("--weights", help="a checkpoint, run in PyTorch (default without --bundle: the embedded "
                   "default model)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto = TensorRT for a Jetson bundle when tensorrt imports, else the bundle's runtime")
    p.add_argument("--trust", metavar="PUBKEY", help="run the bundle only if manifest.sig is a valid signature "
                   "by this public key (fer-edge keygen's .pub)")
    p.add_argument("--detector", default="blazeface-full", metavar="NAME",
                   help="blazeface-full (default: faces up to ~5 m, a room or robot camera), blazeface-short "
                        "(faces within ~2 m), haar (OpenCV's frontal cascade) or yunet (with --yunet-model)")
    p.add_argument("--yunet-model", metavar="ONNX", help="YuNet's face_detection_yunet_*.onnx for --detector yunet")
    p.add_argument("--det-threshold", type=float, metavar="P",
                   help="detector score threshold (default: blazeface-full 0.6, blazeface-short 0.5, yunet 0.7)")
    p.add_argument("--min-face", type=int, metavar="PX",
                   help="ignore faces smaller than PX pixels (default 32; haar: 43 in a 640x480 frame)")
    p.add_argument("--det-threads", type=int, default=1, metavar="N", help="BlazeFace interpreter threads (default 1)")
    p.add_argument("--align", action="store_true",
                   help="rotate each crop so the eyes are level (BlazeFace/YuNet keypoints); off by default: "
                        "no accuracy gain measured (docs/camera.md)")
    p.add_argument("--margin", type=float, help="crop margin around the detected face, a fraction of its size "
                   "(default: the detector's own, measured to frame faces as FER2013 does)")
    p.add_argument("--temperature", type=float, metavar="T", help="softmax temperature (default: the one fitted "
                   "at training and stored in the bundle or checkpoint; 1 when there is none)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="label a face 'uncertain' when its (smoothed) top probability is below P")
    p.add_argument("--track-gap", default="15", metavar="FRAMES|Ns",
                   help="video/camera: a face unseen for more than this many frames (or seconds: 0.5s) starts a "
                        "new track (default 15 frames); images of a folder never share tracks")
    p.add_argument("--save", help="write annotated output: an image, a folder (for a folder) or .mp4/.avi")
    p.add_argument("--jsonl", help="write one JSON event per face per frame")
    p.add_argument("--show", action="store_true", help="show a window (only where a display exists)")
    p.add_argument("--max-frames", type=int, help="stop after N frames")
    p.add_argument("--quiet", action="store_true", help="no per-frame lines")
    p.add_argument("--force", action="store_true", help="overwrite --save / --jsonl")
    p.set_defaults(func=cmd_predict)
