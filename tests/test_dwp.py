"""The deep weight prior: model, auxiliary guide and bound, kernel VAE, prior object.

The central checks use a prior whose marginal is analytic: a linear-Gaussian decoder
``w = A z + b + s0 * eps`` with ``z ~ N(0, I)``, so ``p(w) = N(b, A A^T + s0^2 I)`` and
the posterior ``p(z | w)`` is Gaussian (diagonal when ``A`` has orthogonal columns).
The model with that DWP and the auxiliary guide, and the model with the analytic
marginal and the plain guide, see the same ``w`` draws for a given key, so their
ELBO estimates can be compared draw by draw.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import Trace_ELBO

from metaprior.experiments.dwp_mnist import make_config
from metaprior.inference.dwp import DWPSettings, bnn_loss, bnn_optimizer, build_guide, paired_win_rate
from metaprior.inference.guides import AuxiliaryGuide, AuxiliarySite, latent_elbo, local_reparam_conv2d
from metaprior.inference.meta import fit, meta_learner
from metaprior.models.dwp import (
    ConvNet,
    DeepKernelPrior,
    DeepWeightPrior,
    KernelPrior,
    KernelVAE,
    LogUniformKernelPrior,
    NormalKernelPrior,
    decoder_snr,
    dwp_model,
    dwp_model_params,
    kernel_sites,
    kernel_vae_elbo,
)

K = 3  # kernel size of the small test net
FILTERS = (2, 3)  # 12x12 images: 12 -> 10 -> 5 -> 3 -> 1


# --------------------------------------------------------------------------- fixtures


class LinearGaussianDecoder(eqx.Module):
    """``p(w | z) = N(A z + b, s0^2 I)`` over ``k x k`` kernels (flattened ``D = k^2``)."""

    A: jax.Array  # [D, d]
    b: jax.Array  # [D]
    s0: float = eqx.field(static=True)
    kernel_size: int = eqx.field(static=True)

    @property
    def latent_dim(self) -> int:
        return self.A.shape[1]

    def __call__(self, z):
        k = self.kernel_size
        loc = (z @ self.A.T + self.b).reshape(z.shape[:-1] + (k, k))
        return loc, jnp.full(loc.shape, self.s0)

    def marginal(self) -> dist.MultivariateNormal:
        cov = self.A @ self.A.T + self.s0**2 * jnp.eye(self.A.shape[0])
        return dist.MultivariateNormal(self.b, covariance_matrix=cov)

    def posterior(self, w):
        """Exact ``p(z | w)`` (diagonal: ``A`` has orthogonal columns): ``(loc, scale)``."""
        col2 = jnp.sum(self.A**2, axis=0)  # A^T A is diag(col2)
        var = 1.0 / (1.0 + col2 / self.s0**2)
        flat = w.reshape(w.shape[:-2] + (-1,))
        loc = var * ((flat - self.b) @ self.A) / self.s0**2
        return loc, jnp.broadcast_to(jnp.sqrt(var), loc.shape)


class PosteriorEncoder(eqx.Module):
    """``r(z | w)``: the exact posterior with its mean shifted by ``shift`` and its scale
    multiplied by ``stretch`` (``shift = 0, stretch = 1``: exact)."""

    decoder: LinearGaussianDecoder
    shift: jax.Array
    stretch: jax.Array

    def __call__(self, w):
        loc, scale = self.decoder.posterior(w)
        return loc + self.shift, scale * self.stretch


class MarginalKernelPrior(KernelPrior):
    """The analytic marginal ``p(w)`` of a :class:`LinearGaussianDecoder` (no ``z`` site).

    The ``w`` site carries no density of its own (a masked Normal, so the guide's ``w``
    is replayed into it); the marginal enters through a factor.
    """

    decoder: LinearGaussianDecoder

    def __call__(self, sites, kernel_size):
        k = kernel_size
        w = numpyro.sample(sites.w, dist.Normal(jnp.zeros((k, k)), 1.0).mask(False).to_event(2))
        numpyro.factor(sites.w + "_marginal", self.decoder.marginal().log_prob(w.reshape(w.shape[:-2] + (-1,))))
        return w


def _decoder(key, latent_dim=2, s0=0.3):
    k_q, k_c, k_b = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(k_q, (K * K, latent_dim)))
    cols = 0.5 + jax.random.uniform(k_c, (latent_dim,))
    return LinearGaussianDecoder(q * cols, 0.1 * jax.random.normal(k_b, (K * K,)), s0, K)


@pytest.fixture
def small():
    """A small net, data, linear-Gaussian decoders per layer, and the matching pieces."""
    key = jax.random.key(1)
    k_net, k_x, k_y, k_d0, k_d1 = jax.random.split(key, 5)
    net = ConvNet(filters=FILTERS, kernel_sizes=(K, K), image_size=12, key=k_net)
    x = jax.random.uniform(k_x, (8, 12, 12, 1))
    y = jax.random.randint(k_y, (8,), 0, 10)
    decoders = (_decoder(k_d0), _decoder(k_d1))
    return dict(net=net, x=x, y=y, decoders=decoders)


def _aux_guide(net, encoders, **kwargs):
    sites = []
    for layer, shape in enumerate(net.kernel_shapes):
        names = kernel_sites(layer)
        enc = encoders[layer]
        sites.append(
            AuxiliarySite(names.w, names.plate, shape[0] * shape[1], shape[2:], None if enc is None else names.z, enc)
        )
    return AuxiliaryGuide(tuple(sites), **kwargs)


def _guide_params(guide, net, key):
    params = {**guide.init_params(key), **dwp_model_params(net)}
    # a posterior q(w) wide enough that the bound's terms matter
    for name in list(params):
        if name.endswith("_log_scale"):
            params[name] = jnp.full(params[name].shape, math.log(0.2))
    return params


def _elbo_pair(small, stretch, shift, num_particles, key=None):
    """(L_aux estimate, true ELBO estimate) from the same w draws, and the number of kernels."""
    key = jax.random.key(5) if key is None else key
    net, x, y, decs = small["net"], small["x"], small["y"], small["decoders"]
    d = decs[0].latent_dim
    encoders = [PosteriorEncoder(dec, jnp.full((d,), shift), jnp.full((d,), stretch)) for dec in decs]
    aux_guide = _aux_guide(net, encoders)
    plain_guide = _aux_guide(net, [None, None])
    params = _guide_params(aux_guide, net, jax.random.key(2))
    plain_params = {k: v for k, v in params.items() if "encoder" not in k}
    elbo = Trace_ELBO(num_particles=num_particles)
    l_aux = -elbo.loss(
        key, params, dwp_model, aux_guide, x, y, net=net, priors=tuple(DeepKernelPrior(dec) for dec in decs)
    )
    true = -elbo.loss(
        key, plain_params, dwp_model, plain_guide, x, y, net=net, priors=tuple(MarginalKernelPrior(dec) for dec in decs)
    )
    num_kernels = sum(s[0] * s[1] for s in net.kernel_shapes)
    return float(l_aux), float(true), num_kernels


# --------------------------------------------------------------------------- the auxiliary bound


def test_aux_bound_equals_elbo_with_exact_posterior(small):
    """With r(z | w) = p(z | w), log p(w|z) + log p(z) - log r(z|w) = log p(w) for every z:
    the two estimates agree draw by draw."""
    l_aux, true, _ = _elbo_pair(small, stretch=1.0, shift=0.0, num_particles=4)
    # float32 sums of ~10^3-nat terms: agreement to about 1e-5 relative
    assert l_aux == pytest.approx(true, rel=1e-5, abs=1e-2)


def test_aux_bound_is_below_elbo_by_expected_kl(small):
    """L_aux = ELBO - E_q sum KL(r(z|w) || p(z|w)). With r the posterior shifted by delta
    and stretched by c in each of d dimensions, that KL is the same for every w:
    sum_i [-log c + c^2/2 - 1/2 + delta^2 / (2 var_i)], times the number of kernels."""
    c, delta, particles = 1.5, 0.3, 400
    l_aux, true, num_kernels = _elbo_pair(small, stretch=c, shift=delta, num_particles=particles)
    gap = 0.0
    for layer, dec in enumerate(small["decoders"]):
        var = 1.0 / (1.0 + np.sum(np.asarray(dec.A) ** 2, axis=0) / dec.s0**2)
        per_kernel = np.sum(-math.log(c) + c**2 / 2 - 0.5 + delta**2 / (2 * var))
        shape = small["net"].kernel_shapes[layer]
        gap += per_kernel * shape[0] * shape[1]
    assert l_aux < true
    # The per-draw gap is a one-sample estimate of the KL per kernel; its standard
    # deviation over 400 draws and 8 kernels is about 0.1 nats (measured), so 5% of a
    # ~2-nat gap is several standard errors.
    assert true - l_aux == pytest.approx(gap, rel=0.05)


def test_latent_elbo_is_the_bound_without_observations(small):
    """latent_elbo + the log-likelihood of the same draws = the pair's full ELBO."""
    net, x, y, decs = small["net"], small["x"], small["y"], small["decoders"]
    d = decs[0].latent_dim
    guide = _aux_guide(net, [PosteriorEncoder(dec, jnp.zeros(d), jnp.ones(d)) for dec in decs])
    params = _guide_params(guide, net, jax.random.key(3))
    priors = tuple(DeepKernelPrior(dec) for dec in decs)
    key = jax.random.key(4)
    full = -Trace_ELBO().loss(key, params, dwp_model, guide, x, y, net=net, priors=priors)
    prior_part = latent_elbo(key, params, dwp_model, guide, x, y, net=net, priors=priors)
    # the log-likelihood at the guide's draws for this key
    _, k_guide = jax.random.split(key)
    tr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), k_guide)).get_trace()
    mtr = handlers.trace(handlers.replay(handlers.substitute(dwp_model, data=params), tr)).get_trace(
        x, y, net=net, priors=priors
    )
    loglik = mtr["y"]["fn"].log_prob(mtr["y"]["value"]).sum()
    assert float(full) == pytest.approx(float(prior_part + loglik), rel=1e-5, abs=1e-3)


