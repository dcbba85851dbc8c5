"""``fer-edge predict``: faces and expressions from an image, a folder, a video
or a camera, through a bundle's runtime (no torch) or a checkpoint (PyTorch).

Privacy: nothing is written unless asked (--save for annotated frames,
--jsonl for events); the frames of children filmed never leave the device
otherwise.

Everything the user gives is checked before a frame is processed: option
ranges by argparse, then the outputs (folder writable, not existing without
--force, an encoder for the suffix), then the source (exists, readable, an
image's header within the pixel limit), then the model and the detector.
Outputs appear under their names only when complete (temp file + rename).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from fer_edge import UserError
from fer_edge.argtypes import float_in, int_in, positive_int
from fer_edge.fileio import shown

MAX_FACE_PX = 1 << 14


def track_gap(text: str) -> str:
    """--track-gap: frames (15) or seconds (0.5s), checked by argparse."""
    from fer_edge.targets.pipeline import track_gap_frames

    try:
        track_gap_frames(text, None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return text


track_gap.__name__ = "track gap"


def check_options(args: argparse.Namespace) -> None:
    """Options that only make sense together."""
    from fer_edge.predict import check_runtime_options

    check_runtime_options(args.bundle, args.weights, args.backend, args.trust, args.min_release)
    if args.yunet_model and args.detector != "yunet":
        raise UserError("--yunet-model applies to --detector yunet")


def check_outputs(args: argparse.Namespace, kind: str) -> None:
    """--jsonl and --save, before the source or the model is opened: a folder that
    is a file or not writable, an existing file without --force, no encoder
    for the suffix, an output that is the input or the other output."""
    from fer_edge.commands.common import check_outputs_spare_inputs
    from fer_edge.fileio import check_writable_parent, refuse_existing
    from fer_edge.targets.sources import check_sink

    outputs = [(what, path) for what, path in (("--jsonl", args.jsonl), ("--save", args.save)) if path is not None]
    for what, path in outputs:
        if not str(path).strip():
            raise UserError(f"{what}: give a file name")
    check_outputs_spare_inputs(dict(outputs), {"--bundle": args.bundle, "--weights": args.weights,
                                               "--trust": args.trust, "--yunet-model": args.yunet_model,
                                               "the source": None if kind == "camera" else args.source})
    if args.jsonl:
        check_writable_parent(args.jsonl, "--jsonl")
        if Path(args.jsonl).exists() and not Path(args.jsonl).is_file():
            raise UserError(f"--jsonl {args.jsonl}: exists and is not a regular file")
        refuse_existing(args.jsonl, args.force, "--jsonl")
    if args.save:
        check_sink(args.save, kind, args.force)


def open_detector(args: argparse.Namespace):
    from fer_edge.targets.detectors import make_detector

    try:
        return make_detector(args.detector, score_threshold=args.det_threshold, min_size=args.min_face,
                             yunet_model=args.yunet_model, threads=args.det_threads)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def face_event(face, t: float, index: int, name: str) -> dict:
    """One line of --jsonl: a face of a frame."""
    return {"time": round(t, 4), "frame": index, "source": name, "track_id": face.track_id, "box": face.box,
            "face_score": round(face.score, 4), "label": face.label, "confidence": round(face.confidence, 5),
            "raw_label": face.raw_label, "probs": {k: round(v, 5) for k, v in face.probs.items()}}


def process(args, source, pipe, sink, events, progress, show: bool, clock: dict) -> bool:
    """Run every frame through the pipeline; True when a camera run was
    interrupted (Ctrl-C ends a camera run: what was seen so far is kept).
    ``clock["seconds"]`` gets the loop's wall time: reading, drawing and
    writing included, which the pipeline's own stage times leave out."""
    # Images of a folder are unrelated: a face in one must never continue a track of another.
    still = source.kind in ("image", "folder")
    start = time.perf_counter()
    try:
        for index, t, frame, name in source:
            if still:
                pipe.reset()
            faces = pipe(frame, t)
            if not args.quiet:
                found = ", ".join(f"#{f.track_id} {f.label} {100 * f.confidence:.0f}%" for f in faces) or "no face"
                print(f"{shown(name)} [{index}]: {found}")
            if source.total:
                progress.count("image" if still else "frame", index + 1, source.total)
            if events is not None:
                events.writelines(json.dumps(face_event(f, t, index, name)) + "\n" for f in faces)
            if sink is not None or show:
                if not show_and_save(frame, faces, name, sink, show):
                    break
    except KeyboardInterrupt:
        if source.kind != "camera":
            raise
        return True
    finally:
        clock["seconds"] = time.perf_counter() - start
    return False


