"""Small helpers shared by the experiment modules (file writing, summary statistics)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metaprior._io import atomic_path, atomic_write_bytes
from metaprior.inference.diagnostics import save_posterior as save_datatree
from metaprior.inference.evaluation import mean_ci95

__all__ = ["atomic_write_bytes", "write_metrics", "mean_ci95", "save_figure", "save_datatree"]


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
    """Write a flat ``{key: number | str}`` dict as JSON, atomically.

    Raises:
        TypeError: a value is nested (metrics.json keys are flat by contract).
    """
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, (dict, list, tuple)):
            raise TypeError(f"metrics[{key!r}] is a {type(value).__name__}; metrics.json is flat")
        if isinstance(value, (np.generic, np.ndarray)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # JSON has no NaN/inf; keep it visible rather than invalid
        flat[key] = value
    atomic_write_bytes(path, (json.dumps(flat, indent=2, sort_keys=True) + "\n").encode())


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> Path:
    """Save a matplotlib figure as ``out_dir/name`` (PNG, 120 dpi) atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(out_dir) / name
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
