"""Synthetic task generators: shapes, determinism, documented ranges, input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.data.tasks import (
    TaskBatch,
    check_task_batch,
    harmonic_fn,
    harmonic_second_moment,
    harmonic_tasks,
    sinusoid_fn,
    sinusoid_tasks,
    split_support_query,
)


def test_harmonic_shapes_ranges_and_counts(rng_key):
    batch, p = harmonic_tasks(rng_key, 500, 50, min_examples=4, noise_std=0.0)
    assert batch.x.shape == (500, 50, 1) and batch.y.shape == (500, 50) and batch.mask.shape == (500, 50)
    counts = np.asarray(batch.mask.sum(1))
    assert counts.min() >= 4 and counts.max() <= 50
    # masks are prefixes: example slots are filled from the left
    assert np.all(np.diff(np.asarray(batch.mask, int), axis=1) <= 0)
    assert 5 <= float(p.omega.min()) and float(p.omega.max()) <= 7
    assert -4 <= float(p.mu_x.min()) and float(p.mu_x.max()) <= 4
    assert 0 <= float(p.b1.min()) and float(p.b2.max()) <= 2 * math.pi
    # noiseless targets are exactly the harmonic function of the inputs
    np.testing.assert_allclose(batch.y, harmonic_fn(p, batch.x[..., 0]), rtol=1e-6, atol=1e-6)


def test_harmonic_noise_and_inputs_statistics(rng_key):
    batch, p = harmonic_tasks(rng_key, 400, 64, noise_std=0.05)
    resid = np.asarray(batch.y - harmonic_fn(p, batch.x[..., 0]))
    # 25,600 draws: the sample std of N(0, 0.05^2) is within 2% of 0.05 with overwhelming probability
    assert abs(resid.std() - 0.05) < 0.001
    xs = np.asarray(batch.x[..., 0] - p.mu_x[:, None])
    assert abs(xs.std() - 1.0) < 0.02  # x ~ N(mu_x, 1): same argument, 2% band


def test_harmonic_second_moment_is_the_mean_of_y_squared(rng_key):
    """``E[y^2] = 1 + noise^2`` at every input: the control variate's known mean in the harmonic run.
    40,000 tasks x 8 points; y^2 per task has sd about 1.2 (amplitudes N(0, 1)), so the mean of the
    per-task means has sd about 0.006 and 0.03 is 5 sd. Also per input region: the identity holds
    whatever x is (tasks far left and far right of the range)."""
    noise = 0.3
    batch, p = harmonic_tasks(rng_key, 40_000, 8, noise_std=noise)
    per_task = np.asarray(jnp.mean(batch.y**2, axis=1))
    assert abs(per_task.mean() - harmonic_second_moment(noise)) < 0.03
    assert harmonic_second_moment(noise) == pytest.approx(1.09)
    for side in (np.asarray(p.mu_x) < -2, np.asarray(p.mu_x) > 2):  # about 10,000 tasks each: sd 0.012
        assert abs(per_task[side].mean() - harmonic_second_moment(noise)) < 0.06


def test_same_key_same_tasks_other_key_other_tasks(rng_key):
    a, _ = harmonic_tasks(rng_key, 8, 10, min_examples=2)
    b, _ = harmonic_tasks(rng_key, 8, 10, min_examples=2)
    c, _ = harmonic_tasks(jax.random.key(1), 8, 10, min_examples=2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a.y, c.y)


def test_sinusoid_family(rng_key):
    batch, p = sinusoid_tasks(rng_key, 1000, 20)
    assert batch.x.shape == (1000, 20, 1) and bool(batch.mask.all())
    assert 0.1 <= float(p.amplitude.min()) and float(p.amplitude.max()) <= 5.0
    assert 0 <= float(p.phase.min()) and float(p.phase.max()) <= math.pi
    assert -5 <= float(batch.x.min()) and float(batch.x.max()) <= 5
    np.testing.assert_allclose(batch.y, sinusoid_fn(p, batch.x[..., 0]), rtol=1e-6)


def test_generators_jit(rng_key):
    f = jax.jit(lambda k: harmonic_tasks(k, 4, 6, min_examples=3)[0])
    eager = harmonic_tasks(rng_key, 4, 6, min_examples=3)[0]
    jitted = f(rng_key)
    np.testing.assert_array_equal(jitted.mask, eager.mask)
    # float32 sin at arguments up to ~100 (2 w x) is accurate to ~1e-5 absolute; XLA may fuse it differently
    np.testing.assert_allclose(jitted.y, eager.y, atol=1e-4)


def test_split_support_query(rng_key):
    batch, _ = sinusoid_tasks(rng_key, 3, 10)
    s, q = split_support_query(batch, 4)
    assert s.x.shape == (3, 4, 1) and q.y.shape == (3, 6)
    np.testing.assert_array_equal(jnp.concatenate([s.y, q.y], 1), batch.y)
    with pytest.raises(ValueError, match="num_support"):
        split_support_query(batch, 10)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda b: b._replace(x=b.x[..., 0]), r"batch\.x must have shape"),
        (lambda b: b._replace(y=b.y[:, :3]), r"batch\.y must have shape"),
        (lambda b: b._replace(mask=b.mask[:, :3]), r"batch\.mask must have shape"),
        (lambda b: b._replace(y=b.y.at[0, 0].set(jnp.nan)), r"batch\.y contains NaN"),
        (lambda b: b._replace(x=b.x.at[1, 2, 0].set(jnp.inf)), r"batch\.x contains NaN"),
        (lambda b: b._replace(mask=b.mask.at[2].set(False)), r"empty support set"),
    ],
)
def test_check_task_batch_errors(rng_key, bad, match):
    batch, _ = sinusoid_tasks(rng_key, 3, 5)
    check_task_batch(batch)
    with pytest.raises(ValueError, match=match):
        check_task_batch(bad(batch))


def test_nan_in_padding_is_fine(rng_key):
    batch, _ = harmonic_tasks(rng_key, 3, 6)
    batch = TaskBatch(batch.x, batch.y.at[0, 5].set(jnp.nan), batch.mask.at[0, 5].set(False))
    check_task_batch(batch)  # masked slots never enter a likelihood


@pytest.mark.parametrize("kwargs", [dict(num_tasks=0), dict(num_examples=-1), dict(num_tasks=2.5)])
def test_bad_counts(rng_key, kwargs):
    args = dict(num_tasks=2, num_examples=3) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        harmonic_tasks(rng_key, **args)
