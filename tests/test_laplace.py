"""Laplace posteriors: exact identities of the curvature structures, log-determinants,
sampling, differentiability, and the protocol (jit, vmap over tasks, filters).

kfac-jax (the natural second oracle for the K-FAC factors) installs from PyPI but does
not import against JAX 0.12 (``jax.core.Effects`` is gone), so the oracles here are
dense computations: the exact GGN from Jacobians, ``slogdet``, and hand-written
patch / per-location gradient sums for conv layers.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metaprior.inference import laplace as L
from metaprior.models.nets import MLP, Conv4


def batch_apply(net, x):
    return net(x)


def categorical(f):
    return dist.Categorical(logits=f)


def gaussian(sigma):
    return lambda f: dist.Normal(f[..., 0], sigma)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def to64(tree):
    """Cast a fixture's float32 arrays (made before x64 was on) to float64."""
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


@pytest.fixture
def mlp_data(rng_key):
    k1, k2, k3 = jax.random.split(rng_key, 3)
    net = MLP(3, 4, (5,), key=k1)
    x = jax.random.normal(k2, (9, 3))
    y = jax.random.randint(k3, (9,), 0, 4)
    return net, x, y


@pytest.fixture
def conv_data(rng_key):
    k1, k2 = jax.random.split(rng_key)
    net = Conv4(3, in_channels=1, filters=3, image_size=8, num_blocks=2, key=k1)
    x = jax.random.normal(k2, (6, 8, 8, 1))
    y = jnp.arange(6) % 3
    return net, x, y


def posterior(net, x, y, structure, *, likelihood=categorical, apply_fn=L.vmap_apply, **kw):
    # compiled once per configuration: eager dispatch of every small op is what makes
    # tests slow on a 2-core machine
    return _laplace_jit(
        kw.pop("rng_key", None), net, x, y, apply_fn=apply_fn, likelihood=likelihood, structure=structure, **kw
    )


@eqx.filter_jit
def _laplace_jit(rng_key, net, x, y, **kw):
    return L.laplace(rng_key, net, x, y, **kw)


# ------------------------------------------------------------------ exact identities


