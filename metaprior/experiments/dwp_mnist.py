"""``metaprior run dwp-mnist``: the deep weight prior, notMNIST kernels -> MNIST.

Reproduces the MNIST experiments of Atanov et al. (2019):

1. *Source kernels.* Train ``num_source_nets`` copies of the paper's MNIST network
   (:class:`metaprior.models.dwp.ConvNet`, different seeds, L2-regularised) on notMNIST;
   collect the 2-D kernels of each conv layer and drop those of small norm.
2. *The prior.* Train one kernel VAE per conv layer on those kernels; together they are
   the deep weight prior (:class:`metaprior.models.dwp.DeepWeightPrior`, saved as
   ``dwp_prior.npz`` in the output folder).
3. *Bayesian nets on little MNIST data* (the paper's Figure 2). For each training-set
   size and data split, variational inference on :func:`metaprior.models.dwp.dwp_model`
   with each prior over the conv kernels: the deep weight prior (auxiliary bound, guide
   :class:`metaprior.inference.guides.AuxiliaryGuide` with ``z ~ r(z | w)``), a standard
   normal, and the log-uniform prior (KL approximation of Molchanov et al. 2017). The
   dense layer and the biases are point estimates. Scored by the accuracy of the
   posterior predictive (an average over ``num_eval_samples`` weight draws).
4. *Initialisation from the prior* (the paper's Figure 4). Ordinary (non-Bayesian)
   training of the same network with kernels drawn from the deep weight prior against
   Xavier initialisation; test accuracy at fixed steps.

Data. Only the 10,000-image test sets of MNIST and notMNIST are available. notMNIST:
a fixed permutation gives 9,000 images to train the source nets and 1,000 to check
them. MNIST: a fixed permutation (key ``split_seed``, independent of ``--seed``) gives
a pool of the first 5,000 images and a held-out test part of the last 5,000 (the first
``test_size`` of which are scored). Training sets are drawn from the pool only: for
data split ``s`` a permutation of the pool (key ``fold_in(split_seed, 1 + s)``), whose
first N images form the training set of size N. So every training set is disjoint from
the test part, and for one split the sizes are nested. Training sets are not
class-balanced (as in the paper).

All training, of source nets, VAEs, Bayesian nets and initialisation runs alike, goes
through :func:`metaprior.inference.meta.fit`. The data splits of one size (and the
source nets) are trained together with ``vmap``: their parameters are stacked and the
loss is the sum of theirs, which with Adam (elementwise) equals separate runs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import Predictive

from metaprior.experiments._common import save_datatree, save_figure
from metaprior.experiments._registry import Experiment
from metaprior.inference.guides.auxiliary import (
    AuxiliaryGuide,
    AuxiliarySite,
    latent_elbo,
    local_reparam_conv2d,
)
from metaprior.inference.meta import fit, meta_learner
from metaprior.models.dwp import (
    ConvNet,
    DeepKernelPrior,
    DeepWeightPrior,
    KernelPrior,
    KernelVAE,
    LogUniformKernelPrior,
    NormalKernelPrior,
    collect_kernels,
    conv2d_im2col,
    decoder_snr,
    drop_small_kernels,
    dwp_model,
    dwp_model_params,
    kernel_sites,
    kernel_vae_elbo,
    without_kernels,
)

PRIORS = ("dwp", "normal", "loguniform")


@dataclasses.dataclass(frozen=True)
class DWPConfig:
    """Configuration; ``make_config`` gives the quick / default / full sizes.

    ``num_steps`` is the number of variational-inference steps per Bayesian net (what
    ``--steps`` sets).
    """

    data_dir: str = ""  # "" -> $METAPRIOR_DATA
    # MNIST splits
    sizes: tuple[int, ...] = (50, 100, 500, 1000)
    num_splits: int = 10
    split_seed: int = 0
    test_size: int = 5000
    # source nets on notMNIST
    num_source_nets: int = 10
    source_filters: tuple[int, ...] = (32, 128)
    kernel_sizes: tuple[int, ...] = (7, 5)
    source_steps: int = 3000
    source_batch: int = 128
    source_lr: float = 1e-3
    source_l2: float = 1e-3
    min_kernel_norm: float = 1e-2
    # kernel VAEs (one per conv layer)
    latent_dims: tuple[int, ...] = (2, 4)
    vae_hidden: tuple[int, ...] = (64, 64)
    vae_steps: int = 10000
    vae_batch: int = 256
    vae_lr: float = 1e-3
    # Bayesian nets on MNIST
    filters: tuple[int, ...] = (32, 128)
    num_steps: int = 10000
    batch_size: int = 50
    learning_rate: float = 1e-3
    local_reparam: bool = True
    init_log_scale: float = -5.0
    init_logit_alpha: float = -2.0
    num_eval_samples: int = 10
    posterior_samples: int = 50
    # initialisation experiment
    init_train_size: int = 5000
    init_splits: int = 5
    init_eval_steps: tuple[int, ...] = (0, 50, 100, 200, 500, 1000, 2000)
    init_batch: int = 64
    init_lr: float = 1e-3
    steps_per_call: int = 25


def make_config(size: str) -> DWPConfig:
    """``"quick"``: a smoke test (3x3 kernels, a few steps; numbers meaningless).
    ``"default"``: the paper's kernel sizes with fewer filters and steps, about ten
    CPU-minutes. ``"full"``: the paper's sizes (its nets, 10 splits, 10,000 steps)."""
    if size == "quick":
        return DWPConfig(
            sizes=(20, 40),
            num_splits=2,
            test_size=100,
            num_source_nets=2,
            source_filters=(4, 4),
            kernel_sizes=(3, 3),
            latent_dims=(2, 2),
            source_steps=10,
            source_batch=16,
            vae_hidden=(8,),
            vae_steps=20,
            filters=(2, 4),
            num_steps=10,
            batch_size=10,
            num_eval_samples=2,
            posterior_samples=4,
            init_train_size=100,
            init_splits=2,
            init_eval_steps=(0, 5),
            init_batch=16,
            steps_per_call=5,
            min_kernel_norm=1e-3,
        )
    if size == "default":
        return DWPConfig(
            num_splits=5,
            test_size=1000,
            source_filters=(16, 32),
            source_steps=300,
            source_batch=32,
            vae_hidden=(32, 32),
            vae_steps=1500,
            filters=(8, 16),
            num_steps=500,
            batch_size=32,
            num_eval_samples=5,
            posterior_samples=20,
            init_train_size=1000,
            init_splits=5,
            init_eval_steps=(0, 25, 50, 100, 200, 400),
            init_batch=32,
        )
    if size == "full":
        return DWPConfig()
    raise ValueError(f"unknown size {size!r}")


