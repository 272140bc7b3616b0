"""SVI as plain functions of a parameter dict, for :mod:`metaprior.inference.meta`.

NumPyro's ``SVI`` keeps parameters inside its own state; meta-learning wants them as a
pytree it can differentiate, vmap and checkpoint. These helpers give:

- :func:`init_params`: the initial (unconstrained) values of a model/guide pair's
  ``param`` sites.
- :func:`elbo_loss`: ``loss_fn(params, rng_key, batch)``, the negative ELBO with an
  optional KL weight ``beta`` (``beta = 0`` is the "no KL" baseline; ``beta != 1`` the
  beta-ELBO of the amortized-guide paper).
- :func:`constrain_params`: the learned values in the constrained space the model
  declared (what NumPyro's ``SVI.get_params`` returns), from the unconstrained values
  that :func:`init_params` and :func:`metaprior.inference.meta.fit` hold.
- :func:`bind_params`: the model with its learned ``param`` sites bound (a learned
  prior, ready for :func:`metaprior.inference.local.fit_local`, NUTS or ``Predictive``).
- :class:`OrderedTrace_ELBO`: NumPyro's ``Trace_ELBO`` with its sites summed in a fixed
  order, so the loss value is the same bits in every process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.distributions import biject_to, constraints
from numpyro.infer import Trace_ELBO

__all__ = [
    "OrderedTrace_ELBO",
    "init_params",
    "elbo_loss",
    "elbo_terms",
    "param_constraints",
    "constrain_params",
    "bind_params",
    "bind_modules",
    "unbound_param_sites",
]


class OrderedTrace_ELBO(Trace_ELBO):
    """``numpyro.infer.Trace_ELBO`` whose per-site terms are summed in sorted site order.

    NumPyro 0.22's ``Trace_ELBO`` sums ``log p - log q`` over ``set(model_sites) |
    set(guide_sites)``; a set of strings iterates in an order set by string hashing,
    which Python randomises per process (``PYTHONHASHSEED``). The float sum, so the loss
    value (not its gradient), then differs in the last bits from one process to the
    next, and a killed-and-resumed run's loss history is not bitwise the uninterrupted
    one's. This class asks for the per-site terms (``sum_sites=False``) and adds them in
    sorted order. Same arguments as ``Trace_ELBO`` (but no ``sum_sites``).
    """

    def __init__(self, num_particles: int = 1, vectorize_particles: bool = True, multi_sample_guide: bool = False):
        super().__init__(num_particles, vectorize_particles, multi_sample_guide, sum_sites=False)

    def loss_with_mutable_state(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = super().loss_with_mutable_state(*args, **kwargs)
        terms = out["loss"]
        out["loss"] = sum((terms[name] for name in sorted(terms)), start=jnp.array(0.0))
        return out


def _param_sites(rng_key, model, guide, args, kwargs):
    k_guide, k_model = jax.random.split(rng_key)
    guide_tr = handlers.trace(handlers.seed(guide, k_guide)).get_trace(*args, **kwargs)
    model_tr = handlers.trace(handlers.replay(handlers.seed(model, k_model), guide_tr)).get_trace(*args, **kwargs)
    return guide_tr, model_tr


def init_params(
    rng_key: jax.Array,
    model: Callable,
    guide: Callable,
    *args: Any,
    which: Literal["all", "guide", "model"] = "all",
    **kwargs: Any,
) -> dict[str, Any]:
    """Initial values of the ``param`` sites, in unconstrained space.

    Args:
        rng_key: key for the guide's and model's initialisers.
        model, guide: NumPyro programs called as ``fn(*args, **kwargs)``.
        which: keep the guide's params, the model's, or both.

    Returns:
        ``{site_name: value}``; values may be pytrees (e.g. ``eqx_module`` params).
    """
    guide_tr, model_tr = _param_sites(rng_key, model, guide, args, kwargs)
    traces = {"all": (guide_tr, model_tr), "guide": (guide_tr,), "model": (model_tr,)}[which]
    params = {}
    for tr in traces:
        for name, site in tr.items():
            if site["type"] != "param":
                continue
            constraint = site["kwargs"].get("constraint", constraints.real)
            value = site["value"]
            if constraint is not constraints.real:
                value = jax.tree.map(biject_to(constraint).inv, value)
            params[name] = value
    return params


def param_constraints(rng_key, model, guide, *args, **kwargs) -> dict[str, Any]:
    """``{site_name: constraint}`` of every ``param`` site of the pair."""
    guide_tr, model_tr = _param_sites(rng_key, model, guide, args, kwargs)
    return {
        name: site["kwargs"].get("constraint", constraints.real)
        for tr in (guide_tr, model_tr)
        for name, site in tr.items()
        if site["type"] == "param"
    }


def constrain_params(params: dict[str, Any], constraints_: dict[str, Any]) -> dict[str, Any]:
    """Unconstrained ``param`` values (as :func:`init_params` and ``fit`` hold them) in
    the constrained space each site declared.

    Args:
        params: ``{site: unconstrained value}`` (values may be pytrees).
        constraints_: ``{site: constraint}``, e.g. from :func:`param_constraints`; a site
            missing from it is taken as ``constraints.real``.

    Returns:
        ``{site: constrained value}``: what the model sees, and what NumPyro's
        ``SVI.get_params`` returns for the same state.
    """
    out = {}
    for name, value in params.items():
        constraint = constraints_.get(name, constraints.real)
        out[name] = value if constraint is constraints.real else jax.tree.map(biject_to(constraint), value)
    return out


def bind_params(model: Callable, params: dict[str, Any]) -> Callable:
    """``model`` with its ``param`` sites named in ``params`` held at those values.

    ``params`` are unconstrained, as :func:`metaprior.inference.meta.fit` returns them
    (``result.state.params``): each value is mapped into its site's declared constraint
    when the site is reached, so ``bind_params(model, result.state.params)`` is the model
    with its learned prior. Sites of the guide in ``params`` are ignored; model sites not
    in ``params`` keep their own initial values.

    The bound sites are also hidden from every handler outside (``handlers.block``): an
    SVI run, an autoguide or :func:`elbo_loss` around the bound model cannot re-bind or
    optimise them. (A bare ``handlers.substitute`` does not do that: NumPyro's ``SVI``
    substitutes its own values over it and fits the prior again.)
    """
    params = dict(params)
    bound = handlers.substitute(model, substitute_fn=_substitute(params))
    return handlers.block(bound, hide_fn=lambda msg: msg["type"] == "param" and msg["name"] in params)


def bind_modules(model: Callable, modules: dict[str, Any]) -> Callable:
    """``model`` with its ``eqx_module(name, ...)`` sites held at the given (trained)
    Equinox modules: :func:`bind_params` with ``{f"{name}$params": arrays of module}``.

    Example::

        model = bind_modules(partial(task_latent_model, net=net, latent_dim=8), {"net": trained})
    """
    import equinox as eqx

    return bind_params(model, {f"{name}$params": eqx.filter(m, eqx.is_inexact_array) for name, m in modules.items()})


def unbound_param_sites(model: Callable, *args: Any, **kwargs: Any) -> list[str]:
    """The ``param`` sites of ``model(*args, **kwargs)`` that nothing binds: each would
    take its initial value. A site bound by :func:`bind_params` or NumPyro's
    ``substitute`` is not listed; one whose initial value is passed in by argument (an
    ``eqx_module`` built from a trained network) is, since the trace cannot tell it
    from an untrained one."""
    from numpyro.primitives import Messenger

    seen: list[str] = []

    class Recorder(Messenger):
        def process_message(self, msg):
            if msg["type"] == "param" and msg["value"] is None:
                seen.append(msg["name"])

    handlers.trace(handlers.seed(Recorder(model), jax.random.key(0))).get_trace(*args, **kwargs)
    return seen


def _substitute(params: dict[str, Any]):
    def fn(msg):
        if msg["type"] != "param" or msg["name"] not in params:
            return None
        value = params[msg["name"]]
        constraint = msg["kwargs"].get("constraint", constraints.real)
        if constraint is constraints.real:
            return value
        return jax.tree.map(biject_to(constraint), value)

    return fn


def _site_log_prob(site) -> jax.Array:
    value = site["value"]
    if site.get("intermediates"):
        log_prob = site["fn"].log_prob(value, site["intermediates"])
    else:
        log_prob = site["fn"].log_prob(value)
    scale = site.get("scale")
    if scale is not None:
        log_prob = scale * log_prob
    return jnp.sum(log_prob)


def elbo_terms(
    rng_key: jax.Array,
    params: dict[str, Any],
    model: Callable,
    guide: Callable,
    *args: Any,
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """One-sample estimates of the two ELBO terms.

    Returns:
        ``(log_likelihood, log_prior_minus_log_q)``: the (plate-scaled) log density of the
        observed sites, and ``log p(latents) - log q(latents)`` (a one-sample estimate of
        ``-KL(q || p)``). The ELBO is their sum.
    """
    sub = _substitute(params)
    k_guide, k_model = jax.random.split(rng_key)
    guide_tr = handlers.trace(handlers.seed(handlers.substitute(guide, substitute_fn=sub), k_guide)).get_trace(
        *args, **kwargs
    )
    model_fn = handlers.replay(handlers.seed(handlers.substitute(model, substitute_fn=sub), k_model), guide_tr)
    model_tr = handlers.trace(model_fn).get_trace(*args, **kwargs)
    loglik = jnp.zeros(())
    log_ratio = jnp.zeros(())
    for name, site in model_tr.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            loglik = loglik + _site_log_prob(site)
        else:
            if name not in guide_tr:
                raise ValueError(f"latent site {name!r} of the model is not sampled by the guide")
            log_ratio = log_ratio + _site_log_prob(site)
    for site in guide_tr.values():
        if site["type"] == "sample" and not site["is_observed"]:
            log_ratio = log_ratio - _site_log_prob(site)
    return loglik, log_ratio


def elbo_loss(
    model: Callable,
    guide: Callable,
    *,
    kl_weight: float = 1.0,
    num_particles: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    frozen: Iterable[str] = (),
) -> Callable[[dict[str, Any], jax.Array, Any], jax.Array]:
    """The negative (beta-weighted) ELBO as ``loss_fn(params, rng_key, batch)``.

    ``loss = -E_q[ log p(y | latents) + kl_weight * (log p(latents) - log q(latents)) ]``,
    averaged over ``num_particles`` reparameterised samples (vectorised). The model and
    guide are called as ``fn(batch, **model_kwargs)``.

    Args:
        model, guide: NumPyro programs.
        kl_weight: the weight ``beta`` of the KL term (1: the ELBO; 0: likelihood only,
            the "no KL" baseline of Lacoste et al. 2018).
        num_particles: Monte Carlo samples per step.
        model_kwargs: static keyword arguments (e.g. ``subsample_size``).
        frozen: names of params whose gradient is stopped (held at their given value).

    Returns:
        A jit-able function for :func:`metaprior.inference.meta.meta_learner`.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    kwargs = dict(model_kwargs or {})
    frozen = tuple(frozen)

    def loss_fn(params, rng_key, batch):
        if frozen:
            params = {k: (jax.lax.stop_gradient(v) if k in frozen else v) for k, v in params.items()}

        def one(key):
            loglik, log_ratio = elbo_terms(key, params, model, guide, batch, **kwargs)
            return -(loglik + kl_weight * log_ratio)

        keys = jax.random.split(rng_key, num_particles)
        return jnp.mean(jax.vmap(one)(keys))

    return loss_fn
