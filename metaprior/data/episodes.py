"""N-way K-shot episodes sampled on device, with fixed shapes.

:func:`sample_episodes` is a pure function of a key and a class-indexed image
array ``[classes, examples, H, W, C]`` (``FewShotDataset.images``). The counts are
Python ints, so under ``jax.jit`` every output has a static shape and sampling runs
inside the meta-training step with no host round trip. Pass the image array as an
argument of the jitted function (a device array), not as a closed-over NumPy
array, which would be embedded in the compiled program as a constant.

Sampling, per task: ``ways`` distinct classes uniformly at random (in random order),
then for each class ``shots + queries`` distinct examples uniformly at random; the
first ``shots`` go to the support set and the rest to the query set. The label of a
class is its position among the task's chosen classes, so labels are ``0..ways-1``
and their assignment to classes is a uniformly random permutation.

Layout (class-major): ``support_y = [0]*shots + [1]*shots + ... + [ways-1]*shots``
and ``query_y = [0]*queries + ...``, so ``support_x.reshape(T, ways, shots, ...)``
groups the shots of each class (prototypes are a mean over axis 2). Models that
read the support set as a sequence should permute it themselves.

References:
    Vinyals et al. (2016). Matching networks for one shot learning (the episode
    protocol). Finn, Abbeel, Levine (2017). Model-agnostic meta-learning (MAML).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Episodes",
    "EpisodeIndices",
    "sample_episode_indices",
    "sample_episodes",
    "episode_batches",
    "check_episode_request",
]


class Episodes(NamedTuple):
    """A batch of classification tasks.

    Attributes:
        support_x: ``[tasks, ways * shots, H, W, C]``.
        support_y: ``[tasks, ways * shots]`` int32 in ``0..ways-1`` (class-major).
        query_x: ``[tasks, ways * queries, H, W, C]``.
        query_y: ``[tasks, ways * queries]`` int32 in ``0..ways-1`` (class-major).
    """

    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array


class EpisodeIndices(NamedTuple):
    """Which images an episode batch is made of.

    Attributes:
        classes: ``[tasks, ways]`` class indices; label ``j`` of task ``t`` is class
            ``classes[t, j]``.
        examples: ``[tasks, ways, shots + queries]`` example indices within each class.
    """

    classes: jax.Array
    examples: jax.Array


def check_episode_request(
    num_classes: int, num_examples: int, num_tasks: int, ways: int, shots: int, queries: int
) -> None:
    """Raise ``ValueError`` unless the counts describe a possible episode batch."""
    for name, value in (("num_tasks", num_tasks), ("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a Python int (a static count), got {type(value).__name__}")
    if num_tasks < 1 or ways < 1 or shots < 0 or queries < 0 or shots + queries < 1:
        raise ValueError(
            f"need num_tasks >= 1, ways >= 1, shots >= 0, queries >= 0 and "
            f"shots + queries >= 1; got num_tasks={num_tasks}, ways={ways}, "
            f"shots={shots}, queries={queries}"
        )
    if ways > num_classes:
        raise ValueError(f"{ways}-way episodes need {ways} classes but the data has {num_classes}")
    if shots + queries > num_examples:
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {shots + queries} examples per "
            f"class are needed but the data has {num_examples} per class"
        )


def _random_subset(rng_key: jax.Array, shape: tuple[int, ...], n: int, k: int) -> jax.Array:
    """``[*shape, k]`` int32: for each leading index, ``k`` distinct values of ``0..n-1``,
    a uniformly random subset in uniformly random order.

    Floyd's algorithm draws the subset in ``k`` steps whatever ``n`` (step ``i`` draws
    ``t`` uniform in ``0..j`` with ``j = n - k + i`` and takes ``t``, or ``j`` if ``t``
    was taken already); a random permutation (argsort of uniforms) then orders it.
    The cost is ``O(k**2)`` per row instead of ``O(n)`` or a sort over ``n``, which
    matters for thousands of classes.

    References:
        Bentley, Floyd (1987). Programming pearls: a sample of brilliance. CACM 30(9).
    """
    k_subset, k_order = jax.random.split(rng_key)

    def body(i, chosen):
        j = n - k + i
        t = jax.random.randint(jax.random.fold_in(k_subset, i), shape, 0, j + 1, dtype=jnp.int32)
        taken = jnp.any(chosen == t[..., None], axis=-1)
        return chosen.at[..., i].set(jnp.where(taken, j, t))

    chosen = jax.lax.fori_loop(0, k, body, jnp.full((*shape, k), -1, jnp.int32))
    order = jnp.argsort(jax.random.uniform(k_order, (*shape, k)), axis=-1)
    return jnp.take_along_axis(chosen, order, axis=-1)


def sample_episode_indices(
    rng_key: jax.Array, num_classes: int, num_examples: int, num_tasks: int, ways: int, shots: int, queries: int
) -> EpisodeIndices:
    """The class and example indices of a batch of episodes (see the module docstring).

    Args:
        rng_key: a JAX PRNG key.
        num_classes, num_examples: the data's ``[classes, examples]`` sizes.
        num_tasks, ways, shots, queries: static counts.

    Returns:
        :class:`EpisodeIndices`.

    Raises:
        ValueError: ``ways > num_classes`` or ``shots + queries > num_examples``.
    """
    check_episode_request(num_classes, num_examples, num_tasks, ways, shots, queries)
    k_classes, k_examples = jax.random.split(rng_key)
    classes = _random_subset(k_classes, (num_tasks,), num_classes, ways)
    examples = _random_subset(k_examples, (num_tasks, ways), num_examples, shots + queries)
    return EpisodeIndices(classes, examples)


def sample_episodes(rng_key: jax.Array, images, num_tasks: int, ways: int, shots: int, queries: int) -> Episodes:
    """Sample a batch of N-way K-shot classification episodes.

    Pure and jit-able with the counts static, e.g.
    ``jax.jit(sample_episodes, static_argnums=(2, 3, 4, 5))``; the same key gives the
    same episodes.

    Args:
        rng_key: a JAX PRNG key.
        images: ``[classes, examples, H, W, C]`` (``FewShotDataset.images``, NumPy or JAX).
        num_tasks: tasks in the batch.
        ways: classes per task.
        shots: support examples per class.
        queries: query examples per class.

    Returns:
        :class:`Episodes` with ``support_x [num_tasks, ways*shots, H, W, C]``,
        ``support_y [num_tasks, ways*shots]`` int32, ``query_x [num_tasks,
        ways*queries, H, W, C]``, ``query_y [num_tasks, ways*queries]`` int32; images
        keep the dtype of ``images``.

    Raises:
        ValueError: more ways than classes, or ``shots + queries`` more than the
            examples per class.
    """
    images = jnp.asarray(images)
    if images.ndim < 2:
        raise ValueError(f"images must be [classes, examples, ...], got shape {images.shape}")
    num_classes, num_examples = images.shape[:2]
    idx = sample_episode_indices(rng_key, num_classes, num_examples, num_tasks, ways, shots, queries)
    # [T, W, S+Q, ...] in one gather.
    picked = images[idx.classes[:, :, None], idx.examples]
    item = images.shape[2:]
    support_x = picked[:, :, :shots].reshape(num_tasks, ways * shots, *item)
    query_x = picked[:, :, shots:].reshape(num_tasks, ways * queries, *item)
    labels = jnp.arange(ways, dtype=jnp.int32)
    support_y = jnp.broadcast_to(jnp.repeat(labels, shots), (num_tasks, ways * shots))
    query_y = jnp.broadcast_to(jnp.repeat(labels, queries), (num_tasks, ways * queries))
    return Episodes(support_x, support_y, query_x, query_y)


def episode_batches(
    rng_key: jax.Array, images, num_tasks: int, ways: int, shots: int, queries: int, *, batch_size: int
) -> Iterator[Episodes]:
    """``num_tasks`` episodes as a stream of batches of at most ``batch_size`` (bounded memory).

    The batch starting at episode ``i`` is ``sample_episodes(fold_in(rng_key, i), ...)``,
    so the same key and ``batch_size`` give the same episodes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sample = jax.jit(sample_episodes, static_argnums=(2, 3, 4, 5))
    for i in range(0, num_tasks, batch_size):
        yield sample(jax.random.fold_in(rng_key, i), images, min(batch_size, num_tasks - i), ways, shots, queries)
