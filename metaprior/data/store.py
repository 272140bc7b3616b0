"""Where the real data lives, and how a file is checked before it is used.

The loaders never look anywhere but one *data directory*, resolved by
:func:`data_dir`: the argument if given, else ``$METAPRIOR_DATA``, else a per-user
cache directory (``$XDG_CACHE_HOME/metaprior`` or ``~/.cache/metaprior``). Files keep
the names and the folder layout of their public releases, for example
``<data_dir>/mnist/t10k-images-idx3-ubyte.gz`` or
``<data_dir>/omniglot/images_background_small1.zip``.

Every known file has a :class:`FileRecord`: its public release, and the size and
SHA-256 of its *decompressed content* (the bytes inside the ``.gz``; for a zip, a
digest over its members, see :func:`content_digest`). Checking the content rather
than the archive means a copy recompressed by another tool still verifies. A file
is verified every time it is read:

- a missing file raises :class:`MissingDataError` (a ``FileNotFoundError``) naming
  the file, the path where it was expected and the public release it comes from;
- a file that fails to decompress, or whose content size or checksum differs from
  the record, raises :class:`CorruptDataError` (a ``ValueError``). It is never used.

Where no checksum was published or could be recorded here (the full-size releases
that are not in ``../shared/data``), the record's size (where known) and the
format's own CRCs (gzip and zip both check a CRC-32 of every decompressed member)
are what is verified; the record says so with ``sha256=None``.

Decoded arrays (the resized Omniglot images) are derived data and are cached under
:func:`cache_dir`, never inside the data directory or the repository.

:func:`download` fetches a known file from its public release; it is opt-in, only
for machines with a network, and nothing in the library or its tests calls it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "DataError",
    "MissingDataError",
    "CorruptDataError",
    "FileRecord",
    "KNOWN_FILES",
    "data_dir",
    "cache_dir",
    "locate",
    "content_digest",
    "verify_file",
    "read_gz_verified",
    "read_zip_verified",
    "file_sha256",
    "download",
]

DATA_ENV_VAR = "METAPRIOR_DATA"
CACHE_ENV_VAR = "METAPRIOR_CACHE"


class DataError(Exception):
    """Base of the errors raised for a data file that cannot be used."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file is not where it is expected. The message names the file, the
    expected path and the public release to get it from."""


class CorruptDataError(DataError, ValueError):
    """A data file exists but fails verification (it does not decompress, or its
    content has the wrong size or checksum, or a malformed layout)."""


class FileRecord(NamedTuple):
    """What is known about one file of a public release.

    Attributes:
        url: where the file itself can be downloaded.
        release: the page of the public release (cited in error messages).
        size: bytes of the decompressed content (``None`` where not recorded).
        sha256: SHA-256 hex digest of the decompressed content (see
            :func:`content_digest`); ``None`` where not recorded, in which case only
            the size and the format's own CRCs are checked.
    """

    url: str
    release: str
    size: int | None = None
    sha256: str | None = None


_OMNIGLOT = "https://github.com/brendenlake/omniglot"
_OMNIGLOT_RAW = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_MNIST = "http://yann.lecun.com/exdb/mnist/"
# The original MNIST host is often unreachable; this mirror serves the same files.
_MNIST_RAW = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_NOTMNIST = "https://github.com/davidflanagan/notMNIST-to-MNIST"
_NOTMNIST_RAW = "https://raw.githubusercontent.com/davidflanagan/notMNIST-to-MNIST/master/"
_FASHION = "https://github.com/zalandoresearch/fashion-mnist"
_DWP = "https://github.com/SamsungLabs/deep-weight-prior"
_DWP_RAW = "https://raw.githubusercontent.com/SamsungLabs/deep-weight-prior/master/data/fconv/"
_FASHION_RAW = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# IDX sizes: 16-byte header + N*28*28 for images, 8-byte header + N for labels.
_IDX_SIZES = {
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}

KNOWN_FILES: dict[str, FileRecord] = {
    # Omniglot (Lake et al. 2015). The two small sets are the copies in ../shared/data.
    "omniglot/images_background_small1.zip": FileRecord(
        _OMNIGLOT_RAW + "images_background_small1.zip",
        _OMNIGLOT,
        656_309,
        "29283030a9db62d85c0d517b695cc5d5f543852015727451c514adc081805f5c",
    ),
    "omniglot/images_background_small2.zip": FileRecord(
        _OMNIGLOT_RAW + "images_background_small2.zip",
        _OMNIGLOT,
        798_023,
        "1fd1f44e4bfb8ad2625aa11f2e6b2c0bb1c9b45d325a6cd03bad335c23e53c63",
    ),
    "omniglot/images_background.zip": FileRecord(_OMNIGLOT_RAW + "images_background.zip", _OMNIGLOT),
    "omniglot/images_evaluation.zip": FileRecord(_OMNIGLOT_RAW + "images_evaluation.zip", _OMNIGLOT),
    "omniglot/all_runs.zip": FileRecord(_OMNIGLOT_RAW + "one-shot-classification/all_runs.zip", _OMNIGLOT),
    # MNIST test set as in ../shared/data; the training set by size only.
    "mnist/t10k-images-idx3-ubyte.gz": FileRecord(
        _MNIST_RAW + "t10k-images-idx3-ubyte.gz",
        _MNIST,
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": FileRecord(
        _MNIST_RAW + "t10k-labels-idx1-ubyte.gz",
        _MNIST,
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    "mnist/train-images-idx3-ubyte.gz": FileRecord(
        _MNIST_RAW + "train-images-idx3-ubyte.gz", _MNIST, _IDX_SIZES["train-images-idx3-ubyte"]
    ),
    "mnist/train-labels-idx1-ubyte.gz": FileRecord(
        _MNIST_RAW + "train-labels-idx1-ubyte.gz", _MNIST, _IDX_SIZES["train-labels-idx1-ubyte"]
    ),
    # notMNIST (Bulatov 2011) in MNIST's IDX format.
    "notmnist/t10k-images-idx3-ubyte.gz": FileRecord(
        _NOTMNIST_RAW + "t10k-images-idx3-ubyte.gz",
        _NOTMNIST,
        7_840_016,
        "8e7f38ae95cc8f48e0986175ffc9137e5007ebcf3d8fdf6656c904eb9dab198b",
    ),
    "notmnist/t10k-labels-idx1-ubyte.gz": FileRecord(
        _NOTMNIST_RAW + "t10k-labels-idx1-ubyte.gz",
        _NOTMNIST,
        10_008,
        "5f8e6012f2ce730700d8d05fca098bc47f71d25b890e4bec7ac5ebfd614a4001",
    ),
    "notmnist/train-images-idx3-ubyte.gz": FileRecord(_NOTMNIST_RAW + "train-images-idx3-ubyte.gz", _NOTMNIST),
    "notmnist/train-labels-idx1-ubyte.gz": FileRecord(_NOTMNIST_RAW + "train-labels-idx1-ubyte.gz", _NOTMNIST),
    # The deep weight prior's released source kernels (raw .npy bytes; see dwp_kernels.py).
    "dwp-kernels/conv7x7_train.npy": FileRecord(
        _DWP_RAW + "conv7x7_train.npy",
        _DWP,
        346_852,
        "e800f1e3c5f0a8010e76562cc369f14ba975cf1481d54fd96c6e7a37b23efb31",
    ),
    "dwp-kernels/conv7x7_test.npy": FileRecord(
        _DWP_RAW + "conv7x7_test.npy", _DWP, 86_956, "9aee240bbde7c5567b17d405f3c14d6c41b95ef7da96e003acc45fb94a01ec8b"
    ),
    "dwp-kernels/conv5x5_test.npy": FileRecord(
        _DWP_RAW + "conv5x5_test.npy",
        _DWP,
        2_044_928,
        "374e9001dac53eb6f2e9ec52d245d1f84e144756532107da9e869c2bda0b1526",
    ),
    # miniImageNet has no single public release of the cached arrays; see miniimagenet.py.
    **{
        f"fashion-mnist/{name}.gz": FileRecord(_FASHION_RAW + f"{name}.gz", _FASHION, size)
        for name, size in _IDX_SIZES.items()
    },
}


def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metaprior"


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$METAPRIOR_DATA``, else the
    per-user cache directory (``$XDG_CACHE_HOME/metaprior`` or ``~/.cache/metaprior``).

    The directory need not exist: a loader reports the missing file.

    Args:
        data_dir: an explicit directory (takes precedence over the environment).

    Returns:
        The absolute path.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV_VAR) or _user_cache_root()
    return Path(data_dir).expanduser().resolve()


_data_dir = data_dir  # for functions whose ``data_dir`` argument shadows the name


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded arrays are cached: ``cache_dir`` if given, else
    ``$METAPRIOR_CACHE``, else ``<user cache>/metaprior/decoded``.

    Cache files are derived data (a pure function of verified source files and the
    decoding arguments): deleting them only costs a slower next load. They are kept
    apart from the data directory, which may be read-only, and from the repository.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or (_user_cache_root() / "decoded")
    return Path(cache_dir).expanduser().resolve()


def _record(relpath: str) -> FileRecord | None:
    return KNOWN_FILES.get(relpath)


def _where_from(relpath: str, record: FileRecord | None) -> str:
    if record is None:
        return "no public release is recorded for this file"
    return f"public release: {record.release} (file: {record.url})"


def locate(relpath: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``relpath`` inside the data directory, which must exist.

    A ``.gz`` file may also be present already decompressed (same name without
    ``.gz``); its content is verified the same way.

    Raises:
        MissingDataError: naming the file, the expected path and the public release.
    """
    root = _data_dir(data_dir)
    path = root / relpath
    if path.is_file():
        return path
    if relpath.endswith(".gz") and path.with_suffix("").is_file():
        return path.with_suffix("")
    record = _record(relpath)
    hint = f" or call metaprior.data.download({relpath!r})" if record is not None else ""
    raise MissingDataError(
        f"data file {path.name!r} not found: expected it at {path}. Get it from the "
        f"{_where_from(relpath, record)} and put it at that path{hint}; the data "
        f"directory is the loader's data_dir argument, else ${DATA_ENV_VAR}, else "
        f"{_user_cache_root()}."
    )


