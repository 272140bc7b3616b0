"""The task-latent model and its guides: site shapes, unbiased subsampling, jit, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers

from metaprior.data.tasks import harmonic_tasks
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


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b._replace(x=b.x[0]), r"batch\.x must have shape"),
        (lambda b: b._replace(y=b.y.at[0, 0].set(jnp.nan)), "NaN"),
        (lambda b: b._replace(mask=b.mask.at[3].set(False)), "empty support set"),
    ],
)
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


# ----------------------------------------------------------------- the networks (x, z) -> (mu, s)


def test_paper_arch_is_the_old_concat_residual_mlp():
    """``arch="paper"`` computes exactly what the model computed before the FiLM default:
    the residual MLP of the same key on ``concat(x, z)``."""
    import equinox as eqx

    from metaprior.models.nets import ResidualMLP

    key = jax.random.key(4)
    net = make_task_latent_net(key, D, arch="paper", width=16, num_layers=4)
    old = ResidualMLP(1 + D, 2, width=16, num_layers=4, key=key)
    x, z = jax.random.normal(jax.random.key(5), (1,)), jax.random.normal(jax.random.key(6), (D,))
    np.testing.assert_array_equal(net(x, z), old(jnp.concatenate([x, z])))
    assert jax.tree.structure(eqx.filter(net.body, eqx.is_array)) == jax.tree.structure(eqx.filter(old, eqx.is_array))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_film_net_shapes_and_siren_identity(num_layers):
    """Shapes of every part, and with the mapping's output zeroed the mean is a plain SIREN
    ``head(sin(W_L ... sin(W_1 x + b_1) ... + b_L))`` (the FiLM terms enter as 1 + gamma, beta, 1 + alpha)."""
    import equinox as eqx

    net = make_task_latent_net(jax.random.key(7), D, width=8, num_layers=num_layers)
    mean = net.mean
    assert len(mean.layers) == num_layers and mean.layers[0].weight.shape == (8, 1)
    assert mean.mapping.layers[-1].weight.shape == ((2 * num_layers + 1) * 8, mean.mapping.layers[-1].weight.shape[1])
    assert mean.head.weight.shape == (1, 8)
    assert np.abs(np.asarray(mean.layers[0].weight)).max() <= 15.0  # U(-omega, omega)
    x, z = jnp.array([0.3]), jax.random.normal(jax.random.key(8), (D,))
    out = net(x, z)
    assert out.shape == (2,)
    last = mean.mapping.layers[-1]
    zeroed = eqx.tree_at(
        lambda m: (m.mapping.layers[-1].weight, m.mapping.layers[-1].bias),
        mean,
        (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
    )
    h = x
    for layer in mean.layers:
        h = jnp.sin(layer(h))
    np.testing.assert_allclose(zeroed(x, z), mean.head(h), rtol=1e-6, atol=1e-6)
    # the noise logit is the separate network's, whatever the mean network does
    np.testing.assert_array_equal(out[1:], net.noise(x, z))


def test_film_gain_scales_the_mean_linearly():
    """``alpha`` multiplies the last sine features: shifting the mapping's alpha bias by c
    (with its weight zero) turns the mean minus the head's bias into (1 + c) times itself."""
    import equinox as eqx

    mean = make_task_latent_net(jax.random.key(9), D, width=8).mean
    last = mean.mapping.layers[-1]
    w, b = jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)
    base = eqx.tree_at(lambda m: (m.mapping.layers[-1].weight, m.mapping.layers[-1].bias), mean, (w, b))
    gained = eqx.tree_at(
        lambda m: (m.mapping.layers[-1].weight, m.mapping.layers[-1].bias), mean, (w, b.at[-8:].set(0.5))
    )
    x, z = jnp.array([1.7]), jnp.zeros(D)
    np.testing.assert_allclose(gained(x, z) - mean.head.bias, 1.5 * (base(x, z) - mean.head.bias), rtol=1e-5)


def test_make_task_latent_net_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        make_task_latent_net(jax.random.key(0), D, arch="mlp")
    with pytest.raises(ValueError, match="latent_dim"):
        make_task_latent_net(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="omega"):
        make_task_latent_net(jax.random.key(0), D, omega=0.0)


# ----------------------------------------------------------------- amortised guides (SetEncoder)


