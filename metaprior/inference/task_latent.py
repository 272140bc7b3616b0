"""Guides, schedules and new-task inference for models with a per-task latent site.

A *task-latent model* is ``model(batch: TaskBatch, kl_weight=...)`` with a ``z`` site
inside ``plate("tasks")`` and shared ``param`` sites (the network): for example
:func:`metaprior.models.task_latent.task_latent_model`. Meta-training is
:func:`~metaprior.inference.local.task_batch_learner` run by
:func:`~metaprior.inference.meta.fit`, with guides from :func:`build_task_guide`;
:func:`infer_support_sizes` then fits ``q(z | first N points)`` of new tasks for
several support sizes ``N`` in as few compilations as possible (sizes up to ``pad_to``
share one padded, masked shape) and draws from the posterior predictive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import Predictive
from tqdm import tqdm

from metaprior.data.tasks import TaskBatch
from metaprior.inference.guides import TaskIAFGuide, TaskNormalGuide
from metaprior.inference.local import (
    LocalFit,
    fit_local,
    guide_for_num_tasks,
    importance_resample,
    restart_weights,
    sample_restart_mixture,
)
from metaprior.inference.meta import progress_enabled

__all__ = [
    "build_task_guide",
    "warmup_cosine_adam",
    "with_params",
    "infer_support_sizes",
    "gaussian_scores",
    "posterior_datatree",
    "support_size_metrics",
]


def build_task_guide(
    rng_key: jax.Array,
    model: Callable,
    batch: TaskBatch,
    *,
    kind: str = "normal",
    num_flows: int = 2,
    init_loc_scale: float = 0.0,
    encoder: eqx.Module | None = None,
    **kwargs: Any,
):
    """A per-task guide for ``model`` laid out on ``batch``: ``kind`` is ``"normal"`` or ``"iaf"``.

    Raises:
        ValueError: ``kind`` is neither.
    """
    if kind == "iaf":
        return TaskIAFGuide.build(
            rng_key, model, batch, num_flows=num_flows, init_loc_scale=init_loc_scale, encoder=encoder, **kwargs
        )
    if kind == "normal":
        return TaskNormalGuide.build(rng_key, model, batch, init_loc_scale=init_loc_scale, encoder=encoder, **kwargs)
    raise ValueError(f"kind must be 'normal' or 'iaf', got {kind!r}")


def warmup_cosine_adam(learning_rate: float, num_steps: int, schedule: str = "warmup-cosine"):
    """Adam with a linear warm-up over 5% of ``num_steps`` and cosine decay to 1% (or constant).

    A run resumed with a larger ``num_steps`` keeps the optimiser's step count, so the
    schedule is stretched to the new length from where it stands.

    Raises:
        ValueError: ``schedule`` is not ``"warmup-cosine"`` or ``"constant"``.
    """
    if schedule == "constant":
        return optax.adam(learning_rate)
    if schedule != "warmup-cosine":
        raise ValueError(f"schedule must be 'warmup-cosine' or 'constant', got {schedule!r}")
    lr = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, num_steps // 20), num_steps, end_value=0.01 * learning_rate
    )
    return optax.adam(lr)


def with_params(module: eqx.Module, params) -> eqx.Module:
    """``module`` with its inexact arrays replaced by ``params`` (a fitted ``param`` site)."""
    _, static = eqx.partition(module, eqx.is_inexact_array)
    return eqx.combine(params, static)


PREDICTIVES = ("importance", "mixture", "best")


def _buckets(sizes: Sequence[int], pad_to: int) -> list[tuple[int, tuple[int, ...]]]:
    """Group support sizes into padded shapes: sizes up to ``pad_to`` share one shape
    (``pad_to`` slots, or the largest size if smaller), larger sizes get their own."""
    small = tuple(n for n in sizes if n <= pad_to)
    out = [(max(small), small)] if small else []
    return out + [(n, (n,)) for n in sizes if n > pad_to]


def infer_support_sizes(
    rng_key: jax.Array,
    model: Callable,
    tasks: TaskBatch,
    sizes: Sequence[int],
    *,
    num_steps: int,
    learning_rate: float,
    num_restarts: int = 1,
    large_restarts: int | None = None,
    num_candidates: int = 0,
    num_particles: int = 1,
    kl_weight: float = 1.0,
    num_samples: int = 100,
    predictive: str = "mixture",
    pad_to: int = 64,
    guide_kind: str = "iaf",
    num_flows: int = 2,
    init_loc_scale: float = 0.0,
    encoder: eqx.Module | None = None,
    num_proposals: int = 1024,
    desc: str = "new-task inference",
) -> dict[int, dict[str, Any]]:
    """Fit ``q(z | first N points)`` of every task in ``tasks`` for each ``N`` in ``sizes``.

    Sizes up to ``pad_to`` are fitted in one call of :func:`fit_local` (one compilation):
    their support sets are padded to one shape and masked, and the sizes are stacked along
    the tasks axis (independent local fits); each larger size is one more call. The
    optimiser is Adam with cosine decay from ``learning_rate`` to 1%.

    Args:
        tasks: ``[tasks, examples, D]``; the first ``N`` examples of each are its support.
        num_restarts: independent fits per task (see :func:`fit_local`).
        large_restarts: restarts for the sizes above ``pad_to`` (each fitted alone), if
            given. Their posteriors are the sharpest: with hundreds of points the
            likelihood has many local optima in the frequency, and more restarts are what
            finds the right one, at a cost of one task set instead of ``len(sizes)``.
        predictive: ``"importance"`` resamples ``z`` from ``num_proposals`` draws of a
            defensive mixture (the prior's scale and the restarts' guides) by importance
            weights against the exact posterior (:func:`importance_resample`);
            ``"mixture"`` draws ``z`` from the ELBO-weighted mixture of the restarts'
            guides, ``"best"`` from the best restart's only.

    Returns:
        ``{N: dict(fit=LocalFit, support=TaskBatch [tasks, N], z [num_samples, tasks, 1, d],
        restart_ess [tasks], is_ess [tasks] (importance only))}``.
    """
    if predictive not in PREDICTIVES:
        raise ValueError(f"predictive must be one of {PREDICTIVES}, got {predictive!r}")
    num_tasks = tasks.x.shape[0]
    out = {}
    bar = tqdm(total=len(sizes), desc=desc, unit="size", disable=not progress_enabled(None), leave=False)
    for b, (slots, group) in enumerate(_buckets(tuple(sizes), pad_to)):
        k_guide, k_fit, k_pred = jax.random.split(jax.random.fold_in(rng_key, b), 3)
        padded = TaskBatch(
            jnp.concatenate([tasks.x[:, :slots]] * len(group)),
            jnp.concatenate([tasks.y[:, :slots]] * len(group)),
            jnp.concatenate([tasks.mask[:, :slots] & (jnp.arange(slots) < n)[None] for n in group]),
        )
        guide = build_task_guide(
            k_guide,
            model,
            jax.tree.map(lambda a: a[:2], padded),
            kind=guide_kind,
            num_flows=num_flows,
            init_loc_scale=init_loc_scale,
            encoder=encoder,
        )
        local = fit_local(
            k_fit,
            model,
            guide,
            padded,
            num_steps=num_steps,
            num_restarts=num_restarts if large_restarts is None or slots <= pad_to else large_restarts,
            optimizer=optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01)),
            num_particles=num_particles,
            kl_weight=kl_weight,
            num_candidates=num_candidates,
        )
        is_ess = None
        if predictive == "importance":
            draws = importance_resample(k_pred, model, local, padded, num_samples, num_proposals=num_proposals)
            z_all, is_ess = draws.values["z"], np.asarray(draws.ess)
        elif predictive == "mixture":
            z_all = sample_restart_mixture(k_pred, local, padded, num_samples, site="z")
        else:
            z_all = Predictive(local.guide, params=local.params, num_samples=num_samples)(k_pred, padded)["z"]
        for i, n in enumerate(group):
            rows = slice(i * num_tasks, (i + 1) * num_tasks)
            fit_n = LocalFit(
                guide_for_num_tasks(local.guide, num_tasks), *jax.tree.map(lambda a: a[rows], tuple(local[1:]))
            )
            weights = np.asarray(restart_weights(fit_n))
            out[n] = dict(
                fit=fit_n,
                support=TaskBatch(tasks.x[:, :n], tasks.y[:, :n], tasks.mask[:, :n]),
                z=np.asarray(z_all[:, rows]),
                restart_ess=1.0 / np.sum(weights**2, axis=-1),
            )
            if is_ess is not None:
                out[n]["is_ess"] = is_ess[rows]
        bar.update(len(group))
    bar.close()
    return out


def gaussian_scores(mu: jax.Array, sigma: jax.Array, y: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per-task MSE of the predictive mean and NLL per point of the sample mixture.

    Args:
        mu, sigma: ``[samples, tasks, points]`` predictive means and noise scales of
            posterior draws.
        y: ``[tasks, points]`` held-out targets.

    Returns:
        ``(mse [tasks], nll [tasks])``; the predictive of a point is
        ``(1/S) sum_s N(y; mu_s, sigma_s^2)``.
    """
    mse = jnp.mean((mu.mean(axis=0) - y) ** 2, axis=-1)
    log_p = jax.scipy.stats.norm.logpdf(y[None], mu, sigma)
    nll = -jnp.mean(jax.scipy.special.logsumexp(log_p, axis=0) - jnp.log(log_p.shape[0]), axis=-1)
    return np.asarray(mse), np.asarray(nll)


