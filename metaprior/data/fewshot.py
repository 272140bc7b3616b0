"""The class-indexed layout every few-shot loader returns, and operations on it.

A :class:`FewShotDataset` holds ``images [classes, examples, H, W, C]``: the same
number of examples for every class, so an N-way K-shot episode is a gather with
fixed shapes (see :func:`metaprior.data.sample_episodes`). Each class has a name
and a *group* (the alphabet of an Omniglot character), and splits are made by
group so that no alphabet is seen both in meta-training and in evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "balanced_order",
    "FewShotDataset",
    "as_class_array",
    "split_by_group",
    "mix_held_out",
    "with_rotations",
    "SPLIT_NAMES",
]

SPLIT_NAMES = ("train", "val", "test")


class FewShotDataset(NamedTuple):
    """Images grouped by class.

    Attributes:
        images: ``[classes, examples, H, W, C]``, float32 in [0, 1] (Omniglot: ink
            1.0, background 0.0) unless a loader was asked for another dtype.
        class_names: one name per class, e.g. ``"Greek/character03"``.
        groups: the group of each class (the Omniglot alphabet; for data sets without
            a hierarchy, the class name itself).
    """

    images: np.ndarray
    class_names: tuple[str, ...]
    groups: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_examples(self) -> int:
        """Examples per class."""
        return int(self.images.shape[1])

    def select(self, classes: Sequence[int] | np.ndarray) -> FewShotDataset:
        """The sub-dataset of the given class indices (in that order)."""
        idx = np.asarray(classes, dtype=np.int64).reshape(-1)
        return FewShotDataset(
            self.images[idx], tuple(self.class_names[i] for i in idx), tuple(self.groups[i] for i in idx)
        )


def as_class_array(
    images: np.ndarray, labels: np.ndarray, num_per_class: int | None = None, class_names: Sequence[str] | None = None
) -> FewShotDataset:
    """Turn a labelled set (MNIST-style) into the class-indexed layout.

    Classes are the sorted distinct labels. Each class keeps its first
    ``num_per_class`` examples in the order they appear; with ``num_per_class=None``
    every class is truncated to the size of the smallest class (MNIST test: 892, the
    count of digit 5), so that all classes have equally many examples.

    Args:
        images: ``[N, ...]`` (e.g. ``[N, 28, 28, 1]``).
        labels: ``[N]`` integer labels.
        num_per_class: examples kept per class; ``None`` for the smallest class count.
        class_names: a name per distinct label (sorted order); default ``str(label)``.

    Returns:
        ``FewShotDataset`` with ``images [classes, num_per_class, ...]`` and each
        class its own group.

    Raises:
        ValueError: a class has fewer than ``num_per_class`` examples, or the lengths
            of ``images`` and ``labels`` differ.
    """
    images = np.asarray(images)
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    classes, counts = np.unique(labels, return_counts=True)
    if num_per_class is None:
        num_per_class = int(counts.min()) if len(counts) else 0
    short = [(c, n) for c, n in zip(classes, counts) if n < num_per_class]
    if short:
        raise ValueError(
            f"num_per_class={num_per_class} but classes have fewer examples: {', '.join(f'{c}: {n}' for c, n in short)}"
        )
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = order[starts[:, None] + np.arange(num_per_class)[None, :]]
    if class_names is None:
        class_names = tuple(str(c) for c in classes)
    elif len(class_names) != len(classes):
        raise ValueError(f"{len(class_names)} class names for {len(classes)} classes")
    names = tuple(class_names)
    return FewShotDataset(images[idx], names, names)


def _assign_groups(sizes: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """Split index of each group (groups in the order given, already shuffled).

    Each group goes to the split furthest below its target number of classes
    (``fraction * total``); while there are no more groups left than splits with a
    positive fraction and no group yet, the group goes to one of those, so every such
    split gets at least one group when there are enough groups.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or np.any(f < 0) or f.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    target = f / f.sum() * float(sum(sizes))
    classes = np.zeros(len(f))
    groups = np.zeros(len(f), dtype=int)
    out = []
    for i, size in enumerate(sizes):
        empty = np.flatnonzero((f > 0) & (groups == 0))
        candidates = empty if len(sizes) - i <= len(empty) else np.flatnonzero(f > 0)
        split = int(candidates[np.argmax((target - classes)[candidates])])
        classes[split] += size
        groups[split] += 1
        out.append(split)
    return out


def split_by_group(
    dataset: FewShotDataset, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, FewShotDataset]:
    """Split classes into train / val / test by group (Omniglot: by alphabet).

    The distinct groups are shuffled with ``seed`` and dealt out in that order, each
    to the split furthest below its share of the classes (``fractions`` are
    fractions of *classes*, met as closely as whole groups allow; a split with a
    positive fraction gets at least one group when there are enough groups). Every
    class of a group lands in the same split, so the splits are disjoint by class
    and by group. Within a split, classes keep their order in ``dataset``.

    With the two small Omniglot background sets (242 characters, 8 alphabets) and
    ``seed=0`` this gives 152 / 42 / 48 characters (5 / 1 / 2 alphabets).

    Args:
        dataset: the classes to split.
        fractions: relative sizes of (train, val, test), in classes.
        seed: seed of the group shuffle (a fixed seed gives a fixed split).

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``.
    """
    if len(fractions) != len(SPLIT_NAMES):
        raise ValueError(f"fractions must have {len(SPLIT_NAMES)} entries (train, val, test)")
    groups = sorted(set(dataset.groups))
    # An explicit, seeded generator (no global state): the split is a pure function of seed.
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    sizes = [dataset.groups.count(g) for g in order]
    split_of = dict(zip(order, _assign_groups(sizes, fractions)))
    return {
        name: dataset.select([c for c, g in enumerate(dataset.groups) if split_of[g] == s])
        for s, name in enumerate(SPLIT_NAMES)
    }


