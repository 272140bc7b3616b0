"""Calibration metrics and the ArviZ conversion of every kind of posterior."""

from __future__ import annotations

import numpy as np
import pytest

from metaprior.inference.diagnostics import (
    expected_calibration_error,
    plot_reliability,
    reliability_curve,
)

# ------------------------------------------------------------------------ calibration


def test_ece_hand_computed():
    # Four predictions in two bins of 15: confidences 0.9, 0.9 (bin 13) and 0.6, 0.6 (bin 8).
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 0])  # right, wrong, right, wrong
    # bin 13: conf 0.9, acc 0.5 -> |0.4| * 2/4; bin 8: conf 0.6, acc 0.5 -> |0.1| * 2/4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    conf, acc, count = reliability_curve(probs, labels)
    assert count.sum() == 4 and count[13] == 2 and count[8] == 2
    assert conf[13] == pytest.approx(0.9) and acc[13] == pytest.approx(0.5)
    assert np.isnan(conf[0]) and np.isnan(acc[0])


def test_ece_zero_for_calibrated_predictions():
    # Labels drawn from the predicted distribution: ECE -> 0 as N grows. With 200k
    # draws and 15 bins the sampling error of each bin's accuracy is ~1e-3.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200_000, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = (rng.random((200_000, 1)) > probs.cumsum(-1)).sum(-1)
    assert expected_calibration_error(probs, labels) < 0.005


def test_ece_one_hot_wrong_is_one():
    probs = np.eye(4)[[0, 1, 2, 3]]
    assert expected_calibration_error(probs, np.array([1, 2, 3, 0])) == pytest.approx(1.0)
    assert expected_calibration_error(probs, np.array([0, 1, 2, 3])) == pytest.approx(0.0)


def test_bin_edges_are_right_closed():
    # Confidence exactly 0.6 with 5 bins lies in (0.4, 0.6], bin 2.
    probs = np.array([[0.6, 0.4]])
    _, _, count = reliability_curve(probs, np.array([0]), num_bins=5)
    assert count.tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.ones(3) / 3, np.array([0]), "probs must have shape"),
        (np.ones((2, 3)) / 3, np.array([0, 1, 2]), "labels must have shape"),
        (np.ones((2, 3)) / 3, np.array([0, 3]), "labels must lie in"),
        (np.full((2, 3), np.nan), np.array([0, 1]), "NaN"),
        (np.ones((2, 3)) / 3, np.array([0.0, 1.0]), "integer"),
    ],
)
def test_calibration_input_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, labels)


def test_plot_reliability_draws_one_line_per_method():
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=500)
    labels = rng.integers(0, 5, size=500)
    ax = plot_reliability({"a": reliability_curve(probs, labels), "b": reliability_curve(probs, labels, 10)})
    assert len(ax.get_lines()) == 3  # diagonal + two methods


# ------------------------------------------------------------------------ ArviZ

import arviz as az  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402

from metaprior.inference.diagnostics import (  # noqa: E402
    from_guide,
    from_samples,
    save_posterior,
    to_datatree,
)
from metaprior.models.cases import (  # noqa: E402
    hierarchical_linear_model,
    hierarchical_linear_posterior,
    hierarchical_linear_tasks,
    task_mixture_model,
    task_mixture_tasks,
)

NUM_TASKS, NUM_EXAMPLES = 3, 5

# Pareto-k warnings of PSIS-LOO on 15 observations are expected and not under test here.
pytestmark = pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")


@pytest.fixture(scope="module")
def linear_case():
    batch, _ = hierarchical_linear_tasks(jax.random.key(1), NUM_TASKS, NUM_EXAMPLES)
    return batch, hierarchical_linear_posterior(batch)


def exact_draws(post, num_draws, seed=0):
    """Draws of the closed-form posterior in the model's site shapes."""
    rng = np.random.default_rng(seed)
    theta = rng.multivariate_normal(post.joint_mean, post.joint_cov, size=num_draws)
    d = post.mean["mu"].shape[0]
    return {"mu": theta[:, :d], "w": theta[:, d:].reshape(num_draws, -1, 1, d)}


def test_to_datatree_groups_and_dims():
    tree = to_datatree(
        {"z": np.zeros((2, 10, 3))},
        posterior_predictive={"y": np.zeros((2, 10, 3, 4))},
        observed_data={"y": np.zeros((3, 4))},
        log_likelihood={"y": np.zeros((2, 10, 3, 4))},
        dims={"z": ["tasks"], "y": ["tasks", "examples"]},
    )
    assert set(tree.children) == {"posterior", "posterior_predictive", "observed_data", "log_likelihood"}
    assert tree["posterior"]["z"].dims == ("chain", "draw", "tasks")
    assert tree["observed_data"]["y"].dims == ("tasks", "examples")
    with pytest.raises(ValueError, match="leading \\(chain, draw\\)"):
        to_datatree({"z": np.zeros(3)})