def test_kfac_equals_exact_fisher_single_dense_layer_gaussian(rng_key, x64):
    # Linear regression: Lambda = 1/sigma^2 for every example, so G is N/sigma^2 and the
    # Kronecker product (sum a a^T) kron (1/sigma^2) *is* the exact Fisher, for any N.
    k1, k2 = jax.random.split(rng_key)
    layer = eqx.nn.Linear(4, 1, key=k1)
    x = jax.random.normal(k2, (11, 4))
    y = x[:, 0]
    full = posterior(layer, x, y, "full", likelihood=gaussian(0.3))
    kfac = posterior(layer, x, y, "kfac", likelihood=gaussian(0.3))
    np.testing.assert_allclose(L.precision_matrix(kfac), L.precision_matrix(full), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_kfac_equals_fisher_single_dense_layer_one_sample(rng_key, x64, fisher):
    # One input and one output sample (or the exact expectation for one input): the
    # Fisher of a dense layer is exactly a~ a~^T kron g g^T, which is what K-FAC forms.
    k1, k2, k3 = jax.random.split(rng_key, 3)
    layer = eqx.nn.Linear(3, 4, key=k1)
    x = jax.random.normal(k2, (1, 3))
    y = jnp.array([2])
    full = posterior(layer, x, y, "full", fisher=fisher, rng_key=k3)
    kfac = posterior(layer, x, y, "kfac", fisher=fisher, rng_key=k3)
    np.testing.assert_allclose(L.precision_matrix(kfac), L.precision_matrix(full), rtol=1e-10, atol=1e-12)


def test_full_exact_fisher_is_jacobian_ggn(mlp_data, x64):
    net, x, y = to64(mlp_data)
    post = posterior(net, x, y, "full", prior_precision=0.0)
    flat, unravel = ravel_pytree(post.mean)
    jac = jax.jacrev(lambda v: jax.vmap(eqx.combine(unravel(v), post.rest))(x))(flat)  # [N, C, P]
    p = jax.nn.softmax(jax.vmap(net)(x))
    lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    ggn = jnp.einsum("ncp,ncd,ndq->pq", jac, lam, jac)
    np.testing.assert_allclose(post.curvature.matrix, ggn, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_diag_equals_diagonal_of_full(mlp_data, fisher, rng_key):
    net, x, y = mlp_data
    full = posterior(net, x, y, "full", fisher=fisher, rng_key=rng_key)
    diag = posterior(net, x, y, "diag", fisher=fisher, rng_key=rng_key)
    # float32 accumulations of the same products in a different order
    np.testing.assert_allclose(diag.curvature.diagonal, jnp.diag(full.curvature.matrix), rtol=1e-5, atol=1e-6)


def test_diag_equals_diagonal_of_full_conv(conv_data):
    net, x, y = conv_data
    full = posterior(net, x, y, "full", apply_fn=batch_apply)
    diag = posterior(net, x, y, "diag", apply_fn=batch_apply)
    np.testing.assert_allclose(diag.curvature.diagonal, jnp.diag(full.curvature.matrix), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
@pytest.mark.parametrize("net_name", ["mlp", "conv"])
def test_log_det_equals_dense_slogdet(structure, net_name, mlp_data, conv_data, x64):
    net, x, y = to64(mlp_data if net_name == "mlp" else conv_data)
    apply_fn = L.vmap_apply if net_name == "mlp" else batch_apply
    post = posterior(net, x, y, structure, apply_fn=apply_fn, prior_precision=0.7, damping=0.05)
    sign, dense = jnp.linalg.slogdet(L.precision_matrix(post))
    assert sign > 0
    np.testing.assert_allclose(L.log_det(post), dense, rtol=1e-10)


def test_factored_damping_log_det_is_an_upper_bound_and_exact_formula(mlp_data, x64):
    net, x, y = to64(mlp_data)
    post = posterior(net, x, y, "kfac", prior_precision=0.5)
    exact, factored = L.log_det(post), L.log_det(post, kron_damping="factored")
    assert factored >= exact
    # The factored value is the log-det of (A' + pi sqrt(t) I) kron (G' + sqrt(t)/pi I).
    total = 0.0
    for b in post.curvature.blocks:
        a, g = b.a / jnp.sqrt(b.count), b.g / jnp.sqrt(b.count)
        pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / (jnp.trace(g) / g.shape[0]))
        m = jnp.kron(a + pi * jnp.sqrt(0.5) * jnp.eye(a.shape[0]), g + jnp.sqrt(0.5) / pi * jnp.eye(g.shape[0]))
        total += jnp.linalg.slogdet(m)[1]
    np.testing.assert_allclose(factored, total, rtol=1e-10)


def test_kfac_conv_factors_match_patches_and_location_gradients(rng_key, x64):
    # A single conv layer followed by a fixed linear read-out: A is the sum of patch
    # outer products, G the sum over locations of per-location output-gradient outer
    # products, written out by hand here.
    k1, k2, k3 = jax.random.split(rng_key, 3)
    conv = eqx.nn.Conv2d(2, 3, kernel_size=3, padding=1, key=k1)
    readout = jax.random.normal(k2, (4, 3 * 5 * 5))

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d

        def __call__(self, x):
            return readout @ jnp.tanh(self.conv(x)).reshape(-1)

    x = jax.random.normal(k3, (4, 2, 5, 5))
    y = jnp.array([0, 1, 2, 3])
    post = posterior(Net(conv), x, y, "kfac")
    (block,) = post.curvature.blocks
    patches = jax.vmap(lambda xi: jax.lax.conv_general_dilated_patches(xi[None], (3, 3), (1, 1), ((1, 1), (1, 1)))[0])(
        x
    )
    cols = jnp.concatenate([patches.reshape(4, 18, 25), jnp.ones((4, 1, 25))], axis=1)
    np.testing.assert_allclose(block.a, jnp.einsum("ndt,net->de", cols, cols), rtol=1e-10)
    np.testing.assert_allclose(block.count, 4 * 25)
    # G: backprop each column of L_n from the logits to the conv output.
    pre = jax.vmap(conv)(x)  # [N, 3, 5, 5]
    logits = jax.vmap(lambda h: readout @ jnp.tanh(h).reshape(-1))(pre)
    lsqrt = L.output_hessian_sqrt(categorical, logits)  # [N, C, S]
    back = jax.vmap(
        lambda h, v: jax.vmap(
            lambda vs: jax.vjp(lambda hh: readout @ jnp.tanh(hh).reshape(-1), h)[1](vs)[0], in_axes=1
        )(v)
    )(pre, lsqrt)
    g = jnp.einsum("nsctu,nsdtu->cd", back, back)
    np.testing.assert_allclose(block.g, g, rtol=1e-9)


def test_output_hessian_sqrt_matches_autodiff_hessian(rng_key, x64):
    f = jax.random.normal(rng_key, (5, 4))
    y = jnp.arange(5) % 4
    lsq = L.output_hessian_sqrt(categorical, f)
    hess = jax.vmap(jax.hessian(lambda fn, yn: -categorical(fn).log_prob(yn)))(f, y)
    np.testing.assert_allclose(jnp.einsum("ncs,nds->ncd", lsq, lsq), hess, atol=1e-12)
    # the generic (eigh) fallback agrees with the closed form
    lik = lambda f: dist.Categorical(probs=jax.nn.softmax(f))  # -> CategoricalProbs
    lsq2 = L.output_hessian_sqrt(lik, f, y)
    np.testing.assert_allclose(jnp.einsum("ncs,nds->ncd", lsq2, lsq2), hess, atol=1e-10)


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_sample_covariance_matches_inverse_precision(structure, rng_key, x64):
    k1, k2, k3 = jax.random.split(rng_key, 3)
    net = MLP(2, 2, (3,), key=k1)  # 17 parameters
    x = jax.random.normal(k2, (6, 2))
    y = jnp.array([0, 1, 0, 1, 1, 0])
    post = posterior(net, x, y, structure, prior_precision=2.0)
    cov = jnp.linalg.inv(L.precision_matrix(post))
    n = 40_000
    draws = eqx.filter_jit(L.sample_params)(k3, post, n)
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])(draws)
    emp = jnp.cov(flat, rowvar=False)
    # An empirical covariance entry has standard error sqrt((S_ii S_jj + S_ij^2) / n) <=
    # sqrt(2 S_ii S_jj / n); with n = 40k that is <= 0.71% of sqrt(S_ii S_jj). Five
    # standard errors over all 153 distinct entries: 0.036 after normalising.
    scale = jnp.sqrt(jnp.outer(jnp.diag(cov), jnp.diag(cov)))
    assert jnp.max(jnp.abs(emp - cov) / scale) < 5 * jnp.sqrt(2.0 / n)
    # and the mean is the mode: standard error of a mean is sqrt(S_ii / n)
    mean = ravel_pytree(post.mean)[0]
    assert jnp.max(jnp.abs(flat.mean(0) - mean) / jnp.sqrt(jnp.diag(cov))) < 5 / jnp.sqrt(n)


