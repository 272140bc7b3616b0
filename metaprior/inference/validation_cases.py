"""The four validation cases of :mod:`metaprior.inference.validation`: small models whose
reference posterior can be trusted, each with its data drawn from a key.

- :func:`linear_case` (a): hierarchical linear regression, conjugate: NUTS is itself checked
  against the closed form (:func:`metaprior.models.cases.linear.hierarchical_linear_posterior`).
- :func:`bnn_case` (b): a hierarchical Bayesian MLP (one hidden layer) on sinusoid tasks.
- :func:`latent_case` (c): the task-latent model of "Learning a Rich Prior" at a tiny size,
  the network ``alpha`` fitted first and then held fixed, on tasks simulated from that
  fixed model. With alpha fixed the tasks are independent and each posterior over ``z_j``
  has a few dimensions, so two-level grid quadrature gives an exact reference
  (:func:`metaprior.inference.mcmc.grid_posterior`), and NUTS starts from each task's best
  of many MAP restarts (:func:`metaprior.inference.mcmc.restart_init`): the likelihood's
  noise is at most 0.101 by construction, so ``z`` has narrow local modes that chains
  started at random never leave.
- :func:`mixture_case` (d): task clusters with each task's cluster index enumerated
  exactly (``TraceEnum_ELBO`` for SVI, enumeration inside NUTS).

Each builder draws ``num_examples + num_heldout`` points per task and keeps the last
``num_heldout`` as the held-out test points.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import SVI, Predictive
from numpyro.infer.autoguide import AutoNormal

from metaprior.data.tasks import TaskBatch, harmonic_tasks, sinusoid_tasks, split_support_query
from metaprior.inference.mcmc import grid_posterior, per_task_log_joint, restart_init
from metaprior.inference.svi import OrderedTrace_ELBO
from metaprior.inference.validation import GUIDES, LAPLACE, RESTART_GUIDES, Case
from metaprior.models.cases.bnn import hierarchical_bnn_model, make_bnn
from metaprior.models.cases.linear import (
    hierarchical_linear_model,
    hierarchical_linear_posterior,
    hierarchical_linear_tasks,
)
from metaprior.models.cases.mixture import task_mixture_model, task_mixture_tasks
from metaprior.models.task_latent import make_task_latent_net, task_latent_model

__all__ = ["linear_case", "bnn_case", "bnn_laplace", "latent_case", "mixture_case", "fixed_params", "CASE_BUILDERS"]


def linear_case(rng_key: jax.Array, *, num_tasks: int, num_examples: int, num_heldout: int, num_draws: int) -> Case:
    """Case (a), with ``num_draws`` exact posterior draws."""
    k_data, k_exact = jax.random.split(rng_key)
    batch, _ = hierarchical_linear_tasks(k_data, num_tasks, num_examples + num_heldout)
    train, test = split_support_query(batch, num_examples)
    post = hierarchical_linear_posterior(train)
    d = post.mean["mu"].shape[0]
    theta = np.random.default_rng(int(jax.random.randint(k_exact, (), 0, 2**31 - 1))).multivariate_normal(
        post.joint_mean, post.joint_cov, size=num_draws
    )
    exact = {"mu": theta[:, :d], "w": theta[:, d:].reshape(num_draws, num_tasks, 1, d)}
    note = f"{num_tasks} tasks x {num_examples} points, 2 weights per task"
    return Case("linear", hierarchical_linear_model, train, test, {}, GUIDES, ("w",), exact, note)


def bnn_case(rng_key: jax.Array, *, num_tasks: int, num_examples: int, num_heldout: int, num_hidden: int) -> Case:
    """Case (b): an MLP 1-``num_hidden``-1 (tanh) per sinusoid task around a shared mean."""
    batch, _ = sinusoid_tasks(
        rng_key, num_tasks, num_examples + num_heldout, amplitude=(0.5, 1.5), x_range=(-3.0, 3.0), noise_std=0.3
    )
    train, test = split_support_query(batch, num_examples)
    kwargs = {"num_hidden": num_hidden, "task_scale": 0.3, "noise_scale": 0.3}
    note = f"{num_tasks} sinusoid tasks x {num_examples} points, MLP 1-{num_hidden}-1 tanh"
    methods = GUIDES + LAPLACE
    return Case("bnn", hierarchical_bnn_model, train, test, kwargs, methods, ("phi",), None, note, laplace=bnn_laplace)


def bnn_laplace(rng_key: jax.Array, case: Case, mode: dict, structure: str, num_draws: int) -> dict:
    """The BNN case's task-level Laplace (LLAMA's posterior): per task
    ``phi_j ~ N(phi_j*, (GGN_j + I / task_scale^2)^-1)`` in the network's curvature
    (``full``, ``diag`` or ``kfac``), the shared mean held at its MAP."""
    import equinox as eqx
    import numpyro.distributions as dist
    from jax.flatten_util import ravel_pytree

    from metaprior.inference import laplace as lp

    task_scale, noise_scale = case.kwargs["task_scale"], case.kwargs["noise_scale"]
    _, unravel = make_bnn(case.kwargs["num_hidden"])
    x, y = np.asarray(case.train.x), np.asarray(case.train.y)
    draws = []
    for j in range(x.shape[0]):
        post = lp.laplace(
            None,
            unravel(mode["phi"][j, 0]),
            jnp.asarray(x[j]),
            jnp.asarray(y[j]),
            apply_fn=lp.vmap_apply,
            likelihood=lambda f: dist.Normal(f[:, 0], noise_scale),
            structure=structure,
            prior_precision=1.0 / task_scale**2,
        )
        sampled = lp.sample_params(jax.random.fold_in(rng_key, 10 + j), post, num_draws)
        params = eqx.filter(eqx.combine(sampled, post.rest), eqx.is_array)
        draws.append(jax.vmap(lambda p: ravel_pytree(p)[0])(params))
    out = {name: jnp.broadcast_to(value, (num_draws, *jnp.shape(value))) for name, value in mode.items()}
    out["phi"] = jnp.stack(draws, axis=1)[:, :, None, :]
    return out


def fixed_params(model: Callable, params: dict) -> Callable:
    """``model`` with its ``param`` sites set to ``params`` and hidden from inference."""
    return handlers.block(handlers.substitute(model, data=params), hide_fn=lambda m: m["type"] == "param")


def _grid_reference(rng_key, model, train: TaskBatch, kwargs: dict, *, latent_dim: int, num_draws: int, grid: int):
    """Exact draws ``{"z": [draws, tasks, 1, latent_dim]}``: alpha fixed, the tasks are
    independent and each posterior over ``z_j`` (a density on R^d, d <= 2) is integrated on a
    grid (every mode, however many)."""
    per_task = []
    for j, key in enumerate(jax.random.split(rng_key, train.x.shape[0])):

        def log_density(z, j=j):
            m = z.shape[0]
            one = TaskBatch(
                jnp.broadcast_to(train.x[j], (m, *train.x.shape[1:])),
                jnp.broadcast_to(train.y[j], (m, *train.y.shape[1:])),
                jnp.broadcast_to(train.mask[j], (m, *train.mask.shape[1:])),
            )
            return per_task_log_joint(model, one, values={"z": z[:, None, :]}, **kwargs)

        draws, _ = grid_posterior(key, log_density, latent_dim, num_draws, coarse=grid)
        per_task.append(draws)
    return {"z": np.stack(per_task, 1)[:, :, None, :].astype(np.float32)}


def latent_case(
    rng_key: jax.Array,
    *,
    num_tasks: int,
    num_examples: int,
    num_heldout: int,
    num_draws: int,
    family: str = "sinusoid",
    data: str = "model",
    noise_std: float = 0.05,
    latent_dim: int = 2,
    width: int = 32,
    num_layers: int = 2,
    num_pretrain_tasks: int = 128,
    num_pretrain_steps: int = 1500,
    num_restarts: int = 64,
    grid: int = 400,
) -> Case:
    """Case (c): the task-latent model with its network fitted by SVI on other tasks, then fixed.

    Args:
        family: ``"sinusoid"`` or ``"harmonic"``: the tasks alpha is fitted on, and the inputs.
        data: ``"model"``: targets simulated from the fixed-alpha model at ``z_j ~ N(0, I)``;
            ``"family"``: the family's own targets (observation noise ``noise_std``).
        latent_dim, width, num_layers: the paper's residual MLP.
        num_pretrain_tasks, num_pretrain_steps: the SVI fit of alpha (16 points per task).
        num_restarts: MAP restarts per task behind NUTS's starting points (0: random).
        grid: coarse grid cells per axis of the quadrature reference (0: none; only for
            ``latent_dim <= 2``).
    """
    if data not in ("model", "family"):
        raise ValueError(f"latent_data must be 'model' or 'family', got {data!r}")
    k_net, k_pre, k_fit, k_data, k_sim, k_grid = jax.random.split(rng_key, 6)
    # the paper's residual MLP, as when the recorded validation figures were measured
    net = make_task_latent_net(k_net, latent_dim, arch="paper", width=width, num_layers=num_layers)
    kwargs = {"net": net, "latent_dim": latent_dim}
    if family == "harmonic":

        def tasks(key, n_tasks, n_examples):
            return harmonic_tasks(key, n_tasks, n_examples, noise_std=noise_std)[0]
    elif family == "sinusoid":

        def tasks(key, n_tasks, n_examples):
            return sinusoid_tasks(key, n_tasks, n_examples, noise_std=noise_std)[0]
    else:
        raise ValueError(f"latent_family must be 'harmonic' or 'sinusoid', got {family!r}")
    # alpha: fitted once by SVI on other tasks, then held fixed (the paper's new-task setting).
    pre = tasks(k_pre, num_pretrain_tasks, 16)
    svi = SVI(task_latent_model, AutoNormal(task_latent_model), optax.adam(3e-3), OrderedTrace_ELBO())
    fit = svi.run(k_fit, num_pretrain_steps, pre, progress_bar=False, **kwargs)
    model = fixed_params(task_latent_model, {k: v for k, v in fit.params.items() if k.startswith("net")})
    batch = tasks(k_data, num_tasks, num_examples + num_heldout)
    if data == "model":  # targets from the fixed model itself, at z_j ~ N(0, I)
        simulated = Predictive(model, num_samples=1)(k_sim, TaskBatch(batch.x, None, batch.mask), **kwargs)
        batch = TaskBatch(batch.x, simulated["y"][0], batch.mask)
    train, test = split_support_query(batch, num_examples)

    exact = None
    if grid > 0 and latent_dim <= 2:
        exact = _grid_reference(k_grid, model, train, kwargs, latent_dim=latent_dim, num_draws=num_draws, grid=grid)

    nuts_init = None
    if num_restarts > 0:

        def nuts_init(key, num_chains):
            found = restart_init(key, model, train, site="z", num_chains=num_chains, num_starts=num_restarts, **kwargs)
            return found.init_params, {"mode_gap_min": float(np.min(found.gap))}

    source = "simulated from the fixed model" if data == "model" else f"{family} targets"
    note = (
        f"{num_tasks} {family}-input tasks x {num_examples} points ({source}), "
        f"z in R^{latent_dim}, alpha fixed after {num_pretrain_steps} SVI steps on "
        f"{num_pretrain_tasks} tasks"
        + (", exact = grid quadrature" if exact is not None else "")
        + (f", NUTS chains start at the best of {num_restarts} MAP restarts per task" if nuts_init else "")
    )
    methods = GUIDES + tuple(RESTART_GUIDES)
    return Case("latent", model, train, test, kwargs, methods, ("z",), exact, note, nuts_init)


def mixture_case(rng_key: jax.Array, *, num_tasks: int, num_examples: int, num_heldout: int) -> Case:
    """Case (d): three equally likely clusters of task intercepts (-3, 0, 3)."""
    batch, _ = task_mixture_tasks(
        rng_key, num_tasks, num_examples + num_heldout, intercepts=(-3.0, 0.0, 3.0), weights=(1 / 3, 1 / 3, 1 / 3)
    )
    train, test = split_support_query(batch, num_examples)
    note = f"{num_tasks} tasks x {num_examples} points, 3 clusters, c enumerated"
    methods = ("autonormal", "automvn", "autoiaf")
    return Case("mixture", task_mixture_model, train, test, {}, methods, (), None, note)


CASE_BUILDERS = {"linear": linear_case, "bnn": bnn_case, "latent": latent_case, "mixture": mixture_case}
