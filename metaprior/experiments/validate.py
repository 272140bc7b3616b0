"""``metaprior run validate``: every approximate posterior of the library against NUTS.

Four small cases with a trustworthy reference posterior (see
:mod:`metaprior.models.cases`):

- ``linear`` (a): hierarchical linear regression, conjugate: NUTS is itself checked
  against the closed form.
- ``bnn`` (b): a hierarchical Bayesian MLP (one hidden layer) on a few sinusoid tasks.
- ``latent`` (c): the task-latent model of "Learning a Rich Prior" at a tiny size, with
  the network ``alpha`` fitted first and then held fixed, on tasks simulated from that
  fixed model. With alpha fixed the tasks are independent and each posterior over
  ``z_j`` has a few dimensions, so two-level grid quadrature gives an exact reference
  (:func:`metaprior.inference.mcmc.grid_posterior`), and NUTS starts from each task's
  best of many MAP restarts (:func:`metaprior.inference.mcmc.restart_init`): the
  likelihood's noise is at most 0.101 by construction, so ``z`` has narrow local modes
  that chains started at random never leave.
- ``mixture`` (d): task clusters with each task's cluster index enumerated exactly
  (``TraceEnum_ELBO`` for SVI, enumeration inside NUTS).

On each case NUTS runs several chains and its health (split R-hat, bulk ESS,
divergences) is checked and reported; then every approximation that applies is fitted
to the same NumPyro program and compared with NUTS per scalar parameter (error of the
mean and of the standard deviation in NUTS standard deviations, 1-D Wasserstein distance
in NUTS standard deviations) and on held-out points of the same tasks (predictive NLL,
90% interval coverage). Outputs: ``validation.md``, ``marginals_{case}.png`` and one
ArviZ file per case and method (``posterior_{case}_{method}.nc``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO, TraceEnum_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoIAFNormal, AutoMultivariateNormal, AutoNormal

from metaprior._io import atomic_write_bytes
from metaprior.experiments._registry import Experiment

CASES = ("linear", "bnn", "latent", "mixture")


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """Sizes of the validation run.

    Attributes:
        cases: which of ``linear``, ``bnn``, ``latent``, ``mixture`` to run.
        methods: the approximations to fit where they apply (all when empty): ``exact``,
            ``autonormal``, ``automvn``, ``autoiaf``, ``task_normal``, ``task_iaf``,
            ``laplace_full``, ``laplace_diag``, ``laplace_kfac``.
        num_chains, num_warmup, num_samples: NUTS (per chain).
        target_accept_prob: NUTS step-size target.
        num_steps: SVI steps of every guide (and of the MAP under the Laplace methods).
        learning_rate: Adam step size of every guide.
        num_draws: draws taken from each approximation.
        num_restarts: random starts per task of the ``*_restarts`` guides (new-task
            inference, :func:`metaprior.inference.local.fit_local`, ``num_steps / 5``
            steps each, 4 particles).
        num_heldout: held-out examples per task (predictive NLL and coverage).
        check_health: whether NUTS must meet ``rhat_max`` and ``ess_min`` (the run still
            finishes; the table says which cases failed and ``nuts_healthy`` is 0).
        *_tasks, *_examples: size of each case.
        latent_family: ``"sinusoid"`` or ``"harmonic"``: the tasks alpha is fitted on, and
            the inputs of the case-(c) tasks.
        latent_data: ``"model"`` (default): the case-(c) targets are simulated from the
            fixed-alpha model at ``z_j ~ N(0, I)``; ``"family"``: the family's own targets
            (then the posterior over ``z`` has several comparable narrow modes per task,
            which NUTS chains do not cross: see ``benchmarks/README.md``).
        latent_noise: observation noise of the family's targets.
        latent_restarts: MAP restarts per task behind NUTS's starting points (0: NumPyro's
            default random initialisation).
        latent_grid: coarse grid cells per axis of the quadrature reference (0: none;
            only for ``latent_dim <= 2``).
    """

    cases: tuple[str, ...] = CASES
    methods: tuple[str, ...] = ()
    num_chains: int = 4
    num_warmup: int = 1000
    num_samples: int = 1000
    target_accept_prob: float = 0.9
    num_steps: int = 5000
    learning_rate: float = 0.01
    num_draws: int = 4000
    num_restarts: int = 16
    num_heldout: int = 10
    check_health: bool = True
    rhat_max: float = 1.01
    ess_min: float = 400.0
    linear_tasks: int = 8
    linear_examples: int = 6
    bnn_tasks: int = 4
    bnn_examples: int = 8
    bnn_hidden: int = 10
    latent_family: str = "sinusoid"
    latent_data: str = "model"
    latent_noise: float = 0.05
    latent_tasks: int = 4
    latent_examples: int = 8
    latent_restarts: int = 64
    latent_grid: int = 400
    latent_dim: int = 2
    latent_width: int = 32
    latent_layers: int = 2
    latent_pretrain_tasks: int = 128
    latent_pretrain_steps: int = 1500
    mixture_tasks: int = 24
    mixture_examples: int = 8


def make_config(size: str) -> ValidateConfig:
    if size == "quick":
        return ValidateConfig(
            methods=("exact", "autonormal", "laplace_kfac"),  # the task guides: tests/test_guides.py
            num_chains=2,
            num_warmup=150,
            num_samples=150,
            num_steps=200,
            num_draws=200,
            check_health=False,
            linear_tasks=4,
            bnn_tasks=3,
            bnn_examples=6,
            bnn_hidden=6,
            latent_tasks=3,
            latent_width=16,
            latent_pretrain_tasks=32,
            latent_pretrain_steps=100,
            latent_restarts=8,
            latent_grid=100,
            mixture_tasks=12,
        )
    return ValidateConfig()


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


class Case(NamedTuple):
    """One model with its data.

    Attributes:
        name: ``linear`` / ``bnn`` / ``latent`` / ``mixture``.
        model: the NumPyro program (``model(batch, **kwargs)``).
        train: the observed tasks.
        test: held-out examples of the same tasks.
        kwargs: the model's keyword arguments.
        methods: the approximations that apply.
        local_sites: latent sites inside ``plate("tasks")``.
        exact: exact posterior draws ``{site: [draws, ...]}`` where known.
        note: one line for the table.
        nuts_init: ``(rng_key, num_chains) -> (init_params, info)`` where chains must not
            start at random (``info``: extra metrics), else ``None``.
    """

    name: str
    model: Callable
    train: Any
    test: Any
    kwargs: dict
    methods: tuple[str, ...]
    local_sites: tuple[str, ...]
    exact: dict | None = None
    note: str = ""
    nuts_init: Callable | None = None


GUIDES = ("autonormal", "automvn", "autoiaf", "task_normal", "task_iaf")
# New-task inference (metaprior.inference.local.fit_local): the plate-aware guide fitted to
# each task on its own from several random starts, the best kept by ELBO. Only for models
# whose tasks share no latent (the prior held fixed), i.e. case (c).
RESTART_GUIDES = {"task_normal_restarts": "TaskNormalGuide", "task_iaf_restarts": "TaskIAFGuide"}
LAPLACE = ("laplace_full", "laplace_diag", "laplace_kfac")


def _split(batch, num_train):
    from metaprior.data.tasks import split_support_query

    return split_support_query(batch, num_train)


def _case_linear(rng_key, cfg: ValidateConfig) -> Case:
    from metaprior.models.cases import (
        hierarchical_linear_model,
        hierarchical_linear_posterior,
        hierarchical_linear_tasks,
    )

    k_data, k_exact = jax.random.split(rng_key)
    batch, _ = hierarchical_linear_tasks(k_data, cfg.linear_tasks, cfg.linear_examples + cfg.num_heldout)
    train, test = _split(batch, cfg.linear_examples)
    post = hierarchical_linear_posterior(train)
    d = post.mean["mu"].shape[0]
    theta = np.random.default_rng(int(jax.random.randint(k_exact, (), 0, 2**31 - 1))).multivariate_normal(
        post.joint_mean, post.joint_cov, size=cfg.num_draws
    )
    exact = {"mu": theta[:, :d], "w": theta[:, d:].reshape(cfg.num_draws, cfg.linear_tasks, 1, d)}
    return Case(
        "linear",
        hierarchical_linear_model,
        train,
        test,
        {},
        GUIDES,
        ("w",),
        exact,
        f"{cfg.linear_tasks} tasks x {cfg.linear_examples} points, 2 weights per task",
    )


def _case_bnn(rng_key, cfg: ValidateConfig) -> Case:
    from metaprior.data.tasks import sinusoid_tasks
    from metaprior.models.cases import hierarchical_bnn_model

    batch, _ = sinusoid_tasks(
        rng_key,
        cfg.bnn_tasks,
        cfg.bnn_examples + cfg.num_heldout,
        amplitude=(0.5, 1.5),
        x_range=(-3.0, 3.0),
        noise_std=0.3,
    )
    train, test = _split(batch, cfg.bnn_examples)
    kwargs = {"num_hidden": cfg.bnn_hidden, "task_scale": 0.3, "noise_scale": 0.3}
    return Case(
        "bnn",
        hierarchical_bnn_model,
        train,
        test,
        kwargs,
        GUIDES + LAPLACE,
        ("phi",),
        None,
        f"{cfg.bnn_tasks} sinusoid tasks x {cfg.bnn_examples} points, MLP 1-{cfg.bnn_hidden}-1 tanh",
    )


def _fixed_alpha(model: Callable, params: dict) -> Callable:
    """``model`` with its ``param`` sites set to ``params`` and hidden from inference."""
    return handlers.block(handlers.substitute(model, data=params), hide_fn=lambda m: m["type"] == "param")


def _case_latent(rng_key, cfg: ValidateConfig) -> Case:
    from numpyro.infer import Predictive

    from metaprior.data.tasks import TaskBatch, harmonic_tasks, sinusoid_tasks
    from metaprior.inference.mcmc import grid_posterior, per_task_log_joint, restart_init
    from metaprior.models.task_latent import make_task_latent_net, task_latent_model

    if cfg.latent_data not in ("model", "family"):
        raise ValueError(f"latent_data must be 'model' or 'family', got {cfg.latent_data!r}")
    k_net, k_pre, k_fit, k_data, k_sim, k_grid = jax.random.split(rng_key, 6)
    # the paper's residual MLP, as when the recorded validation figures were measured
    net = make_task_latent_net(
        k_net, cfg.latent_dim, arch="paper", width=cfg.latent_width, num_layers=cfg.latent_layers
    )
    kwargs = {"net": net, "latent_dim": cfg.latent_dim}
    if cfg.latent_family == "harmonic":

        def tasks(key, num_tasks, num_examples):
            return harmonic_tasks(key, num_tasks, num_examples, noise_std=cfg.latent_noise)[0]
    elif cfg.latent_family == "sinusoid":

        def tasks(key, num_tasks, num_examples):
            return sinusoid_tasks(key, num_tasks, num_examples, noise_std=cfg.latent_noise)[0]
    else:
        raise ValueError(f"latent_family must be 'harmonic' or 'sinusoid', got {cfg.latent_family!r}")
    # alpha: fitted once by SVI on other tasks, then held fixed (the paper's new-task setting).
    pre = tasks(k_pre, cfg.latent_pretrain_tasks, 16)
    guide = AutoNormal(task_latent_model)
    svi = SVI(task_latent_model, guide, optax.adam(3e-3), Trace_ELBO())
    fit = svi.run(k_fit, cfg.latent_pretrain_steps, pre, progress_bar=False, **kwargs)
    alpha = {k: v for k, v in fit.params.items() if k.startswith("net")}
    model = _fixed_alpha(task_latent_model, alpha)
    batch = tasks(k_data, cfg.latent_tasks, cfg.latent_examples + cfg.num_heldout)
    if cfg.latent_data == "model":  # targets from the fixed model itself, at z_j ~ N(0, I)
        simulated = Predictive(model, num_samples=1)(k_sim, TaskBatch(batch.x, None, batch.mask), **kwargs)
        batch = TaskBatch(batch.x, simulated["y"][0], batch.mask)
    train, test = _split(batch, cfg.latent_examples)

    exact = None
    if cfg.latent_grid > 0 and cfg.latent_dim <= 2:
        # alpha fixed: the tasks are independent, each posterior over z_j is a density on
        # R^d, d <= 2, integrated on a grid (every mode, however many).
        per_task = []
        for j, key in enumerate(jax.random.split(k_grid, cfg.latent_tasks)):

            def log_density(z, j=j):
                m = z.shape[0]
                one = TaskBatch(
                    jnp.broadcast_to(train.x[j], (m, *train.x.shape[1:])),
                    jnp.broadcast_to(train.y[j], (m, *train.y.shape[1:])),
                    jnp.broadcast_to(train.mask[j], (m, *train.mask.shape[1:])),
                )
                return per_task_log_joint(model, one, values={"z": z[:, None, :]}, **kwargs)

            draws, _ = grid_posterior(key, log_density, cfg.latent_dim, cfg.num_draws, coarse=cfg.latent_grid)
            per_task.append(draws)
        exact = {"z": np.stack(per_task, 1)[:, :, None, :].astype(np.float32)}

    nuts_init = None
    if cfg.latent_restarts > 0:

        def nuts_init(key, num_chains):
            found = restart_init(
                key, model, train, site="z", num_chains=num_chains, num_starts=cfg.latent_restarts, **kwargs
            )
            return found.init_params, {"mode_gap_min": float(np.min(found.gap))}

    source = "simulated from the fixed model" if cfg.latent_data == "model" else f"{cfg.latent_family} targets"
    return Case(
        "latent",
        model,
        train,
        test,
        kwargs,
        GUIDES + tuple(RESTART_GUIDES),
        ("z",),
        exact,
        f"{cfg.latent_tasks} {cfg.latent_family}-input tasks x {cfg.latent_examples} points ({source}), "
        f"z in R^{cfg.latent_dim}, alpha fixed after {cfg.latent_pretrain_steps} SVI steps on "
        f"{cfg.latent_pretrain_tasks} tasks"
        + (", exact = grid quadrature" if exact is not None else "")
        + (
            f", NUTS chains start at the best of {cfg.latent_restarts} MAP restarts per task"
            if nuts_init is not None
            else ""
        ),
        nuts_init,
    )


def _case_mixture(rng_key, cfg: ValidateConfig) -> Case:
    from metaprior.models.cases import task_mixture_model, task_mixture_tasks

    batch, _ = task_mixture_tasks(
        rng_key,
        cfg.mixture_tasks,
        cfg.mixture_examples + cfg.num_heldout,
        intercepts=(-3.0, 0.0, 3.0),
        weights=(1 / 3, 1 / 3, 1 / 3),
    )
    train, test = _split(batch, cfg.mixture_examples)
    return Case(
        "mixture",
        task_mixture_model,
        train,
        test,
        {},
        ("autonormal", "automvn", "autoiaf"),
        (),
        None,
        f"{cfg.mixture_tasks} tasks x {cfg.mixture_examples} points, 3 clusters, c enumerated",
    )


CASE_BUILDERS = {"linear": _case_linear, "bnn": _case_bnn, "latent": _case_latent, "mixture": _case_mixture}


# --------------------------------------------------------------------------------------
# Approximations
# --------------------------------------------------------------------------------------


def _latent_sites(case: Case) -> tuple[list[str], list[str]]:
    """(continuous latent sites, enumerated discrete sites) of the case's model."""
    tr = handlers.trace(handlers.seed(case.model, jax.random.key(0))).get_trace(case.train, **case.kwargs)
    cont, disc = [], []
    for name, site in tr.items():
        if site["type"] == "sample" and not site["is_observed"]:
            (disc if site.get("infer", {}).get("enumerate") else cont).append(name)
    return cont, disc


