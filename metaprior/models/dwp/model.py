"""Kernel priors (deep, normal, log-uniform) and the NumPyro model of the Bayesian ConvNet."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

from metaprior.models.dwp.net import ConvNet, conv2d, without_kernels

__all__ = [
    "KernelPrior",
    "DeepKernelPrior",
    "NormalKernelPrior",
    "LogUniformKernelPrior",
    "KernelSites",
    "kernel_sites",
    "dwp_model",
    "dwp_model_params",
]


class KernelSites(NamedTuple):
    """Names of the sites of conv layer ``l`` in :func:`dwp_model`."""

    w: str
    z: str
    plate: str


def kernel_sites(layer: int) -> KernelSites:
    """``KernelSites(w="conv{l}_w", z="conv{l}_z", plate="conv{l}_kernels")``."""
    return KernelSites(f"conv{layer}_w", f"conv{layer}_z", f"conv{layer}_kernels")


class KernelPrior(eqx.Module):
    """A prior over the 2-D kernels of one conv layer (abstract).

    Called inside the model's plate over the layer's kernels; emits the sample sites
    and returns the kernels ``[num_kernels, k, k]``.
    """

    @abc.abstractmethod
    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        """Sample sites for one layer; returns ``w [num_kernels, k, k]``."""


class DeepKernelPrior(KernelPrior):
    """The DWP of one layer: ``z ~ N(0, I)``, ``w ~ N(mu_phi(z), diag sigma_phi(z)^2)``.

    Sites: ``sites.z`` ``[K, latent_dim]`` (event 1) and ``sites.w`` ``[K, k, k]``
    (event 2), ``K`` the plate's size. Any decoder with the :class:`KernelDecoder` call
    works (the tests use a linear-Gaussian one, whose marginal ``p(w)`` is analytic).
    """

    decoder: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    latent_dim: int = eqx.field(static=True)

    def __init__(self, decoder, latent_dim: int | None = None):
        self.decoder = decoder
        self.latent_dim = int(latent_dim if latent_dim is not None else decoder.latent_dim)

    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        z = numpyro.sample(sites.z, dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1))
        loc, scale = self.decoder(z)
        if loc.shape[-2:] != (kernel_size, kernel_size):
            raise ValueError(f"the decoder makes {loc.shape[-2:]} kernels, the layer has {kernel_size}x{kernel_size}")
        return numpyro.sample(sites.w, dist.Normal(loc, scale).to_event(2))


class NormalKernelPrior(KernelPrior):
    """Fully factorised ``N(0, scale^2)`` on every weight (the paper's "SN" baseline)."""

    scale: float = eqx.field(static=True, default=1.0)

    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        k = kernel_size
        return numpyro.sample(sites.w, dist.Normal(jnp.zeros((k, k)), self.scale).to_event(2))

    def kl(self, loc: jax.Array, scale: jax.Array) -> jax.Array:
        """``KL(N(loc, scale^2) || N(0, self.scale^2))`` summed over each kernel.

        Args:
            loc, scale: ``[K, k, k]``.

        Returns:
            ``[K]``.
        """
        s0 = self.scale
        per_weight = jnp.log(s0 / scale) + (scale**2 + loc**2) / (2 * s0**2) - 0.5
        return jnp.sum(per_weight, axis=(-2, -1))


# Molchanov et al. (2017), Eq. (14): -KL(q || p) ~= k1 sigmoid(k2 + k3 log a) - 0.5 log(1 + 1/a) - k1
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


class LogUniformKernelPrior(KernelPrior):
    """The improper log-uniform prior ``p(|w|) proportional to 1 / |w|`` on every weight.

    In the model the site is an improper flat density plus a factor ``-log|w|`` (so the
    model cannot be run forward from this prior). Training uses its KL to a Gaussian
    ``q(w) = N(theta, alpha theta^2)``, which depends on ``alpha`` only and is
    approximated as in Molchanov et al. (2017), Eq. (14):

        -KL(q || p) ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1,

    ``k1 = 0.63576, k2 = 1.87320, k3 = 1.48695`` (an additive constant of the improper
    prior dropped; accurate to about 0.01 nats per weight).
    """

    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        k = kernel_size
        w = numpyro.sample(sites.w, dist.ImproperUniform(dist.constraints.real, (), (k, k)))
        numpyro.factor(sites.w + "_log_uniform", -jnp.sum(jnp.log(jnp.abs(w)), axis=(-2, -1)))
        return w

    @staticmethod
    def kl(loc: jax.Array, scale: jax.Array) -> jax.Array:
        """Approximate ``KL(N(loc, scale^2) || LogUniform)`` summed over each kernel.

        ``log alpha = log scale^2 - log loc^2``.

        Args:
            loc, scale: ``[K, k, k]``.

        Returns:
            ``[K]``.
        """
        tiny = jnp.finfo(jnp.result_type(loc)).tiny
        log_alpha = jnp.log(scale**2 + tiny) - jnp.log(loc**2 + tiny)
        neg_kl = _K1 * jax.nn.sigmoid(_K2 + _K3 * log_alpha) - 0.5 * jax.nn.softplus(-log_alpha) - _K1
        return -jnp.sum(neg_kl, axis=(-2, -1))


# --------------------------------------------------------------------------- the target model


def dwp_model_params(net: ConvNet) -> dict[str, Any]:
    """The model's ``param`` sites at ``net``'s values: ``{"net$params": ...}``.

    The conv biases and the dense layer (point estimates; the kernels are latent).
    """
    params, _ = eqx.partition(without_kernels(net), eqx.is_inexact_array)
    return {"net$params": params}


def dwp_model(
    images: jax.Array,
    labels: jax.Array | None = None,
    *,
    net: ConvNet,
    priors: Sequence[KernelPrior],
    batch_size: int | None = None,
    conv: Callable[[jax.Array, jax.Array], jax.Array] = conv2d,
) -> jax.Array:
    """The target-task model with a prior over every conv kernel.

    For conv layer ``l`` with kernels ``[out, in, k, k]``, in ``plate("conv{l}_kernels",
    out * in)``: the layer's :class:`KernelPrior` emits its sites (for the deep weight
    prior ``z ~ N(0, I)`` then ``w ~ p_l(w | z)``). Then, in ``plate("examples", N,
    subsample_size=batch_size)``, ``y_n ~ Categorical(logits = f(x_n; W, b, V))`` with
    the biases ``b`` and dense weights ``V`` a ``param`` site (``"net$params"``): point
    estimates without a prior, as in the paper.

    Args:
        images: ``[N, H, W, C]``, the whole training set (the plate subsamples it).
        labels: ``[N]`` int, or ``None`` to sample them.
        net: a :class:`ConvNet` giving the architecture and the initial biases and
            dense layer (its kernels are ignored).
        priors: one :class:`KernelPrior` per conv layer.
        batch_size: examples per step (``None``: all); the likelihood is scaled by
            ``N / batch_size`` through the plate, so the ELBO stays unbiased.
        conv: the convolution (:func:`conv2d`, or :func:`conv2d_im2col` when the model
            is vmapped over several data sets).

    Returns:
        logits ``[batch, num_classes]`` of the examples in the subsample.
    """
    if len(priors) != len(net.convs):
        raise ValueError(f"the net has {len(net.convs)} conv layers, got {len(priors)} priors")
    body = eqx_module("net", without_kernels(net))
    kernels = []
    for layer, (shape, prior) in enumerate(zip(net.kernel_shapes, priors)):
        out, inp, k, _ = shape
        sites = kernel_sites(layer)
        with numpyro.plate(sites.plate, out * inp):
            w = prior(sites, k)
        kernels.append(w.reshape(shape))
    num = images.shape[0]
    with numpyro.plate("examples", num, subsample_size=batch_size) as idx:
        logits = body.apply(images[idx], kernels, conv=conv)
        numpyro.sample("y", dist.Categorical(logits=logits), obs=None if labels is None else labels[idx])
    return logits
