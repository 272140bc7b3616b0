"""The one evaluation path for few-shot classification and regression tasks.

Every few-shot method exposes a *predictive function*

    ``predict(rng_key, support_x [E, S, ...], support_y [E, S], query_x [E, Q, ...]) -> probs [E, Q, W]``

(batched over episodes, query labels never passed in). :func:`evaluate_fewshot` runs
it over a fixed set of episodes in chunks and returns a :class:`FewShotEvaluation`,
whose :meth:`~FewShotEvaluation.metrics` are accuracy (mean over episodes, with the
half-width of its normal 95% interval), expected calibration error (15 equal-width
bins over all queries) and NLL per query; :meth:`~FewShotEvaluation.reliability` is
the curve for :func:`metaprior.inference.diagnostics.plot_reliability`;
:meth:`~FewShotEvaluation.bootstrap` gives percentile-bootstrap intervals over episodes
of all three (:func:`fewshot_bootstrap`, built on :func:`episode_bootstrap`). The same
episodes and keys give the same numbers whichever method is scored, so two methods
evaluated on one :class:`~metaprior.data.Episodes` are compared pair for pair.

Regression tasks get :func:`regression_metrics` (MSE of the predictive mean, Gaussian
predictive NLL, coverage of a central interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from metaprior.inference.diagnostics import expected_calibration_error, reliability_curve

__all__ = [
    "FewShotPredictive",
    "FewShotEvaluation",
    "mean_ci95",
    "control_variate_ci95",
    "fewshot_metrics",
    "episode_bootstrap",
    "fewshot_bootstrap",
    "predict_episodes",
    "evaluate_fewshot",
    "regression_metrics",
    "sampled_regression_scores",
    "grid_search",
]

FewShotPredictive = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], Any]
"""``(rng_key, support_x, support_y, query_x) -> probs [E, Q, W]`` (or a leading axis of
variants, see ``episode_axis`` of :func:`predict_episodes`)."""


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% interval of the mean.

    Raises:
        ValueError: ``values`` is empty.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_ci95: values is empty")
    if values.size == 1:
        return float(values[0]), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def control_variate_ci95(values, control, control_mean: float) -> tuple[float, float]:
    """Mean of ``values`` and its 95% half-width, with ``control`` as a control variate.

    ``control`` is a quantity measured on the same draws as ``values`` whose expectation
    ``control_mean`` is known exactly (e.g. the zero predictor's MSE on a task family with
    known second moment). The estimate ``mean(values - beta (control - control_mean))``,
    with ``beta = cov(values, control) / var(control)`` fitted on the same draws, has the
    same expectation as ``mean(values)`` (up to an O(1/n) term from fitting ``beta``) and
    its variance shrinks by ``1 - rho^2`` (``rho``: their correlation). The interval is the
    normal one on the residuals, with one degree of freedom spent on ``beta``.

    Raises:
        ValueError: ``values`` and ``control`` differ in length, have fewer than 3
            entries, or are not finite.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    c = np.asarray(control, dtype=np.float64).ravel()
    if v.shape != c.shape:
        raise ValueError(f"control_variate_ci95: values has {v.size} entries but control has {c.size}")
    if v.size < 3:
        raise ValueError(f"control_variate_ci95: need at least 3 values, got {v.size}")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(c)) and math.isfinite(control_mean)):
        raise ValueError("control_variate_ci95: values, control and control_mean must be finite")
    dc = c - c.mean()
    var_c = float(dc @ dc)
    beta = float(dc @ (v - v.mean())) / var_c if var_c > 0 else 0.0
    resid = v - beta * (c - control_mean)
    return float(resid.mean()), float(1.96 * resid.std(ddof=2) / math.sqrt(v.size))


def _check_probs(probs: np.ndarray, labels: np.ndarray) -> None:
    if probs.ndim != 3 or labels.shape != probs.shape[:2]:
        raise ValueError(
            f"probs must be [episodes, queries, ways] and labels [episodes, queries]; "
            f"got probs {probs.shape} and labels {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[-1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[-1]}); got range [{labels.min()}, {labels.max()}]")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or inf")


