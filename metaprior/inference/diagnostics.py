"""Diagnostics: calibration of classifiers, and any posterior of the library as ArviZ.

Two families live here because every experiment reports both:

- Calibration: :func:`expected_calibration_error`, :func:`reliability_curve` and
  :func:`plot_reliability` (equal-width confidence bins, Guo et al. 2017).
- ArviZ: :func:`to_datatree` and its front ends :func:`from_mcmc`, :func:`from_guide` and
  :func:`from_samples` turn MCMC draws, an SVI guide, a Laplace posterior or an amortized
  guide into one ``xarray.DataTree`` with ``posterior``, ``posterior_predictive``,
  ``observed_data`` and ``log_likelihood`` groups, whose dims are named after the model's
  plates (``tasks``, ``examples``), so ``az.summary``, ``az.plot_ppc_dist``, ``az.loo``
  and ``az.compare`` work on all of them. :func:`save_posterior` writes the file the
  experiments keep.

These functions run outside ``jit`` (they return Python floats, NumPy arrays and xarray
objects); the sampling they call is jitted inside NumPyro.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "expected_calibration_error",
    "reliability_curve",
    "plot_reliability",
]


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def _check_probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim < 2:
        raise ValueError(f"probs must have shape [N, K] (class probabilities), got {probs.shape}")
    if labels.shape != probs.shape[:-1]:
        raise ValueError(
            f"labels must have shape {probs.shape[:-1]} (probs without its class axis), "
            f"got {labels.shape}"
        )
    if probs.size == 0:
        raise ValueError("probs is empty")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    num_classes = probs.shape[-1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return probs.reshape(-1, num_classes), labels.reshape(-1)


def reliability_curve(probs, labels, num_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean confidence, accuracy and count in equal-width confidence bins.

    The confidence of a prediction is its top class probability; bin ``b`` holds the
    predictions with confidence in ``(b / num_bins, (b + 1) / num_bins]`` (the first bin
    also holds confidence 0).

    Args:
        probs: ``[N, K]`` predicted class probabilities (extra leading axes are flattened).
        labels: ``[N]`` true class indices.
        num_bins: number of equal-width bins on ``[0, 1]``.

    Returns:
        ``(bin_confidence, bin_accuracy, bin_count)``, each ``[num_bins]``; confidence and
        accuracy are NaN in empty bins, whose count is 0.

    References:
        Guo, Pleiss, Sun, Weinberger (2017), "On Calibration of Modern Neural Networks",
        Section 2 (reliability diagrams).
    """
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    probs, labels = _check_probs_labels(probs, labels)
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    # Right-closed bins (b/M, (b+1)/M]: ceil(c * M) - 1, with c = 0 sent to the first bin.
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins).astype(np.int64)
    sum_conf = np.bincount(index, weights=confidence, minlength=num_bins)
    sum_acc = np.bincount(index, weights=correct, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_confidence = np.where(count > 0, sum_conf / count, np.nan)
        bin_accuracy = np.where(count > 0, sum_acc / count, np.nan)
    return bin_confidence, bin_accuracy, count


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.

    Args:
        probs: ``[N, K]`` predicted class probabilities (extra leading axes are flattened).
        labels: ``[N]`` true class indices.
        num_bins: number of equal-width bins on ``[0, 1]`` (15 in Guo et al. and in the
            few-shot calibration literature).

    Returns:
        The ECE as a Python float in ``[0, 1]``.

    References:
        Guo, Pleiss, Sun, Weinberger (2017), "On Calibration of Modern Neural Networks",
        Eq. (3); Naeini, Cooper, Hauskrecht (2015).
    """
    conf, acc, count = reliability_curve(probs, labels, num_bins)
    filled = count > 0
    weights = count[filled] / count.sum()
    return float(np.sum(weights * np.abs(acc[filled] - conf[filled])))


def plot_reliability(curves: Mapping[str, tuple], ax=None):
    """Reliability diagram: accuracy against confidence per bin, one line per method.

    Args:
        curves: ``{label: (bin_confidence, bin_accuracy, bin_count)}`` as returned by
            :func:`reliability_curve`; empty bins are skipped.
        ax: a matplotlib axis (a new figure if ``None``).

    Returns:
        The axis.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for label, (conf, acc, count) in curves.items():
        conf, acc, count = map(np.asarray, (conf, acc, count))
        filled = count > 0
        total = count.sum()
        ece = float(np.sum(count[filled] / total * np.abs(acc[filled] - conf[filled])))
        ax.plot(conf[filled], acc[filled], marker="o", ms=3, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="small", loc="upper left")
    return ax
