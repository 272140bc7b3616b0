"""Every few-shot classifier of the library on one backbone and one budget.

:func:`train_method` meta-trains one method on ``ways``-way ``train_shots``-shot episodes
of a class-indexed image array, for ``num_steps`` steps of ``meta_batch`` tasks, through
:func:`metaprior.inference.meta.fit` (checkpoint, exact resume, NaN stop), and returns a
:class:`TrainedMethod` whose :meth:`~TrainedMethod.predictives` are
:data:`~metaprior.inference.evaluation.FewShotPredictive` functions, one per table row
(*variant*):

=============  ==========================================================================
variant        what it is
=============  ==========================================================================
``maml``       MAML (ML-POINT), second-order; the adapted network's softmax
``maml_fo``    the same, first-order meta-gradient
``llama_nn``   LLAMA (ML-LAPLACE, K-FAC): mean softmax over sampled networks of each
               task's Laplace posterior, ``tau_pred`` chosen on validation NLL
``llama_glm``  the same model, linearised-network (GLM) Laplace predictive
``amortized``  the amortized LSTM guide over the Bayesian Conv4's weights (Flipout)
``sib_t0``     SIB with no synthetic-gradient step (the amortized initialisation)
``sib_t3``     SIB with ``sib_steps`` synthetic-gradient steps (each T meta-trained)
``protonet``   Prototypical networks (Snell et al. 2017), the non-Bayesian reference
=============  ==========================================================================

Every method uses :class:`~metaprior.models.nets.Conv4` with batch statistics (support
and query sets normalised as separate batches, as MAML does here). Episodes of another
number of ways than the training one: ProtoNets take any; MAML and LLAMA start the head
of a ``W``-way task at the mean of their learned head rows, tiled ``W`` times (an
exchangeable initialisation: the learned rows belong to arbitrary label positions anyway);
the amortized guide and SIB's ``xi`` are built for the training ways and have no
predictive there (``None``). SIB pretrains its feature net by ordinary classification
on the training classes (``sib_pretrain_steps``, not counted in ``num_steps``) and keeps
it fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.data import MissingDataError, load_oneshot_runs, oneshot_episodes, score_oneshot_runs
from metaprior.data.episodes import episode_batches, sample_episodes
from metaprior.inference import maml
from metaprior.inference.amortized_classifier import amortized_method
from metaprior.inference.evaluation import FewShotPredictive, evaluate_fewshot
from metaprior.inference.meta import fit, meta_learner
from metaprior.inference.method import Method, compiled_once, stacked, with_features
from metaprior.inference.protonet import protonet_method
from metaprior.inference.sib import sib_method
from metaprior.models.nets import Conv4
from metaprior.models.sib import pretrain_loss, sample_classification_batch

__all__ = [
    "METHODS",
    "VARIANTS",
    "BAYESIAN",
    "FewShotSettings",
    "TrainedMethod",
    "train_method",
    "with_ways",
    "method_of",
    "fewshot_table",
    "fewshot_method",
    "PER_WAY",
    "combine_ways",
    "learning_curves",
    "oneshot_errors",
]

METHODS = ("maml", "maml_fo", "llama", "amortized", "sib", "protonet")
VARIANTS = {
    "maml": ("maml",),
    "maml_fo": ("maml_fo",),
    "llama": ("llama_nn", "llama_glm"),
    "amortized": ("amortized",),
    "sib": ("sib_t0", "sib_t3"),
    "protonet": ("protonet",),
}
BAYESIAN = ("llama_nn", "llama_glm", "amortized", "sib_t0", "sib_t3")
# trained once per number of ways they are scored at, as the MAML paper trains its 20-way model
PER_WAY = ("maml", "maml_fo", "llama")


def method_of(variant: str) -> str:
    """The training unit (:data:`METHODS`) a variant belongs to."""
    for method, variants in VARIANTS.items():
        if variant in variants:
            return method
    raise ValueError(f"unknown variant {variant!r}; known: {[v for vs in VARIANTS.values() for v in vs]}")


@dataclasses.dataclass(frozen=True)
class FewShotSettings:
    """The shared backbone and budget, and each method's own settings.

    Attributes:
        filters, conv_impl, image_size: the Conv4 backbone.
        ways, train_shots, train_queries: the meta-training episodes.
        meta_batch, num_steps, meta_lr: tasks per step, steps, Adam step size (every method).
        inner_lr, train_inner_steps, eval_inner_steps: SGD inner loop of MAML, LLAMA and the
            amortized guide's refinement.
        eta, tau, log_det_tasks: LLAMA's ML-LAPLACE (log-det weight, K-FAC prior precision,
            tasks whose log-det is computed per step).
        tau_grid, num_val_episodes, val_queries: LLAMA's ``tau_pred``, chosen per predictive
            type by validation NLL on ``num_val_episodes`` episodes (``val_queries`` per class).
        eval_batch: episodes per predictive call (validation and test: one compile per shape).
        num_samples: posterior draws of LLAMA's and the amortized guide's predictives (4:
            their sampled forward passes are most of the evaluation time; 8 doubles it,
            ``benchmarks/README.md`` "One few-shot table").
        amortized_hidden, amortized_noise, amortized_beta: the LSTM guide and its KL weight.
        sib_steps: T of ``sib_t3``; sib_inner_lr: its step size; sib_pretrain_steps,
            sib_pretrain_batch: the feature net's classification pretraining; sib_draws:
            draws of SIB's classifier weights (cheap: they act on fixed features; its
            accuracy rises from 0.67 at 1 draw to 0.86 at 32, ``benchmarks/README.md``).
        steps_per_call: optimizer steps per compiled call.
        checkpoint_every: steps between a training run's checkpoints (and at its end).
        budget_s: meta-training seconds per method (0: none; ``num_steps`` alone sets the
            length). With a budget every method trains until it is spent (``num_steps`` is
            then a cap), the same for every table row: SIB's feature pretraining and each
            of its T runs get half of it each (a SIB row is pretraining plus its own run);
            LLAMA's ``tau_pred`` search on validation episodes comes after and is not
            counted. Checkpoints record the time spent: a killed run resumes with the rest
            and a finished one is not trained further (:func:`~metaprior.inference.meta.fit`).
        curve_points: snapshots of the parameters kept during each meta-training run for a
            learning curve (:attr:`TrainedMethod.curve`), about evenly spaced in training
            seconds with a budget and in steps without one, plus the initial and final
            parameters (0: none). A run resumed from a checkpoint has the points from there on.
        protonet_ways: the ways of ProtoNets' training episodes (0: ``ways``); Snell et al.
            train with more ways than they test with (``benchmarks/protonet_ways.py`` chooses
            it on validation characters at equal training time).
    """

    filters: int = 32
    conv_impl: str = "im2col"
    image_size: int = 28
    ways: int = 5
    train_shots: int = 1
    train_queries: int = 5
    meta_batch: int = 8
    num_steps: int = 1000
    meta_lr: float = 1e-3
    inner_lr: float = 0.4
    train_inner_steps: int = 1
    eval_inner_steps: int = 3
    eta: float = 1e-6
    tau: float = 1e-3
    log_det_tasks: int = 2
    tau_grid: tuple[float, ...] = (1e2, 1e3, 1e4, 1e5)
    num_val_episodes: int = 50
    num_samples: int = 4
    val_queries: int = 15
    eval_batch: int = 25
    amortized_hidden: int = 64
    amortized_noise: int = 16
    amortized_beta: float = 1e-3
    sib_steps: int = 3
    sib_inner_lr: float = 0.01
    sib_pretrain_steps: int = 1000
    sib_pretrain_batch: int = 64
    sib_draws: int = 32
    steps_per_call: int = 10
    checkpoint_every: int = 500
    budget_s: float = 0.0
    curve_points: int = 0
    protonet_ways: int = 0


class TrainedMethod(NamedTuple):
    """One meta-trained method.

    Attributes:
        method: its name in :data:`METHODS`.
        params: the meta-parameters (per variant for SIB: ``{"sib_t0": ..., "sib_t3": ...}``).
        losses: the meta-training losses (concatenated over SIB's runs).
        train_time_s: seconds of meta-training (with SIB's pretraining, LLAMA's validation).
        make_predictives: ``(ways, num_samples) -> {key: FewShotPredictive | None}``; a key is
            a variant, or a tuple of variants whose predictive returns ``[V, T, Q, W]``
            (variants that share one posterior, e.g. LLAMA's ``nn`` and ``glm``).
        info: scalars worth reporting (``tau_pred_nn``...).
        curve: ``((train_seconds, make_predictives), ...)``: the snapshots of
            :attr:`FewShotSettings.curve_points` as predictives, with the seconds of training
            each had had (SIB: its pretraining included); empty without snapshots.
    """

    method: str
    params: Any
    losses: np.ndarray
    train_time_s: float
    make_predictives: Callable[[int, int], dict[str, FewShotPredictive | None]]
    info: dict[str, float]
    curve: tuple = ()

    def predictives(self, ways: int, num_samples: int | None = None) -> dict[str, FewShotPredictive | None]:
        """The variants' predictives for ``ways``-way episodes (``None`` where the method
        has none); ``num_samples`` overrides the draws of a Bayesian predictive."""
        out = {}
        for key, predict in self.make_predictives(ways, num_samples).items():
            if isinstance(key, str):
                out[key] = predict
            else:
                for i, variant in enumerate(key):
                    out[variant] = None if predict is None else _row(predict, i)
        return out

    def grouped_predictives(self, ways: int, num_samples: int | None = None) -> dict[tuple[str, ...], Any]:
        """``{variants: predict}``: ``predict`` returns ``[len(variants), T, Q, W]`` (one call
        scores every variant of the group; what an evaluation over many episodes wants)."""
        out = {}
        for key, predict in self.make_predictives(ways, num_samples).items():
            if isinstance(key, str):
                out[(key,)] = None if predict is None else stacked(predict)
            else:
                out[tuple(key)] = predict
        return out


def _row(predict: FewShotPredictive, i: int) -> FewShotPredictive:
    return lambda *args: predict(*args)[i]


def _apply(net, x):
    return net(x)


def _likelihood(f):
    return dist.Categorical(logits=f)


def _nll():
    return maml.nll_loss(_apply, _likelihood)


def with_ways(net: Conv4, ways: int) -> Conv4:
    """``net`` with a ``ways``-way head: unchanged when it has that many outputs, else the
    mean of its head rows (and biases) tiled ``ways`` times."""
    head = net.head
    if head is None or head.out_features == ways:
        return net
    weight = jnp.broadcast_to(head.weight.mean(0, keepdims=True), (ways, head.weight.shape[1]))
    bias = jnp.broadcast_to(head.bias.mean(keepdims=True), (ways,))
    new_head = eqx.nn.Linear(head.in_features, ways, key=jax.random.key(0))
    new_head = eqx.tree_at(lambda h: (h.weight, h.bias), new_head, (weight, bias))
    return eqx.tree_at(lambda n: n.head, net, new_head)


def _budget(s: FewShotSettings, share: float = 1.0) -> float | None:
    return s.budget_s * share if s.budget_s > 0 else None


def _fit(rng_key, s, loss, params, images, desc, checkpoint, *, has_aux=False, clip=False, share=1.0, callback=None):
    optimizer = optax.adam(s.meta_lr)
    if clip:
        optimizer = optax.chain(optax.clip_by_global_norm(10.0), optimizer)
    sampler = lambda k, d: sample_episodes(k, d, s.meta_batch, s.ways, s.train_shots, s.train_queries)
    kw = dict(data=images, sample_batch=sampler, steps_per_call=s.steps_per_call, checkpoint=checkpoint, desc=desc)
    kw.update(checkpoint_every=s.checkpoint_every, budget_s=_budget(s, share), callback=callback)
    return fit(rng_key, meta_learner(loss, optimizer, has_aux=has_aux), params, s.num_steps, **kw)


def _conv4(rng_key, s: FewShotSettings, out_size) -> Conv4:
    return Conv4(out_size, filters=s.filters, image_size=s.image_size, conv_impl=s.conv_impl, key=rng_key)


def fewshot_method(name: str, s: FewShotSettings, *, feature_net: Conv4 | None = None) -> Method:
    """:func:`~metaprior.inference.method.compiled_once` of :func:`_method`."""
    return compiled_once(_method(name, s, feature_net=feature_net))


def _method(name: str, s: FewShotSettings, *, feature_net: Conv4 | None = None) -> Method:
    """The :class:`~metaprior.inference.method.Method` of one table row group on the settings'
    Conv4: ``"maml"``, ``"maml_fo"``, ``"llama"``, ``"protonet"``, ``"amortized"``, or SIB's
    ``"sib_t0"`` / ``"sib_t3"`` (``sib_steps`` steps) on a pretrained ``feature_net``'s
    features (:func:`~metaprior.inference.method.with_features`)."""
    if name == "protonet":
        return protonet_method(lambda rng_key, ways: _conv4(rng_key, s, None), train_ways=s.ways)
    if name == "amortized":
        kw = dict(filters=s.filters, image_size=s.image_size, conv_impl=s.conv_impl, init_log_var=-10.0)
        kw.update(hidden_size=s.amortized_hidden, noise_size=s.amortized_noise, beta=s.amortized_beta)
        kw.update(inner_optimizer=optax.sgd(s.inner_lr), train_inner_steps=s.train_inner_steps)
        return amortized_method(**kw, eval_inner_steps=s.eval_inner_steps, num_samples=s.num_samples, task_batch_size=1)
    if name in ("sib_t0", "sib_t3"):
        if feature_net is None:
            raise ValueError(f"{name} works on a pretrained Conv4's features: pass feature_net")
        num_features = jax.eval_shape(feature_net.features, jnp.zeros((1, s.image_size, s.image_size, 1))).shape[-1]
        steps = 0 if name == "sib_t0" else s.sib_steps
        inner = dict(inner_optimizer=optax.sgd(s.sib_inner_lr), num_samples=s.sib_draws)
        sib = sib_method(num_features, num_steps=steps, **inner, name=name)
        return with_features(sib, functools.partial(_embed_episodes, feature_net))
    init = lambda rng_key, ways: _conv4(rng_key, s, ways)
    kw = dict(init=init, apply_fn=_apply, train_inner_steps=s.train_inner_steps, eval_inner_steps=s.eval_inner_steps)
    kw.update(likelihood=_likelihood, prior_precision=s.tau, eta=s.eta, log_det_tasks=s.log_det_tasks)
    return maml.method_from(name, _nll(), optax.sgd(s.inner_lr), **kw)


# built for the training ways (the LSTM guide's class encoding, SIB's xi): no predictive at others
FIXED_WAYS = ("amortized", "sib_t0", "sib_t3")
# Adam steps clipped to global norm 10, as their papers' code does
CLIPPED = ("amortized", "sib_t0", "sib_t3")


class _Snapshots:
    """A :func:`~metaprior.inference.meta.fit` callback keeping ``(seconds, params)`` about
    every ``1 / points`` of the budget (or of the steps), and the last state it saw."""

    def __init__(self, points: int, num_steps: int, budget_s: float | None):
        self.points, self.num_steps, self.budget_s = points, num_steps, budget_s
        self.kept: list[tuple[float, Any]] = []
        self.last: tuple[float, Any] | None = None
        self.next = 0.0

    def __call__(self, state, seconds: float) -> None:
        self.last = (seconds, state.params)
        where = seconds / self.budget_s if self.budget_s else int(state.step) / max(self.num_steps, 1)
        if where >= self.next - 1e-9:
            self.kept.append(self.last)
            self.next = (np.floor(where * self.points) + 1) / self.points

    def curve(self) -> list[tuple[float, Any]]:
        if self.last is not None and (not self.kept or self.kept[-1][0] != self.last[0]):
            return [*self.kept, self.last]
        return list(self.kept)


def _train(k_init, k_fit, s, m: Method, images, checkpoint, *, share=1.0, desc=None):
    """One method's meta-training from ``m.init(k_init, s.ways)``: the settings' episodes,
    Adam, checkpoint and budget; returns the :class:`FitResult` and the snapshots."""
    init = m.init(k_init, s.ways)
    clip = m.name in CLIPPED
    snaps = _Snapshots(s.curve_points, s.num_steps, _budget(s, share)) if s.curve_points > 0 else None
    kw = dict(has_aux=True, clip=clip, share=share, callback=snaps)
    result = _fit(k_fit, s, m.loss, init, images, desc or m.name, checkpoint, **kw)
    return result, ([] if snaps is None else snaps.curve())


def _predictives(m: Method, params, s, options: Callable[[int | None], dict] | None = None) -> Callable:
    """``make_predictives`` of one trained method: at other ways than the training ones, the
    head tiled (:func:`with_ways`), or no predictive for a :data:`FIXED_WAYS` method."""

    def make(ways, num_samples=None):
        if m.name in FIXED_WAYS and ways != s.ways:
            return {m.variants: None}
        p = params if m.name in FIXED_WAYS else with_ways(params, ways)
        return {m.variants: m.predictive(p, ways, **(options(num_samples) if options else {}))}

    return make


def _choose_tau_pred(k_val, s, m: Method, theta, val_images) -> dict[str, float]:
    """LLAMA's empirical Bayes for ``tau_pred`` on validation episodes, per predictive type;
    both types are scored in one pass per tau (one Laplace fit per episode, the same draws)."""
    types = tuple(v.removeprefix("llama_") for v in m.variants)
    shape = (s.num_val_episodes, s.ways, s.train_shots, s.val_queries)
    episodes = list(episode_batches(k_val, val_images, *shape, batch_size=s.eval_batch))
    scores = np.empty((len(s.tau_grid), len(types)))
    for j, tau in enumerate(s.tau_grid):
        predict = m.predictive(theta, s.ways, tau_pred=tau, num_samples=s.num_samples)
        evs = evaluate_fewshot(jax.random.fold_in(k_val, 1), predict, episodes, desc=f"tau={tau:g}", grouped=True)
        scores[j] = [ev.metrics()["nll"] for ev in evs]
    info = {f"tau_pred_{t}": float(s.tau_grid[int(np.nanargmin(scores[:, i]))]) for i, t in enumerate(types)}
    for j, tau in enumerate(s.tau_grid):
        info.update({f"val_nll_{t}_tau{tau:g}": float(scores[j, i]) for i, t in enumerate(types)})
    return info


def _train_one(name, rng_key, s, images, val_images, checkpoint):
    """A method with no stage before its meta-training (all but SIB)."""
    if name in ("amortized", "protonet"):
        k_init, k_fit = jax.random.split(rng_key)
    else:
        k_init, k_fit, k_val = jax.random.split(rng_key, 3)
    m = fewshot_method(name, s)
    result, snaps = _train(k_init, k_fit, s, m, images, checkpoint)
    params, info, options = result.state.params, {"train_steps": int(result.state.step)}, None
    if name == "llama":
        info = _choose_tau_pred(k_val, s, m, params, val_images) | info
        taus = tuple(info[f"tau_pred_{v.removeprefix('llama_')}"] for v in m.variants)
        options = lambda num_samples: dict(tau_pred=taus, num_samples=num_samples or s.num_samples)
    curve = tuple((t, _predictives(m, p, s, options)) for t, p in snaps)
    return params, result.losses, _predictives(m, params, s, options), info, curve


def _embed_episodes(net: Conv4, x: jax.Array) -> jax.Array:
    """``[T, N, H, W, C] -> [T, N, features]``, each task's set a batch of its own."""
    return jax.vmap(net.features)(x)


def _train_sib(rng_key, s, images, val_images, checkpoint):
    """SIB: the feature net pretrained by classification over the training classes (half the
    budget), then ``sib_t0`` and ``sib_t3`` meta-trained on its fixed features from the same
    initial values (half each)."""
    k_net, k_pre, k_init, k_fit = jax.random.split(rng_key, 4)
    ckpt = lambda name: (
        None if checkpoint is None else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_{name}.ckpt")
    )
    net = _conv4(k_net, s, images.shape[0])
    params, static = eqx.partition(net, eqx.is_array)
    loss = lambda p, key, batch: pretrain_loss(eqx.combine(p, static), key, batch)
    sampler = lambda k, d: sample_classification_batch(k, d, s.sib_pretrain_batch)
    kw = dict(data=images, sample_batch=sampler, steps_per_call=s.steps_per_call, checkpoint=ckpt("pretrain"))
    kw.update(checkpoint_every=s.checkpoint_every, budget_s=_budget(s, 0.5))
    pre = fit(k_pre, meta_learner(loss, optax.adam(s.meta_lr)), params, s.sib_pretrain_steps, desc="SIB pretrain", **kw)
    info = {"pretrain_steps": int(pre.state.step)}
    feature_net = eqx.combine(pre.state.params, static)
    trained, makes, losses, snaps = {"net": feature_net}, {}, [pre.losses], {}
    for name, t in (("sib_t0", 0), ("sib_t3", s.sib_steps)):
        m = fewshot_method(name, s, feature_net=feature_net)
        result, snaps[name] = _train(k_init, k_fit, s, m, images, ckpt(f"t{t}"), share=0.5, desc=f"SIB T={t}")
        trained[name], makes[name] = result.state.params, _predictives(m, result.state.params, s)
        snaps[name] = [(pre.train_time_s + sec, _predictives(m, p, s)) for sec, p in snaps[name]]
        losses.append(result.losses)
        info[f"train_steps_t{t}"] = int(result.state.step)

    def make(ways, num_samples=None):
        return {k: v for name in makes for k, v in makes[name](ways, num_samples).items()}

    # a SIB row's curve point i: both runs after their i-th snapshot (the runs share a schedule)
    points = min(len(v) for v in snaps.values())
    curve = tuple((max(snaps[n][i][0] for n in snaps), _merged([snaps[n][i][1] for n in snaps])) for i in range(points))
    return trained, np.concatenate(losses), make, info, curve


def _merged(makes: list[Callable]) -> Callable:
    return lambda ways, num_samples=None: {k: v for mk in makes for k, v in mk(ways, num_samples).items()}


def train_method(
    method: str,
    rng_key: jax.Array,
    settings: FewShotSettings,
    images: jax.Array,
    val_images: jax.Array | None = None,
    *,
    checkpoint: str | Path | None = None,
) -> TrainedMethod:
    """Meta-train one method.

    Args:
        method: one of :data:`METHODS`.
        rng_key: the run's key.
        settings: the backbone and budget.
        images: ``[classes, examples, H, W, C]`` meta-training classes.
        val_images: validation classes (LLAMA chooses ``tau_pred`` on them).
        checkpoint: the meta-training checkpoint (SIB keeps its runs beside it).

    Raises:
        ValueError: an unknown method, LLAMA without ``val_images``, or images of the
            wrong rank or size.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    images = jnp.asarray(images)
    if images.ndim != 5 or images.shape[2:4] != (settings.image_size, settings.image_size):
        raise ValueError(
            f"images must be [classes, examples, {settings.image_size}, {settings.image_size}, C], got {images.shape}"
        )
    if method == "llama" and val_images is None:
        raise ValueError("llama chooses tau_pred on validation episodes: pass val_images")
    start = time.perf_counter()
    val = None if val_images is None else jnp.asarray(val_images)
    if method == "protonet" and settings.protonet_ways > 0:
        settings = dataclasses.replace(settings, ways=settings.protonet_ways)
    train = _train_sib if method == "sib" else functools.partial(_train_one, method)
    params, losses, make, info, curve = train(rng_key, settings, images, val, checkpoint)
    return TrainedMethod(method, params, np.asarray(losses), time.perf_counter() - start, make, info, curve)


def combine_ways(models: dict[int, TrainedMethod], base: int) -> TrainedMethod:
    """One :class:`TrainedMethod` over models of one method trained at several ways: each
    ``ways``-way predictive comes from the model trained at ``ways`` (else from the one at
    ``base``, whose head :func:`with_ways` tiles). ``params`` is ``{ways: params}``; the
    times add up; ``info`` holds the ``base`` model's keys as they are and the others' as
    ``f"{ways}w_{key}"``, with ``f"{ways}w_train_time_s"`` for every model. ``curve`` is the
    ``base`` model's (:func:`learning_curves` takes each ways' own model from ``models``)."""
    first = models.get(base, next(iter(models.values())))
    info = dict(first.info)
    for ways, t in sorted(models.items()):
        info[f"{ways}w_train_time_s"] = t.train_time_s
        if t is not first:
            info.update({f"{ways}w_{k}": v for k, v in t.info.items()})

    def make(ways, num_samples=None):
        return models.get(ways, first).make_predictives(ways, num_samples)

    params = {ways: t.params for ways, t in models.items()}
    losses = np.concatenate([t.losses for _, t in sorted(models.items())])
    seconds = sum(t.train_time_s for t in models.values())
    return TrainedMethod(first.method, params, losses, seconds, make, info, first.curve)


def fewshot_table(metrics: dict[str, Any], variants: list[str], beds: list[str], *, time_keys: bool = True) -> str:
    """A Markdown table of ``metrics`` (keys ``{variant}_{bed}_{acc,acc_ci95,ece,nll}``): one row a
    variant, one column a bed (``acc ± ci95 / ECE / NLL``; ``n/a`` where the variant has no
    predictive), then ``{method}_train_time_s`` when present."""
    head = ["method", *[f"{b} acc / ECE / NLL" for b in beds]] + (["train s"] if time_keys else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in variants:
        cells = [v]
        for b in beds:
            if f"{v}_{b}_acc" not in metrics:
                cells.append("n/a")
                continue
            acc, ci = metrics[f"{v}_{b}_acc"], metrics[f"{v}_{b}_acc_ci95"]
            cells.append(f"{acc:.3f} ± {ci:.3f} / {metrics[f'{v}_{b}_ece']:.3f} / {metrics[f'{v}_{b}_nll']:.3f}")
        if time_keys:
            m = method_of(v)
            by_ways = sorted(
                (int(k[len(m) + 1 : -len("w_train_time_s")]), x)
                for k, x in metrics.items()
                if re.fullmatch(rf"{m}_\d+w_train_time_s", k)
            )
            seconds = metrics.get(f"{m}_train_time_s")
            if len(by_ways) > 1:  # one model per ways: each one's seconds
                cells.append(" / ".join(f"{w}w {x:.0f}" for w, x in by_ways))
            else:
                cells.append("-" if seconds is None else f"{seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def learning_curves(
    rng_key: jax.Array,
    models: dict[str, dict[int, TrainedMethod]],
    val_images: jax.Array,
    shapes: tuple[tuple[int, int], ...],
    base_ways: int,
    *,
    num_episodes: int,
    queries: int,
    batch_size: int,
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{"{W}w{S}s": {variant: [(train seconds, validation accuracy), ...]}}``: every
    method's snapshots (:attr:`TrainedMethod.curve`) scored on the same ``num_episodes``
    validation episodes of each ``(ways, shots)`` in ``shapes``, from the model trained at
    those ways (``models[method][ways]``, else the ``base_ways`` one)."""
    out = {}
    for i, (ways, shots) in enumerate(shapes):
        shape, lines = f"{ways}w{shots}s", {}
        key = jax.random.fold_in(rng_key, i)
        episodes = list(episode_batches(key, val_images, num_episodes, ways, shots, queries, batch_size=batch_size))
        for by_ways in models.values():
            t = by_ways.get(ways, by_ways[base_ways])
            for seconds, make in t.curve:
                for variants, predict in t._replace(make_predictives=make).grouped_predictives(ways).items():
                    if predict is None:
                        continue
                    desc = f"{'+'.join(variants)} val_{shape}"
                    evs = evaluate_fewshot(rng_key, predict, episodes, grouped=True, progress=False, desc=desc)
                    for v, ev in zip(variants, evs):
                        lines.setdefault(v, []).append((float(seconds), float(ev.metrics()["acc"])))
        out[shape] = lines
    return out


def oneshot_errors(
    rng_key: jax.Array, trained: dict[str, TrainedMethod], image_size: int, data_dir: str | None = None
) -> dict[str, float | str]:
    """Lake et al.'s 20 one-shot runs, when ``omniglot/all_runs.zip`` is in the data directory:
    ``{f"{variant}_oneshot_error": error rate}`` for every variant with a 20-way predictive,
    else ``{"oneshot_note": why it was skipped}``."""
    try:
        runs = load_oneshot_runs(image_size=image_size, data_dir=data_dir)
    except MissingDataError as err:
        return {"oneshot_note": f"skipped: {err}"}
    episodes = oneshot_episodes(runs)
    ways, out = episodes.support_x.shape[1], {}
    for t in trained.values():
        for variant, predict in t.predictives(ways).items():
            if predict is not None:
                probs = predict(rng_key, *(jnp.asarray(a) for a in episodes[:3]))
                out[f"{variant}_oneshot_error"] = score_oneshot_runs(np.asarray(probs), runs)
    return out
