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


def test_vector_scaling_stays_finite_on_degenerate_logits():
    """Logits a float32 model can give (equal rows near its largest value: a
    singular Newton system), a single face, one class, K = 1: finite scales and
    probabilities that sum to 1, the same on every call, never a worse NLL than
    the temperature they start from; logits that are not finite are refused."""
    row = np.array([-1e20, -1e20, 3.4e38, 1.0, 0.0, 3.4e38, 0.0], np.float32)
    cases = [(np.tile(row, (35, 1)), np.repeat(np.arange(7), 5)),       # np.linalg.solve: singular matrix
             (np.array([[1e20, 1e20]]), np.array([0])),
             (np.array([[3.0, -1.0, 0.5]] * 2), np.array([1, 1])),
             (np.random.default_rng(2).normal(size=(3, 7)), np.array([0, 0, 0])),
             (np.ones((4, 1)), np.zeros(4, int))]
    for z, y in cases:
        s, b = fit_vector_scaling(z, y)
        assert np.isfinite(s).all() and np.isfinite(b).all(), (z, s, b)
        again = fit_vector_scaling(z, y)
        assert s.tolist() == again[0].tolist() and b.tolist() == again[1].tolist()
        assert nll(vector_scale(z, s, b), y) <= nll(z, y, fit_temperature(z, y)) + 1e-9
        probs, _ = cross_fitted_probs(z, y, method="vector")
        assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0)
    s, b = fit_vector_scaling(np.tile(row, (35, 1)), np.repeat(np.arange(7), 5))
    assert s.tolist() == pytest.approx([0.05] * 7, abs=1e-3)   # stopped at 1/T (T at its bound, 20)
    for bad in (np.nan, np.inf, -np.inf):
        z = np.zeros((4, 3))
        z[2, 1] = bad
        with pytest.raises(ValueError, match="not finite"):
            fit_vector_scaling(z, np.arange(4) % 3)


def test_calibration_report_refuses_logits_that_are_not_finite():
    """eval on a model whose logits overflow: one UserError, not NaN percentages;
    three faces (one in a half) still give finite numbers."""
    from fer_edge import UserError
    from fer_edge.evaluate import calibration_report, format_report

    z = np.random.default_rng(3).normal(size=(6, 7)).astype(np.float32)
    z[4, 2] = np.inf
    with pytest.raises(UserError, match="logits of 1 of 6 faces are not finite"):
        calibration_report(z, np.arange(6))
    report, curves = calibration_report(z[:3], np.array([0, 1, 0]))
    assert 0 <= report["cross_fitted_vector"]["ece"] <= 1
    assert report["cross_fitted_vector"]["accuracy"] in (0, 1 / 3, 2 / 3, 1)
    assert np.isfinite([report["ece"], report["nll"], report["cross_fitted"]["ece"],
                        *report["cross_fitted"]["temperatures"]]).all()
    text = format_report({"images": 3, "arch": "macnn", "form": "train", "accuracy": 1.0, "mean_class_accuracy": 1.0,
                          "macro_f1": 1.0, "macro_auc": None, "per_class": {}, "calibration": report})
    assert "nan" not in text and "with vector scaling" in text


@needs_data
def test_calibrate_vector_refuses_what_it_cannot_fit(tmp_path):
    """One line each: a class with no faces (its shift would remove it), a model
    whose logits overflow (calibrate and eval), scales that overflow the
    layer's float32 weights (nothing written); logits that only make Newton's
    system singular are calibrated."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fer_edge import UserError
    from fer_edge.checkpoint import weights_or_default
    from fer_edge.data import load_dataset
    from fer_edge.evaluate import checkpoint_logits, set_checkpoint_vector_scaling
    from helpers import copy_subset

    src = weights_or_default(None)
    data = copy_subset(FER / "publictest", tmp_path / "val", 2)
    no_disgust = copy_subset(FER / "publictest", tmp_path / "nd", 2,
                             classes=["angry", "fear", "happy", "neutral", "sad", "surprise"])
    one_line_error(run("calibrate", "--method", "vector", "--data", no_disgust, "--out", tmp_path / "a.safetensors",
                       "--no-progress"), "no faces of disgust")
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    state = load_file(str(src))

    def variant(name, weight, bias):
        save_file(dict(state, **{"fc.weight": weight, "fc.bias": bias}), str(tmp_path / name), metadata=header)
        return tmp_path / name

    over = variant("over.safetensors", torch.full_like(state["fc.weight"], 3e38), state["fc.bias"])
    for cmd in (("calibrate", "--method", "vector", "--out", tmp_path / "b.safetensors"), ("eval",)):
        one_line_error(run(*cmd, "--weights", over, "--data", data, "--no-progress"),
                       "logits of 14 of 14 faces are not finite")
    assert not (tmp_path / "b.safetensors").exists()

    flat = variant("flat.safetensors", torch.zeros_like(state["fc.weight"]),
                   torch.tensor([-1e20, -1e20, 3.4e38, 1.0, 0.0, 3.4e38, 0.0]))
    proc = run("calibrate", "--method", "vector", "--weights", flat, "--data", data,
               "--out", tmp_path / "c.safetensors", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    logits, _, _ = checkpoint_logits(tmp_path / "c.safetensors", load_dataset(data, size=48))
    assert np.isfinite(logits).all() and logits.max() == pytest.approx(0.05 * 3.4e38, rel=1e-3)
    with pytest.raises(UserError, match="overflows its float32 weights"):
        set_checkpoint_vector_scaling(flat, np.full(7, 20.0), np.zeros(7), tmp_path / "d.safetensors", {})
    assert not (tmp_path / "d.safetensors").exists()


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
    assert cal["previous"] == read_meta(src)["calibration"]   # the default model's own scaling, folded before

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
