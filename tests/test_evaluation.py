"""The shared evaluation path: exact values on hand-made predictions, chunking invariance,
key scheme, and the errors it raises."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.data import Episodes
from metaprior.inference.diagnostics import expected_calibration_error
from metaprior.inference.evaluation import (
    FewShotEvaluation,
    evaluate_fewshot,
    fewshot_metrics,
    mean_ci95,
    predict_episodes,
    regression_metrics,
)


def _episodes(num=7, ways=3, shots=1, queries=2, seed=0):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(num, ways * shots, 4)).astype(np.float32)
    sy = np.tile(np.repeat(np.arange(ways), shots), (num, 1)).astype(np.int32)
    qy = np.tile(np.repeat(np.arange(ways), queries), (num, 1)).astype(np.int32)
    # queries = the class's support point plus noise: a nearest-prototype rule is mostly right
    qx = sx[:, qy[0] * shots] + 0.3 * rng.normal(size=(num, ways * queries, 4)).astype(np.float32)
    return Episodes(jnp.asarray(sx), jnp.asarray(sy), jnp.asarray(qx), jnp.asarray(qy))


def _prototype_predict(rng_key, sx, sy, qx, noise=0.0):
    d = -jnp.sum((qx[:, :, None] - sx[:, None]) ** 2, -1)  # [E, Q, S] with shots = 1: S = ways
    if noise:
        d = d + noise * jax.random.normal(rng_key, d.shape)
    return jax.nn.softmax(d, -1)


def test_fewshot_metrics_exact_values():
    # two episodes of two queries; episode accuracies 1 and 1/2
    probs = np.array([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]]])
    labels = np.array([[0, 1], [0, 1]])
    m = fewshot_metrics(probs, labels, num_bins=10)
    assert m["acc"] == pytest.approx(0.75)
    assert m["acc_ci95"] == pytest.approx(1.96 * np.std([1.0, 0.5], ddof=1) / math.sqrt(2))
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6, 0.3])))
    assert m["ece"] == pytest.approx(expected_calibration_error(probs.reshape(-1, 2), labels.reshape(-1), 10))


def test_metrics_key_names_keep_ci95_last():
    ev = FewShotEvaluation(np.full((2, 3, 3), 1 / 3), np.zeros((2, 3), int))
    keys = set(ev.metrics(suffix="_5w1s"))
    assert keys == {"acc_5w1s", "acc_5w1s_ci95", "ece_5w1s", "nll_5w1s"}
    assert ev.metrics(prefix="x_")["x_nll"] == pytest.approx(math.log(3))


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_chunking_does_not_change_a_deterministic_predictive(chunk):
    episodes = _episodes()
    whole = _prototype_predict(None, episodes.support_x, episodes.support_y, episodes.query_x)
    ev = evaluate_fewshot(jax.random.key(0), _prototype_predict, episodes, chunk=chunk, progress=False)
    np.testing.assert_array_equal(ev.probs, np.asarray(whole))
    np.testing.assert_array_equal(ev.labels, np.asarray(episodes.query_y))
    assert ev.metrics()["acc"] > 0.5  # the prototype rule works on these episodes


def test_chunk_keys_are_fold_in_of_the_first_episode_index():
    episodes = _episodes(num=5)
    seen = []

    def predict(key, sx, sy, qx):
        seen.append(jax.random.key_data(key))
        return _prototype_predict(key, sx, sy, qx, noise=1.0)

    out = predict_episodes(jax.random.key(3), predict, episodes, chunk=2, progress=False)
    expect = [jax.random.key_data(jax.random.fold_in(jax.random.key(3), i)) for i in (0, 2, 4)]
    for a, b in zip(seen, expect):
        np.testing.assert_array_equal(a, b)
    # the same episodes given as an iterable of batches get the same keys, hence the same output
    batches = [jax.tree.map(lambda a, s=s: a[s : s + 2], episodes) for s in (0, 2, 4)]
    np.testing.assert_array_equal(predict_episodes(jax.random.key(3), predict, batches, progress=False), out)


def test_variant_axis_concatenates_along_episodes():
    episodes = _episodes(num=4)
    two = lambda k, sx, sy, qx: jnp.stack([_prototype_predict(k, sx, sy, qx), _prototype_predict(k, sx, sy, qx) ** 2])
    out = predict_episodes(jax.random.key(0), two, episodes, chunk=3, episode_axis=1, progress=False)
    assert out.shape == (2, 4, 6, 3)  # [variants, episodes, ways * queries, ways]
    np.testing.assert_allclose(out[1], out[0] ** 2, rtol=1e-6)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="labels must lie in"):
        fewshot_metrics(np.full((1, 2, 2), 0.5), np.array([[0, 2]]))
    with pytest.raises(ValueError, match=r"probs must be \[episodes, queries, ways\]"):
        fewshot_metrics(np.full((2, 2), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        fewshot_metrics(np.array([[[np.nan, 1.0]]]), np.array([[0]]))
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        predict_episodes(jax.random.key(0), _prototype_predict, _episodes(), chunk=0)
    with pytest.raises(ValueError, match="values is empty"):
        mean_ci95([])
    with pytest.raises(ValueError, match="predict returned"):
        evaluate_fewshot(jax.random.key(0), lambda k, sx, sy, qx: jnp.ones((7, 1)), _episodes(), progress=False)


def test_regression_metrics_known_gaussian():
    # one draw, f = 0, sigma = 1, y = 0: NLL is 0.5 log(2 pi); y within 1.96 sd is covered
    y = np.array([0.0, 1.0, 2.5])
    m = regression_metrics(np.zeros((1, 3)), y, 1.0, level=0.95)
    assert m["mse"] == pytest.approx(np.mean(y**2))
    assert m["nll"] == pytest.approx(np.mean(0.5 * math.log(2 * math.pi) + 0.5 * y**2))
    assert m["coverage"] == pytest.approx(2 / 3)  # 2.5 > 1.96
    # many draws from the true predictive: coverage near the level (seeded; 20,000 points,
    # binomial sd of the coverage 0.0015, tolerance about 5 sd)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(64, 20_000))
    m = regression_metrics(f, rng.normal(size=20_000) * math.sqrt(2.0), 1.0, level=0.9)
    assert abs(m["coverage"] - 0.9) < 0.008
    with pytest.raises(ValueError, match=r"samples must be \[draws, \*y.shape\]"):
        regression_metrics(np.zeros((2, 3)), np.zeros(4), 1.0)
