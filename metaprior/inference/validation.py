"""Every approximate posterior of the library against a NUTS reference, on one model.

A :class:`Case` is a NumPyro program with its observed and held-out tasks (the cases of
:mod:`metaprior.inference.validation_cases`). :func:`validate_case` runs NUTS on it (its
health: split R-hat, bulk ESS, divergences), fits every approximation that applies
(:func:`fit_method`: NumPyro autoguides, the plate-aware task guides, new-task inference
from random restarts, task-level Laplace) and compares each with NUTS per scalar
parameter (:func:`compare_marginals`) and on held-out points of the same tasks
(predictive NLL, 90% interval coverage). :func:`validation_report` writes the results as
Markdown tables.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from numpyro import handlers
from numpyro.infer import SVI, Predictive, TraceEnum_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoIAFNormal, AutoMultivariateNormal, AutoNormal

from metaprior.inference.diagnostics import from_mcmc, from_samples, predictive_scores
from metaprior.inference.mcmc import NutsHealth, nuts_health, run_nuts
from metaprior.inference.svi import OrderedTrace_ELBO

__all__ = [
    "GUIDES",
    "RESTART_GUIDES",
    "LAPLACE",
    "METHODS",
    "Case",
    "ValidationSettings",
    "CaseResult",
    "latent_sites",
    "fit_method",
    "flatten_draws",
    "compare_marginals",
    "geomean",
    "validate_case",
    "validation_report",
    "case_table",
]

GUIDES = ("autonormal", "automvn", "autoiaf", "task_normal", "task_iaf")
# New-task inference (metaprior.inference.local.fit_local): the plate-aware guide fitted to
# each task on its own from several random starts, the best kept by ELBO. Only for models
# whose tasks share no latent (the prior held fixed).
RESTART_GUIDES = {"task_normal_restarts": "TaskNormalGuide", "task_iaf_restarts": "TaskIAFGuide"}
LAPLACE = ("laplace_full", "laplace_diag", "laplace_kfac")
METHODS = ("exact", *GUIDES, *RESTART_GUIDES, *LAPLACE)


class Case(NamedTuple):
    """One model with its data.

    Attributes:
        name: a short name, the suffix of the metrics and files.
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
        laplace: ``(rng_key, case, mode, structure, num_draws) -> {site: [draws, ...]}``, the
            ``laplace_*`` methods' draws given the joint MAP ``mode``, for a model whose
            curvature is a network's (K-FAC); ``None``: the Hessian of the model's own log
            joint per task, which serves ``laplace_full`` and ``laplace_diag`` on any model.
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
    laplace: Callable | None = None


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """NUTS and approximation settings shared by every case.

    Attributes:
        num_chains, num_warmup, num_samples: NUTS (per chain).
        target_accept_prob: NUTS step-size target.
        num_steps: SVI steps of every guide (and of the MAP under the Laplace methods).
        learning_rate: Adam step size of every guide.
        num_draws: draws taken from each approximation.
        num_restarts: random starts per task of the ``*_restarts`` guides
            (:func:`metaprior.inference.local.fit_local`, ``num_steps / 5`` steps each).
        rhat_max, ess_min: the NUTS health thresholds.
    """

    num_chains: int = 4
    num_warmup: int = 1000
    num_samples: int = 1000
    target_accept_prob: float = 0.9
    num_steps: int = 5000
    learning_rate: float = 0.01
    num_draws: int = 4000
    num_restarts: int = 16
    rhat_max: float = 1.01
    ess_min: float = 400.0


def latent_sites(case: Case) -> tuple[list[str], list[str]]:
    """(continuous latent sites, enumerated discrete sites) of the case's model."""
    tr = handlers.trace(handlers.seed(case.model, jax.random.key(0))).get_trace(case.train, **case.kwargs)
    cont, disc = [], []
    for name, site in tr.items():
        if site["type"] == "sample" and not site["is_observed"]:
            (disc if site.get("infer", {}).get("enumerate") else cont).append(name)
    return cont, disc


def _svi_draws(rng_key, case: Case, guide, settings: ValidationSettings, discrete: list[str]) -> dict:
    k_fit, k_draw = jax.random.split(rng_key)
    elbo = TraceEnum_ELBO() if discrete else OrderedTrace_ELBO()
    optimizer = optax.chain(optax.clip_by_global_norm(100.0), optax.adam(settings.learning_rate))
    svi = SVI(case.model, guide, optimizer, elbo)
    fit = svi.run(k_fit, settings.num_steps, case.train, progress_bar=False, **case.kwargs)
    if not np.isfinite(np.asarray(fit.losses[-1])):
        raise FloatingPointError(f"{case.name}: SVI loss is {fit.losses[-1]}")
    return Predictive(guide, params=fit.params, num_samples=settings.num_draws, parallel=True)(
        k_draw, case.train, **case.kwargs
    )


