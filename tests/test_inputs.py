"""Hostile and broken inputs: image bombs, broken image files, malformed FER2013
CSVs and checkpoints with absurd metadata are skipped and counted, or refused
in one UserError line; never a traceback, never a huge allocation."""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fer_edge import UserError, models
from fer_edge.checkpoint import load_checkpoint, read_meta
from fer_edge.data import load_dataset, read_fer2013_csv, read_image_folder
from fer_edge.data.images import MAX_IMAGE_PIXELS, probe_header, read_face

_spec = importlib.util.spec_from_file_location("fer_test_helpers", Path(__file__).with_name("helpers.py"))
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

png_bomb = H.png_bomb
FER = H.DATA / "fer2013"
needs_data = pytest.mark.skipif(not FER.is_dir(), reason=f"real data not found under {H.DATA} (set FER_EDGE_DATA)")


def real_face() -> np.ndarray:
    import cv2

    path = sorted((FER / "publictest" / "happy").iterdir())[0]
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


# ------------------------------------------------------------------ images
@needs_data
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp", ".pgm"])
def test_header_probe_reads_the_size_of_every_accepted_format(ext, tmp_path):
    import cv2

    face = cv2.resize(real_face(), (61, 47))  # not square: width and height must not be swapped
    data = cv2.imencode(ext, face)[1].tobytes()
    kind, w, h, complete = probe_header(data)
    assert (w, h, complete) == (61, 47, True)
    (tmp_path / f"f{ext}").write_bytes(data)
    img, why = read_face(str(tmp_path / f"f{ext}"), 48)
    assert why is None and img.shape == (48, 48)
    if ext in (".png", ".bmp", ".tif", ".pgm"):  # lossless: the very pixels, resized as the contract says
        from fer_edge.contract import resize_face

        np.testing.assert_array_equal(img, resize_face(face, (48, 48)))


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(100_000, 100_000))
    assert bomb.stat().st_size < 50_000  # 10 gigapixels in a few kB
    assert probe_header(bomb.read_bytes())[1:3] == (100_000, 100_000)
    img, why = read_face(str(bomb), 48)
    assert img is None and why.startswith("too large:") and "100000 x 100000" in why
    # just over the limit is refused, a normal size decodes
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    (tmp_path / "over.png").write_bytes(png_bomb(side, side))
    assert read_face(str(tmp_path / "over.png"), 48)[1].startswith("too large:")
    (tmp_path / "small.png").write_bytes(png_bomb(64, 64))
    img, why = read_face(str(tmp_path / "small.png"), 48)
    assert why is None and img.shape == (48, 48) and not img.any()


