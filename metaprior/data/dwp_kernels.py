"""The deep weight prior authors' released source kernels (Atanov et al. 2019).

``<data_dir>/dwp-kernels/`` holds ``conv7x7_train.npy`` (1,769 first-layer kernels),
``conv7x7_test.npy`` (443) and ``conv5x5_test.npy`` (20,448 second-layer kernels; the
release has no 5x5 train file), float32 arrays ``(n, 1, k, k)`` collected from conv nets
trained on notMNIST's training set (repository SamsungLabs/deep-weight-prior,
``data/fconv/``, MIT licence). They are a reference prior: a kernel VAE trained on them
separates "is our prior good" from "is our inference right".

Files are read with ``numpy.load(..., allow_pickle=False)`` (no unpickling), checked
against the recorded size and SHA-256 of the release, and their shape and dtype checked.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from metaprior.data.store import CorruptDataError, _check, locate

__all__ = ["RELEASED_KERNEL_FILES", "load_released_kernels"]

RELEASED_KERNEL_FILES = {
    7: {"train": "dwp-kernels/conv7x7_train.npy", "test": "dwp-kernels/conv7x7_test.npy"},
    5: {"test": "dwp-kernels/conv5x5_test.npy"},
}


def _read_npy(relpath: str, data_dir, kernel_size: int, verify: bool) -> np.ndarray:
    path = locate(relpath, data_dir)
    data = path.read_bytes()
    if verify:
        _check(path, relpath, len(data), hashlib.sha256(data).hexdigest())
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptDataError(f"data file {path.name!r} at {path} is not a readable .npy array ({err})") from err
    want = (1, kernel_size, kernel_size)
    if array.ndim != 4 or array.shape[1:] != want or array.dtype != np.float32 or array.shape[0] < 2:
        raise CorruptDataError(
            f"data file {path.name!r} at {path}: expected float32 kernels (n >= 2, {', '.join(map(str, want))}), "
            f"got {array.dtype} {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise CorruptDataError(f"data file {path.name!r} at {path} holds NaN or inf")
    return array[:, 0]


def load_released_kernels(
    data_dir: str | os.PathLike | None = None, kernel_sizes: tuple[int, ...] = (7, 5), *, verify: bool = True
) -> list[dict[str, np.ndarray]]:
    """The released kernels of each conv layer, ``[{"train"?: [n, k, k], "test": [m, k, k]}]``
    in the order of ``kernel_sizes``.

    ``verify=False`` skips the release's checksums (for files generated in the same layout,
    as the tests do); shapes, dtype and finiteness are checked either way.

    Raises:
        ValueError: a kernel size the release does not have.
        MissingDataError: a file is absent (the message names it and where to put it).
        CorruptDataError: a file fails its checksum, does not load, or has the wrong shape.
    """
    unknown = [k for k in kernel_sizes if k not in RELEASED_KERNEL_FILES]
    if unknown:
        raise ValueError(f"kernel_sizes {unknown} are not in the release; it has {sorted(RELEASED_KERNEL_FILES)}")
    return [
        {split: _read_npy(rel, data_dir, k, verify) for split, rel in RELEASED_KERNEL_FILES[k].items()}
        for k in kernel_sizes
    ]
