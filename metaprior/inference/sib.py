"""Inference for SIB (Hu et al. 2020): the amortized guide ``q_theta^T(w)`` and its ELBO.

``theta^0 = lambda(support)`` (:func:`support_initializer`), then ``T`` steps of the
synthetic-gradient inner loop (:mod:`metaprior.inference.synthetic_gradients`,
equation (9)) driven by ``xi``'s estimate of the query-loss gradient
(:func:`sib_posterior`); :func:`sib_guide` is the NumPyro guide of
:func:`metaprior.models.sib.sib_model`, :func:`sib_loss` the meta-training objective
and :func:`sib_predict` / :func:`sib_predictive` the posterior predictive.

References:
    Hu, S. X. et al. (2020). Empirical Bayes Transductive Meta-Learning with Synthetic
    Gradients. ICLR 2020. Equation (9) and Algorithm 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import Predictive, TraceMeanField_ELBO

from metaprior.data.episodes import Episodes
from metaprior.inference.method import Method, stacked
from metaprior.inference.synthetic_gradients import DiagGaussian, run_synthetic_gradient_vi, synthetic_gradient_vi
from metaprior.models.sib import SIBParams, cosine_logits, init_sib_params, l2_normalize, sib_model

__all__ = [
    "support_initializer",
    "sib_posterior",
    "sib_guide",
    "sib_loss",
    "sib_predict",
    "sib_predictive",
    "sib_method",
]


def support_initializer(params: SIBParams, support_x: jax.Array, support_y: jax.Array, num_ways: int) -> DiagGaussian:
    """``lambda(support)``: ``theta^0`` of one task.

    ``loc_k = init_scale * sqrt(D) * mean_{j: y_j = k} f_j / |f_j|`` (each coordinate
    O(1)); ``log_scale_k = init_log_scale``.

    Args:
        params: the meta-parameters.
        support_x: ``[ways * shots, features]``.
        support_y: ``[ways * shots]`` labels in ``0..ways-1``.
        num_ways: ``k``.

    Returns:
        A :class:`DiagGaussian` with ``loc`` and ``log_scale`` of shape ``[ways, features]``.

    References:
        Hu et al. (2020), the initialisation network ``lambda`` of Algorithm 1.
    """
    onehot = jax.nn.one_hot(support_y, num_ways, dtype=support_x.dtype)  # [S, K]
    f = l2_normalize(support_x) * math.sqrt(support_x.shape[-1])
    means = onehot.T @ f / jnp.maximum(onehot.sum(0), 1.0)[:, None]  # [K, D]
    loc = params.init_scale * means
    return DiagGaussian(loc, jnp.broadcast_to(params.init_log_scale, loc.shape))


def _prior(params: SIBParams) -> DiagGaussian:
    return DiagGaussian(params.prior_loc, params.prior_log_scale)


def sib_posterior(
    rng_key: jax.Array,
    params: SIBParams,
    episodes: Episodes,
    *,
    num_ways: int,
    num_steps: int,
    inner_optimizer: optax.GradientTransformation,
    num_samples: int = 1,
) -> DiagGaussian:
    """``theta^T`` of every task: ``lambda(support)`` then ``num_steps`` steps of equation (9).

    Query labels are never read (transductive: only ``query_x``).

    Args:
        rng_key: key for the inner loop's noise (split over tasks).
        params: the meta-parameters.
        episodes: the batch (``query_y`` ignored).
        num_ways: ``k``.
        num_steps: ``T``.
        inner_optimizer: ``optax.sgd(eta)`` for equation (9).
        num_samples: Monte Carlo draws of ``w`` per inner step.

    Returns:
        :class:`DiagGaussian` with ``loc`` and ``log_scale`` ``[tasks, ways, features]``.
    """
    algorithm = synthetic_gradient_vi(
        predict_fn=lambda w, qx: cosine_logits(w, qx, params.log_logit_scale),
        synthetic_gradient_fn=params.synthetic_gradient,  # xi on the task's query logits
        init_fn=lambda support: support_initializer(params, *support, num_ways),
        prior=_prior(params),
        optimizer=inner_optimizer,
        num_samples=num_samples,
    )

    def one_task(key, support_x, support_y, query_x):
        posterior, _ = run_synthetic_gradient_vi(key, algorithm, (support_x, support_y), query_x, num_steps)
        return posterior

    keys = jax.random.split(rng_key, episodes.query_x.shape[0])
    return jax.vmap(one_task)(keys, episodes.support_x, episodes.support_y, episodes.query_x)


def sib_guide(
    params: SIBParams,
    episodes: Episodes,
    *,
    num_ways: int,
    num_steps: int,
    inner_optimizer: optax.GradientTransformation,
    num_samples: int = 1,
) -> None:
    """``q_theta^T(w_i)`` per task, ``theta^T`` from :func:`sib_posterior` (site ``w``
    ``[tasks, 1, ways, features]``). Bind ``num_steps`` / ``inner_optimizer`` with
    :func:`functools.partial` before handing it to an ELBO or ``Predictive``."""
    posterior = sib_posterior(
        numpyro.prng_key(),
        params,
        episodes,
        num_ways=num_ways,
        num_steps=num_steps,
        inner_optimizer=inner_optimizer,
        num_samples=num_samples,
    )
    loc = posterior.loc[:, None]
    scale = jnp.exp(posterior.log_scale)[:, None]
    with numpyro.plate("tasks", episodes.query_x.shape[0], dim=-2):
        numpyro.sample("w", dist.Normal(loc, scale).to_event(2))


def sib_loss(
    params: SIBParams,
    rng_key: jax.Array,
    episodes: Episodes,
    *,
    num_ways: int,
    num_steps: int,
    inner_optimizer: optax.GradientTransformation,
    num_samples: int = 1,
) -> jax.Array:
    """Negative ELBO of the query labels per task (``TraceMeanField_ELBO``, closed-form
    KL), the meta-training objective; signature fits :func:`metaprior.inference.meta.meta_learner`.

    References:
        Hu et al. (2020), Algorithm 1.
    """
    guide = functools.partial(sib_guide, num_steps=num_steps, inner_optimizer=inner_optimizer, num_samples=num_samples)
    loss = TraceMeanField_ELBO().loss(rng_key, {}, sib_model, guide, params, episodes, num_ways=num_ways)
    return loss / episodes.query_x.shape[0]


def sib_predict(
    rng_key: jax.Array,
    params: SIBParams,
    episodes: Episodes,
    *,
    num_ways: int,
    num_steps: int,
    inner_optimizer: optax.GradientTransformation,
    num_draws: int = 16,
) -> jax.Array:
    """Posterior predictive class probabilities of the queries, ``[tasks, queries, ways]``.

    Averages ``softmax`` over ``num_draws`` draws of ``w ~ q_theta^T`` (each draw
    reruns the inner loop with its own noise). ``query_y`` is ignored.
    """
    guide = functools.partial(sib_guide, num_ways=num_ways, num_steps=num_steps, inner_optimizer=inner_optimizer)
    predictive = Predictive(sib_model, guide=guide, num_samples=num_draws, return_sites=["probs"])
    draws = predictive(rng_key, params, episodes._replace(query_y=None), num_ways=num_ways)
    return jnp.mean(draws["probs"], axis=0)


def sib_predictive(params: SIBParams, **kwargs) -> Callable:
    """SIB's few-shot predictive ``(rng_key, support_x, support_y, query_x) -> probs [T, Q, ways]``,
    jitted; ``kwargs`` are :func:`sib_predict`'s (``num_ways``, ``num_steps``,
    ``inner_optimizer``, ``num_draws``)."""
    fn = jax.jit(functools.partial(sib_predict, **kwargs))
    return lambda rng_key, sx, sy, qx: fn(rng_key, params, Episodes(sx, sy, qx, None))


def sib_method(
    num_features: int,
    *,
    num_steps: int,
    inner_optimizer: optax.GradientTransformation,
    num_samples: int = 16,
    init_std: float = 0.1,
    query_norm: bool = True,
    name: str | None = None,
) -> Method:
    """SIB with ``T = num_steps`` synthetic-gradient steps as a
    :class:`~metaprior.inference.method.Method` on feature episodes (``[T, N, num_features]``;
    :func:`~metaprior.inference.method.with_features` puts a fixed feature network in front).

    ``init(rng_key, ways)`` is :func:`~metaprior.models.sib.init_sib_params`; ``loss`` the
    negative ELBO per task (:func:`sib_loss`, no aux); ``adapt`` each task's ``theta^T``
    (:func:`sib_posterior`; transductive, so it needs ``query_x``);
    ``predictive(params, ways, *, num_samples=...)`` :func:`sib_predict` with ``num_samples``
    draws of the classifier weights. ``xi`` is built for
    the ways it was initialised with: another number of ways is a ``ValueError``. Its one
    variant is ``name`` (default ``f"sib_t{num_steps}"``).
    """
    name = name or f"sib_t{num_steps}"
    inner = dict(num_steps=num_steps, inner_optimizer=inner_optimizer)

    def init(rng_key, ways):
        return init_sib_params(rng_key, num_features, ways, init_std=init_std, query_norm=query_norm)

    def ways_of(params: SIBParams, ways: int | None = None) -> int:
        built = params.synthetic_gradient.layers[0].in_features
        if ways is not None and ways != built:
            raise ValueError(f"{name}: xi was built for {built}-way tasks, got ways={ways}")
        return built

    def loss(params, rng_key, episodes):
        return sib_loss(params, rng_key, episodes, num_ways=ways_of(params), **inner), None

    def adapt(rng_key, params, support_x, support_y, ways, query_x=None):
        if query_x is None:
            raise ValueError(f"{name} is transductive: its posterior needs the task's query_x")
        episodes = Episodes(support_x, support_y, query_x, None)
        return sib_posterior(rng_key, params, episodes, num_ways=ways_of(params, ways), **inner)

    def predictive(params, ways, **options):
        unknown = set(options) - {"num_samples"}
        if unknown:
            raise TypeError(f"{name}'s predictive takes num_samples only, got {sorted(unknown)}")
        kw = dict(num_ways=ways_of(params, ways), num_draws=options.get("num_samples", num_samples), **inner)
        return stacked(sib_predictive(params, **kw))

    return Method(name, (name,), init, loss, adapt, predictive)
