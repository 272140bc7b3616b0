"""Diagnostics of a deep weight prior and of the kernels a posterior puts under it.

Three questions, each a function:

- Is the auxiliary bound tight? :func:`auxiliary_bound` is the bound the inference
  optimises, ``E_r[log p(w | z) + log p(z) - log r(z | w)] <= log p(w)``;
  :func:`kernel_log_marginal` is an importance-weighted estimate of ``log p(w)`` itself.
  Their difference is what the bound overcharges a kernel ``w``.
- Have the kernels of a layer collapsed onto one? :func:`mean_kernel_share`: the share
  of the kernels' energy in their common mean kernel (1 when all are one kernel).
- Does mean-field VI under this prior alone collapse them? :func:`prior_only_vi`: each
  kernel gets ``q(w) = N(loc, diag s^2)`` started as the Bayesian nets start it (``loc`` a
  decoder mean at ``z ~ p(z)``) and follows ``E_q[bound] + H(q)`` with Adam, without
  data. It is what the Bayesian nets do to a layer whose kernels the data barely
  constrain (4,096 kernels of a 32 -> 128 layer against 50 images): with a prior whose
  density has one dominant ridge maximum, every ``loc`` climbs to it, and the layer's
  posterior means become one kernel (benchmarks/README.md, "the 5x5 layer's kernels
  collapse"). Mean-field VI does this to any Gaussian prior too: the optimum of
  ``KL(q || N(b, S))`` over factorised ``q`` is ``loc = b`` for every kernel (tested).

The encoder and decoder are any callables with the :class:`KernelEncoder` /
:class:`KernelDecoder` calls, so the tests use a linear-Gaussian prior whose marginal and
exact posterior are known.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp
from jax.scipy.stats.norm import logpdf as _log_normal
from numpy.typing import ArrayLike

__all__ = ["mean_kernel_share", "auxiliary_bound", "kernel_log_marginal", "prior_only_vi"]

Coder = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _check_kernels(kernels: jax.Array, name: str = "kernels") -> None:
    if kernels.ndim != 3 or kernels.shape[0] == 0 or kernels.shape[1] != kernels.shape[2]:
        raise ValueError(f"{name} must be [num_kernels > 0, k, k], got shape {kernels.shape}")


def mean_kernel_share(kernels: ArrayLike) -> float:
    """``||mean_i w_i||^2 / mean_i ||w_i||^2`` for ``kernels [n, k, k]`` (or ``[n, d]``).

    1 when every kernel is the same one, 0 when they have no common component (a set and
    its negation); unchanged by scaling all kernels. Source kernels sit near 0 (0.007 for
    the authors' released 5x5 set).
    """
    w = np.asarray(kernels, np.float64)
    if w.ndim < 2 or w.shape[0] == 0:
        raise ValueError(f"kernels must be [num_kernels > 0, ...], got shape {w.shape}")
    w = w.reshape(w.shape[0], -1)
    energy = np.mean(np.sum(w * w, axis=1))
    if energy == 0:
        raise ValueError("kernels are all zero: the share is undefined")
    mean = w.mean(axis=0)
    return float(mean @ mean / energy)


def auxiliary_bound(
    rng_key: jax.Array, encoder: Coder, decoder: Coder, kernels: jax.Array, num_samples: int = 64
) -> jax.Array:
    """``E_{r(z|w)}[log p(w | z) + log p(z) - log r(z | w)]`` per kernel (``num_samples``
    draws of ``z``): the lower bound on ``log p(w)`` that the auxiliary bound of the
    Bayesian nets uses. Returns ``[num_kernels]``."""
    _check_kernels(kernels)
    loc, scale = encoder(kernels)
    z = loc + scale * jax.random.normal(rng_key, (num_samples,) + loc.shape)
    w_loc, w_scale = decoder(z)
    terms = (
        jnp.sum(_log_normal(kernels, w_loc, w_scale), axis=(-2, -1))
        + jnp.sum(_log_normal(z, 0.0, 1.0), axis=-1)
        - jnp.sum(_log_normal(z, loc, scale), axis=-1)
    )
    return terms.mean(axis=0)


def kernel_log_marginal(
    rng_key: jax.Array,
    encoder: Coder,
    decoder: Coder,
    kernels: jax.Array,
    num_samples: int = 1024,
    widen: float = 2.0,
) -> jax.Array:
    """Importance-weighted estimate of ``log p(w) = log int p(w | z) p(z) dz`` per kernel.

    The proposal is a defensive mixture, half ``N(m(w), (widen * s(w))^2)`` from the
    encoder and half ``p(z)`` (``num_samples`` even: half the draws from each), so a poor
    encoder costs variance, never a heavy-tailed estimate. With ``num_samples`` draws it is
    a lower bound in expectation that tightens as they grow (Burda et al. 2016). Returns ``[num_kernels]``.
    """
    _check_kernels(kernels)
    if num_samples < 2 or num_samples % 2 or widen <= 0:
        raise ValueError(f"num_samples must be even and >= 2 and widen > 0, got {num_samples} and {widen}")
    loc, scale = encoder(kernels)
    wide = widen * scale
    half = num_samples // 2
    k_enc, k_pri = jax.random.split(rng_key)
    z = jnp.concatenate(
        [
            loc + wide * jax.random.normal(k_enc, (half,) + loc.shape),
            jax.random.normal(k_pri, (num_samples - half,) + loc.shape),
        ]
    )
    log_prior = jnp.sum(_log_normal(z, 0.0, 1.0), axis=-1)
    log_proposal = jnp.logaddexp(jnp.sum(_log_normal(z, loc, wide), axis=-1), log_prior) - jnp.log(2.0)
    w_loc, w_scale = decoder(z)
    log_joint = jnp.sum(_log_normal(kernels, w_loc, w_scale), axis=(-2, -1)) + log_prior
    return logsumexp(log_joint - log_proposal, axis=0) - jnp.log(num_samples)


def prior_only_vi(
    rng_key: jax.Array,
    encoder: Coder,
    decoder: Coder,
    init_loc: jax.Array,
    *,
    num_steps: int = 500,
    learning_rate: float | optax.Schedule = 1e-3,
    init_log_scale: float = -5.0,
) -> tuple[jax.Array, jax.Array]:
    """Mean-field VI of kernels under the prior alone (no data): each kernel's
    ``q = N(loc, diag exp(log_scale)^2)`` maximises ``E_q[auxiliary bound] + H(q)`` by
    Adam, one ``w`` and ``z`` draw per kernel and step, the encoder held fixed.

    Args:
        init_loc: ``[n, k, k]`` starting means (the Bayesian nets start at decoder means
            ``mu(z)``, ``z ~ p(z)``).
        num_steps, learning_rate, init_log_scale: as the Bayesian nets' defaults
            (``learning_rate`` may be an Optax schedule).

    Returns:
        ``(loc, scale)`` after ``num_steps``, each ``[n, k, k]``.
    """
    _check_kernels(init_loc, "init_loc")
    if num_steps < 0 or (not callable(learning_rate) and learning_rate <= 0):
        raise ValueError(f"num_steps must be >= 0 and learning_rate > 0, got {num_steps} and {learning_rate}")
    params = {"loc": jnp.asarray(init_loc), "log_scale": jnp.full(init_loc.shape, init_log_scale, init_loc.dtype)}
    opt = optax.adam(learning_rate)

    def loss(p, key):
        k_w, k_z = jax.random.split(key)
        scale = jnp.exp(p["log_scale"])
        w = p["loc"] + scale * jax.random.normal(k_w, scale.shape)
        bound = auxiliary_bound(k_z, encoder, decoder, w, num_samples=1)
        return -jnp.sum(bound + jnp.sum(p["log_scale"], axis=(-2, -1)))

    def step(carry, key):
        p, state = carry
        updates, state = opt.update(jax.grad(loss)(p, key), state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.jit(lambda p, keys: jax.lax.scan(step, (p, opt.init(p)), keys))(
        params, jax.random.split(rng_key, num_steps)
    )
    return params["loc"], jnp.exp(params["log_scale"])
