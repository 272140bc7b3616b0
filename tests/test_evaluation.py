"""The shared evaluation path: exact values on hand-made predictions, chunking invariance,
key scheme, and the errors it raises."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.data import Episodes
from metaprior.inference.diagnostics import expected_calibration_error
from metaprior.inference.evaluation import (
    FewShotEvaluation,
    control_variate_ci95,
    episode_bootstrap,
    evaluate_fewshot,
    fewshot_bootstrap,
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


def test_control_variate_ci95_exact_identity_and_coverage():
    """A value that is an exact linear function of the control has zero variance left: the
    estimate is that function at the known mean. With noise, the estimate is unbiased and its
    interval covers the true mean at its nominal rate while being much narrower than the plain
    one. 4,000 replications of 200 draws (rho = 0.95): the coverage has a binomial sd of 0.0034,
    so [0.935, 0.965] is over 4 sd either side of 0.95; the bias bound 0.01 is about 6 sd of the
    mean of 4,000 estimates (each with sd about 0.045)."""
    rng = np.random.default_rng(0)
    c = rng.gamma(2.0, 0.5, size=300)  # known mean 1.0
    mean, half = control_variate_ci95(3.0 + 2.0 * c, c, 1.0)
    assert mean == pytest.approx(5.0) and half == pytest.approx(0.0, abs=1e-9)
    covered, estimates, widths = 0, [], []
    for _ in range(4000):
        c = rng.gamma(2.0, 0.5, size=200)  # mean 1, sd 0.71
        v = 0.5 + 0.8 * c + rng.normal(0.0, 0.18, size=200)  # mean 1.3; corr(v, c) about 0.95
        mean, half = control_variate_ci95(v, c, 1.0)
        covered += abs(mean - 1.3) <= half
        estimates.append(mean)
        widths.append(half / mean_ci95(v)[1])
    assert 0.935 <= covered / 4000 <= 0.965
    assert abs(np.mean(estimates) - 1.3) < 0.01
    assert np.median(widths) < 0.4  # sqrt(1 - rho^2) is about 0.31
    with pytest.raises(ValueError, match="values has 3 entries but control has 2"):
        control_variate_ci95([1.0, 2.0, 3.0], [1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="at least 3"):
        control_variate_ci95([1.0, 2.0], [1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="finite"):
        control_variate_ci95([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], 0.0)


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


# --------------------------------------------------------------------------- bootstrap


def _exact_bootstrap(num_episodes, statistic):
    """The exact bootstrap distribution of ``statistic(indices)``: every multiset of
    ``num_episodes`` episode indices with its multinomial probability
    ``E! / prod(count_i!) / E**E``. Returns ``(sorted values, their CDF)``."""
    values, weights = [], []
    for multiset in itertools.combinations_with_replacement(range(num_episodes), num_episodes):
        counts = np.bincount(multiset, minlength=num_episodes)
        ways = math.factorial(num_episodes) / math.prod(math.factorial(c) for c in counts)
        values.append(statistic(np.array(multiset)))
        weights.append(ways / num_episodes**num_episodes)
    assert len(values) == math.comb(2 * num_episodes - 1, num_episodes)
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    order = np.argsort(values, kind="stable")
    return np.asarray(values)[order], np.cumsum(np.asarray(weights)[order])


def _quantile(values, cdf, u):
    """The exact ``u``-quantile ``min{v : F(v) >= u}`` (``u`` clipped to [0, 1])."""
    u = min(max(u, 0.0), 1.0)
    return values[min(np.searchsorted(cdf, u - 1e-12), len(values) - 1)]


def _assert_within_exact_quantiles(end, values, cdf, u, num_resamples):
    # The empirical u-quantile of n draws lies between the exact quantiles at u -+ delta
    # unless the empirical CDF at them is off by more than delta; with delta five binomial
    # sds, sqrt(u (1 - u) / n) (0.0077 at u = 0.05 and n = 20,000), that has probability
    # under 1e-6, so the check holds for any seed, not only this one.
    delta = 5 * math.sqrt(u * (1 - u) / num_resamples)
    lo, hi = _quantile(values, cdf, u - delta), _quantile(values, cdf, u + delta)
    assert lo - 1e-12 <= end <= hi + 1e-12, (end, lo, hi, u)


def test_episode_bootstrap_matches_the_exact_bootstrap_distribution():
    data = np.array([0.0, 1.0, 3.0])  # 3 episodes: 10 multisets
    seen = []

    def mean(idx):
        seen.append(idx)
        return data[idx].mean()

    values, cdf = _exact_bootstrap(3, mean)
    seen.clear()
    lo, hi = episode_bootstrap(mean, 3, num_resamples=20_000, level=0.8, seed=1)
    assert len(seen) == 20_000 and all(idx.shape == (3,) and 0 <= idx.min() and idx.max() < 3 for idx in seen)
    _assert_within_exact_quantiles(lo, values, cdf, 0.1, 20_000)
    _assert_within_exact_quantiles(hi, values, cdf, 0.9, 20_000)
    # the exact distribution here: 1/27 at 0 and at 3 (all one episode); Q(0.1) = 1/3, Q(0.9) = 7/3
    assert (_quantile(values, cdf, 0.1), _quantile(values, cdf, 0.9)) == pytest.approx((1 / 3, 7 / 3))
    assert episode_bootstrap(mean, 3, num_resamples=50, seed=4) == episode_bootstrap(mean, 3, num_resamples=50, seed=4)


def test_fewshot_bootstrap_matches_the_exact_bootstrap_distribution():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(4, 3))  # 4 episodes of 3 queries, 3 ways: 35 multisets
    labels = rng.integers(0, 3, size=(4, 3))
    out = fewshot_bootstrap(probs, labels, num_resamples=20_000, level=0.9, seed=0, num_bins=5)
    assert set(out) == {"acc_lo", "acc_hi", "ece_lo", "ece_hi", "nll_lo", "nll_hi"}
    for name in ("acc", "ece", "nll"):
        # the metric of a resample is fewshot_metrics of its episodes (ECE, NLL over their pooled queries)
        values, cdf = _exact_bootstrap(4, lambda idx: fewshot_metrics(probs[idx], labels[idx], num_bins=5)[name])
        assert values[0] < values[-1]  # a non-degenerate distribution
        _assert_within_exact_quantiles(out[f"{name}_lo"], values, cdf, 0.05, 20_000)
        _assert_within_exact_quantiles(out[f"{name}_hi"], values, cdf, 0.95, 20_000)
        assert out[f"{name}_lo"] <= fewshot_metrics(probs, labels, num_bins=5)[name] <= out[f"{name}_hi"]
    ev = FewShotEvaluation(probs, labels)
    assert ev.bootstrap(num_resamples=20_000, level=0.9, seed=0, num_bins=5) == out


def test_fewshot_bootstrap_two_episodes_by_hand():
    # 2 ways, 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]; confidence = top probability.
    # episode 0: conf .9 right (bin 5), conf .7 wrong (bin 4):
    #   ECE = 1/2 |1 - .9| + 1/2 |0 - .7| = 0.4; accuracy 1/2; NLL = -(log .9 + log .3) / 2
    # episode 1: conf .65 right (bin 4), conf .95 right (bin 5):
    #   ECE = 1/2 |1 - .65| + 1/2 |1 - .95| = 0.2; accuracy 1; NLL = -(log .65 + log .95) / 2
    # both pooled: bin 5 holds .9, .95 (both right): |1 - .925| = .075, weight 2/4;
    #   bin 4 holds .7 (wrong), .65 (right): |.5 - .675| = .175, weight 2/4; ECE = 0.125
    probs = np.array([[[0.9, 0.1], [0.7, 0.3]], [[0.35, 0.65], [0.05, 0.95]]])
    labels = np.array([[0, 1], [1, 1]])
    assert fewshot_metrics(probs, labels, num_bins=5)["ece"] == pytest.approx(0.125, abs=1e-12)
    assert fewshot_metrics(probs[[0, 0]], labels[[0, 0]], num_bins=5)["ece"] == pytest.approx(0.4, abs=1e-12)
    assert fewshot_metrics(probs[[1, 1]], labels[[1, 1]], num_bins=5)["ece"] == pytest.approx(0.2, abs=1e-12)
    # Resamples {0, 0}, {0, 1}, {1, 1} have probabilities 1/4, 1/2, 1/4, so the bootstrap ECE is
    # 0.4 / 0.125 / 0.2. At level 0.9 the ends are the 5% and 95% quantiles, inside the lowest
    # and highest atoms (each holds >= 1/4 of the mass; with 4,000 resamples the chance that
    # either holds under 5% of them is below 1e-100): exactly the smallest and largest values.
    out = fewshot_bootstrap(probs, labels, num_resamples=4000, level=0.9, seed=0, num_bins=5)
    nll0, nll1 = -(math.log(0.9) + math.log(0.3)) / 2, -(math.log(0.65) + math.log(0.95)) / 2
    expect = dict(acc_lo=0.5, acc_hi=1.0, ece_lo=0.125, ece_hi=0.4, nll_lo=nll1, nll_hi=nll0)
    assert out == pytest.approx(expect, abs=1e-9)


def test_identical_episodes_give_a_zero_width_interval_at_the_point_value():
    one = np.array([[[0.8, 0.1, 0.1], [0.3, 0.5, 0.2], [0.25, 0.25, 0.5]]])
    probs, labels = np.repeat(one, 5, axis=0), np.tile([[0, 0, 2]], (5, 1))
    point = fewshot_metrics(probs, labels)
    out = fewshot_bootstrap(probs, labels, num_resamples=200, seed=3)
    for name in ("acc", "ece", "nll"):
        assert out[f"{name}_lo"] == pytest.approx(point[name], abs=1e-12)
        assert out[f"{name}_hi"] == pytest.approx(point[name], abs=1e-12)


def test_bootstrap_errors_name_the_argument():
    stat = lambda idx: float(idx.mean())
    with pytest.raises(ValueError, match="num_resamples must be an int >= 1, got 0"):
        episode_bootstrap(stat, 3, num_resamples=0)
    with pytest.raises(ValueError, match="num_episodes must be an int >= 1, got 0"):
        episode_bootstrap(stat, 0)
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
            episode_bootstrap(stat, 3, level=level)
    with pytest.raises(ValueError, match="statistic returned NaN"):
        episode_bootstrap(lambda idx: float("nan"), 3, num_resamples=5)
    with pytest.raises(ValueError, match=r"at least one episode \(E >= 1\)"):
        fewshot_bootstrap(np.zeros((0, 2, 3)), np.zeros((0, 2), int))
    with pytest.raises(ValueError, match=r"probs must be \[episodes, queries, ways\]"):
        fewshot_bootstrap(np.full((2, 3), 0.5), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="num_resamples must be"):
        FewShotEvaluation(np.full((2, 2, 2), 0.5), np.zeros((2, 2), int)).bootstrap(num_resamples=-1)
    with pytest.raises(ValueError, match="level must lie in"):
        fewshot_bootstrap(np.full((2, 2, 2), 0.5), np.zeros((2, 2), int), level=1)
