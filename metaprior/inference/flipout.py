"""Weight-noise estimators for a layer whose weights are Gaussian: Flipout and its baselines.

A variational posterior over a network's weights puts a mean-field Gaussian
``N(loc, scale^2)`` on every array of a layer (an :class:`equinox.nn.Linear` or
:class:`equinox.nn.Conv` module). The expected log-likelihood
``E_q[sum_n log p(y_n | x_n, W)]`` is estimated by pushing a batch through the layers
with sampled weights. Three estimators share one signature,
``estimator(rng_key, loc, scale, x) -> y``, so a network forward pass takes the
estimator as an argument (composition, not a flag):

- :func:`shared_sample`: one weight sample ``W = loc + scale * eps`` for the whole batch.
  Cheap, but every example sees the same perturbation, so the per-example gradient
  terms are correlated and averaging over the batch barely reduces their variance.
- :func:`per_example`: an independent sample ``W_n`` per example. The reference
  estimator (lowest variance), at ``N`` times the weight-sampling cost and a batched
  matmul / grouped convolution instead of one.
- :func:`flipout`: Flipout (Wen et al. 2018). One sample ``dW = scale * eps`` per batch,
  decorrelated across examples by random sign matrices: example ``n`` uses
  ``W_n = loc + dW * (r_n s_n^T)`` (Eq. 3), with ``r_n`` and ``s_n`` vectors of
  independent +-1 entries over the output and input units. Because the entries of
  ``dW`` are independent and symmetric about zero, ``dW * (r_n s_n^T)`` has exactly the
  distribution of ``dW``, so every ``W_n`` is an exact sample from ``q``: the estimate of
  each example's expected output is unbiased. The perturbations of different examples
  are only pseudo-independent (they share ``|dW|``), yet the gradient variance falls
  nearly as ``1 / N`` like independent samples. The product never needs ``W_n``
  (Eq. 4)::

      y_n = loc(x_n) + r_n * (dW(x_n * s_n))

  two ordinary layer applications per batch (about twice the cost of one sample).

For convolutions the signs act on channels: ``s_n`` flips input channels and
``r_n`` output channels, the same at every spatial position (Wen et al. 2018,
Sec. 3.2). The bias perturbation ``db`` is flipped by ``r_n`` (``db * r_n`` has the
distribution of ``db`` for the same reason).

Layers are Equinox modules whose array leaves are the parameters; ``loc`` and ``scale``
are two modules of the same structure (the variational mean and standard deviation of
every array). Inputs carry a batch axis first: ``x: [N, in]`` for dense layers,
``x: [N, C, H, W]`` for 2-D convolutions; ``y`` likewise.

References:
    Y. Wen, P. Vicol, J. Ba, D. Tran, R. Grosse. "Flipout: Efficient Pseudo-Independent
    Weight Perturbations on Mini-Batches." ICLR 2018. Sec. 3.2, Eqs. 3-4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "LayerEstimator",
    "sample_layer",
    "shared_sample",
    "per_example",
    "flipout",
    "apply_layer",
    "stochastic_forward",
    "categorical_expected_log_lik",
]

PyTree = Any
LayerEstimator = Callable[[jax.Array, PyTree, PyTree, jax.Array], jax.Array]
"""``(rng_key, loc, scale, x: [N, ...]) -> y: [N, ...]``."""


def apply_layer(layer: PyTree, x: jax.Array) -> jax.Array:
    """Apply one (deterministic) layer to a batch: ``x: [N, ...] -> [N, ...]``."""
    return jax.vmap(layer)(x)


def _normal_like(rng_key: jax.Array, tree: PyTree) -> PyTree:
    """Standard normal noise shaped like ``tree``'s leaves, from one draw (one random op
    per call keeps XLA's compile time low; the values are independent either way)."""
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [leaf.size for leaf in leaves]
    flat = jax.random.normal(rng_key, (sum(sizes),), leaves[0].dtype)
    parts, start = [], 0
    for leaf, size in zip(leaves, sizes):
        parts.append(flat[start : start + size].reshape(leaf.shape))
        start += size
    return jax.tree.unflatten(treedef, parts)


def _axpy(loc: PyTree, scale: PyTree, eps: PyTree) -> PyTree:
    return jax.tree.map(lambda m, s, e: m + s * e, loc, scale, eps)


def sample_layer(rng_key: jax.Array, loc: PyTree, scale: PyTree) -> PyTree:
    """One reparameterised sample ``loc + scale * eps`` of a layer (same structure as ``loc``)."""
    return _axpy(loc, scale, _normal_like(rng_key, loc))


