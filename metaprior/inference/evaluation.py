"""The one evaluation path for few-shot classification and regression tasks.

Every few-shot method exposes a *predictive function*

    ``predict(rng_key, support_x [E, S, ...], support_y [E, S], query_x [E, Q, ...]) -> probs [E, Q, W]``

(batched over episodes, query labels never passed in). :func:`evaluate_fewshot` runs
it over a fixed set of episodes in chunks and returns a :class:`FewShotEvaluation`,
whose :meth:`~FewShotEvaluation.metrics` are accuracy (mean over episodes, with the
half-width of its normal 95% interval), expected calibration error (15 equal-width
bins over all queries) and NLL per query; :meth:`~FewShotEvaluation.reliability` is
the curve for :func:`metaprior.inference.diagnostics.plot_reliability`. The same
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
    "fewshot_metrics",
    "predict_episodes",
    "evaluate_fewshot",
    "regression_metrics",
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
) -> FewShotEvaluation:
    """Score a predictive on fixed episodes: :func:`predict_episodes`, with the labels kept.

    Returns:
        A :class:`FewShotEvaluation` (``.metrics()``, ``.reliability()``).
    """
    if isinstance(episodes, Iterable) and not hasattr(episodes, "query_x"):
        episodes = list(episodes)
        labels = np.concatenate([np.asarray(e.query_y) for e in episodes])
    else:
        labels = np.asarray(episodes.query_y)
    probs = predict_episodes(rng_key, predict, episodes, chunk=chunk, desc=desc, progress=progress)
    if probs.shape[:2] != labels.shape:
        raise ValueError(f"predict returned {probs.shape}; expected [episodes, queries, ways] with {labels.shape[:2]}")
    return FewShotEvaluation(probs, labels)


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
