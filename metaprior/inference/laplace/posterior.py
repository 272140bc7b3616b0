"""Laplace posteriors over the weights of an Equinox network.

``phi ~ N(phi_hat, H^{-1})`` with ``H = F + (prior_precision + damping) I``: ``F`` the
curvature of the negative log-likelihood at ``phi_hat`` in one of the structures of
:mod:`~metaprior.inference.laplace.curvature`, ``prior_precision`` that of the Gaussian
prior ``N(prior_mean, prior_precision^{-1} I)`` (the ``tau`` of LLAMA's
``phi_j ~ N(theta, tau^{-1} I)``) and ``damping`` a numerical addition kept apart so that
the model's prior is never confused with it.

Two uses:

- the task-level posterior after MAML adaptation (:func:`laplace` at the adapted
  weights; Grant et al. 2018, section 4), and
- a single network fitted to one data set (:func:`fit_laplace`: MAP with Optax, then
  :func:`laplace`), an alternative to NumPyro's ``AutoLaplaceApproximation`` that never
  forms the dense Hessian unless asked to (``structure="full"``).

Example::

    post = laplace(None, net, x, y, apply_fn=lambda n, x: jax.vmap(n)(x),
                   likelihood=lambda f: dist.Normal(f[:, 0], 0.1), structure="kfac",
                   prior_precision=1.0)
    f = predictive(rng_key, post, x_new, apply_fn=..., num_samples=100)  # [S, N, C]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from metaprior.inference.laplace import _layers
from metaprior.inference.laplace.curvature import Fisher, Structure, structure_ops

__all__ = [
    "LaplacePosterior",
    "laplace",
    "log_det",
    "precision_matrix",
    "sample_params",
    "sample_networks",
    "predictive",
    "log_marginal_likelihood",
    "fit_laplace",
    "vmap_apply",
]

PyTree = Any


def vmap_apply(net: Callable, x: jax.Array) -> jax.Array:
    """``apply_fn`` for a network acting on one example: ``x [N, ...] -> [N, C]``."""
    return jax.vmap(net)(x)


class LaplacePosterior(eqx.Module):
    """A Gaussian posterior ``N(mean, (F + (prior_precision + damping) I)^{-1})``.

    Attributes:
        mean: the selected parameters at the mode (``eqx.filter(net, filter_spec)``;
            unselected leaves are ``None``).
        rest: the rest of the network (point estimates such as batch-norm scale/shift).
        curvature: the structure's state (``FullCurvature``, ``DiagCurvature`` or
            ``KFACCurvature``).
        prior_precision: scalar precision of the isotropic Gaussian prior.
        damping: scalar added to the precision for numerical reasons only.
        structure: ``"full"``, ``"diag"`` or ``"kfac"``.
    """

    mean: PyTree
    rest: PyTree
    curvature: Any
    prior_precision: jax.Array
    damping: jax.Array
    structure: str = eqx.field(static=True)

    @property
    def net(self):
        """The network at the posterior mean."""
        return eqx.combine(self.mean, self.rest)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters the posterior covers."""
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(self.mean))

    @property
    def shift(self) -> jax.Array:
        return self.prior_precision + self.damping


