"""Calibrated confidence: the expected calibration error, the temperature and
vector-scaling fits against known answers, the temperature carried from the
checkpoint (`fer-edge calibrate`) into a bundle and applied by the camera
pipeline, and vector scaling folded into a checkpoint's last layer."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fer_edge.metrics import (
    cross_fitted_ece,
    cross_fitted_probs,
    expected_calibration_error,
    fit_temperature,
    fit_vector_scaling,
    nll,
    reliability_bins,
    softmax,
    vector_scale,
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


def test_vector_scaling_recovers_per_class_scales_that_one_temperature_cannot():
    """Labels drawn from softmax(z * s + b) with unequal s: the fit finds s and b
    (b up to the common offset softmax ignores); held out, it is better
    calibrated than one temperature on the same logits."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(30000, 5)) * 2.0
    s_true, b_true = np.array([0.3, 0.6, 1.0, 1.4, 0.5]), np.array([0.5, -0.3, 0.0, 0.2, -0.4])
    y = (softmax(vector_scale(z, s_true, b_true)).cumsum(axis=1) > rng.random((len(z), 1))).argmax(axis=1)
    s, b = fit_vector_scaling(z, y)
    np.testing.assert_allclose(s, s_true, atol=0.04)
    np.testing.assert_allclose(b - b.mean(), b_true - b_true.mean(), atol=0.07)  # sampling noise ~0.05
    vector, _ = cross_fitted_probs(z, y, method="vector")
    temperature, _ = cross_fitted_probs(z, y)
    assert expected_calibration_error(vector, y) < min(0.015, expected_calibration_error(temperature, y))
    assert nll(np.log(vector), y) < nll(np.log(temperature), y) - 0.02
    s0, b0 = fit_vector_scaling(np.zeros((0, 3)), np.zeros(0, int))
    assert s0.tolist() == [1, 1, 1] and b0.tolist() == [0, 0, 0]


@needs_data
def test_vector_scaling_folds_into_the_last_layer(tmp_path):
    """fer-edge calibrate --method vector writes a checkpoint whose logits are the
    input's, scaled and shifted per class as its metadata records (so every
    export of it is calibrated with no runtime change), with T = 1; a model
    without one logit layer is refused in one line before any face is read."""
    from fer_edge import models
    from fer_edge.checkpoint import read_meta, save_checkpoint, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import checkpoint_logits
    from helpers import copy_subset

    src = weights_or_default(None)
    data = copy_subset(FER / "publictest", tmp_path / "val", 30)
    out = tmp_path / "vec.safetensors"
    proc = run("calibrate", "--method", "vector", "--weights", src, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    meta = read_meta(out)
    cal = meta["calibration"]
    assert meta["preprocess"]["temperature"] == 1.0 and cal["method"] == "vector" and cal["faces"] == 210
    faces = load_dataset(data, size=48)
    before, labels, _ = checkpoint_logits(src, faces)
    after, _, _ = checkpoint_logits(out, faces)
    np.testing.assert_allclose(after, vector_scale(before, cal["scale"], cal["shift"]), atol=2e-4)
    assert nll(after, labels) < nll(before, labels, fit_temperature(before, labels))

    lite = tmp_path / "lite.safetensors"
    save_checkpoint(lite, models.create("hsnet-lite", width=0.25))
    one_line_error(run("calibrate", "--method", "vector", "--weights", lite, "--data", tmp_path / "missing",
                       "--out", tmp_path / "x.safetensors"), "use --method temperature")


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
def test_default_model_is_calibrated():
    """The embedded model carries vector scaling fitted on all of PublicTest
    (ECE 7.25% -> 2.58% there, docs/camera.md): on all 3,589 PublicTest faces
    its ECE and accuracy are its card's, a temperature fitted held out on top
    of it stays near 1, and its metadata and card record the scaling."""
    from fer_edge.checkpoint import read_meta, weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import checkpoint_logits
    from fer_edge.weights import default_card

    logits, labels, _ = checkpoint_logits(weights_or_default(None), load_dataset(FER / "publictest", size=48))
    ece = expected_calibration_error(softmax(logits), labels)
    again = cross_fitted_ece(logits, labels)
    meta, card = read_meta(weights_or_default(None)), default_card()
    assert ece == pytest.approx(card["publictest"]["ece"], abs=5e-4) and ece < 0.03, ece
    assert (logits.argmax(axis=1) == labels).mean() == pytest.approx(card["publictest"]["accuracy"], abs=5e-5)
    assert all(0.9 < t < 1.1 for t in again["temperatures"]), again
    assert meta["calibration"]["method"] == "vector" and meta["preprocess"]["temperature"] == 1.0
    assert card["calibration"]["scale"] == meta["calibration"]["scale"]
