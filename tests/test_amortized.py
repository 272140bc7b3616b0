"""The amortized LSTM guide, the Bayesian classifier it serves, and their protocol.

Dense cases use a small MLP classifier (fast to compile); conv cases use Conv4 at a
tiny width. The whole meta-step is traced once under jit (counted at trace time, the
check ``chex.assert_max_traces`` makes).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import Predictive, Trace_ELBO

from metaprior.inference.flipout import categorical_expected_log_lik, flipout, shared_sample
from metaprior.inference.guides.amortized import (
    AmortizedInference,
    AmortizedLSTMGuide,
    AmortizedParams,
    GaussianLayers,
    amortized_meta_loss,
    episode_predictions,
    gaussian_kl,
    negative_elbo,
    numpyro_guide,
    refine,
    standard_normal,
    task_posterior,
)
from metaprior.inference.meta import meta_learner
from metaprior.models.bayes_classifier import (
    bayes_classifier,
    conv4_forward,
    mlp_forward,
    shared_params,
    weight_layers,
    weight_site_names,
)
from metaprior.models.nets import MLP, Conv4

WAYS, SHOTS, QUERIES, FEATURES = 3, 2, 4, 6


class Episodes(NamedTuple):
    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array


class BatchMLP(eqx.Module):
    """An embedding network on a batch: ``[N, in] -> [N, out]``."""

    mlp: MLP

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)


def _dense_setup(key, ways=WAYS):
    k_net, k_embed, k_guide = jax.random.split(key, 3)
    net = MLP(FEATURES, ways, (8,), key=k_net)
    embed = BatchMLP(MLP(FEATURES, 5, (8,), key=k_embed))
    guide = AmortizedLSTMGuide(
        weight_layers(net), embed, num_classes=ways, input_shape=(FEATURES,), key=k_guide, hidden_size=16, noise_size=4
    )
    return net, guide


def _conv_setup(key, ways=WAYS):
    k_net, k_embed, k_guide = jax.random.split(key, 3)
    net = Conv4(ways, filters=3, key=k_net)
    guide = AmortizedLSTMGuide(
        weight_layers(net),
        Conv4(None, filters=3, key=k_embed),
        num_classes=ways,
        input_shape=(28, 28, 1),
        key=k_guide,
        hidden_size=16,
        noise_size=4,
    )
    return net, guide


def _episodes(key, num_tasks, item_shape, ways=WAYS):
    k_s, k_q = jax.random.split(key)
    labels = lambda n: jnp.broadcast_to(jnp.repeat(jnp.arange(ways), n), (num_tasks, ways * n))
    return Episodes(
        jax.random.normal(k_s, (num_tasks, ways * SHOTS, *item_shape)),
        labels(SHOTS),
        jax.random.normal(k_q, (num_tasks, ways * QUERIES, *item_shape)),
        labels(QUERIES),
    )


def _inference(net, forward, num_inner_steps=2, estimator=flipout, beta=0.1):
    return AmortizedInference(
        categorical_expected_log_lik(forward, estimator),
        standard_normal(weight_layers(net)),
        beta,
        optax.sgd(0.1),
        num_inner_steps,
    )


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "setup, item", [(_dense_setup, (FEATURES,)), (_conv_setup, (28, 28, 1))], ids=["dense", "conv"]
)
def test_guide_output_matches_the_weight_pytree(setup, item, rng_key):
    net, guide = setup(rng_key)
    episodes = _episodes(rng_key, 1, item)
    q = eqx.filter_jit(guide)(rng_key, episodes.support_x[0], episodes.support_y[0])
    layers = weight_layers(net)
    for tree in (q.loc, q.log_var):
        assert jax.tree.structure(tree) == jax.tree.structure(layers)
        assert [a.shape for a in jax.tree.leaves(tree)] == [a.shape for a in jax.tree.leaves(layers)]
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(tree))
    # The heads start near the template: means close to its weights, log-variances at init.
    for a, b in zip(jax.tree.leaves(q.loc), jax.tree.leaves(layers)):
        np.testing.assert_allclose(a, b, atol=0.2)
    # The layers the guide emits run in the network's own layered forward.
    forward = mlp_forward if isinstance(net, MLP) else conv4_forward
    logits = forward(net, episodes.query_x[0], lambda i, h: jax.vmap(q.loc[i])(h))
    assert logits.shape == (WAYS * QUERIES, WAYS)


def test_guide_is_a_function_of_the_noise(rng_key):
    net, guide = _dense_setup(rng_key)
    e = _episodes(rng_key, 1, (FEATURES,))
    a = guide(jax.random.key(1), e.support_x[0], e.support_y[0])
    b = guide(jax.random.key(1), e.support_x[0], e.support_y[0])
    c = guide(jax.random.key(2), e.support_x[0], e.support_y[0])
    assert all(jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not all(jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


# ------------------------------------------------------------------------------ encoding


@pytest.mark.parametrize(
    "setup, item", [(_dense_setup, (FEATURES,)), (_conv_setup, (28, 28, 1))], ids=["dense", "conv"]
)
def test_support_encoding_is_invariant_to_the_order_within_a_class(setup, item, rng_key):
    _, guide = setup(rng_key)
    e = _episodes(rng_key, 1, item)
    x, y = e.support_x[0], e.support_y[0]
    base = guide.encode(x, y)
    assert base.ndim == 1
    # Shuffle the examples (each keeps its label): within every class the order changes.
    perm = jax.random.permutation(jax.random.key(3), x.shape[0])
    assert not jnp.array_equal(perm, jnp.arange(x.shape[0]))
    np.testing.assert_allclose(guide.encode(x[perm], y[perm]), base, rtol=1e-5, atol=1e-5)
    # ... and so is the whole guide given the same noise.
    q0, q1 = guide(rng_key, x, y), guide(rng_key, x[perm], y[perm])
    for a, b in zip(jax.tree.leaves(q0), jax.tree.leaves(q1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Relabelling classes permutes the per-class blocks (labels matter, order within does not).
    swap = jnp.array([1, 0, 2])
    blocks = base.reshape(WAYS, -1)
    np.testing.assert_allclose(guide.encode(x, swap[y]).reshape(WAYS, -1), blocks[swap.argsort()], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ objective


def test_gaussian_kl_matches_numpyro(rng_key):
    k1, k2, k3, k4 = jax.random.split(rng_key, 4)
    shape = (3, 4)
    q = GaussianLayers((jax.random.normal(k1, shape),), (jax.random.normal(k2, shape),))
    p = GaussianLayers((jax.random.normal(k3, shape),), (jax.random.normal(k4, shape),))
    expected = dist.kl_divergence(dist.Normal(q.loc[0], q.scale[0]), dist.Normal(p.loc[0], p.scale[0])).sum()
    np.testing.assert_allclose(gaussian_kl(q, p), expected, rtol=1e-5)
    assert abs(float(gaussian_kl(q, q))) < 1e-5


def test_refine_lowers_the_support_loss(rng_key):
    net, guide = _dense_setup(rng_key)
    e = _episodes(rng_key, 1, (FEATURES,))
    inference = _inference(net, mlp_forward, estimator=shared_sample)
    params = AmortizedParams(guide, net)
    q0 = guide(rng_key, e.support_x[0], e.support_y[0])
    loss = lambda k, q: negative_elbo(
        jax.random.key(7),
        q,
        e.support_x[0],
        e.support_y[0],
        expected_log_lik=inference.expected_log_lik,
        model_params=net,
        prior=inference.prior,
        beta=0.1,
    )[0]
    assert refine(rng_key, q0, loss, optax.sgd(0.1), 0) is q0
    q5 = refine(rng_key, q0, loss, optax.sgd(0.1), 5)
    assert loss(None, q5) < loss(None, q0)
    # task_posterior is the guide followed by the same refinement.
    qt = task_posterior(rng_key, params, e.support_x[0], e.support_y[0], inference._replace(num_inner_steps=0))
    assert jax.tree.structure(qt) == jax.tree.structure(q0)


@pytest.mark.parametrize("task_batch_size", [None, 1])
def test_meta_step_traces_once_under_jit(task_batch_size, rng_key):
    """The whole meta-step (guide, 2 inner steps with Flipout, query ELBO, Adam update)
    compiles once and reruns for new keys and batches without retracing."""
    net, guide = _dense_setup(rng_key)
    params = AmortizedParams(guide, shared_params(net))
    loss = amortized_meta_loss(_inference(net, mlp_forward), task_batch_size=task_batch_size)
    traces = []

    def counted(params, key, batch):
        traces.append(1)
        return loss(params, key, batch)

    learner = meta_learner(counted, optax.adam(1e-2), has_aux=True)
    step = jax.jit(learner.step)
    state = learner.init(params)
    losses = []
    for i in range(3):
        batch = _episodes(jax.random.key(10 + i), 4, (FEATURES,))
        state, info = step(jax.random.key(i), state, batch)
        losses.append(float(info.loss))
    assert len(traces) == 1
    assert np.all(np.isfinite(losses)) and int(state.step) == 3
    assert info.aux.kl > 0


def test_vmap_and_sequential_tasks_agree(rng_key):
    net, guide = _dense_setup(rng_key)
    params = AmortizedParams(guide, shared_params(net))
    inference = _inference(net, mlp_forward)
    batch = _episodes(rng_key, 3, (FEATURES,))
    a = jax.jit(amortized_meta_loss(inference))(params, rng_key, batch)[0]
    b = jax.jit(amortized_meta_loss(inference, task_batch_size=1))(params, rng_key, batch)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_meta_training_improves_the_query_likelihood(rng_key):
    """Tasks whose label is a task-specific linear function of the inputs: a few dozen
    meta-steps lower the query loss (a smoke test of the gradients, not a benchmark)."""
    net, guide = _dense_setup(rng_key)
    params = AmortizedParams(guide, shared_params(net))
    loss = amortized_meta_loss(_inference(net, mlp_forward, beta=1e-3))
    learner = meta_learner(loss, optax.adam(3e-3), has_aux=True)

    def batch(key):
        k_w, k_s, k_q = jax.random.split(key, 3)
        w = jax.random.normal(k_w, (8, FEATURES, WAYS))
        xs = jax.random.normal(k_s, (8, WAYS * SHOTS, FEATURES))
        xq = jax.random.normal(k_q, (8, WAYS * QUERIES, FEATURES))
        label = lambda x: jnp.argmax(jnp.einsum("tnf,tfk->tnk", x, w), -1)
        return Episodes(xs, label(xs), xq, label(xq))

    step = jax.jit(learner.step)
    state = learner.init(params)
    first = []
    for i in range(60):
        state, info = step(jax.random.key(i), state, batch(jax.random.key(1000 + i)))
        first.append(float(info.aux.query_nll))
    assert np.mean(first[-10:]) < np.mean(first[:10])


def test_learned_prior_receives_gradients(rng_key):
    net, guide = _dense_setup(rng_key)
    prior = standard_normal(weight_layers(net))
    params = AmortizedParams(guide, shared_params(net), prior)
    loss = amortized_meta_loss(_inference(net, mlp_forward))
    batch = _episodes(rng_key, 2, (FEATURES,))
    grads = jax.jit(jax.grad(lambda p: loss(p, rng_key, batch)[0]))(params)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads.prior))


def test_episode_predictions_are_probabilities(rng_key):
    net, guide = _dense_setup(rng_key)
    params = AmortizedParams(guide, shared_params(net))
    e = _episodes(rng_key, 2, (FEATURES,))
    logits_fn = lambda model, layers, x: mlp_forward(model, x, lambda i, h: jax.vmap(layers[i])(h))
    probs = jax.jit(
        lambda p, e: episode_predictions(rng_key, p, e, _inference(net, mlp_forward), logits_fn, num_samples=3)
    )(params, e)
    assert probs.shape == (2, WAYS * QUERIES, WAYS)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # Several numbers of inner steps in one pass: [steps, tasks, queries, classes].
    several = jax.jit(
        lambda p, e: episode_predictions(
            rng_key, p, e, _inference(net, mlp_forward), logits_fn, num_samples=3, inner_steps=(0, 2)
        )
    )(params, e)
    assert several.shape == (2, 2, WAYS * QUERIES, WAYS)
    np.testing.assert_allclose(several.sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(several[0], several[1])


# ------------------------------------------------------------------------------ NumPyro


def test_bayes_classifier_sites(rng_key):
    net = Conv4(WAYS, filters=3, key=rng_key)
    x = jax.random.normal(rng_key, (2, 4, 28, 28, 1))
    trace = numpyro.handlers.trace(numpyro.handlers.seed(bayes_classifier, 0)).get_trace(x, net=net)
    for layer, names in zip(weight_layers(net), weight_site_names(weight_layers(net))):
        for name, leaf in zip(names, jax.tree.leaves(layer)):
            assert trace[name]["fn"].batch_shape == (2, 1)
            assert trace[name]["fn"].event_shape == leaf.shape
    assert trace["y"]["fn"].batch_shape == (2, 4)
    assert trace["y"]["value"].shape == (2, 4)
    assert trace["logits"]["value"].shape == (2, 4, WAYS)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_layered_forwards_match_the_networks(kind, rng_key):
    if kind == "dense":
        net, forward = MLP(FEATURES, WAYS, (8, 8), key=rng_key), mlp_forward
        x = jax.random.normal(rng_key, (5, FEATURES))
        expected = jax.vmap(net)(x)
    else:
        net, forward = Conv4(WAYS, filters=3, key=rng_key), conv4_forward
        x = jax.random.normal(rng_key, (5, 28, 28, 1))
        expected = net(x)
    layers = weight_layers(net)
    out = forward(shared_params(net), x, lambda i, h: jax.vmap(layers[i])(h))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_numpyro_guide_matches_the_model_and_its_elbo(rng_key):
    """The guide adapter samples exactly the model's weight sites, and NumPyro's
    Trace_ELBO of (model, guide) agrees with negative_elbo at beta = 1.

    With log-variance -20 the likelihood term is deterministic to ~1e-4 nats; Trace_ELBO's
    Monte Carlo log p(w) - log q(w) has standard deviation about sqrt(D / 2) = 8 nats per
    particle for D = 2 tasks x 67 weights, so with 2000 particles its standard error is
    0.18 nats: the tolerance of 1 nat is 5.5 standard errors (seeded).
    """
    net = MLP(FEATURES, WAYS, (8,), key=rng_key)
    layers = weight_layers(net)
    k_loc, k_data = jax.random.split(rng_key)
    loc = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(k_loc, a.shape), layers)
    q_task = GaussianLayers(loc, jax.tree.map(lambda a: jnp.full_like(a, -20.0), layers))
    q = jax.tree.map(lambda a: jnp.stack([a, a]), q_task)  # 2 tasks
    e = _episodes(k_data, 2, (FEATURES,))
    names = weight_site_names(layers)
    guide = numpyro_guide(q, names)

    draws = Predictive(guide, num_samples=3)(rng_key)
    assert set(draws) == {n for layer in names for n in layer}
    assert draws["layer0.weight"].shape == (3, 2, 1, 8, FEATURES)
    pred = Predictive(bayes_classifier, posterior_samples=draws)(rng_key, e.query_x, net=net)
    assert pred["y"].shape == (3, 2, WAYS * QUERIES)

    elbo = Trace_ELBO(num_particles=2000).loss(rng_key, {}, bayes_classifier, guide, e.query_x, e.query_y, net=net)
    ell = categorical_expected_log_lik(mlp_forward, shared_sample)
    ours = 0.0
    for t in range(2):
        loss, _ = negative_elbo(
            rng_key,
            q_task,
            e.query_x[t],
            e.query_y[t],
            expected_log_lik=ell,
            model_params=net,
            prior=standard_normal(layers),
            beta=1.0,
        )
        ours += float(loss) * e.query_x.shape[1]
    assert abs(float(elbo) - ours) < 1.0