def _svi_draws(rng_key, case: Case, guide, cfg: ValidateConfig, discrete: list[str]) -> dict:
    k_fit, k_draw = jax.random.split(rng_key)
    elbo = TraceEnum_ELBO() if discrete else Trace_ELBO()
    optimizer = optax.chain(optax.clip_by_global_norm(100.0), optax.adam(cfg.learning_rate))
    svi = SVI(case.model, guide, optimizer, elbo)
    fit = svi.run(k_fit, cfg.num_steps, case.train, progress_bar=False, **case.kwargs)
    if not np.isfinite(np.asarray(fit.losses[-1])):
        raise FloatingPointError(f"{case.name}: SVI loss is {fit.losses[-1]}")
    return Predictive(guide, params=fit.params, num_samples=cfg.num_draws, parallel=True)(
        k_draw, case.train, **case.kwargs
    )


def _restart_draws(rng_key, case: Case, cfg: ValidateConfig, cls_name: str, continuous: list[str]) -> dict:
    from metaprior.inference import guides as lib_guides
    from metaprior.inference.local import fit_local

    k_build, k_fit, k_draw = jax.random.split(rng_key, 3)
    guide = getattr(lib_guides, cls_name).build(k_build, case.model, case.train, **case.kwargs)
    fit = fit_local(
        k_fit,
        case.model,
        guide,
        case.train,
        num_steps=cfg.num_steps // 5,
        num_restarts=cfg.num_restarts,
        model_kwargs=case.kwargs,
    )
    draws = Predictive(fit.guide, params=fit.params, num_samples=cfg.num_draws, parallel=True)(
        k_draw, case.train, **case.kwargs
    )
    return {k: v for k, v in draws.items() if k in continuous}