def test_set_encoder_is_permutation_invariant_and_ignores_padding():
    from metaprior.inference.guides import SetEncoder

    enc = SetEncoder(1, 2 * D, width=8, key=jax.random.key(0))
    assert np.all(np.asarray(enc(jnp.ones((3, 1)), jnp.ones(3), jnp.ones(3, bool))) == 0)  # zero-init output
    enc = jax.tree.map(lambda a: a + 0.1 if eqx_is_array(a) else a, enc)
    x, y = jax.random.normal(jax.random.key(1), (5, 1)), jax.random.normal(jax.random.key(2), (5,))
    mask = jnp.array([True, True, True, False, False])
    out = enc(x, y, mask)
    perm = jnp.array([2, 0, 1, 4, 3])
    np.testing.assert_allclose(enc(x[perm], y[perm], mask[perm]), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(enc(x.at[3:].set(9.0), y.at[3:].set(-9.0), mask), out, rtol=1e-6)
    np.testing.assert_allclose(enc(x[:3], y[:3], mask[:3]), out, rtol=1e-5, atol=1e-6)


def eqx_is_array(a):
    import equinox as eqx

    return eqx.is_inexact_array(a)


@pytest.mark.parametrize("guide_cls", [TaskNormalGuide, TaskIAFGuide])
def test_guide_with_fresh_encoder_equals_guide_without(setup, guide_cls):
    """A fresh SetEncoder outputs zeros, so the amortised guide is the plain one: with a
    near-zero scale (1e-6) both draw z = loc of the drawn tasks; its params are one shared
    site (not a per-task row); it needs the observed batch."""
    from metaprior.inference.guides import SetEncoder
    from metaprior.inference.svi import bind_modules
    from metaprior.models.task_latent import NET_SITE

    batch, model = setup
    model = bind_modules(model, {NET_SITE: model.keywords["net"]})  # the network as the learned prior
    enc = SetEncoder(1, 2 * D, width=8, key=jax.random.key(1))
    for guide in (
        guide_cls.build(jax.random.key(0), model, batch, init_scale=1e-6),
        guide_cls.build(jax.random.key(0), model, batch, init_scale=1e-6, encoder=enc),
    ):
        params = init_params(jax.random.key(1), model, guide, batch, which="guide")
        params["q_loc"] = jax.random.normal(jax.random.key(5), params["q_loc"].shape)
        if guide_cls is TaskIAFGuide:  # make the flows the identity: gates fully open
            params["q_iaf_b2"] = params["q_iaf_b2"].at[..., D:].set(30.0)
        tr = trace(handlers.substitute(guide, params), jax.random.key(3), batch, subsample_size=4)
        idx = tr["tasks"]["value"]
        np.testing.assert_allclose(tr["z"]["value"][:, 0], params["q_loc"][idx], atol=1e-5)
    amort = guide
    sites = init_params(jax.random.key(1), model, amort, batch, which="guide")
    assert amort.encoder_site in sites and not amort.encoder_site.startswith(amort.prefix + "_")
    with pytest.raises(ValueError, match="needs the observed batch"):
        trace(amort, jax.random.key(0), batch._replace(y=None))


def test_fit_local_with_encoder_keeps_the_best_candidate(setup):
    """With an encoder, restart 0 starts at the encoder's proposal and restarts 1.. at the
    best candidates: with a zero step size, restart 1 of the amortised fit sits where
    restart 0 (the best candidate) of the plain fit does, from the same key."""
    import optax

    from metaprior.inference.guides import SetEncoder
    from metaprior.inference.local import fit_local
    from metaprior.inference.svi import bind_modules
    from metaprior.models.task_latent import NET_SITE

    batch, model = setup
    model = bind_modules(model, {NET_SITE: model.keywords["net"]})  # the network as the learned prior
    enc = SetEncoder(1, 2 * D, width=8, key=jax.random.key(1))
    kw = dict(num_steps=1, num_restarts=2, num_candidates=2, optimizer=optax.sgd(0.0), eval_particles=2)
    plain = fit_local(jax.random.key(4), model, TaskNormalGuide.build(jax.random.key(0), model, batch), batch, **kw)
    amort = fit_local(
        jax.random.key(4), model, TaskNormalGuide.build(jax.random.key(0), model, batch, encoder=enc), batch, **kw
    )
    locs = np.asarray(amort.restart_params["q_loc"])
    np.testing.assert_array_equal(locs[:, 0], 0.0)
    np.testing.assert_allclose(locs[:, 1], np.asarray(plain.restart_params["q_loc"])[:, 0])


def test_support_size_metrics_pairs_the_gap_over_the_same_tasks():
    """The gap is the mean of per-task differences and its interval is the paired one:
    narrower than either model's when the two move together task by task."""
    from metaprior.inference.task_latent import support_size_metrics

    base = np.array([1.0, 3.0, 5.0, 7.0])
    results = {
        "a": {1: dict(mse=base + 0.5, nll=base, restart_ess=np.ones(4), is_ess=np.full(4, 8.0))},
        "b": {1: dict(mse=base + np.array([0.0, 0.1, 0.0, -0.1]), nll=base, restart_ess=np.ones(4))},
    }
    m = support_size_metrics(results, baseline="a", model="b")
    np.testing.assert_allclose(m["mse_gap_n1"], 0.5)
    np.testing.assert_allclose(m["mse_gap_n1_ci95"], 1.96 * np.std([0.5, 0.4, 0.5, 0.6], ddof=1) / 2)
    assert m["mse_gap_n1_ci95"] < m["mse_a_n1_ci95"] / 10
    assert m["is_ess_a_n1"] == 8.0 and "is_ess_b_n1" not in m
    np.testing.assert_allclose(m["mse_b_n1"], 4.0)


def test_large_restarts_apply_to_the_sizes_above_pad_to_only(setup):
    """Sizes up to pad_to are fitted together with num_restarts each; a size above it is
    fitted alone with large_restarts: the restart axis of each fit says which it got, and
    the restart weights of every task sum to one."""
    from metaprior.inference.local import restart_weights
    from metaprior.inference.svi import bind_modules
    from metaprior.inference.task_latent import infer_support_sizes
    from metaprior.models.task_latent import NET_SITE

    batch, model = setup
    model = bind_modules(model, {NET_SITE: model.keywords["net"]})
    kw = dict(num_steps=2, learning_rate=0.01, num_samples=3, pad_to=2, guide_kind="normal", predictive="mixture")
    out = infer_support_sizes(jax.random.key(0), model, batch, (1, 2, 5), num_restarts=2, large_restarts=3, **kw)
    widths = {n: restart_weights(r["fit"]).shape[-1] for n, r in out.items()}
    assert widths == {1: 2, 2: 2, 5: 3}
    for r in out.values():
        np.testing.assert_allclose(np.asarray(restart_weights(r["fit"])).sum(-1), 1.0, rtol=1e-5)
    same = infer_support_sizes(jax.random.key(0), model, batch, (1, 2, 5), num_restarts=2, **kw)
    assert restart_weights(same[5]["fit"]).shape[-1] == 2  # None: every size gets num_restarts


def test_shared_draws_predict_like_per_task_draws():
    """``task_latent_predict`` with ``z [S, d]`` (one set of draws for every task) equals the
    per-task path with those draws repeated over the tasks axis."""
    from metaprior.models.task_latent import task_latent_predict

    net = make_task_latent_net(jax.random.key(3), D, width=8)
    x = jax.random.normal(jax.random.key(4), (5, 6, 1))
    z = jax.random.normal(jax.random.key(5), (4, D))
    shared = task_latent_predict(net, z, x)
    repeated = task_latent_predict(net, jnp.repeat(z[:, None], 5, axis=1), x)
    for a, b in zip(shared, repeated):
        assert a.shape == (4, 5, 6)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_layers, x_dim", [(1, 1), (2, 3)])
def test_broadcast_prediction_equals_the_per_example_network(num_layers, x_dim):
    """The broadcast paths (``FiLMSiren.apply_shared``, ``ConcatNet.apply_shared``, used by
    ``task_latent_predict`` and the model's likelihood for the default net) give the same numbers as calling the network
    on one ``(x, z)`` at a time, for draws shared by all tasks and for per-task draws: the
    same arithmetic in another order, so float32 rounding only."""
    from metaprior.models.task_latent import _apply, _apply_task, noise_scale, task_latent_predict

    net = make_task_latent_net(jax.random.key(7), D, width=16, num_layers=num_layers, x_dim=x_dim)
    x = 3.0 * jax.random.normal(jax.random.key(8), (5, 6, x_dim))
    z = jax.random.normal(jax.random.key(9), (4, D))
    one = jax.vmap(jax.vmap(lambda xi, zs: net(xi, zs), in_axes=(0, None)), in_axes=(0, None))  # [T, N, 2]
    ref = jnp.stack([one(x, zs) for zs in z])  # [S, T, N, 2], each output by the module's own __call__
    mu, sigma = task_latent_predict(net, z, x)
    np.testing.assert_allclose(mu, ref[..., 0], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(sigma, noise_scale(ref[..., 1]), rtol=1e-5, atol=1e-7)
    z_task = jax.random.normal(jax.random.key(10), (4, 5, D))
    per_task = jax.vmap(lambda zs: jax.vmap(_apply_task, in_axes=(None, 0, 0))(net, x, zs))(z_task)
    for a, b in zip(task_latent_predict(net, z_task, x), per_task):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
    for a, b in zip(_apply(net, x, z_task[0], broadcast=True), per_task):  # the model's likelihood path
        np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=2e-5)
    assert net.mean.apply_shared(x, z).shape == (4, 5, 6, 1) and net.noise.apply_shared(x, z).shape == (4, 5, 6, 1)
    paper = make_task_latent_net(jax.random.key(7), D, arch="paper", width=8, num_layers=2, x_dim=x_dim)
    with pytest.raises(TypeError, match="needs an MLP body, got ResidualMLP"):
        paper.apply_shared(x, z)


def _linear_gaussian_predict(z, x, sigma=0.5):
    """y = z * x + N(0, sigma^2), z ~ N(0, 1) scalar, draws shared by the tasks: z [S, 1], x [T, N, 1]."""
    mu = z[:, None, None, 0] * x[None, :, :, 0]
    return mu, jnp.full_like(mu, sigma)


def test_prior_importance_sizes_recovers_a_linear_gaussian_posterior():
    """With y = z x + N(0, 0.5^2) and z ~ N(0, 1) the posterior of z given the first N points is
    Gaussian with precision 1 + sum x^2 / 0.25. The resampled draws' mean over 400 draws per
    task matches its mean: the error is the resampling noise (posterior sd / 20 <= 0.05) plus
    the weights' (ESS in the hundreds), so 0.12 is about 3 standard errors. Masked points carry
    no weight, and the ESS is what the prior's overlap with that posterior predicts."""
    from metaprior.data.tasks import TaskBatch
    from metaprior.inference.task_latent import prior_importance_sizes

    k_x, k_z, k_e = jax.random.split(jax.random.key(11), 3)
    t, n = 6, 4
    x = jax.random.uniform(k_x, (t, n, 1), minval=-1.0, maxval=1.0)
    z_true = jax.random.normal(k_z, (t,))
    y = z_true[:, None] * x[..., 0] + 0.5 * jax.random.normal(k_e, (t, n))
    mask = jnp.ones((t, n), bool).at[0, 1].set(False)  # task 0's second point is padding
    tasks = TaskBatch(x, y, mask)
    out = prior_importance_sizes(
        jax.random.key(0), _linear_gaussian_predict, tasks, (1, 4), latent_dim=1, num_draws=8192, num_samples=400,
        task_chunk=4, draw_chunk=1024,
    )  # fmt: skip
    for size in (1, 4):
        m = np.asarray(mask[:, :size])
        xs, ys = np.asarray(x[:, :size, 0]) * m, np.asarray(y[:, :size]) * m
        precision = 1.0 + np.sum(xs**2, axis=1) / 0.25
        exact_mean = np.sum(xs * ys, axis=1) / 0.25 / precision
        r = out[size]
        assert r["z"].shape == (400, t, 1) and r["support"].x.shape == (t, size, 1)
        np.testing.assert_allclose(r["z"][..., 0].mean(axis=0), exact_mean, atol=0.12)
        # the ESS of prior draws for a N(m, s^2) posterior is about num_draws / E_prior[w^2],
        # E_prior[w^2] = exp(m^2 / (2 - s^2)) / (s sqrt(2 - s^2)); within a factor 2 where it is large
        s2 = 1.0 / precision
        expected = 8192 * s2**0.5 * np.sqrt(2 - s2) * np.exp(-(exact_mean**2) / (2 - s2))
        big = expected > 200
        assert big.sum() >= 4
        np.testing.assert_allclose(r["is_ess"][big], expected[big], rtol=0.5)
    with pytest.raises(ValueError, match="num_draws"):
        prior_importance_sizes(jax.random.key(0), _linear_gaussian_predict, tasks, (1,), latent_dim=1, num_draws=1000)
    with pytest.raises(ValueError, match="sizes"):
        prior_importance_sizes(jax.random.key(0), _linear_gaussian_predict, tasks, (5,), latent_dim=1, num_draws=1024)
    with pytest.raises(ValueError, match="tasks.y"):
        bad = tasks._replace(y=tasks.y.at[2, 0].set(jnp.nan))
        prior_importance_sizes(jax.random.key(0), _linear_gaussian_predict, bad, (1,), latent_dim=1, num_draws=1024)