def show_and_save(frame, faces, name, sink, show: bool) -> bool:
    """Annotate, save and show one frame; False when the user pressed q in the window."""
    from fer_edge.targets.pipeline import annotate

    drawn = annotate(frame, faces)
    if sink is not None:
        sink.write(drawn, name)
    if show:
        import cv2

        cv2.imshow("fer-edge", drawn)
        return (cv2.waitKey(1) & 0xFF) != ord("q")
    return True


def run_with_outputs(args, source, pipe, clock: dict) -> bool:
    """process() with its outputs: events through a temp file renamed into place,
    annotated frames through the Sink; a failure leaves neither behind."""
    from fer_edge.converters.progress import NO_PROGRESS, Progress
    from fer_edge.fileio import write_atomic
    from fer_edge.targets.sources import Sink, display_available

    show = args.show and display_available()
    if args.show and not show:
        print("note: no display here (or an OpenCV without a GUI), --show ignored", file=sys.stderr)
    long_running = source.kind in ("folder", "video") and not args.no_progress
    progress = Progress(prefix="predict") if long_running else NO_PROGRESS
    sink = Sink(args.save, source, force=args.force) if args.save else None
    interrupted, ok = False, False

    def run(events_path=None):
        nonlocal interrupted
        with open(events_path, "w", encoding="utf-8") if events_path else contextlib.nullcontext() as events:
            interrupted = process(args, source, pipe, sink, events, progress, show, clock)
        if source.kind == "folder" and pipe.frames == 0:   # every image failed to decode: say so, keep nothing
            raise UserError(f"{args.source}: none of its images could be used ({len(source.skipped)} skipped, "
                            f"first: {source.skipped[0]})")

    try:
        if args.jsonl:
            write_atomic(args.jsonl, run, force=True)   # existing files were refused by check_outputs
        else:
            run()
        ok = True
    finally:
        progress.close()
        if sink is not None:
            sink.close(ok)
    return interrupted


def cmd_predict(args: argparse.Namespace) -> int:
    from fer_edge.predict import open_runtime
    from fer_edge.targets.pipeline import Pipeline, Tracker, track_gap_frames, track_gap_seconds
    from fer_edge.targets.runtime import BundleError
    from fer_edge.targets.sources import Source, source_kind

    check_options(args)
    check_outputs(args, source_kind(args.source))
    source = Source(args.source, max_frames=args.max_frames)
    detector = open_detector(args)
    backend, labels, pre, desc = open_runtime(args.bundle, args.weights, args.backend, trust=args.trust,
                                              min_release=args.min_release)
    pipe = Pipeline(backend, labels, pre, detector=detector, margin=args.margin, align=args.align,
                    temperature=args.temperature, min_confidence=args.min_confidence or 0.0,
                    tracker=Tracker(max_age=track_gap_frames(args.track_gap, source.fps),
                                    # a camera's gap in seconds is wall time: it gives fewer frames than
                                    # its nominal rate when processing is slower
                                    max_seconds=track_gap_seconds(args.track_gap) if source.kind == "camera"
                                    else None))
    try:
        pipe.check_model()   # before the first frame: an artifact that cannot run its own input
        clock = {"seconds": 0.0}
        interrupted = run_with_outputs(args, source, pipe, clock)
    except BundleError as exc:
        raise UserError(f"{args.bundle or args.weights}: {exc}") from None
    if source.skipped:
        print(f"warning: skipped {len(source.skipped)} image(s) that cannot be used (first: "
              f"{shown(source.skipped[0])})",
              file=sys.stderr)
    s = pipe.stats()
    ms = s["ms_per_frame"]
    wall = clock["seconds"]
    print(f"{s['frames']} frames, {s['faces']} faces, {desc}, detector {detector.name}"
          f"{', aligned' if args.align else ''}, temperature {pipe.temperature:g}: "
          f"{s['frames'] / wall if wall > 0 else 0.0:.1f} frames/s end to end "
          f"({s['fps']:.1f} in the pipeline alone); pipeline ms per frame: detect {ms['detect']:.2f}, "
          f"preprocess {ms['preprocess']:.2f}, infer {ms['infer']:.2f}, postprocess {ms['postprocess']:.2f}")
    if interrupted:
        print(f"fer-edge predict: interrupted after {s['frames']} frames; what was seen so far is saved",
              file=sys.stderr)
        return 130
    return 0