@needs_data
def test_bad_files_in_a_real_folder_are_skipped_and_counted_by_reason(tmp_path):
    import cv2

    root = H.copy_subset(FER / "publictest", tmp_path / "d", per_class=4)
    good = real_face()
    png = cv2.imencode(".png", good)[1].tobytes()
    jpg = next((root / "sad").iterdir()).read_bytes()
    bad = {
        "angry/bomb.png": png_bomb(100_000, 100_000),
        "angry/bomb2.png": png_bomb(30_000, 30_000),
        "fear/cut-half.png": png[: len(png) // 2],
        "fear/cut-end.png": png[:-12],           # IEND lost: the pixels may all be there, the file is not
        "fear/cut-header.png": png[:20],
        "sad/cut.jpg": jpg[: len(jpg) // 2],
        "sad/empty.png": b"",
        "happy/text.jpg": b"hello, I am not a picture\n" * 10,
        "happy/html.png": b"<html><body>404 not found</body></html>",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    ds = read_image_folder(root)
    assert len(ds) == 28 and len(ds.skipped) == len(bad)
    assert ds.skip_counts() == {"too large": 2, "corrupt or truncated": 4, "empty file": 1, "not an image": 2}
    assert ds.skip_summary().startswith(f"{len(bad)} skipped (4 corrupt or truncated, ")
    reasons = {Path(src).name: why for src, why in ds.skipped}
    assert "100000 x 100000" in reasons["bomb.png"] and "ends early" in reasons["cut-end.png"]
    # the good faces are the real pixels
    ref = read_image_folder(H.copy_subset(FER / "publictest", tmp_path / "ref", per_class=4))
    np.testing.assert_array_equal(ds.images, ref.images)
    with pytest.raises(UserError, match=r"cannot read image .*bomb\.png: too large"):
        load_dataset(root, strict=True)


def test_a_folder_without_one_usable_image_is_one_error(tmp_path):
    (tmp_path / "d" / "happy").mkdir(parents=True)
    (tmp_path / "d" / "happy" / "a.png").write_bytes(png_bomb(100_000, 100_000))
    (tmp_path / "d" / "happy" / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the 2 images could be read \(first: .*a\.png: too large"):
        load_dataset(tmp_path / "d")


@needs_data
def test_cli_eval_skips_a_bomb_and_refuses_useless_data(tmp_path):
    import cv2

    from fer_edge.weights import default_weights

    def evaluate(data, *more):
        return H.run_cli("eval", "--weights", default_weights(), "--data", data, "--no-progress", *more)

    root = H.copy_subset(FER / "publictest", tmp_path / "d", per_class=3)
    (root / "happy" / "bomb.png").write_bytes(png_bomb(100_000, 100_000))
    proc = evaluate(root)
    assert proc.returncode == 0, proc.stderr
    assert "1 skipped (1 too large)" in proc.stdout + proc.stderr and "21 images" in proc.stdout
    H.one_line_error(evaluate(root, "--strict"), "bomb.png: too large")
    (tmp_path / "e" / "happy").mkdir(parents=True)
    (tmp_path / "e" / "happy" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    H.one_line_error(evaluate(tmp_path / "e"), "could be read")
    (tmp_path / "image.csv").write_bytes(cv2.imencode(".png", real_face())[1].tobytes())
    H.one_line_error(evaluate(tmp_path / "image.csv"), "not a FER2013 CSV")


# ------------------------------------------------------------------ FER2013 CSV
def face_row(label, img, usage="Training"):
    return f"{label},{' '.join(map(str, img.ravel()))},{usage}\n".encode()


@needs_data
def test_malformed_csv_rows_are_skipped_and_counted(tmp_path):
    ref = read_image_folder(H.copy_subset(FER / "publictest", tmp_path / "imgs", per_class=2))
    good = [face_row(int(lab), img) for img, lab in zip(ref.images, ref.labels)]
    pixels = " ".join(map(str, ref.images[0].ravel()))
    bad = [
        b"3," + pixels.encode() + b",Training\xe9\xff\n",           # not UTF-8
        b"3," + b"1 " * (5 << 20) + b",Training\n",                 # a 10 MB field
        b"3," + pixels.encode() + b"\n",                             # a column missing
        b"3," + pixels.encode() + b",Training,extra\n",              # one too many
        b"3,1 2 3,Training\n",                                       # 3 pixels
        b"3," + pixels.replace("1", "x", 1).encode() + b",Training\n",  # not a number
        b"3," + ("256 " + pixels.split(" ", 1)[1]).encode() + b",Training\n",  # out of 0..255
        b"9," + pixels.encode() + b",Training\n",                    # label out of range
        b"-1," + pixels.encode() + b",Training\n",
        b"happy," + pixels.encode() + b",Training\n",                # label not a number
        b"3," + ("9" * 5000 + " " + pixels.split(" ", 1)[1]).encode() + b",Training\n",  # huge number
        b'"3,' + pixels.encode() + b',Training\n',                   # unbalanced quote: one field
    ]
    body = [good[0], *bad[:6], *good[1:7], *bad[6:], *good[7:]]
    path = tmp_path / "fer2013.csv"
    path.write_bytes(b"emotion,pixels,Usage\n" + b"".join(body) + b"\n")
    ds = read_fer2013_csv(path)
    np.testing.assert_array_equal(ds.images, ref.images)
    np.testing.assert_array_equal(ds.labels, ref.labels)
    assert len(ds.skipped) == len(bad)
    counts = ds.skip_counts()
    assert counts["not UTF-8"] == 1 and counts["line too long"] == 1 and counts["wrong column count"] == 3
    assert counts["label out of range"] == 2 and counts["bad label"] == 1 and counts["wrong pixel count"] == 1
    assert counts["bad pixel values"] == 3
    assert ds.skipped[0][0] == f"{path}:3"
    with pytest.raises(UserError, match=r"fer2013\.csv:3: not UTF-8"):
        load_dataset(path, strict=True)


@needs_data
def test_csv_that_is_not_a_csv_is_one_error(tmp_path):
    import cv2

    cases = {
        "image.csv": cv2.imencode(".png", real_face())[1].tobytes(),
        "latin1.csv": "émotion,pixels,Usage\n".encode("latin-1"),
        "other.csv": b"name,age\nann,3\n",
        "huge-header.csv": b"emotion," + b"p" * (1 << 20) + b"\n",
        "utf16.csv": "emotion,pixels,Usage\n3,1 2,Training\n".encode("utf-16"),
        "empty.csv": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match="not a FER2013 CSV"):
            load_dataset(tmp_path / name)
    (tmp_path / "only-bad.csv").write_bytes(b"emotion,pixels,Usage\n3,1 2 3,Training\n")
    with pytest.raises(UserError, match=r"no usable rows with Usage Training \(1 malformed, first: .*:2: wrong pixel"):
        load_dataset(tmp_path / "only-bad.csv")


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def real_ckpt():
    """The embedded default model's tensors and metadata (a real trained checkpoint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from fer_edge.weights import default_weights

    path = default_weights()
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fer_edge"])
    return load_file(str(path)), meta


def write_ckpt(path, state, meta_text: str) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={"fer_edge": meta_text})
    return path


def with_change(meta: dict, where: tuple, value) -> dict:
    meta = json.loads(json.dumps(meta))
    d = meta
    for k in where[:-1]:
        d = d[k]
    if value is DELETE:
        d.pop(where[-1], None)
    else:
        d[where[-1]] = value
    return meta


DELETE = object()
ABSURD = [
    (("config", "width"), 1e6, "width"),
    (("config", "width"), float("nan"), "width"),
    (("config", "num_classes"), 10**9, "num_classes"),
    (("config", "in_chans"), 4096, "in_chans"),
    (("config", "maconv_stages"), list(range(10**5)), "maconv_stages"),
    (("config", "maconv_stages"), "abc", "maconv_stages"),
    (("config", "split"), [1e300, 1, 1], "split"),
    (("config", "dropout"), "half", "dropout"),
    (("config", "depth"), {"a": [[[]]]}, "depth"),
    (("config", "input_size"), 10**6, "input_size"),
    (("config",), [], "config"),
    (("config", "num_classes"), DELETE, "num_classes"),
    (("preprocess", "input_size"), [10**6, 10**6], "input_size"),
    (("preprocess", "input_size"), [48], "input_size"),
    (("preprocess", "std"), 0, "std"),
    (("preprocess", "mean"), "0.5", "mean"),
    (("preprocess", "temperature"), -1, "temperature"),
    (("preprocess",), DELETE, "preprocess"),
    (("classes",), ["a"] * 7, "classes"),
    (("classes",), ["angry"], "classes"),
    (("arch",), "resnet", "unknown architecture"),
    (("arch",), ["macnn"], "unknown architecture"),
    (("form",), "deploy", "form"),
    (("format",), "other", "format"),
    (("format_version",), 99, "format_version"),
    (("preprocess", "scale"), 10**400, "finite"),
    (("preprocess", "temperature"), 10**400, "temperature"),
    (("preprocess", "std"), 1e-320, "at least"),
    (("config", "width"), 10**400, "width"),
    (("config", "dropout"), -10**400, "dropout"),
]


@pytest.mark.parametrize("where, value, needle", ABSURD, ids=[f"{'.'.join(w)}={str(v)[:12]}" for w, v, _ in ABSURD])
def test_absurd_metadata_is_one_error_before_any_allocation(real_ckpt, tmp_path, where, value, needle):
    state, meta = real_ckpt
    path = write_ckpt(tmp_path / "m.safetensors", state, json.dumps(with_change(meta, where, value)))
    with pytest.raises(UserError, match=needle) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_broken_checkpoint_files_are_one_error(real_ckpt, tmp_path):
    from fer_edge.weights import default_weights

    state, meta = real_ckpt
    data = default_weights().read_bytes()
    cases = {
        "junk": b"\x00" * 100,
        "png": png_bomb(64, 64),
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "header-cut": data[:200],
        "terabyte-header": struct.pack("<Q", 1 << 40) + b'{"__metadata__": {}}',
        "length-past-end": struct.pack("<Q", 1000) + b"{}",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UserError, match="corrupt or truncated"):
            load_checkpoint(tmp_path / name)
    for name, text in {"deep": "[" * 100_000 + "]" * 100_000, "bignum": "1" * 10_000, "notjson": "{arch",
                       "list": "[1, 2]", "nan": '{"format": NaN}'}.items():
        with pytest.raises(UserError, match="JSON|format"):
            read_meta(write_ckpt(tmp_path / f"{name}.safetensors", state, text))
    # another shape: a width-0.5 model's tensors under the width-0.25 metadata
    other = models.create("macnn", width=0.5).state_dict()
    with pytest.raises(UserError, match="do not match .*of another shape"):
        load_checkpoint(write_ckpt(tmp_path / "shape.safetensors", other, json.dumps(meta)))
    # integer tensors where the model has floats
    ints = {k: (v.to(torch.int32) if k == "fc.weight" else v) for k, v in state.items()}
    with pytest.raises(UserError, match="fc.weight is torch.int32"):
        load_checkpoint(write_ckpt(tmp_path / "ints.safetensors", ints, json.dumps(meta)))


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.sampled_from([10**9, 10**6, 1e6, -1, 0, 3]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 10**7), st.floats(), st.text(max_size=3)), max_size=5),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3), st.just(DELETE),
)
PLACES = st.sampled_from([
    ("arch",), ("form",), ("classes",), ("config",), ("preprocess",), ("format_version",), ("extra",),
    ("config", "width"), ("config", "num_classes"), ("config", "in_chans"), ("config", "maconv_stages"),
    ("config", "split"), ("config", "dropout"), ("config", "input_size"), ("config", "fpn_dim"),
    ("config", "junk"), ("preprocess", "input_size"), ("preprocess", "scale"), ("preprocess", "std"),
    ("preprocess", "temperature"), ("preprocess", "layout"), ("classes", 0),
])


@settings(max_examples=40, deadline=None)
@given(changes=st.lists(st.tuples(PLACES, JUNK), min_size=1, max_size=3))
def test_mutated_metadata_loads_or_is_one_user_error(real_ckpt, tmp_path_factory, changes):
    state, meta = real_ckpt
    for where, value in changes:
        try:
            meta = with_change(meta, where, value)
        except (TypeError, KeyError, IndexError, AttributeError):
            pass  # the parent was replaced by a scalar by an earlier change: nothing to change
    path = write_ckpt(tmp_path_factory.mktemp("m") / "m.safetensors", state, json.dumps(meta))
    try:
        model, loaded = load_checkpoint(path)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    h, w = loaded["preprocess"]["input_size"]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, h, w)).shape == (1, len(loaded["classes"]))


def test_model_config_limits_refuse_before_building():
    for bad in (dict(width=1e6), dict(width=True), dict(num_classes=10**9), dict(maconv_stages=[7]),
                dict(split=[1, 1]), dict(dropout=float("inf"))):
        with pytest.raises(ValueError):
            models.create("macnn", **bad)
    with pytest.raises(ValueError, match="hsnet"):
        models.create("hsnet", width=0.5)
    with pytest.raises(ValueError, match="unexpected keyword"):
        models.create("macnn", fpn_dim=64)
    assert models.create("macnn", width=2.0, num_classes=1000).config["width"] == 2.0


def test_cli_refuses_absurd_checkpoint_metadata_in_one_line(real_ckpt, tmp_path):
    state, meta = real_ckpt
    path = write_ckpt(tmp_path / "wide.safetensors", state, json.dumps(with_change(meta, ("config", "width"), 1e6)))
    H.one_line_error(H.run_cli("merge", "--weights", path, "--out", tmp_path / "m.safetensors"), "width=1000000.0")
    assert not (tmp_path / "m.safetensors").exists()
