"""The on-device pipeline: real photographs and real FER2013 faces through face
detection, every runtime available here, tracking and the `fer-edge predict`
command; refusals of bad bundles and sources."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    one_line_error(run("predict", img, "--bundle", src, "--detector", "yunet", "--yunet-model", tmp_path / "yunet.onnx"),
                   "not found")


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


# ------------------------------------------------------------------ hostile bundles: BundleError, never a crash
@pytest.fixture(scope="module")
def noise_bundle(tmp_path_factory):
    """The embedded default model as an ONNX fp32 bundle checked on seeded noise (no data needed)."""
    from fer_edge.converters.pipeline import convert
    from fer_edge.weights import default_weights

    out = tmp_path_factory.mktemp("hostile") / "bundle"
    assert convert(default_weights(), "onnx", "fp32", out, log=lambda *a: None)["passed"]
    return out


def rehash(bundle: Path, name: str) -> None:
    """What an attacker with write access does after editing a file: fix its manifest entry."""
    from fer_edge.fileio import sha256_file

    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": (bundle / name).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


JSON_FILES = ("manifest.json", "preprocess.json", "labels.json", "parity.json")
junk = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.sampled_from([10**400, -10**400, 1e-320, 2.0])
                    | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                    | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)


def json_paths(doc, prefix=()):
    """Every (key path) inside a JSON document, the root included."""
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield from json_paths(v, prefix + (k,))


def mutated(doc, path, action, value):
    if not path:
        return value if action != "stringify" else json.dumps(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if action == "delete":
        del parent[path[-1]]
    elif action == "stringify":  # numbers as strings, lists as text, ...
        parent[path[-1]] = json.dumps(parent[path[-1]])
    else:
        parent[path[-1]] = value
    return doc


def loads_or_refuses(bundle: Path) -> None:
    """load_bundle, open_backend and a run end in success or in one BundleError line."""
    from fer_edge.targets import BundleError, load_bundle, open_backend, preprocess_faces

    try:
        b = load_bundle(bundle)
        a = b.artifact()
        face = np.full((1, *b.preprocess["input_size"]), 128, np.uint8)
        logits = open_backend(a.path, a.runtime).run(preprocess_faces(face, b.preprocess))
        assert logits.shape == (1, len(b.labels))
    except BundleError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_json_gives_bundle_error_or_a_working_bundle(noise_bundle, data):
    name = data.draw(st.sampled_from(JSON_FILES), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        b = Path(tmp) / "b"
        shutil.copytree(noise_bundle, b)
        doc = json.loads((b / name).read_text())
        path = data.draw(st.sampled_from(list(json_paths(doc))), label="path")
        action = data.draw(st.sampled_from(["replace", "delete", "stringify"]) if path else
                           st.sampled_from(["replace", "stringify"]), label="action")
        (b / name).write_text(json.dumps(mutated(doc, path, action, data.draw(junk, label="value"))))
        if name != "manifest.json":
            rehash(b, name)
        loads_or_refuses(b)


@pytest.mark.parametrize("name", JSON_FILES)
@pytest.mark.parametrize("content", [b"\xff\xfe{\x00", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b'"text"',
                                     b"{" + b'"k": 1, ' * 1_500_000 + b'"z": 2}'],
                         ids=["not-utf8", "deeply-nested", "a-list", "a-string", "huge"])
def test_unreadable_json_is_one_bundle_error(noise_bundle, tmp_path, name, content):
    from fer_edge.targets import BundleError, load_bundle

    b = tmp_path / "b"
    shutil.copytree(noise_bundle, b)
    (b / name).write_bytes(content)
    if name != "manifest.json":
        rehash(b, name)
    with pytest.raises(BundleError) as err:
        load_bundle(b)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "another-model"])
def test_corrupt_model_rehashed_into_the_manifest_is_a_bundle_error(noise_bundle, tmp_path, damage):
    """The hashes match (whoever damaged it re-hashed it): the runtime's own
    failure to load or run it comes out as one BundleError line."""
    from fer_edge.targets import BundleError, load_bundle, open_backend, preprocess_faces

    b = tmp_path / "b"
    shutil.copytree(noise_bundle, b)
    model = (b / "model.onnx").read_bytes()
    (b / "model.onnx").write_bytes({"truncated": model[: len(model) // 2], "garbage": os.urandom(4096),
                                    "empty": b"", "another-model": _tiny_onnx(5, 5)}[damage])
    rehash(b, "model.onnx")
    bundle = load_bundle(b)  # the manifest cannot tell
    with pytest.raises(BundleError) as err:
        backend = open_backend(bundle.artifacts[0].path, "onnxruntime")
        backend.run(preprocess_faces(np.zeros((1, 48, 48), np.uint8), bundle.preprocess))
    assert "\n" not in str(err.value)
    one_line_error(run("parity", "--bundle", b, "--data", labelled_noise(tmp_path, bundle.labels), "--report-only",
                       "--no-progress"), "model.onnx")


def labelled_noise(tmp_path: Path, classes: list[str]) -> Path:
    """Class folders of seeded noise images (labelled faces for a command that only needs to read some)."""
    import cv2

    rng = np.random.default_rng(0)
    for c in classes:
        (tmp_path / "faces" / c).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "faces" / c / "0.png"), rng.integers(0, 256, (48, 48), dtype=np.uint8))
    return tmp_path / "faces"


def _tiny_onnx(h: int, w: int) -> bytes:
    """A valid ONNX model of another input shape than the bundle's."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, h, w])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, h, w])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_open_backend_refuses_unknown_runtimes_and_missing_files(noise_bundle, tmp_path):
    from fer_edge.targets import BundleError, open_backend

    for runtime in ("coreml", ["onnxruntime"], None):
        with pytest.raises(BundleError, match="unknown runtime"):
            open_backend(noise_bundle / "model.onnx", runtime)
    with pytest.raises(BundleError, match="no such artifact"):
        open_backend(tmp_path / "none.onnx", "onnxruntime")


