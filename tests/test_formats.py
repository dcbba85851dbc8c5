"""The formats table drives export, runtime and bundle text: a target added in
a test alone (one row, one exporter, one backend) converts the embedded
default model through the real command, gives a verified bundle whose README
carries the row's device instructions, and its backend reproduces PyTorch's
logits.  The target here is real and small: the model's ONNX graph saved as
arrays in an .npz, run by a numpy interpreter of the ops MACNN uses."""
from __future__ import annotations

import io
import os
import json
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from helpers import FER_PUBLICTEST  # noqa: E402

from fer_edge.targets.backends import Backend  # noqa: E402


# ------------------------------------------------------------------ the numpy target
def export_npz(model, path, spec) -> None:
    """The ONNX exporter's graph, as nodes (JSON) and initializers (arrays) in one .npz."""
    import onnx
    from onnx import helper, numpy_helper

    from fer_edge.converters.exporters import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "m.onnx", spec)
        proto = onnx.load(str(Path(tmp) / "m.onnx"))
    nodes = [{"op": n.op_type, "in": list(n.input), "out": list(n.output),
              "attrs": {a.name: helper.get_attribute_value(a) for a in n.attribute}} for n in proto.graph.node]
    arrays = {f"w:{i.name}": numpy_helper.to_array(i) for i in proto.graph.initializer}
    graph = {"nodes": nodes, "input": proto.graph.input[0].name, "output": proto.graph.output[0].name}
    buf = io.BytesIO()
    np.savez(buf, graph=np.frombuffer(json.dumps(graph).encode(), np.uint8), **arrays)
    Path(path).write_bytes(buf.getvalue())


def conv(x, w, b, attrs):
    assert attrs.get("group", 1) == 1 and attrs.get("dilations", [1, 1]) == [1, 1]
    t, l, bt, r = attrs.get("pads", [0, 0, 0, 0])
    sh, sw = attrs.get("strides", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (t, bt), (l, r)))
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))[:, :, ::sh, ::sw]
    y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
    return y + (b[None, :, None, None] if b is not None else 0)


def max_pool(x, attrs):
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs["strides"]
    assert attrs.get("pads", [0, 0, 0, 0]) == [0, 0, 0, 0] and not attrs.get("ceil_mode", 0)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return win.max(axis=(-2, -1))


def run_node(op, args, attrs):
    if op == "Conv":
        return conv(args[0], args[1], args[2] if len(args) > 2 else None, attrs)
    if op == "Relu":
        return np.maximum(args[0], 0)
    if op == "Concat":
        return np.concatenate(args, axis=attrs["axis"])
    if op == "MaxPool":
        return max_pool(args[0], attrs)
    if op == "GlobalAveragePool":
        return args[0].mean(axis=(2, 3), keepdims=True)
    if op == "Flatten":
        return args[0].reshape(args[0].shape[0], -1)
    if op == "Gemm":
        a, b = args[0], args[1].T if attrs.get("transB") else args[1]
        return attrs.get("alpha", 1.0) * a @ b + attrs.get("beta", 1.0) * (args[2] if len(args) > 2 else 0)
    raise NotImplementedError(op)


class NumpyBackend(Backend):
    """Runs the .npz graph in float64 numpy (any batch)."""

    name = "numpy"

    def __init__(self, path, threads=None):
        with np.load(path) as z:
            self.graph = json.loads(z["graph"].tobytes())
            self.weights = {k[2:]: z[k].astype(np.float64) for k in z.files if k.startswith("w:")}

    def run_batch(self, x):
        env = dict(self.weights, **{self.graph["input"]: np.asarray(x, np.float64)})
        for n in self.graph["nodes"]:
            (env[n["out"][0]],) = [run_node(n["op"], [env[i] for i in n["in"] if i], n["attrs"])]
        return env[self.graph["output"]].astype(np.float32)


@pytest.fixture
def numpy_target():
    """Registers the row and the backend for this test only; both tables come back as they were."""
    from fer_edge.converters import formats
    from fer_edge.converters.guides import DeviceGuide
    from fer_edge.targets import backends

    fmt = formats.Format(
        "numpy", "fp32", "model.npz", export_npz, "numpy", "the ONNX graph as arrays, run by numpy",
        DeviceGuide(("pip install numpy",), lambda f, pre, classes: [
            "## Anywhere numpy runs", "", "```bash", f"python3 run_graph.py {f.file} face.png", "```", ""]),
        tools=("numpy",))
    rows, runtimes = list(formats.FORMATS), dict(backends.BACKENDS)
    formats.register_format(fmt)
    backends.register_backend("numpy", NumpyBackend, ("numpy",))
    try:
        yield fmt
    finally:
        formats.FORMATS[:] = rows
        backends.BACKENDS.clear()
        backends.BACKENDS.update(runtimes)
    assert "numpy/fp32" not in formats.keys() and "numpy" not in backends.runtime_names()