# --------------------------------------------------------------------------- shapes of every site


def _traces(net, priors, guide, params, x, y, batch_size=None):
    key = jax.random.key(0)
    gtr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), key)).get_trace()
    mtr = handlers.trace(
        handlers.replay(handlers.seed(handlers.substitute(dwp_model, data=params), key), gtr)
    ).get_trace(x, y, net=net, priors=priors, batch_size=batch_size)
    return mtr, gtr


@pytest.mark.parametrize("kind", ["dwp", "normal", "loguniform"])
def test_site_shapes(small, kind):
    net, x, y = small["net"], small["x"], small["y"]
    vaes = [KernelVAE(K, 2, (8,), key=jax.random.key(i)) for i in range(2)]
    prior = DeepWeightPrior(vaes)
    priors = {
        "dwp": prior.priors(),
        "normal": (NormalKernelPrior(),) * 2,
        "loguniform": (LogUniformKernelPrior(),) * 2,
    }[kind]
    guide = build_guide(net, priors, prior=prior)
    params = {**guide.init_params(jax.random.key(1)), **dwp_model_params(net)}
    mtr, gtr = _traces(net, priors, guide, params, x, y, batch_size=4)
    for layer, (out, inp, k, _) in enumerate(net.kernel_shapes):
        names = kernel_sites(layer)
        for tr in (mtr, gtr):
            w = tr[names.w]
            assert w["value"].shape == (out * inp, k, k)
            assert w["fn"].batch_shape == (out * inp,) and w["fn"].event_shape == (k, k)
        if kind == "dwp":
            for tr in (mtr, gtr):
                z = tr[names.z]
                assert z["value"].shape == (out * inp, 2)
                assert z["fn"].batch_shape == (out * inp,) and z["fn"].event_shape == (2,)
        else:
            assert names.z not in mtr and names.z not in gtr
    assert mtr["y"]["value"].shape == (4,)
    assert mtr["y"]["fn"].batch_shape == (4,) and mtr["y"]["fn"].event_shape == ()
    assert mtr["y"]["scale"] == pytest.approx(x.shape[0] / 4)  # plate subsampling keeps the ELBO unbiased
    latent = {n for n, s in mtr.items() if s["type"] == "sample" and not s["is_observed"]}
    guided = {n for n, s in gtr.items() if s["type"] == "sample"}
    assert latent == guided  # the guide covers every latent site of the model, and only those
    assert [n for n, s in mtr.items() if s["type"] == "param"] == ["net$params"]


