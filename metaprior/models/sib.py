"""Empirical Bayes meta-learning with synthetic gradients (SIB, Hu et al. 2020).

The model, per task ``i`` of a batch of few-shot episodes (features ``f(x)`` of a
fixed, pretrained network):

    w_i ~ p_psi(w) = N(m_psi, diag(s_psi^2))        classifier weights [ways, features]
    y_ij | w_i ~ Categorical(softmax(s * cos(w_i, f(x_ij))))     query labels

``psi`` (prior mean and scale per feature, shared by the classes) is point-estimated
by empirical Bayes, together with the amortized inference: ``q_theta_i(w_i)`` is a
diagonal Gaussian whose parameters come from ``T`` steps of the synthetic-gradient
inner loop (:mod:`metaprior.inference.synthetic_gradients`, equation (9)) started at
``theta^0 = lambda(support)``:

- ``lambda``: the per-class mean of the (normalised) support features scaled per
  dimension by a learned vector, with a learned initial log-scale;
- ``xi``: a 3-layer MLP (hidden size ``8 * ways``) mapping each query prediction
  ``y_hat_ij`` (logits) to an estimate of ``dL/dy_hat_ij``, its hidden layers
  normalised over the task's queries (:class:`SyntheticGradientNet`); it sees only
  the unlabelled query inputs, so inference is transductive.

The guide, the inner loop and the ELBO (:func:`metaprior.inference.sib.sib_loss`,
NumPyro's ``TraceMeanField_ELBO``: closed-form KL, back-propagated through the ``T``
steps) live in :mod:`metaprior.inference.sib`; this module holds the model and networks.
The feature network is pretrained first by ordinary classification on the
meta-training classes (:func:`pretrain_loss`) and then kept fixed
(:func:`embed_classes`), so meta-training runs on precomputed features.

References:
    Hu, S. X., Moreno, P. G., Xiao, Y., Shen, X., Obozinski, G., Lawrence, N. D.,
    Damianou, A. (2020). Empirical Bayes Transductive Meta-Learning with Synthetic
    Gradients. ICLR 2020. The model, equation (9) and Algorithm 1.
    Gidaris, S. and Komodakis, N. (2018). Dynamic Few-Shot Visual Learning without
    Forgetting. CVPR 2018 (the cosine-similarity classifier).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax

from metaprior.data.episodes import Episodes
from metaprior.models.nets import Conv4

__all__ = [
    "SIBParams",
    "SyntheticGradientNet",
    "init_sib_params",
    "cosine_logits",
    "l2_normalize",
    "sib_model",
    "pretrain_loss",
    "sample_classification_batch",
    "embed_classes",
]


class SyntheticGradientNet(eqx.Module):
    """``xi``: logits of a task's queries ``[queries, ways] -> [queries, ways]``.

    Three linear layers ``k -> h -> h -> k`` with ReLU. With ``query_norm=True`` each
    hidden layer is batch-normalised over the task's queries (statistics of this task's
    unlabelled set, learned scale and shift), as the authors' ``dni_linear`` is
    (BatchNorm1d kept in training mode at test time). Each query's estimated gradient
    then depends on the whole query set (how the task's predictions are spread over
    the classes), not on its own logits alone. With ``query_norm=False`` it is a plain
    per-query MLP. The output layer starts at zero.

    References:
        Hu et al. (2020), Algorithm 1 and the authors' code (``networks.dni_linear``).
    """

    layers: tuple[eqx.nn.Linear, eqx.nn.Linear, eqx.nn.Linear]
    norm_scale: tuple[jax.Array, jax.Array]
    norm_shift: tuple[jax.Array, jax.Array]
    query_norm: bool = eqx.field(static=True)

    def __init__(self, num_ways: int, hidden: int, *, query_norm: bool = True, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        last = eqx.nn.Linear(hidden, num_ways, key=k3)
        last = eqx.tree_at(lambda m: (m.weight, m.bias), last, (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        self.layers = (eqx.nn.Linear(num_ways, hidden, key=k1), eqx.nn.Linear(hidden, hidden, key=k2), last)
        self.norm_scale = (jnp.ones((hidden,)), jnp.ones((hidden,)))
        self.norm_shift = (jnp.zeros((hidden,)), jnp.zeros((hidden,)))
        self.query_norm = query_norm

    def __call__(self, logits: jax.Array) -> jax.Array:
        if logits.ndim != 2:
            raise ValueError(f"xi takes one task's logits [queries, ways], got shape {logits.shape}")
        h = logits
        for layer, scale, shift in zip(self.layers[:2], self.norm_scale, self.norm_shift):
            h = jax.nn.relu(jax.vmap(layer)(h))
            if self.query_norm:
                mean = jnp.mean(h, axis=0)
                var = jnp.var(h, axis=0)
                h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * scale + shift
        return jax.vmap(self.layers[2])(h)


class SIBParams(eqx.Module):
    """Meta-parameters of SIB (a pytree of arrays).

    Attributes:
        prior_loc: ``[features]`` mean of ``p_psi`` (shared by the classes).
        prior_log_scale: ``[features]`` log standard deviation of ``p_psi``.
        init_scale: ``[features]`` per-dimension scale of ``lambda``'s class means.
        init_log_scale: ``[features]`` log standard deviation of ``q^0``.
        log_logit_scale: scalar, log of the cosine classifier's temperature ``s``.
        synthetic_gradient: ``xi``, a :class:`SyntheticGradientNet`
            ``[queries, ways] -> [queries, ways]`` with two hidden layers of ``8 * ways`` units.
    """

    prior_loc: jax.Array
    prior_log_scale: jax.Array
    init_scale: jax.Array
    init_log_scale: jax.Array
    log_logit_scale: jax.Array
    synthetic_gradient: SyntheticGradientNet


def init_sib_params(
    rng_key: jax.Array,
    num_features: int,
    num_ways: int,
    *,
    init_std: float = 0.1,
    logit_scale: float = 10.0,
    query_norm: bool = True,
) -> SIBParams:
    """Initial meta-parameters.

    The prior starts at ``N(0, 1)`` per coordinate (``lambda`` works in units where a
    coordinate is O(1)), ``q^0``'s scale at ``init_std`` and the classifier's
    temperature at ``logit_scale`` (10, as in the authors' code). ``xi``'s output layer
    starts at zero, so before meta-training the inner loop only descends the KL.

    Args:
        rng_key: key for ``xi``'s hidden layers.
        num_features: feature dimension ``D``.
        num_ways: classes per task ``k`` (``xi`` is ``k -> 8k -> 8k -> k``).
        init_std: initial standard deviation of ``q^0``.
        logit_scale: initial cosine-classifier temperature.
        query_norm: normalise ``xi``'s hidden layers over each task's queries
            (:class:`SyntheticGradientNet`); ``False`` makes ``xi`` act on each query alone.
    """
    if num_ways < 2:
        raise ValueError(f"num_ways must be at least 2, got {num_ways}")
    xi = SyntheticGradientNet(num_ways, 8 * num_ways, query_norm=query_norm, key=rng_key)
    zeros = jnp.zeros((num_features,))
    return SIBParams(
        prior_loc=zeros,
        prior_log_scale=zeros,
        init_scale=jnp.ones((num_features,)),
        init_log_scale=jnp.full((num_features,), math.log(init_std)),
        log_logit_scale=jnp.asarray(math.log(logit_scale)),
        synthetic_gradient=xi,
    )


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / |x|`` along the last axis (features)."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def cosine_logits(w: jax.Array, features: jax.Array, log_logit_scale: jax.Array) -> jax.Array:
    """``s * cos(w_k, f_j)`` for every example and class.

    Args:
        w: ``[..., ways, features]`` classifier weights.
        features: ``[..., examples, features]``.
        log_logit_scale: scalar ``log s``.

    Returns:
        ``[..., examples, ways]`` logits.
    """
    cos = jnp.einsum("...nd,...kd->...nk", l2_normalize(features), l2_normalize(w))
    return jnp.exp(log_logit_scale) * cos


def sib_model(params: SIBParams, episodes: Episodes, *, num_ways: int) -> None:
    """The empirical-Bayes model of the query labels (observed when ``query_y`` is given).

    ``episodes`` is a :class:`~metaprior.data.Episodes` in feature space
    (:func:`~metaprior.data.sample_episodes` on :func:`embed_classes` output):
    ``support_x [tasks, ways*shots, features]``, ``query_x [tasks, queries, features]``;
    the model reads only ``query_x`` and ``query_y`` (the support set enters through the
    guide's ``lambda``).

    Sites: ``w`` ``[tasks, 1, ways, features]`` (plate ``tasks`` at dim -2, event
    ``[ways, features]``); ``probs`` (deterministic) ``[tasks, queries, ways]``; ``y``
    ``[tasks, queries]`` (plate ``examples`` at dim -1).
    """
    num_tasks, num_queries, num_features = episodes.query_x.shape
    shape = (num_ways, num_features)
    prior = dist.Normal(
        jnp.broadcast_to(params.prior_loc, shape), jnp.broadcast_to(jnp.exp(params.prior_log_scale), shape)
    ).to_event(2)
    with numpyro.plate("tasks", num_tasks, dim=-2):
        w = numpyro.sample("w", prior)
        logits = cosine_logits(jnp.squeeze(w, -3), episodes.query_x, params.log_logit_scale)
        with numpyro.plate("examples", num_queries, dim=-1):
            numpyro.deterministic("probs", jax.nn.softmax(logits, -1))
            numpyro.sample("y", dist.Categorical(logits=logits), obs=episodes.query_y)


# ---------------------------------------------------------------- feature network


def sample_classification_batch(rng_key: jax.Array, images: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Uniformly random labelled images for pretraining, ``(x [B, H, W, C], y [B])``.

    Args:
        rng_key: key.
        images: ``[classes, examples, H, W, C]``.
        batch_size: ``B``.
    """
    k_class, k_example = jax.random.split(rng_key)
    y = jax.random.randint(k_class, (batch_size,), 0, images.shape[0])
    e = jax.random.randint(k_example, (batch_size,), 0, images.shape[1])
    return images[y, e], y


def pretrain_loss(net: Conv4, rng_key: jax.Array, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Mean softmax cross-entropy of a :class:`~metaprior.models.nets.Conv4` with a head
    over the meta-training classes (ordinary classification pretraining)."""
    del rng_key
    x, y = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(net(x), y))


def embed_classes(net: Conv4, images: jax.Array) -> jax.Array:
    """Features of a class-indexed image array with the pretrained network, ``[classes,
    examples, features]``.

    ``Conv4`` normalises with the statistics of its batch, so each batch here holds one
    example of every class (``lax.map`` over the examples axis): the statistics are
    those of a class-balanced batch, as in pretraining, and a feature does not depend
    on which episode its image later lands in.

    Args:
        net: the pretrained network (its head, if any, is not used).
        images: ``[classes, examples, H, W, C]``.
    """
    per_example = jax.lax.map(net.features, jnp.swapaxes(images, 0, 1))  # [E, C, D]
    return jnp.swapaxes(per_example, 0, 1)