def _check(config: DWPConfig) -> None:
    n = len(config.kernel_sizes)
    for name in ("source_filters", "filters", "latent_dims"):
        if len(getattr(config, name)) != n:
            raise ValueError(f"config.{name} has {len(getattr(config, name))} entries, config.kernel_sizes has {n}")
    if max(config.sizes) > 5000 or config.init_train_size > 5000:
        raise ValueError(
            "training sets are drawn from a pool of 5,000 MNIST images; "
            f"got sizes {config.sizes}, init_train_size {config.init_train_size}"
        )
    if not 1 <= config.test_size <= 5000:
        raise ValueError(f"config.test_size must be in 1..5000, got {config.test_size}")
    if config.batch_size > min(config.sizes):
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the smallest training set ({min(config.sizes)})"
        )
    if config.num_splits < 1 or config.init_splits < 1 or config.num_source_nets < 1:
        raise ValueError("config.num_splits, init_splits and num_source_nets must be >= 1")
    if sorted(config.init_eval_steps) != list(config.init_eval_steps) or min(config.init_eval_steps) < 0:
        raise ValueError(f"config.init_eval_steps must be increasing and >= 0, got {config.init_eval_steps}")


# --------------------------------------------------------------------------- data


def source_data(data_dir: str | None = None):
    """notMNIST: ``(train_x [9000, 28, 28, 1], train_y, val_x [1000, ...], val_y)``."""
    from metaprior.data import load_notmnist

    x, y = load_notmnist("test", data_dir)
    perm = np.asarray(jax.random.permutation(jax.random.key(0), x.shape[0]))
    cut = x.shape[0] - x.shape[0] // 10
    train, val = perm[:cut], perm[cut:]
    return x[train], y[train], x[val], y[val]