def _restart_draws(rng_key, case: Case, settings: ValidationSettings, cls_name: str, continuous: list[str]) -> dict:
    from metaprior.inference import guides as lib_guides
    from metaprior.inference.local import fit_local

    k_build, k_fit, k_draw = jax.random.split(rng_key, 3)
    guide = getattr(lib_guides, cls_name).build(k_build, case.model, case.train, **case.kwargs)
    fit = fit_local(
        k_fit,
        case.model,
        guide,
        case.train,
        num_steps=settings.num_steps // 5,
        num_restarts=settings.num_restarts,
        model_kwargs=case.kwargs,
    )
    draws = Predictive(fit.guide, params=fit.params, num_samples=settings.num_draws, parallel=True)(
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
    rng_key, case: Case, settings: ValidationSettings, structure: str, continuous: list[str], cache: dict
) -> dict:
    """Task-level Laplace (LLAMA's posterior): the joint MAP, then per task a Gaussian over
    the local latents with the shared sites held at their MAP. ``case.laplace`` computes it
    where given (a network's curvature, as the BNN case's K-FAC); otherwise the Hessian of
    the model's own log joint per task (:func:`~metaprior.inference.laplace.task_laplace`;
    ``full`` and ``diag`` only)."""
    from metaprior.inference import laplace as lp

    if "map" not in cache:  # one MAP shared by the three curvature structures
        guide = AutoDelta(case.model)
        fit = SVI(case.model, guide, optax.adam(settings.learning_rate), OrderedTrace_ELBO()).run(
            jax.random.fold_in(rng_key, 1), settings.num_steps, case.train, progress_bar=False, **case.kwargs
        )
        cache["map"] = guide.median(fit.params)
    mode = cache["map"]
    if case.laplace is not None:
        draws = case.laplace(rng_key, case, mode, structure, settings.num_draws)
    elif structure == "kfac":
        raise ValueError(
            f"case {case.name!r}: laplace_kfac needs a network's layers; give the Case a laplace= function "
            "(as validation_cases.bnn_case does), or validate laplace_full / laplace_diag, which work on any model"
        )
    else:
        local = [n for n in continuous if n in case.local_sites]
        post = lp.task_laplace(case.model, case.train, mode=mode, local_sites=local, structure=structure, **case.kwargs)
        draws = lp.sample_task_laplace(rng_key, post, settings.num_draws)
    return {k: v for k, v in draws.items() if k in continuous}


def fit_method(
    rng_key: jax.Array, case: Case, method: str, settings: ValidationSettings, cache: dict
) -> dict[str, Any]:
    """Draws ``{site: [num_draws, ...]}`` of the continuous latents from one approximation.

    Args:
        rng_key: the fit's key.
        case: the model and data.
        method: one of :data:`METHODS` (``laplace_kfac`` only where ``case.laplace`` is given).
        settings: steps, learning rate and number of draws.
        cache: shared between the methods of one case (the MAP behind the Laplace methods).
    """
    continuous, discrete = latent_sites(case)
    blocked = handlers.block(case.model, hide=discrete) if discrete else case.model
    if method == "exact":
        return case.exact
    if method.startswith("laplace_"):
        return _laplace_draws(rng_key, case, settings, method.removeprefix("laplace_"), continuous, cache)
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
        return _restart_draws(rng_key, case, settings, RESTART_GUIDES[method], continuous)
    else:
        raise ValueError(f"unknown method {method!r}")
    draws = _svi_draws(rng_key, case, guide, settings, discrete)
    return {k: v for k, v in draws.items() if k in continuous}


def flatten_draws(draws: dict, sites: Sequence[str]) -> tuple[np.ndarray, list[str]]:
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


def geomean(values: np.ndarray) -> float:
    """Geometric mean of positive values (each floored at 1e-12)."""
    return float(np.exp(np.log(np.maximum(values, 1e-12)).mean()))


class CaseResult(NamedTuple):
    """What :func:`validate_case` measured on one case.

    Attributes:
        case: the case.
        health: NUTS convergence; ``healthy``: whether it met the thresholds.
        rows: one dict per method (``nuts`` first) of the report's columns.
        metrics: flat ``{key_{case}[_{method}]: value}``.
        draws: ``{method: {site: [draws, ...]}}``, ``nuts`` first.
        sites: the continuous latent sites compared; ``names``: their scalars.
        posteriors: ``{method: ArviZ DataTree}``.
        setup_s: seconds to build the case.
        cluster_probs: NUTS's per-task cluster probabilities ``[tasks, clusters]`` where a
            discrete site is enumerated, else ``None``.
    """

    case: Case
    health: NutsHealth
    healthy: bool
    rows: list[dict]
    metrics: dict[str, float]
    draws: dict[str, dict]
    sites: list[str]
    names: list[str]
    posteriors: dict[str, Any]
    setup_s: float
    cluster_probs: np.ndarray | None