def laplace(
    rng_key: jax.Array | None,
    net: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    likelihood: Callable[[jax.Array], Any],
    structure: Structure = "kfac",
    fisher: Fisher = "exact",
    prior_precision: float | jax.Array = 1.0,
    damping: float | jax.Array = 0.0,
    filter_spec: PyTree | Callable | None = None,
) -> LaplacePosterior:
    """The Laplace posterior of ``net``'s weights given data ``(x, y)``, at ``net``.

    ``net`` is taken to be the mode (MAP, or MAML's adapted weights). Everything is
    jit-able and differentiable in ``net`` (LLAMA differentiates :func:`log_det` of the
    result through the inner loop).

    Args:
        rng_key: used only by ``fisher="mc"`` (else may be ``None``).
        net: an Equinox network built from ``eqx.nn.Linear`` / ``eqx.nn.Conv2d`` layers
            (others only for ``full`` / ``diag``).
        x: inputs ``[N, ...]`` as ``apply_fn`` takes them.
        y: observations ``[N, ...]`` (batch shape ``[N]`` of the likelihood).
        apply_fn: ``(net, x) -> f [N, C]``, or ``[N]`` for one scalar output per example
            (``eqx.nn.MLP(..., out_size="scalar")``); e.g. :func:`vmap_apply` for a
            per-example network, ``lambda n, x: n(x)`` for one that takes a batch (Conv4).
        likelihood: ``f -> numpyro Distribution`` with batch shape ``[N]``, ``f`` as
            ``apply_fn`` returns it.
        structure: ``"full"``, ``"diag"`` or ``"kfac"``.
        fisher: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"hessian"`` (full only);
            see :mod:`~metaprior.inference.laplace.curvature`.
        prior_precision: ``tau`` of the prior ``N(mean_0, tau^{-1} I)``.
        damping: added to the precision's diagonal, on top of ``prior_precision``.
        filter_spec: which leaves of ``net`` the posterior covers (``eqx.partition``
            semantics); default :func:`laplace_filter` (Linear/Conv2d weights and biases,
            so batch-norm scale/shift are excluded).

    Returns:
        A :class:`LaplacePosterior`.

    References:
        MacKay (1992), "A practical Bayesian framework for backpropagation networks";
        Ritter et al. (2018), eq. (6)-(8); Grant et al. (2018), section 4.
    """
    params, rest = eqx.partition(net, _layers.resolve_filter(net, filter_spec))
    if not jax.tree.leaves(params):
        raise ValueError("filter_spec selects no parameters of net")
    if x.shape[0] == 0:
        raise ValueError("laplace: x has no examples")
    out_shape = eqx.filter_eval_shape(apply_fn, net, x).shape
    if len(out_shape) == 1:  # one scalar output per example (eqx.nn.MLP(..., "scalar")): seen as [N, 1]
        apply_fn, likelihood = _as_column(apply_fn, likelihood)
    curv = structure_ops(structure).estimate(rng_key, params, rest, x, y, apply_fn, likelihood, fisher)
    dtype = jax.tree.leaves(params)[0].dtype
    if fisher == "hessian":  # the only curvature that can be indefinite: refuse it, under jit too
        curv = _check_positive_definite(curv, jnp.asarray(prior_precision + damping, dtype))
    return LaplacePosterior(
        params, rest, curv, jnp.asarray(prior_precision, dtype), jnp.asarray(damping, dtype), structure
    )


def _as_column(apply_fn: Callable, likelihood: Callable) -> tuple[Callable, Callable]:
    """``apply_fn`` returning ``[N]`` and its likelihood, as the ``[N, 1]`` pair the
    curvature code takes (the same density)."""
    return (lambda n, x: apply_fn(n, x)[:, None]), (lambda f: likelihood(f[:, 0]))


def _check_positive_definite(curv, shift: jax.Array):
    """``curv`` (a dense Hessian) unchanged if ``H + shift I`` is positive definite, else an
    error (``eqx.error_if``: raised eagerly, and at run time under ``jit``)."""
    lowest = jnp.linalg.eigvalsh(jax.lax.stop_gradient(curv.matrix))[0] + jax.lax.stop_gradient(shift)
    message = (
        "laplace(fisher='hessian'): the posterior precision H + (prior_precision + damping) I is not positive "
        "definite (the point is not a minimum of the loss: is the MAP converged?), so log_det, sample_params, "
        "predictive and log_marginal_likelihood would be NaN. Use fisher='exact' (the generalised Gauss-Newton, "
        "positive semi-definite by construction, the default), run the MAP longer, or add damping above the "
        "most negative eigenvalue"
    )
    return curv._replace(matrix=eqx.error_if(curv.matrix, lowest <= 0, message))


