"""Amortized LSTM guide ``q_phi(w_j | S_j)`` for per-task Bayesian network weights.

The guide maps a task's support set ``S_j`` to a mean-field Gaussian over the weights
``w_j`` of a network, for any model whose per-task weights are a tuple of layers
(Equinox modules, or any pytrees of arrays):

1. *Support encoding* (permutation invariant within each class): an embedding network
   maps every support example to features; the features are averaged per class and the
   class means concatenated in label order, ``e_j = [mean_{n: y_n = 1} g(x_n), ...,
   mean_{n: y_n = K} g(x_n)]``. Episodes assign labels to classes at random, so this is
   the paper's concatenation "over classes in a random order", and the position of a
   class in ``e_j`` matches its row in the output layer that the guide emits.
2. *LSTM over layers*: ``e_j`` gives the LSTM's initial state; the LSTM takes one step per
   layer ``l`` of the Bayesian network with Gaussian noise ``eps_l ~ N(0, I)`` as input, and
   a per-layer head maps the hidden state to that layer's weight means and
   log-variances. A head's bias is the layer's task-independent part (initialised to the
   template network's initial weights and to a small log-variance); its matrix, the
   task-dependent correction, starts near zero.
3. *Inner refinement*: a few gradient steps of an Optax transformation (the caller's,
   e.g. ``optax.sgd(0.5)``) on the variational parameters ``(loc, log_var)`` against the
   support-set negative ELBO ``-(E_q[log p(S_j | w)] - beta KL(q || p)) / |S_j|``. The
   meta-gradient flows through these steps (second order).

The meta-objective (:func:`amortized_meta_loss`) is the query-set negative ELBO under the
refined posterior, averaged over tasks; ``beta`` weights the KL term in both the inner
and the outer objectives (Kim and Heo found its value matters; ``beta = 1`` is the ELBO).
The expected log-likelihood ``E_q[log p(y | x, w)]`` is a caller-supplied estimator, so
the guide never sees the network's forward pass; with the layered forwards of
:mod:`metaprior.models.bayes_classifier` it is a Flipout estimate
(:mod:`metaprior.inference.flipout`).

:func:`numpyro_guide` turns a batch of posteriors into a NumPyro guide over the model's
weight sites, for ``numpyro.infer.Predictive`` and ArviZ.

References:
    Kim and Heo, "Amortized Inference of Bayesian Neural Network Parameters for Solving
    Meta-learning Problems" (LSTM-generated per-layer variational parameters from a
    support encoding, inner refinement, KL weight beta).
    S. Ravi, A. Beatson. "Amortized Bayesian Meta-Learning." ICLR 2019 (query
    likelihood plus KL of the support-conditioned posterior as the meta-objective).
    D. P. Kingma, M. Welling. "Auto-Encoding Variational Bayes." ICLR 2014, App. B (KL
    between diagonal Gaussians).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from metaprior.inference.flipout import sample_layer

__all__ = [
    "GaussianLayers",
    "AmortizedParams",
    "AmortizedInfo",
    "AmortizedLSTMGuide",
    "standard_normal",
    "gaussian_kl",
    "sample_weights",
    "AmortizedInference",
    "negative_elbo",
    "refine",
    "task_posterior",
    "amortized_meta_loss",
    "predictive_probs",
    "episode_predictions",
    "numpyro_guide",
]

PyTree = Any
ExpectedLogLik = Callable[[jax.Array, PyTree, "GaussianLayers", jax.Array, jax.Array], jax.Array]
"""``(rng_key, model_params, q, x: [N, ...], y: [N]) -> scalar`` estimate of
``E_q[sum_n log p(y_n | x_n, w)]``."""


class GaussianLayers(NamedTuple):
    """A mean-field Gaussian over a tuple of layers.

    Attributes:
        loc: the means, a tuple of layers (same structure as the network's weight layers).
        log_var: the log-variances, same structure.
    """

    loc: PyTree
    log_var: PyTree

    @property
    def scale(self) -> PyTree:
        """Standard deviations ``exp(log_var / 2)``."""
        return jax.tree.map(lambda v: jnp.exp(0.5 * v), self.log_var)


class AmortizedParams(NamedTuple):
    """The meta-parameters.

    Attributes:
        guide: the :class:`AmortizedLSTMGuide` (phi).
        model: shared deterministic model parameters passed to the likelihood
            estimator (e.g. batch-norm scale and shift); any pytree, possibly ``None``.
        prior: a learned prior (:class:`GaussianLayers`), or ``None`` for the fixed prior
            given to :func:`amortized_meta_loss`.
    """

    guide: AmortizedLSTMGuide
    model: PyTree
    prior: GaussianLayers | None = None


class AmortizedInfo(NamedTuple):
    """Per-step diagnostics returned as ``aux`` by :func:`amortized_meta_loss`.

    Attributes:
        query_nll: ``[]`` mean over tasks of ``-E_q[log p(y|x,w)] / |Q|`` on the queries.
        kl: ``[]`` mean over tasks of ``KL(q || p)`` (nats, whole network).
    """

    query_nll: jax.Array
    kl: jax.Array


def standard_normal(layers: PyTree) -> GaussianLayers:
    """The ``N(0, I)`` prior over ``layers`` as :class:`GaussianLayers`."""
    zeros = jax.tree.map(jnp.zeros_like, layers)
    return GaussianLayers(zeros, zeros)


def gaussian_kl(q: GaussianLayers, p: GaussianLayers) -> jax.Array:
    """``KL(q || p)`` between two mean-field Gaussians of the same structure, summed.

    ``KL = 1/2 sum[(v_q + (m_q - m_p)^2) / v_p - 1 + log v_p - log v_q]``.
    """

    def one(mq, lq, mp, lp):
        return 0.5 * jnp.sum(jnp.exp(lq - lp) + (mq - mp) ** 2 * jnp.exp(-lp) - 1.0 + lp - lq)

    terms = jax.tree.map(one, q.loc, q.log_var, p.loc, p.log_var)
    return sum(jax.tree.leaves(terms))


def sample_weights(rng_key: jax.Array, q: GaussianLayers) -> PyTree:
    """One reparameterised sample of the layers, ``loc + scale * eps``."""
    return sample_layer(rng_key, q.loc, q.scale)


class AmortizedLSTMGuide(eqx.Module):
    """The amortized guide's network phi: embedding, LSTM over layers, per-layer heads.

    Attributes:
        embed: embedding network ``[N, *input] -> [N, features]`` (e.g. ``Conv4(None)``).
        to_state: linear map from the support encoding to the LSTM's initial ``(h, c)``.
        cell: the :class:`equinox.nn.LSTMCell` (input: ``noise_size`` Gaussian noise).
        heads: one :class:`equinox.nn.Linear` per layer, ``hidden -> 2 * layer size``
            (means, then log-variances, flattened in the layer's leaf order).
        num_classes: classes per task (the encoding has ``num_classes * features`` entries).
        noise_size: size of the LSTM's noise input.
        layer_defs: per layer, its treedef and leaf shapes (static).
    """

    embed: PyTree
    to_state: eqx.nn.Linear
    cell: eqx.nn.LSTMCell
    heads: tuple[eqx.nn.Linear, ...]
    num_classes: int = eqx.field(static=True)
    noise_size: int = eqx.field(static=True)
    layer_defs: tuple = eqx.field(static=True)

    def __init__(
        self,
        layers: Sequence[PyTree],
        embed: PyTree,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        key: jax.Array,
        hidden_size: int = 128,
        noise_size: int = 16,
        init_log_var: float = -10.0,
        head_scale: float = 0.01,
    ):
        """Build the guide for a network whose weight layers are ``layers``.

        Args:
            layers: the template weight layers (e.g. ``weight_layers(Conv4(...))``); their
                values initialise the heads' mean biases.
            embed: the embedding network, ``[N, *input_shape] -> [N, features]``.
            num_classes: classes per task.
            input_shape: shape of one example (e.g. ``(28, 28, 1)``).
            key: PRNG key for the initialisation.
            hidden_size: LSTM hidden size.
            noise_size: size of the LSTM's Gaussian noise input.
            init_log_var: initial log-variance of every weight (the heads' bias).
            head_scale: the heads' matrices start at this multiple of Equinox's default
                initialisation (small: the guide starts near the template weights).
        """
        feature = jax.eval_shape(embed, jax.ShapeDtypeStruct((num_classes, *input_shape), jnp.float32))
        if feature.ndim != 2:
            raise ValueError(f"embed must map [N, ...] to [N, features], got {feature.shape}")
        k_state, k_cell, *k_heads = jax.random.split(key, 2 + len(layers))
        self.embed = embed
        self.to_state = eqx.nn.Linear(num_classes * feature.shape[1], 2 * hidden_size, key=k_state)
        self.cell = eqx.nn.LSTMCell(noise_size, hidden_size, key=k_cell)
        defs, heads = [], []
        for layer, k in zip(layers, k_heads):
            leaves, treedef = jax.tree.flatten(layer)
            flat = jnp.concatenate([jnp.ravel(a) for a in leaves])
            head = eqx.nn.Linear(hidden_size, 2 * flat.size, key=k)
            bias = jnp.concatenate([flat, jnp.full_like(flat, init_log_var)])
            head = eqx.tree_at(lambda h: (h.weight, h.bias), head, (head.weight * head_scale, bias))
            heads.append(head)
            defs.append((treedef, tuple(a.shape for a in leaves)))
        self.heads = tuple(heads)
        self.num_classes = num_classes
        self.noise_size = noise_size
        self.layer_defs = tuple(defs)

    def encode(self, support_x: jax.Array, support_y: jax.Array) -> jax.Array:
        """Permutation-invariant support encoding of one task.

        Args:
            support_x: ``[N, *input]`` support inputs.
            support_y: ``[N]`` int labels in ``[0, num_classes)``.

        Returns:
            ``[num_classes * features]``: per-class mean features, concatenated in label
            order (a class with no example contributes zeros).
        """
        features = self.embed(support_x)
        onehot = jax.nn.one_hot(support_y, self.num_classes, dtype=features.dtype)
        counts = jnp.maximum(onehot.sum(0), 1.0)
        return ((onehot.T @ features) / counts[:, None]).reshape(-1)

    def _unflatten(self, index: int, flat: jax.Array) -> PyTree:
        treedef, shapes = self.layer_defs[index]
        sizes = [math.prod(s) for s in shapes]
        parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
        return jax.tree.unflatten(treedef, [p.reshape(s) for p, s in zip(parts, shapes)])

    def __call__(self, rng_key: jax.Array, support_x: jax.Array, support_y: jax.Array) -> GaussianLayers:
        """The amortized posterior of one task before refinement.

        Args:
            rng_key: PRNG key for the LSTM's noise inputs.
            support_x: ``[N, *input]``; support_y: ``[N]``.

        Returns:
            :class:`GaussianLayers` with the structure of the template layers.
        """
        h, c = jnp.split(self.to_state(self.encode(support_x, support_y)), 2)
        state = (jnp.tanh(h), c)
        noise = jax.random.normal(rng_key, (len(self.heads), self.noise_size))
        locs, log_vars = [], []
        for index, head in enumerate(self.heads):
            state = self.cell(noise[index], state)
            loc, log_var = jnp.split(head(state[0]), 2)
            locs.append(self._unflatten(index, loc))
            log_vars.append(self._unflatten(index, log_var))
        return GaussianLayers(tuple(locs), tuple(log_vars))


class AmortizedInference(NamedTuple):
    """How a task's posterior is inferred and scored (everything but the meta-parameters).

    Attributes:
        expected_log_lik: estimator of ``E_q[sum_n log p(y_n | x_n, w)]``,
            ``(rng_key, model_params, q, x, y) -> scalar`` (e.g.
            :func:`metaprior.inference.flipout.categorical_expected_log_lik`).
        prior: the fixed prior as :class:`GaussianLayers` (``AmortizedParams.prior``
            replaces it when not ``None``).
        beta: the KL weight (inner and outer objectives).
        inner_optimizer: the inner-loop Optax transformation (e.g. ``optax.sgd(0.4)``).
        num_inner_steps: inner steps ``K`` (static).
    """

    expected_log_lik: ExpectedLogLik
    prior: GaussianLayers
    beta: float
    inner_optimizer: optax.GradientTransformation
    num_inner_steps: int


def negative_elbo(
    rng_key: jax.Array,
    q: GaussianLayers,
    x: jax.Array,
    y: jax.Array,
    *,
    expected_log_lik: ExpectedLogLik,
    model_params: PyTree,
    prior: GaussianLayers,
    beta: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``-(E_q[log p(y | x, w)] - beta KL(q || prior)) / N`` for one task, and its parts.

    Args:
        rng_key: key for the likelihood estimator.
        q: the task's posterior.
        x: ``[N, ...]``; y: ``[N]``.
        expected_log_lik: the estimator of ``E_q[sum_n log p(y_n | x_n, w)]``.
        model_params: passed to ``expected_log_lik``.
        prior: the prior as :class:`GaussianLayers`.
        beta: the KL weight.

    Returns:
        ``(loss, (nll_per_example, kl))``.
    """
    num = x.shape[0]
    nll = -expected_log_lik(rng_key, model_params, q, x, y) / num
    kl = gaussian_kl(q, prior)
    return nll + beta * kl / num, (nll, kl)


def refine(
    rng_key: jax.Array,
    q: GaussianLayers,
    loss_fn: Callable[[jax.Array, GaussianLayers], jax.Array],
    optimizer: optax.GradientTransformation,
    num_steps: int,
) -> GaussianLayers:
    """``num_steps`` steps of ``optimizer`` on ``loss_fn(rng_key, q)`` from ``q`` (differentiable).

    Args:
        rng_key: step ``k`` uses ``fold_in(rng_key, k)``.
        q: the starting variational parameters.
        loss_fn: ``(rng_key, q) -> scalar`` (the support-set negative ELBO).
        optimizer: the inner-loop Optax transformation.
        num_steps: number of steps (static; 0 returns ``q``).

    Returns:
        The refined :class:`GaussianLayers`.
    """
    if num_steps == 0:
        return q

    def body(carry, k):
        q, opt_state = carry
        grads = jax.grad(loss_fn, argnums=1)(jax.random.fold_in(rng_key, k), q)
        updates, opt_state = optimizer.update(grads, opt_state, q)
        return (optax.apply_updates(q, updates), opt_state), None

    (q, _), _ = jax.lax.scan(body, (q, optimizer.init(q)), jnp.arange(num_steps))
    return q


def _prior(params: AmortizedParams, inference: AmortizedInference) -> GaussianLayers:
    return params.prior if params.prior is not None else inference.prior


def task_posterior(
    rng_key: jax.Array,
    params: AmortizedParams,
    support_x: jax.Array,
    support_y: jax.Array,
    inference: AmortizedInference,
) -> GaussianLayers:
    """The refined posterior ``q(w_j | S_j)`` of one task: the guide, then the inner steps.

    Args:
        rng_key: PRNG key.
        params: the meta-parameters.
        support_x: ``[N, *input]``; support_y: ``[N]``.
        inference: the :class:`AmortizedInference` spec.

    Returns:
        :class:`GaussianLayers` (one task).
    """
    k_guide, k_inner = jax.random.split(rng_key)
    q0 = params.guide(k_guide, support_x, support_y)
    loss = _support_loss(params, support_x, support_y, inference)
    return refine(k_inner, q0, loss, inference.inner_optimizer, inference.num_inner_steps)


def _support_loss(params: AmortizedParams, support_x, support_y, inference: AmortizedInference):
    def loss(key, q):
        return negative_elbo(
            key,
            q,
            support_x,
            support_y,
            expected_log_lik=inference.expected_log_lik,
            model_params=params.model,
            prior=_prior(params, inference),
            beta=inference.beta,
        )[0]

    return loss


def _over_tasks(fn: Callable, args: tuple, task_batch_size: int | None):
    """``fn`` over the leading (tasks) axis: ``vmap`` all at once (``None``), or ``lax.map``
    in chunks of ``task_batch_size`` tasks."""
    if task_batch_size is None:
        return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=task_batch_size)


def amortized_meta_loss(
    inference: AmortizedInference,
    *,
    task_batch_size: int | None = None,
) -> Callable[[AmortizedParams, jax.Array, Any], tuple[jax.Array, AmortizedInfo]]:
    """The meta-objective as ``loss_fn(params, rng_key, episodes) -> (loss, AmortizedInfo)``,
    for :func:`metaprior.inference.meta.meta_learner` with ``has_aux=True``.

    For each task: the posterior from its support set (:func:`task_posterior`), then the
    query-set :func:`negative_elbo` under it (Ravi and Beatson 2019, with the KL
    weighted by ``beta``); the loss is the mean over tasks.

    Args:
        inference: the :class:`AmortizedInference` spec.
        task_batch_size: ``None`` vmaps over all tasks at once (best on accelerators);
            an integer runs tasks in chunks of that size with ``lax.map``. Every task has
            its own weights, so vmapped convolutions become grouped convolutions, which
            XLA's CPU backend runs about 2x slower than one task at a time
            (``task_batch_size=1``; measured on the 2-core development machine).

    Returns:
        The loss function. ``episodes`` has fields ``support_x [T, Ns, ...]``,
        ``support_y [T, Ns]``, ``query_x [T, Nq, ...]``, ``query_y [T, Nq]``
        (:class:`metaprior.data.Episodes`).
    """

    def loss_fn(params: AmortizedParams, rng_key: jax.Array, episodes) -> tuple[jax.Array, AmortizedInfo]:
        prior = _prior(params, inference)

        def one(key, sx, sy, qx, qy):
            k_post, k_query = jax.random.split(key)
            q = task_posterior(k_post, params, sx, sy, inference)
            loss, (nll, kl) = negative_elbo(
                k_query,
                q,
                qx,
                qy,
                expected_log_lik=inference.expected_log_lik,
                model_params=params.model,
                prior=prior,
                beta=inference.beta,
            )
            return loss, nll, kl

        keys = jax.random.split(rng_key, episodes.support_x.shape[0])
        args = (keys, episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y)
        loss, nll, kl = _over_tasks(one, args, task_batch_size)
        return jnp.mean(loss), AmortizedInfo(jnp.mean(nll), jnp.mean(kl))

    return loss_fn


def predictive_probs(
    rng_key: jax.Array,
    q: GaussianLayers,
    x: jax.Array,
    logits_fn: Callable[[PyTree, jax.Array], jax.Array],
    num_samples: int,
) -> jax.Array:
    """Posterior predictive class probabilities ``(1/M) sum_m softmax(f(x; w_m))``, ``w_m ~ q``.

    Each sample ``w_m`` is shared by the whole batch (a draw of the task's function).

    Args:
        rng_key: PRNG key.
        q: one task's posterior.
        x: ``[N, ...]`` inputs.
        logits_fn: ``(layers, x) -> [N, classes]``.
        num_samples: ``M``.

    Returns:
        ``[N, classes]`` probabilities.
    """

    def one(key):
        return jax.nn.softmax(logits_fn(sample_weights(key, q), x), axis=-1)

    return jnp.mean(jax.lax.map(one, jax.random.split(rng_key, num_samples)), axis=0)


def episode_predictions(
    rng_key: jax.Array,
    params: AmortizedParams,
    episodes,
    inference: AmortizedInference,
    logits_fn: Callable[[PyTree, PyTree, jax.Array], jax.Array],
    *,
    num_samples: int,
    inner_steps: Sequence[int] | None = None,
    task_batch_size: int | None = None,
) -> jax.Array:
    """Posterior predictive probabilities of every query of a batch of episodes.

    Args:
        rng_key: PRNG key.
        params: the meta-parameters.
        episodes: ``support_x [T, Ns, ...]``, ``support_y [T, Ns]``, ``query_x [T, Nq, ...]``.
        inference: the :class:`AmortizedInference` spec.
        logits_fn: ``(model_params, layers, x) -> [N, classes]`` (deterministic weights).
        num_samples: posterior draws per task.
        inner_steps: ``None`` predicts after ``inference.num_inner_steps`` steps. A
            sequence (ascending, e.g. ``(1, 5)``) predicts after each of these numbers of
            steps in one pass: the refinement continues from one to the next (for SGD
            the same in distribution as separate runs of ``refine``; a stateful inner
            optimizer restarts its state at each of them).
        task_batch_size: as in :func:`amortized_meta_loss`.

    Returns:
        ``[T, Nq, classes]`` probabilities, or ``[len(inner_steps), T, Nq, classes]``.
    """
    steps = (inference.num_inner_steps,) if inner_steps is None else tuple(inner_steps)
    if any(b < a for a, b in zip(steps, steps[1:])) or steps[0] < 0:
        raise ValueError(f"inner_steps must be non-negative and ascending, got {steps}")

    def one(key, sx, sy, qx):
        k_guide, k_inner, k_pred = jax.random.split(key, 3)
        q = params.guide(k_guide, sx, sy)
        loss = _support_loss(params, sx, sy, inference)
        out, done = [], 0
        for num in steps:
            q = refine(jax.random.fold_in(k_inner, done), q, loss, inference.inner_optimizer, num - done)
            done = num
            out.append(predictive_probs(k_pred, q, qx, lambda w, x: logits_fn(params.model, w, x), num_samples))
        return jnp.stack(out)

    keys = jax.random.split(rng_key, episodes.support_x.shape[0])
    probs = _over_tasks(one, (keys, episodes.support_x, episodes.support_y, episodes.query_x), task_batch_size)
    probs = jnp.moveaxis(probs, 1, 0)  # [steps, T, Nq, classes]
    return probs[0] if inner_steps is None else probs


def numpyro_guide(q: GaussianLayers, site_names: Sequence[Sequence[str]]) -> Callable[..., None]:
    """A NumPyro guide that samples every weight site of each task from ``q``.

    Args:
        q: posteriors with a leading tasks axis on every array (``vmap`` of
            :func:`task_posterior`).
        site_names: per layer, the site names of its arrays in leaf order (e.g.
            :func:`metaprior.models.bayes_classifier.weight_site_names`).

    Returns:
        ``guide(*args, **kwargs)`` (arguments ignored), with the model's plate
        ``"tasks"`` (``dim=-2``), for ``numpyro.infer.Predictive(model, guide=...)``.
    """
    locs = jax.tree.leaves(q.loc)
    scales = jax.tree.leaves(q.scale)
    names = [name for layer in site_names for name in layer]
    if len(names) != len(locs):
        raise ValueError(f"{len(names)} site names for {len(locs)} arrays in q")
    num_tasks = locs[0].shape[0]

    def guide(*args, **kwargs):
        with numpyro.plate("tasks", num_tasks, dim=-2):
            for name, loc, scale in zip(names, locs, scales):
                numpyro.sample(name, dist.Normal(loc[:, None], scale[:, None]).to_event(loc.ndim - 1))

    return guide