def shared_sample(rng_key: jax.Array, loc: PyTree, scale: PyTree, x: jax.Array) -> jax.Array:
    """One weight sample shared by every example of the batch.

    Args:
        rng_key: PRNG key for the sample.
        loc: the layer's variational means (an Equinox layer).
        scale: the layer's variational standard deviations (same structure).
        x: ``[N, ...]`` the batch.

    Returns:
        ``[N, ...]`` the layer's outputs.
    """
    return apply_layer(sample_layer(rng_key, loc, scale), x)


def per_example(rng_key: jax.Array, loc: PyTree, scale: PyTree, x: jax.Array) -> jax.Array:
    """An independent weight sample for every example (the reference estimator).

    Args and returns as :func:`shared_sample`.
    """
    keys = jax.random.split(rng_key, x.shape[0])
    return jax.vmap(lambda k, xn: sample_layer(k, loc, scale)(xn))(keys, x)


def flipout(rng_key: jax.Array, loc: PyTree, scale: PyTree, x: jax.Array) -> jax.Array:
    """Flipout: per-example pseudo-independent perturbations from one sample per batch.

    Computes ``y_n = loc(x_n) + r_n * (dW(x_n * s_n))`` with ``dW = scale * eps`` one
    perturbation per batch (its bias included) and ``r_n``, ``s_n`` independent +-1 signs
    over output and input channels (Wen et al. 2018, Eq. 4). The layer must be affine
    in its input and its parameters jointly, ``y = W x + b`` (dense and convolution
    layers are).

    Args and returns as :func:`shared_sample`.

    References:
        Wen et al. (2018), Sec. 3.2, Eq. 3 (``W_n = loc + dW * r_n s_n^T``) and Eq. 4.
    """
    k_eps, k_sign = jax.random.split(rng_key)
    delta = jax.tree.map(lambda s, e: s * e, scale, _normal_like(k_eps, scale))
    mean = apply_layer(loc, x)
    # One draw of +-1 per example for the input channels and the output channels together.
    num_in, num_out = x.shape[1], mean.shape[1]
    signs = jax.random.rademacher(k_sign, (x.shape[0], num_in + num_out), dtype=x.dtype)
    s_in = signs[:, :num_in].reshape((x.shape[0], num_in) + (1,) * (x.ndim - 2))
    r_out = signs[:, num_in:].reshape((x.shape[0], num_out) + (1,) * (mean.ndim - 2))
    return mean + apply_layer(delta, x * s_in) * r_out


def stochastic_forward(
    rng_key: jax.Array,
    forward: Callable[[PyTree, jax.Array, Callable[[int, jax.Array], jax.Array]], jax.Array],
    net: PyTree,
    loc: tuple,
    scale: tuple,
    x: jax.Array,
    estimator: LayerEstimator = flipout,
) -> jax.Array:
    """Run a layered forward with every weight layer drawn from ``N(loc, scale^2)``.

    Args:
        rng_key: split into one key per layer.
        forward: a layered forward ``forward(net, x, apply_layer)`` (see
            :mod:`metaprior.models.bayes_classifier`).
        net: the network's shared (non-weight) parameters, as ``forward`` reads them.
        loc: tuple of layers, the weight means; scale: the standard deviations.
        x: ``[N, ...]`` the batch.
        estimator: :func:`flipout`, :func:`per_example` or :func:`shared_sample`.

    Returns:
        ``forward``'s output, e.g. logits ``[N, classes]``.
    """
    keys = jax.random.split(rng_key, len(loc))

    def apply(index: int, h: jax.Array) -> jax.Array:
        return estimator(keys[index], loc[index], scale[index], h)

    return forward(net, x, apply)


def categorical_expected_log_lik(forward, estimator: LayerEstimator = flipout):
    """Estimator of ``E_q[sum_n log Categorical(y_n | logits = f(x_n; w))]``.

    Args:
        forward: the network's layered forward (outputs logits).
        estimator: the weight-noise estimator of each layer.

    Returns:
        ``(rng_key, net, q, x: [N, ...], y: [N]) -> scalar``, where ``q`` has ``loc`` and
        ``scale`` tuples of layers (e.g. :class:`~metaprior.inference.guides.GaussianLayers`)
        and ``net`` the shared parameters ``forward`` reads.
    """

    def expected_log_lik(rng_key, net, q, x, y):
        logits = stochastic_forward(rng_key, forward, net, q.loc, q.scale, x, estimator)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    return expected_log_lik