def real_faces(n=30):
    """Real FER2013 faces when the data is here, seeded noise otherwise."""
    if FER_PUBLICTEST.is_dir():
        from fer_edge.data import read_image_folder

        return read_image_folder(FER_PUBLICTEST).images[::97][:n]
    return np.random.default_rng(0).integers(0, 256, (n, 48, 48), dtype=np.uint8)


def test_a_target_added_in_one_row_converts_and_runs(numpy_target, tmp_path, capsys):
    import torch

    from fer_edge.checkpoint import load_checkpoint
    from fer_edge.cli import main
    from fer_edge.info import runtime_modules
    from fer_edge.targets import load_bundle, open_backend, preprocess_faces
    from fer_edge.weights import default_weights

    assert main(["convert", "--list"]) == 0
    assert "model.npz" in capsys.readouterr().out
    out = tmp_path / "bundle"
    # The real command, its choices built from the table: the new target is accepted like the others.
    assert main(["convert", "--target", "numpy", "--out", str(out), "--no-progress"]) == 0
    b = load_bundle(out)  # every file hashed, parity passed (fp32: |Δlogit| <= 1e-4, 100% agreement)
    (a,) = b.artifacts
    assert (a.target, a.precision, a.runtime, a.file) == ("numpy", "fp32", "numpy", "model.npz")
    readme = (out / "README.md").read_text()
    assert "## Anywhere numpy runs" in readme and "python3 run_graph.py model.npz" in readme
    assert "numpy" in runtime_modules()
    faces = real_faces()
    got = open_backend(a.path, a.runtime).run(preprocess_faces(faces, b.preprocess))
    model, meta = load_checkpoint(default_weights())
    with torch.no_grad():
        ref = model(torch.from_numpy(faces).float().div(255).sub(0.5).div(0.5).unsqueeze(1)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_every_row_names_callables_and_known_runtimes():
    from fer_edge.converters.formats import FORMATS, THRESHOLDS
    from fer_edge.targets.backends import BACKENDS
    from fer_edge.targets.bundle import RUNTIMES

    assert set(RUNTIMES) == set(BACKENDS)
    for f in FORMATS:
        assert callable(f.exporter) and f.runtime in BACKENDS and f.thresholds is THRESHOLDS[f.precision]
        assert f.device.install and callable(f.device.run)
    jetson = next(f for f in FORMATS if f.target == "jetson")
    android = next(f for f in FORMATS if f.target == "android")
    assert any("cuda-python" in x for x in jetson.device.install)
    assert not any("cuda-python" in x for x in android.device.install)
    assert 'FER_EDGE_KERNELS=0 pip install "./fer-edge[runtime-tflite]"' in android.device.install


# ------------------------------------------------------------------ hostile options: one line, exit 2, nothing written
def _hostile_cases(tmp: Path, weights: str):
    blocker = tmp / "a-file"
    mine = tmp / "mine.safetensors"  # a copy of the weights, as a user's own checkpoint
    w = ["--weights", weights]
    return [
        (["convert", *w, "--target", "onnx", "--calib-size", "0", "--out", tmp / "o"], "--calib-size"),
        (["convert", *w, "--target", "onnx", "--calib-size", "lots", "--out", tmp / "o"], "not a whole number"),
        (["convert", *w, "--target", "onnx", "--parity-size", "-1", "--out", tmp / "o"], "--parity-size"),
        (["convert", *w, "--target", "onnx", "--precision", "fp64", "--out", tmp / "o"], "invalid choice"),
        (["convert", *w, "--target", "onnx", "--out", blocker / "o"], "is a file, not a folder"),
        (["convert", *w, "--target", "onnx", "--out", blocker, "--force"], "not a fer-edge bundle"),
        (["convert", *w, "--target", "onnx", "--sign", tmp / "no.key", "--out", tmp / "o"], "no.key"),
        (["convert", "--weights", tmp / "none.safetensors", "--target", "onnx", "--out", tmp / "o"],
         "no such checkpoint"),
        (["parity", "--bundle", tmp, "--data", tmp, "--limit", "0"], "--limit"),
        (["parity", "--bundle", tmp, "--data", tmp, "--threads", "-2"], "--threads"),
        (["parity", "--bundle", tmp, "--data", tmp, "--json", blocker / "r.json"], "is a file, not a folder"),
        (["parity", "--bundle", tmp, "--data", tmp], "no manifest.json"),
        (["benchmark", *w, "--data", tmp, "--runs", "0"], "--runs"),
        (["benchmark", *w, "--data", tmp, "--formats", "onnx/fp64"], "unknown format"),
        (["benchmark", *w, "--data", tmp, "--formats", ","], "unknown format"),
        (["benchmark", *w, "--data", tmp, "--json", blocker / "b.json"], "is a file, not a folder"),
        (["keygen", "--out", blocker / "k"], "is a file, not a folder"),
        (["merge", "--weights", weights, "--out", tmp / "m.safetensors", "--samples", "0"], "--samples"),
        (["merge", "--weights", weights, "--out", tmp / "m.safetensors", "--tolerance", "0"], "--tolerance"),
        (["merge", "--weights", weights, "--out", tmp / "m.safetensors", "--tolerance", "inf"], "finite"),
        (["merge", "--weights", weights, "--out", blocker / "m.safetensors"], "is a file, not a folder"),
        # an output that would overwrite an input, or land inside an input folder
        (["merge", "--weights", mine, "--out", mine, "--force"], "which this command reads"),
        (["benchmark", "--weights", mine, "--data", tmp, "--json", mine, "--force"], "which this command reads"),
        (["parity", "--bundle", tmp / "b", "--data", tmp, "--report-only", "--json", tmp / "b" / "manifest.json",
          "--force"], "lies inside --bundle"),
        (["teacher-logits", "--weights", mine, "--data", tmp, "--out", mine, "--force"], "which this command reads"),
        (["eval", "--weights", mine, "--data", mine, "--json", mine, "--force"], "is --weights"),
        (["calibrate", "--weights", mine, "--data", tmp, "--out", tmp / "c.safetensors"], "lies inside --data"),
        (["merge", "--weights", Path(__file__).parent, "--out", tmp / "m.safetensors"], "a folder, not a checkpoint file"),
        (["merge", "--weights", "/dev/null", "--out", tmp / "m.safetensors"], "not a regular file"),
        (["train", "--data", tmp, "--out", tmp / "run", "--epochs", "1"], "lies inside --data"),
        (["eval", "--weights", mine, "--data", tmp / "nowhere", "--json", tmp / "e.json", "--plots", tmp / "e.json"],
         "are one path"),
        (["eval", "--weights", mine, "--data", tmp / "nowhere", "--json", tmp / "p" / "e.json", "--plots", tmp / "p"],
         "overlap"),
    ]


def test_hostile_options_are_one_line_before_any_work(tmp_path):
    from fer_edge.weights import default_weights
    from helpers import one_line_error, run_cli

    (tmp_path / "a-file").write_text("not a folder")
    shutil.copy(default_weights(), tmp_path / "mine.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, expect in _hostile_cases(tmp_path, str(default_weights())):
        proc = run_cli(*args, timeout=120)
        one_line_error(proc, expect)
        assert proc.returncode == 2, (args, proc.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args  # nothing written, no temp left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_the_export(tmp_path):
    from fer_edge.weights import default_weights
    from helpers import one_line_error, run_cli

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for args in (["convert", "--weights", default_weights(), "--target", "onnx", "--out", ro / "b"],
                     ["keygen", "--out", ro / "k"]):
            one_line_error(run_cli(*args, timeout=120), "cannot write into")
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_benchmark_with_every_face_used_for_calibration_is_one_line(tmp_path):
    """Without --calib the int8 formats calibrate on --data; when that takes
    every face, nothing is left to score: one line, before any conversion.
    Formats with no int8 among them set no face aside: all of them are scored."""
    from fer_edge.weights import default_weights
    from helpers import FER_PUBLICTEST, copy_subset, one_line_error, run_cli

    if not FER_PUBLICTEST.is_dir():
        pytest.skip(f"real data not found at {FER_PUBLICTEST}")
    data = copy_subset(FER_PUBLICTEST, tmp_path / "few", 3)
    proc = run_cli("benchmark", "--weights", default_weights(), "--data", data, "--formats", "onnx/int8",
                   "--runs", "1", "--no-progress", timeout=300)
    one_line_error(proc, "no faces of")
    proc = run_cli("benchmark", "--weights", default_weights(), "--data", data, "--formats", "onnx/fp32",
                   "--runs", "1", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "21 faces from" in proc.stdout and "(0 calibration faces left out" in proc.stdout, proc.stdout