def test_kfac_sampling_never_forms_a_dense_matrix(rng_key):
    # A Conv4 of 32 filters has ~29k parameters: a dense precision would be 3.4 GB.
    k1, k2, k3 = jax.random.split(rng_key, 3)
    net = Conv4(5, filters=32, key=k1)
    x = jax.random.normal(k2, (5, 28, 28, 1))
    post = posterior(net, x, jnp.arange(5), "kfac", apply_fn=batch_apply, prior_precision=1.0)
    assert post.num_params > 25_000
    jaxpr = jax.make_jaxpr(lambda k: L.sample_params(k, post, 2))(k3)
    biggest = max(
        (np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")),
        default=0,
    )
    assert biggest < post.num_params * 100  # far below P^2
    f = L.predictive(k3, post, x, apply_fn=batch_apply, num_samples=3)
    assert f.shape == (3, 5, 5) and bool(jnp.all(jnp.isfinite(f)))


# ------------------------------------------------------------------ differentiability


def test_kron_log_det_gradient_with_repeated_eigenvalues(rng_key, x64):
    # a has rank 2 of 6 (four zero eigenvalues): differentiating eigh would divide by
    # zero; the spectral derivative equals that of the dense slogdet.
    k1, k2 = jax.random.split(rng_key)
    xa = jax.random.normal(k1, (2, 6))
    g = jax.random.normal(k2, (3, 3))
    g = g @ g.T

    def exact(xa, g):
        return L.kron_log_det(xa.T @ xa, g, 4.0, 0.3)

    def dense(xa, g):
        return jnp.linalg.slogdet(jnp.kron(xa.T @ xa, g) / 4.0 + 0.3 * jnp.eye(18))[1]

    ga, gg = jax.jit(jax.grad(exact, argnums=(0, 1)))(xa, g)
    da, dg = jax.jit(jax.grad(dense, argnums=(0, 1)))(xa, g)
    assert jnp.all(jnp.isfinite(ga))
    np.testing.assert_allclose(ga, da, rtol=1e-8)
    np.testing.assert_allclose(gg, dg, rtol=1e-8)


@pytest.mark.parametrize("kron_damping", ["exact", "factored"])
def test_log_det_gradient_in_weights_matches_finite_differences(rng_key, x64, kron_damping):
    k1, k2, k3 = jax.random.split(rng_key, 3)
    net = MLP(2, 3, (4,), key=k1)
    x = jax.random.normal(k2, (5, 2))
    y = jnp.array([0, 1, 2, 0, 1])
    flat, unravel = ravel_pytree(eqx.filter(net, eqx.is_array))
    rest = eqx.filter(net, eqx.is_array, inverse=True)

    def f(v):
        post = posterior(eqx.combine(unravel(v), rest), x, y, "kfac", prior_precision=0.1)
        return L.log_det(post, kron_damping=kron_damping)

    f = jax.jit(f)
    grad = jax.jit(jax.grad(f))(flat)
    direction = jax.random.normal(k3, flat.shape)
    eps = 1e-6
    fd = (f(flat + eps * direction) - f(flat - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.dot(grad, direction), fd, rtol=1e-6)


# ------------------------------------------------------------------ protocol


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_jit_and_eager_agree_and_vmap_over_tasks(structure, rng_key):
    k1, k2, k3 = jax.random.split(rng_key, 3)
    net = MLP(1, 1, (6,), key=k1)
    x = jax.random.normal(k2, (4, 7, 1))  # 4 tasks
    y = jnp.sin(x[..., 0])
    lik = gaussian(0.5)

    def ld(x, y):
        return L.log_det(posterior(net, x, y, structure, likelihood=lik, prior_precision=1.0))

    eager = jnp.stack([ld(x[i], y[i]) for i in range(2)])
    np.testing.assert_allclose(jax.jit(jax.vmap(ld))(x, y)[:2], eager, rtol=1e-5)


def test_laplace_traces_once(rng_key):
    k1, k2 = jax.random.split(rng_key)
    net = MLP(1, 1, (6,), key=k1)
    traces = []

    @jax.jit
    def fn(net, x, y):
        traces.append(1)
        return L.log_det(posterior(net, x, y, "kfac", likelihood=gaussian(0.5)))

    for i in range(3):
        x = jax.random.normal(jax.random.fold_in(k2, i), (5, 1))
        fn(net, x, jnp.sin(x[:, 0]))
    assert len(traces) == 1


def test_default_filter_excludes_batch_norm_and_kfac_refuses_it(conv_data):
    net, x, y = conv_data
    post = posterior(net, x, y, "kfac", apply_fn=batch_apply)
    assert all(n.scale is None and n.shift is None for n in post.mean.norms)
    assert len(post.curvature.blocks) == 3  # two convs and the head
    with pytest.raises(ValueError, match="batch-norm"):
        posterior(net, x, y, "kfac", apply_fn=batch_apply, filter_spec=eqx.is_array)
    # full/diag can cover them when asked
    diag = posterior(net, x, y, "diag", apply_fn=batch_apply, filter_spec=eqx.is_array)
    assert diag.num_params == post.num_params + 2 * 2 * 3


def test_clear_errors(mlp_data):
    net, x, y = mlp_data
    with pytest.raises(ValueError, match="structure must be one of"):
        posterior(net, x, y, "block")
    with pytest.raises(ValueError, match="rng_key"):
        posterior(net, x, y, "kfac", fisher="mc")
    with pytest.raises(ValueError, match="only available with structure='full'"):
        posterior(net, x, y, "kfac", fisher="hessian")
    with pytest.raises(ValueError, match=r"\[examples, outputs\]"):
        posterior(net, x, y, "kfac", apply_fn=lambda n, x: jax.vmap(n)(x)[:, :, None])  # [N] is fine, [N, C, 1] not


def test_fit_laplace_matches_numpyro_autolaplace(rng_key, x64):
    # Bayesian linear regression with a N(0, 1/tau) prior: the posterior is Gaussian, so
    # the MAP + Hessian of fit_laplace and NumPyro's AutoLaplaceApproximation must agree
    # with each other and with the closed form.
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoLaplaceApproximation

    k1, k2, k3 = jax.random.split(rng_key, 3)
    x = jax.random.normal(k1, (30, 3))
    w_true = jnp.array([1.0, -2.0, 0.5])
    y = x @ w_true + 0.3 + 0.2 * jax.random.normal(k2, (30,))
    tau, sigma = 2.0, 0.2
    layer = eqx.nn.Linear(3, 1, key=k3)
    post, _ = L.fit_laplace(
        None,
        layer,
        x,
        y,
        apply_fn=L.vmap_apply,
        likelihood=gaussian(sigma),
        optimizer=optax.adam(0.05),
        num_steps=3000,
        structure="full",
        fisher="hessian",
        prior_precision=tau,
    )
    xt = jnp.concatenate([x, jnp.ones((30, 1))], axis=1)
    prec = xt.T @ xt / sigma**2 + tau * jnp.eye(4)
    mean = jnp.linalg.solve(prec, xt.T @ y / sigma**2)
    np.testing.assert_allclose(ravel_pytree(post.mean)[0], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(L.precision_matrix(post), prec, rtol=1e-8)

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, tau**-0.5).expand([4]).to_event(1))
        numpyro.sample("y", dist.Normal(x @ w[:3] + w[3], sigma), obs=y)

    guide = AutoLaplaceApproximation(model)
    svi = SVI(model, guide, optax.adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.key(1), 3000, x, y, progress_bar=False)
    cov_numpyro = guide.get_transform(result.params).scale_tril @ guide.get_transform(result.params).scale_tril.T
    np.testing.assert_allclose(cov_numpyro, jnp.linalg.inv(L.precision_matrix(post)), rtol=1e-5, atol=1e-9)


def test_log_marginal_likelihood_exact_for_linear_gaussian(rng_key, x64):
    # For a linear-Gaussian model Laplace's evidence is exact.
    k1, k2 = jax.random.split(rng_key)
    x = jax.random.normal(k1, (8, 2))
    y = x[:, 0] - x[:, 1] + 0.1 * jax.random.normal(k2, (8,))
    tau, sigma = 1.5, 0.4
    layer = eqx.nn.Linear(2, 1, use_bias=False, key=k1)
    post, _ = L.fit_laplace(
        None,
        layer,
        x,
        y,
        apply_fn=L.vmap_apply,
        likelihood=gaussian(sigma),
        optimizer=optax.adam(0.05),
        num_steps=2000,
        structure="kfac",
        prior_precision=tau,
    )
    lml = L.log_marginal_likelihood(post, x, y, apply_fn=L.vmap_apply, likelihood=gaussian(sigma))
    cov = x @ x.T / tau + sigma**2 * jnp.eye(8)
    exact = jax.scipy.stats.multivariate_normal.logpdf(y, jnp.zeros(8), cov)
    np.testing.assert_allclose(lml, exact, rtol=1e-6)


def test_sample_networks_work_with_filter_vmap(mlp_data, rng_key):
    net, x, y = mlp_data
    post = posterior(net, x, y, "kfac")
    nets = L.sample_networks(rng_key, post, 4)
    out = eqx.filter_vmap(lambda n: jax.vmap(n)(x))(nets)
    nn = L.predictive(rng_key, post, x, apply_fn=L.vmap_apply, num_samples=4, pred_type="nn")
    np.testing.assert_allclose(out, nn, rtol=1e-6)


def test_glm_predictive_is_the_linearised_network(mlp_data, rng_key):
    # pred_type="glm": each sample is f(x; phi_hat) + J (phi_s - phi_hat) with the dense
    # Jacobian J of the outputs, for the very same weight draws that "nn" uses.
    net, x, y = mlp_data
    post = posterior(net, x, y, "kfac", prior_precision=2.0)
    glm = L.predictive(rng_key, post, x, apply_fn=L.vmap_apply, num_samples=5, pred_type="glm")
    flat_mean, unravel = ravel_pytree(post.mean)
    f = lambda flat: L.vmap_apply(eqx.combine(unravel(flat), post.rest), x)
    jac = jax.jacobian(f)(flat_mean)  # [N, C, P]
    draws = jax.vmap(lambda p: ravel_pytree(p)[0])(L.sample_params(rng_key, post, 5))  # [S, P]
    expected = f(flat_mean)[None] + jnp.einsum("ncp,sp->snc", jac, draws - flat_mean)
    np.testing.assert_allclose(glm, expected, rtol=1e-4, atol=1e-5)
    # the network is not linear in its weights, so the two predictives differ ...
    nn = L.predictive(rng_key, post, x, apply_fn=L.vmap_apply, num_samples=5, pred_type="nn")
    assert float(jnp.max(jnp.abs(nn - glm))) > 1e-3


def test_joint_predictive_rows_equal_the_single_predictives(mlp_data, rng_key):
    # pred_type=("nn", "glm") draws the weights once: each row is exactly the single-type
    # predictive of the same key (the same draws), and the order follows the tuple.
    net, x, y = mlp_data
    post = posterior(net, x, y, "kfac", prior_precision=2.0)
    kw = dict(apply_fn=L.vmap_apply, num_samples=5)
    both = L.predictive(rng_key, post, x, **kw, pred_type=("nn", "glm"))
    assert both.shape == (2, 5, x.shape[0], 4)
    np.testing.assert_array_equal(both[0], L.predictive(rng_key, post, x, **kw, pred_type="nn"))
    np.testing.assert_allclose(both[1], L.predictive(rng_key, post, x, **kw, pred_type="glm"), rtol=1e-6, atol=1e-7)
    swapped = L.predictive(rng_key, post, x, **kw, pred_type=("glm", "nn"))
    np.testing.assert_allclose(swapped[::-1], both, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="pred_type"):
        L.predictive(rng_key, post, x, **kw, pred_type=())


def test_glm_predictive_equals_nn_for_a_model_linear_in_its_weights(rng_key):
    # ... but for a single linear layer they are the same function of the same draws.
    k1, k2, k3 = jax.random.split(rng_key, 3)
    layer = eqx.nn.Linear(3, 2, key=k1)
    x = jax.random.normal(k2, (7, 3))
    y = jax.random.randint(k3, (7,), 0, 2)
    post = posterior(layer, x, y, "kfac", prior_precision=0.5)
    nn = L.predictive(rng_key, post, x, apply_fn=L.vmap_apply, num_samples=6, pred_type="nn")
    glm = L.predictive(rng_key, post, x, apply_fn=L.vmap_apply, num_samples=6, pred_type="glm")
    np.testing.assert_allclose(glm, nn, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pred_type"):
        L.predictive(rng_key, post, x, apply_fn=L.vmap_apply, num_samples=2, pred_type="probit")


def test_fisher_mc_is_unbiased_for_exact(mlp_data, rng_key):
    # E over sampled outputs of the MC Fisher is the exact Fisher (full structure).
    net, x, y = mlp_data
    exact = posterior(net, x, y, "full").curvature.matrix
    mc = jax.jit(
        jax.vmap(
            lambda k: (
                L.laplace(
                    k, net, x, y, apply_fn=L.vmap_apply, likelihood=categorical, structure="full", fisher="mc"
                ).curvature.matrix
            )
        )
    )(jax.random.split(rng_key, 4000)).mean(0)
    # Monte Carlo error of 4000 draws: a few percent of the largest entries.
    assert jnp.max(jnp.abs(mc - exact)) < 0.05 * jnp.max(jnp.abs(exact))


def _batch_apply(net, x):
    return net(x)


def test_kfac_of_conv4_is_the_same_on_the_channels_last_path(rng_key, monkeypatch):
    """K-FAC's taps on Conv4's batched channels-last (im2col) path give the Kronecker
    factors, log-determinant and dense precision of the per-example channels-first path
    with the same weights: the patch columns are in the same (C, kh, kw) order.
    Tolerance: float32 sums over 5 x 28 x 28 locations in a different order (XLA's CPU code,
    hence the round-off, differs between processors)."""
    from metaprior.inference.laplace import _layers

    calls = []
    moment = _layers._patch_moment_nhwc
    monkeypatch.setattr(_layers, "_patch_moment_nhwc", lambda *a: calls.append(1) or moment(*a))
    fast = Conv4(3, filters=4, key=rng_key)
    slow = Conv4(3, filters=4, conv_impl="shift", key=rng_key)
    x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1))
    y = jnp.array([0, 1, 2, 0, 1])
    post_fast = L.laplace(None, fast, x, y, apply_fn=_batch_apply, likelihood=categorical, prior_precision=1e-3)
    assert len(calls) == 4  # every conv layer was tapped on the channels-last path
    post_slow = posterior(slow, x, y, "kfac", apply_fn=_batch_apply, prior_precision=1e-3)
    for bf, bs in zip(post_fast.curvature.blocks, post_slow.curvature.blocks, strict=True):
        for u, v in ((bf.a, bs.a), (bf.g, bs.g), (bf.count, bs.count)):
            np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(v))))
    # the log-det sums the logs of D = sum(dim A x dim G) eigenvalues, each from factors equal
    # to float32 round-off: 1e-5 per eigenvalue (seen: up to 4e-6 per eigenvalue, D = 499)
    dims = sum(b.a.shape[-1] * b.g.shape[-1] for b in post_slow.curvature.blocks)
    np.testing.assert_allclose(L.log_det(post_fast), L.log_det(post_slow), rtol=0, atol=1e-5 * dims)
    # the dense precision places each factor entry at its weight: equal only if the patch
    # columns are ordered like the weights on both paths
    dense_fast, dense_slow = L.precision_matrix(post_fast), L.precision_matrix(post_slow)
    np.testing.assert_allclose(dense_fast, dense_slow, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(dense_slow))))


