"""The few-shot ``Method`` interface: one meta-learning method as a tuple of pure functions.

In the spirit of Optax's ``GradientTransformation`` and BlackJAX's ``SamplingAlgorithm``, a
:class:`Method` is a NamedTuple of functions and holds no state; the meta-parameters are
an explicit pytree passed in and out. Every few-shot method of the library exports one
(:func:`metaprior.inference.maml.maml_method`, :func:`~metaprior.inference.maml.llama_method`,
:func:`metaprior.inference.protonet.protonet_method`,
:func:`metaprior.inference.amortized_classifier.amortized_method`,
:func:`metaprior.inference.sib.sib_method`), and the experiments train and score them through
the same four functions:

- ``init(rng_key, ways) -> params``: the meta-parameters for ``ways``-way episodes;
- ``loss(params, rng_key, episodes) -> (loss, aux)``: the meta-objective on a batch of
  episodes (:class:`~metaprior.data.Episodes`, ``[T, ...]``), for
  :func:`~metaprior.inference.meta.meta_learner` (``has_aux=True``);
- ``adapt(rng_key, params, support_x, support_y, ways, query_x=None)``: each task's
  posterior (or point estimate) given its support set, with a leading ``[T]`` axis; a
  transductive method (SIB) also reads the unlabelled ``query_x`` and needs it;
- ``predictive(params, ways, **options) -> predict``: a
  :data:`~metaprior.inference.evaluation.FewShotPredictive` whose output is
  ``[len(variants), T, Q, ways]`` class probabilities, one row per table variant (LLAMA's
  sampled-network and linearised predictives share one posterior); ``options`` are the
  method's predictive settings (LLAMA: ``tau_pred``, ``num_samples``; the amortized guide
  and SIB: ``num_samples``), an unknown one a ``TypeError``.

:func:`with_features` puts a fixed feature network in front of a method that works on
features (SIB on a pretrained Conv4); :func:`compiled_once` makes a method's predictive
compile once for every ``params`` of one structure (snapshots of a learning curve, models
of several runs).

A user's own method is the same four functions; nothing else in the library has to know it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax

from metaprior.data.episodes import Episodes

__all__ = ["Method", "stacked", "variant_rows", "with_features", "compiled_once"]

PyTree = Any


class Method(NamedTuple):
    """One few-shot method (see the module docstring for each function's contract).

    Attributes:
        name: the training unit's name (``"maml"``, ``"llama"``...).
        variants: the table rows its predictive returns, in order.
        init: ``(rng_key, ways) -> params``.
        loss: ``(params, rng_key, episodes) -> (loss, aux)``.
        adapt: ``(rng_key, params, support_x, support_y, ways, query_x=None) -> per-task
            posterior [T, ...]``.
        predictive: ``(params, ways, **options) -> FewShotPredictive`` returning
            ``[len(variants), T, Q, ways]``.
    """

    name: str
    variants: tuple[str, ...]
    init: Callable[[jax.Array, int], PyTree]
    loss: Callable[[PyTree, jax.Array, Any], tuple[jax.Array, Any]]
    adapt: Callable[..., Any]
    predictive: Callable[..., Callable]


def stacked(predict: Callable) -> Callable:
    """A predictive of ``[T, Q, W]`` as one of ``[1, T, Q, W]`` (a single-variant method)."""
    return lambda *args: predict(*args)[None]


def variant_rows(method: Method, predict: Callable) -> dict[str, Callable]:
    """``{variant: predictive [T, Q, W]}`` from a method's stacked predictive."""
    return {v: (lambda *args, i=i: predict(*args)[i]) for i, v in enumerate(method.variants)}


def with_features(method: Method, embed: Callable[[jax.Array], jax.Array]) -> Method:
    """``method`` on inputs mapped by a fixed ``embed`` (``[T, N, ...] -> [T, N, D]``, e.g. a
    pretrained network's features of each task's set; not trained: it is not in ``params``).

    The same name, variants and ``init``; ``loss``, ``adapt`` and ``predictive`` embed the
    support and query inputs first (the predictive in one compiled call with the method's).
    """

    def loss(params, rng_key, episodes):
        feats = Episodes(embed(episodes.support_x), episodes.support_y, embed(episodes.query_x), episodes.query_y)
        return method.loss(params, rng_key, feats)

    def adapt(rng_key, params, support_x, support_y, ways, query_x=None):
        query = None if query_x is None else embed(query_x)
        return method.adapt(rng_key, params, embed(support_x), support_y, ways, query_x=query)

    def predictive(params, ways, **options):
        predict = method.predictive(params, ways, **options)
        return jax.jit(lambda rng_key, sx, sy, qx: predict(rng_key, embed(sx), sy, embed(qx)))

    return method._replace(loss=loss, adapt=adapt, predictive=predictive)


def compiled_once(method: Method) -> Method:
    """``method`` whose predictive is compiled once per ``(ways, options)`` and reused for any
    ``params`` of the same structure and shapes (the methods' own predictives close over
    ``params``, so each new ``params`` would compile again: scoring every snapshot of a
    learning curve would then spend its time compiling). The numbers are the method's.
    Options that cannot be hashed (arrays) are passed through uncached."""
    cache: dict = {}

    def predictive(params, ways, **options):
        method.predictive(params, ways, **options)  # bad options fail here, not at the first call
        try:
            key = (ways, tuple(sorted(options.items())))
            hash(key)
        except TypeError:
            return method.predictive(params, ways, **options)
        if key not in cache:
            cache[key] = eqx.filter_jit(lambda p, *args: method.predictive(p, ways, **options)(*args))
        fn = cache[key]
        return lambda *args: fn(params, *args)

    return method._replace(predictive=predictive)
