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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metaprior.inference.guides.task_local import _TaskGuideBase
from metaprior.inference.svi import elbo_loss

__all__ = ["LocalFit", "fit_local", "guide_for_num_tasks"]


class LocalFit(NamedTuple):
    """Result of :func:`fit_local`.

    Attributes:
        guide: the guide laid out for the ``T`` tasks of the batch.
        params: its parameters (best restart per task), leading axis ``[T]``.
        elbo: ``[T]`` ELBO of the kept restart (``eval_particles`` samples).
        restart_elbo: ``[T, R]`` ELBO of every restart.
        losses: ``[T, R, num_steps]`` training curves.
    """

    guide: _TaskGuideBase
    params: dict[str, jax.Array]
    elbo: jax.Array
    restart_elbo: jax.Array
    losses: jax.Array


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
) -> LocalFit:
    """Fit a task-local guide to every task of ``batch`` separately, with restarts.

    The model's own ``param`` sites (e.g. the network) are not optimised: they keep the
    values the model is called with (bind trained values with ``functools.partial`` or
    ``numpyro.handlers.substitute``). Only the guide's parameters move.

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

    Returns:
        :class:`LocalFit`.
    """
    if num_steps < 1 or num_restarts < 1:
        raise ValueError(f"num_steps and num_restarts must be >= 1, got {num_steps}, {num_restarts}")
    model_kwargs = dict(model_kwargs or {})
    if model_kwargs.get("subsample_size") is not None:
        raise ValueError("fit_local fits all tasks: model_kwargs['subsample_size'] must be None")
    leaves = [leaf for leaf in jax.tree.leaves(batch) if leaf is not None]
    if not leaves:
        raise ValueError("batch has no arrays")
    num_tasks = leaves[0].shape[0]
    if optimizer is None:
        optimizer = optax.adam(optax.cosine_decay_schedule(0.05, num_steps, alpha=0.01))
    one_guide = guide_for_num_tasks(guide, 1)
    loss = elbo_loss(model, one_guide, kl_weight=kl_weight, num_particles=num_particles, model_kwargs=model_kwargs)
    eval_loss = elbo_loss(model, one_guide, kl_weight=kl_weight, num_particles=eval_particles,
                          model_kwargs=model_kwargs)
    grad = jax.value_and_grad(loss)

    def one_restart(key, task):
        k_init, k_run, k_eval = jax.random.split(key, 3)
        params = one_guide.init_params(k_init)
        # restarts differ in where the base Normal starts (the prior's typical set)
        params[f"{one_guide.prefix}_loc"] = jax.random.normal(k_init, params[f"{one_guide.prefix}_loc"].shape)

        def step(carry, k):
            p, s = carry
            value, g = grad(p, k, task)
            updates, s = optimizer.update(g, s, p)
            return (optax.apply_updates(p, updates), s), value

        (params, _), curve = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(k_run, num_steps))
        return params, -eval_loss(params, k_eval, task), curve

    def one_task(key, task):
        task = jax.tree.map(lambda a: a[None], task)
        params, elbos, curves = jax.vmap(one_restart, in_axes=(0, None))(jax.random.split(key, num_restarts), task)
        elbos = jnp.where(jnp.isfinite(elbos), elbos, -jnp.inf)
        best = jnp.argmax(elbos)
        return jax.tree.map(lambda p: p[best, 0], params), elbos[best], elbos, curves

    params, elbo, restart_elbo, losses = jax.jit(jax.vmap(one_task))(jax.random.split(rng_key, num_tasks), batch)
    return LocalFit(guide_for_num_tasks(guide, num_tasks), params, elbo, restart_elbo, losses)