def _task_guide(rng_key, case: Case, cls_name: str, continuous: list[str], discrete: list[str]):
    """The library's plate-aware guide on the local latents, AutoNormal on the globals."""
    from metaprior.inference import guides as lib_guides

    cls = getattr(lib_guides, cls_name)
    k_local, _ = jax.random.split(rng_key)
    globals_ = [n for n in continuous if n not in case.local_sites]
    local_model = handlers.block(case.model, hide=globals_ + discrete)
    local = cls.build(k_local, local_model, case.train, **case.kwargs)
    if not globals_:
        return local
    global_guide = AutoNormal(handlers.block(case.model, hide=list(case.local_sites) + discrete))

    def guide(*args, **kwargs):
        global_guide(*args, **kwargs)
        local(*args, **kwargs)

    return guide


def _laplace_draws(
    rng_key, case: Case, cfg: ValidateConfig, structure: str, continuous: list[str], cache: dict
) -> dict:
    """Task-level Laplace (LLAMA's posterior): the joint MAP, then per task ``phi_j ~
    N(phi_j*, (GGN_j + I / task_scale^2)^-1)`` with the shared mean held at its MAP."""
    import equinox as eqx
    from jax.flatten_util import ravel_pytree

    from metaprior.inference import laplace as lp
    from metaprior.models.cases import make_bnn

    if "map" not in cache:  # one MAP shared by the three curvature structures
        guide = AutoDelta(case.model)
        fit = SVI(case.model, guide, optax.adam(cfg.learning_rate), Trace_ELBO()).run(
            jax.random.fold_in(rng_key, 1), cfg.num_steps, case.train, progress_bar=False, **case.kwargs
        )
        cache["map"] = guide.median(fit.params)
    mode = cache["map"]
    task_scale, noise_scale = case.kwargs["task_scale"], case.kwargs["noise_scale"]
    _, unravel = make_bnn(case.kwargs["num_hidden"])
    x, y = np.asarray(case.train.x), np.asarray(case.train.y)
    draws = []
    for j in range(x.shape[0]):
        net = unravel(mode["phi"][j, 0])
        post = lp.laplace(
            None,
            net,
            jnp.asarray(x[j]),
            jnp.asarray(y[j]),
            apply_fn=lp.vmap_apply,
            likelihood=lambda f: dist.Normal(f[:, 0], noise_scale),
            structure=structure,
            prior_precision=1.0 / task_scale**2,
        )
        sampled = lp.sample_params(jax.random.fold_in(rng_key, 10 + j), post, cfg.num_draws)
        params = eqx.filter(eqx.combine(sampled, post.rest), eqx.is_array)
        draws.append(jax.vmap(lambda p: ravel_pytree(p)[0])(params))
    out = {name: jnp.broadcast_to(mode[name], (cfg.num_draws, *jnp.shape(mode[name]))) for name in continuous}
    out["phi"] = jnp.stack(draws, axis=1)[:, :, None, :]
    return out


