"""NUTS baselines: agreement with a closed-form posterior, health checks, enumeration."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metaprior.inference.diagnostics import from_mcmc
from metaprior.inference.mcmc import NutsHealth, default_chain_method, nuts_health, run_nuts
from metaprior.models.cases import (
    cluster_probabilities,
    hierarchical_linear_model,
    hierarchical_linear_posterior,
    hierarchical_linear_tasks,
    task_mixture_model,
    task_mixture_tasks,
)

NUM_CHAINS, NUM_DRAWS = 2, 1000


@pytest.fixture(scope="module")
def linear_run():
    batch, _ = hierarchical_linear_tasks(jax.random.key(1), 4, 6)
    mcmc = run_nuts(
        jax.random.key(2),
        hierarchical_linear_model,
        batch,
        num_chains=NUM_CHAINS,
        num_warmup=500,
        num_samples=NUM_DRAWS,
    )
    return batch, mcmc


def test_nuts_matches_closed_form(linear_run):
    batch, mcmc = linear_run
    exact = hierarchical_linear_posterior(batch)
    samples = mcmc.get_samples()
    d = exact.mean["mu"].shape[0]
    draws = np.concatenate([np.asarray(samples["mu"]), np.asarray(samples["w"]).reshape(-1, 4 * d)], axis=1)
    health = nuts_health(mcmc)
    # Means: |error| / posterior sd below 5 Monte Carlo standard errors, 1 / sqrt(ESS)
    # with the smallest ESS of the run (a bound that holds for every one of 10 params).
    z = np.abs(draws.mean(0) - exact.joint_mean) / np.sqrt(np.diag(exact.joint_cov))
    assert z.max() < 5 / np.sqrt(health.ess_bulk_min), z
    # Standard deviations: the relative error of a sd from n effective draws is about
    # 1 / sqrt(2 n); 5 of those with n = the smallest ESS.
    ratio = draws.std(0) / np.sqrt(np.diag(exact.joint_cov))
    assert np.abs(ratio - 1).max() < 5 / np.sqrt(2 * health.ess_bulk_min), ratio
    # Correlations: the mu / w coupling of a hierarchical model, within 0.1.
    np.testing.assert_allclose(
        np.corrcoef(draws.T),
        exact.joint_cov / np.sqrt(np.outer(np.diag(exact.joint_cov), np.diag(exact.joint_cov))),
        atol=0.1,
    )


def test_health_of_a_good_run(linear_run):
    _, mcmc = linear_run
    health = nuts_health(mcmc)
    assert isinstance(health, NutsHealth)
    assert health.rhat_max < 1.01 and health.ess_bulk_min > 400 and health.num_divergent == 0
    assert health.ok()
    assert health.worst_rhat.startswith(("mu[", "w["))
    # The same numbers from the ArviZ tree (sample_stats carries the divergences).
    tree = from_mcmc(mcmc)
    again = nuts_health(tree)
    assert again.rhat_max == pytest.approx(health.rhat_max)
    assert again.num_divergent == health.num_divergent
    assert tree["posterior"]["w"].dims == ("chain", "draw", "tasks", "w_dim_0")


def test_health_flags_chains_that_disagree():
    # Two "chains" centred 3 sd apart: R-hat far above 1.01.
    rng = np.random.default_rng(0)
    samples = {"x": np.stack([rng.normal(0, 1, 500), rng.normal(3, 1, 500)])}
    health = nuts_health(samples)
    assert health.rhat_max > 1.5 and not health.ok()
    assert health.worst_rhat == "x"


def test_default_chain_method():
    assert default_chain_method(1) == "vectorized"
    expected = "parallel" if jax.local_device_count() >= 4 else "vectorized"
    assert default_chain_method(4) == expected


def test_run_nuts_rejects_bad_counts(linear_run):
    batch, _ = linear_run
    with pytest.raises(ValueError, match="num_chains"):
        run_nuts(jax.random.key(0), hierarchical_linear_model, batch, num_chains=0)


def test_nuts_enumerates_discrete_cluster_index():
    # Well separated clusters, enough tasks per cluster: NUTS over the continuous
    # latents with c summed out recovers every task's cluster with probability > 0.95.
    batch, clusters = task_mixture_tasks(jax.random.key(4), 12, 8, noise=0.3, intercepts=(-3.0, 0.0, 3.0))
    mcmc = run_nuts(jax.random.key(5), task_mixture_model, batch, num_chains=2, num_warmup=300, num_samples=300)
    samples = mcmc.get_samples()
    assert "c" not in samples  # summed out, not sampled
    probs = np.asarray(cluster_probabilities(samples, batch))
    assert probs.shape == (12, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs[np.arange(12), np.asarray(clusters)] > 0.95).all(), probs
