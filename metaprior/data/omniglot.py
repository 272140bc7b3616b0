"""Omniglot (Lake et al. 2015) as released: zips of 105x105 PNGs.

Layout of a set zip: ``<set>/<Alphabet>/<characterNN>/<id>_<drawer>.png``, 20
drawings (one per drawer) of every character, for the sets ``images_background``,
``images_evaluation``, ``images_background_small1`` and ``images_background_small2``.
The zips are expected at ``<data_dir>/omniglot/<set>.zip`` and are verified before
use (see :mod:`metaprior.data.store`).

Decoding: each PNG (black ink on white) is converted to grey levels, inverted so
that ink is 1.0 and background 0.0, and resized with a Lanczos filter to
``image_size`` (28 by default; values clipped to [0, 1] after the filter's
overshoot). The decoded arrays are cached under :func:`metaprior.data.cache_dir`,
keyed by the SHA-256 of the zips and the decoding arguments, so a second load reads
one ``.npz`` instead of decoding thousands of PNGs.

A character is identified by ``"<Alphabet>/<characterNN>"``: the small sets are
subsets of ``images_background`` and share Greek and Latin, so a character found
in several of the requested sets is one class (its drawings are taken from the
first set that has it).

The original one-shot classification runs (``runNN/training/classNN.png``,
``runNN/test/itemNN.png``, ``runNN/class_labels.txt``) are read by
:func:`load_oneshot_runs` and scored by :func:`score_oneshot_runs`.

References:
    Lake, Salakhutdinov, Tenenbaum (2015). Human-level concept learning through
    probabilistic program induction. Science 350(6266). Data and one-shot runs:
    https://github.com/brendenlake/omniglot
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from metaprior.data.episodes import Episodes
from metaprior.data.fewshot import FewShotDataset, mix_held_out, split_by_group, with_rotations
from metaprior.data.store import (
    CorruptDataError,
    MissingDataError,
    file_sha256,
    locate,
    read_zip_members,
    read_zip_verified,
)
from metaprior.data.store import cache_dir as _cache_dir

__all__ = [
    "OMNIGLOT_SETS",
    "decode_omniglot_png",
    "load_omniglot",
    "omniglot_splits",
    "OneShotRun",
    "load_oneshot_runs",
    "oneshot_episodes",
    "score_oneshot_runs",
]

OMNIGLOT_SETS = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
_DEFAULT_SETS = ("images_background_small1", "images_background_small2")
_CACHE_VERSION = 1  # bump when the decoding changes


def decode_omniglot_png(data: bytes, image_size: int | None = 28, source: str = "<png>") -> np.ndarray:
    """Decode one Omniglot PNG to ``float32 [image_size, image_size, 1]``, ink 1.0.

    Args:
        data: the PNG file content.
        image_size: output side (Lanczos resize); ``None`` keeps the original 105.
        source: a name for error messages.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Mode "1" images are resized with nearest neighbour by PIL whatever the
            # filter, so convert to grey levels first.
            grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptDataError(f"{source}: cannot decode PNG ({err})") from err
    ink = 1.0 - grey
    if image_size is not None and ink.shape != (image_size, image_size):
        resized = Image.fromarray(ink, mode="F").resize((image_size, image_size), Image.Resampling.LANCZOS)
        ink = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    return ink[..., None]


def _character_files(members: dict[str, bytes]) -> dict[str, list[str]]:
    """``"Alphabet/characterNN" -> sorted PNG member names``."""
    chars: dict[str, list[str]] = {}
    for name in members:
        parts = PurePosixPath(name).parts
        if len(parts) < 3 or not name.lower().endswith(".png"):
            continue
        chars.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(name)
    return {k: sorted(v) for k, v in chars.items()}


def _decode_sets(sets: Sequence[str], image_size: int, data_dir) -> FewShotDataset:
    source: dict[str, tuple[str, dict[str, bytes], list[str]]] = {}
    for s in sets:
        path, members = read_zip_verified(f"omniglot/{s}.zip", data_dir)
        for char, files in _character_files(members).items():
            source.setdefault(char, (str(path), members, files))
    if not source:
        raise CorruptDataError(f"no Omniglot characters found in sets {tuple(sets)}")
    names = sorted(source)
    counts = {len(source[c][2]) for c in names}
    if len(counts) != 1:
        bad = [f"{c}: {len(source[c][2])}" for c in names if len(source[c][2]) != max(counts)]
        raise CorruptDataError(f"Omniglot characters have unequal numbers of drawings ({', '.join(bad[:5])})")
    images = np.stack(
        [
            np.stack([decode_omniglot_png(source[c][1][f], image_size, f"{source[c][0]}:{f}") for f in source[c][2]])
            for c in names
        ]
    ).astype(np.float32)
    return FewShotDataset(images, tuple(names), tuple(c.split("/")[0] for c in names))


