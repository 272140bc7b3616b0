"""New-task inference: fit q(local latents | support set) with the prior held fixed.

After meta-training, the shared parameters are frozen and each new task's local
posterior is fitted by SVI on its support set alone. Tasks are independent, so they
are fitted in parallel (``vmap`` over tasks), and each task is fitted from
``num_restarts`` random initialisations in parallel (``vmap`` again); the restart with
the best ELBO on the support set is kept per task (Lacoste et al. 2018 needed restarts
against local optima).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaprior.inference.guides.task_local import _TaskGuideBase
from metaprior.inference.svi import bind_params, elbo_loss, unbound_param_sites

__all__ = [
    "LocalFit",
    "TaskBatchState",
    "fit_local",
    "ImportanceDraws",
    "guide_for_num_tasks",
    "importance_resample",
    "restart_weights",
    "sample_restart_mixture",
    "subsample_indices",
    "task_batch_learner",
]


class LocalFit(NamedTuple):
    """Result of :func:`fit_local`.

    Attributes:
        guide: the guide laid out for the ``T`` tasks of the batch.
        params: its parameters (best restart per task), leading axis ``[T]``.
        elbo: ``[T]`` ELBO of the kept restart (``eval_particles`` samples).
        restart_elbo: ``[T, R]`` ELBO of every restart.
        losses: ``[T, R, num_steps]`` training curves.
        restart_params: every restart's parameters, leading axes ``[T, R]`` (for
            :func:`sample_restart_mixture`); ``None`` if not kept.
    """

    guide: _TaskGuideBase
    params: dict[str, jax.Array]
    elbo: jax.Array
    restart_elbo: jax.Array
    losses: jax.Array
    restart_params: dict[str, jax.Array] | None = None


def guide_for_num_tasks(guide: _TaskGuideBase, num_tasks: int) -> _TaskGuideBase:
    """The same guide family laid out for ``num_tasks`` tasks (parameters not copied)."""
    sites = tuple(
        dataclasses.replace(s, shape=s.shape[: s.task_axis] + (num_tasks,) + s.shape[s.task_axis + 1 :])
        for s in guide.sites
    )
    return dataclasses.replace(guide, sites=sites, num_tasks=num_tasks)


def fit_local(
    rng_key: jax.Array,
    model: Callable,
    guide: _TaskGuideBase,
    batch: Any,
    *,
    num_steps: int = 300,
    optimizer: optax.GradientTransformation | None = None,
    num_restarts: int = 4,
    num_particles: int = 4,
    eval_particles: int = 64,
    kl_weight: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,
    num_candidates: int = 0,
    params: dict[str, Any] | None = None,
) -> LocalFit:
    """Fit a task-local guide to every task of ``batch`` separately, with restarts.

    The model's own ``param`` sites (a learned prior, a network) are not optimised: pass
    the meta-trained values as ``params`` (``fit(...).state.params``, unconstrained, as
    ``fit`` returns them; guide sites in it are ignored), or bind them beforehand with
    :func:`metaprior.inference.svi.bind_params` (or ``numpyro.handlers.substitute``). A
    model ``param`` site left unbound is an error: it would silently take its initial
    value, i.e. the prior before meta-training. Only the guide's parameters move.

    Args:
        rng_key: PRNG key.
        model: NumPyro model ``model(batch, **model_kwargs)`` with a ``plate("tasks")``.
        guide: a :class:`~metaprior.inference.guides.TaskNormalGuide` or
            :class:`~metaprior.inference.guides.TaskIAFGuide` (any number of tasks; it is
            re-laid out for one task).
        batch: a pytree whose leaves have a leading ``[T]`` tasks axis (or ``None``).
        num_steps: optimisation steps per restart.
        optimizer: Optax transformation (default: Adam from 0.05 with cosine decay to 5e-4
            over ``num_steps``, so the final parameters do not jitter at the step size).
        num_restarts: random initialisations per task, run in parallel.
        num_particles: ELBO samples per step.
        eval_particles: ELBO samples used to pick the best restart.
        kl_weight: weight of the KL term (0 gives the likelihood-only baseline).
        model_kwargs: keyword arguments for the model and guide (``subsample_size`` must
            be absent or ``None``: every task here is fitted on its own).
        params: the model's learned ``param`` values (unconstrained), bound before fitting.
        num_candidates: if positive, the random restarts do not start at ``num_restarts``
            draws from ``N(0, I)`` but at the best ``num_restarts`` of ``num_candidates``
            draws, scored by a one-sample ELBO at the initial scale (a random search that
            costs ``num_candidates`` ELBO evaluations per task, no gradients). For
            likelihoods whose optima are narrow and many (periodic functions, many points).
            With an encoder, restart 0 starts at the encoder's proposal and the others at
            the best ``num_restarts - 1`` candidates.

    Returns:
        :class:`LocalFit`.

    Raises:
        ValueError: a model ``param`` site is unbound (see ``params``), or bad counts.
    """
    if num_steps < 1 or num_restarts < 1:
        raise ValueError(f"num_steps and num_restarts must be >= 1, got {num_steps}, {num_restarts}")
    if num_candidates and num_candidates < num_restarts:
        raise ValueError(f"num_candidates must be 0 or >= num_restarts={num_restarts}, got {num_candidates}")
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs.get("subsample_size") is not None:
        raise ValueError("fit_local fits all tasks: model_kwargs['subsample_size'] must be None")
    leaves = [leaf for leaf in jax.tree.leaves(batch) if leaf is not None]
    if not leaves:
        raise ValueError("batch has no arrays")
    num_tasks = leaves[0].shape[0]
    if params is not None:
        model = bind_params(model, params)
    first = jax.tree.map(lambda a: a[:1], batch)
    unbound = unbound_param_sites(model, first, **model_kwargs)
    if unbound:
        raise ValueError(
            f"fit_local: the model's param site(s) {unbound} are not bound, so new-task inference would use "
            "their initial values, not the learned prior. Pass params=fit(...).state.params (or bind them with "
            "metaprior.inference.svi.bind_params(model, params) / numpyro.handlers.substitute). An eqx_module "
            "built from a trained network passed by argument is bound with "
            "metaprior.inference.svi.bind_modules(model, {name: trained_net}); to keep initial values on "
            "purpose, bind those"
        )
    if optimizer is None:
        optimizer = optax.adam(optax.cosine_decay_schedule(0.05, num_steps, alpha=0.01))
    one_guide = guide_for_num_tasks(guide, 1)
    loss = elbo_loss(model, one_guide, kl_weight=kl_weight, num_particles=num_particles, model_kwargs=model_kwargs)
    eval_loss = elbo_loss(
        model, one_guide, kl_weight=kl_weight, num_particles=eval_particles, model_kwargs=model_kwargs
    )
    grad = jax.value_and_grad(loss)

    loc_name = f"{one_guide.prefix}_loc"

    def one_restart(key, start, task):
        k_init, k_run, k_eval = jax.random.split(key, 3)
        params = one_guide.init_params(k_init)
        params[loc_name] = start

        def step(carry, k):
            p, s = carry
            value, g = grad(p, k, task)
            updates, s = optimizer.update(g, s, p)
            return (optax.apply_updates(p, updates), s), value

        (params, _), curve = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(k_run, num_steps))
        return params, -eval_loss(params, k_eval, task), curve

    shape = jax.eval_shape(one_guide.init_params, jax.random.key(0))[loc_name].shape
    score = jax.vmap(
        lambda loc, k, task: loss({**one_guide.init_params(k), loc_name: loc}, k, task), in_axes=(0, 0, None)
    )

    def starts(key, restart_keys, task):
        """Where each restart's base Normal starts (the prior's typical set); with an
        encoder, the first restart starts at the encoder's proposal (row offset zero)."""
        if num_candidates:
            k_draw, k_score = jax.random.split(jax.random.fold_in(key, 1))
            cand = jax.random.normal(k_draw, (num_candidates, *shape))
            neg_elbo = score(cand, jax.random.split(k_score, num_candidates), task)
            neg_elbo = jnp.where(jnp.isfinite(neg_elbo), neg_elbo, jnp.inf)
            order = jnp.argsort(neg_elbo)
            if one_guide.encoder is not None:  # keep the best R - 1 below the encoder's row
                order = jnp.roll(order, 1)
            locs = cand[order[:num_restarts]]
        else:
            locs = jax.vmap(lambda k: jax.random.normal(jax.random.split(k, 3)[0], shape))(restart_keys)
        if one_guide.encoder is not None:
            locs = locs.at[0].set(0.0)
        return locs

    def one_task(key, task):
        task = jax.tree.map(lambda a: a[None], task)
        keys = jax.random.split(key, num_restarts)
        params, elbos, curves = jax.vmap(one_restart, in_axes=(0, 0, None))(keys, starts(key, keys, task), task)
        elbos = jnp.where(jnp.isfinite(elbos), elbos, -jnp.inf)
        best = jnp.argmax(elbos)
        every = jax.tree.map(lambda p: p[:, 0], params)
        return jax.tree.map(lambda p: p[best], every), elbos[best], elbos, curves, every

    params, elbo, restart_elbo, losses, every = jax.jit(jax.vmap(one_task))(jax.random.split(rng_key, num_tasks), batch)
    return LocalFit(guide_for_num_tasks(guide, num_tasks), params, elbo, restart_elbo, losses, every)


