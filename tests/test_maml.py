"""MAML / LLAMA: the inner loop, first- and second-order meta-gradients, the
ML-LAPLACE term, and the hierarchical NumPyro model's sites."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.infer.util import log_density

from metaprior.inference import laplace as L
from metaprior.inference.maml import SupportQuery, adapt, ml_laplace, ml_point, mse_loss, nll_loss
from metaprior.inference.meta import meta_learner
from metaprior.models.maml import maml_model, phi_site_names, task_networks, task_specific_filter
from metaprior.models.nets import MLP, Conv4


def gaussian(f):
    return dist.Normal(f[..., 0], 0.5)


@pytest.fixture
def sine_tasks(rng_key):
    k1, k2, k3 = jax.random.split(rng_key, 3)
    net = MLP(1, 1, (8,), key=k1)
    x = jax.random.uniform(k2, (3, 9, 1), minval=-3, maxval=3)
    amp = jax.random.uniform(k3, (3, 1), minval=0.5, maxval=2.0)
    y = amp * jnp.sin(x[..., 0])
    return net, SupportQuery(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


def to64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


def flat_fn(objective, net, tasks):
    params, static = eqx.partition(net, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(params)

    def f(v):
        return objective(eqx.combine(unravel(v), static), jax.random.key(0), tasks)[0]

    return f, flat


def check_fd(f, flat, key, rtol):
    f = jax.jit(f)
    grad = jax.jit(jax.grad(f))(flat)
    d = jax.random.normal(key, flat.shape)
    eps = 1e-6
    fd = (f(flat + eps * d) - f(flat - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.dot(grad, d), fd, rtol=rtol)


# ------------------------------------------------------------------ inner loop


def test_adapt_is_k_steps_of_the_inner_optimizer(sine_tasks):
    net, tasks = sine_tasks
    loss = mse_loss(L.vmap_apply)
    x, y = tasks.support_x[0], tasks.support_y[0]
    phi, losses = adapt(net, x, y, loss_fn=loss, inner_optimizer=optax.sgd(0.1), num_steps=3)
    manual = net
    for _ in range(3):
        g = jax.grad(loss)(manual, x, y)
        manual = jax.tree.map(lambda p, gp: p - 0.1 * gp, manual, g)
    np.testing.assert_allclose(ravel_pytree(phi)[0], ravel_pytree(manual)[0], rtol=1e-5)
    assert losses.shape == (4,) and losses[-1] < losses[0]
    same, _ = adapt(net, x, y, loss_fn=loss, inner_optimizer=optax.sgd(0.1), num_steps=0)
    np.testing.assert_array_equal(ravel_pytree(same)[0], ravel_pytree(net)[0])


def test_adapt_leaves_batch_norm_at_theta(rng_key):
    k1, k2 = jax.random.split(rng_key)
    net = Conv4(2, filters=3, image_size=8, num_blocks=2, key=k1)
    net = eqx.tree_at(lambda n: n.norms[0].scale, net, jnp.full(3, 1.5))
    x = jax.random.normal(k2, (4, 8, 8, 1))
    y = jnp.array([0, 1, 0, 1])
    loss = nll_loss(lambda n, x: n(x), lambda f: dist.Categorical(logits=f))
    phi, _ = eqx.filter_jit(adapt)(net, x, y, loss_fn=loss, inner_optimizer=optax.sgd(0.5), num_steps=2)
    np.testing.assert_array_equal(phi.norms[0].scale, net.norms[0].scale)
    assert not np.allclose(phi.convs[0].weight, net.convs[0].weight)


# ------------------------------------------------------------------ meta-gradients


def test_second_order_meta_gradient_matches_finite_differences(sine_tasks):
    with jax.enable_x64(True):
        net, tasks = to64(sine_tasks)
        objective = ml_point(mse_loss(L.vmap_apply), optax.sgd(0.05), 2)
        f, flat = flat_fn(objective, net, tasks)
        check_fd(f, flat, jax.random.key(3), rtol=1e-6)


def test_first_order_meta_gradient_is_query_gradient_at_phi(sine_tasks):
    net, tasks = sine_tasks
    loss = mse_loss(L.vmap_apply)
    objective = ml_point(loss, optax.sgd(0.05), 2, first_order=True)
    grads, _ = jax.jit(jax.grad(objective, has_aux=True))(net, jax.random.key(0), tasks)

    @jax.jit
    def query_grad(sx, sy, qx, qy):
        phi, _ = adapt(net, sx, sy, loss_fn=loss, inner_optimizer=optax.sgd(0.05), num_steps=2)
        return ravel_pytree(jax.grad(loss)(phi, qx, qy))[0]

    expected = jax.vmap(query_grad)(*tasks).mean(0)
    np.testing.assert_allclose(ravel_pytree(grads)[0], expected, rtol=1e-5, atol=1e-7)
    # and differs from the second-order gradient
    second, _ = jax.jit(jax.grad(ml_point(loss, optax.sgd(0.05), 2), has_aux=True))(net, jax.random.key(0), tasks)
    assert not np.allclose(ravel_pytree(second)[0], ravel_pytree(grads)[0], rtol=1e-3)


@pytest.mark.parametrize("kron_damping", ["exact", "factored"])
def test_ml_laplace_meta_gradient_through_log_det_matches_finite_differences(sine_tasks, kron_damping):
    with jax.enable_x64(True):
        net, tasks = to64(sine_tasks)
        posterior_fn = functools.partial(
            L.laplace, apply_fn=L.vmap_apply, likelihood=gaussian, structure="kfac", prior_precision=1e-2
        )
        # eta = 1 so that the log-det term dominates what is checked
        objective = ml_laplace(
            mse_loss(L.vmap_apply),
            optax.sgd(0.05),
            2,
            posterior_fn,
            eta=1.0,
            log_det_fn=functools.partial(L.log_det, kron_damping=kron_damping),
        )
        f, flat = flat_fn(objective, net, tasks)
        check_fd(f, flat, jax.random.key(4), rtol=1e-5)


def test_ml_laplace_is_ml_point_plus_half_eta_log_det(sine_tasks):
    net, tasks = sine_tasks
    loss = mse_loss(L.vmap_apply)
    posterior_fn = functools.partial(
        L.laplace, apply_fn=L.vmap_apply, likelihood=gaussian, structure="kfac", prior_precision=1e-3
    )
    point, aux_p = jax.jit(ml_point(loss, optax.sgd(0.05), 1))(net, jax.random.key(0), tasks)
    lap, aux_l = jax.jit(ml_laplace(loss, optax.sgd(0.05), 1, posterior_fn, eta=0.01))(net, jax.random.key(0), tasks)
    np.testing.assert_allclose(lap, point + 0.01 * 0.5 * aux_l.log_det, rtol=1e-5)
    np.testing.assert_allclose(aux_l.query_loss, aux_p.query_loss, rtol=1e-6)
    zero, _ = jax.jit(ml_laplace(loss, optax.sgd(0.05), 1, posterior_fn, eta=0.0))(net, jax.random.key(0), tasks)
    np.testing.assert_allclose(zero, point, rtol=1e-6)


def test_meta_step_traces_once_and_learns(sine_tasks):
    net, tasks = sine_tasks
    traces = []
    objective = ml_point(mse_loss(L.vmap_apply), optax.sgd(0.05), 1)

    def counted(params, key, batch):
        traces.append(1)
        return objective(params, key, batch)

    learner = meta_learner(counted, optax.adam(1e-2), has_aux=True)
    step = jax.jit(learner.step)
    state = learner.init(net)
    losses = []
    for i in range(30):
        state, info = step(jax.random.key(i), state, tasks)
        losses.append(float(info.loss))
    assert len(traces) == 1
    assert losses[-1] < losses[0]


def test_objective_vmaps_over_tasks_like_a_loop(sine_tasks):
    net, tasks = sine_tasks
    objective = jax.jit(ml_point(mse_loss(L.vmap_apply), optax.sgd(0.05), 2))
    total, _ = objective(net, jax.random.key(0), tasks)
    singles = [objective(net, jax.random.key(0), jax.tree.map(lambda a: a[j : j + 1], tasks))[0] for j in range(3)]
    np.testing.assert_allclose(total, np.mean(singles), rtol=1e-5)


# ------------------------------------------------------------------ the model


def test_model_sites_shapes(sine_tasks):
    net, tasks = sine_tasks
    kwargs = dict(net=net, apply_fn=L.vmap_apply, likelihood=gaussian, prior_precision=4.0)
    with handlers.seed(rng_seed=0):
        tr = handlers.trace(maml_model).get_trace(tasks.support_x, tasks.support_y, tasks.query_x, None, **kwargs)
    names = phi_site_names(net)
    assert names == ["phi.layers[0].weight", "phi.layers[0].bias", "phi.layers[1].weight", "phi.layers[1].bias"]
    leaves = jax.tree.leaves(eqx.filter(net, eqx.is_array))
    for name, leaf in zip(names, leaves):
        site = tr[name]
        assert site["fn"].batch_shape == (3, 1) and site["fn"].event_shape == leaf.shape
        assert site["value"].shape == (3, 1, *leaf.shape)
        np.testing.assert_allclose(site["fn"].variance, 0.25)
    assert tr["y_support"]["fn"].batch_shape == (3, 4) and tr["y_support"]["is_observed"]
    assert tr["y_query"]["fn"].batch_shape == (3, 5) and not tr["y_query"]["is_observed"]
    assert tr["theta$params"]["type"] == "param"
    assert [f.name for f in tr["y_support"]["cond_indep_stack"]] == ["examples", "tasks"] or {
        f.name for f in tr["y_support"]["cond_indep_stack"]
    } == {"examples", "tasks"}


def test_model_log_density_matches_the_objectives_terms(sine_tasks):
    # log p(y, phi | theta) from the NumPyro program equals the Gaussian prior plus the
    # support and query log-likelihoods that inference/maml.py optimises.
    net, tasks = sine_tasks
    kwargs = dict(net=net, apply_fn=L.vmap_apply, likelihood=gaussian, prior_precision=4.0)
    phis = {}
    for j in range(3):
        phi, _ = adapt(
            net,
            tasks.support_x[j],
            tasks.support_y[j],
            loss_fn=mse_loss(L.vmap_apply),
            inner_optimizer=optax.sgd(0.05),
            num_steps=2,
        )
        phis[j] = phi
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[eqx.filter(phis[j], eqx.is_array) for j in range(3)])
    values = {n: leaf[:, None] for n, leaf in zip(phi_site_names(net), jax.tree.leaves(stacked))}
    logp, _ = log_density(maml_model, (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y), kwargs, values)
    nll = nll_loss(L.vmap_apply, gaussian)
    expected = 0.0
    theta = ravel_pytree(eqx.filter(net, eqx.is_array))[0]
    for j in range(3):
        v = ravel_pytree(eqx.filter(phis[j], eqx.is_array))[0]
        expected += jnp.sum(jax.scipy.stats.norm.logpdf(v, theta, 0.5))
        expected -= 4 * nll(phis[j], tasks.support_x[j], tasks.support_y[j])
        expected -= 5 * nll(phis[j], tasks.query_x[j], tasks.query_y[j])
    np.testing.assert_allclose(logp, expected, rtol=1e-5)
    nets = task_networks(net, values)
    f = jax.vmap(lambda p, x: L.vmap_apply(eqx.combine(p, eqx.filter(net, eqx.is_array, inverse=True)), x))(
        eqx.filter(nets, eqx.is_array), tasks.query_x
    )
    assert f.shape == (3, 5, 1)


def test_model_prior_predictive_runs_with_conv_net(rng_key):
    k1, k2 = jax.random.split(rng_key)
    net = Conv4(3, filters=2, image_size=8, num_blocks=2, key=k1)
    x = jax.random.normal(k2, (2, 6, 8, 8, 1))
    with handlers.seed(rng_seed=1):
        tr = handlers.trace(maml_model).get_trace(
            x, None, net=net, apply_fn=lambda n, x: n(x), likelihood=lambda f: dist.Categorical(logits=f)
        )
    assert tr["y_support"]["value"].shape == (2, 6)
    assert "phi.norms[0].scale" not in tr  # batch norm is shared, not task-specific


def test_model_filter_agrees_with_laplace_filter(rng_key):
    net = Conv4(3, filters=2, image_size=8, num_blocks=2, key=rng_key)
    assert jax.tree.leaves(task_specific_filter(net)) == jax.tree.leaves(L.laplace_filter(net))