def mnist_splits(config: DWPConfig, data_dir: str | None = None):
    """MNIST pool and held-out test part (see the module docstring).

    Returns:
        ``(pool_x [5000, 28, 28, 1], pool_y, test_x [test_size, ...], test_y,
        orders [num_splits, 5000])``: ``orders[s, :N]`` indexes the pool images of
        split ``s``'s training set of size N.
    """
    from metaprior.data import load_mnist

    x, y = load_mnist("test", data_dir)
    key = jax.random.key(config.split_seed)
    perm = np.asarray(jax.random.permutation(key, x.shape[0]))
    half = x.shape[0] // 2
    pool, test = perm[:half], perm[half:][: config.test_size]
    num = max(config.num_splits, config.init_splits)
    orders = np.stack([np.asarray(jax.random.permutation(jax.random.fold_in(key, 1 + s), half)) for s in range(num)])
    return x[pool], y[pool], x[test], y[test], orders


def _minibatch(rng_key, x, y, batch: int):
    """``batch`` examples without replacement (all of them if ``batch >= N``)."""
    n = x.shape[0]
    if batch >= n:
        return x, y
    idx = jax.random.permutation(rng_key, n)[:batch]
    return x[idx], y[idx]


def _shared_minibatch(batch: int, num: int):
    """``sample_batch`` for one data set ``(x [N, ...], y [N])`` shared by ``num`` stacked
    members: an independent batch for each, ``(x [num, batch, ...], y [num, batch])``."""

    def sample(rng_key, data):
        x, y = data
        keys = jax.random.split(rng_key, num)
        return jax.vmap(lambda k: _minibatch(k, x, y, batch))(keys)

    return sample


def _mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _forward(net: ConvNet, x) -> jax.Array:
    """``net(x)`` with the im2col convolution (fast when vmapped over stacked nets)."""
    return net.apply(x, [c.weight for c in net.convs], conv=conv2d_im2col)


def _accuracy(logits, labels) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _cross_entropy(logits, labels) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def _make_nets(rng_key, num: int, *, filters, kernel_sizes) -> ConvNet:
    """``num`` networks with their arrays stacked on a leading axis."""
    return jax.vmap(lambda k: ConvNet(filters=filters, kernel_sizes=kernel_sizes, key=k))(
        jax.random.split(rng_key, num)
    )


# --------------------------------------------------------------------------- 1. source nets


def source_net_loss(l2: float):
    """``loss_fn(nets, rng_key, batch)``: sum over stacked nets of mean cross-entropy +
    ``l2 / 2 * ||weights||^2`` (kernels and dense weights, not biases)."""

    def one(net, x, y):
        sq = sum(jnp.sum(c.weight**2) for c in net.convs) + jnp.sum(net.head.weight**2)
        return _cross_entropy(_forward(net, x), y) + 0.5 * l2 * sq

    def loss(nets, rng_key, batch):
        x, y = batch
        return jnp.sum(jax.vmap(one)(nets, x, y))

    return loss


def train_source_nets(rng_key, config: DWPConfig, x, y):
    """Train ``num_source_nets`` nets on notMNIST (stacked); returns ``(nets, FitResult)``."""
    k_init, k_fit = jax.random.split(rng_key)
    m = config.num_source_nets
    nets = _make_nets(k_init, m, filters=config.source_filters, kernel_sizes=config.kernel_sizes)
    learner = meta_learner(source_net_loss(config.source_l2), optax.adam(config.source_lr))
    result = fit(
        k_fit,
        learner,
        nets,
        config.source_steps,
        data=(x, y),
        sample_batch=_shared_minibatch(config.source_batch, m),
        steps_per_call=config.steps_per_call,
        desc="source nets (notMNIST)",
    )
    return result.state.params, result


# --------------------------------------------------------------------------- 2. kernel VAEs


def vae_loss(vae: KernelVAE, rng_key, kernels) -> jax.Array:
    """Negative mean per-kernel ELBO of a batch of kernels ``[B, k, k]``."""
    return -jnp.mean(kernel_vae_elbo(rng_key, vae, kernels))