def restart_weights(fit: LocalFit) -> jax.Array:
    """``[T, R]`` mixture weights of the restarts, proportional to ``exp(ELBO)`` per task.

    Each restart's ELBO lower-bounds the evidence of the region its ``q`` covers. For
    components with (nearly) disjoint supports, ``w_r \u221d exp(ELBO_r)`` are the weights
    that maximise the ELBO of the mixture ``sum_r w_r q_r``, and its ELBO is then
    ``logsumexp_r ELBO_r``: a multimodal posterior (a periodic likelihood with one point)
    gets one component per mode found instead of the single best mode. Restarts that
    converge to the same mode count it more than once (the mixture is then too sure of
    that mode); diverged restarts (non-finite ELBO) get weight zero.
    """
    elbo = jnp.where(jnp.isfinite(fit.restart_elbo), fit.restart_elbo, -jnp.inf)
    return jax.nn.softmax(elbo, axis=-1)


def sample_restart_mixture(
    rng_key: jax.Array, fit: LocalFit, batch: Any, num_samples: int, site: str | None = None, **model_kwargs
) -> jax.Array:
    """Draw ``num_samples`` of one latent site from the ELBO-weighted mixture of restarts.

    Each draw picks a restart with probability :func:`restart_weights` (per task), then
    samples the site from that restart's guide. Returns ``[S, T, ...]``, the layout of
    ``Predictive(fit.guide, params=fit.params, ...)`` for the best restart alone.
    """
    from numpyro.infer import Predictive

    if fit.restart_params is None:
        raise ValueError("fit.restart_params is None: this LocalFit did not keep every restart's parameters")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    site = site or fit.guide.sites[0].name
    num_restarts = fit.restart_elbo.shape[-1]
    k_pick, k_draw = jax.random.split(rng_key)
    draws = []
    for r in range(num_restarts):
        params_r = jax.tree.map(lambda p: p[:, r], fit.restart_params)
        draws.append(
            Predictive(fit.guide, params=params_r, num_samples=num_samples)(
                jax.random.fold_in(k_draw, r), batch, **model_kwargs
            )[site]
        )
    draws = jnp.stack(draws)  # [R, S, T, ...]
    num_tasks = fit.restart_elbo.shape[0]
    pick = jax.random.categorical(k_pick, jnp.log(restart_weights(fit)), shape=(num_samples, num_tasks))  # [S, T]
    return jnp.take_along_axis(draws, pick.reshape((1, *pick.shape) + (1,) * (draws.ndim - 3)), axis=0)[0]