def test_guide_moments_and_scale_parameterisations(small):
    net = small["net"]
    for scale_param, raw_name in (("log_scale", "_log_scale"), ("truncated_alpha", "_logit_alpha")):
        guide = _aux_guide(net, [None, None], scale_param=scale_param)
        params = guide.init_params(jax.random.key(0))
        moments = guide.moments(params)
        for layer, (out, inp, k, _) in enumerate(net.kernel_shapes):
            name = kernel_sites(layer).w
            assert name + raw_name in params
            loc, scale = moments[name]
            assert loc.shape == scale.shape == (out * inp, k, k)
            assert bool(jnp.all(scale >= 0))
            if scale_param == "truncated_alpha":  # scale^2 = alpha loc^2 with alpha <= 1
                assert bool(jnp.all(scale <= jnp.abs(loc) + 1e-7))
    with pytest.raises(ValueError, match="scale_param"):
        AuxiliaryGuide((), scale_param="multiplicative")


def test_model_runs_forward_from_the_deep_weight_prior(small):
    """Principle 1: the same model gives the prior predictive (labels=None)."""
    net, x = small["net"], small["x"]
    priors = tuple(DeepKernelPrior(dec) for dec in small["decoders"])
    tr = handlers.trace(handlers.seed(dwp_model, jax.random.key(0))).get_trace(x, None, net=net, priors=priors)
    assert tr["y"]["value"].shape == (x.shape[0],)
    assert not tr["y"]["is_observed"]


