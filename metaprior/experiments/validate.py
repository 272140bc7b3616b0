"""``metaprior run validate``: every approximate posterior of the library against NUTS.

Four small cases with a trustworthy reference posterior
(:mod:`metaprior.inference.validation_cases`): ``linear`` (a, conjugate: NUTS is itself
checked against the closed form), ``bnn`` (b), ``latent`` (c, alpha fixed: grid
quadrature as the exact reference, NUTS started at MAP restarts) and ``mixture`` (d,
the cluster index enumerated). On each, NUTS's health is checked and reported, then every
approximation that applies is fitted to the same NumPyro program and compared with NUTS
(:func:`metaprior.inference.validation.validate_case`). Outputs: ``validation.md``,
``marginals_{case}.png`` and one ArviZ file per case and method
(``posterior_{case}_{method}.nc``). Each finished case leaves ``case_{case}.json`` (its
metrics and report section, with the key and settings it ran with): a killed run, rerun
with the same command, skips the cases it finished.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np

from metaprior._io import atomic_write_bytes
from metaprior.experiments._plots import marginals_figure
from metaprior.experiments._registry import ConfigError, Experiment
from metaprior.inference.diagnostics import save_posterior
from metaprior.inference.validation import (
    METHODS,
    ValidationSettings,
    case_table,
    validate_case,
    validation_report,
)
from metaprior.inference.validation_cases import bnn_case, latent_case, linear_case, mixture_case

CASES = ("linear", "bnn", "latent", "mixture")


@dataclasses.dataclass(frozen=True)
class ValidateConfig(ValidationSettings):
    """Sizes of the validation run: NUTS and the approximations
    (:class:`~metaprior.inference.validation.ValidationSettings`) and the cases.

    Attributes:
        cases: which of ``linear``, ``bnn``, ``latent``, ``mixture`` to run.
        methods: the approximations to fit where they apply (all when empty): ``exact``,
            ``autonormal``, ``automvn``, ``autoiaf``, ``task_normal``, ``task_iaf``,
            ``laplace_full``, ``laplace_diag``, ``laplace_kfac``.
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
    num_heldout: int = 10
    check_health: bool = True
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


def _builder(name: str, cfg: ValidateConfig):
    """``rng_key -> Case`` of one case at the configured size."""
    if name == "linear":
        sizes = {"num_tasks": cfg.linear_tasks, "num_examples": cfg.linear_examples, "num_draws": cfg.num_draws}
        return partial(linear_case, num_heldout=cfg.num_heldout, **sizes)
    if name == "bnn":
        sizes = {"num_tasks": cfg.bnn_tasks, "num_examples": cfg.bnn_examples, "num_hidden": cfg.bnn_hidden}
        return partial(bnn_case, num_heldout=cfg.num_heldout, **sizes)
    if name == "mixture":
        sizes = {"num_tasks": cfg.mixture_tasks, "num_examples": cfg.mixture_examples}
        return partial(mixture_case, num_heldout=cfg.num_heldout, **sizes)
    return partial(
        latent_case,
        num_tasks=cfg.latent_tasks,
        num_examples=cfg.latent_examples,
        num_heldout=cfg.num_heldout,
        num_draws=cfg.num_draws,
        family=cfg.latent_family,
        data=cfg.latent_data,
        noise_std=cfg.latent_noise,
        latent_dim=cfg.latent_dim,
        width=cfg.latent_width,
        num_layers=cfg.latent_layers,
        num_pretrain_tasks=cfg.latent_pretrain_tasks,
        num_pretrain_steps=cfg.latent_pretrain_steps,
        num_restarts=cfg.latent_restarts,
        grid=cfg.latent_grid,
    )


def _log(message: str) -> None:
    print(f"validate: {message}", file=sys.stderr, flush=True)


def run(rng_key, config: ValidateConfig, out_dir: Path) -> dict[str, float]:
    out_dir = Path(out_dir)
    unknown = set(config.cases) - set(CASES)
    if unknown:
        raise ConfigError(f"unknown case(s) {sorted(unknown)}; known: {CASES}")
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    metrics: dict[str, float] = {}
    tables, healthy = [], []
    for i, name in enumerate(config.cases):
        key = jax.random.fold_in(rng_key, i)
        done = finished_case(out_dir, name, key, config)
        if done is None:
            result = validate_case(
                key, _builder(name, config), config, methods=config.methods, check_health=config.check_health, log=_log
            )
            for method, tree in result.posteriors.items():
                save_posterior(tree, out_dir / f"posterior_{name}_{method}.nc")
            title = f"{name}: {result.case.note}"
            marginals_figure(result.draws, result.sites, result.names, out_dir, f"marginals_{name}.png", title=title)
            done = dict(metrics=result.metrics, healthy=bool(result.healthy), table=case_table(result, config))
            # the case's checkpoint, written last: a rerun after a kill skips the cases it lists
            fingerprint = dict(key=_key_list(key), config=_settings(config))
            atomic_write_bytes(out_dir / f"case_{name}.json", json.dumps(dict(done, **fingerprint)).encode())
        else:
            _log(f"case {name}: finished in an earlier run (case_{name}.json), not rerun")
        metrics.update(done["metrics"])
        tables.append(done["table"])
        healthy.append(done["healthy"])
        # Written after every case, so a long run shows its finished cases.
        atomic_write_bytes(out_dir / "validation.md", validation_report(tables, config).encode())
    metrics["nuts_healthy"] = int(all(healthy))
    return metrics


def _settings(config: ValidateConfig) -> str:
    """What a case's numbers depend on besides its key: the settings, the package version
    and whether XLA optimised the programs."""
    from importlib.metadata import version

    optimised = not jax.config.read("jax_disable_most_optimizations")
    return f"{config!r} metaprior={version('metaprior')} xla_optimised={optimised}"


def _key_list(key) -> list[int]:
    return [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()]


def finished_case(out_dir: Path, name: str, key, config: ValidateConfig) -> dict | None:
    """The checkpoint of a case finished by an earlier run with the same key and settings."""
    path = out_dir / f"case_{name}.json"
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable case checkpoint ({err}); delete it to rerun the case") from err
    if done.get("key") != _key_list(key) or done.get("config") != _settings(config):
        return None  # another seed or other settings: the case runs again and overwrites it
    return done


METRICS_DOC = """\
rhat_max_{case}, ess_bulk_min_{case}, divergences_{case}, nuts_healthy_{case}: NUTS health
nuts_healthy: 1 when every case met R-hat <= 1.01 and bulk ESS >= 400
w1_{case}_{method}: mean 1-D Wasserstein distance to NUTS per scalar, in NUTS sds
mean_err_{case}_{method}, sd_ratio_{case}_{method}: mean error (NUTS sds), sd ratio (geo. mean)
w1exact_{case}_{method}: the same distance to the exact posterior (nuts included): the closed
  form on linear, grid quadrature on latent
mode_gap_min_latent: nats between each task's best MAP restart and the next mode found (min)
nll_{case}_{method}, coverage90_{case}_{method}: held-out predictive NLL and 90% coverage (nan: discrete y)
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
