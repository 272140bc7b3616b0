"""Prototypical networks (Snell, Swersky, Zemel 2017) on any set embedding, e.g. Conv4.

A class's prototype is the mean embedding of its support examples,
``c_k = mean_{i: y_i = k} f(x_i)``, and a query's logits are minus its squared
Euclidean distances to the prototypes, ``logit_k(q) = -||f(q) - c_k||^2``; the
predictive is their softmax and meta-training minimises the query cross-entropy
(eq. 2 and algorithm 1 of the paper). There is no inner loop: the meta-parameters
are the embedding net's weights.

``embed`` maps a *set* ``[N, ...] -> [N, D]`` (``Conv4(None, ...)`` returns its
flattened features). Each episode is embedded on its own (``jax.vmap`` over episodes)
and its support and query sets are two separate calls, so a batch-statistics net
(:class:`~metaprior.models.nets.Conv4`) normalises with the statistics of that
episode's support set and of its query set respectively. The embedding of a query
therefore depends on the other queries of its episode (transductive batch norm, as
in MAML), never on the support labels, so the predictions are equivariant to a
relabelling of the classes and invariant to the order of the support set.

A class with no support example in an episode has no prototype: :func:`prototypes`
gives it the zero vector and :func:`protonet_logits` the logit ``-inf`` (probability
0). A query of such a class has infinite cross-entropy, which :func:`~metaprior.
inference.meta.fit` stops on as a non-finite loss. Label values are checked against
``num_ways`` wherever they are concrete (eager calls and the predictive); inside a
jitted loss they are tracers and are not checked.

References:
    Snell, Swersky, Zemel (2017). Prototypical networks for few-shot learning. NeurIPS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from metaprior.inference.evaluation import FewShotPredictive
from metaprior.inference.method import Method, stacked

__all__ = ["prototypes", "protonet_logits", "protonet_loss", "protonet_predictive", "protonet_method"]

Embed = Callable[[jax.Array], jax.Array]
"""A set embedding ``x [N, ...] -> features [N, D]``."""


def _check_num_ways(num_ways: Any) -> None:
    if isinstance(num_ways, bool) or not isinstance(num_ways, (int, np.integer)):
        raise TypeError(f"num_ways must be a Python int (a static count), got {type(num_ways).__name__}")
    if num_ways < 1:
        raise ValueError(f"num_ways must be >= 1, got {num_ways}")


def _check_labels(labels: jax.Array, num_ways: int, name: str) -> None:
    """Integer dtype always; the range ``[0, num_ways)`` when the values are concrete."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    if isinstance(labels, jax.core.Tracer) or labels.size == 0:
        return
    values = np.asarray(labels)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_ways:
        raise ValueError(f"{name} must lie in [0, num_ways) = [0, {num_ways}); got labels in [{lo}, {hi}]")


def _check_support(support_x: jax.Array, support_y: jax.Array, num_ways: int) -> None:
    if support_x.ndim < 2:
        raise ValueError(f"support_x must be [episodes, support, ...], got shape {support_x.shape}")
    if support_x.shape[0] < 1 or support_x.shape[1] < 1:
        raise ValueError(f"support_x needs at least one episode and one support example, got shape {support_x.shape}")
    if support_y.shape != support_x.shape[:2]:
        raise ValueError(
            f"support_y must be [episodes, support] = {support_x.shape[:2]} to match support_x "
            f"{support_x.shape}, got shape {support_y.shape}"
        )
    _check_labels(support_y, num_ways, "support_y")


def _check_query(query_x: jax.Array, support_x: jax.Array) -> None:
    episodes, item = support_x.shape[0], support_x.shape[2:]
    if query_x.ndim != support_x.ndim or query_x.shape[0] != episodes or query_x.shape[2:] != item:
        raise ValueError(
            f"query_x must be [episodes, queries, *item] = [{episodes}, Q, {', '.join(map(str, item))}] "
            f"to match support_x {support_x.shape}, got shape {query_x.shape}"
        )


