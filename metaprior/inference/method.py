"""The few-shot ``Method`` interface: one meta-learning method as a tuple of pure functions.

In the spirit of Optax's ``GradientTransformation`` and BlackJAX's ``SamplingAlgorithm``, a
:class:`Method` is a NamedTuple of functions and holds no state; the meta-parameters are
an explicit pytree passed in and out. Every few-shot method of the library exports one
(:func:`metaprior.inference.maml.maml_method`, :func:`~metaprior.inference.maml.llama_method`,
:func:`metaprior.inference.protonet.protonet_method`), and the experiments train and score
them through the same four functions:

- ``init(rng_key, ways) -> params``: the meta-parameters for ``ways``-way episodes;
- ``loss(params, rng_key, episodes) -> (loss, aux)``: the meta-objective on a batch of
  episodes (:class:`~metaprior.data.Episodes`, ``[T, ...]``), for
  :func:`~metaprior.inference.meta.meta_learner` (``has_aux=True``);
- ``adapt(rng_key, params, support_x, support_y, ways)``: each task's posterior (or point
  estimate) given its support set, with a leading ``[T]`` axis;
- ``predictive(params, ways, **options) -> predict``: a
  :data:`~metaprior.inference.evaluation.FewShotPredictive` whose output is
  ``[len(variants), T, Q, ways]`` class probabilities, one row per table variant (LLAMA's
  sampled-network and linearised predictives share one posterior); ``options`` are the
  method's predictive settings (LLAMA: ``tau_pred``, ``pred_type``, ``num_samples``).

A user's own method is the same four functions; nothing else in the library has to know it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = ["Method", "stacked", "variant_rows"]

PyTree = Any


class Method(NamedTuple):
    """One few-shot method (see the module docstring for each function's contract).

    Attributes:
        name: the training unit's name (``"maml"``, ``"llama"``...).
        variants: the table rows its predictive returns, in order.
        init: ``(rng_key, ways) -> params``.
        loss: ``(params, rng_key, episodes) -> (loss, aux)``.
        adapt: ``(rng_key, params, support_x, support_y, ways) -> per-task posterior [T, ...]``.
        predictive: ``(params, ways, **options) -> FewShotPredictive`` returning
            ``[len(variants), T, Q, ways]``.
    """

    name: str
    variants: tuple[str, ...]
    init: Callable[[jax.Array, int], PyTree]
    loss: Callable[[PyTree, jax.Array, Any], tuple[jax.Array, Any]]
    adapt: Callable[[jax.Array, PyTree, jax.Array, jax.Array, int], Any]
    predictive: Callable[..., Callable]


def stacked(predict: Callable) -> Callable:
    """A predictive of ``[T, Q, W]`` as one of ``[1, T, Q, W]`` (a single-variant method)."""
    return lambda *args: predict(*args)[None]


def variant_rows(method: Method, predict: Callable) -> dict[str, Callable]:
    """``{variant: predictive [T, Q, W]}`` from a method's stacked predictive."""
    return {v: (lambda *args, i=i: predict(*args)[i]) for i, v in enumerate(method.variants)}