def heldout_elbo(rng_key, vae: KernelVAE, kernels, num_samples: int = 8) -> float:
    """Mean per-kernel ELBO of ``kernels`` (averaged over ``num_samples`` draws of z)."""
    keys = jax.random.split(rng_key, num_samples)
    return float(jnp.mean(jax.vmap(lambda k: kernel_vae_elbo(k, vae, kernels))(keys)))


def train_kernel_vae(rng_key, config: DWPConfig, kernels: np.ndarray, layer: int):
    """Train the VAE of one layer on 90% of its kernels; score the rest.

    Returns:
        ``(vae, info)`` with ``info = dict(num_kernels, elbo_init, elbo_final, losses)``:
        held-out per-kernel ELBO before and after training.
    """
    k_perm, k_init, k_fit, k_eval = jax.random.split(rng_key, 4)
    perm = np.asarray(jax.random.permutation(k_perm, kernels.shape[0]))
    cut = min(len(perm) - 1, max(1, int(0.9 * len(perm))))
    train, held = jnp.asarray(kernels[perm[:cut]]), jnp.asarray(kernels[perm[cut:]])
    vae = KernelVAE(config.kernel_sizes[layer], config.latent_dims[layer], config.vae_hidden, key=k_init)
    before = heldout_elbo(k_eval, vae, held)
    batch = min(config.vae_batch, train.shape[0])

    def sample(key, data):
        return data[jax.random.randint(key, (batch,), 0, data.shape[0])]

    result = fit(
        k_fit,
        meta_learner(vae_loss, optax.adam(config.vae_lr)),
        vae,
        config.vae_steps,
        data=train,
        sample_batch=sample,
        steps_per_call=config.steps_per_call,
        desc=f"kernel VAE, layer {layer}",
    )
    vae = result.state.params
    after = heldout_elbo(k_eval, vae, held)
    return vae, dict(num_kernels=int(kernels.shape[0]), elbo_init=before, elbo_final=after, losses=result.losses)


def learn_prior(rng_key, config: DWPConfig, data_dir: str | None = None):
    """Steps 1 and 2: source nets, their kernels, one VAE per layer.

    Returns:
        ``(prior, kernels_per_layer, info)``; ``info`` holds timings and diagnostics.
    """
    k_src, k_vae = jax.random.split(rng_key)
    sx, sy, vx, vy = source_data(data_dir)
    start = time.perf_counter()
    nets, src_fit = train_source_nets(k_src, config, jnp.asarray(sx), jnp.asarray(sy))
    vx, vy = jnp.asarray(vx), jnp.asarray(vy)
    acc = eqx.filter_jit(lambda ns: jax.lax.map(lambda n: _accuracy(_forward(n, vx), vy), ns))(nets)
    info: dict[str, Any] = {
        "time_source_s": time.perf_counter() - start,
        "source_acc": float(jnp.mean(acc)),
        "source_acc_std": float(jnp.std(acc)),
    }
    start = time.perf_counter()
    vaes, kernels = [], []
    for layer in range(len(config.kernel_sizes)):
        raw = collect_kernels(nets, layer)
        kept = drop_small_kernels(raw, config.min_kernel_norm)
        if kept.shape[0] < 2:
            raise RuntimeError(
                f"layer {layer}: only {kept.shape[0]} source kernels have norm >= "
                f"{config.min_kernel_norm}; lower config.min_kernel_norm"
            )
        vae, vinfo = train_kernel_vae(jax.random.fold_in(k_vae, layer), config, kept, layer)
        vaes.append(vae)
        kernels.append(kept)
        info[f"num_source_kernels_l{layer}"] = vinfo["num_kernels"]
        info[f"num_dropped_kernels_l{layer}"] = int(raw.shape[0] - kept.shape[0])
        info[f"vae_l{layer}_elbo_init"] = vinfo["elbo_init"]
        info[f"vae_l{layer}_elbo_final"] = vinfo["elbo_final"]
        info[f"prior_snr_l{layer}"] = decoder_snr(jax.random.fold_in(k_vae, 1000 + layer), vae.decoder, vae.latent_dim)
        info[f"vae_l{layer}_losses"] = vinfo["losses"]
    info["time_vae_s"] = time.perf_counter() - start
    return DeepWeightPrior(vaes), kernels, info


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


