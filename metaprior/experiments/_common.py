"""Small helpers shared by the experiment modules (file writing, summary statistics)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def save_datatree(tree, path: str | os.PathLike) -> Path:
    """Write an ArviZ/xarray DataTree to netCDF atomically (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".nc", dir=path.parent)
    os.close(fd)
    try:
        tree.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
