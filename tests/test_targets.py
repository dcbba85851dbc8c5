"""The on-device pipeline: real photographs and real FER2013 faces through face
detection, every runtime available here, tracking and the `fer-edge predict`
command; refusals of bad bundles and sources."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fer_edge.targets.pipeline import Tracker, crop_square, iou, square_box

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from helpers import DATA, one_line_error  # noqa: E402
from helpers import run_cli as run  # noqa: E402

FER = DATA / "fer2013"
needs_data = pytest.mark.skipif(not FER.is_dir(), reason=f"real data not found at {DATA}")
# The artifacts a device runs, all checkable here: (target, precision) of the session's bundles.
DEVICE_FORMATS = [("onnx", "fp32"), ("jetson", "int8"), ("android", "fp32"), ("android", "int8")]


def astronaut_bgr():
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photograph")
    return np.ascontiguousarray(skimage_data.astronaut()[:, :, ::-1])


_FACES = {}


def frontal_face(cls: str) -> np.ndarray:
    """The first PublicTest face of a class (in file order) that OpenCV's frontal
    cascade finds on its own, enlarged to 144 px (FER2013 also holds profiles
    and occluded faces that a frontal detector rightly misses)."""
    import cv2

    from fer_edge.targets.pipeline import HaarDetector

    if cls not in _FACES:
        det = HaarDetector()
        for f in sorted((FER / "publictest" / cls).iterdir())[:50]:
            face = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (144, 144), interpolation=cv2.INTER_LINEAR)
            canvas = np.full((480, 640), 90, np.uint8)
            canvas[150:294, 240:384] = face
            if len(det(None, canvas)) == 1:
                _FACES[cls] = face
                break
        else:
            raise AssertionError(f"no frontal {cls} face among the first 50")
    return _FACES[cls]


def composed_frame(shift: int = 0):
    """640x480: three real FER2013 PublicTest faces (happy, surprise, angry),
    enlarged to 144 px, pasted on a gray background."""
    import cv2

    frame = np.full((480, 640), 90, np.uint8)
    for i, cls in enumerate(("happy", "surprise", "angry")):
        y, x = 150 + shift, 40 + i * 200 + shift
        frame[y:y + 144, x:x + 144] = frontal_face(cls)
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)


from fer_edge.targets.detectors import HaarDetector  # noqa: E402


def pipeline_for(bundle):
    from fer_edge.targets import load_bundle, open_backend
    from fer_edge.targets.pipeline import Pipeline

    b = load_bundle(bundle)
    a = b.artifact()
    # Haar: these composed faces are the ones it finds (BlazeFace, the default, finds two of the three)
    return Pipeline(open_backend(a.path, a.runtime), b.labels, b.preprocess, detector=HaarDetector())


# ------------------------------------------------------------------ pure parts
def test_iou_and_square_box():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    x0, y0, side = square_box((100, 50, 40, 60), 0.25, (480, 640))
    assert side == 90 and (x0 + side / 2, y0 + side / 2) == (120, 80)  # centred, 60 * 1.5


def test_crop_outside_the_frame_replicates_the_border():
    gray = np.tile(np.arange(100, dtype=np.uint8), (80, 1))
    crop = crop_square(gray, (-10, -10, 40, 40), 0.0, (20, 20))
    assert crop.shape == (20, 20) and crop[:, 0].max() == 0


def test_tracker_smooths_a_one_frame_flicker_and_keeps_ids():
    t = Tracker(alpha=0.4)
    happy, sad = np.array([0.1, 0.9]), np.array([0.8, 0.2])
    box = np.array([100, 100, 50, 50])
    for f in range(5):
        (tr,) = t.update(box[None] + f, happy[None], f)
    assert tr.id == 1
    (tr,) = t.update(box[None] + 5, sad[None], 5)      # one odd frame
    assert tr.id == 1 and tr.probs.argmax() == 1        # label stays "happy"
    np.testing.assert_allclose(tr.probs, 0.4 * sad + 0.6 * happy)
    a, b = t.update(np.array([[100, 100, 50, 50], [400, 300, 50, 50]]), np.array([happy, sad]), 6)
    assert a.id == 1 and b.id == 2                      # a new face gets a new track
    (c,) = t.update(np.array([[400, 300, 50, 50]]), sad[None], 30)
    # 24 frames unseen (more than max_age): track 2 has expired, so the face is a new track
    assert c.id == 3 and [x.id for x in t.tracks] == [3]


# ------------------------------------------------------------------ end to end
@needs_data
def test_real_photos_through_every_backend_agree(trained, bundles):
    """The astronaut photograph and a frame of three real FER2013 faces: every
    face is found and classified by each device artifact; the fp32 artifacts
    and PyTorch give the same label for every face."""
    from fer_edge.predict import TorchBackend
    from fer_edge.targets.pipeline import Pipeline

    weights = trained[0]
    torch_backend = TorchBackend(weights)
    for frame, n_faces in ((astronaut_bgr(), 1), (composed_frame(), 3)):
        ref = Pipeline(torch_backend, torch_backend.meta["classes"], torch_backend.preprocess,
                       detector=HaarDetector())(frame)
        assert len(ref) == n_faces
        for target, precision in DEVICE_FORMATS:
            faces = pipeline_for(bundles[(target, precision)][0])(frame)
            assert [f.box for f in faces] == [f.box for f in ref]
            for f, r in zip(faces, ref):
                assert abs(sum(f.probs.values()) - 1) < 1e-4
                if precision == "fp32":
                    assert f.label == r.label, (target, f.probs, r.probs)
                    np.testing.assert_allclose(list(f.probs.values()), list(r.probs.values()), atol=1e-4)
                else:  # int8: close in probability, not necessarily the same arg-max on a weak model
                    assert np.abs(np.array(list(f.probs.values())) - list(r.probs.values())).max() < 0.1


@needs_data
def test_predict_video_with_events_and_saved_output(bundles, tmp_path):
    import cv2

    video = tmp_path / "faces.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    for i in range(8):
        w.write(composed_frame(shift=2 * i))  # faces drift slowly: tracks must hold
    w.release()
    bundle = bundles[("android", "int8")][0]
    proc = run("predict", video, "--bundle", bundle, "--jsonl", tmp_path / "ev.jsonl", "--save", tmp_path / "out.mp4",
               "--quiet", "--detector", "haar")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    # A frontal Haar cascade misses a face now and then; the tracker must carry
    # each face's identity across such gaps: exactly three tracks, never a fourth.
    assert {e["track_id"] for e in events} == {1, 2, 3}
    per_frame = [sum(e["frame"] == i for e in events) for i in range(8)]
    assert min(per_frame) >= 2 and sum(per_frame) >= 20, per_frame
    for track in (1, 2, 3):
        xs = [e["box"][0] for e in events if e["track_id"] == track]
        assert max(xs) - min(xs) < 40  # one track follows one face
    e = events[0]
    assert set(e) >= {"time", "frame", "box", "label", "probs", "track_id", "confidence"}
    assert e["label"] in e["probs"] and abs(sum(e["probs"].values()) - 1) < 1e-3
    cap = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 8
    assert "frames/s" in proc.stdout and "detect" in proc.stdout and "infer" in proc.stdout


@needs_data
def test_predict_writes_nothing_by_default(bundles, tmp_path):
    import cv2

    img = tmp_path / "in" / "astronaut.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), astronaut_bgr())
    bundle = bundles[("onnx", "fp32")][0]
    before = sorted(p.name for p in bundle.iterdir())
    proc = run("predict", img.parent, "--bundle", bundle, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "astronaut.png [0]: #1" in proc.stdout
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["astronaut.png", "in"]
    assert sorted(p.name for p in bundle.iterdir()) == before


@needs_data
def test_predict_refuses_bad_bundles_and_sources(bundles, tmp_path):
    import cv2

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), astronaut_bgr())
    src = bundles[("onnx", "fp32")][0]
    bad = tmp_path / "tampered"
    shutil.copytree(src, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[1000] ^= 1
    (bad / "model.onnx").write_bytes(bytes(data))
    one_line_error(run("predict", img, "--bundle", bad), "does not match its sha256")
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    (missing / "labels.json").unlink()
    one_line_error(run("predict", img, "--bundle", missing), "labels.json is missing")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    one_line_error(run("predict", broken, "--bundle", src), "cannot read this video")
    one_line_error(run("predict", "7", "--bundle", src), "camera 7 does not open")
    (tmp_path / "empty").mkdir()
    one_line_error(run("predict", tmp_path / "empty", "--bundle", src), "no images")
    one_line_error(run("predict", tmp_path / "nope.png", "--bundle", src), "no such file")
    one_line_error(run("predict", img, "--bundle", src, "--weights", img), "not both")
    one_line_error(run("predict", img, "--bundle", src, "--backend", "tflite"), "cannot run model.onnx")
    # YuNet runs from the user's .onnx (none can be fetched here; the missing file is one line)
    one_line_error(run("predict", img, "--bundle", src, "--detector", tmp_path / "yunet.onnx"), "YuNet model")


def test_tensorrt_runner_builds_and_caches_an_engine(bundles):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it ships with JetPack on a Jetson)")
    from fer_edge.targets.jetson import cached_engine

    onnx = bundles[("jetson", "fp16")][0] / "model_fp16.onnx"
    engine = cached_engine(onnx, "fp16")
    assert engine.is_file() and cached_engine(onnx, "fp16") == engine


@needs_data
def test_predict_command_runs_where_torch_is_not_installed(bundles, tmp_path):
    """A device has no torch: with `import torch` made to fail, the whole
    `fer-edge predict --bundle` command (parser of every command included) works."""
    import cv2

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), astronaut_bgr())
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from fer_edge.cli import main\n"
            f"sys.exit(main(['predict', {str(img)!r}, '--bundle', {str(bundles[('android', 'int8')][0])!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "a.png [0]: #1" in proc.stdout and "frames/s" in proc.stdout