def _masked_minibatch(rng_key, x, y, n, batch: int):
    """``batch`` distinct examples drawn uniformly from the first ``n`` of ``x [N_max, ...]``
    (``n`` may be traced, so data sets of different sizes share one compiled step)."""
    scores = jax.random.uniform(rng_key, (x.shape[0],))
    scores = jnp.where(jnp.arange(x.shape[0]) < n, scores, 2.0)
    _, idx = jax.lax.top_k(-scores, batch)
    return x[idx], y[idx]


def bnn_loss(kind: str, net: ConvNet, priors, guide: AuxiliaryGuide, *, batch_size: int, local_reparam: bool = True):
    """``loss_fn(params, rng_key, data)``: minus ``L_aux`` (or the ELBO) of one data set.

    ``data = (images [N_max, 28, 28, 1], labels [N_max], n)``: the data set is the first
    ``n`` examples (padding beyond). The observation term ``n / B * sum_batch
    log p(y | x, W)`` is estimated on ``B = batch_size`` of them with the local
    reparameterisation trick (``local_reparam``) or one weight sample; the prior term
    is, for the deep weight prior, the pair's ELBO without the observations
    (:func:`~metaprior.inference.guides.auxiliary.latent_elbo`: minus the auxiliary
    upper bound on ``KL(q(W) || p(W))``), and for the baselines the closed-form (normal)
    or approximate (log-uniform) ``-KL(q || p)``.
    """
    _, body_static = eqx.partition(without_kernels(net), eqx.is_inexact_array)
    shapes = net.kernel_shapes
    sites = [kernel_sites(i).w for i in range(len(shapes))]

    def loss(params, rng_key, data):
        images, labels, n = data
        k_batch, k_lik, k_prior = jax.random.split(rng_key, 3)
        xb, yb = _masked_minibatch(k_batch, images, labels, n, batch_size)
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
        return -(log_lik + prior_term)

    return loss


def init_bnn_params(rng_key, kind: str, config: DWPConfig, guide: AuxiliaryGuide, prior: DeepWeightPrior):
    """Initial parameters of one Bayesian net.

    Kernel means: samples from the deep weight prior (decoder means) for ``"dwp"``, as the
    paper's code does; Xavier-normal for the baselines. Dense layer: Xavier-normal.
    """
    k_net, k_guide, k_prior = jax.random.split(rng_key, 3)
    net = ConvNet(filters=config.filters, kernel_sizes=config.kernel_sizes, key=k_net)
    if kind == "dwp":
        net = prior.init_net(k_prior, net, noise=False)
    params = {**guide.init_params(k_guide), **dwp_model_params(net)}
    for layer, conv in enumerate(net.convs):
        name = kernel_sites(layer).w + "_loc"
        params[name] = conv.weight.reshape(params[name].shape)
    return params


def kernel_moments(guide: AuxiliaryGuide, net: ConvNet, params) -> list[tuple[jax.Array, jax.Array]]:
    """``[(loc, scale)]`` of ``q`` for every conv layer, each ``[out, in, k, k]``."""
    moments = guide.moments(params)
    return [tuple(m.reshape(shape) for m in moments[kernel_sites(i).w]) for i, shape in enumerate(net.kernel_shapes)]


def predictive_accuracy(rng_key, net: ConvNet, head, moments, x, y, num_samples: int):
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
    return _accuracy(mean, y)


def fit_bnns(rng_key, kind: str, config: DWPConfig, prior: DeepWeightPrior, xs, ys, ns):
    """Variational inference for one prior on ``M`` stacked data sets at once.

    Args:
        xs, ys: ``[M, N_max, ...]``, ``[M, N_max]``; data set ``m`` is the first
            ``ns[m]`` examples.
        ns: ``[M]`` int sizes.

    Returns:
        ``(net, guide, params [M, ...], FitResult)``.
    """
    k_init, k_fit = jax.random.split(rng_key)
    num = xs.shape[0]
    net = ConvNet(filters=config.filters, kernel_sizes=config.kernel_sizes, key=jax.random.key(0))
    priors = make_priors(kind, prior)
    guide = build_guide(
        net, priors, prior=prior, init_log_scale=config.init_log_scale, init_logit_alpha=config.init_logit_alpha
    )
    init = eqx.filter_jit(jax.vmap(lambda k: init_bnn_params(k, kind, config, guide, prior)))
    params = init(jax.random.split(k_init, num))
    single = bnn_loss(kind, net, priors, guide, batch_size=config.batch_size, local_reparam=config.local_reparam)

    def loss(params, key, data):
        keys = jax.random.split(key, num)
        return jnp.sum(jax.vmap(single)(params, keys, data))

    learner = meta_learner(loss, optax.adam(config.learning_rate))
    result = fit(
        k_fit,
        learner,
        params,
        config.num_steps,
        data=(xs, ys, ns),
        steps_per_call=config.steps_per_call,
        desc=f"BNN, {kind} prior ({num} data sets)",
    )
    return net, guide, result.state.params, result


