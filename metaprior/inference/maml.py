"""MAML as empirical Bayes (ML-POINT) and LLAMA (ML-LAPLACE).

In the hierarchical model of :mod:`metaprior.models.maml` (shared ``theta``,
``phi_j ~ N(theta, tau^{-1} I)``), MAML's inner loop -- K steps of gradient descent
from ``theta`` on task j's support set -- is a point estimate ``phi_hat_j(theta)`` of
the task parameters (early stopping acting as the prior; Santos 1996), and the
meta-loss is the negative log-likelihood of the query set at that point (ML-POINT).
LLAMA adds Laplace's correction ``eta * 1/2 log det H_j``, with ``H_j`` the curvature of
task j's negative log-likelihood at ``phi_hat_j`` plus ``tau I`` (ML-LAPLACE), and
differentiates through it.

Both objectives are ``objective(net, rng_key, tasks) -> (loss, MAMLAux)`` for
:func:`metaprior.inference.meta.meta_learner` (``has_aux=True``). ``tasks`` is any
object with ``support_x [T, Ns, ...]``, ``support_y [T, Ns, ...]``, ``query_x``,
``query_y`` (:class:`SupportQuery`, or :class:`metaprior.data.Episodes`).

The inner-loop optimizer is an Optax transformation given by the caller
(``optax.sgd(alpha)`` is MAML; a learned per-parameter rate or momentum is another
composition, not a flag here).

References:
    Finn, Abbeel & Levine (2017), "Model-agnostic meta-learning", Algorithm 2.
    Grant, Finn, Levine, Darrell & Griffiths (2018), "Recasting gradient-based
    meta-learning as hierarchical Bayes", Algorithms 2-4, eq. (3)-(6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from metaprior.data.tasks import SupportQuery
from metaprior.inference.laplace import log_det
from metaprior.inference.laplace._layers import resolve_filter
from metaprior.inference.method import Method, stacked

__all__ = [
    "SupportQuery",
    "MAMLAux",
    "adapt",
    "ml_point",
    "ml_laplace",
    "nll_loss",
    "mse_loss",
    "adapt_tasks",
    "point_predict",
    "laplace_predict",
    "kfac_llama",
    "point_predictive",
    "laplace_sampler",
    "laplace_predictive",
    "maml_method",
    "llama_method",
    "method_from",
]

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


class MAMLAux(NamedTuple):
    """Per-step diagnostics (means over tasks).

    Attributes:
        query_loss: query loss after adaptation (the ML-POINT term).
        support_loss_before: support loss at ``theta``.
        support_loss_after: support loss after the inner loop.
        log_det: mean ``log det H_j`` (zero for ML-POINT).
    """

    query_loss: jax.Array
    support_loss_before: jax.Array
    support_loss_after: jax.Array
    log_det: jax.Array


def nll_loss(apply_fn: Callable, likelihood: Callable) -> LossFn:
    """``loss(net, x, y) = -mean_n log p(y_n | f(x; net)_n)`` for a NumPyro likelihood."""

    def loss(net, x, y):
        return -jnp.mean(likelihood(apply_fn(net, x)).log_prob(y))

    return loss


def mse_loss(apply_fn: Callable) -> LossFn:
    """``loss(net, x, y) = mean_n ||f(x; net)_n - y_n||^2`` (MAML's regression loss),
    for a network with one output per example (``f [N, 1]``, ``y [N]``)."""

    def loss(net, x, y):
        f = apply_fn(net, x)
        return jnp.mean((f.reshape(y.shape) - y) ** 2)

    return loss


def adapt(
    net: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_steps: int,
    filter_spec: PyTree | Callable | None = None,
    first_order: bool = False,
    unroll: int | bool = 1,
) -> tuple[PyTree, jax.Array]:
    """MAML's inner loop: ``num_steps`` updates of ``inner_optimizer`` on ``loss_fn``.

    Only the leaves selected by ``filter_spec`` adapt (default: Linear/Conv2d weights and
    biases; batch-norm scale and shift stay at ``theta``, as in Grant et al. 2018).

    Args:
        net: ``theta`` (the starting point and prior mean).
        x: support inputs ``[N, ...]``; y: support targets ``[N, ...]``.
        loss_fn: ``(net, x, y) -> scalar``.
        inner_optimizer: any Optax transformation (``optax.sgd(alpha)`` is MAML).
        num_steps: number of inner steps ``K`` (0 returns ``net``).
        filter_spec: which leaves adapt (``eqx.partition`` semantics).
        first_order: stop gradients through the inner gradients (first-order MAML):
            ``d phi / d theta`` is then the identity.
        unroll: ``lax.scan``'s ``unroll`` for the inner loop (``True``: fully unrolled,
            which lets XLA fuse across steps: faster steps, longer compilation).

    Returns:
        ``(phi_hat, losses [num_steps + 1])``: the adapted network and the support loss
        before each step and after the last.
    """
    fast, slow = eqx.partition(net, resolve_filter(net, filter_spec))
    value_and_grad = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, slow), x, y))

    def step(carry, _):
        fast, opt_state = carry
        value, grads = value_and_grad(fast)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        updates, opt_state = inner_optimizer.update(grads, opt_state, fast)
        return (optax.apply_updates(fast, updates), opt_state), value

    (fast, _), losses = jax.lax.scan(step, (fast, inner_optimizer.init(fast)), None, length=num_steps, unroll=unroll)
    final = loss_fn(eqx.combine(fast, slow), x, y)
    return eqx.combine(fast, slow), jnp.concatenate([losses, final[None]])


def _objective(loss_fn, inner_optimizer, num_steps, filter_spec, first_order, extra=None, extra_tasks=None, unroll=1):
    def objective(net: PyTree, rng_key: jax.Array, tasks) -> tuple[jax.Array, MAMLAux]:
        num_tasks = tasks.support_x.shape[0]

        def one(sx, sy, qx, qy):
            phi, inner = adapt(
                net,
                sx,
                sy,
                loss_fn=loss_fn,
                inner_optimizer=inner_optimizer,
                num_steps=num_steps,
                filter_spec=filter_spec,
                first_order=first_order,
                unroll=unroll,
            )
            return loss_fn(phi, qx, qy), phi, inner[0], inner[-1]

        query, phis, before, after = jax.vmap(one)(*(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y))
        loss, ld = jnp.mean(query), jnp.zeros(())
        if extra is not None:
            m = num_tasks if extra_tasks is None else min(extra_tasks, num_tasks)
            keys = jax.random.split(rng_key, m)
            head = lambda a: a[:m]
            penalty, lds = jax.vmap(extra)(keys, jax.tree.map(head, phis), head(tasks.support_x), head(tasks.support_y))
            loss, ld = loss + jnp.mean(penalty), jnp.mean(lds)
        return loss, MAMLAux(query.mean(), before.mean(), after.mean(), ld)

    return objective


def ml_point(
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_inner_steps: int,
    *,
    filter_spec: PyTree | Callable | None = None,
    first_order: bool = False,
    unroll: int | bool = 1,
) -> Callable[[PyTree, jax.Array, Any], tuple[jax.Array, MAMLAux]]:
    """ML-POINT (MAML): mean over tasks of the query loss after :func:`adapt`.

    Grant et al. (2018), Algorithm 2 / eq. (4): ``-log p(X | theta) ~= sum_j -log
    p(x_j^query | phi_hat_j(theta))``. Second-order by default (differentiates through
    the inner loop); ``first_order=True`` is FOMAML.

    Returns:
        ``objective(net, rng_key, tasks) -> (loss, MAMLAux)``.
    """

    return _objective(loss_fn, inner_optimizer, num_inner_steps, filter_spec, first_order, unroll=unroll)


def ml_laplace(
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_inner_steps: int,
    posterior_fn: Callable[..., Any],
    *,
    eta: float = 1e-6,
    log_det_fn: Callable[[Any], jax.Array] = log_det,
    log_det_tasks: int | None = None,
    filter_spec: PyTree | Callable | None = None,
    first_order: bool = False,
    unroll: int | bool = 1,
) -> Callable[[PyTree, jax.Array, Any], tuple[jax.Array, MAMLAux]]:
    """ML-LAPLACE (LLAMA): ML-POINT plus ``eta * 1/2 log det H_j``, differentiated.

    Grant et al. (2018), Algorithm 4 / eq. (6): ``-log p(x_j | theta) ~= -log
    p(x_j^query | phi_hat_j) + eta * 1/2 log det H_j``, ``H_j`` the curvature of the
    support negative log-likelihood at ``phi_hat_j`` plus the prior precision ``tau``.

    Args:
        loss_fn, inner_optimizer, num_inner_steps, filter_spec, first_order: as
            :func:`ml_point`.
        posterior_fn: ``(rng_key, phi, x, y) -> LaplacePosterior``; compose it from
            :func:`metaprior.inference.laplace.laplace`, e.g.
            ``functools.partial(laplace, apply_fn=..., likelihood=..., structure="kfac",
            prior_precision=1e-3)``. Its structure, Fisher and ``tau`` are the caller's.
        eta: weight of the log-determinant (the paper's 1e-6 by default).
        log_det_fn: ``posterior -> log det H``; e.g. ``functools.partial(log_det,
            kron_damping="factored")`` for K-FAC's cheap factored damping.
        log_det_tasks: if given, the log-determinant term is averaged over the first
            ``log_det_tasks`` tasks of the batch only. Tasks in a sampled batch are
            exchangeable, so this is an unbiased estimate of the mean over all of them
            (the query term always uses every task); it trades variance for the cost of
            the curvature, which dominates a meta-step of a small network.
        unroll: as :func:`adapt`.

    Returns:
        ``objective(net, rng_key, tasks) -> (loss, MAMLAux)``.
    """

    def penalty(key, phi, sx, sy):
        ld = log_det_fn(posterior_fn(key, phi, sx, sy))
        return eta * 0.5 * ld, ld

    return _objective(
        loss_fn, inner_optimizer, num_inner_steps, filter_spec, first_order, penalty, log_det_tasks, unroll=unroll
    )


def adapt_tasks(
    theta: PyTree,
    support_x: jax.Array,
    support_y: jax.Array,
    *,
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_steps: int,
) -> PyTree:
    """:func:`adapt` vmapped over tasks: ``support_x [T, N, ...]`` -> the adapted networks
    (a pytree whose leaves gain a leading ``[T]`` axis)."""

    def one(sx, sy):
        phi, _ = adapt(theta, sx, sy, loss_fn=loss_fn, inner_optimizer=inner_optimizer, num_steps=num_steps)
        return phi

    return jax.vmap(one)(support_x, support_y)


def point_predict(
    theta: PyTree,
    support_x: jax.Array,
    support_y: jax.Array,
    query_x: jax.Array,
    *,
    apply_fn: Callable,
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_steps: int,
    link: Callable = jax.nn.softmax,
) -> jax.Array:
    """MAML's predictive: ``link(f(query; phi_hat))`` with ``phi_hat`` adapted on each task's
    support set; ``[T, Q, ...]`` (class probabilities with the default softmax link)."""
    phis = adapt_tasks(
        theta, support_x, support_y, loss_fn=loss_fn, inner_optimizer=inner_optimizer, num_steps=num_steps
    )
    return jax.vmap(lambda phi, qx: link(apply_fn(phi, qx)))(phis, query_x)


def laplace_predict(
    rng_key: jax.Array,
    theta: PyTree,
    support_x: jax.Array,
    support_y: jax.Array,
    query_x: jax.Array,
    *,
    apply_fn: Callable,
    likelihood: Callable,
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_steps: int,
    prior_precision: float,
    num_samples: int,
    pred_type: str | tuple[str, ...] = "glm",
    structure: str = "kfac",
    link: Callable = jax.nn.softmax,
) -> jax.Array:
    """LLAMA's predictive draws: ``link(f(query; phi_s))``, ``phi_s ~ N(phi_hat, (F + tau I)^{-1})``
    with the curvature ``F`` of each task's support set at its adapted ``phi_hat``
    (``pred_type="glm"``: ``f`` linearised at ``phi_hat``).

    Returns:
        ``[T, num_samples, Q, ...]``; the posterior predictive is the mean over axis 1.
        With a tuple ``pred_type`` (``("nn", "glm")``): ``[V, T, num_samples, Q, ...]``,
        every type from the same adapted ``phi_hat``, curvature and draws (one Laplace
        fit per task instead of one per type).

    References:
        Grant et al. (2018), section 4 and eq. (6).
    """
    from metaprior.inference.laplace import laplace, predictive

    phis = adapt_tasks(
        theta, support_x, support_y, loss_fn=loss_fn, inner_optimizer=inner_optimizer, num_steps=num_steps
    )

    def one(key, phi, sx, sy, qx):
        post = laplace(
            None,
            phi,
            sx,
            sy,
            apply_fn=apply_fn,
            likelihood=likelihood,
            structure=structure,
            prior_precision=prior_precision,
        )
        f = predictive(key, post, qx, apply_fn=apply_fn, num_samples=num_samples, pred_type=pred_type)
        return link(f)

    keys = jax.random.split(rng_key, support_x.shape[0])
    out = jax.vmap(one)(keys, phis, support_x, support_y, query_x)
    return out if isinstance(pred_type, str) else jnp.moveaxis(out, 1, 0)


def kfac_llama(
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    num_inner_steps: int,
    *,
    apply_fn: Callable,
    likelihood: Callable,
    prior_precision: float,
    eta: float = 1e-6,
    kron_damping: str = "factored",
    fisher: str = "exact",
    log_det_tasks: int | None = None,
    first_order: bool = False,
) -> Callable[[PyTree, jax.Array, Any], tuple[jax.Array, MAMLAux]]:
    """LLAMA as Grant et al. (2018) run it: :func:`ml_laplace` with a K-FAC Laplace posterior.

    The composition ``ml_laplace(..., partial(laplace, structure="kfac", ...),
    log_det_fn=partial(log_det, kron_damping=...))`` in one call; see :func:`ml_laplace`
    for ``eta`` and ``log_det_tasks`` and :func:`metaprior.inference.laplace.log_det`
    for ``kron_damping``.
    """
    from metaprior.inference.laplace import laplace

    posterior_fn = functools.partial(
        laplace,
        apply_fn=apply_fn,
        likelihood=likelihood,
        structure="kfac",
        fisher=fisher,
        prior_precision=prior_precision,
    )
    log_det_fn = functools.partial(log_det, kron_damping=kron_damping)
    kw = dict(eta=eta, log_det_fn=log_det_fn, log_det_tasks=log_det_tasks, first_order=first_order)
    return ml_laplace(loss_fn, inner_optimizer, num_inner_steps, posterior_fn, **kw)


def point_predictive(theta: PyTree, **inner: Any) -> Callable:
    """MAML's few-shot predictive ``(rng_key, support_x, support_y, query_x) -> [T, Q, ...]``, jitted.

    ``inner`` are :func:`point_predict`'s keywords (``apply_fn``, ``loss_fn``,
    ``inner_optimizer``, ``num_steps``, ``link``); the key is unused (MAML is
    deterministic). A :data:`metaprior.inference.evaluation.FewShotPredictive`.
    """
    fn = eqx.filter_jit(functools.partial(point_predict, **inner))
    return lambda rng_key, sx, sy, qx: fn(theta, sx, sy, qx)


def laplace_sampler(theta: PyTree, **kwargs: Any) -> Callable:
    """LLAMA's predictive draws ``(rng_key, support_x, support_y, query_x) -> [T, S, Q, ...]``, jitted.

    ``kwargs`` are :func:`laplace_predict`'s keywords.
    """
    fn = eqx.filter_jit(functools.partial(laplace_predict, **kwargs))
    return lambda rng_key, sx, sy, qx: fn(rng_key, theta, sx, sy, qx)


def laplace_predictive(theta: PyTree, **kwargs: Any) -> Callable:
    """LLAMA's few-shot predictive: the mean over Laplace draws (:func:`laplace_sampler`) of ``link(f)``
    (``[V, T, Q, ...]`` for a tuple ``pred_type``)."""
    sampler = laplace_sampler(theta, **kwargs)
    axis = 1 if isinstance(kwargs.get("pred_type", "glm"), str) else 2
    return lambda rng_key, sx, sy, qx: sampler(rng_key, sx, sy, qx).mean(axis)


# ------------------------------------------------------------------ Method objects


def maml_method(
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    *,
    init: Callable[[jax.Array, int], PyTree],
    apply_fn: Callable,
    train_inner_steps: int,
    eval_inner_steps: int,
    first_order: bool = False,
    link: Callable = jax.nn.softmax,
    name: str | None = None,
) -> Method:
    """MAML (ML-POINT) as a :class:`~metaprior.inference.method.Method`.

    Args:
        loss_fn: the inner and query loss (:func:`nll_loss`, :func:`mse_loss`).
        inner_optimizer: the inner loop's Optax transformation (``optax.sgd(alpha)``).
        init: ``(rng_key, ways) -> network`` (``theta``).
        apply_fn: ``(net, x) -> f`` as ``loss_fn`` uses it.
        train_inner_steps, eval_inner_steps: inner steps in meta-training and at test time.
        first_order: FOMAML's meta-gradient.
        link: the predictive's map from outputs to probabilities.
        name: ``"maml"`` / ``"maml_fo"`` by default; its one variant.

    The predictive is the adapted network's ``link(f)`` (``options``: none).
    """
    name = name or ("maml_fo" if first_order else "maml")
    inner = dict(loss_fn=loss_fn, inner_optimizer=inner_optimizer)

    def adapt_fn(rng_key, theta, support_x, support_y, ways, query_x=None):
        del rng_key, ways, query_x  # the network's head says the ways
        return adapt_tasks(theta, support_x, support_y, **inner, num_steps=eval_inner_steps)

    def predictive(theta, ways, **options):
        if options:
            raise TypeError(f"{name}'s predictive takes no options, got {sorted(options)}")
        del ways  # the network's head says it
        predict = point_predictive(theta, apply_fn=apply_fn, num_steps=eval_inner_steps, link=link, **inner)
        return stacked(predict)

    loss = ml_point(loss_fn, inner_optimizer, train_inner_steps, first_order=first_order)
    return Method(name, (name,), init, loss, adapt_fn, predictive)


def llama_method(
    loss_fn: LossFn,
    inner_optimizer: optax.GradientTransformation,
    *,
    init: Callable[[jax.Array, int], PyTree],
    apply_fn: Callable,
    likelihood: Callable,
    prior_precision: float,
    train_inner_steps: int,
    eval_inner_steps: int,
    eta: float = 1e-6,
    kron_damping: str = "factored",
    fisher: str = "exact",
    log_det_tasks: int | None = None,
    first_order: bool = False,
    pred_types: tuple[str, ...] = ("nn", "glm"),
    link: Callable = jax.nn.softmax,
    name: str = "llama",
) -> Method:
    """LLAMA (ML-LAPLACE with K-FAC, :func:`kfac_llama`) as a :class:`~metaprior.inference.method.Method`.

    Its variants are ``f"{name}_{t}"`` for ``t`` in ``pred_types``: the Laplace predictive
    with sampled networks (``"nn"``, the paper's) and with the linearised network
    (``"glm"``), from one posterior per task. ``adapt`` returns each task's adapted weights
    (the Laplace mode). ``predictive(theta, ways, *, tau_pred, num_samples)``: ``tau_pred``
    is the predictive prior precision (one float, or one per type); where the types'
    precisions differ each type gets its own posterior.
    """
    inner = dict(loss_fn=loss_fn, inner_optimizer=inner_optimizer)
    variants = tuple(f"{name}_{t}" for t in pred_types)

    def adapt_fn(rng_key, theta, support_x, support_y, ways, query_x=None):
        del rng_key, ways, query_x  # the network's head says the ways
        return adapt_tasks(theta, support_x, support_y, **inner, num_steps=eval_inner_steps)

    def predictive(theta, ways, *, tau_pred, num_samples):
        del ways
        taus = (tau_pred,) * len(pred_types) if jnp.ndim(tau_pred) == 0 else tuple(tau_pred)
        kw = dict(apply_fn=apply_fn, likelihood=likelihood, num_samples=num_samples, link=link, **inner)
        kw["num_steps"] = eval_inner_steps
        if len(set(taus)) == 1:  # one posterior serves every type
            return laplace_predictive(theta, prior_precision=taus[0], pred_type=tuple(pred_types), **kw)
        rows = [laplace_predictive(theta, prior_precision=tau, pred_type=t, **kw) for t, tau in zip(pred_types, taus)]
        return lambda *args: jnp.stack([row(*args) for row in rows])

    kw = dict(eta=eta, kron_damping=kron_damping, log_det_tasks=log_det_tasks, fisher=fisher)
    loss = kfac_llama(
        loss_fn,
        inner_optimizer,
        train_inner_steps,
        apply_fn=apply_fn,
        likelihood=likelihood,
        prior_precision=prior_precision,
        first_order=first_order,
        **kw,
    )
    return Method(name, variants, init, loss, adapt_fn, predictive)


def method_from(name: str, loss_fn: LossFn, inner_optimizer: optax.GradientTransformation, **kwargs: Any) -> Method:
    """The one place where a config's method name becomes a MAML-family :class:`Method`.

    ``"maml"`` and ``"maml_fo"`` (first-order) call :func:`maml_method`, ``"llama"``
    :func:`llama_method`; ``kwargs`` are theirs (LLAMA's own ones are dropped for MAML).

    Raises:
        ValueError: an unknown name.
    """
    common = ("init", "apply_fn", "train_inner_steps", "eval_inner_steps", "first_order", "link")
    if name in ("maml", "maml_fo"):
        kw = {k: v for k, v in kwargs.items() if k in common}
        if name == "maml_fo":
            kw["first_order"] = True
        return maml_method(loss_fn, inner_optimizer, **kw, name=name)
    if name == "llama":
        return llama_method(loss_fn, inner_optimizer, **kwargs)
    raise ValueError(f"method must be 'maml', 'maml_fo' or 'llama', got {name!r}")