def check_tree(tree, num_chains, num_draws):
    """The four groups, plate-named dims, and ArviZ's main functions run on it."""
    assert {"posterior", "posterior_predictive", "observed_data", "log_likelihood"} <= set(tree.children)
    assert tree["posterior"]["w"].dims == ("chain", "draw", "tasks", "w_dim_0")
    assert tree["posterior"]["mu"].dims == ("chain", "draw", "mu_dim_0")
    assert tree["posterior"]["w"].shape == (num_chains, num_draws, NUM_TASKS, 2)
    for group in ("posterior_predictive", "log_likelihood"):
        assert tree[group]["y"].dims == ("chain", "draw", "tasks", "examples")
    assert tree["observed_data"]["y"].dims == ("tasks", "examples")
    summary = az.summary(tree, var_names=["mu", "w"])
    assert len(summary) == 2 + 2 * NUM_TASKS and np.all(np.isfinite(summary["mean"].astype(float)))
    loo = az.loo(tree)
    assert np.isfinite(loo.elpd)
    return loo


def test_from_samples_on_exact_posterior(linear_case, rng_key):
    batch, post = linear_case
    tree = from_samples(rng_key, hierarchical_linear_model, exact_draws(post, 400), batch)
    check_tree(tree, 1, 400)
    # The posterior group holds exactly the draws given.
    np.testing.assert_allclose(tree["posterior"]["mu"].values.mean((0, 1)), post.mean["mu"], atol=0.1)
    # The predictive is a resample, not the observations: it varies across draws.
    assert float(tree["posterior_predictive"]["y"].std("draw").min()) > 0.1
    np.testing.assert_allclose(tree["observed_data"]["y"].values, np.asarray(batch.y))


def test_from_samples_two_chains_and_log_likelihood(linear_case, rng_key):
    batch, post = linear_case
    draws = {k: v.reshape(2, 100, *v.shape[1:]) for k, v in exact_draws(post, 200).items()}
    tree = from_samples(rng_key, hierarchical_linear_model, draws, batch, sample_ndims=2)
    check_tree(tree, 2, 100)
    # Pointwise log-likelihood recomputed by hand for one draw.
    mu_w = draws["w"][1, 7, :, 0, :]
    mean = np.einsum("tnd,td->tn", np.asarray(batch.x), mu_w)
    expected = -0.5 * ((np.asarray(batch.y) - mean) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(tree["log_likelihood"]["y"].values[1, 7], expected, rtol=1e-4, atol=1e-4)


def test_from_guide_compare_and_plot_ppc(linear_case, rng_key, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    batch, post = linear_case
    guide = AutoNormal(hierarchical_linear_model)
    svi = SVI(hierarchical_linear_model, guide, optax.adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.key(2), 300, batch, progress_bar=False)
    tree_guide = from_guide(rng_key, hierarchical_linear_model, guide, result.params, batch, num_samples=300)
    check_tree(tree_guide, 1, 300)
    tree_exact = from_samples(rng_key, hierarchical_linear_model, exact_draws(post, 300), batch)
    comparison = az.compare({"exact": tree_exact, "autonormal": tree_guide})
    assert set(comparison.index) == {"exact", "autonormal"}
    pc = az.plot_ppc_dist(tree_guide, var_names=["y"])
    assert pc is not None
    path = save_posterior(tree_guide, tmp_path / "posterior.nc")
    back = az.from_netcdf(path)
    np.testing.assert_allclose(back["posterior"]["mu"].values, tree_guide["posterior"]["mu"].values)


def test_from_samples_draws_enumerated_discrete_sites(rng_key):
    # Well separated clusters: each task's cluster is certain, so the discrete draws that
    # from_samples adds must equal the true labels (relabelled by the ordered intercepts).
    batch, clusters = task_mixture_tasks(jax.random.key(3), 6, 8, noise=0.1)
    draws = {
        "weights": jnp.tile(jnp.array([0.3, 0.4, 0.3]), (50, 1)),
        "intercept": jnp.tile(jnp.array([-2.0, 0.0, 2.0]), (50, 1)),
        "slope": jnp.tile(jnp.array([1.0, -1.0, 0.5]), (50, 1)),
        "noise": jnp.full((50,), 0.1),
    }
    tree = from_samples(rng_key, task_mixture_model, draws, batch)
    c = tree["posterior"]["c"]
    assert c.dims == ("chain", "draw", "tasks")
    np.testing.assert_array_equal(c.values[0], np.tile(np.asarray(clusters), (50, 1)))
    assert tree["log_likelihood"]["y"].dims == ("chain", "draw", "tasks", "examples")


def test_from_samples_errors(linear_case, rng_key):
    batch, post = linear_case
    with pytest.raises(ValueError, match="lack the model's latent sites"):
        from_samples(rng_key, hierarchical_linear_model, {"mu": exact_draws(post, 5)["mu"]}, batch)
    with pytest.raises(ValueError, match="sample_ndims"):
        from_samples(rng_key, hierarchical_linear_model, exact_draws(post, 5), batch, sample_ndims=3)