def bayesian_nets(rng_key, config: DWPConfig, prior: DeepWeightPrior, pool_x, pool_y, test_x, test_y, orders):
    """Step 3: every prior, every size and split (one :func:`fit` per prior).

    Returns:
        ``(accs, fits)``: ``accs[(kind, N)]`` the ``[num_splits]`` test accuracies;
        ``fits[kind] = (net, guide, params [len(sizes) * num_splits, ...])``, data set
        ``j * num_splits + s`` being size ``sizes[j]``, split ``s``.
    """
    sizes, splits = config.sizes, config.num_splits
    n_max = max(sizes)
    idx = np.concatenate([orders[:splits, :n_max]] * len(sizes))
    xs, ys = jnp.asarray(pool_x[idx]), jnp.asarray(pool_y[idx])
    ns = jnp.asarray(np.repeat(np.asarray(sizes), splits), jnp.int32)
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    arch = ConvNet(filters=config.filters, kernel_sizes=config.kernel_sizes, key=jax.random.key(0))
    # one compiled scorer for every prior: it sees only q's moments and the point estimates
    score = eqx.filter_jit(
        lambda keys, heads, moments: jax.lax.map(
            lambda a: predictive_accuracy(a[0], arch, a[1], a[2], test_x, test_y, config.num_eval_samples),
            (keys, heads, moments),
        )
    )
    accs, fits = {}, {}
    for i, kind in enumerate(PRIORS):
        key = jax.random.fold_in(rng_key, i)
        net, guide, params, _ = fit_bnns(key, kind, config, prior, xs, ys, ns)
        k_eval = jax.random.split(jax.random.fold_in(key, 7), xs.shape[0])
        moments = jax.vmap(lambda p: kernel_moments(guide, net, p))(params)
        acc = np.asarray(score(k_eval, params["net$params"], moments)).reshape(len(sizes), splits)
        for j, n in enumerate(sizes):
            accs[(kind, n)] = acc[j]
        fits[kind] = (net, guide, params)
    return accs, fits


# --------------------------------------------------------------------------- 4. initialisation


def init_curves(rng_key, config: DWPConfig, prior: DeepWeightPrior, pool_x, pool_y, test_x, test_y, orders):
    """Ordinary training from Xavier and from prior-sampled kernels.

    For each of ``init_splits`` training sets (the first ``init_train_size`` images of
    the split) the two runs share the dense layer and biases, the training set and the
    minibatch sequence; only the kernels differ. Both initialisations are trained
    together (stacked), with the training cut at every ``init_eval_steps`` to score the
    test set (resuming from a checkpoint, so the optimizer state carries over).

    Returns:
        ``{"dwp" | "xavier": [len(init_eval_steps), init_splits]}`` test accuracies.
    """
    m = config.init_splits
    idx = orders[:m, : config.init_train_size]
    x, y = jnp.asarray(pool_x[idx]), jnp.asarray(pool_y[idx])
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    k_net, k_prior, k_fit = jax.random.split(rng_key, 3)
    xavier = _make_nets(k_net, m, filters=config.filters, kernel_sizes=config.kernel_sizes)
    from_prior = eqx.filter_jit(jax.vmap(lambda k, n: prior.init_net(k, n, noise=False)))(
        jax.random.split(k_prior, m), xavier
    )
    nets = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), from_prior, xavier)
    batch = min(config.init_batch, config.init_train_size)

    def sample(key, data):  # the same minibatch for the two runs of a split
        xb, yb = jax.vmap(lambda k, a, b: _minibatch(k, a, b, batch))(jax.random.split(key, m), *data)
        return jnp.concatenate([xb, xb]), jnp.concatenate([yb, yb])

    def loss(nets, key, batch):
        xb, yb = batch
        return jnp.sum(jax.vmap(lambda n, a, b: _cross_entropy(_forward(n, a), b))(nets, xb, yb))

    learner = meta_learner(loss, optax.adam(config.init_lr))
    evaluate = eqx.filter_jit(lambda ns: jax.lax.map(lambda n: _accuracy(_forward(n, test_x), test_y), ns))
    accs = []
    with tempfile.TemporaryDirectory(prefix="dwp-init-") as tmp:
        ckpt = Path(tmp) / "init.ckpt"
        current = nets
        for step in config.init_eval_steps:
            if step > 0:
                res = fit(
                    k_fit,
                    learner,
                    nets,
                    step,
                    data=(x, y),
                    sample_batch=sample,
                    steps_per_call=config.steps_per_call,
                    checkpoint=ckpt,
                    checkpoint_every=10**9,
                    desc=f"init dwp vs xavier (to step {step})",
                )
                current = res.state.params
            accs.append(np.asarray(evaluate(current)))
    accs = np.stack(accs)  # [steps, 2m]
    return {"dwp": accs[:, :m], "xavier": accs[:, m:]}