def _no_log(message: str) -> None:
    del message


def _compare_row(flat: np.ndarray, reference: np.ndarray, is_local: np.ndarray) -> dict[str, float]:
    cmp = compare_marginals(flat, reference)
    return dict(
        w1=cmp["w1"].mean(),
        w1_local=cmp["w1"][is_local].mean() if is_local.any() else np.nan,
        mean_err=cmp["mean_err"].mean(),
        mean_err_max=cmp["mean_err"].max(),
        sd_ratio=geomean(cmp["sd_ratio"]),
        sd_ratio_min=cmp["sd_ratio"].min(),
        sd_ratio_local=geomean(cmp["sd_ratio"][is_local]) if is_local.any() else np.nan,
    )


def validate_case(
    rng_key: jax.Array,
    build: Callable[[jax.Array], Case],
    settings: ValidationSettings,
    *,
    methods: Sequence[str] = (),
    check_health: bool = True,
    log: Callable[[str], None] = _no_log,
) -> CaseResult:
    """Builds a case, runs NUTS on it and compares every approximation that applies with it.

    Args:
        rng_key: split into the keys of the case, NUTS, the fits and the scores.
        build: ``rng_key -> Case``.
        settings: NUTS and approximation settings.
        methods: the approximations to fit where they apply (all when empty).
        check_health: whether to log a NUTS run that misses the thresholds.
        log: progress messages.
    """
    k_case, k_nuts, k_methods, k_scores = jax.random.split(rng_key, 4)
    start = time.perf_counter()
    case = build(k_case)
    name = case.name
    continuous, discrete = latent_sites(case)
    setup_s = time.perf_counter() - start

    metrics: dict[str, float] = {}
    start = time.perf_counter()
    init_params = None
    if case.nuts_init is not None:
        init_params, info = case.nuts_init(jax.random.fold_in(k_nuts, 1), settings.num_chains)
        metrics.update({f"{key}_{name}": value for key, value in info.items()})
    mcmc = run_nuts(
        k_nuts,
        case.model,
        case.train,
        num_chains=settings.num_chains,
        num_warmup=settings.num_warmup,
        num_samples=settings.num_samples,
        target_accept_prob=settings.target_accept_prob,
        init_params=init_params,
        **case.kwargs,
    )
    nuts_s = time.perf_counter() - start
    health = nuts_health(mcmc)
    log(f"{name}/nuts: {nuts_s:.1f} s, max R-hat {health.rhat_max:.4f}, min bulk ESS {health.ess_bulk_min:.0f}")
    healthy = health.ok(rhat=settings.rhat_max, ess=settings.ess_min)
    if check_health and not healthy:
        log(f"NUTS on {name} is NOT healthy: {health}")
    metrics[f"rhat_max_{name}"] = health.rhat_max
    metrics[f"ess_bulk_min_{name}"] = health.ess_bulk_min
    metrics[f"divergences_{name}"] = health.num_divergent
    metrics[f"nuts_healthy_{name}"] = int(healthy)
    metrics[f"time_nuts_{name}_s"] = nuts_s
    posteriors = {"nuts": from_mcmc(mcmc, rng_key=k_nuts, attrs={"method": "nuts", "case": name})}
    nuts_draws = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    reference, names = flatten_draws(nuts_draws, continuous)
    is_local = np.array([n.split("[")[0] in case.local_sites for n in names])

    todo = (("exact",) if case.exact is not None else ()) + case.methods
    todo = tuple(m for m in todo if not methods or m in methods)
    all_draws = {"nuts": nuts_draws}
    times = {"nuts": nuts_s}
    cache: dict = {}
    for j, method in enumerate(todo):
        start = time.perf_counter()
        try:
            draws = fit_method(jax.random.fold_in(k_methods, j), case, method, settings, cache)
        except ImportError as err:  # a guide family not in this checkout
            log(f"skipping {method} on {name}: {err}")
            continue
        times[method] = time.perf_counter() - start
        log(f"{name}/{method}: fitted in {times[method]:.1f} s")
        all_draws[method] = {k: np.asarray(v) for k, v in draws.items()}

    rows = []
    nuts_probs = None
    exact_flat = flatten_draws(case.exact, continuous)[0] if case.exact is not None else None
    for method, draws in all_draws.items():
        flat, _ = flatten_draws(draws, continuous)
        row = {"method": method, "time_s": times[method]}
        if method != "nuts":
            row.update(_compare_row(flat, reference, is_local))
            metrics[f"w1_{name}_{method}"] = row["w1"]
            metrics[f"mean_err_{name}_{method}"] = row["mean_err"]
            metrics[f"sd_ratio_{name}_{method}"] = row["sd_ratio"]
        if exact_flat is not None:
            row["w1_exact"] = compare_marginals(flat, exact_flat)["w1"].mean() if method != "exact" else 0.0
            metrics[f"w1exact_{name}_{method}"] = row["w1_exact"]
        scores = predictive_scores(k_scores, case.model, draws, (case.train,), (case.test,), **case.kwargs)
        row.update(nll=scores["nll"], coverage=scores["coverage"])
        metrics[f"nll_{name}_{method}"] = scores["nll"]
        metrics[f"coverage90_{name}_{method}"] = scores["coverage"]
        if discrete:
            from metaprior.models.cases.mixture import cluster_probabilities

            probs = np.asarray(cluster_probabilities(draws, case.train, **case.kwargs))
            if method == "nuts":
                nuts_probs = probs
            row["cluster_err"] = float(np.abs(probs - nuts_probs).max())
            metrics[f"cluster_err_{name}_{method}"] = row["cluster_err"]
        if method != "nuts":
            attrs = {"method": method, "case": name}
            posteriors[method] = from_samples(k_scores, case.model, draws, case.train, attrs=attrs, **case.kwargs)
        rows.append(row)
    return CaseResult(
        case, health, healthy, rows, metrics, all_draws, continuous, names, posteriors, setup_s, nuts_probs
    )


