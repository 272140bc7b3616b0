"""Amortized variational inference by synthetic gradients (the inner loop of SIB).

A diagonal Gaussian ``q_theta(w)`` starts from an amortized guess ``theta^0 =
lambda(context)`` and takes ``T`` steps of equation (9) of Hu et al. (2020):

    theta^{t+1} = theta^t - eta [ E_eps sum_j xi(y_hat_j) d y_hat_j/d w  d w/d theta
                                  + grad_theta KL(q_theta || p) ],

where ``w = loc + exp(log_scale) * eps`` and ``y_hat = predict_fn(w, inputs)``. The
synthetic gradient ``xi(y_hat)`` stands in for the gradient of the unknown loss with
respect to the predictions (the labels of ``inputs`` are not seen), so the update is a
vector-Jacobian product of the prediction function with ``xi``'s output, plus the
closed-form gradient of the KL to the prior. Replacing ``xi`` by the true gradient of
a loss recovers gradient descent on that loss's ELBO (tested as an identity).

Nothing here knows about classifiers: the caller passes the prediction function, the
synthetic-gradient function, the initialiser and the prior, and the inner optimizer
as an Optax transformation (``optax.sgd(eta)`` is equation (9) exactly). Everything
is differentiable, so meta-parameters closed over by those functions are learned by
back-propagating through the ``T`` steps.

References:
    Hu, S. X., Moreno, P. G., Xiao, Y., Shen, X., Obozinski, G., Lawrence, N. D.,
    Damianou, A. (2020). Empirical Bayes Transductive Meta-Learning with Synthetic
    Gradients. ICLR 2020. Equation (9), Algorithm 1.
    Jaderberg, M. et al. (2017). Decoupled Neural Interfaces using Synthetic
    Gradients. ICML 2017.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DiagGaussian",
    "SyntheticGradientState",
    "SyntheticGradientInfo",
    "SyntheticGradientVI",
    "diag_gaussian_kl",
    "sample_noise",
    "reparameterize",
    "synthetic_gradient",
    "synthetic_gradient_vi",
    "run_synthetic_gradient_vi",
]

PyTree = Any


class DiagGaussian(NamedTuple):
    """A diagonal Gaussian over a pytree of arrays.

    Attributes:
        loc: the mean (any pytree of arrays).
        log_scale: log standard deviations, same structure as ``loc`` (or broadcastable
            to it leaf by leaf).
    """

    loc: PyTree
    log_scale: PyTree


class SyntheticGradientState(NamedTuple):
    """Carried state of the inner loop.

    Attributes:
        step: number of completed steps (int32 scalar).
        posterior: the current variational parameters ``theta^t``.
        opt_state: the inner Optax optimizer's state.
    """

    step: jax.Array
    posterior: DiagGaussian
    opt_state: PyTree


class SyntheticGradientInfo(NamedTuple):
    """Diagnostics of one step (not carried).

    Attributes:
        kl: ``KL(q_theta^t || p)`` before the step.
        grad_norm: global L2 norm of the bracket of equation (9) at ``theta^t``.
    """

    kl: jax.Array
    grad_norm: jax.Array


class SyntheticGradientVI(NamedTuple):
    """A pair of pure functions: ``init(context) -> SyntheticGradientState`` (``theta^0 =
    lambda(context)``) and ``step(rng_key, state, inputs) -> (state, info)`` (one step of
    equation (9) on the unlabelled ``inputs``)."""

    init: Callable[[Any], SyntheticGradientState]
    step: Callable[[jax.Array, SyntheticGradientState, Any], tuple[SyntheticGradientState, SyntheticGradientInfo]]


def diag_gaussian_kl(q: DiagGaussian, p: DiagGaussian) -> jax.Array:
    """``KL(q || p)`` between diagonal Gaussians, in closed form, summed over every entry.

    ``KL = sum [ log s_p - log s_q + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2 ]``.
    ``p``'s leaves may broadcast against ``q``'s (e.g. one prior shared by all classes).

    Args:
        q: the variational distribution.
        p: the prior.

    Returns:
        A scalar.
    """

    def leaf(mq, lq, mp, lp):
        mq, lq, mp, lp = jnp.broadcast_arrays(mq, lq, mp, lp)
        ratio = jnp.exp(2.0 * (lq - lp))
        return 0.5 * jnp.sum(ratio + jnp.square(mq - mp) * jnp.exp(-2.0 * lp) - 1.0 - 2.0 * (lq - lp))

    terms = jax.tree.map(leaf, q.loc, q.log_scale, p.loc, p.log_scale)
    return sum(jax.tree.leaves(terms), jnp.zeros(()))


def sample_noise(rng_key: jax.Array, q: DiagGaussian, num_samples: int) -> PyTree:
    """Standard normal noise ``eps`` shaped like ``q.loc`` with a leading ``[num_samples]``.

    This is the noise one step of :func:`synthetic_gradient_vi` draws from its key.
    """
    leaves, treedef = jax.tree.flatten(q.loc)
    keys = jax.random.split(rng_key, len(leaves))
    eps = [jax.random.normal(k, (num_samples, *jnp.shape(x)), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, eps)


def reparameterize(q: DiagGaussian, eps: PyTree) -> PyTree:
    """``w = loc + exp(log_scale) * eps`` leaf by leaf (no sample axis: vmap for several)."""
    return jax.tree.map(lambda m, s, e: m + jnp.exp(s) * e, q.loc, q.log_scale, eps)


def synthetic_gradient(
    rng_key: jax.Array,
    q: DiagGaussian,
    inputs: Any,
    predict_fn: Callable[[PyTree, Any], jax.Array],
    synthetic_gradient_fn: Callable[[jax.Array], jax.Array],
    prior: DiagGaussian,
    num_samples: int = 1,
) -> tuple[DiagGaussian, jax.Array]:
    """The bracket of equation (9): the synthetic gradient of the negative ELBO at ``q``.

    ``E_eps [ (d y_hat / d theta)^T xi(y_hat) ] + grad_theta KL(q_theta || p)``, the
    expectation estimated with ``num_samples`` reparameterised draws.

    Args:
        rng_key: key for the noise (:func:`sample_noise`).
        q: the current variational parameters ``theta``.
        inputs: the (unlabelled) inputs ``predict_fn`` needs.
        predict_fn: ``(w, inputs) -> y_hat`` (e.g. logits ``[examples, classes]``).
        synthetic_gradient_fn: ``xi``: ``y_hat -> dL/dy_hat`` estimate, same shape.
        prior: ``p`` (broadcastable against ``q``).
        num_samples: Monte Carlo draws of ``w``.

    Returns:
        ``(grad, kl)``: the gradient as a :class:`DiagGaussian` like ``q``, and
        ``KL(q || p)``.

    References:
        Hu et al. (2020), equation (9).
    """
    eps = sample_noise(rng_key, q, num_samples)

    def predictions(theta: DiagGaussian) -> jax.Array:
        return jax.vmap(lambda e: predict_fn(reparameterize(theta, e), inputs))(eps)

    y_hat, pullback = jax.vjp(predictions, q)
    cotangent = jax.vmap(synthetic_gradient_fn)(y_hat) / num_samples
    (data_grad,) = pullback(cotangent.astype(y_hat.dtype))
    kl, kl_grad = jax.value_and_grad(diag_gaussian_kl)(q, prior)
    return jax.tree.map(jnp.add, data_grad, kl_grad), kl


def synthetic_gradient_vi(
    predict_fn: Callable[[PyTree, Any], jax.Array],
    synthetic_gradient_fn: Callable[[jax.Array], jax.Array],
    init_fn: Callable[[Any], DiagGaussian],
    prior: DiagGaussian,
    optimizer: optax.GradientTransformation,
    *,
    num_samples: int = 1,
) -> SyntheticGradientVI:
    """Build the inner loop of SIB as pure ``init`` / ``step`` functions.

    Args:
        predict_fn: ``(w, inputs) -> y_hat``; ``w`` has the structure of ``q.loc``.
        synthetic_gradient_fn: ``xi``: ``y_hat -> dL/dy_hat`` estimate (same shape);
            applied to each Monte Carlo draw's predictions.
        init_fn: ``lambda``: ``context -> theta^0`` (e.g. from a labelled support set).
        prior: ``p_psi``, a :class:`DiagGaussian` broadcastable against ``theta``.
        optimizer: the inner optimizer; ``optax.sgd(eta)`` is equation (9).
        num_samples: Monte Carlo draws of ``w`` per step.

    Returns:
        A :class:`SyntheticGradientVI`. Neither function is jitted here.

    References:
        Hu et al. (2020), equation (9) and Algorithm 1.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def init(context: Any) -> SyntheticGradientState:
        posterior = init_fn(context)
        return SyntheticGradientState(jnp.zeros((), jnp.int32), posterior, optimizer.init(posterior))

    def step(rng_key: jax.Array, state: SyntheticGradientState, inputs: Any):
        grad, kl = synthetic_gradient(
            rng_key, state.posterior, inputs, predict_fn, synthetic_gradient_fn, prior, num_samples
        )
        updates, opt_state = optimizer.update(grad, state.opt_state, state.posterior)
        posterior = optax.apply_updates(state.posterior, updates)
        info = SyntheticGradientInfo(kl=kl, grad_norm=optax.tree.norm(grad))
        return SyntheticGradientState(state.step + 1, posterior, opt_state), info

    return SyntheticGradientVI(init, step)


def run_synthetic_gradient_vi(
    rng_key: jax.Array,
    algorithm: SyntheticGradientVI,
    context: Any,
    inputs: Any,
    num_steps: int,
) -> tuple[DiagGaussian, SyntheticGradientInfo]:
    """``theta^T``: ``init(context)`` then ``num_steps`` steps (a ``lax.scan``).

    Step ``t`` uses ``jax.random.fold_in(rng_key, t)``. With ``num_steps = 0`` the result
    is ``lambda(context)`` itself.

    Args:
        rng_key: key for the steps' noise.
        algorithm: from :func:`synthetic_gradient_vi`.
        context: passed to the initialiser (e.g. the labelled support set).
        inputs: passed to the prediction function at every step (e.g. unlabelled queries).
        num_steps: ``T`` (a Python int).

    Returns:
        ``(theta_T, info)`` with ``info`` fields stacked over steps, ``[num_steps]``.
    """
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    state = algorithm.init(context)

    def body(state, t):
        return algorithm.step(jax.random.fold_in(rng_key, t), state, inputs)

    state, info = jax.lax.scan(body, state, jnp.arange(num_steps))
    return state.posterior, info