def add_predict_parser(sub) -> None:
    from fer_edge.predict import BACKENDS
    from fer_edge.targets.detectors import DEFAULT_DETECTOR, DETECTORS

    p = sub.add_parser("predict", help="faces and expressions from an image, folder, video or camera",
                       description="Detect faces and classify their expressions in an image, a folder of "
                                   "images, a video or a camera.  Nothing is written unless you ask (--save, "
                                   "--jsonl): the people filmed, often children, stay on the device.")
    p.add_argument("source", help="image file, folder of images, video file, or camera index (0, 1, ...)")
    p.add_argument("--bundle", help="a bundle from fer-edge convert (runs without PyTorch)")
    p.add_argument("--weights", help="a checkpoint, run in PyTorch (default without --bundle: the embedded "
                   "default model)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto = TensorRT for a Jetson bundle when tensorrt imports, else the bundle's runtime")
    p.add_argument("--trust", metavar="PUBKEY", help="run the bundle only if manifest.sig is a valid signature "
                   "by this public key (fer-edge keygen's .pub)")
    p.add_argument("--min-release", type=int_in(0, 2 ** 53), metavar="N",
                   help="with --trust: refuse a bundle whose signed release number (convert --release) is under N, "
                        "so an older signed bundle cannot be put back")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, choices=sorted(DETECTORS),
                   help="blazeface-full (default: faces up to ~5 m, a room or robot camera), blazeface-short "
                        "(faces within ~2 m), haar (OpenCV's frontal cascade) or yunet (with --yunet-model)")
    p.add_argument("--yunet-model", metavar="ONNX", help="YuNet's face_detection_yunet_*.onnx for --detector yunet")
    p.add_argument("--det-threshold", type=float_in(0, 1, low_open=True, high_open=True), metavar="P",
                   help="detector score threshold, in (0, 1) (default: blazeface-full 0.6, blazeface-short 0.5, "
                        "yunet 0.7)")
    p.add_argument("--min-face", type=int_in(1, MAX_FACE_PX), metavar="PX",
                   help="ignore faces smaller than PX pixels (default 32; haar: 43 in a 640x480 frame)")
    p.add_argument("--det-threads", type=int_in(1, 256), default=1, metavar="N",
                   help="BlazeFace interpreter threads (default 1)")
    p.add_argument("--align", action="store_true",
                   help="rotate each crop so the eyes are level (BlazeFace/YuNet keypoints); off by default: "
                        "no accuracy gain measured (docs/camera.md)")
    p.add_argument("--margin", type=float_in(-0.4, 2, low_open=True, high_open=True),
                   help="crop margin around the detected face, a fraction of its size, in (-0.4, 2) "
                        "(default: the detector's own, measured to frame faces as FER2013 does)")
    p.add_argument("--temperature", type=float_in(0, 100, low_open=True), metavar="T",
                   help="softmax temperature, in (0, 100] (default: the one fitted at training and stored in the "
                        "bundle or checkpoint; 1 when there is none)")
    p.add_argument("--min-confidence", type=float_in(0, 1), metavar="P",
                   help="label a face 'uncertain' when its (smoothed) top probability is below P, in [0, 1]")
    p.add_argument("--track-gap", type=track_gap, default="15", metavar="FRAMES|Ns",
                   help="video/camera: a face unseen for more than this many frames (or seconds: 0.5s) starts a "
                        "new track (default 15 frames); images of a folder never share tracks")
    p.add_argument("--save", help="write annotated output: an image, a folder (for a folder) or .mp4/.avi")
    p.add_argument("--jsonl", help="write one JSON event per face per frame")
    p.add_argument("--show", action="store_true", help="show a window (only where a display exists)")
    p.add_argument("--max-frames", type=positive_int, metavar="N", help="stop after N frames (or images)")
    p.add_argument("--quiet", action="store_true", help="no per-frame lines")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress lines on stderr (a folder or a video prints one every 10 s)")
    p.add_argument("--force", action="store_true", help="overwrite --save / --jsonl")
    p.set_defaults(func=cmd_predict)