def log_det(posterior: LaplacePosterior, *, kron_damping: str = "exact") -> jax.Array:
    """``log det H`` of the posterior precision (differentiable).

    Args:
        posterior: from :func:`laplace`.
        kron_damping: for ``kfac`` only: ``"exact"`` adds ``prior_precision + damping``
            to the eigenvalues of each Kronecker block (an eigendecomposition of both
            factors); ``"factored"`` uses K-FAC's factored Tikhonov damping (two Cholesky
            factorisations; an upper bound, much cheaper on a CPU and for large conv
            factors). See :func:`~metaprior.inference.laplace.curvature.factored_kron_log_det`.
    """
    return structure_ops(posterior.structure).log_det(posterior.curvature, posterior.shift, kron_damping)


def precision_matrix(posterior: LaplacePosterior) -> jax.Array:
    """The posterior precision as a dense ``[P, P]`` matrix, in ``ravel_pytree(mean)`` order.

    For tests and small networks only: ``kfac`` and ``diag`` never need it.
    """
    ops = structure_ops(posterior.structure)
    dense = ops.dense(posterior.curvature, posterior.mean, posterior.rest)
    return dense + posterior.shift * jnp.eye(dense.shape[0], dtype=dense.dtype)


def sample_params(rng_key: jax.Array, posterior: LaplacePosterior, num_samples: int) -> PyTree:
    """``num_samples`` draws of the selected parameters, each leaf ``[S, ...]``."""
    ops = structure_ops(posterior.structure)

    def one(key):
        delta = ops.sample(key, posterior.curvature, posterior.shift, posterior.mean, posterior.rest)
        return jax.tree.map(jnp.add, posterior.mean, delta)

    return jax.vmap(one)(jax.random.split(rng_key, num_samples))


def sample_networks(rng_key: jax.Array, posterior: LaplacePosterior, num_samples: int) -> PyTree:
    """Sampled networks: selected leaves ``[S, ...]``, the rest shared (use with
    ``eqx.filter_vmap`` or :func:`predictive`)."""
    return eqx.combine(sample_params(rng_key, posterior, num_samples), posterior.rest)


def predictive(
    rng_key: jax.Array,
    posterior: LaplacePosterior,
    x: jax.Array,
    *,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    num_samples: int,
    pred_type: str | tuple[str, ...] = "glm",
) -> jax.Array:
    """Monte Carlo predictive: network outputs ``[S, N, C]`` under sampled weights.

    Push them through the likelihood for predictive samples or probabilities (e.g.
    ``softmax(f).mean(0)`` for classification).

    Args:
        pred_type: ``"glm"`` (the default, as in laplace-torch) runs the network's
            linearisation at the mode instead, ``f(x; phi_hat) + J(x) (phi_s - phi_hat)``
            (one VJP at the mode, then its transpose, a Jacobian-vector product, per sample): the
            generalised-linear-model predictive of Immer et al. (2021). The Laplace
            posterior is the exact posterior of that linearised model, so its samples stay
            centred on the mode's outputs. ``"nn"`` runs the network at each sampled
            ``phi_s`` (LLAMA's predictive): it moves the mean and is known to underfit.
            A tuple (``("nn", "glm")``) returns ``[V, S, N, C]``, one row per type, from
            the same draws: one posterior, both predictives.
    """
    types = (pred_type,) if isinstance(pred_type, str) else tuple(pred_type)
    if not types or any(t not in ("nn", "glm") for t in types):
        raise ValueError(f"pred_type must be 'nn', 'glm' or a tuple of them, got {pred_type!r}")
    params = sample_params(rng_key, posterior, num_samples)

    def outputs(p):
        return apply_fn(eqx.combine(p, posterior.rest), x)

    out = {}
    if "nn" in types:
        out["nn"] = jax.vmap(outputs)(params)
    if "glm" in types:
        # J delta as the transpose of the VJP: reverse mode only, so it also runs through
        # layers with a custom_vjp and no forward mode (nets.cols_matmul); same numbers as
        # jax.linearize's JVP.
        f_hat, vjp = jax.vjp(outputs, posterior.mean)
        jvp = jax.linear_transpose(lambda u: vjp(u)[0], f_hat)
        deltas = jax.tree.map(lambda s, m: s - m[None], params, posterior.mean)
        out["glm"] = f_hat[None] + jax.vmap(lambda d: jvp(d)[0])(deltas)
    return out[pred_type] if isinstance(pred_type, str) else jnp.stack([out[t] for t in types])