def content_digest(members: dict[str, bytes] | bytes) -> tuple[int, str]:
    """Size and SHA-256 of decompressed content.

    For a single stream (a ``.gz`` file's content) this is ``len`` and the SHA-256
    of the bytes. For an archive, ``members`` maps member name to its content; the
    size is the total of the contents and the digest is the SHA-256 over the members
    sorted by name, each fed as ``name``, a zero byte, the content length as 8
    big-endian bytes and the content. Directory entries are not members.
    """
    if isinstance(members, (bytes, bytearray, memoryview)):
        return len(members), hashlib.sha256(members).hexdigest()
    h = hashlib.sha256()
    size = 0
    for name in sorted(members):
        data = members[name]
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big"))
        h.update(data)
        size += len(data)
    return size, h.hexdigest()


def _check(path: Path, relpath: str | None, size: int, digest: str) -> None:
    record = _record(relpath) if relpath is not None else None
    if record is None:
        return
    problems = []
    if record.size is not None and record.size != size:
        problems.append(f"decompressed size {size} bytes, expected {record.size}")
    if record.sha256 is not None and record.sha256 != digest:
        problems.append(f"content sha256 {digest}, expected {record.sha256}")
    if problems:
        raise CorruptDataError(
            f"data file {path.name!r} at {path} failed verification ({'; '.join(problems)}). "
            f"It is not used: replace it with a fresh copy from the "
            f"{_where_from(relpath, record)}."
        )