def fit_method(rng_key, case: Case, method: str, cfg: ValidateConfig, cache: dict) -> dict:
    """Draws ``{site: [num_draws, ...]}`` of the continuous latents from one approximation."""
    continuous, discrete = _latent_sites(case)
    blocked = handlers.block(case.model, hide=discrete) if discrete else case.model
    if method == "exact":
        return case.exact
    if method.startswith("laplace_"):
        return _laplace_draws(rng_key, case, cfg, method.removeprefix("laplace_"), continuous, cache)
    if method == "autonormal":
        guide = AutoNormal(blocked)
    elif method == "automvn":
        guide = AutoMultivariateNormal(blocked)
    elif method == "autoiaf":
        guide = AutoIAFNormal(blocked, num_flows=2)
    elif method == "task_normal":
        guide = _task_guide(rng_key, case, "TaskNormalGuide", continuous, discrete)
    elif method == "task_iaf":
        guide = _task_guide(rng_key, case, "TaskIAFGuide", continuous, discrete)
    elif method in RESTART_GUIDES:
        return _restart_draws(rng_key, case, cfg, RESTART_GUIDES[method], continuous)
    else:
        raise ValueError(f"unknown method {method!r}")
    draws = _svi_draws(rng_key, case, guide, cfg, discrete)
    return {k: v for k, v in draws.items() if k in continuous}


