"""Per-task log joints, MAP-restart chain starts and grid quadrature (case (c) of validate)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

from metaprior.inference.mcmc import grid_posterior, per_task_log_joint, restart_init, run_nuts


def _bimodal_model(y, *, noise=0.1):
    """Per task: z ~ N(0.3, 1), y_i ~ N(z^2, noise): modes near +-sqrt(y), the one at
    +sqrt(y) higher because the prior is centred right of 0."""
    with numpyro.plate("tasks", y.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Normal(0.3, 1.0))
        with numpyro.plate("examples", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(z**2, noise), obs=y)


def _with_global(y):
    m = numpyro.sample("m", dist.Normal(0.0, 1.0))
    with numpyro.plate("tasks", y.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Normal(m, 1.0))
        with numpyro.plate("examples", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


Y = jnp.array([[1.0, 1.1, 0.9], [4.0, 3.9, 4.1]])  # two tasks, modes near +-1 and +-2


def test_per_task_log_joint_sums_to_the_log_density():
    z = jnp.array([[0.7], [-1.9]])
    per_task = per_task_log_joint(_bimodal_model, Y, values={"z": z})
    assert per_task.shape == (2,)
    total, _ = log_density(_bimodal_model, (Y,), {}, {"z": z})
    np.testing.assert_allclose(per_task.sum(), total, rtol=1e-6)
    # Task 0 alone is task 0's term (the tasks are independent).
    np.testing.assert_allclose(
        per_task_log_joint(_bimodal_model, Y[:1], values={"z": z[:1]})[0], per_task[0], rtol=1e-6
    )


def test_per_task_log_joint_refuses_shared_latents():
    with pytest.raises(ValueError, match="'m' is outside plate 'tasks'"):
        per_task_log_joint(_with_global, Y, values={"m": 0.0, "z": jnp.zeros((2, 1))})


def test_restart_init_finds_the_higher_mode_and_the_gap():
    found = restart_init(
        jax.random.key(0), _bimodal_model, Y, site="z", num_chains=3, num_starts=32, num_steps=500, jitter=0.0
    )
    assert found.init_params["z"].shape == (3, 2, 1)
    # Both modes are reached by some restart; the kept one is the higher (+sqrt(mean y)).
    best = np.asarray(found.best["z"][:, 0])
    np.testing.assert_allclose(best, np.sqrt(Y.mean(1)), atol=0.02)
    # The gap to the -sqrt(y) mode: the prior N(0.3, 1) at +-s differs by 2 * 0.3 * s
    # nats (the likelihood is symmetric), i.e. 0.6 and 1.2 nats here.
    np.testing.assert_allclose(found.gap, 0.6 * np.sqrt(np.asarray(Y.mean(1))), atol=0.05)


def test_restart_init_errors():
    with pytest.raises(ValueError, match="only latent"):
        restart_init(jax.random.key(0), _with_global, Y, site="z")
    with pytest.raises(ValueError, match="num_starts"):
        restart_init(jax.random.key(0), _bimodal_model, Y, site="z", num_starts=0)


def test_run_nuts_checks_init_params_shape():
    with pytest.raises(ValueError, match="leading axis of num_chains=2"):
        run_nuts(
            jax.random.key(0),
            _bimodal_model,
            Y,
            num_chains=2,
            num_warmup=5,
            num_samples=5,
            init_params={"z": jnp.zeros((3, 2, 1))},
        )


def test_grid_posterior_on_a_two_component_mixture():
    # An unnormalised 2-D mixture with known weights, means and normaliser: 0.7 N((-2, 1),
    # 0.2^2 I) + 0.3 N((2, -1), 0.5^2 I), scaled by e^3.
    comps = [(0.7, jnp.array([-2.0, 1.0]), 0.2), (0.3, jnp.array([2.0, -1.0]), 0.5)]

    def log_density(z):
        terms = [jnp.log(w) + dist.Normal(mu, s).log_prob(z).sum(-1) for w, mu, s in comps]
        return 3.0 + jax.scipy.special.logsumexp(jnp.stack(terms), axis=0)

    n = 20000
    draws, log_z = grid_posterior(jax.random.key(1), log_density, 2, n, coarse=200, refine=4)
    assert draws.shape == (n, 2)
    np.testing.assert_allclose(log_z, 3.0, atol=1e-3)  # midpoint rule on a smooth density
    left = draws[:, 0] < 0
    # Component weight: binomial sd sqrt(0.21 / n) = 0.0032; 4 of those.
    assert abs(left.mean() - 0.7) < 0.013
    # Component means and sds: Monte Carlo error sd / sqrt(n_k) (< 0.005), plus the cell
    # jitter (side 0.0125) inside the sd; tolerances of 4 standard errors.
    np.testing.assert_allclose(draws[left].mean(0), [-2.0, 1.0], atol=4 * 0.2 / np.sqrt(left.sum()))
    np.testing.assert_allclose(draws[~left].mean(0), [2.0, -1.0], atol=4 * 0.5 / np.sqrt((~left).sum()))
    np.testing.assert_allclose(draws[left].std(0), [0.2, 0.2], rtol=0.03)
    np.testing.assert_allclose(draws[~left].std(0), [0.5, 0.5], rtol=0.03)


def test_grid_posterior_errors():
    with pytest.raises(ValueError, match="dim in 1..3"):
        grid_posterior(jax.random.key(0), lambda z: z.sum(-1), 4, 10)
    with pytest.raises(ValueError, match="-inf or NaN everywhere"):
        grid_posterior(jax.random.key(0), lambda z: jnp.full(z.shape[:1], -jnp.inf), 1, 10)


def test_latent_case_nuts_from_restarts_matches_quadrature(tmp_path):
    # Case (c) at the quick size: the task-latent model with alpha fixed. NUTS started at
    # the best MAP restarts agrees with the grid-quadrature posterior: 2 chains x 300
    # draws give W1 ~ 1 / sqrt(ESS) ~ 0.05 sd per scalar; 0.25 allows for the quick
    # run's short warmup. A chain stuck in another mode would be several sds away
    # (the single-start guides of the default run: 50).
    from metaprior.experiments.validate import make_config, run

    config = dataclasses.replace(
        make_config("quick"), cases=("latent",), methods=("exact",), num_warmup=300, num_samples=300, num_draws=2000
    )
    metrics = run(jax.random.key(0), config, tmp_path)
    assert metrics["w1exact_latent_nuts"] < 0.25
    # (No R-hat bound here: the quick network, 100 SVI steps, leaves two modes within
    # 0.05 nats of each other, which 2 chains x 300 draws visit in different proportions.)
    assert metrics["mode_gap_min_latent"] >= 0.0
