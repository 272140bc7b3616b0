"""Atomic file writes shared by checkpoints, saved priors and experiment outputs, and the
matching checked read of a tagged ``.npz``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_path", "read_tagged_npz"]


def _fault_hook() -> None:
    """Test hook: ``METAPRIOR_TEST_SLOW_WRITE_S`` seconds of sleep between writing the
    temporary file and renaming it, so a test can kill the process in the middle of a
    checkpoint write (``tests/test_kill_resume.py``). Unset in normal use."""
    delay = os.environ.get("METAPRIOR_TEST_SLOW_WRITE_S")
    if delay:
        import time

        time.sleep(float(delay))


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write_bytes` leaves beside ``path``
    when the process is killed mid-write (``.{name}.*.tmp``); returns what it removed."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
        _fault_hook()
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


def _check_npz_sizes(path: Path) -> None:
    """Refuse an ``.npz`` member whose header declares more bytes than the member holds
    (``np.load`` would allocate the declared size first: a 60-byte file can ask for
    terabytes)."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
                declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if declared > info.file_size:
                    raise ValueError(f"member {info.filename} declares {declared} bytes but holds {info.file_size}")


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
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
        raise ValueError(f"{label} {path} is unreadable or corrupt ({err}){hint}") from err
    if arrays.get("__format__", np.array("")).item() != fmt:
        raise ValueError(f"{path} is not a {fmt} file")
    return arrays