def _fmt(value, spec=".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def case_table(r: CaseResult, settings: ValidationSettings) -> list[str]:
    """One case's section of :func:`validation_report`: Markdown lines."""
    case, h = r.case, r.health
    verdict = "healthy" if r.healthy else "**NOT healthy**"
    lines = [
        f"## {case.name}: {case.note}",
        "",
        f"{len(r.names)} scalar parameters. NUTS {verdict}: max R-hat {h.rhat_max:.4f} ({h.worst_rhat}), "
        f"min bulk ESS {h.ess_bulk_min:.0f} ({h.worst_ess}), {h.num_divergent} divergences "
        f"(thresholds R-hat <= {settings.rhat_max}, ESS >= {settings.ess_min:.0f}).",
        "",
    ]
    has_exact = case.exact is not None
    has_clusters = r.cluster_probs is not None
    head = ["method", "W1", "W1 local", "mean err", "max mean err", "sd ratio", "sd ratio local", "min sd ratio"]
    head += ["W1 to exact"] if has_exact else []
    head += ["max cluster-prob err"] if has_clusters else []
    head += ["NLL", "cov90", "time (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = sorted(r.rows, key=lambda row: (row["method"] != "nuts", row.get("w1", -1.0)))
    for row in ranked:
        keys = ("w1", "w1_local", "mean_err", "mean_err_max", "sd_ratio", "sd_ratio_local", "sd_ratio_min")
        cells = [row["method"], *(_fmt(row.get(k)) for k in keys)]
        cells += [_fmt(row.get("w1_exact"))] if has_exact else []
        cells += [_fmt(row.get("cluster_err"))] if has_clusters else []
        cells += [_fmt(row["nll"]), _fmt(row["coverage"], ".2f"), _fmt(row["time_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    if has_clusters:
        probs = r.cluster_probs
        lines += [
            "",
            "Posterior cluster probabilities per task (NUTS, c summed out, Rao-Blackwellised):",
            "",
            "| task | " + " | ".join(f"p(c={k})" for k in range(probs.shape[1])) + " |",
            "|---|" + "---|" * probs.shape[1],
        ]
        lines += [f"| {t} | " + " | ".join(f"{p:.3f}" for p in probs[t]) + " |" for t in range(probs.shape[0])]
    lines.append("")
    return lines


def validation_report(results: Sequence[CaseResult | Sequence[str]], settings: ValidationSettings) -> str:
    """The results of :func:`validate_case` as Markdown: one table per case, methods ranked
    by their distance to NUTS. An item may also be a case's table already rendered by
    :func:`case_table` (a resumed run keeps the tables of its finished cases)."""
    s = settings
    lines = [
        "# Validation: approximate posteriors against NUTS",
        "",
        f"NUTS: {s.num_chains} chains x {s.num_samples} draws after {s.num_warmup} warmup; "
        f"every guide: {s.num_steps} Adam steps (lr {s.learning_rate}), {s.num_draws} draws. "
        "Per scalar parameter against NUTS: `mean err` = |mean - mean_NUTS| / sd_NUTS (average), "
        "`sd ratio` = sd / sd_NUTS (geometric mean; `local` over the task-level latents; minimum), "
        "`W1` = 1-D Wasserstein distance / "
        "sd_NUTS (average; `W1 local` over the task-level latents only). Held-out points of the same "
        "tasks: `NLL` per point and coverage of the central 90% predictive interval.",
        "",
    ]
    for r in results:
        lines += case_table(r, settings) if isinstance(r, CaseResult) else list(r)
    return "\n".join(lines) + "\n"