def _embed_sets(embed: Embed, x: jax.Array, name: str) -> jax.Array:
    """``[E, N, ...] -> [E, N, D]``: ``embed`` called once per episode (``vmap``)."""
    z = jax.vmap(embed)(x)
    if z.ndim != 3 or z.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"embed must map a set [N, ...] to features [N, D]; on {name} of shape {x.shape} "
            f"it returned {z.shape} per batch of episodes (expected [{x.shape[0]}, {x.shape[1]}, D])"
        )
    return z


def _class_means(z: jax.Array, y: jax.Array, num_ways: int) -> tuple[jax.Array, jax.Array]:
    """``(means [E, W, D], present [E, W])``; an absent class's mean is 0 (count clamped at 1)."""
    onehot = jax.nn.one_hot(y, num_ways, dtype=z.dtype)  # [E, S, W]; out-of-range labels: all zeros
    counts = onehot.sum(1)  # [E, W]
    sums = jnp.einsum("esw,esd->ewd", onehot, z, precision=jax.lax.Precision.HIGHEST)
    return sums / jnp.maximum(counts, 1.0)[..., None], counts > 0


def prototypes(embed: Embed, support_x, support_y, num_ways: int) -> jax.Array:
    """The class prototypes: mean support embedding of each class, per episode.

    Args:
        embed: a set embedding ``[N, ...] -> [N, D]`` (e.g. ``Conv4(None, ...)``).
        support_x: ``[E, S, ...]`` support inputs (``[E, S, H, W, C]`` images for Conv4).
        support_y: ``[E, S]`` integer labels in ``[0, num_ways)``.
        num_ways: the number of classes per episode (a static int).

    Returns:
        ``[E, num_ways, D]``: ``c[e, k] = mean_{i: support_y[e, i] = k} embed(support_x[e])[i]``
        (the zero vector for a class absent from episode ``e``'s support).

    Raises:
        ValueError: shapes that do not match (the message names the argument), or
            concrete labels outside ``[0, num_ways)``.
        TypeError: ``num_ways`` is not an int.
    """
    _check_num_ways(num_ways)
    support_x, support_y = jnp.asarray(support_x), jnp.asarray(support_y)
    _check_support(support_x, support_y, num_ways)
    return _class_means(_embed_sets(embed, support_x, "support_x"), support_y, num_ways)[0]


def protonet_logits(embed: Embed, support_x, support_y, query_x, num_ways: int) -> jax.Array:
    """Minus the squared Euclidean distance of each query embedding to each prototype.

    Args:
        embed: a set embedding ``[N, ...] -> [N, D]``.
        support_x: ``[E, S, ...]`` support inputs.
        support_y: ``[E, S]`` integer labels in ``[0, num_ways)``.
        query_x: ``[E, Q, ...]`` query inputs (same item shape as ``support_x``).
        num_ways: the number of classes per episode (a static int).

    Returns:
        ``[E, Q, num_ways]`` logits ``-||embed(query_x[e])[q] - c[e, k]||^2``; ``-inf`` for a
        class absent from the episode's support.

    Raises:
        ValueError: shapes that do not match (the message names the argument), or
            concrete labels outside ``[0, num_ways)``.
        TypeError: ``num_ways`` is not an int.
    """
    _check_num_ways(num_ways)
    support_x, support_y, query_x = jnp.asarray(support_x), jnp.asarray(support_y), jnp.asarray(query_x)
    _check_support(support_x, support_y, num_ways)
    _check_query(query_x, support_x)
    centres, present = _class_means(_embed_sets(embed, support_x, "support_x"), support_y, num_ways)
    zq = _embed_sets(embed, query_x, "query_x")
    if zq.shape[-1] != centres.shape[-1]:
        raise ValueError(f"embed gave query_x {zq.shape[-1]} features but support_x {centres.shape[-1]}")
    # the difference itself, not |q|^2 - 2 q.c + |c|^2, which cancels badly for nearby points
    sq_dist = jnp.sum((zq[:, :, None, :] - centres[:, None, :, :]) ** 2, axis=-1)  # [E, Q, W]
    return jnp.where(present[:, None, :], -sq_dist, -jnp.inf)


