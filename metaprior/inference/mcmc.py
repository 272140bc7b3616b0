"""NUTS baselines: several chains on the same NumPyro programs the approximations use.

A reference posterior is only as good as its convergence checks, so :func:`run_nuts`
always runs several chains and :func:`nuts_health` reports the split R-hat and bulk
effective sample size of every scalar parameter (computed by ArviZ) next to the number
of divergent transitions.

Chains are vectorised (``chain_method="vectorized"``) on a single device (a CPU, or one
GPU where vectorised chains share the accelerator), and run in parallel, one per
device, when there are at least as many devices as chains.

Discrete latents marked ``infer={"enumerate": "parallel"}`` are summed out inside NUTS
(NumPyro's funsor-based enumeration); draw them afterwards with
:func:`metaprior.inference.diagnostics.from_samples`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS

__all__ = [
    "default_chain_method",
    "run_nuts",
    "NutsHealth",
    "nuts_health",
    "per_task_log_joint",
    "restart_init",
    "RestartInit",
    "grid_posterior",
]


def default_chain_method(num_chains: int) -> str:
    """``"parallel"`` when there are at least ``num_chains`` devices, else ``"vectorized"``."""
    return "parallel" if jax.local_device_count() >= num_chains > 1 else "vectorized"


def run_nuts(
    rng_key: jax.Array,
    model: Callable,
    *model_args: Any,
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    chain_method: str | None = None,
    target_accept_prob: float = 0.8,
    dense_mass: bool = False,
    max_tree_depth: int = 10,
    init_strategy: Callable | None = None,
    init_params: dict | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> MCMC:
    """Sample a NumPyro program with NUTS, several chains.

    Args:
        rng_key: PRNG key (split into one key per chain by NumPyro).
        model: the NumPyro program, unchanged (the same one the guides are fitted to).
        *model_args, **model_kwargs: its arguments, observations included.
        num_chains: independent chains (at least 2 for a meaningful R-hat).
        num_warmup: adaptation steps per chain (step size and diagonal/dense mass).
        num_samples: kept draws per chain.
        chain_method: ``"vectorized"``, ``"parallel"`` or ``"sequential"``; default
            :func:`default_chain_method`.
        target_accept_prob: dual-averaging target (raise towards 0.95 on curved posteriors).
        dense_mass: adapt a dense mass matrix (correlated posteriors of small dimension).
        max_tree_depth: NUTS tree depth limit.
        init_strategy: NumPyro init strategy (default ``init_to_uniform``, different per chain).
        init_params: starting values ``{site: [num_chains, ...]}`` (constrained space), e.g.
            from :func:`restart_init`; overrides ``init_strategy``.
        progress: NumPyro's progress bar.

    Returns:
        The finished :class:`numpyro.infer.MCMC` (``get_samples(group_by_chain=True)``,
        ``get_extra_fields()["diverging"]``).

    References:
        Hoffman & Gelman (2014), "The No-U-Turn Sampler"; Phan, Pradhan, Jankowiak (2019),
        "Composable Effects for Flexible and Accelerated Probabilistic Programming in NumPyro".
    """
    if num_chains < 1 or num_samples < 1 or num_warmup < 0:
        raise ValueError(
            f"need num_chains >= 1, num_samples >= 1, num_warmup >= 0; got {num_chains}, {num_samples}, {num_warmup}"
        )
    kernel_kwargs = dict(target_accept_prob=target_accept_prob, dense_mass=dense_mass, max_tree_depth=max_tree_depth)
    if init_strategy is not None:
        kernel_kwargs["init_strategy"] = init_strategy
    mcmc = MCMC(
        NUTS(model, **kernel_kwargs),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method or default_chain_method(num_chains),
        progress_bar=progress,
    )
    if init_params is not None:
        for name, value in init_params.items():
            if np.shape(value)[:1] != (num_chains,):
                raise ValueError(
                    f"init_params[{name!r}] must have a leading axis of num_chains={num_chains}, "
                    f"got shape {np.shape(value)}"
                )
        if num_chains == 1:
            init_params = {k: v[0] for k, v in init_params.items()}
    mcmc.run(rng_key, *model_args, extra_fields=("diverging",), init_params=init_params, **model_kwargs)
    return mcmc


class NutsHealth(NamedTuple):
    """Convergence of a multi-chain run, over every scalar parameter.

    Attributes:
        rhat_max: largest rank-normalised split R-hat.
        ess_bulk_min: smallest bulk effective sample size.
        num_divergent: divergent transitions after warmup (all chains).
        worst_rhat: the parameter (``name[index]``) with the largest R-hat.
        worst_ess: the parameter with the smallest bulk ESS.
    """

    rhat_max: float
    ess_bulk_min: float
    num_divergent: int
    worst_rhat: str
    worst_ess: str

    def ok(self, *, rhat: float = 1.01, ess: float = 400.0) -> bool:
        """Whether R-hat <= ``rhat`` and bulk ESS >= ``ess`` for every parameter."""
        return bool(self.rhat_max <= rhat and self.ess_bulk_min >= ess)


def _worst(dataset, pick) -> tuple[float, str]:
    best_value, best_name = None, ""
    for name, da in dataset.data_vars.items():
        values = np.asarray(da.values, dtype=np.float64)
        if values.size == 0:
            continue
        flat = np.where(np.isnan(values), -np.inf if pick is np.argmax else np.inf, values).ravel()
        i = int(pick(flat))
        if best_value is None or (flat[i] > best_value if pick is np.argmax else flat[i] < best_value):
            index = np.unravel_index(i, values.shape) if values.ndim else ()
            best_value = float(flat[i])
            best_name = f"{name}{list(map(int, index))}" if values.ndim else str(name)
    return (float("nan") if best_value is None else best_value), best_name


def nuts_health(samples: dict[str, Any] | Any, *, diverging: Any = None, var_names=None) -> NutsHealth:
    """Split R-hat and bulk ESS (ArviZ) of every scalar parameter, and divergences.

    Args:
        samples: ``{name: [chain, draw, ...]}``, an :class:`numpyro.infer.MCMC` after
            ``run``, or an ArviZ DataTree with a ``posterior`` group.
        diverging: ``[chain, draw]`` divergence flags (taken from the MCMC run or the
            tree's ``sample_stats`` when those are given).
        var_names: restrict to these variables.

    Returns:
        A :class:`NutsHealth`.

    References:
        Vehtari, Gelman, Simpson, Carpenter, Buerkner (2021), "Rank-normalization,
        folding, and localization: an improved R-hat", Bayesian Analysis.
    """
    import arviz as az

    if isinstance(samples, MCMC):
        if diverging is None:
            diverging = samples.get_extra_fields(group_by_chain=True).get("diverging")
        samples = samples.get_samples(group_by_chain=True)
    if isinstance(samples, dict):
        posterior = az.from_dict({"posterior": {k: np.asarray(v) for k, v in samples.items()}})["posterior"]
    else:
        if diverging is None and "sample_stats" in samples.children:
            stats = samples["sample_stats"]
            diverging = stats["diverging"].values if "diverging" in stats.data_vars else None
        posterior = samples["posterior"]
    dataset = posterior.to_dataset() if hasattr(posterior, "to_dataset") else posterior
    if var_names is not None:
        dataset = dataset[list(var_names)]
    rhat = az.rhat(dataset)
    ess = az.ess(dataset, method="bulk")
    rhat_max, worst_rhat = _worst(rhat, np.argmax)
    ess_min, worst_ess = _worst(ess, np.argmin)
    num_divergent = 0 if diverging is None else int(np.asarray(diverging).sum())
    return NutsHealth(rhat_max, ess_min, num_divergent, worst_rhat, worst_ess)


# --------------------------------------------------------------------------------------
# Models whose tasks are independent given fixed globals (a new task's posterior with the
# learned prior held fixed): per-task log joints, restarts, quadrature.
# --------------------------------------------------------------------------------------


def per_task_log_joint(
    model: Callable, *model_args: Any, values: dict, plate: str = "tasks", **model_kwargs: Any
) -> jax.Array:
    """``log p(y_j, latents_j)`` for every task ``j`` at the given latent values.

    Every sample site's log-density (masks applied) is summed over all its axes but the
    one of ``plate``; sites outside that plate are an error, since the per-task split is
    only defined when the tasks share no latent (e.g. the network held fixed).

    Args:
        model, *model_args, **model_kwargs: the NumPyro program and its arguments.
        values: ``{site: value}`` of every latent site (the model's own shapes).
        plate: the name of the tasks plate.

    Returns:
        ``[num_tasks]`` log joint densities.
    """
    from numpyro import handlers

    traced = handlers.trace(handlers.substitute(handlers.seed(model, jax.random.key(0)), data=values))
    trace = traced.get_trace(*model_args, **model_kwargs)
    total = None
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        frames = [f for f in site["cond_indep_stack"] if f.name == plate]
        if not frames:
            raise ValueError(
                f"site {name!r} is outside plate {plate!r}: the tasks are not independent, "
                "so there is no per-task log joint (hold the shared sites fixed first)"
            )
        log_prob = site["fn"].log_prob(site["value"])
        if site.get("scale") is not None:
            log_prob = site["scale"] * log_prob
        axis = log_prob.ndim + frames[0].dim
        log_prob = jax.numpy.moveaxis(log_prob, axis, 0)
        per_task = log_prob.reshape(log_prob.shape[0], -1).sum(-1)
        total = per_task if total is None else total + per_task
    if total is None:
        raise ValueError("the model has no sample sites")
    return total


class RestartInit(NamedTuple):
    """Chain starting points from multi-start MAP optimisation.

    Attributes:
        init_params: ``{site: [num_chains, ...]}`` for :func:`run_nuts`.
        best: ``{site: value}``, the best restart per task.
        log_joint: ``[num_starts, num_tasks]`` log joint of every restart at its end.
        gap: ``[num_tasks]`` nats between the best restart and the best restart farther
            than ``separation`` from it (``inf`` when all restarts end at one mode): how
            much lower the next mode found is.
    """

    init_params: dict
    best: dict
    log_joint: jax.Array
    gap: np.ndarray


def restart_init(
    rng_key: jax.Array,
    model: Callable,
    *model_args: Any,
    site: str,
    num_chains: int = 4,
    num_starts: int = 64,
    num_steps: int = 2000,
    learning_rate: float = 0.05,
    init_scale: float = 1.5,
    jitter: float = 0.01,
    separation: float = 0.1,
    plate: str = "tasks",
    **model_kwargs: Any,
) -> RestartInit:
    """Start NUTS chains at each task's best mode, found by many random restarts.

    For a model whose tasks are independent (the shared network fixed), each task's
    latent ``site`` is optimised from ``num_starts`` random starts (``N(0, init_scale^2)``,
    Adam on the log joint, all restarts in one ``vmap``); per task the restart with the
    highest log joint is kept (the random restarts of new-task inference in "Learning a
    Rich Prior"), and every chain starts there plus ``N(0, jitter^2)`` noise.

    Chains started this way test mixing within the dominant mode, not between modes:
    :attr:`RestartInit.gap` says how far below the next mode found lies (a gap of ``g``
    nats bounds that mode's share of the mass by about ``exp(-g)`` for modes of similar
    width), and :func:`grid_posterior` checks the whole space where ``site`` is small.

    Args:
        rng_key: PRNG key.
        model, *model_args, **model_kwargs: the NumPyro program; ``site`` must be its only
            latent, inside ``plate`` (unconstrained real support).
        site: the latent site.
        num_chains: chains to start.
        num_starts, num_steps, learning_rate, init_scale: the restarts.
        jitter: spread of the chains' starting points around the best restart.
        separation: distance (Euclidean, per task) beyond which two restarts count as
            different modes for :attr:`RestartInit.gap`.
        plate: the tasks plate.
    """
    import jax.numpy as jnp
    import optax
    from numpyro import handlers

    if num_starts < 1 or num_steps < 1:
        raise ValueError(f"num_starts and num_steps must be >= 1, got {num_starts}, {num_steps}")
    trace = handlers.trace(handlers.seed(model, jax.random.key(0))).get_trace(*model_args, **model_kwargs)
    latents = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    if latents != [site]:
        raise ValueError(f"restart_init needs {site!r} as the model's only latent site, found {latents}")
    shape = trace[site]["value"].shape
    frames = [f for f in trace[site]["cond_indep_stack"] if f.name == plate]
    if not frames:
        raise ValueError(f"site {site!r} is not inside plate {plate!r}")
    task_axis = len(trace[site]["fn"].batch_shape) + frames[0].dim  # in the value's shape
    num_tasks = shape[task_axis]

    def log_joint(value):
        return per_task_log_joint(model, *model_args, values={site: value}, plate=plate, **model_kwargs)

    optimizer = optax.adam(learning_rate)

    def climb(value):
        def step(carry, _):
            value, state = carry
            grad = jax.grad(lambda v: -log_joint(v).sum())(value)
            updates, state = optimizer.update(grad, state)
            return (optax.apply_updates(value, updates), state), None

        (value, _), _ = jax.lax.scan(step, (value, optimizer.init(value)), None, length=num_steps)
        return value, log_joint(value)

    k_start, k_jitter = jax.random.split(rng_key)
    starts = init_scale * jax.random.normal(k_start, (num_starts, *shape))
    ends, values = jax.jit(jax.vmap(climb))(starts)
    values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
    best_index = jnp.argmax(values, axis=0)  # [tasks]
    ends_t = jnp.moveaxis(ends, 1 + task_axis, 1)  # [starts, tasks, ...]
    best_t = ends_t[best_index, jnp.arange(num_tasks)]  # [tasks, ...]
    best = jnp.moveaxis(best_t, 0, task_axis)
    dist_to_best = jnp.sqrt(((ends_t - best_t[None]) ** 2).reshape(num_starts, num_tasks, -1).sum(-1))
    others = jnp.where(dist_to_best > separation, values, -jnp.inf)
    gap = np.asarray(values.max(0) - others.max(0))
    init = best[None] + jitter * jax.random.normal(k_jitter, (num_chains, *shape))
    return RestartInit({site: init}, {site: best}, values, gap)


def grid_posterior(
    rng_key: jax.Array,
    log_density: Callable[[jax.Array], jax.Array],
    dim: int,
    num_draws: int,
    *,
    bound: float = 5.0,
    coarse: int = 400,
    refine: int = 8,
    window: float = 30.0,
    chunk: int = 65536,
) -> tuple[np.ndarray, float]:
    """Draws from a low-dimensional density by two-level grid quadrature.

    The box ``[-bound, bound]^dim`` is cut into ``coarse^dim`` cells and ``log_density``
    evaluated at their centres; every cell within ``window`` nats of the best, and its
    neighbours, is cut again into ``refine^dim`` cells; draws pick a fine cell with
    probability proportional to its density times its volume and fall uniformly inside it.
    Every mode in the box with mass is found as long as it is wider than about a coarse
    cell, whatever the number of modes, which is what a multimodal posterior that MCMC
    chains cannot cross needs as a reference.

    Args:
        rng_key: PRNG key.
        log_density: ``[M, dim] -> [M]`` unnormalised log density (jit-able).
        dim: 1 or 2 (3 works, slowly).
        num_draws: draws returned.
        bound, coarse, refine, window: the grid (cell side ``2 bound / coarse / refine``).
        chunk: evaluations per call.

    Returns:
        ``(draws [num_draws, dim], log_normaliser)`` with the normaliser of the density
        over the box.
    """
    import jax.numpy as jnp

    if dim not in (1, 2, 3):
        raise ValueError(f"grid_posterior needs dim in 1..3, got {dim}")
    if coarse < 2 or refine < 1:
        raise ValueError(f"coarse must be >= 2 and refine >= 1, got {coarse}, {refine}")
    log_density = jax.jit(log_density)

    def evaluate(points: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(log_density(jnp.asarray(points[i : i + chunk], jnp.float32)))
            for i in range(0, len(points), chunk)
        ]
        values = np.concatenate(out).astype(np.float64)
        return np.where(np.isfinite(values), values, -np.inf)

    side = 2 * bound / coarse
    centres = -bound + side * (np.arange(coarse) + 0.5)
    grid = np.stack(np.meshgrid(*[centres] * dim, indexing="ij"), -1).reshape(-1, dim)
    values = evaluate(grid).reshape((coarse,) * dim)
    if not np.isfinite(values).any():
        raise ValueError("log_density is -inf or NaN everywhere on the grid")
    keep = values >= values.max() - window
    for axis in range(dim):  # add the neighbours of kept cells
        keep = keep | np.roll(keep, 1, axis) | np.roll(keep, -1, axis)
    cells = np.argwhere(keep)  # [K, dim] indices of coarse cells
    fine_side = side / refine
    offsets = -side / 2 + fine_side * (np.arange(refine) + 0.5)
    sub = np.stack(np.meshgrid(*[offsets] * dim, indexing="ij"), -1).reshape(-1, dim)
    points = (centres[cells][:, None, :] + sub[None]).reshape(-1, dim)
    fine = evaluate(points)
    log_mass = fine + dim * np.log(fine_side)
    top = log_mass.max()
    log_normaliser = float(top + np.log(np.exp(log_mass - top).sum()))
    prob = np.exp(log_mass - log_normaliser)
    prob = prob / prob.sum()
    seed = int(jax.random.randint(rng_key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(points), size=num_draws, p=prob)
    draws = points[pick] + rng.uniform(-fine_side / 2, fine_side / 2, size=(num_draws, dim))
    return draws, log_normaliser