# --------------------------------------------------------------------------- local reparameterisation


def test_local_reparam_conv_matches_weight_sampling_moments():
    """Per output unit the LRT draw has the mean and variance of conv(x, W), W ~ q."""
    key = jax.random.key(0)
    k_x, k_l, k_s, k_w, k_e = jax.random.split(key, 5)
    x = jax.random.normal(k_x, (2, 3, 6, 6))
    loc = jax.random.normal(k_l, (4, 3, 3, 3))
    scale = 0.5 * jax.random.uniform(k_s, (4, 3, 3, 3))
    conv = lambda a, w: jax.lax.conv_general_dilated(
        a,
        w,
        (1, 1),
        "VALID",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    n = 4000
    lrt = jax.vmap(lambda k: local_reparam_conv2d(k, x, loc, scale))(jax.random.split(k_e, n))
    sampled = jax.vmap(lambda k: conv(x, loc + scale * jax.random.normal(k, loc.shape)))(jax.random.split(k_w, n))
    exact_mean, exact_var = conv(x, loc), conv(x * x, scale * scale)
    for draws in (lrt, sampled):
        # standard error of a mean over 4000 draws is sd / 63; 5 of them
        se = jnp.sqrt(exact_var / n)
        assert bool(jnp.all(jnp.abs(draws.mean(0) - exact_mean) < 5 * se + 1e-6))
        # the variance estimate has relative sd sqrt(2 / n) ~ 2.2%; allow 12%
        assert bool(jnp.all(jnp.abs(draws.var(0) / exact_var - 1) < 0.12))


# --------------------------------------------------------------------------- baseline KLs


def test_normal_kl_matches_numpyro():
    loc = jnp.array([[[0.3, -1.0], [0.0, 2.0]]])
    scale = jnp.array([[[0.1, 0.5], [1.0, 2.0]]])
    expected = dist.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 2.0)).sum(axis=(-2, -1))
    assert np.allclose(NormalKernelPrior(2.0).kl(loc, scale), expected, rtol=1e-6)