def protonet_loss(num_ways: int) -> Callable[[Any, jax.Array, Any], jax.Array]:
    """The ProtoNet meta-training objective, for :func:`~metaprior.inference.meta.meta_learner`.

    Args:
        num_ways: the number of classes per episode (a static int).

    Returns:
        ``loss(embed, rng_key, episodes) -> scalar``: the mean over all ``E * Q`` queries of
        ``-log softmax(protonet_logits)[query_y]``. ``episodes`` is an
        :class:`~metaprior.data.Episodes` (``support_x, support_y, query_x, query_y``);
        ``rng_key`` is unused (the objective is deterministic).

    Raises:
        TypeError, ValueError: ``num_ways`` is not an int >= 1 (at once); shapes that do
            not match (when the loss is called or traced).
    """
    _check_num_ways(num_ways)

    def loss(embed: Embed, rng_key: jax.Array, episodes: Any) -> jax.Array:
        del rng_key
        logits = protonet_logits(embed, episodes.support_x, episodes.support_y, episodes.query_x, num_ways)
        query_y = jnp.asarray(episodes.query_y)
        if query_y.shape != logits.shape[:2]:
            raise ValueError(
                f"query_y must be [episodes, queries] = {logits.shape[:2]} to match query_x, got shape {query_y.shape}"
            )
        _check_labels(query_y, num_ways, "query_y")
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_p, query_y[..., None], axis=-1))

    return loss


def protonet_predictive(embed: Embed, num_ways: int) -> FewShotPredictive:
    """ProtoNet's few-shot predictive: the softmax of :func:`protonet_logits`, jitted.

    Args:
        embed: the (meta-trained) set embedding, e.g. ``fit(...).state.params``.
        num_ways: the number of classes per episode (a static int).

    Returns:
        A :data:`~metaprior.inference.evaluation.FewShotPredictive`
        ``(rng_key, support_x, support_y, query_x) -> probs [E, Q, num_ways]``, compiled
        with ``eqx.filter_jit`` (once per input shape); the key is unused. ``support_y`` is
        checked against ``num_ways`` before each call.
    """
    _check_num_ways(num_ways)
    probs = eqx.filter_jit(lambda e, sx, sy, qx: jax.nn.softmax(protonet_logits(e, sx, sy, qx, num_ways), axis=-1))

    def predict(rng_key: jax.Array, support_x, support_y, query_x) -> jax.Array:
        del rng_key
        _check_labels(jnp.asarray(support_y), num_ways, "support_y")
        return probs(embed, support_x, support_y, query_x)

    return predict


def protonet_method(init: Callable[[jax.Array, int], Embed], *, train_ways: int, name: str = "protonet") -> Method:
    """Prototypical networks as a :class:`~metaprior.inference.method.Method`.

    Args:
        init: ``(rng_key, ways) -> embedding network`` (its output size does not depend on
            the ways: prototypes are class means in the embedding space).
        train_ways: the ways of the meta-training episodes (Snell et al. 2017 train with
            more ways than they test with, e.g. 60-way episodes for 5-way tests).
        name: the method's name and its one variant.

    ``adapt`` returns each task's prototypes ``[T, W, D]``; ``predictive(embed, ways)`` is
    :func:`protonet_predictive` at ``ways`` (no options).
    """
    base = protonet_loss(train_ways)

    def loss(embed, rng_key, episodes):
        return base(embed, rng_key, episodes), None

    def adapt(rng_key, embed, support_x, support_y, ways, query_x=None):
        del rng_key, query_x
        return prototypes(embed, support_x, support_y, ways)

    def predictive(embed, ways, **options):
        if options:
            raise TypeError(f"{name}'s predictive takes no options, got {sorted(options)}")
        return stacked(protonet_predictive(embed, ways))

    return Method(name, (name,), init, loss, adapt, predictive)
