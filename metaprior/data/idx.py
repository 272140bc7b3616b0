"""IDX files (LeCun's format) and the MNIST-style data sets stored in it.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), the dimensions as big-endian int32, then the data in row-major order,
big-endian. MNIST, Fashion-MNIST and the IDX conversion of notMNIST all ship as
``{train,t10k}-images-idx3-ubyte.gz`` (uint8 ``[N, 28, 28]``) and
``{train,t10k}-labels-idx1-ubyte.gz`` (uint8 ``[N]``).

References:
    LeCun, Cortes, Burges. The MNIST database of handwritten digits.
    http://yann.lecun.com/exdb/mnist/ (the IDX format is described there).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metaprior.data.store import CorruptDataError, MissingDataError, _read_gz, read_gz_verified

__all__ = [
    "parse_idx",
    "encode_idx",
    "load_idx",
    "load_mnist",
    "load_notmnist",
    "load_fashion_mnist",
    "load_idx_dataset",
]

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("=") if dt.itemsize > 1 else dt: code for code, dt in _IDX_TYPES.items()}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the (decompressed) bytes of an IDX file.

    Args:
        data: the file content.
        source: a name for error messages.

    Returns:
        The array, shape from the header, in native byte order.

    Raises:
        CorruptDataError: bad magic number, unknown type code, or a data length that
            does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CorruptDataError(f"{source}: not an IDX file (bad magic number {data[:4].hex()})")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        raise CorruptDataError(f"{source}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(f"{source}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise CorruptDataError(
            f"{source}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of ``array`` (uint8, int8, int16, int32, float32 or float64).
    The inverse of :func:`parse_idx`; used to write fixtures."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("=") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _IDX_CODES:
        raise TypeError(f"IDX cannot store dtype {array.dtype}")
    code = _IDX_CODES[dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()


def _check_pair(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDataError(f"{source}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise CorruptDataError(f"{source}: expected labels [N], got shape {labels.shape}")
    if len(labels) != len(images):
        raise CorruptDataError(f"{source}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int32)


def load_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an images/labels pair of IDX files (gzip-compressed or not).

    The gzip CRC and the IDX header are checked; checksums of known releases are
    checked by :func:`load_mnist` and friends, which read from the data directory.

    Args:
        images_path: an ``idx3`` file of uint8 images.
        labels_path: an ``idx1`` file of labels.

    Returns:
        ``(images uint8 [N, H, W], labels int32 [N])``.

    Raises:
        MissingDataError: a file does not exist.
        CorruptDataError: a file does not decompress or parse, or the counts differ.
    """
    arrays = []
    for path in (Path(images_path), Path(labels_path)):
        if not path.is_file():
            raise MissingDataError(f"IDX file {path.name!r} not found: expected it at {path}")
        arrays.append(parse_idx(_read_gz(path, None, must_be_gzip=path.suffix == ".gz"), str(path)))
    return _check_pair(arrays[0], arrays[1], f"{images_path} / {labels_path}")


def load_idx_dataset(
    folder: str, split: str = "test", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``<data_dir>/<folder>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``,
    verified (see :mod:`metaprior.data.store`).

    Args:
        folder: ``"mnist"``, ``"notmnist"``, ``"fashion-mnist"`` or another folder in
            the same layout.
        split: ``"train"`` or ``"test"``.
        data_dir: the data directory (see :func:`metaprior.data.data_dir`).

    Returns:
        ``(images float32 [N, H, W, 1] in [0, 1], labels int32 [N])``.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    rel_images = f"{folder}/{prefix}-images-idx3-ubyte.gz"
    rel_labels = f"{folder}/{prefix}-labels-idx1-ubyte.gz"
    images = parse_idx(read_gz_verified(rel_images, data_dir), rel_images)
    labels = parse_idx(read_gz_verified(rel_labels, data_dir), rel_labels)
    images, labels = _check_pair(images, labels, f"{folder} {split}")
    return (images.astype(np.float32) / 255.0)[..., None], labels


def load_mnist(split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits from ``<data_dir>/mnist/``.

    Returns:
        ``(images float32 [N, 28, 28, 1] in [0, 1] (ink high), labels int32 [N])``;
        ``N = 10000`` for ``"test"``, ``60000`` for ``"train"``.
    """
    return load_idx_dataset("mnist", split, data_dir)


def load_notmnist(split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """notMNIST letters A-J (labels 0-9) in MNIST's IDX format from ``<data_dir>/notmnist/``.

    Returns:
        ``(images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N])``.

    References:
        Bulatov (2011), notMNIST; IDX conversion github.com/davidflanagan/notMNIST-to-MNIST.
    """
    return load_idx_dataset("notmnist", split, data_dir)


def load_fashion_mnist(split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from ``<data_dir>/fashion-mnist/``.

    Returns:
        ``(images float32 [N, 28, 28, 1] in [0, 1], labels int32 [N])``.

    References:
        Xiao, Rasul, Vollgraf (2017). Fashion-MNIST. arXiv:1708.07747.
    """
    return load_idx_dataset("fashion-mnist", split, data_dir)
