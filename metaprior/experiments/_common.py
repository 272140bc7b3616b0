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


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% interval of the mean."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_ci95: values is empty")
    if values.size == 1:
        return float(values[0]), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


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


def save_datatree(tree, path: str | os.PathLike) -> Path:
    """Write an ArviZ/xarray DataTree to netCDF (HDF5 groups) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tree.to_netcdf(tmp, engine="h5netcdf")
    return path
