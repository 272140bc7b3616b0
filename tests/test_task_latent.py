"""The task-latent model and its guides: site shapes, unbiased subsampling, jit, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from metaprior.data.tasks import TaskBatch, harmonic_tasks
from metaprior.inference.guides import TaskIAFGuide, TaskNormalGuide
from metaprior.inference.svi import elbo_loss, elbo_terms, init_params
from metaprior.models.task_latent import make_task_latent_net, task_latent_model

T, N, D = 12, 7, 3


@pytest.fixture(scope="module")
def setup():
    batch, _ = harmonic_tasks(jax.random.key(1), T, N, min_examples=2)
    net = make_task_latent_net(jax.random.key(2), D, width=16, num_layers=2)
    model = partial(task_latent_model, net=net, latent_dim=D)
    return batch, model


def trace(fn, key, *args, **kwargs):
    return handlers.trace(handlers.seed(fn, key)).get_trace(*args, **kwargs)


@pytest.mark.parametrize("subsample", [None, 5])
def test_model_site_shapes(setup, subsample):
    batch, model = setup
    tr = trace(model, jax.random.key(0), batch, subsample_size=subsample)
    b = subsample or T
    z, y = tr["z"], tr["y"]
    assert z["fn"].batch_shape == (b, 1) and z["fn"].event_shape == (D,) and z["value"].shape == (b, 1, D)
    assert y["fn"].batch_shape == (b, N) and y["fn"].event_shape == () and y["is_observed"]
    assert tr["tasks"]["value"].shape == (b,)
    assert set(jax.tree.leaves(tr["net$params"]["value"])[0].shape)  # the network is a param site


def test_prior_predictive_samples_y(setup):
    batch, model = setup
    tr = trace(model, jax.random.key(0), batch._replace(y=None))
    assert not tr["y"]["is_observed"] and tr["y"]["value"].shape == (T, N)


@pytest.mark.parametrize("guide_cls", [TaskNormalGuide, TaskIAFGuide])
@pytest.mark.parametrize("subsample", [None, 4])
def test_guide_site_shapes_match_model(setup, guide_cls, subsample):
    batch, model = setup
    guide = guide_cls.build(jax.random.key(0), model, batch)
    g = trace(guide, jax.random.key(1), batch, subsample_size=subsample)
    m = trace(handlers.replay(model, g), jax.random.key(2), batch, subsample_size=subsample)
    b = subsample or T
    assert g["z"]["value"].shape == m["z"]["value"].shape == (b, 1, D)
    assert g["z"]["fn"].batch_shape == m["z"]["fn"].batch_shape
    assert g["z"]["fn"].event_shape == m["z"]["fn"].event_shape
    np.testing.assert_array_equal(g["tasks"]["value"], m["tasks"]["value"])  # same subsample
    params = init_params(jax.random.key(3), model, guide, batch)
    assert params["q_loc"].shape == (T, D)


def test_guide_reads_only_the_subsampled_tasks(setup):
    batch, model = setup
    guide = TaskIAFGuide.build(jax.random.key(0), model, batch)
    params = init_params(jax.random.key(1), model, guide, batch, which="guide")
    loss = elbo_loss(model, guide, model_kwargs={"subsample_size": 3})
    grads = jax.grad(loss)(params, jax.random.key(2), batch)
    touched = np.flatnonzero(np.abs(np.asarray(grads["q_loc"])).sum(1) > 0)
    assert len(touched) == 3
    for name, g in grads.items():
        rows = np.flatnonzero(np.abs(np.asarray(g).reshape(T, -1)).sum(1) > 0)
        assert set(rows) <= set(touched), name


def test_subsampled_elbo_is_unbiased(setup):
    """Mean over subsamples of the scaled ELBO equals the full-batch ELBO.

    The guide is made (almost) deterministic (scale 1e-4) so the only randomness left
    is which tasks are drawn; we average 3,000 subsampled estimates and allow 4 standard
    errors of that mean (a false failure has probability below 1e-4).
    """
    batch, model = setup
    guide = TaskNormalGuide.build(jax.random.key(0), model, batch, init_scale=1e-4)
    params = init_params(jax.random.key(1), model, guide, batch, which="guide")
    params["q_loc"] = jax.random.normal(jax.random.key(5), params["q_loc"].shape)
    full = sum(elbo_terms(jax.random.key(9), params, model, guide, batch))
    sub = jax.jit(jax.vmap(lambda k: sum(elbo_terms(k, params, model, guide, batch, subsample_size=4))))
    est = np.asarray(sub(jax.random.split(jax.random.key(2), 3000)))
    se = est.std(ddof=1) / np.sqrt(est.size)
    assert est.std() > 0  # the estimator really varies with the subsample
    assert abs(est.mean() - float(full)) < 4 * se, (est.mean(), float(full), se)


def test_jit_on_and_off_agree(setup):
    batch, model = setup
    guide = TaskIAFGuide.build(jax.random.key(0), model, batch)
    params = init_params(jax.random.key(1), model, guide, batch)
    loss = elbo_loss(model, guide, num_particles=2, model_kwargs={"subsample_size": 5})
    eager = loss(params, jax.random.key(3), batch)
    jitted = jax.jit(loss)(params, jax.random.key(3), batch)
    np.testing.assert_allclose(eager, jitted, rtol=1e-4)  # float32 reassociation under XLA fusion


def test_kl_weight_zero_drops_prior_and_entropy(setup):
    batch, model = setup
    guide = TaskNormalGuide.build(jax.random.key(0), model, batch)
    params = init_params(jax.random.key(1), model, guide, batch)
    loglik, _ = elbo_terms(jax.random.key(4), params, model, guide, batch)
    nokl = elbo_loss(model, guide, kl_weight=0.0)(params, jax.random.key(0), batch)
    # elbo_loss splits its key per particle; recompute with the same particle key
    key = jax.random.split(jax.random.key(0), 1)[0]
    loglik, _ = elbo_terms(key, params, model, guide, batch)
    np.testing.assert_allclose(nokl, -loglik, rtol=1e-6)


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b._replace(x=b.x[0]), r"batch\.x must have shape"),
    (lambda b: b._replace(y=b.y.at[0, 0].set(jnp.nan)), "NaN"),
    (lambda b: b._replace(mask=b.mask.at[3].set(False)), "empty support set"),
])
def test_model_rejects_bad_batches(setup, mutate, match):
    batch, model = setup
    with pytest.raises(ValueError, match=match):
        trace(model, jax.random.key(0), mutate(batch))


def test_model_rejects_bad_subsample(setup):
    batch, model = setup
    with pytest.raises(ValueError, match="subsample_size"):
        trace(model, jax.random.key(0), batch, subsample_size=T + 1)


def test_guide_build_errors():
    import numpyro
    import numpyro.distributions as dist

    def no_plate(batch):
        numpyro.sample("a", dist.Normal(0, 1))

    def global_latent(batch):
        numpyro.sample("g", dist.Normal(0, 1))
        with numpyro.plate("tasks", 3):
            numpyro.sample("a", dist.Normal(0, 1))

    with pytest.raises(ValueError, match="no plate named 'tasks'"):
        TaskNormalGuide.build(jax.random.key(0), no_plate, None)
    with pytest.raises(ValueError, match=r"\['g'\] are outside plate"):
        TaskIAFGuide.build(jax.random.key(0), global_latent, None)
