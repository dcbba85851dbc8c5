"""Entropy calibration (converters/calibration.py): the pure threshold search
on histograms with known answers.  The end-to-end check (entropy ranges differ
from minmax on a real model and keep parity) is in test_converters.py."""
from __future__ import annotations

import numpy as np
import pytest

from fer_edge.converters.calibration import (
    entropy_range,
    fold_histogram,
    kl_threshold,
    quantize_expand,
)


def sym_hist(x: np.ndarray, bins: int = 2048):
    """What ONNX Runtime's histogram collector keeps: bins over [-t, t], t = max|x|."""
    t = float(np.abs(x).max())
    hist, edges = np.histogram(x, bins, range=(-t, t))
    return hist, edges


def test_fold_histogram_counts_both_signs():
    x = np.array([-3.0, -0.5, 0.5, 1.0, 2.9, 3.0])
    hist, edges = sym_hist(x, bins=6)  # bins of width 1 over [-3, 3]
    abs_hist, abs_edges = fold_histogram(hist, edges)
    np.testing.assert_array_equal(abs_edges, [0, 1, 2, 3])
    np.testing.assert_array_equal(abs_hist, [2, 1, 3])  # |x| in [0,1): ±0.5; [1,2): 1.0; [2,3]: 2.9, 3.0, -3.0
    assert abs_hist.sum() == x.size
    with pytest.raises(ValueError, match="even"):
        fold_histogram(hist[:5], edges[:6])


def test_quantize_expand_keeps_mass_and_support():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 50, size=1000).astype(float)
    p[::7] = 0
    for levels in (128, 256, 1000):
        q = quantize_expand(p, levels)
        assert q.sum() == pytest.approx(p.sum())
        np.testing.assert_array_equal(q > 0, p > 0)  # nothing spread onto empty bins
    np.testing.assert_allclose(quantize_expand(p, 1000), p)  # one code per bin: nothing lost
    flat = quantize_expand(np.ones(256), 128)
    np.testing.assert_allclose(flat, np.ones(256))  # a uniform histogram survives quantization


def test_threshold_clips_gaussian_tails_but_not_a_uniform_range():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(200_000)
    h, e = fold_histogram(*sym_hist(g))
    t = kl_threshold(h, e, 128)
    # int8 on a unit Gaussian: the MSE-optimal clip is ~4 sigma (Banner et al., ACIQ); entropy clips
    # near there, inside the sample's max (4.7 sigma here), never down at the bulk of the values
    assert 3.0 < t < 0.95 * np.abs(g).max(), t
    u = rng.uniform(-1, 1, 200_000)
    h, e = fold_histogram(*sym_hist(u))
    assert kl_threshold(h, e, 128) >= 0.97 * np.abs(u).max()  # clipping a flat range only loses information


def test_outliers_do_not_stretch_the_range():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(100_000), [40.0, -38.0]])  # two stray values 40 sigma out
    h, e = fold_histogram(*sym_hist(x))
    t = kl_threshold(h, e, 128)
    assert t < 8.0, t  # minmax would spend the int8 codes on [-40, 40]


def test_relu_zeros_do_not_pull_the_threshold_down():
    """A ReLU output is half zeros; they map onto code 0 whatever the scale.
    Adding more of them must leave the threshold where it is (before the fix
    they cut the default model's post-ReLU ranges 5x)."""
    rng = np.random.default_rng(2)
    pos = np.abs(rng.standard_normal(50_000)) * 3
    t = []
    for zeros in (0, 50_000, 500_000):
        x = np.concatenate([pos, np.zeros(zeros)])
        h, e = fold_histogram(*sym_hist(x))
        t.append(kl_threshold(h, e, 128))
    assert t[1] == pytest.approx(t[0], rel=0.02) and t[2] == pytest.approx(t[0], rel=0.02), t


def test_entropy_range_is_narrowed_to_the_observed_values():
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal(100_000), 0) * 2
    relu = np.concatenate([relu, [30.0]])
    h, e = sym_hist(relu)
    lo, hi = entropy_range(h, e, (relu.min(), relu.max()), 256)
    assert lo == 0.0  # a ReLU output starts at 0: asymmetric uint8 spends no codes below it
    assert 4.0 < hi < 30.0