def mix_held_out(splits: dict[str, FewShotDataset], seed: int = 0) -> dict[str, FewShotDataset]:
    """Re-deal the val and test classes by class within each group; train unchanged.

    :func:`split_by_group` keeps whole groups together, so with few groups val and
    test are each one or two alphabets, and one alphabet's difficulty is not
    another's: on the small Omniglot sets (``seed=0``) the val alphabet is much
    harder than the two test alphabets, so a setting chosen on val (a predictive
    prior precision, a temperature) is chosen for the wrong difficulty. This pools the
    val and test classes and deals every held-out group's classes between val and
    test in the proportion of their current sizes (a seeded shuffle per group), so the
    two splits share their groups and follow the same distribution. They stay
    disjoint by class, and both stay disjoint from train by group.

    Args:
        splits: ``{"train", "val", "test"}`` as :func:`split_by_group` returns them.
        seed: seed of the per-group class shuffle.

    Returns:
        ``{"train", "val", "test"}``; ``train`` is the same object as given.
    """
    val, test = splits["val"], splits["test"]
    if val.num_classes == 0 or test.num_classes == 0:
        raise ValueError(
            f"splits: val and test must both have classes to mix, got {val.num_classes} and {test.num_classes}"
        )
    pool = FewShotDataset(
        np.concatenate([val.images, test.images]), val.class_names + test.class_names, val.groups + test.groups
    )
    share = val.num_classes / pool.num_classes
    rng = np.random.default_rng(seed)
    val_idx, test_idx = [], []
    for group in sorted(set(pool.groups)):
        members = [c for c, g in enumerate(pool.groups) if g == group]
        members = [members[i] for i in rng.permutation(len(members))]
        cut = int(round(share * len(members)))
        val_idx += members[:cut]
        test_idx += members[cut:]
    if not val_idx or not test_idx:
        raise ValueError("mix_held_out: too few held-out classes to give both val and test one")
    return {"train": splits["train"], "val": pool.select(sorted(val_idx)), "test": pool.select(sorted(test_idx))}


ROTATIONS = (0, 90, 180, 270)


def with_rotations(dataset: FewShotDataset) -> FewShotDataset:
    """Add the 90, 180 and 270 degree rotations of every class as new classes.

    The standard Omniglot augmentation (Santoro et al. 2016; Vinyals et al. 2016;
    Finn et al. 2017): a rotated character is a different character. The result has
    ``4 * classes`` classes, in blocks: the originals first (``images[:classes]`` is
    ``dataset.images``), then all rotated by 90 degrees (counter-clockwise), then
    180, then 270. Names get a ``"/rot090"`` (etc.) suffix; groups are unchanged, so
    a later :func:`split_by_group` keeps rotations with their alphabet.

    Args:
        dataset: square images ``[classes, examples, S, S, C]``.

    Returns:
        ``FewShotDataset`` with ``images [4 * classes, examples, S, S, C]``.
    """
    h, w = dataset.images.shape[2:4]
    if h != w:
        raise ValueError(f"rotations need square images, got {h}x{w}")
    images = np.concatenate([np.rot90(dataset.images, k, axes=(2, 3)) for k in range(4)], axis=0)
    names = tuple(n if r == 0 else f"{n}/rot{r:03d}" for r in ROTATIONS for n in dataset.class_names)
    return FewShotDataset(np.ascontiguousarray(images), names, dataset.groups * len(ROTATIONS))


def balanced_order(order: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Reorder ``order`` (indices into ``labels``) so that every prefix is as class-balanced
    as the classes allow: the first occurrence of each class in ``order``, then the second
    of each, and so on, each round in ``order``'s order. A training set of size ``N`` taken
    as a prefix then has ``N / classes`` examples per class (stratified, as the deep weight
    prior's code splits MNIST), and the sizes stay nested.

    Raises:
        ValueError: ``order`` is not a 1-D array of indices into ``labels``.
    """
    order, labels = np.asarray(order), np.asarray(labels)
    if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= labels.shape[0])):
        raise ValueError(f"order must be 1-D indices into labels ({labels.shape[0]}), got shape {order.shape}")
    cls = labels[order]
    rank = np.zeros(order.shape[0], np.int64)
    seen: dict = {}
    for i, c in enumerate(cls.tolist()):
        rank[i] = seen.get(c, 0)
        seen[c] = rank[i] + 1
    return order[np.lexsort((np.arange(order.shape[0]), rank))]