def test_kfac_taps_of_a_strided_im2col_layer_fall_back_per_example(rng_key):
    """A stride-2 Im2colConv2d called through ``nhwc`` has no channels-last tap; the taps
    fall back to the per-example channels-first call and give the factors of the same
    layer as a plain eqx.nn.Conv2d. Tolerance: float32 round-off."""
    from metaprior.models.nets import Im2colConv2d

    class Net(eqx.Module):
        conv: eqx.Module
        head: eqx.nn.Linear
        nhwc: bool

        def __call__(self, x):  # x [N, H, W, C]
            if self.nhwc:
                h = self.conv.nhwc(x)
            else:
                h = jnp.transpose(jax.vmap(self.conv)(jnp.transpose(x, (0, 3, 1, 2))), (0, 2, 3, 1))
            return jax.vmap(self.head)(h.reshape(h.shape[0], -1))

    k1, k2 = jax.random.split(rng_key)
    fast = Im2colConv2d(2, 3, kernel_size=3, stride=2, padding=1, key=k1)
    ref = eqx.nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, key=k1)
    head = eqx.nn.Linear(3 * 4 * 4, 4, key=k2)
    x = jax.random.normal(jax.random.key(1), (5, 8, 8, 2))
    y = jnp.array([0, 1, 2, 3, 0])
    kw = dict(apply_fn=_batch_apply, likelihood=categorical, prior_precision=1.0)
    post_fast = L.laplace(None, Net(fast, head, True), x, y, **kw)
    post_ref = L.laplace(None, Net(ref, head, False), x, y, **kw)
    for bf, br in zip(post_fast.curvature.blocks, post_ref.curvature.blocks, strict=True):
        for u, v in ((bf.a, br.a), (bf.g, br.g), (bf.count, br.count)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(v))))


