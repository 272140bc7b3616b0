"""The deep weight prior's Bayesian nets (Atanov et al. 2019, steps 3 and 4).

3. *Bayesian nets* (:func:`fit_bnns`, :func:`bayesian_nets`): variational inference on
   :func:`metaprior.models.dwp.dwp_model` with each prior over the conv kernels: the deep
   weight prior (auxiliary bound, guide :class:`metaprior.inference.guides.AuxiliaryGuide`
   with ``z ~ r(z | w)``), a standard normal, and the log-uniform prior (KL approximation
   of Molchanov et al. 2017). The dense layer and the biases are point estimates. Scored
   by the accuracy of the posterior predictive (:func:`predictive_accuracy`).
4. *Initialisation from the prior* (:func:`init_curves`): ordinary training with kernels
   drawn from the prior against Xavier initialisation.

Steps 1 and 2 (source nets, kernel VAEs) and :class:`DWPSettings` are in
:mod:`metaprior.inference.dwp_source` (re-exported here).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike
from numpyro.infer import Predictive

from metaprior._io import atomic_write_bytes
from metaprior.inference.dwp_source import (
    DWPSettings,
    accuracy,
    checkpoint_kw,
    cross_entropy,
    forward,
    learn_prior,
    make_nets,
    mean_std,
    minibatch,
    train_kernel_vae,
    train_source_nets,
)
from metaprior.inference.guides.auxiliary import (
    AuxiliaryGuide,
    AuxiliarySite,
    latent_elbo,
    local_reparam_conv2d,
)
from metaprior.inference.meta import FitResult, fit, meta_learner
from metaprior.models.dwp import (
    ConvNet,
    DeepKernelPrior,
    DeepWeightPrior,
    KernelPrior,
    LogUniformKernelPrior,
    NormalKernelPrior,
    conv2d_im2col,
    dwp_model,
    dwp_model_params,
    kernel_sites,
    without_kernels,
)
from metaprior.models.dwp.diagnostics import auxiliary_bound, kernel_log_marginal, mean_kernel_share, prior_only_vi

__all__ = [
    "PRIORS",  # DWPSettings, train_source_nets, train_kernel_vae, learn_prior, mean_std: re-exported
    "DWPSettings",
    "train_source_nets",
    "train_kernel_vae",
    "learn_prior",
    "make_priors",
    "build_guide",
    "bnn_loss",
    "bnn_optimizer",
    "fit_bnns",
    "kernel_moments",
    "predictive_accuracy",
    "bayesian_nets",
    "init_curves",
    "paired_win_rate",
    "posterior_datatree",
    "posterior_diagnostics",
    "mean_std",
]

PRIORS = ("dwp", "normal", "loguniform")


# --------------------------------------------------------------------------- 3. Bayesian nets


def make_priors(kind: str, prior: DeepWeightPrior) -> tuple[KernelPrior, ...]:
    """The kernel priors of every conv layer for ``kind`` in ``PRIORS``."""
    n = len(prior.vaes)
    if kind == "dwp":
        return prior.priors()
    if kind == "normal":
        return (NormalKernelPrior(),) * n
    if kind == "loguniform":
        return (LogUniformKernelPrior(),) * n
    raise ValueError(f"unknown prior {kind!r}; expected one of {PRIORS}")


def build_guide(
    net: ConvNet,
    priors: Sequence[KernelPrior],
    *,
    prior: DeepWeightPrior | None = None,
    init_log_scale: float = -5.0,
    init_logit_alpha: float = -2.0,
) -> AuxiliaryGuide:
    """The guide of :func:`dwp_model` for these priors.

    Layers with a :class:`~metaprior.models.dwp.DeepKernelPrior` get the auxiliary
    latent ``z ~ r(z | w)`` (encoder from ``prior``); the log-uniform prior gets the
    truncated-alpha parameterisation of ``q``, the others a free log-scale.
    """
    sites = []
    for layer, (shape, p) in enumerate(zip(net.kernel_shapes, priors)):
        names = kernel_sites(layer)
        out, inp, k, _ = shape
        if isinstance(p, DeepKernelPrior):
            if prior is None:
                raise ValueError("a deep weight prior layer needs prior= for its encoder r(z | w)")
            sites.append(AuxiliarySite(names.w, names.plate, out * inp, (k, k), names.z, prior.vaes[layer].encoder))
        else:
            sites.append(AuxiliarySite(names.w, names.plate, out * inp, (k, k)))
    log_uniform = any(isinstance(p, LogUniformKernelPrior) for p in priors)
    return AuxiliaryGuide(
        tuple(sites),
        scale_param="truncated_alpha" if log_uniform else "log_scale",
        init_log_scale=init_log_scale,
        init_logit_alpha=init_logit_alpha,
    )


def masked_minibatch(rng_key: jax.Array, x: jax.Array, y: jax.Array, n, batch: int) -> tuple[jax.Array, jax.Array]:
    """``batch`` distinct examples drawn uniformly from the first ``n`` of ``x [N_max, ...]``
    (``n`` may be traced, so data sets of different sizes share one compiled step)."""
    scores = jax.random.uniform(rng_key, (x.shape[0],))
    scores = jnp.where(jnp.arange(x.shape[0]) < n, scores, 2.0)
    _, idx = jax.lax.top_k(-scores, batch)
    return x[idx], y[idx]


def bnn_loss(
    kind: str,
    net: ConvNet,
    priors: Sequence[KernelPrior],
    guide: AuxiliaryGuide,
    *,
    batch_size: int,
    local_reparam: bool = True,
    kl_weight: float = 1.0,
) -> Callable[[dict, jax.Array, tuple], jax.Array]:
    """``loss_fn(params, rng_key, data)``: minus ``L_aux`` (or the ELBO) of one data set.

    ``data = (images [N_max, 28, 28, 1], labels [N_max], n)``: the data set is the first
    ``n`` examples (padding beyond). The observation term ``n / B * sum_batch
    log p(y | x, W)`` is estimated on ``B = batch_size`` of them with the local
    reparameterisation trick (``local_reparam``) or one weight sample; the prior term
    is, for the deep weight prior, the pair's ELBO without the observations
    (:func:`~metaprior.inference.guides.auxiliary.latent_elbo`: minus the auxiliary
    upper bound on ``KL(q(W) || p(W))``), and for the baselines the closed-form (normal)
    or approximate (log-uniform) ``-KL(q || p)``, times ``kl_weight`` (1: the ELBO).
    """
    if not kl_weight >= 0:  # also rejects NaN
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    _, body_static = eqx.partition(without_kernels(net), eqx.is_inexact_array)
    shapes = net.kernel_shapes
    sites = [kernel_sites(i).w for i in range(len(shapes))]

    def loss(params, rng_key, data):
        images, labels, n = data
        k_batch, k_lik, k_prior = jax.random.split(rng_key, 3)
        xb, yb = masked_minibatch(k_batch, images, labels, n, batch_size)
        body = eqx.combine(params["net$params"], body_static)
        moments = guide.moments(params)
        keys = jax.random.split(k_lik, len(shapes))
        if local_reparam:
            kernels = [
                (k, moments[s][0].reshape(shape), moments[s][1].reshape(shape))
                for k, s, shape in zip(keys, sites, shapes)
            ]
            logits = body.apply(
                xb, kernels, conv=lambda h, kern: local_reparam_conv2d(kern[0], h, kern[1], kern[2], conv=conv2d_im2col)
            )
        else:
            kernels = [
                (moments[s][0] + moments[s][1] * jax.random.normal(k, moments[s][0].shape)).reshape(shape)
                for k, s, shape in zip(keys, sites, shapes)
            ]
            logits = body.apply(xb, kernels, conv=conv2d_im2col)
        log_lik = (n / batch_size) * jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=-1))
        if kind == "dwp":
            # The model's own likelihood site is hidden here; its plate size is irrelevant.
            prior_term = latent_elbo(
                k_prior, params, dwp_model, guide, xb, yb, net=net, priors=priors, conv=conv2d_im2col
            )
        else:
            prior_term = -sum(jnp.sum(p.kl(*moments[s])) for p, s in zip(priors, sites))
        return -(log_lik + kl_weight * prior_term)

    return loss


def init_bnn_params(
    rng_key: jax.Array, kind: str, settings: DWPSettings, guide: AuxiliaryGuide, prior: DeepWeightPrior
) -> dict:
    """Initial parameters of one Bayesian net.

    Kernel means: samples from the deep weight prior (decoder means) for ``"dwp"``, as the
    paper's code does; Xavier-normal for the baselines. Dense layer: Xavier-normal.
    """
    k_net, k_guide, k_prior = jax.random.split(rng_key, 3)
    net = ConvNet(filters=settings.filters, kernel_sizes=settings.kernel_sizes, key=k_net)
    if kind == "dwp":
        net = prior.init_net(k_prior, net, noise=False)
    params = {**guide.init_params(k_guide), **dwp_model_params(net)}
    for layer, conv in enumerate(net.convs):
        name = kernel_sites(layer).w + "_loc"
        params[name] = conv.weight.reshape(params[name].shape)
    return params


def kernel_moments(guide: AuxiliaryGuide, net: ConvNet, params: dict) -> list[tuple[jax.Array, jax.Array]]:
    """``[(loc, scale)]`` of ``q`` for every conv layer, each ``[out, in, k, k]``."""
    moments = guide.moments(params)
    return [tuple(m.reshape(shape) for m in moments[kernel_sites(i).w]) for i, shape in enumerate(net.kernel_shapes)]


def predictive_accuracy(
    rng_key: jax.Array, net: ConvNet, head: ConvNet, moments: Sequence, x: jax.Array, y: jax.Array, num_samples: int
) -> jax.Array:
    """Accuracy of the posterior predictive ``mean_s softmax(f(x; W_s))``, ``W_s ~ q``.

    Args:
        net: the architecture (its kernels are not used).
        head: the ``"net$params"`` value (biases and dense layer).
        moments: :func:`kernel_moments` of the guide.
    """
    _, body_static = eqx.partition(without_kernels(net), eqx.is_inexact_array)
    body = eqx.combine(head, body_static)

    def probs(key):
        keys = jax.random.split(key, len(moments))
        kernels = [loc + scale * jax.random.normal(k, loc.shape) for k, (loc, scale) in zip(keys, moments)]
        return jax.nn.softmax(body.apply(x, kernels, conv=conv2d_im2col))

    mean = jax.lax.map(probs, jax.random.split(rng_key, num_samples)).mean(axis=0)
    return accuracy(mean, y)


def bnn_optimizer(settings: DWPSettings) -> optax.GradientTransformation:
    """Adam for the Bayesian nets: ``settings.lr_schedule`` (constant, or linear decay to 0
    over ``num_steps``); with ``settings.scale_lr``, q's ``*_log_scale`` parameters take
    that step size (same schedule); with ``settings.freeze_encoder``, a zero update for
    every ``"*_encoder$params"`` site (``r(z | w)`` stays the prior VAE's encoder)."""
    if settings.lr_schedule == "constant":
        lr = settings.learning_rate
    elif settings.lr_schedule == "linear":
        lr = optax.linear_schedule(settings.learning_rate, 0.0, max(settings.num_steps, 1))
    else:
        raise ValueError(f"settings.lr_schedule must be 'constant' or 'linear', got {settings.lr_schedule!r}")
    adam = optax.adam(lr)
    if not settings.freeze_encoder and not settings.scale_lr:
        return adam
    if settings.scale_lr < 0:
        raise ValueError(f"settings.scale_lr must be >= 0, got {settings.scale_lr}")
    transforms = {"train": adam, "frozen": optax.set_to_zero()}
    if settings.scale_lr:
        scale_lr = settings.scale_lr
        if settings.lr_schedule == "linear":
            scale_lr = optax.linear_schedule(settings.scale_lr, 0.0, max(settings.num_steps, 1))
        transforms["scale"] = optax.adam(scale_lr)

    def label(name: str) -> str:
        if settings.freeze_encoder and name.endswith("_encoder$params"):
            return "frozen"
        return "scale" if settings.scale_lr and name.endswith("_log_scale") else "train"

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: label(k), v) for k, v in params.items()}

    return optax.multi_transform(transforms, labels)


