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

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from numpyro.infer import MCMC, NUTS

__all__ = ["default_chain_method", "run_nuts", "NutsHealth", "nuts_health"]


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
            f"need num_chains >= 1, num_samples >= 1, num_warmup >= 0; got {num_chains}, "
            f"{num_samples}, {num_warmup}"
        )
    kernel_kwargs = dict(target_accept_prob=target_accept_prob, dense_mass=dense_mass,
                         max_tree_depth=max_tree_depth)
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
    mcmc.run(rng_key, *model_args, extra_fields=("diverging",), **model_kwargs)
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
