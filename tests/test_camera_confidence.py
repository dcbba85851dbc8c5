"""Calibrated confidence: the expected calibration error and the temperature
fit against known answers, and the temperature carried from the checkpoint
(`fer-edge calibrate`) into a bundle and applied by the camera pipeline."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fer_edge.metrics import (
    cross_fitted_ece,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    softmax,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import one_line_error  # noqa: E402
from helpers import run_cli as run  # noqa: E402
from test_camera import FER, needs_data, skimage_bgr  # noqa: E402


def test_ece_of_a_known_example():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])   # bin (0.867, 0.933]: 1 of 2 right at 0.9; bin (0.533, 0.6]: 2 of 2 at 0.6
    assert expected_calibration_error(probs, y, 15) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    r = reliability_bins(probs, y, 15)
    assert r["count"].sum() == 4 and r["count"][13] == 2 and r["count"][8] == 2


def test_temperature_fit_recovers_an_overconfident_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 7)) * 2.0
    y = (softmax(z).cumsum(axis=1) > rng.random((len(z), 1))).argmax(axis=1)   # labels drawn from softmax(z)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(3.0 * z, y, t) <= min(nll(3.0 * z, y, t * 1.05), nll(3.0 * z, y, t / 1.05))
    before = expected_calibration_error(softmax(3.0 * z), y)
    after = cross_fitted_ece(3.0 * z, y)
    assert before > 0.15 and after["ece"] < 0.02
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


@needs_data
def test_temperature_travels_from_checkpoint_to_pipeline(tmp_path):
    """fer-edge calibrate stores T in the checkpoint's metadata (weights unchanged);
    the bundle's preprocess is the checkpoint's plus its input format, so T
    reaches preprocess.json; the pipeline divides the logits by it."""
    import torch
    from safetensors.torch import load_file

    from fer_edge.checkpoint import read_meta, weights_or_default
    from fer_edge.predict import TorchBackend
    from fer_edge.targets.bundle import artifact_preprocess, preprocess_faces
    from fer_edge.targets.pipeline import Pipeline
    from helpers import copy_subset

    src = weights_or_default(None)
    data = copy_subset(FER / "publictest", tmp_path / "val", 30)
    out = tmp_path / "cal.safetensors"
    proc = run("calibrate", "--weights", src, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    t = read_meta(out)["preprocess"]["temperature"]
    assert 0.5 < t < 3.0 and f"T = {t:.4f}" in proc.stdout
    a, b = load_file(str(src)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_line_error(run("calibrate", "--weights", src, "--data", data, "--out", out), "exists")
    assert artifact_preprocess(read_meta(out)["preprocess"])["temperature"] == t

    backend = TorchBackend(out)
    assert backend.preprocess["temperature"] == t
    frame = skimage_bgr("astronaut")
    (face,) = Pipeline(backend, backend.meta["classes"], backend.preprocess)(frame)
    pipe = Pipeline(backend, backend.meta["classes"], backend.preprocess, temperature=1.0)
    (raw,) = pipe(frame)
    det = pipe.detector.detect(frame)
    logits = backend.run(preprocess_faces(pipe.crops(pipe_gray(frame), det), backend.preprocess))
    np.testing.assert_allclose(list(face.probs.values()), softmax(logits, t)[0], atol=1e-5)
    np.testing.assert_allclose(list(raw.probs.values()), softmax(logits, 1.0)[0], atol=1e-5)
    assert face.confidence < raw.confidence            # T > 1 softens an overconfident model


def pipe_gray(frame):
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


@needs_data
def test_default_model_ece_improves_with_a_held_out_temperature():
    """The embedded model on 1,256 PublicTest faces: the ECE of the raw softmax
    (7.3% on all of PublicTest) falls when each half is scaled by the T fitted
    on the other half (4.8%); the full-set numbers are in docs/camera.md."""
    from fer_edge.checkpoint import weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import checkpoint_logits
    import tempfile

    from helpers import copy_subset

    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset(copy_subset(FER / "publictest", Path(tmp) / "pt", 200), size=48)
        logits, labels, _ = checkpoint_logits(weights_or_default(None), data)
    before = expected_calibration_error(softmax(logits), labels)
    after = cross_fitted_ece(logits, labels)
    assert before > 0.04 and after["ece"] < before - 0.01, (before, after)
    assert all(1.0 < t < 1.5 for t in after["temperatures"]), after
