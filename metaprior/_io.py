"""Atomic file writes shared by checkpoints, saved priors and experiment outputs, and the
matching checked read of a tagged ``.npz``."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write_bytes", "atomic_path", "read_tagged_npz"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the
    file is renamed over ``path``: a crash leaves the old file or the new one, never a
    half-written one, and no temporary file is left behind on error.
    """
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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name
    (``savefig``, ``to_netcdf``); on success it is renamed over ``path``, on error removed.
    The temporary name keeps ``path``'s suffix, so writers that infer the format from it work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_tagged_npz(path: str | os.PathLike, fmt: str, *, label: str, hint: str = "") -> dict:
    """All arrays of an ``.npz`` written with a ``__format__`` tag, read without pickle.

    Raises:
        FileNotFoundError: no file at ``path`` (``"{label} {path} does not exist"``).
        ValueError: the file is unreadable or corrupt (message ends with ``hint``), or
            its ``__format__`` tag is not ``fmt``.
    """
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{label} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise ValueError(f"{label} {path} is unreadable or corrupt ({err}){hint}") from err
    if arrays.get("__format__", np.array("")).item() != fmt:
        raise ValueError(f"{path} is not a {fmt} file")
    return arrays
