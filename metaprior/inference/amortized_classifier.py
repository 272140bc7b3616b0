"""The amortized LSTM guide on the Bayesian Conv4 classifier (Kim and Heo's few-shot setting).

Composes :class:`~metaprior.inference.guides.AmortizedLSTMGuide` with the Bayesian
:class:`~metaprior.models.nets.Conv4` of :func:`metaprior.models.bayes_classifier.bayes_classifier`
(standard normal prior over the conv and output weights, batch-norm parameters shared)
and Flipout estimates of the expected log-likelihood (:mod:`metaprior.inference.flipout`):
the guide and shared parameters (:func:`init_conv4_guide`), the inference
specification (:func:`conv4_inference`) for
:func:`~metaprior.inference.guides.amortized.amortized_meta_loss`, the few-shot
predictive (:func:`amortized_predictive`) and an ArviZ tree of a few tasks' posteriors
(:func:`amortized_posterior_tree`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import optax
from numpyro.infer import Predictive

from metaprior.data.episodes import Episodes
from metaprior.inference.diagnostics import from_samples
from metaprior.inference.flipout import apply_layer, categorical_expected_log_lik, flipout
from metaprior.inference.guides.amortized import (
    AmortizedInference,
    AmortizedLSTMGuide,
    AmortizedParams,
    amortized_meta_loss,
    episode_predictions,
    numpyro_guide,
    standard_normal,
    task_posterior,
)
from metaprior.inference.method import Method
from metaprior.models.bayes_classifier import (
    bayes_classifier,
    conv4_forward,
    shared_params,
    weight_layers,
    weight_site_names,
)
from metaprior.models.nets import Conv4

__all__ = [
    "conv4_logits",
    "conv4_inference",
    "init_conv4_guide",
    "amortized_predictive",
    "amortized_posterior_tree",
    "amortized_method",
]


def conv4_logits(model: Conv4, layers: tuple, x: jax.Array) -> jax.Array:
    """Logits of the Bayesian Conv4 at fixed weight ``layers``: ``x [N, H, W, C] -> [N, ways]``."""
    return conv4_forward(model, x, lambda i, h: apply_layer(layers[i], h))


def conv4_inference(
    net: Conv4, *, beta: float, inner_optimizer: optax.GradientTransformation, num_inner_steps: int
) -> AmortizedInference:
    """Flipout likelihood and a standard normal prior over ``net``'s weight layers."""
    return AmortizedInference(
        expected_log_lik=categorical_expected_log_lik(conv4_forward, flipout),
        prior=standard_normal(weight_layers(net)),
        beta=beta,
        inner_optimizer=inner_optimizer,
        num_inner_steps=num_inner_steps,
    )


def init_conv4_guide(
    rng_key: jax.Array,
    ways: int,
    *,
    filters: int,
    image_size: int,
    conv_impl: str = "im2col",
    hidden_size: int = 128,
    noise_size: int = 16,
    init_log_var: float = -10.0,
) -> tuple[AmortizedParams, Conv4]:
    """The guide (with its own embedding Conv4) for a ``ways``-way Bayesian Conv4 and the
    shared model parameters; also returns the template net."""
    k_net, k_embed, k_guide = jax.random.split(rng_key, 3)
    net = Conv4(ways, filters=filters, image_size=image_size, conv_impl=conv_impl, key=k_net)
    embed = Conv4(None, filters=filters, image_size=image_size, key=k_embed)
    guide = AmortizedLSTMGuide(
        weight_layers(net),
        embed,
        num_classes=ways,
        input_shape=(image_size, image_size, 1),
        key=k_guide,
        hidden_size=hidden_size,
        noise_size=noise_size,
        init_log_var=init_log_var,
    )
    return AmortizedParams(guide, shared_params(net)), net


def amortized_predictive(
    params: AmortizedParams,
    inference: AmortizedInference,
    *,
    num_samples: int,
    inner_steps: Sequence[int],
    task_batch_size: int | None = None,
) -> Callable:
    """The guide's posterior predictive after each number of inner steps in ``inner_steps``
    (one compiled program): ``(rng_key, sx, sy, qx) -> probs [len(inner_steps), T, Q, ways]``
    (score it with ``episode_axis=1``). ``inference.num_inner_steps`` must be at least
    ``max(inner_steps)``."""
    fn = eqx.filter_jit(
        functools.partial(
            episode_predictions,
            inference=inference,
            logits_fn=conv4_logits,
            num_samples=num_samples,
            inner_steps=tuple(sorted(inner_steps)),
            task_batch_size=task_batch_size,
        )
    )
    return lambda rng_key, sx, sy, qx: fn(rng_key, params, Episodes(sx, sy, qx, None))