def paired_win_rate(first, second) -> float:
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


# --------------------------------------------------------------------------- plots and posterior


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_size(accs, sizes, out_dir) -> None:
    """The paper's Figure 2: test accuracy against training-set size, per prior."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = {"dwp": "deep weight prior", "normal": "standard normal", "loguniform": "log-uniform"}
    for i, kind in enumerate(PRIORS):
        mean, std = zip(*(_mean_std(accs[(kind, n)]) for n in sizes))
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=labels[kind], color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.set_xlabel("MNIST training examples")
    ax.set_ylabel("test accuracy (posterior predictive)")
    ax.set_title("Bayesian conv net, prior over kernels (mean +- std over splits)")
    ax.legend()
    save_figure(fig, out_dir, "accuracy_vs_size.png")


def plot_prior_samples(rng_key, prior: DeepWeightPrior, kernels: Sequence[np.ndarray], out_dir, num: int = 36) -> None:
    """The paper's Figure 1c: real source kernels beside samples from the learned prior."""
    plt = _plt()
    layers = len(prior.vaes)
    side = int(np.sqrt(num))
    fig, axes = plt.subplots(layers, 2, figsize=(7, 3.6 * layers), squeeze=False)
    for layer in range(layers):
        k_real, k_samp = jax.random.split(jax.random.fold_in(rng_key, layer))
        real = np.asarray(kernels[layer])
        pick = np.asarray(jax.random.choice(k_real, real.shape[0], (min(num, real.shape[0]),), replace=False))
        samples = np.asarray(prior.vaes[layer].sample(k_samp, num))
        for ax, group, title in (
            (axes[layer][0], real[pick], "source kernels (notMNIST nets)"),
            (axes[layer][1], samples, "samples from the prior"),
        ):
            k = group.shape[-1]
            canvas = np.full((side * (k + 1) - 1, side * (k + 1) - 1), np.nan)
            for t, w in enumerate(group[: side * side]):
                r, c = divmod(t, side)
                w = w / (np.abs(w).max() + 1e-8)
                canvas[r * (k + 1) : r * (k + 1) + k, c * (k + 1) : c * (k + 1) + k] = w
            ax.imshow(canvas, cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(f"layer {layer} ({k}x{k}): {title}", fontsize=9)
            ax.axis("off")
    save_figure(fig, out_dir, "prior_samples.png")


def plot_init_curves(curves, steps, out_dir) -> None:
    """The paper's Figure 4: test accuracy against training steps, by initialisation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, label) in enumerate((("dwp", "kernels from the deep weight prior"), ("xavier", "Xavier"))):
        acc = curves[name]
        mean, std = zip(*(_mean_std(row) for row in acc))
        ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=label, color=f"C{i}")
    ax.set_xlabel("training steps (Adam)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Ordinary training: initialisation (mean +- std over splits)")
    ax.legend()
    save_figure(fig, out_dir, "init_convergence.png")


def posterior_datatree(rng_key, fits, num_samples: int, member: int = 0):
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


# --------------------------------------------------------------------------- run


def run(rng_key, config: DWPConfig, out_dir: Path) -> dict[str, float]:
    """All four steps; writes ``dwp_prior.npz``, three plots and ``posterior.nc``."""
    _check(config)
    out_dir = Path(out_dir)
    data_dir = config.data_dir or None
    k_prior, k_bnn, k_init, k_plot, k_post = jax.random.split(rng_key, 5)
    prior, kernels, info = learn_prior(k_prior, config, data_dir)
    prior.save(
        out_dir / "dwp_prior.npz",
        metadata={
            "source": "notMNIST (9,000 of the 10,000 test images)",
            "num_source_nets": config.num_source_nets,
            "source_filters": list(config.source_filters),
            "kernel_sizes": list(config.kernel_sizes),
            "min_kernel_norm": config.min_kernel_norm,
        },
    )
    metrics: dict[str, float] = {k: v for k, v in info.items() if not k.endswith("_losses")}

    pool_x, pool_y, test_x, test_y, orders = mnist_splits(config, data_dir)
    start = time.perf_counter()
    accs, fits = bayesian_nets(k_bnn, config, prior, pool_x, pool_y, test_x, test_y, orders)
    metrics["time_bnn_s"] = time.perf_counter() - start
    for (kind, n), acc in accs.items():
        metrics[f"acc_{kind}_n{n}"], metrics[f"acc_{kind}_n{n}_std"] = _mean_std(acc)
    for n in config.sizes:
        for base in ("normal", "loguniform"):
            metrics[f"dwp_minus_{base}_n{n}"] = metrics[f"acc_dwp_n{n}"] - metrics[f"acc_{base}_n{n}"]

    start = time.perf_counter()
    curves = init_curves(k_init, config, prior, pool_x, pool_y, test_x, test_y, orders)
    metrics["time_init_s"] = time.perf_counter() - start
    for name, acc in curves.items():
        for step, row in zip(config.init_eval_steps, acc):
            metrics[f"init_{name}_acc_at_step{step}"], metrics[f"init_{name}_acc_at_step{step}_std"] = _mean_std(row)
    for step, a, b in zip(config.init_eval_steps, curves["dwp"], curves["xavier"]):
        metrics[f"init_dwp_wins_at_step{step}"] = paired_win_rate(a, b)

    plot_accuracy_vs_size(accs, config.sizes, out_dir)
    plot_prior_samples(k_plot, prior, kernels, out_dir)
    plot_init_curves(curves, config.init_eval_steps, out_dir)
    tree = posterior_datatree(k_post, fits, config.posterior_samples)
    save_datatree(tree, out_dir / "posterior.nc")
    return metrics


METRICS_DOC = """
acc_{dwp,normal,loguniform}_n{N}: test accuracy of the posterior predictive, mean over data splits (N = MNIST
    training examples), plus _std over splits
dwp_minus_{normal,loguniform}_n{N}: acc_dwp_n{N} minus the baseline's
init_{dwp,xavier}_acc_at_step{S}: test accuracy after S steps of ordinary training from prior-sampled kernels /
    Xavier, mean over splits, plus _std
init_dwp_wins_at_step{S}: fraction of splits in which the prior-sampled run is ahead of its paired Xavier run at
    step S
source_acc, source_acc_std: held-out notMNIST accuracy of the source nets
num_source_kernels_l{L}, num_dropped_kernels_l{L}: source kernels of conv layer L kept / dropped for small norm
vae_l{L}_elbo_init, vae_l{L}_elbo_final: held-out per-kernel ELBO (nats) of layer L's VAE before / after training
prior_snr_l{L}: median over z ~ p(z) of |decoder mean| / |decoder sd| (kernel norms) of layer L's prior; below 1 its
    draws are mostly noise
time_source_s, time_vae_s, time_bnn_s, time_init_s: wall time of each step
"""

EXPERIMENTS = [
    Experiment(
        name="dwp-mnist",
        description="deep weight prior: VAE prior over conv kernels from notMNIST nets, Bayesian nets on small MNIST",
        make_config=make_config,
        run=run,
        metrics_doc=METRICS_DOC,
    )
]
