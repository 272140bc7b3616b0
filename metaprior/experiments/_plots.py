"""The experiments' shared figures: meta-training curves and reliability diagrams."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metaprior.experiments._common import save_figure

__all__ = ["smooth", "training_figure", "reliability_figure"]


def smooth(values: Sequence[float], points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Moving average over ``len(values) // points`` steps: ``(step, value)`` arrays."""
    values = np.asarray(values, dtype=np.float64)
    w = max(1, len(values) // points)
    return np.arange(len(values) - w + 1) + w, np.convolve(values, np.ones(w) / w, mode="valid")


def training_figure(
    curves: Mapping[str, Sequence[float]],
    out_dir: str | os.PathLike,
    name: str = "training.png",
    *,
    ylabel: str = "meta-loss (moving average)",
    log: bool = False,
    title: str | None = None,
) -> Path:
    """One smoothed loss curve per entry of ``curves`` (``{label: losses}``), saved as ``name``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, losses in curves.items():
        if len(losses):
            ax.plot(*smooth(losses), lw=1, label=label)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize="small")
    return save_figure(fig, out_dir, name)


def reliability_figure(
    curves: Mapping[str, tuple], out_dir: str | os.PathLike, title: str, name: str = "reliability.png"
) -> Path:
    """A reliability diagram of ``{label: reliability_curve(...)}``, saved as ``name``."""
    import matplotlib.pyplot as plt

    from metaprior.inference.diagnostics import plot_reliability

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    plot_reliability(curves, ax=ax)
    ax.set_title(title)
    return save_figure(fig, out_dir, name)