def _edit(doc: dict, path: tuple, value):
    target = doc
    for k in path[:-1]:
        target = target[k]
    if callable(value):
        target[path[-1]] = value(target[path[-1]])
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize("name, path, value, needle", [
    ("preprocess.json", ("mean",), 10**400, "finite"),
    ("preprocess.json", ("std",), 1e-320, "at least"),
    ("preprocess.json", ("scale",), 1e-9, "at least"),
    ("preprocess.json", ("mean",), 1e9, "at most"),
    ("manifest.json", ("format_version",), 2.0, "format version"),
    ("labels.json", ("classes",), lambda c: ["an\ngry"] + c[1:], "printable"),
    ("labels.json", ("classes",), lambda c: ["x" * 65] + c[1:], "printable"),
    ("labels.json", ("classes",), lambda c: [c[1]] + c[1:], "twice"),
    ("parity.json", ("artifacts",), lambda a: a + a, "two results"),
    ("preprocess.json", ("temperature",), -1, "temperature"),
    ("preprocess.json", ("temperature",), "warm", "temperature"),
    ("preprocess.json", ("temperature",), float("nan"), "temperature"),
], ids=["huge-int", "tiny-std", "tiny-scale", "huge-mean", "float-version", "newline-label", "long-label",
        "duplicate-label", "duplicate-parity", "negative-temperature", "text-temperature", "nan-temperature"])
def test_values_no_device_should_run_are_bundle_errors(noise_bundle, tmp_path, name, path, value, needle):
    """Well-typed but absurd: numbers that overflow or turn every pixel into
    infinity, a version written as a float, class names that break a line or
    repeat, an artifact judged twice.  Each is one BundleError line."""
    from fer_edge.targets import BundleError, load_bundle

    b = tmp_path / "b"
    shutil.copytree(noise_bundle, b)
    (b / name).write_text(json.dumps(_edit(json.loads((b / name).read_text()), path, value)))
    if name != "manifest.json":
        rehash(b, name)
    with pytest.raises(BundleError, match=needle) as err:
        load_bundle(b)
    assert "\n" not in str(err.value)


def test_paths_the_os_refuses_are_bundle_errors(tmp_path):
    from fer_edge.targets import BundleError, load_bundle, open_backend

    long = tmp_path / ("x" * 300)
    with pytest.raises(BundleError):
        load_bundle(long)
    with pytest.raises(BundleError):
        open_backend(long / "model.onnx", "onnxruntime")