# --------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------


def flatten_draws(draws: dict, sites: list[str]) -> tuple[np.ndarray, list[str]]:
    """``{site: [S, ...]}`` -> ``([S, P], names)`` over every scalar of ``sites``."""
    columns, names = [], []
    for site in sites:
        value = np.asarray(draws[site], np.float64)
        flat = value.reshape(value.shape[0], -1)
        columns.append(flat)
        shape = value.shape[1:]
        names += [
            f"{site}{[int(k) for k in np.unravel_index(i, shape)]}" if shape else site for i in range(flat.shape[1])
        ]
    return np.concatenate(columns, axis=1), names


def compare_marginals(draws: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per scalar parameter, against the reference draws (both ``[S, P]``).

    Returns:
        ``mean_err``: ``|mean - mean_ref| / sd_ref``; ``sd_ratio``: ``sd / sd_ref``;
        ``w1``: 1-D Wasserstein distance between the marginals, divided by ``sd_ref``.
    """
    from scipy.stats import wasserstein_distance

    sd_ref = reference.std(0)
    sd_ref = np.where(sd_ref > 0, sd_ref, 1.0)
    w1 = np.array([wasserstein_distance(draws[:, p], reference[:, p]) for p in range(reference.shape[1])])
    return {
        "mean_err": np.abs(draws.mean(0) - reference.mean(0)) / sd_ref,
        "sd_ratio": draws.std(0) / sd_ref,
        "w1": w1 / sd_ref,
    }


def _geomean(values: np.ndarray) -> float:
    return float(np.exp(np.log(np.maximum(values, 1e-12)).mean()))


def _log(message: str) -> None:
    print(f"validate: {message}", file=sys.stderr, flush=True)


def run(rng_key, config: ValidateConfig, out_dir: Path) -> dict[str, float]:
    from metaprior.inference.diagnostics import from_mcmc, from_samples, predictive_scores, save_posterior
    from metaprior.inference.mcmc import nuts_health, run_nuts

    out_dir = Path(out_dir)
    unknown = set(config.cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}; known: {CASES}")
    known = ("exact", *GUIDES, *RESTART_GUIDES, *LAPLACE)
    unknown = set(config.methods) - set(known)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; known: {', '.join(known)}")
    metrics: dict[str, float] = {}
    report: list[dict] = []
    for i, name in enumerate(config.cases):
        k_case, k_nuts, k_methods, k_scores = jax.random.split(jax.random.fold_in(rng_key, i), 4)
        start = time.perf_counter()
        case = CASE_BUILDERS[name](k_case, config)
        continuous, discrete = _latent_sites(case)
        setup_s = time.perf_counter() - start

        start = time.perf_counter()
        init_params = None
        if case.nuts_init is not None:
            init_params, info = case.nuts_init(jax.random.fold_in(k_nuts, 1), config.num_chains)
            metrics.update({f"{key}_{name}": value for key, value in info.items()})
        mcmc = run_nuts(
            k_nuts,
            case.model,
            case.train,
            num_chains=config.num_chains,
            num_warmup=config.num_warmup,
            num_samples=config.num_samples,
            target_accept_prob=config.target_accept_prob,
            init_params=init_params,
            **case.kwargs,
        )
        nuts_s = time.perf_counter() - start
        health = nuts_health(mcmc)
        _log(f"{name}/nuts: {nuts_s:.1f} s, max R-hat {health.rhat_max:.4f}, min bulk ESS {health.ess_bulk_min:.0f}")
        healthy = health.ok(rhat=config.rhat_max, ess=config.ess_min)
        if config.check_health and not healthy:
            _log(f"NUTS on {name} is NOT healthy: {health}")
        metrics[f"rhat_max_{name}"] = health.rhat_max
        metrics[f"ess_bulk_min_{name}"] = health.ess_bulk_min
        metrics[f"divergences_{name}"] = health.num_divergent
        metrics[f"nuts_healthy_{name}"] = int(healthy)
        metrics[f"time_nuts_{name}_s"] = nuts_s
        save_posterior(
            from_mcmc(mcmc, rng_key=k_nuts, attrs={"method": "nuts", "case": name}),
            out_dir / f"posterior_{name}_nuts.nc",
        )
        nuts_draws = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
        reference, names = flatten_draws(nuts_draws, continuous)
        is_local = np.array([n.split("[")[0] in case.local_sites for n in names])

        methods = (("exact",) if case.exact is not None else ()) + case.methods
        methods = tuple(m for m in methods if not config.methods or m in config.methods)
        all_draws = {"nuts": nuts_draws}
        rows = []
        times = {"nuts": nuts_s}
        cache: dict = {}
        for j, method in enumerate(methods):
            start = time.perf_counter()
            try:
                draws = fit_method(jax.random.fold_in(k_methods, j), case, method, config, cache)
            except ImportError as err:  # a guide family not in this checkout
                _log(f"skipping {method} on {name}: {err}")
                continue
            times[method] = time.perf_counter() - start
            _log(f"{name}/{method}: fitted in {times[method]:.1f} s")
            all_draws[method] = {k: np.asarray(v) for k, v in draws.items()}
        for method, draws in all_draws.items():
            flat, _ = flatten_draws(draws, continuous)
            row = {"method": method, "time_s": times[method]}
            if method != "nuts":
                cmp = compare_marginals(flat, reference)
                row.update(
                    w1=cmp["w1"].mean(),
                    w1_local=cmp["w1"][is_local].mean() if is_local.any() else np.nan,
                    mean_err=cmp["mean_err"].mean(),
                    mean_err_max=cmp["mean_err"].max(),
                    sd_ratio=_geomean(cmp["sd_ratio"]),
                    sd_ratio_min=cmp["sd_ratio"].min(),
                    sd_ratio_local=_geomean(cmp["sd_ratio"][is_local]) if is_local.any() else np.nan,
                )
                metrics[f"w1_{name}_{method}"] = row["w1"]
                metrics[f"mean_err_{name}_{method}"] = row["mean_err"]
                metrics[f"sd_ratio_{name}_{method}"] = row["sd_ratio"]
            if case.exact is not None:
                exact_flat, _ = flatten_draws(case.exact, continuous)
                row["w1_exact"] = compare_marginals(flat, exact_flat)["w1"].mean() if method != "exact" else 0.0
                metrics[f"w1exact_{name}_{method}"] = row["w1_exact"]
            scores = predictive_scores(k_scores, case.model, draws, (case.train,), (case.test,), **case.kwargs)
            row.update(nll=scores["nll"], coverage=scores["coverage"])
            metrics[f"nll_{name}_{method}"] = scores["nll"]
            metrics[f"coverage90_{name}_{method}"] = scores["coverage"]
            if discrete:
                from metaprior.models.cases import cluster_probabilities

                probs = np.asarray(cluster_probabilities(draws, case.train, **case.kwargs))
                if method == "nuts":
                    nuts_probs = probs
                row["cluster_err"] = float(np.abs(probs - nuts_probs).max())
                metrics[f"cluster_err_{name}_{method}"] = row["cluster_err"]
            if method != "nuts":
                tree = from_samples(
                    k_scores, case.model, draws, case.train, attrs={"method": method, "case": name}, **case.kwargs
                )
                save_posterior(tree, out_dir / f"posterior_{name}_{method}.nc")
            rows.append(row)
        extra = {}
        if discrete:
            extra["cluster_probs"] = nuts_probs
        report.append(
            {
                "case": case,
                "health": health,
                "healthy": healthy,
                "rows": rows,
                "setup_s": setup_s,
                "num_params": reference.shape[1],
                **extra,
            }
        )
        plot_marginals(all_draws, continuous, names, out_dir / f"marginals_{name}.png", title=f"{name}: {case.note}")
        # Written after every case, so a long run shows its finished cases.
        atomic_write_bytes(out_dir / "validation.md", _markdown(report, config).encode())
    metrics["nuts_healthy"] = int(all(r["healthy"] for r in report))
    return metrics


def plot_marginals(
    all_draws: dict[str, dict], sites: list[str], names: list[str], path: Path, *, title: str = "", max_panels: int = 8
) -> Path:
    """Marginals of a few scalar parameters: NUTS filled, each approximation a line.

    The panels are the first scalar of every site, then further scalars in order, up to
    ``max_panels``.
    """
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    from metaprior.experiments._common import save_figure

    flat = {m: flatten_draws(d, sites)[0] for m, d in all_draws.items()}
    first_of_site: dict[str, int] = {}
    for i, n in enumerate(names):
        first_of_site.setdefault(n.split("[")[0], i)
    firsts = list(first_of_site.values())
    panels = (firsts + [i for i in range(len(names)) if i not in firsts])[:max_panels]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, p in zip(axes.ravel(), panels):
        ref = flat["nuts"][:, p]
        lo, hi = np.quantile(ref, [0.001, 0.999])
        pad = 0.5 * (hi - lo) + 1e-6
        grid = np.linspace(lo - pad, hi + pad, 200)
        ax.hist(ref, bins=50, range=(grid[0], grid[-1]), density=True, color="0.8", label="NUTS")
        for method, values in flat.items():
            if method == "nuts":
                continue
            v = values[:, p]
            if np.std(v) < 1e-9:  # a point estimate
                ax.axvline(v[0], lw=1, ls=":", label=method, color=f"C{list(flat).index(method) % 10}")
            else:
                ax.plot(grid, gaussian_kde(v)(grid), lw=1, label=method, color=f"C{list(flat).index(method) % 10}")
        ax.set_title(names[p], fontsize="small")
        ax.set_yticks([])
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize="x-small")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path.parent, path.name)


def _fmt(value, spec=".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def _markdown(report: list[dict], cfg: ValidateConfig) -> str:
    lines = [
        "# Validation: approximate posteriors against NUTS",
        "",
        f"NUTS: {cfg.num_chains} chains x {cfg.num_samples} draws after {cfg.num_warmup} warmup; "
        f"every guide: {cfg.num_steps} Adam steps (lr {cfg.learning_rate}), {cfg.num_draws} draws. "
        "Per scalar parameter against NUTS: `mean err` = |mean - mean_NUTS| / sd_NUTS (average), "
        "`sd ratio` = sd / sd_NUTS (geometric mean; `local` over the task-level latents; minimum), "
        "`W1` = 1-D Wasserstein distance / "
        "sd_NUTS (average; `W1 local` over the task-level latents only). Held-out points of the same "
        "tasks: `NLL` per point and coverage of the central 90% predictive interval.",
        "",
    ]
    for r in report:
        case, h = r["case"], r["health"]
        verdict = "healthy" if r["healthy"] else "**NOT healthy**"
        lines += [
            f"## {case.name}: {case.note}",
            "",
            f"{r['num_params']} scalar parameters. NUTS {verdict}: max R-hat {h.rhat_max:.4f} ({h.worst_rhat}), "
            f"min bulk ESS {h.ess_bulk_min:.0f} ({h.worst_ess}), {h.num_divergent} divergences "
            f"(thresholds R-hat <= {cfg.rhat_max}, ESS >= {cfg.ess_min:.0f}).",
            "",
        ]
        has_exact = case.exact is not None
        has_clusters = "cluster_probs" in r
        head = ["method", "W1", "W1 local", "mean err", "max mean err", "sd ratio", "sd ratio local", "min sd ratio"]
        head += ["W1 to exact"] if has_exact else []
        head += ["max cluster-prob err"] if has_clusters else []
        head += ["NLL", "cov90", "time (s)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ranked = sorted(r["rows"], key=lambda row: (row["method"] != "nuts", row.get("w1", -1.0)))
        for row in ranked:
            cells = [
                row["method"],
                _fmt(row.get("w1")),
                _fmt(row.get("w1_local")),
                _fmt(row.get("mean_err")),
                _fmt(row.get("mean_err_max")),
                _fmt(row.get("sd_ratio")),
                _fmt(row.get("sd_ratio_local")),
                _fmt(row.get("sd_ratio_min")),
            ]
            cells += [_fmt(row.get("w1_exact"))] if has_exact else []
            cells += [_fmt(row.get("cluster_err"))] if has_clusters else []
            cells += [_fmt(row["nll"]), _fmt(row["coverage"], ".2f"), _fmt(row["time_s"], ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        if has_clusters:
            probs = r["cluster_probs"]
            lines += [
                "",
                "Posterior cluster probabilities per task (NUTS, c summed out, Rao-Blackwellised):",
                "",
                "| task | " + " | ".join(f"p(c={k})" for k in range(probs.shape[1])) + " |",
                "|---|" + "---|" * probs.shape[1],
            ]
            lines += [f"| {t} | " + " | ".join(f"{p:.3f}" for p in probs[t]) + " |" for t in range(probs.shape[0])]
        lines.append("")
    return "\n".join(lines) + "\n"


METRICS_DOC = """\
rhat_max_{case}, ess_bulk_min_{case}, divergences_{case}, nuts_healthy_{case}: NUTS health
nuts_healthy: 1 when every case met R-hat <= 1.01 and bulk ESS >= 400
w1_{case}_{method}: mean 1-D Wasserstein distance to NUTS per scalar, in NUTS sds
mean_err_{case}_{method}, sd_ratio_{case}_{method}: mean error (NUTS sds), sd ratio (geo. mean)
w1exact_{case}_{method}: the same distance to the exact posterior (nuts included): the closed
  form on linear, grid quadrature on latent
mode_gap_min_latent: nats between each task's best MAP restart and the next mode found (min)
nll_{case}_{method}, coverage90_{case}_{method}: held-out predictive NLL and 90% coverage
cluster_err_mixture_{method}: max |p(c_j=k) - p_NUTS(c_j=k)| over tasks and clusters
cases: linear (a), bnn (b), latent (c), mixture (d)"""

EXPERIMENTS = [
    Experiment(
        name="validate",
        description="every approximate posterior (guides, Laplace) against NUTS on four small cases",
        make_config=make_config,
        run=run,
        metrics_doc=METRICS_DOC,
    )
]