def _write_atomic_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_omniglot(
    sets: Sequence[str] = _DEFAULT_SETS,
    image_size: int = 28,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> FewShotDataset:
    """Load Omniglot characters as a class-indexed array.

    With the two small background sets (the default, as in ``../shared/data``) this
    is 242 distinct characters of 20 drawings, from 8 alphabets.

    Args:
        sets: which set zips to read from ``<data_dir>/omniglot/``.
        image_size: side of the decoded images (105 keeps the original size).
        data_dir: the data directory (see :func:`metaprior.data.data_dir`).
        cache_dir: where the decoded arrays are cached (see
            :func:`metaprior.data.cache_dir`).
        cache: read and write the cache (``False`` always decodes).

    Returns:
        ``FewShotDataset`` with ``images float32 [characters, 20, S, S, 1]`` (ink 1.0),
        ``class_names`` ``"Alphabet/characterNN"`` sorted, ``groups`` the alphabets.

    Raises:
        MissingDataError, CorruptDataError: see :mod:`metaprior.data.store`.
    """
    sets = tuple(sets)
    unknown = [s for s in sets if s not in OMNIGLOT_SETS]
    if unknown:
        raise ValueError(f"unknown Omniglot sets {unknown}; choose from {OMNIGLOT_SETS}")
    if not cache:
        return _decode_sets(sets, image_size, data_dir)
    paths = [locate(f"omniglot/{s}.zip", data_dir) for s in sets]
    key = json.dumps(
        {"version": _CACHE_VERSION, "sets": sets, "image_size": image_size, "zips": [file_sha256(p) for p in paths]}
    ).encode()
    cached = _cache_dir(cache_dir) / f"omniglot-{hashlib.sha256(key).hexdigest()[:24]}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return FewShotDataset(z["images"], tuple(z["class_names"].tolist()), tuple(z["groups"].tolist()))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            warnings.warn(f"ignoring unreadable Omniglot cache {cached} ({err}); decoding again", stacklevel=2)
    dataset = _decode_sets(sets, image_size, data_dir)
    try:
        _write_atomic_npz(
            cached, images=dataset.images, class_names=np.array(dataset.class_names), groups=np.array(dataset.groups)
        )
    except OSError as err:
        warnings.warn(f"could not write the Omniglot cache {cached} ({err})", stacklevel=2)
    return dataset


def omniglot_splits(
    image_size: int = 28,
    rotations: bool = True,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    *,
    sets: Sequence[str] = _DEFAULT_SETS,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    cache_dir: str | os.PathLike | None = None,
    held_out: str = "alphabet",
) -> dict[str, FewShotDataset]:
    """Omniglot split by alphabet into train / val / test, for meta-learning.

    The split is :func:`metaprior.data.split_by_group` with ``seed``. With
    ``rotations=True`` (the default) the *train* split gets the 90/180/270 degree
    rotations as new classes (:func:`metaprior.data.with_rotations`), the standard
    augmentation for meta-training. Val and test are left unrotated: they measure
    generalisation to the real characters of unseen alphabets (apply
    ``with_rotations`` to them explicitly for the rotated protocol).

    ``held_out="alphabet"`` (the default) keeps val and test disjoint by alphabet too.
    ``held_out="character"`` deals the held-out alphabets' characters between val and
    test (:func:`metaprior.data.mix_held_out`), so that what is chosen on val is chosen
    for the test alphabets' difficulty: with only 8 alphabets, val is otherwise a single
    alphabet. Train is the same either way.

    Returns:
        ``{"train", "val", "test"} -> FewShotDataset``.
    """
    if held_out not in ("alphabet", "character"):
        raise ValueError(f"held_out must be 'alphabet' or 'character', got {held_out!r}")
    dataset = load_omniglot(sets, image_size, data_dir, cache_dir=cache_dir)
    splits = split_by_group(dataset, fractions, seed)
    if held_out == "character":
        splits = mix_held_out(splits, seed)
    if rotations:
        splits["train"] = with_rotations(splits["train"])
    return splits


class OneShotRun(NamedTuple):
    """One run of Lake et al.'s 20-way 1-shot classification task.

    Attributes:
        name: the run folder, e.g. ``"run01"``.
        support_x: ``[ways, S, S, 1]`` the training images ``classNN.png`` in name order.
        support_y: ``[ways]`` int32, ``0..ways-1`` (class ``j`` is the ``j``-th file).
        query_x: ``[items, S, S, 1]`` the test images ``itemNN.png`` in name order.
        query_y: ``[items]`` int32, the answer key: the support label of each item's class.
        support_files, query_files: the file names, in array order.
    """

    name: str
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    support_files: tuple[str, ...]
    query_files: tuple[str, ...]


def _runs_source(path: Path) -> dict[str, dict[str, bytes]]:
    """``run name -> {path relative to the run folder: bytes}`` from a folder or zip."""
    runs: dict[str, dict[str, bytes]] = {}
    if path.is_file():
        files = read_zip_members(path, "one-shot runs zip")
        for name, data in files.items():
            parts = PurePosixPath(name).parts
            if len(parts) >= 2 and parts[-1] == "class_labels.txt":
                runs.setdefault(parts[-2], {})["class_labels.txt"] = data
            elif len(parts) >= 3 and parts[-2] in ("training", "test"):
                runs.setdefault(parts[-3], {})[f"{parts[-2]}/{parts[-1]}"] = data
        return runs
    run_dirs = (
        [path]
        if (path / "class_labels.txt").is_file()
        else sorted(p for p in path.iterdir() if (p / "class_labels.txt").is_file())
    )
    for run in run_dirs:
        runs[run.name] = {str(f.relative_to(run).as_posix()): f.read_bytes() for f in run.rglob("*") if f.is_file()}
    return runs


def load_oneshot_runs(
    path: str | os.PathLike | None = None, image_size: int = 28, *, data_dir: str | os.PathLike | None = None
) -> list[OneShotRun]:
    """Load the Omniglot one-shot classification runs.

    Each run folder holds ``training/classNN.png`` (one drawing of each of 20
    characters), ``test/itemNN.png`` (another drawing of each) and
    ``class_labels.txt``, whose lines pair a test item with its training class, e.g.
    ``run01/test/item01.png run01/training/class12.png`` (the paths' last two parts
    are used, so paths relative to the run folder work as well).

    Args:
        path: the ``all_runs`` folder, one run folder, or ``all_runs.zip``; default
            ``<data_dir>/omniglot/all_runs.zip``.
        image_size: side of the decoded images (as :func:`load_omniglot`).
        data_dir: the data directory, used when ``path`` is ``None``.

    Returns:
        One :class:`OneShotRun` per run, in name order (a 20-way 1-shot episode each).

    Raises:
        MissingDataError: ``path`` does not exist or holds no runs.
        CorruptDataError: a label file names a missing image, or an image does not decode.
    """
    path = locate("omniglot/all_runs.zip", data_dir) if path is None else Path(path)
    if not path.exists():
        raise MissingDataError(
            f"one-shot runs not found: expected them at {path} (the all_runs folder or "
            f"all_runs.zip of the public release https://github.com/brendenlake/omniglot, "
            f"python/one-shot-classification/)"
        )
    source = _runs_source(path)
    if not source:
        raise MissingDataError(f"no runNN/class_labels.txt found under {path}")
    runs = []
    for name in sorted(source):
        files = source[name]
        if "class_labels.txt" not in files:
            raise CorruptDataError(f"{path}: run {name} has no class_labels.txt")
        pairs = []
        for line in files["class_labels.txt"].decode("utf-8").splitlines():
            if line.strip():
                test, train = line.split()
                pairs.append(tuple("/".join(PurePosixPath(p).parts[-2:]) for p in (test, train)))
        support_files = tuple(sorted({train for _, train in pairs} | {f for f in files if f.startswith("training/")}))
        query_files = tuple(sorted(test for test, _ in pairs))
        answer = dict(pairs)
        missing = [f for f in support_files + query_files if f not in files]
        if missing:
            raise CorruptDataError(f"{path}: run {name} lists missing images {missing[:3]}")
        decode = lambda f: decode_omniglot_png(files[f], image_size, f"{path}:{name}/{f}")
        support_index = {f: j for j, f in enumerate(support_files)}
        runs.append(
            OneShotRun(
                name=name,
                support_x=np.stack([decode(f) for f in support_files]),
                support_y=np.arange(len(support_files), dtype=np.int32),
                query_x=np.stack([decode(f) for f in query_files]),
                query_y=np.array([support_index[answer[f]] for f in query_files], dtype=np.int32),
                support_files=support_files,
                query_files=query_files,
            )
        )
    return runs


def oneshot_episodes(runs: Sequence[OneShotRun]) -> Episodes:
    """Stack runs (of equal sizes) into one :class:`metaprior.data.Episodes` batch,
    one task per run: ``support_x [runs, 20, S, S, 1]``, ``query_y`` the answer keys."""
    return Episodes(
        support_x=np.stack([r.support_x for r in runs]),
        support_y=np.stack([r.support_y for r in runs]),
        query_x=np.stack([r.query_x for r in runs]),
        query_y=np.stack([r.query_y for r in runs]),
    )


def score_oneshot_runs(predictions, runs: Sequence[OneShotRun]) -> float:
    """Error rate of predictions on the one-shot runs, as in Lake et al.: the mean
    over runs of each run's fraction of misclassified test items.

    Args:
        predictions: per run, the predicted support label of each test item
            (``[runs, items]`` ints, or a list of ``[items]``); or scores
            ``[runs, items, ways]`` whose argmax over ways is the prediction.
        runs: the runs, in the same order.

    Returns:
        The error rate in [0, 1].
    """
    if len(predictions) != len(runs):
        raise ValueError(f"{len(predictions)} predictions for {len(runs)} runs")
    errors = []
    for pred, run in zip(predictions, runs):
        pred = np.asarray(pred)
        if pred.ndim == 2:
            pred = pred.argmax(axis=-1)
        if pred.shape != run.query_y.shape:
            raise ValueError(f"run {run.name}: predictions of shape {pred.shape}, expected {run.query_y.shape}")
        errors.append(np.mean(pred != run.query_y))
    return float(np.mean(errors))