def support_size_metrics(results: dict[str, dict[int, dict]], *, baseline: str, model: str) -> dict[str, float]:
    """Flat metrics of :func:`infer_support_sizes` results scored by :func:`gaussian_scores`.

    Args:
        results: ``{tag: {N: dict(mse [T], nll [T], restart_ess [T], is_ess [T] (optional))}}``,
            every tag scored on the same ``T`` tasks.
        baseline, model: two tags; ``mse_gap_n{N}`` is ``baseline``'s MSE minus ``model``'s
            on the same task, averaged (the paired comparison; positive: ``model`` is better).

    Returns:
        ``{mse,nll}_{tag}_n{N}`` and their ``_ci95`` (normal 95% half-width over tasks),
        ``restart_ess_{tag}_n{N}``, ``is_ess_{tag}_n{N}``, ``mse_gap_n{N}`` and ``_ci95``.
    """
    from metaprior.inference.evaluation import mean_ci95

    out: dict[str, float] = {}
    for tag, by_size in results.items():
        for n, r in by_size.items():
            for key in ("mse", "nll"):
                out[f"{key}_{tag}_n{n}"], out[f"{key}_{tag}_n{n}_ci95"] = mean_ci95(r[key])
            for key in ("restart_ess", "is_ess"):
                if key in r:
                    out[f"{key}_{tag}_n{n}"] = float(np.mean(r[key]))
    for n in results[model]:
        gap = np.asarray(results[baseline][n]["mse"]) - np.asarray(results[model][n]["mse"])
        out[f"mse_gap_n{n}"], out[f"mse_gap_n{n}_ci95"] = mean_ci95(gap)
    return out


def posterior_datatree(rng_key: jax.Array, predict: Callable, z, support: TaskBatch):
    """ArviZ DataTree of task latents ``z [S, T, 1, d]`` with replicated and pointwise log-likelihood data.

    ``predict(z, x) -> (mu, sigma)``, each ``[S, T, N]``, is the model's Gaussian
    predictive (e.g. :func:`metaprior.models.task_latent.task_latent_predict` with the
    network bound); ``support`` holds the observed ``[T, N]`` points.
    """
    import arviz as az

    mu, sigma = predict(jnp.asarray(z), support.x)
    y_rep = mu + sigma * jax.random.normal(rng_key, mu.shape)
    log_lik = jax.scipy.stats.norm.logpdf(support.y[None], mu, sigma)
    return az.from_dict(
        {
            "posterior": {"z": np.asarray(z)[:, :, 0, :][None]},
            "posterior_predictive": {"y": np.asarray(y_rep)[None]},
            "log_likelihood": {"y": np.asarray(log_lik)[None]},
            "observed_data": {"y": np.asarray(support.y)},
        },
        dims={"z": ["tasks", "latent"], "y": ["tasks", "examples"]},
    )
