"""SIB: the synthetic-gradient inner loop (inference) and the empirical-Bayes model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from metaprior.data import Episodes, sample_episodes
from metaprior.inference.meta import meta_learner
from metaprior.inference.sib import sib_guide, sib_loss, sib_posterior, sib_predict, support_initializer
from metaprior.inference.synthetic_gradients import (
    DiagGaussian,
    diag_gaussian_kl,
    reparameterize,
    run_synthetic_gradient_vi,
    sample_noise,
    synthetic_gradient_vi,
)
from metaprior.models.nets import Conv4
from metaprior.models.sib import (
    SyntheticGradientNet,
    cosine_logits,
    embed_classes,
    init_sib_params,
    pretrain_loss,
    sample_classification_batch,
    sib_model,
)

WAYS, SHOTS, QUERIES, FEATURES, TASKS = 3, 2, 4, 6, 5


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def episodes(rng_key) -> Episodes:
    """Feature-space episodes: ``[classes=8, examples=10, FEATURES]`` clustered by class."""
    k_centers, k_noise, k_sample = jax.random.split(rng_key, 3)
    centers = jax.random.normal(k_centers, (8, 1, FEATURES))
    features = centers + 0.5 * jax.random.normal(k_noise, (8, 10, FEATURES))
    return sample_episodes(k_sample, features, TASKS, WAYS, SHOTS, QUERIES)


@pytest.fixture
def params(rng_key):
    """SIB parameters with a non-zero ``xi`` (its output layer starts at zero)."""
    p = init_sib_params(jax.random.fold_in(rng_key, 1), FEATURES, WAYS)
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.fold_in(rng_key, 2), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _linear_problem(rng_key, num_examples=7, num_in=4, num_out=3):
    """A small non-classifier problem: ``y_hat = x @ W + b`` with ``w = {"W", "b"}``."""
    kx, ky, km, kp = jax.random.split(rng_key, 4)
    x = jax.random.normal(kx, (num_examples, num_in))
    y = jax.random.randint(ky, (num_examples,), 0, num_out)
    shapes = {"W": (num_in, num_out), "b": (num_out,)}
    q0 = DiagGaussian(
        {k: 0.3 * jax.random.normal(jax.random.fold_in(km, i), s) for i, (k, s) in enumerate(shapes.items())},
        {k: jnp.full(s, -1.0, jnp.float32) for k, s in shapes.items()},
    )
    prior = DiagGaussian(
        {k: 0.1 * jax.random.normal(jax.random.fold_in(kp, i), s) for i, (k, s) in enumerate(shapes.items())},
        {"W": jnp.full(shapes["W"], -0.5, jnp.float32), "b": jnp.zeros((), jnp.float32)},  # "b" broadcasts
    )
    return x, y, q0, prior


def _predict_linear(w, x):
    return x @ w["W"] + w["b"]


def _nll(logits, y):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _true_gradient(y):
    """``xi`` replaced by the exact gradient of the summed query NLL w.r.t. the logits."""
    return lambda logits: jax.nn.softmax(logits, -1) - jax.nn.one_hot(y, logits.shape[-1])


# ------------------------------------------------------------------ inference: identities


def test_zero_steps_returns_the_initialiser(rng_key):
    x, _, q0, prior = _linear_problem(rng_key)
    xi = lambda logits: logits  # anything: it must not be used
    alg = synthetic_gradient_vi(_predict_linear, xi, lambda ctx: ctx, prior, optax.sgd(0.1))
    posterior, info = run_synthetic_gradient_vi(rng_key, alg, q0, x, 0)
    assert info.kl.shape == (0,)
    for got, want in zip(jax.tree.leaves(posterior), jax.tree.leaves(q0)):
        np.testing.assert_array_equal(got, want)


def test_sib_zero_steps_posterior_mean_is_lambda_of_support(rng_key, params, episodes):
    post = sib_posterior(rng_key, params, episodes, num_ways=WAYS, num_steps=0, inner_optimizer=optax.sgd(0.1))
    want = jax.vmap(lambda sx, sy: support_initializer(params, sx, sy, WAYS))(episodes.support_x, episodes.support_y)
    assert post.loc.shape == (TASKS, WAYS, FEATURES)
    np.testing.assert_array_equal(post.loc, want.loc)
    np.testing.assert_array_equal(post.log_scale, want.log_scale)
    # lambda is the per-class mean of the normalised support features, scaled per dimension.
    sx, sy = episodes.support_x[0], episodes.support_y[0]
    f = sx / jnp.linalg.norm(sx, axis=-1, keepdims=True) * np.sqrt(FEATURES)
    means = jnp.stack([f[sy == k].mean(0) for k in range(WAYS)])
    np.testing.assert_allclose(post.loc[0], params.init_scale * means, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_samples", [1, 4])
def test_true_gradient_recovers_gradient_descent_on_the_elbo(rng_key, num_samples):
    """With ``xi`` = the exact d(NLL)/d(y_hat), equation (9) is SGD on the negative ELBO."""
    x, y, q0, prior = _linear_problem(rng_key)
    eta, num_steps = 0.05, 3
    alg = synthetic_gradient_vi(
        _predict_linear, _true_gradient(y), lambda ctx: ctx, prior, optax.sgd(eta), num_samples=num_samples
    )
    got, info = run_synthetic_gradient_vi(rng_key, alg, q0, x, num_steps)

    def negative_elbo(theta, eps):  # the same reparameterised estimate, written directly
        nll = jax.vmap(lambda e: _nll(_predict_linear(reparameterize(theta, e), x), y))(eps)
        return jnp.mean(nll) + diag_gaussian_kl(theta, prior)

    theta = q0
    for t in range(num_steps):
        eps = sample_noise(jax.random.fold_in(rng_key, t), theta, num_samples)
        grad = jax.grad(negative_elbo)(theta, eps)
        theta = jax.tree.map(lambda a, g: a - eta * g, theta, grad)
    # float32 arithmetic in a different order (vjp of the predictions vs grad of the
    # loss): agreement to a few ulps of values of size ~1.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(theta)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert info.kl.shape == (num_steps,) and bool(jnp.all(info.kl > 0))
    # and the steps did something
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(q0)[0])


def test_true_gradient_identity_on_the_sib_classifier(rng_key, params, episodes):
    """The same identity through :func:`sib_posterior`'s pieces (cosine classifier)."""
    sx, sy, qx, qy = (a[0] for a in episodes)
    prior = DiagGaussian(params.prior_loc, params.prior_log_scale)
    predict = lambda w, f: cosine_logits(w, f, params.log_logit_scale)
    init = lambda s: support_initializer(params, *s, WAYS)
    alg = synthetic_gradient_vi(predict, _true_gradient(qy), init, prior, optax.sgd(0.02))
    got, _ = run_synthetic_gradient_vi(rng_key, alg, (sx, sy), qx, 1)
    q0 = init((sx, sy))
    eps = sample_noise(jax.random.fold_in(rng_key, 0), q0, 1)
    loss = lambda th: (
        _nll(predict(reparameterize(th, jax.tree.map(lambda e: e[0], eps)), qx), qy) + diag_gaussian_kl(th, prior)
    )
    want = jax.tree.map(lambda a, g: a - 0.02 * g, q0, jax.grad(loss)(q0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ inference: KL


def test_kl_matches_numpyro_closed_form(rng_key):
    _, _, q, p = _linear_problem(rng_key)
    want = sum(
        jnp.sum(dist.kl_divergence(dist.Normal(mq, jnp.exp(lq)), dist.Normal(*jnp.broadcast_arrays(mp, jnp.exp(lp)))))
        for mq, lq, mp, lp in zip(
            *(jax.tree.leaves(t) for t in (q.loc, q.log_scale, p.loc)),
            [p.log_scale["W"], jnp.broadcast_to(p.log_scale["b"], (3,))],
        )
    )
    np.testing.assert_allclose(diag_gaussian_kl(q, p), want, rtol=1e-5)


def test_kl_matches_monte_carlo(rng_key):
    """``E_q[log q(w) - log p(w)]`` from 200,000 draws (seeded)."""
    k_q, k_p, k_s = jax.random.split(rng_key, 3)
    q = DiagGaussian(jax.random.normal(k_q, (2, 3)), jnp.linspace(-1.0, 0.5, 6).reshape(2, 3))
    p = DiagGaussian(0.5 * jax.random.normal(k_p, (3,)), jnp.array([0.2, -0.3, 0.0]))  # broadcasts
    w = reparameterize(q, sample_noise(k_s, q, 200_000))  # [N, 2, 3] by broadcasting
    log_q = dist.Normal(q.loc, jnp.exp(q.log_scale)).log_prob(w).sum((-2, -1))
    log_p = dist.Normal(p.loc, jnp.exp(p.log_scale)).log_prob(w).sum((-2, -1))
    ratio = np.asarray(log_q - log_p, np.float64)
    mc, se = ratio.mean(), ratio.std(ddof=1) / np.sqrt(ratio.size)
    exact = float(diag_gaussian_kl(q, p))
    # The MC mean is unbiased with standard error `se` (about 0.005 here); 4 standard
    # errors fails a correct implementation with probability < 1e-4, and an error in
    # any term of the closed form (e.g. a missing 1/2 or the variance ratio) moves the
    # value by far more.
    assert abs(mc - exact) < 4 * se, (mc, exact, se)
    assert se < 0.02


# ------------------------------------------------------------------ jit: traces once


def test_inner_step_traces_once_under_jit(rng_key):
    x, y, q0, prior = _linear_problem(rng_key)
    alg = synthetic_gradient_vi(
        _predict_linear, _true_gradient(y), lambda ctx: ctx, prior, optax.sgd(0.1), num_samples=2
    )
    traces = 0

    def counted(key, state, inputs):
        nonlocal traces
        traces += 1
        return alg.step(key, state, inputs)

    step = jax.jit(counted)
    state = alg.init(q0)
    for i in range(3):
        state, info = step(jax.random.fold_in(rng_key, i), state, x + i)
    jax.block_until_ready(state)
    assert traces == 1
    assert int(state.step) == 3 and info.kl.shape == ()


def test_sib_meta_step_traces_once_under_jit(rng_key, params, episodes):
    loss = functools.partial(sib_loss, num_ways=WAYS, num_steps=2, inner_optimizer=optax.sgd(0.1))
    learner = meta_learner(loss, optax.adam(1e-3))
    traces = 0

    def counted(key, state, batch):
        nonlocal traces
        traces += 1
        return learner.step(key, state, batch)

    step = jax.jit(counted)
    state = learner.init(params)
    for i in range(3):
        batch = episodes._replace(query_x=episodes.query_x + 0.01 * i)
        state, info = step(jax.random.fold_in(rng_key, i), state, batch)
    assert traces == 1
    assert np.isfinite(float(info.loss))


# ------------------------------------------------------------------ the model


def test_model_and_guide_site_shapes(rng_key, params, episodes):
    model_trace = numpyro.handlers.trace(numpyro.handlers.seed(sib_model, rng_key)).get_trace(
        params, episodes, num_ways=WAYS
    )
    n = WAYS * QUERIES
    assert model_trace["w"]["value"].shape == (TASKS, 1, WAYS, FEATURES)
    assert model_trace["w"]["fn"].event_shape == (WAYS, FEATURES)
    assert model_trace["w"]["fn"].batch_shape == (TASKS, 1)
    assert model_trace["y"]["fn"].batch_shape == (TASKS, n) and model_trace["y"]["is_observed"]
    assert model_trace["probs"]["value"].shape == (TASKS, n, WAYS)
    assert {f.name: f.dim for f in model_trace["y"]["cond_indep_stack"]} == {"tasks": -2, "examples": -1}
    guide_trace = numpyro.handlers.trace(numpyro.handlers.seed(sib_guide, rng_key)).get_trace(
        params, episodes, num_ways=WAYS, num_steps=1, inner_optimizer=optax.sgd(0.1)
    )
    assert guide_trace["w"]["fn"].batch_shape == (TASKS, 1)
    assert guide_trace["w"]["fn"].event_shape == (WAYS, FEATURES)
    # unobserved labels: the model is its own prior predictive
    prior_trace = numpyro.handlers.trace(numpyro.handlers.seed(sib_model, rng_key)).get_trace(
        params, episodes._replace(query_y=None), num_ways=WAYS
    )
    assert not prior_trace["y"]["is_observed"] and prior_trace["y"]["value"].shape == (TASKS, n)


@pytest.mark.parametrize("query_norm", [True, False])
def test_xi_is_permutation_equivariant_over_queries(rng_key, query_norm):
    # Exact invariance: relabelling the queries relabels xi's outputs the same way.
    k_net, k_pert, k_x, k_perm = jax.random.split(rng_key, 4)
    xi = SyntheticGradientNet(WAYS, 8 * WAYS, query_norm=query_norm, key=k_net)
    np.testing.assert_array_equal(xi(jnp.ones((4, WAYS))), 0.0)  # output layer starts at zero
    leaves, treedef = jax.tree.flatten(xi)
    keys = jax.random.split(k_pert, len(leaves))
    xi = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    logits = 3.0 * jax.random.normal(k_x, (9, WAYS))
    perm = jax.random.permutation(k_perm, 9)
    np.testing.assert_allclose(xi(logits[perm]), xi(logits)[perm], rtol=1e-5, atol=1e-6)
    # With query_norm a query's estimate depends on the rest of the set; without, it does not.
    alone = xi(logits[:1])[0]
    in_set = xi(logits)[0]
    if query_norm:
        assert float(jnp.max(jnp.abs(alone - in_set))) > 1e-3
    else:
        np.testing.assert_allclose(alone, in_set, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="queries, ways"):
        xi(logits[0])


def test_posterior_never_reads_query_labels(rng_key, params, episodes):
    kwargs = dict(num_ways=WAYS, num_steps=3, inner_optimizer=optax.sgd(0.1))
    a = sib_posterior(rng_key, params, episodes, **kwargs)
    b = sib_posterior(rng_key, params, episodes._replace(query_y=None), **kwargs)
    np.testing.assert_array_equal(a.loc, b.loc)


def test_loss_gradients_reach_xi_only_with_steps(rng_key, params, episodes):
    for num_steps in (0, 2):
        loss = functools.partial(sib_loss, num_ways=WAYS, num_steps=num_steps, inner_optimizer=optax.sgd(0.1))
        value, grad = jax.value_and_grad(loss)(params, rng_key, episodes)
        assert np.isfinite(float(value))
        xi_norm = float(optax.tree.norm(grad.synthetic_gradient))
        assert (xi_norm > 0) == (num_steps > 0)
        assert float(jnp.linalg.norm(grad.init_scale)) > 0 and float(jnp.linalg.norm(grad.prior_loc)) > 0


def test_predictive_probabilities(rng_key, params, episodes):
    probs = sib_predict(
        rng_key, params, episodes, num_ways=WAYS, num_steps=1, inner_optimizer=optax.sgd(0.1), num_draws=4
    )
    assert probs.shape == (TASKS, WAYS * QUERIES, WAYS)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_meta_training_learns_on_separable_features(rng_key, episodes):
    """A few Adam steps on the ELBO lower the loss (sanity, not a statistical claim)."""
    from metaprior.inference.meta import fit

    loss = functools.partial(sib_loss, num_ways=WAYS, num_steps=1, inner_optimizer=optax.sgd(0.1))
    params = init_sib_params(rng_key, FEATURES, WAYS)
    result = fit(
        rng_key, meta_learner(loss, optax.adam(3e-2)), params, 60, data=episodes, steps_per_call=20, progress=False
    )
    assert result.losses[-10:].mean() < 0.8 * result.losses[:10].mean()


# ------------------------------------------------------------------ feature network


def test_pretraining_pieces_and_embedding(rng_key):
    images = jax.random.uniform(rng_key, (6, 4, 12, 12, 1))
    x, y = sample_classification_batch(rng_key, images, 8)
    assert x.shape == (8, 12, 12, 1) and y.shape == (8,) and int(y.max()) < 6
    net = Conv4(6, filters=4, image_size=12, num_blocks=2, key=rng_key)
    loss = pretrain_loss(net, rng_key, (x, y))
    assert loss.shape == () and np.isfinite(float(loss))
    feats = embed_classes(net, images)
    assert feats.shape == (6, 4, 4 * 3 * 3)
    # one batch per example index: example e of every class together
    np.testing.assert_allclose(feats[:, 1], net.features(images[:, 1]), rtol=1e-5, atol=1e-6)