def fit_bnns(
    rng_key: jax.Array,
    kind: str,
    settings: DWPSettings,
    prior: DeepWeightPrior,
    xs: jax.Array,
    ys: jax.Array,
    ns: jax.Array,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[ConvNet, AuxiliaryGuide, dict, FitResult]:
    """Variational inference for one prior on ``M`` stacked data sets at once.

    Args:
        xs, ys: ``[M, N_max, ...]``, ``[M, N_max]``; data set ``m`` is the first
            ``ns[m]`` examples.
        ns: ``[M]`` int sizes.
        checkpoint_dir: if given, training checkpoints to ``bnn_{kind}.ckpt`` there
            (``bnn_{kind}_klw{w}.ckpt`` at ``kl_weight`` w other than 1) and resumes from it.

    Returns:
        ``(net, guide, params [M, ...], FitResult)``.
    """
    k_init, k_fit = jax.random.split(rng_key)
    num = xs.shape[0]
    net = ConvNet(filters=settings.filters, kernel_sizes=settings.kernel_sizes, key=jax.random.key(0))
    priors = make_priors(kind, prior)
    guide = build_guide(
        net, priors, prior=prior, init_log_scale=settings.init_log_scale, init_logit_alpha=settings.init_logit_alpha
    )
    init = eqx.filter_jit(jax.vmap(lambda k: init_bnn_params(k, kind, settings, guide, prior)))
    params = init(jax.random.split(k_init, num))
    single = bnn_loss(
        kind,
        net,
        priors,
        guide,
        batch_size=settings.batch_size,
        local_reparam=settings.local_reparam,
        kl_weight=settings.kl_weight,
    )

    def loss(params, key, data):
        keys = jax.random.split(key, num)
        return jnp.sum(jax.vmap(single)(params, keys, data))

    learner = meta_learner(loss, bnn_optimizer(settings))
    result = fit(
        k_fit,
        learner,
        params,
        settings.num_steps,
        data=(xs, ys, ns),
        steps_per_call=settings.steps_per_call,
        desc=f"BNN, {kind} prior ({num} data sets)",
        # the weight in the name: a folder trained at another kl_weight is not resumed from
        **checkpoint_kw(
            settings, checkpoint_dir, f"bnn_{kind}" + ("" if settings.kl_weight == 1 else f"_klw{settings.kl_weight:g}")
        ),
    )
    return net, guide, result.state.params, result


def bayesian_nets(
    rng_key: jax.Array,
    settings: DWPSettings,
    prior: DeepWeightPrior,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    orders: np.ndarray,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[dict, dict]:
    """Step 3: every prior, every size and split (one :func:`fit` per prior; with
    ``checkpoint_dir``, each checkpoints there and resumes, :func:`fit_bnns`).

    Returns:
        ``(accs, fits)``: ``accs[(kind, N)]`` the ``[num_splits]`` test accuracies;
        ``fits[kind] = (net, guide, params [len(sizes) * num_splits, ...])``, data set
        ``j * num_splits + s`` being size ``sizes[j]``, split ``s``.
    """
    sizes, splits = settings.sizes, settings.num_splits
    n_max = max(sizes)
    idx = np.concatenate([orders[:splits, :n_max]] * len(sizes))
    xs, ys = jnp.asarray(pool_x[idx]), jnp.asarray(pool_y[idx])
    ns = jnp.asarray(np.repeat(np.asarray(sizes), splits), jnp.int32)
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    arch = ConvNet(filters=settings.filters, kernel_sizes=settings.kernel_sizes, key=jax.random.key(0))
    # one compiled scorer for every prior: it sees only q's moments and the point estimates
    score = eqx.filter_jit(
        lambda keys, heads, moments: jax.lax.map(
            lambda a: predictive_accuracy(a[0], arch, a[1], a[2], test_x, test_y, settings.num_eval_samples),
            (keys, heads, moments),
        )
    )
    accs, fits = {}, {}
    for i, kind in enumerate(PRIORS):
        key = jax.random.fold_in(rng_key, i)
        net, guide, params, _ = fit_bnns(key, kind, settings, prior, xs, ys, ns, checkpoint_dir)
        k_eval = jax.random.split(jax.random.fold_in(key, 7), xs.shape[0])
        moments = jax.vmap(lambda p: kernel_moments(guide, net, p))(params)
        acc = np.asarray(score(k_eval, params["net$params"], moments)).reshape(len(sizes), splits)
        for j, n in enumerate(sizes):
            accs[(kind, n)] = acc[j]
        fits[kind] = (net, guide, params)
    return accs, fits


# --------------------------------------------------------------------------- 4. initialisation


def init_curves(
    rng_key: jax.Array,
    settings: DWPSettings,
    prior: DeepWeightPrior,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    orders: np.ndarray,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Ordinary training from Xavier and from prior-sampled kernels.

    For each of ``init_splits`` training sets (the first ``init_train_size`` images of
    the split) the two runs share the dense layer and biases, the training set and the
    minibatch sequence; only the kernels differ. Both initialisations are trained
    together (stacked), with the training cut at every ``init_eval_steps`` to score the
    test set (resuming from a checkpoint, so the optimizer state carries over). The
    segment that ends at step ``S`` starts from a copy of the previous one's checkpoint
    and checkpoints to ``init_to{S}.ckpt`` in ``checkpoint_dir`` (default: a temporary
    folder), so a killed and rerun call resumes and ends with the same curves.

    Returns:
        ``{"dwp" | "xavier": [len(init_eval_steps), init_splits]}`` test accuracies.
    """
    m = settings.init_splits
    idx = orders[:m, : settings.init_train_size]
    x, y = jnp.asarray(pool_x[idx]), jnp.asarray(pool_y[idx])
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    k_net, k_prior, k_fit = jax.random.split(rng_key, 3)
    xavier = make_nets(k_net, m, filters=settings.filters, kernel_sizes=settings.kernel_sizes)
    from_prior = eqx.filter_jit(jax.vmap(lambda k, n: prior.init_net(k, n, noise=False)))(
        jax.random.split(k_prior, m), xavier
    )
    nets = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), from_prior, xavier)
    batch = min(settings.init_batch, settings.init_train_size)

    def sample(key, data):  # the same minibatch for the two runs of a split
        xb, yb = jax.vmap(lambda k, a, b: minibatch(k, a, b, batch))(jax.random.split(key, m), *data)
        return jnp.concatenate([xb, xb]), jnp.concatenate([yb, yb])

    def loss(nets, key, batch):
        xb, yb = batch
        return jnp.sum(jax.vmap(lambda n, a, b: cross_entropy(forward(n, a), b))(nets, xb, yb))

    learner = meta_learner(loss, optax.adam(settings.init_lr))
    evaluate = eqx.filter_jit(lambda ns: jax.lax.map(lambda n: accuracy(forward(n, test_x), test_y), ns))
    accs = []
    with tempfile.TemporaryDirectory(prefix="dwp-init-") as tmp:
        folder, previous, current = Path(checkpoint_dir or tmp), None, nets
        for step in settings.init_eval_steps:
            if step > 0:
                ckpt = folder / f"init_to{step}.ckpt"
                if previous is not None and not ckpt.exists():
                    atomic_write_bytes(ckpt, previous.read_bytes())  # this segment resumes where the last ended
                previous = ckpt
                res = fit(
                    k_fit,
                    learner,
                    nets,
                    step,
                    data=(x, y),
                    sample_batch=sample,
                    steps_per_call=settings.steps_per_call,
                    checkpoint=ckpt,
                    checkpoint_every=settings.checkpoint_every,
                    desc=f"init dwp vs xavier (to step {step})",
                )
                current = res.state.params
            accs.append(np.asarray(evaluate(current)))
    accs = np.stack(accs)  # [steps, 2m]
    return {"dwp": accs[:, :m], "xavier": accs[:, m:]}


def paired_win_rate(first: ArrayLike, second: ArrayLike) -> float:
    """Fraction of pairs ``(first[s], second[s])`` with ``first[s] > second[s]``.

    For the initialisation curves the two runs of split ``s`` share the training set,
    the minibatch sequence and the dense layer, so a per-split comparison removes the
    split-to-split spread that the means and sds keep (a sign test's statistic).

    Raises:
        ValueError: the two have different shapes, or are empty.
    """
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.size == 0:
        raise ValueError(f"first and second must be non-empty and of one shape, got {first.shape} and {second.shape}")
    return float(np.mean(first > second))


# --------------------------------------------------------------------------- posterior


def posterior_datatree(rng_key: jax.Array, fits: dict, num_samples: int, member: int = 0) -> Any:
    """ArviZ DataTree with draws of the guide's conv kernels for every prior, for data set
    ``member`` of the stack (0: the smallest size, split 0): variables
    ``{prior}_conv{l}_w`` ``[chain, draw, kernel, row, col]``."""
    import arviz as az

    posterior, dims = {}, {}
    for i, kind in enumerate(PRIORS):
        net, guide, params = fits[kind]
        first = jax.tree.map(lambda a: a[member], params)
        draws = Predictive(guide, params=first, num_samples=num_samples)(jax.random.fold_in(rng_key, i))
        for layer in range(len(net.convs)):
            name = kernel_sites(layer).w
            var = f"{kind}_{name}"
            posterior[var] = np.asarray(draws[name])[None]
            dims[var] = [f"kernel_l{layer}", f"row_l{layer}", f"col_l{layer}"]
    return az.from_dict({"posterior": posterior}, dims=dims)


def posterior_diagnostics(rng_key: jax.Array, settings: DWPSettings, prior: DeepWeightPrior, fits: dict) -> dict:
    """Whether the deep weight prior's inference is right, and whether its kernels collapsed
    (:mod:`metaprior.models.dwp.diagnostics`), as flat metrics for conv layer ``L``:

    - ``q_mean_kernel_share_{kind}_l{L}``: :func:`mean_kernel_share` of q's kernel means,
      averaged over the data sets (every size and split; 1: the layer's kernels are one
      kernel).
    - ``dwp_bound_gap_l{L}``: the importance-weighted ``log p(w)`` (256 draws) minus the
      auxiliary bound, nats per kernel, at the deep-weight-prior posterior's means of data
      set 0 (the smallest size, split 0), with the encoder ``r(z | w)`` as trained there
      (near 0: the bound is tight).
    - ``prior_vi_share_l{L}``: the share after :func:`prior_only_vi` from 1,024 decoder
      means, with the Bayesian nets' step count, initial scale and (constant) step size
      and the prior's own encoder: the collapse the prior alone causes, without data, at
      the full prior term (``kl_weight`` 1).
    """
    metrics = {}
    for kind, (net, _, params) in fits.items():
        for layer, name in enumerate(kernel_sites(i).w for i in range(len(net.convs))):
            locs = np.asarray(params[f"{name}_loc"])
            metrics[f"q_mean_kernel_share_{kind}_l{layer}"] = float(np.mean([mean_kernel_share(m) for m in locs]))
    if "dwp" in fits:
        params = fits["dwp"][2]
        for layer, vae in enumerate(prior.vaes):
            k_gap, k_vi, k_init = jax.random.split(jax.random.fold_in(rng_key, layer), 3)
            site = kernel_sites(layer)
            trained = jax.tree.map(lambda a: a[0], params[f"{site.z}_encoder$params"])
            encoder = eqx.combine(trained, eqx.partition(vae.encoder, eqx.is_inexact_array)[1])
            k = vae.kernel_size
            w = params[f"{site.w}_loc"][0].reshape(-1, k, k)
            gap = eqx.filter_jit(  # in chunks of 256 kernels: bounded memory at the paper's widths
                lambda e, c: (
                    kernel_log_marginal(k_gap, e, vae.decoder, c, 256) - auxiliary_bound(k_gap, e, vae.decoder, c)
                )
            )
            gaps = [gap(encoder, w[i : i + 256]) for i in range(0, w.shape[0], 256)]
            metrics[f"dwp_bound_gap_l{layer}"] = float(jnp.mean(jnp.concatenate(gaps)))
            loc, _ = prior_only_vi(
                k_vi,
                vae.encoder,
                vae.decoder,
                vae.sample(k_init, 1024, noise=False),
                num_steps=settings.num_steps,
                learning_rate=settings.learning_rate,
                init_log_scale=settings.init_log_scale,
            )
            metrics[f"prior_vi_share_l{layer}"] = mean_kernel_share(loc)
    return metrics