def _corrupt(path: Path, relpath: str | None, why: str) -> CorruptDataError:
    record = _record(relpath) if relpath is not None else None
    return CorruptDataError(
        f"data file {path.name!r} at {path} is corrupt ({why}). It is not used: replace "
        f"it with a fresh copy from the {_where_from(relpath or '', record)}."
    )


def _read_gz(path: Path, relpath: str | None, *, must_be_gzip: bool | None = None) -> bytes:
    raw = path.read_bytes()
    if must_be_gzip is None:
        must_be_gzip = path.suffix == ".gz"
    if raw[:2] != b"\x1f\x8b":
        if must_be_gzip:
            raise _corrupt(path, relpath, "not a gzip file")
        return raw  # an already-decompressed copy
    try:
        return gzip.decompress(raw)  # checks the CRC-32 and length of the content
    except (OSError, EOFError, zlib.error) as err:
        raise _corrupt(path, relpath, f"gzip: {err}") from err


#: Largest total uncompressed size of a zip the loaders read (the biggest file we know,
#: Omniglot's images_background.zip, is about 10 MB uncompressed per 1,000 characters).
MAX_ZIP_BYTES = 4 * 2**30


def read_zip_members(path: Path, what: str = "zip") -> dict[str, bytes]:
    """``name -> bytes`` of every file member of the zip at ``path``.

    The declared sizes are checked against :data:`MAX_ZIP_BYTES` before anything is
    decompressed (a zip bomb is refused from its directory), and every way a damaged zip
    fails (bad directory, bad CRC, truncated deflate stream, unsupported or encrypted
    members) becomes ``CorruptDataError`` naming ``path``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [info for info in zf.infolist() if not info.is_dir()]
            declared = sum(info.file_size for info in infos)
            if declared > MAX_ZIP_BYTES:
                raise CorruptDataError(
                    f"{what} {path}: members declare {declared} bytes uncompressed, more "
                    f"than the {MAX_ZIP_BYTES}-byte limit (not a data file we know)"
                )
            return {info.filename: zf.read(info) for info in infos}
    except (
        zipfile.BadZipFile,
        OSError,
        EOFError,
        zlib.error,
        NotImplementedError,
        RuntimeError,
        ValueError,
        OverflowError,
    ) as err:
        if isinstance(err, CorruptDataError):
            raise
        # BadZipFile includes "Bad CRC-32 for file ..." of a damaged member; RuntimeError
        # an encrypted member; ValueError / OverflowError a nonsensical directory entry.
        raise CorruptDataError(f"{what} {path} is corrupt ({type(err).__name__}: {err})") from err


def _read_zip(path: Path, relpath: str | None) -> dict[str, bytes]:
    try:
        return read_zip_members(path)
    except CorruptDataError as err:  # add where the file belongs and where to get it
        raise _corrupt(path, relpath, f"zip: {err.__cause__ or err}") from err


def read_gz_verified(relpath: str, data_dir: str | os.PathLike | None = None) -> bytes:
    """The verified decompressed content of a ``.gz`` file of the data directory.

    Args:
        relpath: path inside the data directory, e.g. ``"mnist/t10k-images-idx3-ubyte.gz"``.
        data_dir: the data directory (see :func:`data_dir`).

    Raises:
        MissingDataError, CorruptDataError.
    """
    path = locate(relpath, data_dir)
    content = _read_gz(path, relpath)
    _check(path, relpath, *content_digest(content))
    return content


def read_zip_verified(relpath: str, data_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, bytes]]:
    """The path and verified member contents (name -> bytes) of a zip of the data
    directory.

    Raises:
        MissingDataError, CorruptDataError.
    """
    path = locate(relpath, data_dir)
    members = _read_zip(path, relpath)
    _check(path, relpath, *content_digest(members))
    return path, members


def verify_file(relpath: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Verify one file of the data directory (``.gz`` or ``.zip``) and return its path.

    Raises:
        MissingDataError, CorruptDataError.
    """
    if relpath.endswith(".zip"):
        return read_zip_verified(relpath, data_dir)[0]
    path = locate(relpath, data_dir)
    _check(path, relpath, *content_digest(_read_gz(path, relpath)))
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes as stored (used to key caches of derived data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(
    relpath: str, data_dir: str | os.PathLike | None = None, *, url: str | None = None, overwrite: bool = False
) -> Path:
    """Opt-in: fetch a known file from its public release into the data directory.

    The file is downloaded to a temporary name next to its destination, verified
    (see the module docstring), and only then moved into place. Nothing in the
    library or the tests calls this: it is for machines with a network.

    Args:
        relpath: a key of :data:`KNOWN_FILES`, e.g. ``"mnist/t10k-images-idx3-ubyte.gz"``.
        data_dir: the data directory (see :func:`data_dir`).
        url: override the recorded URL (a mirror, or ``file://`` for a local copy).
        overwrite: replace an existing file.

    Returns:
        The path of the verified file.

    Raises:
        KeyError: ``relpath`` is not a known file and no ``url`` was given.
        CorruptDataError: the download fails verification (it is deleted).
    """
    record = _record(relpath)
    if url is None:
        if record is None:
            raise KeyError(f"{relpath!r} is not a known data file; known: {sorted(KNOWN_FILES)}")
        url = record.url
    dest = _data_dir(data_dir) / relpath
    if dest.is_file() and not overwrite:
        verify_file(relpath, data_dir)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:  # noqa: S310
            shutil.copyfileobj(response, out)
        if relpath.endswith(".zip"):
            _check(tmp, relpath, *content_digest(_read_zip(tmp, relpath)))
        else:
            gz = url.endswith(".gz") or relpath.endswith(".gz")
            _check(tmp, relpath, *content_digest(_read_gz(tmp, relpath, must_be_gzip=gz)))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
