"""Fixed few-shot test beds: one set of episodes that every method is scored on.

A :class:`TestBed` is a pool of class-indexed images, an episode shape (ways, shots,
queries), a count and a key. Its episodes are drawn batch by batch
(:func:`metaprior.data.episode_batches`: the batch starting at episode ``i`` comes from
``fold_in(key, i)``), so they are never all in memory, and every method that iterates
:meth:`TestBed.batches` sees the same images with the same labels, pair for pair.

:func:`fewshot_testbeds` builds the standard beds of ``metaprior run fewshot``:

- ``id``: held-out Omniglot characters (the ``test`` split of
  :func:`metaprior.data.omniglot_splits`);
- ``ood_mnist``: MNIST test digits, one class per digit (892 images each, the smallest
  digit's count), resized to the backbone's input when it is not 28 pixels;
- ``ood_notmnist``: notMNIST test letters A-J, the same way.

MNIST and notMNIST are ink-high in [0, 1], as Omniglot is here (ink 1.0), so the shift is
in what is drawn, not in the pixel convention.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metaprior.data.episodes import Episodes, check_episode_request, episode_batches
from metaprior.data.fewshot import as_class_array

__all__ = ["TestBed", "BEDS", "resize_images", "ood_pool", "fewshot_testbeds", "bed_key"]

BEDS = ("id", "ood_mnist", "ood_notmnist")


class TestBed(NamedTuple):
    """A fixed set of ``num_episodes`` episodes of one shape from one image pool.

    Attributes:
        bed: ``"id"``, ``"ood_mnist"`` or ``"ood_notmnist"`` (or any name).
        images: ``[classes, examples, H, W, C]`` pool.
        ways, shots, queries: the episode shape (``queries`` per class).
        num_episodes: how many episodes.
        key: the episodes' key (the same key gives the same episodes).
    """

    __test__ = False  # not a pytest class

    bed: str
    images: np.ndarray
    ways: int
    shots: int
    queries: int
    num_episodes: int
    key: jax.Array

    @property
    def name(self) -> str:
        """``{bed}_{ways}w{shots}s``, the prefix of its metric keys."""
        return f"{self.bed}_{self.ways}w{self.shots}s"

    def batches(self, batch_size: int = 25) -> Iterator[Episodes]:
        """The episodes, ``batch_size`` at a time (the same for every caller with this
        ``batch_size``)."""
        return episode_batches(
            self.key,
            jnp.asarray(self.images),
            self.num_episodes,
            self.ways,
            self.shots,
            self.queries,
            batch_size=batch_size,
        )


def bed_key(rng_key: jax.Array, bed: str, ways: int, shots: int) -> jax.Array:
    """The key of one bed's episodes: ``rng_key`` folded with the bed and shape, so adding
    or dropping a bed leaves the others' episodes unchanged."""
    key = jax.random.fold_in(rng_key, sum(ord(c) * 31**i for i, c in enumerate(bed)) % (2**31))
    return jax.random.fold_in(jax.random.fold_in(key, ways), shots)


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """``[..., H, W, 1]`` float images in [0, 1] resized to ``image_size`` (Lanczos, as
    :func:`metaprior.data.decode_omniglot_png`); unchanged when already that size."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-3:-1] == (image_size, image_size):
        return images
    from PIL import Image

    flat = images.reshape(-1, *images.shape[-3:])
    out = np.empty((flat.shape[0], image_size, image_size, 1), np.float32)
    for i, im in enumerate(flat):
        pil = Image.fromarray(im[..., 0], mode="F").resize((image_size, image_size), Image.Resampling.LANCZOS)
        out[i, ..., 0] = np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0)
    return out.reshape(*images.shape[:-3], image_size, image_size, 1)


def ood_pool(name: str, image_size: int = 28, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The class-indexed test images of MNIST (``"ood_mnist"``) or notMNIST
    (``"ood_notmnist"``): ``[10, 892 | n, image_size, image_size, 1]``."""
    from metaprior.data.idx import load_mnist, load_notmnist

    loaders = {"ood_mnist": load_mnist, "ood_notmnist": load_notmnist}
    if name not in loaders:
        raise ValueError(f"name must be one of {sorted(loaders)}, got {name!r}")
    x, y = loaders[name]("test", data_dir)
    return resize_images(as_class_array(x, y).images, image_size)


def fewshot_testbeds(
    rng_key: jax.Array,
    pools: Mapping[str, np.ndarray],
    shapes: Mapping[str, Sequence[tuple[int, int]]],
    *,
    num_episodes: int,
    queries: int,
) -> list[TestBed]:
    """One :class:`TestBed` per bed and ``(ways, shots)``.

    Args:
        rng_key: the key of all beds (each bed's own: :func:`bed_key`).
        pools: ``{bed: images [classes, examples, H, W, C]}``.
        shapes: ``{bed: [(ways, shots), ...]}``; every bed named must have a pool.
        num_episodes: episodes per bed.
        queries: queries per class.

    Raises:
        ValueError: a bed without a pool, a shape the pool cannot give (too many ways or
            shots + queries), ``num_episodes < 1``, or pools of different image shapes.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    missing = sorted(set(shapes) - set(pools))
    if missing:
        raise ValueError(f"shapes names beds without a pool: {missing}; pools: {sorted(pools)}")
    item = {bed: tuple(np.shape(pools[bed])[2:]) for bed in shapes}
    if len(set(item.values())) > 1:
        raise ValueError(f"pools must share one image shape, got {item}")
    beds = []
    for bed, bed_shapes in shapes.items():
        classes, examples = np.shape(pools[bed])[:2]
        for ways, shots in bed_shapes:
            try:
                check_episode_request(classes, examples, num_episodes, ways, shots, queries)
            except ValueError as err:
                raise ValueError(f"bed {bed!r}, {ways}-way {shots}-shot: {err}") from err
            key = bed_key(rng_key, bed, ways, shots)
            beds.append(TestBed(bed, np.asarray(pools[bed]), ways, shots, queries, num_episodes, key))
    return beds
