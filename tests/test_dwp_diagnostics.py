"""Deep-weight-prior diagnostics against a linear-Gaussian prior, whose marginal
``p(w) = N(b, A A^T + d^2 I)`` and exact posterior ``p(z | w)`` are known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metaprior.models.dwp.diagnostics import auxiliary_bound, kernel_log_marginal, mean_kernel_share, prior_only_vi

K, LATENT, D0 = 2, 2, 0.3
B = jnp.array([[0.5, -0.2], [0.1, 0.4]])
A = jnp.array([[1.0, 0.0], [0.0, 0.8], [1.0, 0.0], [0.0, -0.8]])  # orthogonal columns: p(z | w) is factorised


def decoder(z):
    loc = B.reshape(-1) + z @ A.T
    return loc.reshape(z.shape[:-1] + (K, K)), jnp.full(z.shape[:-1] + (K, K), D0)


def exact_encoder(w):
    precision = 1.0 + jnp.sum(A * A, axis=0) / D0**2  # diagonal, because A's columns are orthogonal
    resid = w.reshape(w.shape[:-2] + (K * K,)) - B.reshape(-1)
    return (resid @ A) / D0**2 / precision, jnp.broadcast_to(precision**-0.5, w.shape[:-2] + (LATENT,))


def log_marginal(w):
    cov = A @ A.T + D0**2 * jnp.eye(K * K)
    return jax.scipy.stats.multivariate_normal.logpdf(w.reshape(-1, K * K), B.reshape(-1), cov)


def samples(n, seed=0):
    z = jax.random.normal(jax.random.key(seed), (n, LATENT))
    loc, scale = decoder(z)
    return loc + scale * jax.random.normal(jax.random.key(seed + 1), loc.shape)


def test_mean_kernel_share_identities():
    w = np.random.default_rng(0).normal(size=(10, 3, 3))
    assert mean_kernel_share(np.repeat(w[:1], 5, axis=0)) == pytest.approx(1.0)
    assert mean_kernel_share(np.concatenate([w, -w])) == pytest.approx(0.0, abs=1e-12)
    assert mean_kernel_share(7.0 * w) == pytest.approx(mean_kernel_share(w))
    with pytest.raises(ValueError, match="kernels"):
        mean_kernel_share(np.zeros((0, 3, 3)))
    with pytest.raises(ValueError, match="all zero"):
        mean_kernel_share(np.zeros((4, 3, 3)))


def test_bound_with_the_exact_posterior_is_the_log_marginal():
    # r = p(z | w) makes log p(w|z) + log p(z) - log r(z|w) = log p(w) for every z: equality, no noise
    w = samples(200)
    bound = auxiliary_bound(jax.random.key(2), exact_encoder, decoder, w, num_samples=4)
    np.testing.assert_allclose(bound, log_marginal(w), atol=2e-4)


def test_bound_is_below_and_the_weighted_estimate_at_the_log_marginal_with_a_poor_encoder():
    w = samples(200, seed=3)

    def poor(w):
        loc, scale = exact_encoder(w)
        return loc + 0.2, 0.7 * scale  # about one posterior sd off, and too narrow

    exact = np.asarray(log_marginal(w))
    bound = np.asarray(auxiliary_bound(jax.random.key(4), poor, decoder, w, num_samples=256))
    estimate = np.asarray(kernel_log_marginal(jax.random.key(5), poor, decoder, w, num_samples=4096))
    # the bound's gap here is KL(r || p(z|w)), about 1 nat per kernel (0.97)
    assert np.all(bound < exact - 0.2)
    # 4,096 draws from a mixture proposal that covers p(z|w): the mean error is a few 1e-3
    # nats (seeded); 0.02 allows for float32 and the estimate's downward bias
    assert abs(np.mean(estimate - exact)) < 0.02
    assert np.max(np.abs(estimate - exact)) < 0.1


def test_prior_only_vi_puts_every_kernel_mean_on_the_prior_mode():
    # Mean-field VI without data: the optimum of KL(N(loc, diag s^2) || N(b, S)) is loc = b and
    # s^2 = 1 / diag(S^-1), whatever the start: every kernel's mean becomes the same kernel
    init = samples(64, seed=6)
    assert mean_kernel_share(init) < 0.3
    loc, scale = prior_only_vi(
        jax.random.key(7),
        exact_encoder,
        decoder,
        init,
        num_steps=3000,
        learning_rate=optax.cosine_decay_schedule(1e-2, 3000, alpha=0.01),
        init_log_scale=-1.0,
    )
    cov = A @ A.T + D0**2 * jnp.eye(K * K)
    optimal_scale = jnp.diag(jnp.linalg.inv(cov)) ** -0.5
    # One draw per step and a weak pull along A's columns (prior variance 2 there): each mean
    # random-walks around b by a few 1e-2 (seeded: mean error 0.015, median |error| 0.03)
    loc = np.asarray(loc)
    np.testing.assert_allclose(loc.mean(axis=0), B, atol=0.03)
    assert np.median(np.abs(loc - np.asarray(B))) < 0.06
    np.testing.assert_allclose(np.median(np.asarray(scale).reshape(-1, K * K), axis=0), optimal_scale, rtol=0.1)
    assert mean_kernel_share(loc) > 0.9  # seeded: 0.95


def test_diagnostics_name_bad_kernels():
    with pytest.raises(ValueError, match="kernels"):
        auxiliary_bound(jax.random.key(0), exact_encoder, decoder, jnp.zeros((3, 2, 3)))
    with pytest.raises(ValueError, match="num_samples"):
        kernel_log_marginal(jax.random.key(0), exact_encoder, decoder, jnp.zeros((3, 2, 2)), num_samples=1)
    with pytest.raises(ValueError, match="even"):
        kernel_log_marginal(jax.random.key(0), exact_encoder, decoder, jnp.zeros((3, 2, 2)), num_samples=5)
    with pytest.raises(ValueError, match="init_loc"):
        prior_only_vi(jax.random.key(0), exact_encoder, decoder, jnp.zeros((0, 2, 2)))