def amortized_posterior_tree(
    rng_key: jax.Array,
    params: AmortizedParams,
    net: Conv4,
    episodes: Episodes,
    inference: AmortizedInference,
    *,
    num_tasks: int,
    num_draws: int,
    attrs: Mapping[str, Any] | None = None,
):
    """ArviZ DataTree of the first ``num_tasks`` episodes' posteriors, the first conv and the
    output layer kept, with the model's predictive on their query sets."""
    k_post, k_draw = jax.random.split(rng_key)
    tasks = jax.tree.map(lambda a: a[:num_tasks], episodes)
    keys = jax.random.split(k_post, num_tasks)
    q = jax.jit(jax.vmap(lambda k, sx, sy: task_posterior(k, params, sx, sy, inference)))(
        keys, tasks.support_x, tasks.support_y
    )
    names = weight_site_names(weight_layers(net))
    draws = Predictive(numpyro_guide(q, names), num_samples=num_draws)(k_draw)
    model_net = eqx.combine(params.model, net)  # shapes from the template, batch norm from params
    attrs = {**(attrs or {}), "kept": "layer0 (first conv) and the output layer"}
    tree = from_samples(k_draw, bayes_classifier, draws, tasks.query_x, tasks.query_y, net=model_net, attrs=attrs)
    keep = set(names[0]) | set(names[-1])
    posterior = tree["posterior"].to_dataset()
    tree["posterior"] = posterior.drop_vars([v for v in posterior.data_vars if v not in keep])
    return tree


def amortized_method(
    *,
    filters: int,
    image_size: int,
    conv_impl: str = "im2col",
    hidden_size: int = 128,
    noise_size: int = 16,
    init_log_var: float = -10.0,
    beta: float,
    inner_optimizer: optax.GradientTransformation,
    train_inner_steps: int,
    eval_inner_steps: int | Sequence[int],
    num_samples: int,
    task_batch_size: int | None = None,
    name: str = "amortized",
) -> Method:
    """Kim and Heo's amortized LSTM guide over the Bayesian Conv4 (Flipout) as a
    :class:`~metaprior.inference.method.Method`.

    ``init(rng_key, ways)`` is :func:`init_conv4_guide`'s parameters; ``loss`` the query
    negative ELBO after ``train_inner_steps`` inner steps (:func:`amortized_meta_loss`);
    ``adapt`` each task's refined posterior (:class:`GaussianLayers`, after the largest of
    ``eval_inner_steps``); ``predictive(params, ways, *, num_samples=...)`` the posterior
    predictive after each of ``eval_inner_steps`` inner steps, one variant each: ``name``
    for one number of steps, ``f"{name}_k{K}"`` for several. The guide is built for the
    ways it was initialised with: another number of ways is a ``ValueError``.
    """
    steps = (eval_inner_steps,) if isinstance(eval_inner_steps, int) else tuple(sorted(eval_inner_steps))
    variants = (name,) if len(steps) == 1 else tuple(f"{name}_k{k}" for k in steps)
    size = dict(filters=filters, image_size=image_size, conv_impl=conv_impl)
    lstm = dict(hidden_size=hidden_size, noise_size=noise_size, init_log_var=init_log_var)

    @functools.cache
    def spec(ways: int, num_inner_steps: int) -> AmortizedInference:
        with jax.ensure_compile_time_eval():  # concrete arrays, whichever trace asks first
            net = Conv4(ways, **size, key=jax.random.key(0))  # shapes of the prior over its weights
            return conv4_inference(net, beta=beta, inner_optimizer=inner_optimizer, num_inner_steps=num_inner_steps)

    def init(rng_key, ways):
        return init_conv4_guide(rng_key, ways, **size, **lstm)[0]

    def ways_of(params: AmortizedParams, ways: int | None = None) -> int:
        built = params.guide.num_classes
        if ways is not None and ways != built:
            raise ValueError(f"{name}: the guide was built for {built}-way tasks, got ways={ways}")
        return built

    def loss(params, rng_key, episodes):
        inference = spec(ways_of(params), train_inner_steps)
        return amortized_meta_loss(inference, task_batch_size=task_batch_size)(params, rng_key, episodes)

    def adapt(rng_key, params, support_x, support_y, ways, query_x=None):
        del query_x  # not transductive
        inference = spec(ways_of(params, ways), steps[-1])
        keys = jax.random.split(rng_key, support_x.shape[0])
        return jax.vmap(lambda k, sx, sy: task_posterior(k, params, sx, sy, inference))(keys, support_x, support_y)

    def predictive(params, ways, **options):
        unknown = set(options) - {"num_samples"}
        if unknown:
            raise TypeError(f"{name}'s predictive takes num_samples only, got {sorted(unknown)}")
        inference = spec(ways_of(params, ways), steps[-1])
        kw = dict(num_samples=options.get("num_samples", num_samples), task_batch_size=task_batch_size)
        return amortized_predictive(params, inference, inner_steps=steps, **kw)

    return Method(name, variants, init, loss, adapt, predictive)