# ------------------------------------------------- scalar outputs, default predictive, Hessian check


def test_scalar_linear_layer_kfac_equals_the_exact_ggn():
    """``eqx.nn.Linear("scalar", "scalar")`` (weight ``[1, 1]``, output ``()``): one dense
    layer, so K-FAC equals the exact GGN (an exact identity), with ``apply_fn`` returning
    ``[N]`` and the likelihood taking ``f [N]``; full and diag agree with it too."""
    layer = eqx.nn.Linear("scalar", "scalar", key=jax.random.key(0))
    x = jnp.linspace(-2.0, 2.0, 7)
    y = 0.3 * x + 0.1
    lik = lambda f: dist.Normal(f, 0.2)  # f [N]
    kw = dict(apply_fn=L.vmap_apply, likelihood=lik, prior_precision=0.5)
    dense = {s: L.precision_matrix(L.laplace(None, layer, x, y, structure=s, **kw)) for s in L.STRUCTURES}
    a = jnp.stack([x, jnp.ones_like(x)], 1)  # d f / d (w, b)
    exact = a.T @ a / 0.2**2 + 0.5 * jnp.eye(2)
    # atol: the off-diagonal is sum(x) / 0.04 = 0 up to float32 rounding of sums near 300
    np.testing.assert_allclose(dense["full"], exact, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(dense["kfac"], exact, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(dense["diag"], jnp.diag(jnp.diag(exact)), rtol=1e-5, atol=1e-3)


def test_scalar_mlp_posterior_is_finite_for_every_structure():
    """``eqx.nn.MLP("scalar", "scalar")``: every structure gives a finite log-det, draws and
    predictive (it ended in an IndexError in the K-FAC output tap before)."""
    net = eqx.nn.MLP("scalar", "scalar", 6, 2, key=jax.random.key(0), activation=jnp.tanh)
    x = jnp.linspace(-2.0, 2.0, 12)
    kw = dict(apply_fn=L.vmap_apply, likelihood=lambda f: dist.Normal(f, 0.1), prior_precision=1.0)
    for structure in L.STRUCTURES:
        post = L.laplace(None, net, x, jnp.sin(x), structure=structure, **kw)
        f = L.predictive(jax.random.key(1), post, x, apply_fn=L.vmap_apply, num_samples=3)
        assert f.shape == (3, 12) and np.isfinite(f).all(), structure
        assert np.isfinite(float(L.log_det(post))), structure


def test_default_predictive_is_the_glm_one(rng_key):
    net = MLP(1, 1, (5,), key=jax.random.key(0))
    x = jnp.linspace(-1.0, 1.0, 6)[:, None]
    post = L.laplace(None, net, x, x[:, 0], apply_fn=L.vmap_apply, likelihood=gaussian(0.3), structure="diag")
    kw = dict(apply_fn=L.vmap_apply, num_samples=4)
    np.testing.assert_array_equal(
        L.predictive(rng_key, post, x, **kw), L.predictive(rng_key, post, x, **kw, pred_type="glm")
    )


def test_an_indefinite_hessian_is_an_error_eagerly_and_under_jit():
    """``fisher="hessian"`` at a point that is not a minimum (the initial weights, data far
    from the net): the precision has negative eigenvalues, and the posterior is refused
    (a NaN log-det before); ``fisher="exact"`` (the GGN) at the same point is fine."""
    net = eqx.nn.MLP("scalar", "scalar", 8, 2, key=jax.random.key(0), activation=jnp.tanh)
    x = jnp.linspace(-2.0, 2.0, 20)
    y = jnp.sin(3 * x)
    kw = dict(apply_fn=L.vmap_apply, likelihood=lambda f: dist.Normal(f, 0.1), structure="full")
    with pytest.raises(eqx.EquinoxRuntimeError, match="not positive definite"):
        L.laplace(None, net, x, y, fisher="hessian", **kw)
    jitted = eqx.filter_jit(lambda n: L.log_det(L.laplace(None, n, x, y, fisher="hessian", **kw)))
    with pytest.raises(Exception, match="not positive definite"):
        jax.block_until_ready(jitted(net))
    assert np.isfinite(float(L.log_det(L.laplace(None, net, x, y, fisher="exact", **kw))))


# ------------------------------------------------------------------ a model's own latents


def _linear_case(num_tasks=4, num_examples=6):
    from metaprior.models.cases import hierarchical_linear_model, hierarchical_linear_tasks

    batch = hierarchical_linear_tasks(jax.random.key(0), num_tasks, num_examples)[0]
    return hierarchical_linear_model, batch


def test_task_laplace_equals_the_conditional_posterior_of_a_linear_gaussian_model():
    """Hierarchical linear regression with ``mu`` held: each ``w_j`` has the Gaussian
    conditional posterior with precision ``I / tau^2 + X_j^T X_j / sigma^2`` (masked rows
    out), whatever the point (the log density is quadratic): an exact identity. ``diag``
    is its diagonal; draws have that covariance (4,000 draws: sd error about 2%, so 10%)."""
    model, batch = _linear_case()
    t, _, d = batch.x.shape
    mode = {"mu": jnp.array([0.3, -0.2]), "w": jax.random.normal(jax.random.key(1), (t, 1, d))}
    post = L.task_laplace(model, batch, mode=mode, local_sites=["w"])
    xm = np.asarray(batch.x) * np.asarray(batch.mask)[..., None]
    exact = np.eye(d) / 0.5**2 + np.einsum("tnd,tne->tde", xm, xm) / 0.5**2
    np.testing.assert_allclose(post.precision, exact, rtol=1e-4)
    np.testing.assert_array_equal(post.mean, mode["w"][:, 0])
    diag = L.task_laplace(model, batch, mode=mode, local_sites=["w"], structure="diag")
    np.testing.assert_allclose(diag.precision, np.diagonal(exact, axis1=1, axis2=2), rtol=1e-4)
    draws = L.sample_task_laplace(jax.random.key(2), post, 4000)
    assert draws["w"].shape == (4000, t, 1, d) and draws["mu"].shape == (4000, d)
    np.testing.assert_array_equal(draws["mu"][7], mode["mu"])
    cov = np.stack([np.cov(np.asarray(draws["w"][:, j, 0]).T) for j in range(t)])
    np.testing.assert_allclose(cov, np.linalg.inv(exact), rtol=0.1, atol=1e-3)


def test_task_laplace_refuses_a_point_that_is_not_a_minimum():
    import numpyro

    def model(y):
        with numpyro.plate("tasks", y.shape[0], dim=-1):
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(w**2, 0.1), obs=y)

    y = jnp.ones(3)  # at w = 0 the curvature of -log p is 1 - 2 y / 0.1^2 = -199
    with pytest.raises(ValueError, match=r"task\(s\) \[0, 1, 2\].*not positive definite"):
        L.task_laplace(model, y, mode={"w": jnp.zeros(3)}, local_sites=["w"])
    post = L.task_laplace(model, y, mode={"w": jnp.ones(3)}, local_sites=["w"], structure="diag")
    # d^2/dw^2 of (y - w^2)^2 / (2 s^2) + w^2 / 2 is (4 w^2 - 2 (y - w^2)) / s^2 + 1: 401 at w = y = 1
    np.testing.assert_allclose(post.precision, np.full((3, 1), 1 + 4 / 0.1**2), rtol=1e-5)
    with pytest.raises(ValueError, match="'kfac' needs a network"):
        L.task_laplace(model, y, mode={"w": jnp.ones(3)}, local_sites=["w"], structure="kfac")
