"""miniImageNet in the cached-array layout of the few-shot community.

miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle
(2017): 64 train, 16 val and 20 test classes of 600 images, 84x84 RGB. It has no
single public release of the images; the community passes around the decoded
arrays, one file per split. Two layouts are read from
``<data_dir>/miniimagenet/``:

- ``mini-imagenet-{split}.npz`` (preferred): ``images`` uint8 ``[N, 84, 84, 3]`` and
  ``labels`` ``[N]`` (integers or strings such as WordNet ids), optionally
  ``class_names`` ``[classes]`` naming integer labels ``0..classes-1``. Read with
  ``allow_pickle=False``: loading it cannot run code.
- ``mini-imagenet-cache-{split}.pkl``: a pickled dict with ``image_data`` uint8
  ``[N, 84, 84, 3]`` and ``class_dict`` ``{class name: [indices]}``. Read only with
  ``allow_pickle=True``, and then with a restricted unpickler that resolves only NumPy's
  array globals, so a hostile file cannot run code (plain unpickling could).
  :func:`convert_miniimagenet_pickle` turns one into the ``.npz`` layout once.

References:
    Vinyals et al. (2016). Matching networks for one shot learning.
    Ravi, Larochelle (2017). Optimization as a model for few-shot learning.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from metaprior.data.fewshot import FewShotDataset, as_class_array
from metaprior.data.store import CorruptDataError, MissingDataError
from metaprior.data.store import data_dir as _data_dir

__all__ = [
    "MINIIMAGENET_SPLITS",
    "load_miniimagenet",
    "read_miniimagenet_npz",
    "read_miniimagenet_pickle",
    "convert_miniimagenet_pickle",
]

MINIIMAGENET_SPLITS = ("train", "val", "test")
_RELEASE = (
    "the miniImageNet cache of the few-shot community, split of Ravi & Larochelle (2017): "
    "https://github.com/twitter/meta-learning-lstm (csv splits) and e.g. "
    "https://github.com/renmengye/few-shot-ssl-public (mini-imagenet-cache-*.pkl)"
)


def _check_images(images: np.ndarray, source: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CorruptDataError(f"{source}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def read_miniimagenet_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read the ``.npz`` layout (no unpickling).

    Returns:
        ``(images uint8 [N, H, W, 3], labels int32 [N] in 0..classes-1, class_names)``;
        string labels become indices into their sorted distinct values.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
            names = tuple(z["class_names"].tolist()) if "class_names" in z.files else None
    except KeyError as err:
        raise CorruptDataError(f"{path}: missing array {err} (need 'images' and 'labels')") from err
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise CorruptDataError(f"{path}: cannot read npz ({err})") from err
    images = _check_images(images, str(path))
    if labels.shape != (len(images),):
        raise CorruptDataError(f"{path}: labels of shape {labels.shape} for {len(images)} images")
    if labels.dtype.kind in "US":
        distinct, labels = np.unique(labels, return_inverse=True)
        names = names or tuple(str(d) for d in distinct)
    elif labels.dtype.kind in "iu":
        distinct = np.unique(labels)
        if names is None:
            names = tuple(str(d) for d in distinct)
            labels = np.searchsorted(distinct, labels)
        elif len(distinct) and (distinct.min() < 0 or distinct.max() >= len(names)):
            raise CorruptDataError(f"{path}: labels outside 0..{len(names) - 1} of class_names")
    else:
        raise CorruptDataError(f"{path}: labels of dtype {labels.dtype}")
    return images, labels.astype(np.int32), tuple(str(n) for n in names)


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals that plain dicts, lists and NumPy arrays pickle to."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only NumPy arrays are allowed)")
        return super().find_class(module, name)


def read_miniimagenet_pickle(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read a ``mini-imagenet-cache-{split}.pkl`` with a restricted unpickler.

    Only the globals a NumPy array needs are resolved (:class:`_ArrayUnpickler`); any
    other (``os.system``, ``builtins.eval``...) is refused with ``CorruptDataError``, so
    a hostile file cannot run code. Everything else in metaprior reads without pickle.

    Returns:
        ``(images uint8 [N, H, W, 3], labels int32 [N], class_names sorted)``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f).load()
        images, class_dict = np.asarray(data["image_data"]), data["class_dict"]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
        raise CorruptDataError(f"{path}: not a miniImageNet cache pickle ({err})") from err
    images = _check_images(images, str(path))
    names = tuple(sorted(class_dict))
    labels = np.full(len(images), -1, dtype=np.int32)
    for j, name in enumerate(names):
        labels[np.asarray(class_dict[name], dtype=np.int64)] = j
    if np.any(labels < 0):
        raise CorruptDataError(f"{path}: {int(np.sum(labels < 0))} images belong to no class")
    return images, labels, names


def convert_miniimagenet_pickle(pkl_path: str | os.PathLike, npz_path: str | os.PathLike) -> Path:
    """Convert a trusted ``.pkl`` cache to the ``.npz`` layout (unpickles ``pkl_path``)."""
    images, labels, names = read_miniimagenet_pickle(pkl_path)
    npz_path = Path(npz_path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz_path, images=images, labels=labels, class_names=np.array(names))
    return npz_path


def load_miniimagenet(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    num_per_class: int | None = None,
    dtype=np.float32,
    allow_pickle: bool = False,
) -> FewShotDataset:
    """Load one miniImageNet split as a class-indexed array.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        data_dir: the data directory (see :func:`metaprior.data.data_dir`).
        num_per_class: examples per class (default: the smallest class count, 600
            for the standard files; see :func:`metaprior.data.as_class_array`).
        dtype: ``np.float32`` (default) scales to [0, 1]: the train split is then
            64 x 600 x 84 x 84 x 3 x 4 bytes = 3.3 GB. ``np.uint8`` keeps the raw
            bytes (0..255, 0.8 GB); convert after sampling episodes.
        allow_pickle: also read ``mini-imagenet-cache-{split}.pkl`` when there is no
            ``.npz``. **Unpickles: only for trusted files.**

    Returns:
        ``FewShotDataset`` with ``images [classes, num_per_class, 84, 84, 3]`` and
        each class its own group.

    Raises:
        MissingDataError: neither file exists (or only the pickle and
            ``allow_pickle=False``).
        CorruptDataError: a file does not have the layout above.
    """
    if split not in MINIIMAGENET_SPLITS:
        raise ValueError(f"split must be one of {MINIIMAGENET_SPLITS}, got {split!r}")
    folder = _data_dir(data_dir) / "miniimagenet"
    npz, pkl = folder / f"mini-imagenet-{split}.npz", folder / f"mini-imagenet-cache-{split}.pkl"
    if npz.is_file():
        images, labels, names = read_miniimagenet_npz(npz)
    elif pkl.is_file() and allow_pickle:
        images, labels, names = read_miniimagenet_pickle(pkl)
    elif pkl.is_file():
        raise MissingDataError(
            f"data file {npz.name!r} not found: expected it at {npz}. There is a pickle at "
            f"{pkl}; reading it unpickles (runs code from the file): if you trust it, pass "
            f"allow_pickle=True or convert it once with convert_miniimagenet_pickle."
        )
    else:
        raise MissingDataError(
            f"data file {npz.name!r} not found: expected it at {npz} (or a "
            f"trusted {pkl.name} with allow_pickle=True). Source: {_RELEASE}."
        )
    num_classes = len(names)
    present = np.unique(labels)
    dataset = as_class_array(images, labels, num_per_class)
    names = tuple(names[i] for i in present) if len(present) != num_classes else names
    if np.dtype(dtype) == np.uint8:
        out = dataset.images
    else:
        out = dataset.images.astype(dtype) / np.asarray(255, dtype=dtype)
    return FewShotDataset(out, names, names)