class ImportanceDraws(NamedTuple):
    """Result of :func:`importance_resample`.

    Attributes:
        values: ``{site: [S, *site shape]}`` posterior draws (resampled proposals).
        ess: ``[T]`` effective sample size of the self-normalised weights (out of the
            proposals drawn; small values mean the proposal missed the posterior).
        log_evidence: ``[T]`` importance-sampling estimate of ``log p(support)``.
    """

    values: dict[str, jax.Array]
    ess: jax.Array
    log_evidence: jax.Array


def _first(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: v[0] for k, v in values.items()}


def importance_resample(
    rng_key: jax.Array,
    model: Callable,
    fit: LocalFit,
    batch: Any,
    num_samples: int,
    *,
    num_proposals: int = 1024,
    defensive_weight: float = 0.5,
    defensive_scale: float = 1.0,
    chunk_size: int = 64,
    **model_kwargs: Any,
) -> ImportanceDraws:
    """Posterior draws of every task's local latents by self-normalised importance sampling.

    The proposal is a defensive mixture (Hesterberg 1995): with weight
    ``defensive_weight`` a broad ``N(0, defensive_scale^2 I)``, the rest split over the
    fitted restarts' guides by :func:`restart_weights`. Every component's density is
    evaluated at every draw (the IAF is inverted), so the weights
    ``p(y, z) / q_mix(z)`` are those of the deterministic mixture, and the draws cover both
    what the mode-seeking fits found and the broad posterior of a small support set that
    they miss. ``num_samples`` draws are then resampled in proportion to the weights.

    Args:
        model: the model with its shared parameters bound (as for :func:`fit_local`).
        fit: a :class:`LocalFit` that kept every restart (``restart_params``).
        batch: the support set ``fit`` was fitted to (leading ``[T]`` axis).
        num_proposals: proposal draws per task.
        defensive_weight: the broad component's share of the proposal, in ``(0, 1]``.
        chunk_size: proposals whose log joint is evaluated at once (memory).
        **model_kwargs: passed to the model.

    Returns:
        :class:`ImportanceDraws`.

    References:
        Owen and Zhou (2000), "Safe and effective importance sampling" (mixture weights).
    """
    from metaprior.inference.mcmc import per_task_log_joint

    if fit.restart_params is None:
        raise ValueError("fit.restart_params is None: this LocalFit did not keep every restart's parameters")
    if num_samples < 1 or num_proposals < 1:
        raise ValueError(f"num_samples and num_proposals must be >= 1, got {num_samples}, {num_proposals}")
    if not 0.0 < defensive_weight <= 1.0:
        raise ValueError(f"defensive_weight must be in (0, 1], got {defensive_weight}")
    guide = fit.guide
    num_tasks, num_restarts = fit.restart_elbo.shape
    d = guide.latent_dim
    restarts = [jax.tree.map(lambda p, r=r: p[:, r], fit.restart_params) for r in range(num_restarts)]
    # a task whose restarts all diverged (no finite ELBO) draws from the broad component alone
    diverged = ~jnp.any(jnp.isfinite(fit.restart_elbo), axis=-1, keepdims=True)  # [T, 1]
    weights = jnp.nan_to_num(restart_weights(fit), nan=0.0)
    log_rest = jnp.where(
        weights > 0, jnp.log1p(-defensive_weight) + jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf
    )
    if defensive_weight == 1.0:
        log_rest = jnp.full_like(log_rest, -jnp.inf)
    log_broad = jnp.where(diverged, 0.0, jnp.log(defensive_weight))
    log_pi = jnp.concatenate([log_broad, log_rest], axis=-1)  # [T, 1 + R]
    k_pick, k_broad, k_rest, k_resample = jax.random.split(rng_key, 4)
    # draw M proposals from every component, then keep, per draw, the one its pick names
    broad = defensive_scale * jax.random.normal(k_broad, (num_proposals, num_tasks, d))
    draws = [broad] + [
        guide.sample(jax.random.fold_in(k_rest, r), p, num_proposals, batch)[0] for r, p in enumerate(restarts)
    ]
    pick = jax.random.categorical(k_pick, log_pi, shape=(num_proposals, num_tasks))  # [M, T]
    u = jnp.take_along_axis(jnp.stack(draws), pick[None, :, :, None], axis=0)[0]  # [M, T, D]
    log_q = [jnp.sum(jax.scipy.stats.norm.logpdf(u, 0.0, defensive_scale), axis=-1)]
    log_q += [guide.log_prob(p, u, batch) for p in restarts]
    log_q_mix = jax.scipy.special.logsumexp(jnp.stack(log_q, axis=-1) + log_pi[None], axis=-1)  # [M, T]

    def log_joint(u_chunk):
        return jax.vmap(
            lambda v: per_task_log_joint(model, batch, values=_first(guide.split_sites(v[None])), **model_kwargs)
        )(u_chunk)

    num_chunks = -(-num_proposals // chunk_size)
    padded = jnp.concatenate([u, jnp.zeros((num_chunks * chunk_size - num_proposals, num_tasks, d))])
    log_p = jax.lax.map(log_joint, padded.reshape(num_chunks, chunk_size, num_tasks, d))
    log_p = log_p.reshape(-1, num_tasks)[:num_proposals]
    log_w = jnp.where(jnp.isfinite(log_p) & jnp.isfinite(log_q_mix), log_p - log_q_mix, -jnp.inf)  # [M, T]
    if not bool(jnp.all(jnp.any(jnp.isfinite(log_w), axis=0))):
        bad = np.flatnonzero(~np.asarray(jnp.any(jnp.isfinite(log_w), axis=0))).tolist()
        raise ValueError(f"importance_resample: no proposal has a finite weight for task(s) {bad[:10]}")
    log_norm = jax.scipy.special.logsumexp(log_w, axis=0)
    w = jnp.exp(log_w - log_norm)
    ess = 1.0 / jnp.sum(w**2, axis=0)
    idx = jax.random.categorical(k_resample, log_w.T, shape=(num_samples, num_tasks))  # [S, T]
    z = jnp.take_along_axis(u, idx[:, :, None], axis=0)
    return ImportanceDraws(guide.split_sites(z), ess, log_norm - jnp.log(num_proposals))


# --------------------------------------------------------------------------- meta-training


def subsample_indices(rng_key: jax.Array, size: int, subsample_size: int) -> jax.Array:
    """``subsample_size`` distinct indices of ``range(size)``, uniformly at random.

    Partial Fisher-Yates (as NumPyro's plate subsamples): ``subsample_size`` swaps on
    ``arange(size)``, so the cost is O(size) memory and O(subsample_size) work, not a sort.
    """
    if not 1 <= subsample_size <= size:
        raise ValueError(f"subsample_size must be in [1, {size}], got {subsample_size}")
    keys = jax.random.split(rng_key, subsample_size)

    def body(val, i):
        top = size - 1 - i
        j = jax.random.randint(keys[i], (), 0, top + 1)
        return val.at[jnp.stack([top, j])].set(val[jnp.stack([j, top])]), None

    val, _ = jax.lax.scan(body, jnp.arange(size), jnp.arange(subsample_size))
    return val[size - subsample_size :]


class TaskBatchState(NamedTuple):
    """Optimizer state of :func:`task_batch_learner` (``MetaState.opt_state``).

    Attributes:
        shared: the shared optimizer's state (the model's params: the learned prior).
        rows: one local optimizer state per task (every leaf has a leading ``[num_tasks]``
            axis, step counts included), so a task's moments, bias corrections and
            schedules advance with its own visits and are untouched in between.
    """

    shared: Any
    rows: Any


def task_batch_learner(
    model: Callable,
    guide: _TaskGuideBase,
    *,
    task_batch: int,
    optimizer: optax.GradientTransformation,
    local_optimizer: optax.GradientTransformation | None = None,
    local_steps: int = 0,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    model_kwargs: dict[str, Any] | None = None,
):
    """Meta-training over many tasks with per-task guides: a row-sparse variational-EM step.

    The objective is the subsampled ELBO of ``plate("tasks", N, subsample_size=B)``:
    ``(N / B) * ELBO(model, guide on the B drawn tasks)``, unbiased for the full ELBO.
    Unlike differentiating the model with ``subsample_size`` set, each step here

    1. draws ``B`` task indices and gathers those tasks' data and guide rows (work and
       memory traffic are O(B), not O(N): the step time is flat in ``N``);
    2. optionally takes ``local_steps`` steps of ``local_optimizer`` on those rows with
       the shared parameters fixed (the E-step of variational EM). With thousands of
       tasks each task is visited once every ``N / B`` steps, so without this the local
       posteriors lag far behind the prior they are meant to track;
    3. takes one step of ``optimizer`` on the shared parameters and one of
       ``local_optimizer`` on the rows, both from the gradient at the refreshed rows,
       and scatters the rows (and their optimizer moments) back.

    ``MetaState.params`` holds the guide's full ``[N, ...]`` tables and the model's params
    under their site names, exactly as :func:`~metaprior.inference.svi.init_params`
    returns them, so checkpoints and downstream code do not change.

    Args:
        model: ``model(batch, **model_kwargs)`` with a ``plate("tasks")`` over the
            leading axis of ``batch`` (called here on the ``B`` gathered tasks, no
            ``subsample_size``).
        guide: a task-local guide laid out for the ``N`` meta-training tasks.
        task_batch: ``B``.
        optimizer: Optax transformation of the shared (model) parameters.
        local_optimizer: Optax transformation of the guide rows (default: Adam 0.05).
        local_steps: E-step iterations per meta-step (0: plain joint SGD on the ELBO).
        kl_weight: weight of the KL term (0: the likelihood-only baseline).
        num_particles: ELBO samples per gradient.
        model_kwargs: further static keyword arguments of the model and guide.

    Returns:
        A :class:`~metaprior.inference.meta.MetaLearner` for
        :func:`~metaprior.inference.meta.fit` (``data`` = the ``[N, ...]`` task set).
    """
    from numpyro import handlers

    from metaprior.inference.meta import MetaInfo, MetaLearner, MetaState

    num_tasks = guide.num_tasks
    if not 1 <= task_batch <= num_tasks:
        raise ValueError(f"task_batch must be in [1, {num_tasks}] (the guide's tasks), got {task_batch}")
    if int(local_steps) != local_steps or local_steps < 0:
        raise ValueError(f"local_steps must be a non-negative integer, got {local_steps!r}")
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs.get("subsample_size") is not None:
        raise ValueError("task_batch_learner draws the task batch itself: drop model_kwargs['subsample_size']")
    if local_optimizer is None:
        local_optimizer = optax.adam(0.05)
    scale = num_tasks / task_batch
    guide_b = guide_for_num_tasks(guide, task_batch)
    loss_b = elbo_loss(
        handlers.scale(model, scale=scale),
        handlers.scale(guide_b, scale=scale),
        kl_weight=kl_weight,
        num_particles=num_particles,
        model_kwargs=model_kwargs,
    )
    prefix = guide.prefix + "_"

    def split(params):
        rows = {k: v for k, v in params.items() if k.startswith(prefix)}
        shared = {k: v for k, v in params.items() if not k.startswith(prefix)}
        for k, v in rows.items():
            if jnp.shape(v)[:1] != (num_tasks,):
                raise ValueError(
                    f"guide parameter {k!r} has shape {jnp.shape(v)}, expected a leading [{num_tasks}] tasks axis"
                )
        return shared, rows

    def init(params):
        shared, rows = split(params)
        return MetaState(
            jnp.zeros((), jnp.int32),
            params,
            TaskBatchState(optimizer.init(shared), jax.vmap(local_optimizer.init)(rows)),
        )

    def take(tree, idx):
        return jax.tree.map(lambda a: a[idx], tree)

    def put(full, part, idx):
        return jax.tree.map(lambda a, p: a.at[idx].set(p), full, part)

    # one optimizer per task: a shared Adam step count would skip the bias correction of
    # rows that are visited for the first time late in training (steps ~1/sqrt(1-b2) too big)
    local_update = jax.vmap(local_optimizer.update)

    def step(rng_key, state, data):
        shared, table = split(state.params)
        k_idx, k_e, k_m = jax.random.split(rng_key, 3)
        idx = subsample_indices(k_idx, num_tasks, task_batch)
        batch = jax.tree.map(lambda a: a[idx] if a is not None else None, data)
        rows = take(table, idx)
        row_opt = take(state.opt_state.rows, idx)

        def local_loss(r, key):
            return loss_b({**shared, **r}, key, batch)

        def e_step(carry, key):
            r, s = carry
            g = jax.grad(local_loss)(r, key)
            upd, s = local_update(g, s, r)
            return (optax.apply_updates(r, upd), s), None

        if local_steps:
            (rows, row_opt), _ = jax.lax.scan(e_step, (rows, row_opt), jax.random.split(k_e, local_steps))
        loss, (g_shared, g_rows) = jax.value_and_grad(lambda s, r: loss_b({**s, **r}, k_m, batch), argnums=(0, 1))(
            shared, rows
        )
        upd, opt_shared = optimizer.update(g_shared, state.opt_state.shared, shared)
        shared = optax.apply_updates(shared, upd)
        upd, row_opt = local_update(g_rows, row_opt, rows)
        rows = optax.apply_updates(rows, upd)
        table = put(table, rows, idx)
        opt_rows = put(state.opt_state.rows, row_opt, idx)
        info = MetaInfo(loss, optax.tree.norm((g_shared, g_rows)), None)
        return MetaState(state.step + 1, {**shared, **table}, TaskBatchState(opt_shared, opt_rows)), info

    return MetaLearner(init, step)
