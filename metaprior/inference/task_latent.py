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

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import Predictive
from tqdm import tqdm

from metaprior.data.tasks import TaskBatch, check_task_batch
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
    "prior_importance_sizes",
    "gaussian_scores",
    "score_support_sizes",
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


def prior_importance_sizes(
    rng_key: jax.Array,
    predict: Callable,
    tasks: TaskBatch,
    sizes: Sequence[int],
    *,
    latent_dim: int,
    num_draws: int = 16384,
    num_samples: int = 100,
    task_chunk: int = 32,
    draw_chunk: int = 1024,
    desc: str = "prior importance sampling",
) -> dict[int, dict[str, Any]]:
    """Posterior draws of ``z`` given the first ``N`` points of every task, for small ``N``,
    by self-normalised importance sampling with the prior ``N(0, I)`` as the proposal.

    No guide is fitted: the weights are the Gaussian likelihood of the support points, so
    the draws target the model's exact posterior as ``num_draws`` grows (check ``is_ess``,
    the effective sample size per task). It is the right tool when the support is small
    and the posterior broad, where a fitted guide misses modes; for large ``N`` the prior
    rarely lands in the posterior (use :func:`infer_support_sizes`). One set of prior
    draws, shared by every task, serves every size (the supports are nested prefixes), so
    the cost is one likelihood pass over ``max(sizes)`` points per draw and task.

    Args:
        predict: ``predict(z [S, d], x [T, N, D]) -> (mu, sigma)``, each ``[S, T, N]``, with
            the ``S`` draws shared by every task (e.g.
            :func:`metaprior.models.task_latent.task_latent_predict` with the net bound,
            whose ``z``-only work then runs once per draw).
        tasks: ``[tasks, examples, D]``; the first ``N`` examples of each are its support.
        num_draws: prior draws, the same for every task (a multiple of ``draw_chunk``).
        num_samples: draws resampled in proportion to the weights, per task and size.
        task_chunk, draw_chunk: tasks and draws whose likelihood is evaluated at once (memory).

    Returns:
        ``{N: dict(support=TaskBatch [tasks, N], z [num_samples, tasks, d], is_ess [tasks])}``.
    """
    check_task_batch(tasks, name="tasks", require_y=True)
    sizes = tuple(sorted(set(int(n) for n in sizes)))
    if not sizes or sizes[0] < 1 or sizes[-1] > tasks.x.shape[1]:
        raise ValueError(f"sizes must be in [1, {tasks.x.shape[1]}] (the examples per task), got {sizes}")
    if num_draws < draw_chunk or num_draws % draw_chunk:
        raise ValueError(f"num_draws must be a positive multiple of draw_chunk={draw_chunk}, got {num_draws}")
    n_max, cols = sizes[-1], jnp.asarray(sizes) - 1

    k_z, k_pick = jax.random.split(rng_key)
    z = jax.random.normal(k_z, (num_draws // draw_chunk, draw_chunk, latent_dim))

    @jax.jit
    def chunk(key, x, y, mask):  # [C, n_max, D], [C, n_max], [C, n_max]
        def loglik(zc):
            mu, sigma = predict(zc, x)  # [draw_chunk, C, n_max]
            ll = jnp.where(mask, jax.scipy.stats.norm.logpdf(y, mu, sigma), 0.0)
            return jnp.cumsum(ll, axis=-1)[..., cols]  # [draw_chunk, C, sizes]

        logw = jax.lax.map(loglik, z).reshape(num_draws, x.shape[0], len(sizes))
        idx, ess = _resample(key, logw, num_samples)
        return z.reshape(num_draws, latent_dim)[idx], ess  # [S, C, sizes, d], [C, sizes]

    num_tasks = tasks.x.shape[0]
    z_parts, ess_parts = [], []
    bar = tqdm(total=num_tasks, desc=desc, unit="task", disable=not progress_enabled(None), leave=False)
    for c0 in range(0, num_tasks, task_chunk):
        part = slice(c0, min(c0 + task_chunk, num_tasks))
        args = (tasks.x[part, :n_max], tasks.y[part, :n_max], tasks.mask[part, :n_max])
        if args[0].shape[0] < task_chunk:  # pad the last chunk to the compiled shape
            pad = task_chunk - args[0].shape[0]
            args = tuple(jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) for a in args)
        picked, ess = chunk(jax.random.fold_in(k_pick, c0), *args)
        z_parts.append(np.asarray(picked)[:, : part.stop - c0])
        ess_parts.append(np.asarray(ess)[: part.stop - c0])
        bar.update(part.stop - c0)
    bar.close()
    z_all, ess_all = np.concatenate(z_parts, axis=1), np.concatenate(ess_parts)
    return {
        n: dict(
            support=TaskBatch(tasks.x[:, :n], tasks.y[:, :n], tasks.mask[:, :n]),
            z=z_all[:, :, i],
            is_ess=ess_all[:, i],
        )
        for i, n in enumerate(sizes)
    }


def _resample(key: jax.Array, logw: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
    """Multinomial resampling by log-weights ``[draws, C, K]`` (normalised over draws) by
    inverting each column's CDF (a Gumbel-max draw would cost ``num_samples x draws``
    random numbers per column): ``(idx [num_samples, C, K], ess [C, K])``."""
    w = jax.nn.softmax(logw, axis=0)
    cdf = jnp.cumsum(jnp.moveaxis(w, 0, -1), axis=-1)  # [C, K, draws]
    u = jax.random.uniform(key, (*cdf.shape[:2], num_samples)) * cdf[..., -1:]
    idx = jax.vmap(jax.vmap(jnp.searchsorted))(cdf, u)  # [C, K, S]
    return jnp.moveaxis(jnp.minimum(idx, logw.shape[0] - 1), -1, 0), 1.0 / jnp.sum(w**2, axis=0)


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
    return tuple(np.asarray(a) for a in _gaussian_scores(mu, sigma, y))


def _gaussian_scores(mu: jax.Array, sigma: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    mse = jnp.mean((mu.mean(axis=0) - y) ** 2, axis=-1)
    log_p = jax.scipy.stats.norm.logpdf(y[None], mu, sigma)
    nll = -jnp.mean(jax.scipy.special.logsumexp(log_p, axis=0) - jnp.log(log_p.shape[0]), axis=-1)
    return mse, nll


def score_support_sizes(
    predict: Callable, results: dict[int, dict[str, Any]], x_query: jax.Array, y_query: jax.Array, chunk: int = 200
) -> None:
    """Add ``mse`` and ``nll`` (:func:`gaussian_scores`, ``[tasks]``) to every size's entry of
    ``results`` (as :func:`infer_support_sizes` or :func:`prior_importance_sizes` return
    them), from its draws ``z`` and held-out points ``x_query [T, Q, D]``, ``y_query [T, Q]``
    of the same ``T`` tasks; ``chunk`` tasks at a time (memory). Also ``mse_zero [T]``, the
    zero predictor's MSE (``mean(y_query^2)``), the control variate of :func:`support_size_metrics`."""
    score = jax.jit(lambda z, x, y: _gaussian_scores(*predict(z, x), y))
    for r in results.values():
        z = np.asarray(r["z"])
        if z.shape[1] != x_query.shape[0]:
            raise ValueError(f"results hold {z.shape[1]} tasks but x_query has {x_query.shape[0]}")
        scores = [
            score(jnp.asarray(z[:, c : c + chunk]), x_query[c : c + chunk], y_query[c : c + chunk])
            for c in range(0, z.shape[1], chunk)
        ]
        r["mse"], r["nll"] = (np.concatenate([np.asarray(a) for a in part]) for part in zip(*scores))
        r["mse_zero"] = np.asarray(jnp.mean(jnp.square(y_query), axis=-1))


def support_size_metrics(
    results: dict[str, dict[int, dict]], *, baseline: str, model: str, zero_mse_mean: float | None = None
) -> dict[str, float]:
    """Flat metrics of :func:`infer_support_sizes` results scored by :func:`gaussian_scores`.

    Args:
        results: ``{tag: {N: dict(mse [T], nll [T], restart_ess [T], is_ess [T], mse_zero [T]
            (optional))}}``, every tag scored on the same ``T`` tasks.
        baseline, model: two tags; ``mse_gap_n{N}`` is ``baseline``'s MSE minus ``model``'s
            on the same task, averaged (the paired comparison; positive: ``model`` is better).
        zero_mse_mean: the task family's exact expected zero-predictor MSE (``E[y^2]`` at a
            query point), if known; then each MSE also gets a control-variate estimate
            (:func:`~metaprior.inference.evaluation.control_variate_ci95` with ``mse_zero``).

    Returns:
        ``{mse,nll}_{tag}_n{N}`` and their ``_ci95`` (normal 95% half-width over tasks),
        ``restart_ess_{tag}_n{N}``, ``is_ess_{tag}_n{N}``, ``mse_gap_n{N}`` and ``_ci95``,
        ``tasks_n{N}`` (how many tasks size ``N`` was scored on), and with ``zero_mse_mean``
        ``mse_{tag}_n{N}_cv`` and ``_cv_ci95``, ``mse_zero_n{N}``, and ``mse_cv_apart_n{N}`` (1.0 if
        ``model``'s control-variate interval lies wholly below ``baseline``'s).
    """
    from metaprior.inference.evaluation import control_variate_ci95, mean_ci95

    out: dict[str, float] = {}
    for tag, by_size in results.items():
        for n, r in by_size.items():
            for key in ("mse", "nll"):
                out[f"{key}_{tag}_n{n}"], out[f"{key}_{tag}_n{n}_ci95"] = mean_ci95(r[key])
            for key in ("restart_ess", "is_ess"):
                if key in r:
                    out[f"{key}_{tag}_n{n}"] = float(np.mean(r[key]))
            if zero_mse_mean is not None:
                few = len(r["mse"]) < 3  # too few tasks to fit the control variate's coefficient
                cv = (math.nan, math.nan) if few else control_variate_ci95(r["mse"], r["mse_zero"], zero_mse_mean)
                out[f"mse_{tag}_n{n}_cv"], out[f"mse_{tag}_n{n}_cv_ci95"] = cv
                out[f"mse_zero_n{n}"] = float(np.mean(r["mse_zero"]))
    for n in results[model]:
        gap = np.asarray(results[baseline][n]["mse"]) - np.asarray(results[model][n]["mse"])
        out[f"mse_gap_n{n}"], out[f"mse_gap_n{n}_ci95"] = mean_ci95(gap)
        out[f"tasks_n{n}"] = float(len(gap))
        if zero_mse_mean is not None:  # is the model's interval wholly below the baseline's?
            hi = out[f"mse_{model}_n{n}_cv"] + out[f"mse_{model}_n{n}_cv_ci95"]
            out[f"mse_cv_apart_n{n}"] = float(hi < out[f"mse_{baseline}_n{n}_cv"] - out[f"mse_{baseline}_n{n}_cv_ci95"])
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