def fewshot_metrics(probs, labels, num_bins: int = 15) -> dict[str, float]:
    """Accuracy, its 95% interval, ECE and NLL of few-shot predictions.

    Args:
        probs: ``[E, Q, W]`` predictive class probabilities of ``E`` episodes.
        labels: ``[E, Q]`` true query classes.
        num_bins: ECE bins (equal width on [0, 1]).

    Returns:
        ``{"acc", "acc_ci95", "ece", "nll"}``: accuracy is the mean over episodes of the
        per-episode accuracy (the interval is over episodes); ECE and NLL pool all
        queries; NLL is ``-mean log(p_true + 1e-12)``.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    _check_probs(probs, labels)
    acc, acc_ci95 = mean_ci95((probs.argmax(-1) == labels).mean(-1))
    flat_p, flat_y = probs.reshape(-1, probs.shape[-1]), labels.reshape(-1)
    nll = -np.mean(np.log(flat_p[np.arange(flat_y.size), flat_y] + 1e-12))
    return {
        "acc": acc,
        "acc_ci95": acc_ci95,
        "ece": expected_calibration_error(flat_p, flat_y, num_bins=num_bins),
        "nll": float(nll),
    }


def episode_bootstrap(
    statistic: Callable[[np.ndarray], float],
    num_episodes: int,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of episodes, resampling whole episodes.

    Resample ``r`` draws ``num_episodes`` episode indices uniformly with replacement (all
    resamples from one ``numpy.random.default_rng(seed)``, as one ``[num_resamples,
    num_episodes]`` array, so calls with the same seed and sizes see the same resamples);
    the interval's ends are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    ``statistic(indices_r)`` over the resamples (NumPy's default, linear interpolation).

    Args:
        statistic: ``indices [num_episodes] int -> float``, the statistic of the episodes
            ``indices`` (repeats included), e.g. ``lambda i: acc[i].mean()``.
        num_episodes: ``E``, the number of episodes resampled.
        num_resamples: bootstrap resamples.
        level: the interval's nominal coverage, in ``(0, 1)``.
        seed: the NumPy generator's seed.

    Returns:
        ``(lo, hi)``.

    Raises:
        ValueError: ``num_episodes < 1``, ``num_resamples < 1``, ``level`` outside
            ``(0, 1)``, or a statistic that is not a finite number.
    """
    for name, value, least in (("num_episodes", num_episodes, 1), ("num_resamples", num_resamples, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    indices = np.random.default_rng(seed).integers(0, num_episodes, size=(num_resamples, num_episodes))
    values = np.array([float(statistic(idx)) for idx in indices])
    if not np.all(np.isfinite(values)):
        raise ValueError("statistic returned NaN or inf on a resample")
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def fewshot_bootstrap(
    probs,
    labels,
    *,
    num_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    num_bins: int = 15,
) -> dict[str, float]:
    """Percentile bootstrap intervals over episodes of the metrics of :func:`fewshot_metrics`.

    Each resample draws ``E`` episodes with replacement (:func:`episode_bootstrap`; the
    three metrics are computed on the same resamples) and recomputes: accuracy, the mean
    of the per-episode accuracies; ECE, :func:`expected_calibration_error` (``num_bins``
    bins) of the pooled queries of the resampled episodes; NLL, the mean over those
    queries of ``-log(p_true + 1e-12)``.

    Args:
        probs: ``[E, Q, W]`` predictive class probabilities.
        labels: ``[E, Q]`` true query classes.
        num_resamples: bootstrap resamples.
        level: the intervals' nominal coverage, in ``(0, 1)``.
        seed: the NumPy generator's seed.
        num_bins: ECE bins (equal width on [0, 1]).

    Returns:
        ``{"acc_lo", "acc_hi", "ece_lo", "ece_hi", "nll_lo", "nll_hi"}``.

    Raises:
        ValueError: bad shapes or labels (as :func:`fewshot_metrics`), no episodes
            (``E = 0``) or queries, or bad ``num_resamples`` / ``level``.
    """
    probs, labels = np.asarray(probs), np.asarray(labels)
    _check_probs(probs, labels)
    num_episodes, num_queries, ways = probs.shape
    if num_episodes < 1 or num_queries < 1:
        raise ValueError(f"probs must hold at least one episode (E >= 1) of one query or more, got shape {probs.shape}")
    episode_acc = (probs.argmax(-1) == labels).mean(-1)  # [E]
    p_true = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]  # [E, Q]
    episode_nll = -np.log(p_true + 1e-12).mean(-1)  # [E]; every episode has Q queries, so pooled = mean

    def ece(idx: np.ndarray) -> float:
        return expected_calibration_error(probs[idx].reshape(-1, ways), labels[idx].reshape(-1), num_bins=num_bins)

    kw = dict(num_resamples=num_resamples, level=level, seed=seed)
    out = {}
    for name, statistic in (
        ("acc", lambda idx: episode_acc[idx].mean()),
        ("ece", ece),
        ("nll", lambda idx: episode_nll[idx].mean()),
    ):
        out[f"{name}_lo"], out[f"{name}_hi"] = episode_bootstrap(statistic, num_episodes, **kw)
    return out


class FewShotEvaluation(NamedTuple):
    """Predictions of one method on a fixed set of episodes.

    Attributes:
        probs: ``[E, Q, W]`` predictive class probabilities.
        labels: ``[E, Q]`` true query classes.
    """

    probs: np.ndarray
    labels: np.ndarray

    def per_episode_accuracy(self) -> np.ndarray:
        """``[E]`` accuracy of each episode (for paired differences between methods)."""
        return (self.probs.argmax(-1) == self.labels).mean(-1)

    def metrics(self, prefix: str = "", suffix: str = "", num_bins: int = 15) -> dict[str, float]:
        """:func:`fewshot_metrics` with keys ``{prefix}{name}{suffix}`` (``acc``, ``acc_ci95``, ...).

        ``acc_ci95`` keeps ``_ci95`` last: ``metrics("", "_5w1s")`` gives ``acc_5w1s`` and
        ``acc_5w1s_ci95``.
        """
        out = {}
        for name, value in fewshot_metrics(self.probs, self.labels, num_bins).items():
            base, ci = (name[: -len("_ci95")], "_ci95") if name.endswith("_ci95") else (name, "")
            out[f"{prefix}{base}{suffix}{ci}"] = value
        return out

    def reliability(self, num_bins: int = 15):
        """``(bin_confidence, bin_accuracy, bin_count)`` over all queries."""
        return reliability_curve(self.probs, self.labels, num_bins=num_bins)

    def bootstrap(self, **kw: Any) -> dict[str, float]:
        """:func:`fewshot_bootstrap` of these predictions (``kw``: ``num_resamples``,
        ``level``, ``seed``, ``num_bins``)."""
        return fewshot_bootstrap(self.probs, self.labels, **kw)


def _chunks(episodes, chunk: int):
    if isinstance(episodes, Iterable) and not hasattr(episodes, "query_x"):
        start = 0
        for part in episodes:
            yield start, part
            start += part.query_x.shape[0]
        return
    total = episodes.query_x.shape[0]
    for start in range(0, total, chunk):
        yield start, jax.tree.map(lambda a: a[start : start + chunk], episodes)


def predict_episodes(
    rng_key: jax.Array,
    predict: FewShotPredictive,
    episodes,
    *,
    chunk: int = 50,
    episode_axis: int = 0,
    desc: str | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Run ``predict`` over ``episodes`` in chunks; the chunk starting at episode ``i``
    gets the key ``fold_in(rng_key, i)``.

    Args:
        rng_key: the predictive's randomness (posterior draws).
        predict: a :data:`FewShotPredictive` (jit it: each chunk is one call).
        episodes: an :class:`~metaprior.data.Episodes` (split into ``chunk`` episodes), or
            an iterable of them (each one call, for episodes sampled batch by batch).
        chunk: episodes per call.
        episode_axis: the axis of ``predict``'s output that indexes episodes (1 when it
            returns several variants at once, ``[V, E, Q, W]``).
        desc, progress: a tqdm bar (``progress=None``: on unless ``METAPRIOR_PROGRESS=0``).

    Returns:
        The outputs, concatenated along ``episode_axis`` as a NumPy array.
    """
    from tqdm import tqdm

    from metaprior.inference.meta import progress_enabled

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    out = []
    with tqdm(desc=desc or "predict", unit="episode", disable=not progress_enabled(progress), leave=False) as bar:
        for start, part in _chunks(episodes, chunk):
            key = jax.random.fold_in(rng_key, start)
            out.append(np.asarray(predict(key, part.support_x, part.support_y, part.query_x)))
            bar.update(part.query_x.shape[0])
    if not out:
        raise ValueError("episodes is empty")
    return np.concatenate(out, axis=episode_axis)


def evaluate_fewshot(
    rng_key: jax.Array,
    predict: FewShotPredictive,
    episodes,
    *,
    chunk: int = 50,
    desc: str | None = None,
    progress: bool | None = None,
    grouped: bool = False,
) -> FewShotEvaluation | list[FewShotEvaluation]:
    """Score a predictive on fixed episodes: :func:`predict_episodes`, with the labels kept.

    Args:
        grouped: ``predict`` returns ``[V, E, Q, W]`` (several variants from one posterior);
            one evaluation per variant is returned.

    Returns:
        A :class:`FewShotEvaluation` (``.metrics()``, ``.reliability()``), or a list of
        them with ``grouped``.
    """
    if isinstance(episodes, Iterable) and not hasattr(episodes, "query_x"):
        episodes = list(episodes)
        labels = np.concatenate([np.asarray(e.query_y) for e in episodes])
    else:
        labels = np.asarray(episodes.query_y)
    axis = 1 if grouped else 0
    probs = predict_episodes(rng_key, predict, episodes, chunk=chunk, episode_axis=axis, desc=desc, progress=progress)
    rows = probs if grouped else probs[None]
    if rows.shape[1:3] != labels.shape:
        raise ValueError(f"predict returned {probs.shape}; expected [episodes, queries, ways] with {labels.shape[:2]}")
    evaluations = [FewShotEvaluation(p, labels) for p in rows]
    return evaluations if grouped else evaluations[0]


def regression_metrics(samples, y, noise_scale, *, level: float = 0.95) -> dict[str, float]:
    """MSE, predictive NLL and interval coverage of sampled regression predictions.

    The predictive of each point is the mixture ``(1/S) sum_s N(y; f_s, sigma_s^2)``.

    Args:
        samples: ``[S, ..., N]`` predictive means of ``S`` posterior draws.
        y: ``[..., N]`` held-out targets.
        noise_scale: observation noise ``sigma`` (scalar or broadcastable to ``samples``).
        level: the central interval's probability for the coverage.

    Returns:
        ``{"mse", "nll", "coverage"}``: MSE of the mean over draws, NLL per point of the
        mixture, and the fraction of ``y`` inside the central ``level`` interval of the
        moment-matched Gaussian (mean over draws, variance over draws plus ``sigma^2``).
    """
    from statistics import NormalDist

    samples, y = np.asarray(samples, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if samples.shape[1:] != y.shape:
        raise ValueError(f"samples must be [draws, *y.shape]; got samples {samples.shape} and y {y.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    sigma = np.broadcast_to(np.asarray(noise_scale, dtype=np.float64), samples.shape)
    mean = samples.mean(0)
    mse = float(np.mean((mean - y) ** 2))
    log_p = -0.5 * ((y - samples) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)
    m = log_p.max(0)
    nll = float(-np.mean(m + np.log(np.mean(np.exp(log_p - m), axis=0))))
    sd = np.sqrt(samples.var(0) + np.mean(sigma**2, axis=0))
    z = NormalDist().inv_cdf((1 + level) / 2)
    return {"mse": mse, "nll": nll, "coverage": float(np.mean(np.abs(y - mean) <= z * sd))}


def sampled_regression_scores(rng_key: jax.Array, f_samples, y, noise_scale, *, level: float = 0.9):
    """Per-point predictive log-density and central-interval coverage from function draws.

    Args:
        f_samples: ``[T, S, Q]`` draws of the regression function at the query inputs.
        y: ``[T, Q]`` held-out targets.
        noise_scale: observation noise ``sigma``.
        level: the central interval's probability; its ends are the empirical quantiles
            of ``f_s + sigma * eps`` over the draws (``eps`` from ``rng_key``).

    Returns:
        ``(lpd [T, Q], inside [T, Q])``: ``log (1/S) sum_s N(y; f_s, sigma^2)`` and whether
        ``y`` lies in the interval.
    """
    import jax.numpy as jnp

    logp = jax.scipy.stats.norm.logpdf(y[:, None, :], f_samples, noise_scale)
    lpd = jax.nn.logsumexp(logp, axis=1) - jnp.log(f_samples.shape[1])
    draws = f_samples + noise_scale * jax.random.normal(rng_key, f_samples.shape)
    tail = round((1 - level) / 2, 12)  # 0.05, not 0.04999...: the quantile's exact level
    lo, hi = jnp.quantile(draws, tail, axis=1), jnp.quantile(draws, 1 - tail, axis=1)
    return lpd, (y >= lo) & (y <= hi)


def grid_search(score: Callable[[Any], float], grid: Iterable, *, minimize: bool = True) -> tuple[Any, dict]:
    """The first element of ``grid`` with the best ``score`` (empirical Bayes on validation tasks).

    Returns:
        ``(best, scores)`` with ``scores = {candidate: score}`` in grid order.

    Raises:
        ValueError: ``grid`` is empty.
    """
    scores = {candidate: float(score(candidate)) for candidate in grid}
    if not scores:
        raise ValueError("grid_search: grid is empty")
    pick = min if minimize else max
    return pick(scores, key=scores.__getitem__), scores
