"""Calibration metrics and the ArviZ conversion of every kind of posterior."""

from __future__ import annotations

import numpy as np
import pytest

from metaprior.inference.diagnostics import (
    expected_calibration_error,
    plot_reliability,
    reliability_curve,
)


# ------------------------------------------------------------------------ calibration


def test_ece_hand_computed():
    # Four predictions in two bins of 15: confidences 0.9, 0.9 (bin 13) and 0.6, 0.6 (bin 8).
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 0])  # right, wrong, right, wrong
    # bin 13: conf 0.9, acc 0.5 -> |0.4| * 2/4; bin 8: conf 0.6, acc 0.5 -> |0.1| * 2/4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    conf, acc, count = reliability_curve(probs, labels)
    assert count.sum() == 4 and count[13] == 2 and count[8] == 2
    assert conf[13] == pytest.approx(0.9) and acc[13] == pytest.approx(0.5)
    assert np.isnan(conf[0]) and np.isnan(acc[0])


def test_ece_zero_for_calibrated_predictions():
    # Labels drawn from the predicted distribution: ECE -> 0 as N grows. With 200k
    # draws and 15 bins the sampling error of each bin's accuracy is ~1e-3.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200_000, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = (rng.random((200_000, 1)) > probs.cumsum(-1)).sum(-1)
    assert expected_calibration_error(probs, labels) < 0.005


def test_ece_one_hot_wrong_is_one():
    probs = np.eye(4)[[0, 1, 2, 3]]
    assert expected_calibration_error(probs, np.array([1, 2, 3, 0])) == pytest.approx(1.0)
    assert expected_calibration_error(probs, np.array([0, 1, 2, 3])) == pytest.approx(0.0)


def test_bin_edges_are_right_closed():
    # Confidence exactly 0.6 with 5 bins lies in (0.4, 0.6], bin 2.
    probs = np.array([[0.6, 0.4]])
    _, _, count = reliability_curve(probs, np.array([0]), num_bins=5)
    assert count.tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.ones(3) / 3, np.array([0]), "probs must have shape"),
        (np.ones((2, 3)) / 3, np.array([0, 1, 2]), "labels must have shape"),
        (np.ones((2, 3)) / 3, np.array([0, 3]), "labels must lie in"),
        (np.full((2, 3), np.nan), np.array([0, 1]), "NaN"),
        (np.ones((2, 3)) / 3, np.array([0.0, 1.0]), "integer"),
    ],
)
def test_calibration_input_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, labels)


def test_plot_reliability_draws_one_line_per_method():
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=500)
    labels = rng.integers(0, 5, size=500)
    ax = plot_reliability({"a": reliability_curve(probs, labels), "b": reliability_curve(probs, labels, 10)})
    assert len(ax.get_lines()) == 3  # diagonal + two methods