def log_marginal_likelihood(
    posterior: LaplacePosterior,
    x: jax.Array,
    y: jax.Array,
    *,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    likelihood: Callable[[jax.Array], Any],
    prior_mean: PyTree | None = None,
) -> jax.Array:
    """Laplace's estimate of ``log p(y | x)``:

    ``log p(y | phi_hat) + log N(phi_hat | prior_mean, tau^{-1} I) + P/2 log 2 pi
    - 1/2 log det H`` (MacKay 1992, eq. 4.8). ``prior_mean`` defaults to zero.
    """
    f = apply_fn(posterior.net, x)
    loglik = jnp.sum(likelihood(f).log_prob(y))
    flat, _ = ravel_pytree(posterior.mean)
    mu = jnp.zeros_like(flat) if prior_mean is None else ravel_pytree(prior_mean)[0]
    p = flat.size
    tau = posterior.prior_precision
    log_prior = 0.5 * p * jnp.log(tau / (2 * jnp.pi)) - 0.5 * tau * jnp.sum((flat - mu) ** 2)
    return loglik + log_prior + 0.5 * p * jnp.log(2 * jnp.pi) - 0.5 * log_det(posterior)


def fit_laplace(
    rng_key: jax.Array | None,
    net: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    likelihood: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    num_steps: int,
    structure: Structure = "kfac",
    fisher: Fisher = "exact",
    prior_precision: float = 1.0,
    damping: float = 0.0,
    filter_spec: PyTree | Callable | None = None,
) -> tuple[LaplacePosterior, jax.Array]:
    """Single-task Laplace: MAP by ``optimizer`` from ``net``, then :func:`laplace`.

    The objective is ``-sum log p(y | f(x; phi)) + tau/2 ||phi||^2`` over the selected
    leaves (a ``N(0, tau^{-1} I)`` prior); the other leaves are trained by maximum
    likelihood. This is the job of NumPyro's ``AutoLaplaceApproximation`` on a
    Bayesian network, without its dense Hessian for ``diag`` / ``kfac``.

    Returns:
        ``(posterior, losses [num_steps])``.
    """
    spec = _layers.resolve_filter(net, filter_spec)

    def loss(net):
        params = eqx.filter(net, spec)
        flat, _ = ravel_pytree(params)
        f = apply_fn(net, x)
        return -jnp.sum(likelihood(f).log_prob(y)) + 0.5 * prior_precision * jnp.sum(flat**2)

    diff, static = eqx.partition(net, eqx.is_inexact_array)
    opt_state = optimizer.init(diff)

    def step(carry, _):
        diff, opt_state = carry
        value, grads = jax.value_and_grad(lambda d: loss(eqx.combine(d, static)))(diff)
        updates, opt_state = optimizer.update(grads, opt_state, diff)
        return (optax.apply_updates(diff, updates), opt_state), value

    (diff, _), losses = jax.lax.scan(step, (diff, opt_state), None, length=num_steps)
    net = eqx.combine(diff, static)
    post = laplace(
        rng_key,
        net,
        x,
        y,
        apply_fn=apply_fn,
        likelihood=likelihood,
        structure=structure,
        fisher=fisher,
        prior_precision=prior_precision,
        damping=damping,
        filter_spec=spec,
    )
    return post, losses
