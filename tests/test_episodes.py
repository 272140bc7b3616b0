"""The episode sampler: shapes, relabelling, determinism, jit, uniformity, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.data import Episodes, sample_episode_indices, sample_episodes

NUM_CLASSES, NUM_EXAMPLES = 12, 8


def _coded_images(num_classes=NUM_CLASSES, num_examples=NUM_EXAMPLES, side=3):
    """``[classes, examples, side, side, 2]``: channel 0 holds the class index and
    channel 1 the example index, so every sampled image says where it came from."""
    c = np.arange(num_classes, dtype=np.float32)[:, None, None, None]
    e = np.arange(num_examples, dtype=np.float32)[None, :, None, None]
    shape = (num_classes, num_examples, side, side)
    return np.stack([np.broadcast_to(c, shape), np.broadcast_to(e, shape)], axis=-1)


# One jitted sampler for the tests (each eager call compiles every op once).
_sample = jax.jit(sample_episodes, static_argnums=(2, 3, 4, 5))

CONFIGS = [(4, 5, 1, 15 - 8), (3, 2, 3, 5), (1, 12, 1, 0), (2, 1, 8, 0), (5, 3, 0, 2)]


@pytest.mark.parametrize("num_tasks,ways,shots,queries,jit", [c + (True,) for c in CONFIGS] + [CONFIGS[0] + (False,)])
def test_shapes_and_class_major_labels(rng_key, num_tasks, ways, shots, queries, jit):
    sample = _sample if jit else sample_episodes
    ep = sample(rng_key, jnp.asarray(_coded_images()), num_tasks, ways, shots, queries)
    assert isinstance(ep, Episodes)
    assert ep.support_x.shape == (num_tasks, ways * shots, 3, 3, 2)
    assert ep.query_x.shape == (num_tasks, ways * queries, 3, 3, 2)
    assert ep.support_y.shape == (num_tasks, ways * shots) and ep.support_y.dtype == jnp.int32
    assert ep.query_y.shape == (num_tasks, ways * queries) and ep.query_y.dtype == jnp.int32
    assert ep.support_x.dtype == jnp.float32
    for t in range(num_tasks):
        np.testing.assert_array_equal(ep.support_y[t], np.repeat(np.arange(ways), shots))
        np.testing.assert_array_equal(ep.query_y[t], np.repeat(np.arange(ways), queries))


def test_relabelling_is_a_permutation(rng_key):
    num_tasks, ways, shots, queries = 64, 5, 2, 3
    ep = _sample(rng_key, _coded_images(), num_tasks, ways, shots, queries)
    s_cls, s_ex = np.asarray(ep.support_x[:, :, 0, 0, 0]), np.asarray(ep.support_x[:, :, 0, 0, 1])
    q_cls, q_ex = np.asarray(ep.query_x[:, :, 0, 0, 0]), np.asarray(ep.query_x[:, :, 0, 0, 1])
    label_orders = set()
    for t in range(num_tasks):
        label_to_class = {}
        for y, c in zip(np.concatenate([ep.support_y[t], ep.query_y[t]]), np.concatenate([s_cls[t], q_cls[t]])):
            assert label_to_class.setdefault(int(y), c) == c  # one class per label
        classes = [label_to_class[j] for j in range(ways)]
        assert len(set(classes)) == ways  # distinct classes: labels 0..ways-1 are a bijection
        label_orders.add(tuple(np.argsort(classes)))
        for j in range(ways):  # examples of a class are distinct across support and query
            examples = np.concatenate([s_ex[t][ep.support_y[t] == j], q_ex[t][ep.query_y[t] == j]])
            assert len(set(examples)) == shots + queries
    assert len(label_orders) > 10  # the label assignment is random, not sorted by class


def test_same_key_same_episodes(rng_key):
    images = _coded_images()
    a = sample_episodes(rng_key, images, 4, 5, 1, 7)  # eager
    b = _sample(rng_key, jnp.asarray(images), 4, 5, 1, 7)
    c = _sample(jax.random.fold_in(rng_key, 1), images, 4, 5, 1, 7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.support_x, c.support_x)
    # legacy uint32 keys work the same way
    legacy = _sample(jax.random.PRNGKey(3), images, 4, 5, 1, 7)
    assert legacy.support_x.shape == (4, 5, 3, 3, 2)


def test_traces_once_and_vmaps(rng_key):
    traces = []

    @functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
    def sample(key, images, num_tasks, ways, shots, queries):
        traces.append(None)
        return sample_episodes(key, images, num_tasks, ways, shots, queries)

    images = jnp.asarray(_coded_images())
    for i in range(3):
        sample(jax.random.fold_in(rng_key, i), images, 4, 5, 1, 7)
        sample(jax.random.fold_in(rng_key, i), images + 0.0, 4, 5, 1, 7)  # new array, same shape
    assert len(traces) == 1
    keys = jax.random.split(rng_key, 3)
    batched = jax.jit(jax.vmap(lambda k: sample_episodes(k, images, 4, 5, 1, 7)))(keys)
    assert batched.support_x.shape == (3, 4, 5, 3, 3, 2)
    np.testing.assert_array_equal(batched.query_x[1], _sample(keys[1], images, 4, 5, 1, 7).query_x)


def test_keeps_the_image_dtype(rng_key):
    images = (np.arange(NUM_CLASSES * NUM_EXAMPLES, dtype=np.uint8)).reshape(NUM_CLASSES, NUM_EXAMPLES, 1, 1, 1)
    ep = _sample(rng_key, images, 4, 5, 1, 7)
    assert ep.support_x.dtype == jnp.uint8


def test_sampling_is_uniform(rng_key):
    # 20,000 tasks of 3 ways from 10 classes, 2 of 6 examples each. Every count
    # below is binomial; the tolerance is 5 standard deviations of the count
    # (a false alarm has probability ~1e-6 per count).
    num_tasks, num_classes, num_examples, ways, k = 20_000, 10, 6, 3, 2
    idx = jax.jit(sample_episode_indices, static_argnums=range(1, 7))(
        rng_key, num_classes, num_examples, num_tasks, ways, k - 1, 1
    )
    classes, examples = np.asarray(idx.classes), np.asarray(idx.examples)

    def check(counts, n, p):
        assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p))), counts

    check(np.bincount(classes.ravel(), minlength=num_classes), num_tasks, ways / num_classes)
    check(np.bincount(classes[:, 0], minlength=num_classes), num_tasks, 1 / num_classes)  # label 0
    check(np.bincount(examples.ravel(), minlength=num_examples), num_tasks * ways, k / num_examples)
    check(np.bincount(examples[..., 0].ravel(), minlength=num_examples), num_tasks * ways, 1 / num_examples)
    assert all(len(set(row)) == ways for row in classes[:200])
    # every ordered pair (label 0, label 1) of 5 classes: 20 pairs, probability 1/20 each
    idx = jax.jit(sample_episode_indices, static_argnums=range(1, 7))(rng_key, 5, 2, num_tasks, 2, 1, 0)
    pairs = np.asarray(idx.classes) @ np.array([5, 1])
    counts = np.bincount(pairs, minlength=25).reshape(5, 5)
    assert np.all(np.diag(counts) == 0)
    check(counts[~np.eye(5, dtype=bool)], num_tasks, 1 / 20)


@pytest.mark.parametrize(
    "request_,match",
    [
        ((2, NUM_CLASSES + 1, 1, 1), "13-way episodes need 13 classes but the data has 12"),
        ((2, 5, 5, 4), "5 \\+ 4 = 9 examples per class are needed but the data has 8"),
        ((0, 5, 1, 1), "num_tasks >= 1"),
        ((2, 5, 0, 0), "shots \\+ queries >= 1"),
        ((2, 5, -1, 2), "shots >= 0"),
    ],
)
def test_bad_requests_raise(rng_key, request_, match):
    with pytest.raises(ValueError, match=match):
        sample_episodes(rng_key, _coded_images(), *request_)


def test_counts_must_be_static(rng_key):
    with pytest.raises(TypeError, match="static count"):
        sample_episodes(rng_key, _coded_images(), 2, 5.0, 1, 1)
    with pytest.raises(TypeError, match="static count"):
        jax.jit(sample_episodes)(rng_key, _coded_images(), 2, 5, 1, 1)
    with pytest.raises(ValueError, match="classes, examples"):
        sample_episodes(rng_key, np.zeros(4), 1, 1, 1, 0)