def test_loguniform_kl_approximation_up_to_a_constant():
    """Molchanov et al. (2017): for q = N(theta, alpha theta^2) and p(w) ~ 1/|w|,
    -KL = 0.5 log alpha - E_{eps ~ N(1, alpha)} log|eps| + const. The approximation
    should track that to about 0.01 nats over alpha in [1e-3, 1e3] (their Fig. 1)."""
    from scipy import integrate

    exact = []
    alphas = np.logspace(-3, 3, 13)
    for a in alphas:
        sd = math.sqrt(a)
        f = lambda e: math.log(abs(e)) * math.exp(-0.5 * ((e - 1) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        lo, hi = 1 - 12 * sd, 1 + 12 * sd
        pts = [0.0] if lo < 0 < hi else None
        e_log, _ = integrate.quad(f, lo, hi, points=pts, limit=400)
        exact.append(0.5 * math.log(a) - e_log)
    theta = 0.7
    loc = jnp.full((len(alphas), 1, 1), theta)
    scale = jnp.asarray(np.sqrt(alphas) * theta, jnp.float32)[:, None, None]
    approx = -np.asarray(LogUniformKernelPrior.kl(loc, scale))
    offset = approx - np.asarray(exact)
    assert np.ptp(offset) < 0.02


# --------------------------------------------------------------------------- the kernel VAE and the prior object


def _synthetic_kernels(key, n, k=5):
    """Oriented edge-like kernels: a random direction's ramp, times a Gaussian window, + noise."""
    k_a, k_s, k_n = jax.random.split(key, 3)
    angle = jax.random.uniform(k_a, (n,), maxval=2 * math.pi)
    g = jnp.arange(k) - (k - 1) / 2
    xx, yy = jnp.meshgrid(g, g)
    ramp = jnp.cos(angle)[:, None, None] * xx + jnp.sin(angle)[:, None, None] * yy
    window = jnp.exp(-(xx**2 + yy**2) / k)
    amp = 0.2 + 0.1 * jax.random.uniform(k_s, (n, 1, 1))
    return amp * ramp * window + 0.02 * jax.random.normal(k_n, (n, k, k))


def test_kernel_vae_elbo_improves_with_training():
    key = jax.random.key(0)
    k_tr, k_te, k_init, k_fit, k_ev = jax.random.split(key, 5)
    train, test = _synthetic_kernels(k_tr, 512), _synthetic_kernels(k_te, 256)
    vae = KernelVAE(5, 2, (32,), key=k_init)

    def loss(v, rng_key, batch):
        return -jnp.mean(kernel_vae_elbo(rng_key, v, batch))

    def score(v):
        return float(jnp.mean(jax.vmap(lambda k: kernel_vae_elbo(k, v, test))(jax.random.split(k_ev, 8))))

    before = score(vae)
    result = fit(
        k_fit,
        meta_learner(loss, optax.adam(3e-3)),
        vae,
        300,
        data=train,
        sample_batch=lambda k, d: d[jax.random.randint(k, (128,), 0, d.shape[0])],
        steps_per_call=50,
        progress=False,
    )
    after = score(result.state.params)
    # held-out ELBO per kernel (25 numbers): starts near -25 nats (unit-scale decoder);
    # training must gain tens of nats; 20 is far beyond the estimate's noise (< 0.5)
    assert after > before + 20
    assert np.mean(result.losses[-50:]) < np.mean(result.losses[:50])


def test_decoder_snr_is_the_norm_ratio():
    # mu(z) = c * (z_0 + 3) * U (U a fixed unit-norm kernel), sigma = s: the ratio is
    # c |z_0 + 3| / (s k), whose median over z_0 ~ N(0, 1) is 3 c / (s k) (z_0 + 3 > 0
    # but for 0.13% of draws, which cannot move the median of 4,000 draws past 3 +- 0.06)
    k, c, s = 3, 0.2, 0.05
    unit = jnp.arange(k * k, dtype=jnp.float32).reshape(k, k)
    unit = unit / jnp.linalg.norm(unit)

    def decoder(z):
        loc = c * (z[..., :1, None] + 3.0) * unit
        return loc, jnp.full(loc.shape, s)

    snr = decoder_snr(jax.random.key(0), decoder, latent_dim=2, num_samples=4000)
    assert abs(snr - 3 * c / (s * k)) < 0.06 * c / (s * k)
    with pytest.raises(ValueError, match="num_samples"):
        decoder_snr(jax.random.key(0), decoder, latent_dim=2, num_samples=0)


def test_paired_win_rate_compares_within_pairs():
    # the means say second is ahead (0.43 vs 0.57); within pairs first wins two of three
    first, second = [0.3, 0.5, 0.5], [0.9, 0.4, 0.4]
    assert np.mean(first) < np.mean(second)
    assert paired_win_rate(first, second) == pytest.approx(2 / 3)
    assert paired_win_rate([0.5, 0.7, 0.1], [0.4, 0.6, 0.0]) == 1.0
    assert paired_win_rate([0.5], [0.5]) == 0.0  # a tie is not a win
    with pytest.raises(ValueError, match="one shape"):
        paired_win_rate([0.5, 0.6], [0.5])


def test_prior_samples_have_the_kernel_shape():
    prior = DeepWeightPrior(
        [KernelVAE(7, 2, (8,), key=jax.random.key(0)), KernelVAE(5, 4, (8,), key=jax.random.key(1))]
    )
    assert prior.kernel_sizes == (7, 5)
    assert prior.vaes[0].sample(jax.random.key(2), 11).shape == (11, 7, 7)
    assert prior.vaes[1].sample(jax.random.key(2), 3, noise=False).shape == (3, 5, 5)
    assert prior.sample_kernels(jax.random.key(3), (6, 4, 5, 5), layer=1).shape == (6, 4, 5, 5)
    net = ConvNet(filters=(4, 6), kernel_sizes=(7, 5), key=jax.random.key(4))
    init = prior.init_net(jax.random.key(5), net)
    assert init.kernel_shapes == net.kernel_shapes
    assert [c.weight.shape for c in init.convs] == [(4, 1, 7, 7), (6, 4, 5, 5)]
    assert not np.allclose(init.convs[0].weight, net.convs[0].weight)
    assert np.array_equal(init.head.weight, net.head.weight)
    with pytest.raises(ValueError, match="5x5"):
        prior.sample_kernels(jax.random.key(3), (6, 4, 3, 3), layer=1)


def test_prior_save_load_roundtrip(tmp_path):
    prior = DeepWeightPrior(
        [KernelVAE(7, 2, (8, 8), key=jax.random.key(0)), KernelVAE(5, 4, (16,), key=jax.random.key(1), min_scale=1e-2)]
    )
    path = prior.save(tmp_path / "sub" / "prior.npz", metadata={"source": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["prior.npz"]  # no temporary file left
    loaded, meta = DeepWeightPrior.load_with_metadata(path)
    assert meta == {"source": "test"}
    for a, b in zip(
        jax.tree.leaves(eqx.filter(prior, eqx.is_array)), jax.tree.leaves(eqx.filter(loaded, eqx.is_array))
    ):
        assert np.array_equal(a, b)
    assert loaded.vaes[1].decoder.min_scale == 1e-2 and loaded.vaes[0].hidden == (8, 8)
    key = jax.random.key(9)
    assert np.array_equal(prior.vaes[0].sample(key, 5), loaded.vaes[0].sample(key, 5))
    # failures say what is wrong
    with pytest.raises(FileNotFoundError):
        DeepWeightPrior.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt"):
        DeepWeightPrior.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a"):
        DeepWeightPrior.load(tmp_path / "other.npz")


# --------------------------------------------------------------------------- the training loss


def test_bnn_optimizer_freezes_the_encoder_and_decays_linearly(small):
    """freeze_encoder: r(z | w)'s parameters keep their exact initial values while q moves;
    lr_schedule="linear": the step size reaches 0 at num_steps, so a step past it changes nothing."""
    net, x, y = small["net"], small["x"], small["y"]
    prior = DeepWeightPrior([KernelVAE(K, 2, (8,), key=jax.random.key(i)) for i in range(2)])
    guide = build_guide(net, prior.priors(), prior=prior)
    params = {**guide.init_params(jax.random.key(1)), **dwp_model_params(net)}
    loss = bnn_loss("dwp", net, prior.priors(), guide, batch_size=4)
    data = (x, y, jnp.int32(6))
    enc = [k for k in params if k.endswith("_encoder$params")]
    assert enc
    for freeze in (False, True):
        settings = DWPSettings(num_steps=2, learning_rate=1e-2, lr_schedule="linear", freeze_encoder=freeze)
        learner = meta_learner(loss, bnn_optimizer(settings))
        state = learner.init(params)
        history = [state.params]
        for i in range(3):
            state, _ = jax.jit(learner.step)(jax.random.key(i), state, data)
            history.append(state.params)
        moved = [
            not all(
                bool(jnp.array_equal(a, b))
                for a, b in zip(jax.tree.leaves(history[0][k]), jax.tree.leaves(history[1][k]))
            )
            for k in enc
        ]
        assert all(moved) != freeze
        loc = [k for k in params if k.endswith("_loc")][0]
        assert not jnp.array_equal(history[0][loc], history[1][loc])
        assert jnp.array_equal(history[2][loc], history[3][loc])  # step 3, past num_steps = 2: lr = 0
    with pytest.raises(ValueError, match="lr_schedule"):
        bnn_optimizer(DWPSettings(lr_schedule="cosine"))


def test_bnn_optimizer_scale_lr_moves_only_the_log_scales_faster(small):
    """scale_lr: Adam's first step moves every parameter by its step size times
    ``g / (|g| + eps)``, so the log scales move by scale_lr (up to eps / |g|: 1%) and the
    locs by learning_rate, ten times less here."""
    net, x, y = small["net"], small["x"], small["y"]
    prior = DeepWeightPrior([KernelVAE(K, 2, (8,), key=jax.random.key(i)) for i in range(2)])
    guide = build_guide(net, prior.priors(), prior=prior)
    params = {**guide.init_params(jax.random.key(1)), **dwp_model_params(net)}
    loss = bnn_loss("dwp", net, prior.priors(), guide, batch_size=4)
    settings = DWPSettings(num_steps=2, learning_rate=1e-3, scale_lr=1e-2)
    learner = meta_learner(loss, bnn_optimizer(settings))
    state, _ = jax.jit(learner.step)(jax.random.key(0), learner.init(params), (x, y, jnp.int32(6)))
    scales = [k for k in params if k.endswith("_log_scale")]
    locs = [k for k in params if k.endswith("_loc")]
    assert scales and locs
    for names, size in ((scales, 1e-2), (locs, 1e-3)):
        step = np.concatenate([np.abs(np.ravel(state.params[k] - params[k])) for k in names])
        np.testing.assert_allclose(np.median(step), size, rtol=0.01)
    with pytest.raises(ValueError, match="scale_lr"):
        bnn_optimizer(DWPSettings(scale_lr=-1.0))


def test_bnn_loss_traces_once_and_is_finite(small):
    """The DWP loss (LRT data term + latent_elbo) compiles once and runs under jit and vmap."""
    net, x, y = small["net"], small["x"], small["y"]
    prior = DeepWeightPrior([KernelVAE(K, 2, (8,), key=jax.random.key(i)) for i in range(2)])
    priors = prior.priors()
    guide = build_guide(net, priors, prior=prior)
    params = {**guide.init_params(jax.random.key(1)), **dwp_model_params(net)}
    traces = []
    inner = bnn_loss("dwp", net, priors, guide, batch_size=4)

    def loss(p, key, data):
        traces.append(1)
        return inner(p, key, data)

    learner = meta_learner(loss, optax.adam(1e-3))
    step = jax.jit(learner.step)
    state = learner.init(params)
    data = (x, y, jnp.int32(6))
    for i in range(3):
        state, info = step(jax.random.key(i), state, data)
        assert np.isfinite(info.loss)
    assert len(traces) == 1
    # vmap over two data sets (the experiment stacks splits this way)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
    out = jax.vmap(inner)(
        stacked, jax.random.split(jax.random.key(0), 2), (jnp.stack([x, x]), jnp.stack([y, y]), jnp.array([4, 8]))
    )
    assert out.shape == (2,) and bool(jnp.all(jnp.isfinite(out)))


def test_lrt_expected_log_likelihood_is_exact_for_one_output_position():
    """Where a kernel covers the whole input (one output position), the LRT draw has
    exactly the distribution of conv(x, W), W ~ q: the expected log-likelihood through it
    equals the one through sampled weights (the pair ELBO's data term), with a smaller
    variance (independent noise per example instead of one W for the batch)."""
    key = jax.random.key(0)
    k_x, k_l, k_s = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (16, 4, 5, 5))
    loc = jax.random.normal(k_l, (3, 4, 5, 5))
    scale = 0.3 * jax.random.uniform(k_s, (3, 4, 5, 5))
    y = jnp.arange(16) % 3

    def expected_loglik(draw_logits, n):
        keys = jax.random.split(jax.random.key(7), n)
        vals = jax.vmap(
            lambda k: jnp.sum(
                jnp.take_along_axis(jax.nn.log_softmax(draw_logits(k).reshape(16, 3)), y[:, None], axis=-1)
            )
        )(keys)
        return float(vals.mean()), float(vals.std() / math.sqrt(n)), float(vals.std())

    conv = lambda a, w: jax.lax.conv_general_dilated(
        a,
        w,
        (1, 1),
        "VALID",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    m_lrt, se_lrt, sd_lrt = expected_loglik(lambda k: local_reparam_conv2d(k, x, loc, scale), 20000)
    m_w, se_w, sd_w = expected_loglik(lambda k: conv(x, loc + scale * jax.random.normal(k, loc.shape)), 20000)
    assert abs(m_lrt - m_w) < 4 * math.hypot(se_lrt, se_w)
    assert sd_lrt < sd_w  # independent noise per example: lower variance


# --------------------------------------------------------------------------- experiment config


def test_configs_are_consistent():
    from metaprior.experiments.dwp_mnist import _check

    for size in ("quick", "default", "full"):
        _check(make_config(size))
    full = make_config("full")
    assert full.filters == (32, 128) and full.kernel_sizes == (7, 5)  # the paper's net
    assert make_config("default").num_splits >= 5


def test_bnn_loss_kl_weight_scales_the_prior_term_only(small):
    """kl_weight = 0 leaves the likelihood alone: the deep weight prior's and the normal
    prior's losses are then equal for the same q and key; the loss is affine in kl_weight
    (same key: the same draws), with slope minus the prior term."""
    net, x, y = small["net"], small["x"], small["y"]
    prior = DeepWeightPrior([KernelVAE(K, 2, (8,), key=jax.random.key(i)) for i in range(2)])
    guide = build_guide(net, prior.priors(), prior=prior)
    params = {**guide.init_params(jax.random.key(1)), **dwp_model_params(net)}
    data, key = (x, y, jnp.int32(6)), jax.random.key(3)

    def value(kind, weight):
        priors = prior.priors() if kind == "dwp" else (NormalKernelPrior(),) * 2
        return float(bnn_loss(kind, net, priors, guide, batch_size=4, kl_weight=weight)(params, key, data))

    np.testing.assert_allclose(value("dwp", 0.0), value("normal", 0.0), rtol=1e-6)
    assert abs(value("dwp", 1.0) - value("normal", 1.0)) > 1.0
    for kind in ("dwp", "normal"):
        v0, v1, vh = value(kind, 0.0), value(kind, 1.0), value(kind, 0.5)
        np.testing.assert_allclose(vh, (v0 + v1) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="kl_weight"):
        bnn_loss("dwp", net, prior.priors(), guide, batch_size=4, kl_weight=-1.0)


def test_fit_bnns_passes_kl_weight_and_posterior_diagnostics_reports_every_layer():
    """fit_bnns trains the objective of settings.kl_weight (same key, another weight: another
    first loss), and posterior_diagnostics gives finite shares in [0, 1] and bound gaps for
    every layer of the fitted nets (the importance-weighted log p(w) is above the bound in
    expectation; -0.5 nats allows for its Monte Carlo noise with 256 draws)."""
    import dataclasses

    from metaprior.inference.dwp import fit_bnns, posterior_diagnostics

    prior = DeepWeightPrior([KernelVAE(K, 2, (8,), key=jax.random.key(i)) for i in range(2)])
    k_x, k_y = jax.random.split(jax.random.key(4))
    xs, ys = jax.random.uniform(k_x, (2, 8, 28, 28, 1)), jax.random.randint(k_y, (2, 8), 0, 10)
    ns = jnp.array([8, 6], jnp.int32)
    base = DWPSettings(filters=FILTERS, kernel_sizes=(K, K), latent_dims=(2, 2), num_steps=2, batch_size=4)
    base = dataclasses.replace(base, steps_per_call=1, num_eval_samples=2)
    first = {}
    for weight in (1.0, 0.5):
        settings = dataclasses.replace(base, kl_weight=weight)
        net, guide, params, result = fit_bnns(jax.random.key(0), "dwp", settings, prior, xs, ys, ns)
        first[weight] = float(np.ravel(result.losses)[0])
    assert abs(first[1.0] - first[0.5]) > 1e-3 * abs(first[1.0])
    metrics = posterior_diagnostics(jax.random.key(5), base, prior, {"dwp": (net, guide, params)})
    for layer in (0, 1):
        for name in ("q_mean_kernel_share_dwp", "prior_vi_share"):
            assert 0.0 <= metrics[f"{name}_l{layer}"] <= 1.0
        assert np.isfinite(metrics[f"dwp_bound_gap_l{layer}"]) and metrics[f"dwp_bound_gap_l{layer}"] > -0.5
    with pytest.raises(ValueError, match="kl_weight"):
        DWPSettings(kl_weight=float("nan"))
