"""The deep weight prior's source pipeline (Atanov et al. 2019, steps 1 and 2), and the
settings of the whole pipeline (:class:`DWPSettings`).

1. *Source kernels* (:func:`train_source_nets`): ``num_source_nets`` copies of the
   paper's MNIST network (:class:`metaprior.models.dwp.ConvNet`, different seeds,
   L2-regularised) trained on a source data set; the 2-D kernels of each conv layer,
   those of small norm dropped.
2. *The prior* (:func:`learn_prior`): one kernel VAE per conv layer
   (:func:`train_kernel_vae`); together the deep weight prior
   (:class:`metaprior.models.dwp.DeepWeightPrior`).

Steps 3 and 4 (Bayesian nets under each prior, initialisation from the prior) are in
:mod:`metaprior.inference.dwp`. All training goes through
:func:`metaprior.inference.meta.fit`; stacked members (source nets, data sets) are
trained together with ``vmap``, the loss being the sum of theirs, which with Adam
(elementwise) equals separate runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike

from metaprior.inference.meta import FitResult, fit, meta_learner
from metaprior.models.dwp import (
    ConvNet,
    DeepWeightPrior,
    KernelVAE,
    collect_kernels,
    conv2d_im2col,
    decoder_snr,
    drop_small_kernels,
    kernel_vae_elbo,
)

__all__ = [
    "DWPSettings",
    "checkpoint_kw",
    "train_source_nets",
    "train_kernel_vae",
    "learn_prior",
    "heldout_elbo",
    "gaussian_loglik",
    "neighbour_correlation",
    "mean_std",
]


@dataclasses.dataclass(frozen=True)
class DWPSettings:
    """Sizes of every step (defaults: the paper's; ``metaprior run dwp-mnist`` extends it
    with its data protocol).

    Attributes:
        sizes, num_splits: training-set sizes of the Bayesian nets and data splits per size.
        num_source_nets, source_filters, kernel_sizes, source_steps, source_batch,
            source_lr, source_l2: the source nets (``l2 / 2 * ||W||^2`` on kernels and the
            dense layer).
        min_kernel_norm: source kernels of smaller Frobenius norm are dropped.
        latent_dims, vae_hidden, vae_steps, vae_batch, vae_lr: the kernel VAEs.
        filters, num_steps, batch_size, learning_rate, local_reparam, init_log_scale,
            init_logit_alpha: the Bayesian nets and their variational inference.
        lr_schedule: the Bayesian nets' Adam step size over ``num_steps``: ``"constant"``, or
            ``"linear"`` (decayed linearly to 0, as the authors' ``train-bnn.py`` does).
        scale_lr: Adam step size of q's ``*_log_scale`` parameters (0: ``learning_rate``;
            the normal and deep weight priors' q; the log-uniform prior's ``logit_alpha``
            keeps ``learning_rate``).
            Adam moves a parameter by about its step size per step, so from the
            initial log scale of -5 at 1e-3 the scales can reach the prior's (about
            e^-3) only after thousands of steps; a larger step for them alone lets
            a short run get there.
        kl_weight: the weight of the prior term (``-KL``, or the auxiliary bound's prior part)
            in the Bayesian nets' objective; 1 is the ELBO, the paper's objective. Below 1 it
            is a tempered posterior, a lever to measure (the authors' results notebook
            groups its runs by a ``kl_weight`` column that the released code lacks), not a
            Bayesian default.
        freeze_encoder: keep ``r(z | w)`` at the prior VAE's encoder (the authors' code)
            instead of training it with ``q`` (the paper's Algorithm 1).
        num_eval_samples: weight draws of the posterior predictive.
        posterior_samples: draws in the ArviZ file.
        init_train_size, init_splits, init_eval_steps, init_batch, init_lr: the
            initialisation experiment.
        steps_per_call: optimizer steps per compiled call.
        checkpoint_every: steps between the checkpoints of every training run, when the
            steps are given a ``checkpoint_dir`` (a killed run resumes from them).
        source: where the prior's kernels come from: ``"nets"`` (source nets trained here)
            or ``"released"`` (the authors' released kernels, ``dwp-kernels/``).
        kernel_augment: ``"dihedral"`` trains each kernel VAE on its training kernels' eight
            rotations and reflections (the held-out kernels and the per-position Gaussian
            baseline stay unaugmented); ``"none"`` (default) trains on the kernels as they are.
    """

    sizes: tuple[int, ...] = (50, 100, 500, 1000)
    num_splits: int = 10
    num_source_nets: int = 10
    source_filters: tuple[int, ...] = (32, 128)
    kernel_sizes: tuple[int, ...] = (7, 5)
    source_steps: int = 3000
    source_batch: int = 128
    source_lr: float = 1e-3
    source_l2: float = 1e-3
    min_kernel_norm: float = 1e-2
    latent_dims: tuple[int, ...] = (2, 4)
    vae_hidden: tuple[int, ...] = (64, 64)
    vae_steps: int = 10000
    vae_batch: int = 256
    vae_lr: float = 1e-3
    filters: tuple[int, ...] = (32, 128)
    num_steps: int = 10000
    batch_size: int = 50
    learning_rate: float = 1e-3
    local_reparam: bool = True
    init_log_scale: float = -5.0
    init_logit_alpha: float = -2.0
    lr_schedule: str = "constant"
    freeze_encoder: bool = False
    kl_weight: float = 1.0
    scale_lr: float = 0.0
    num_eval_samples: int = 10
    posterior_samples: int = 50
    init_train_size: int = 5000
    init_splits: int = 5
    init_eval_steps: tuple[int, ...] = (0, 50, 100, 200, 500, 1000, 2000)
    init_batch: int = 64
    init_lr: float = 1e-3
    steps_per_call: int = 25
    checkpoint_every: int = 500
    source: str = "nets"
    kernel_augment: str = "none"

    def __post_init__(self):
        if not self.kl_weight >= 0:  # also rejects NaN
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.kernel_augment not in ("none", "dihedral"):
            raise ValueError(f"kernel_augment must be 'none' or 'dihedral', got {self.kernel_augment!r}")


def mean_std(values: ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def minibatch(rng_key: jax.Array, x: jax.Array, y: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """``batch`` examples without replacement (all of them if ``batch >= N``)."""
    n = x.shape[0]
    if batch >= n:
        return x, y
    idx = jax.random.permutation(rng_key, n)[:batch]
    return x[idx], y[idx]


def shared_minibatch(batch: int, num: int) -> Callable:
    """``sample_batch`` for one data set ``(x [N, ...], y [N])`` shared by ``num`` stacked
    members: an independent batch for each, ``(x [num, batch, ...], y [num, batch])``."""

    def sample(rng_key, data):
        x, y = data
        keys = jax.random.split(rng_key, num)
        return jax.vmap(lambda k: minibatch(k, x, y, batch))(keys)

    return sample


def forward(net: ConvNet, x: jax.Array) -> jax.Array:
    """``net(x)`` with the im2col convolution (fast when vmapped over stacked nets)."""
    return net.apply(x, [c.weight for c in net.convs], conv=conv2d_im2col)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def make_nets(rng_key: jax.Array, num: int, *, filters: Sequence[int], kernel_sizes: Sequence[int]) -> ConvNet:
    """``num`` networks with their arrays stacked on a leading axis."""
    return jax.vmap(lambda k: ConvNet(filters=filters, kernel_sizes=kernel_sizes, key=k))(
        jax.random.split(rng_key, num)
    )


# --------------------------------------------------------------------------- 1. source nets


def source_net_loss(l2: float) -> Callable[[ConvNet, jax.Array, tuple], jax.Array]:
    """``loss_fn(nets, rng_key, batch)``: sum over stacked nets of mean cross-entropy +
    ``l2 / 2 * ||weights||^2`` (kernels and dense weights, not biases)."""

    def one(net, x, y):
        sq = sum(jnp.sum(c.weight**2) for c in net.convs) + jnp.sum(net.head.weight**2)
        return cross_entropy(forward(net, x), y) + 0.5 * l2 * sq

    def loss(nets, rng_key, batch):
        x, y = batch
        return jnp.sum(jax.vmap(one)(nets, x, y))

    return loss


def checkpoint_kw(settings: DWPSettings, checkpoint_dir: str | os.PathLike | None, name: str) -> dict[str, Any]:
    """:func:`fit`'s checkpoint arguments for the training run ``name`` (``{name}.ckpt`` in
    ``checkpoint_dir``; none without one)."""
    if checkpoint_dir is None:
        return {}
    return dict(checkpoint=Path(checkpoint_dir) / f"{name}.ckpt", checkpoint_every=settings.checkpoint_every)


def train_source_nets(
    rng_key: jax.Array,
    settings: DWPSettings,
    x: jax.Array,
    y: jax.Array,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[ConvNet, FitResult]:
    """Train ``num_source_nets`` nets on notMNIST (stacked); returns ``(nets, FitResult)``.
    With ``checkpoint_dir``, training checkpoints to ``source_nets.ckpt`` there and resumes from it."""
    k_init, k_fit = jax.random.split(rng_key)
    m = settings.num_source_nets
    nets = make_nets(k_init, m, filters=settings.source_filters, kernel_sizes=settings.kernel_sizes)
    learner = meta_learner(source_net_loss(settings.source_l2), optax.adam(settings.source_lr))
    result = fit(
        k_fit,
        learner,
        nets,
        settings.source_steps,
        data=(x, y),
        sample_batch=shared_minibatch(settings.source_batch, m),
        steps_per_call=settings.steps_per_call,
        desc="source nets (notMNIST)",
        **checkpoint_kw(settings, checkpoint_dir, "source_nets"),
    )
    return result.state.params, result


# --------------------------------------------------------------------------- 2. kernel VAEs


def vae_loss(vae: KernelVAE, rng_key: jax.Array, kernels: jax.Array) -> jax.Array:
    """Negative mean per-kernel ELBO of a batch of kernels ``[B, k, k]``."""
    return -jnp.mean(kernel_vae_elbo(rng_key, vae, kernels))


def heldout_elbo(rng_key: jax.Array, vae: KernelVAE, kernels: jax.Array, num_samples: int = 8) -> float:
    """Mean per-kernel ELBO of ``kernels`` (averaged over ``num_samples`` draws of z)."""
    keys = jax.random.split(rng_key, num_samples)
    return float(jnp.mean(jax.vmap(lambda k: kernel_vae_elbo(k, vae, kernels))(keys)))


def train_kernel_vae(
    rng_key: jax.Array,
    settings: DWPSettings,
    kernels: np.ndarray,
    layer: int,
    heldout: np.ndarray | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> tuple[KernelVAE, dict[str, Any]]:
    """Train the VAE of one layer on 90% of its kernels and score the rest, or, with
    ``heldout``, train on all of ``kernels`` and score ``heldout``. With ``checkpoint_dir``,
    training checkpoints to ``vae_l{layer}.ckpt`` there and resumes from it.

    Returns:
        ``(vae, info)`` with ``info = dict(num_kernels, elbo_init, elbo_final, losses)``:
        held-out per-kernel ELBO before and after training.
    """
    k_perm, k_init, k_fit, k_eval = jax.random.split(rng_key, 4)
    perm = np.asarray(jax.random.permutation(k_perm, kernels.shape[0]))
    cut = min(len(perm) - 1, max(1, int(0.9 * len(perm))))
    train, held = jnp.asarray(kernels[perm[:cut]]), jnp.asarray(kernels[perm[cut:]])
    if heldout is not None:
        train, held = jnp.asarray(kernels), jnp.asarray(heldout)
    baseline = gaussian_loglik(np.asarray(train), np.asarray(held))
    suffix = ""  # the checkpoint's name tells the training data apart: no resume across it
    if settings.kernel_augment == "dihedral":
        train, suffix = dihedral(train), "_dihedral"
    vae = KernelVAE(settings.kernel_sizes[layer], settings.latent_dims[layer], settings.vae_hidden, key=k_init)
    before = heldout_elbo(k_eval, vae, held)
    batch = min(settings.vae_batch, train.shape[0])

    def sample(key, data):
        return data[jax.random.randint(key, (batch,), 0, data.shape[0])]

    result = fit(
        k_fit,
        meta_learner(vae_loss, optax.adam(settings.vae_lr)),
        vae,
        settings.vae_steps,
        data=train,
        sample_batch=sample,
        steps_per_call=settings.steps_per_call,
        desc=f"kernel VAE, layer {layer}",
        **checkpoint_kw(settings, checkpoint_dir, f"vae_l{layer}" + suffix),
    )
    vae = result.state.params
    after = heldout_elbo(k_eval, vae, held)
    info = dict(num_kernels=int(kernels.shape[0]), elbo_init=before, elbo_final=after, losses=result.losses)
    info["gaussian_loglik"] = baseline
    return vae, info


def dihedral(kernels: jax.Array) -> jax.Array:
    """The eight rotations and reflections of each kernel ``[n, k, k]`` -> ``[8 n, k, k]``
    (the identity first)."""
    rots = [jnp.rot90(kernels, r, axes=(-2, -1)) for r in range(4)]
    return jnp.concatenate(rots + [jnp.flip(r, axis=-1) for r in rots])


def gaussian_loglik(train: np.ndarray, held: np.ndarray) -> float:
    """Mean per-kernel log-likelihood of ``held [m, k, k]`` under independent Gaussians per
    weight position fitted to ``train [n, k, k]`` (the baseline a kernel VAE must beat)."""
    mu, sd = train.mean(0), train.std(0) + 1e-8
    z = (held - mu) / sd
    return float(np.mean(np.sum(-0.5 * z**2 - np.log(sd) - 0.5 * np.log(2 * np.pi), axis=(1, 2))))


def neighbour_correlation(kernels: np.ndarray) -> float:
    """Correlation of horizontally and vertically adjacent weights, pooled over ``kernels
    [n, k, k]`` after removing each position's mean (structure a prior over kernels can use;
    near 0 for kernels that are noise around their initialisation)."""
    w = np.asarray(kernels, np.float64)
    w = w - w.mean(0)
    a = np.concatenate([w[:, :, :-1].ravel(), w[:, :-1, :].ravel()])
    b = np.concatenate([w[:, :, 1:].ravel(), w[:, 1:, :].ravel()])
    return float(np.corrcoef(a, b)[0, 1])


def learn_prior(
    rng_key: jax.Array, settings: DWPSettings, source: Sequence, *, checkpoint_dir: str | os.PathLike | None = None
) -> tuple[DeepWeightPrior, list[np.ndarray], dict[str, Any]]:
    """Steps 1 and 2: source kernels, one VAE per layer.

    With ``checkpoint_dir``, each training run (source nets, each VAE) checkpoints there
    and resumes from it: a killed and rerun call ends with the same prior.

    Args:
        source: with ``settings.source == "nets"``, ``(train_x, train_y, val_x, val_y)``: the
            source nets' images ``[N, 28, 28, 1]`` and labels, and a held-out part to score
            them; with ``"released"``, the released kernels of each layer
            (:func:`metaprior.data.dwp_kernels.load_released_kernels`): a layer with a
            ``"train"`` part trains on it and is scored on ``"test"``, one with ``"test"``
            only is split 90/10.

    Returns:
        ``(prior, kernels_per_layer, info)``; ``info`` holds timings and diagnostics.
    """
    if settings.source not in ("nets", "released"):
        raise ValueError(f"settings.source must be 'nets' or 'released', got {settings.source!r}")
    k_src, k_vae = jax.random.split(rng_key)
    info: dict[str, Any] = {}
    if settings.source == "nets":
        sx, sy, vx, vy = source
        start = time.perf_counter()
        nets, src_fit = train_source_nets(k_src, settings, jnp.asarray(sx), jnp.asarray(sy), checkpoint_dir)
        vx, vy = jnp.asarray(vx), jnp.asarray(vy)
        acc = eqx.filter_jit(lambda ns: jax.lax.map(lambda n: accuracy(forward(n, vx), vy), ns))(nets)
        info["time_source_s"] = time.perf_counter() - start
        info["source_acc"], info["source_acc_std"] = float(jnp.mean(acc)), float(jnp.std(acc))
        layers = [(collect_kernels(nets, layer), None) for layer in range(len(settings.kernel_sizes))]
    else:
        if len(source) != len(settings.kernel_sizes):
            raise ValueError(
                f"source has {len(source)} layers of kernels, settings.kernel_sizes {settings.kernel_sizes}"
            )
        layers = [(d["train"], d["test"]) if "train" in d else (d["test"], None) for d in source]
    start = time.perf_counter()
    vaes, kernels = [], []
    for layer, (raw, heldout) in enumerate(layers):
        kept = drop_small_kernels(raw, settings.min_kernel_norm)
        if kept.shape[0] < 2:
            raise RuntimeError(
                f"layer {layer}: only {kept.shape[0]} source kernels have norm >= "
                f"{settings.min_kernel_norm}; lower min_kernel_norm"
            )
        vae, vinfo = train_kernel_vae(jax.random.fold_in(k_vae, layer), settings, kept, layer, heldout, checkpoint_dir)
        vaes.append(vae)
        kernels.append(kept)
        info[f"num_source_kernels_l{layer}"] = vinfo["num_kernels"]
        info[f"num_dropped_kernels_l{layer}"] = int(raw.shape[0] - kept.shape[0])
        info[f"vae_l{layer}_elbo_init"] = vinfo["elbo_init"]
        info[f"vae_l{layer}_elbo_final"] = vinfo["elbo_final"]
        info[f"vae_l{layer}_gain_over_gaussian"] = vinfo["elbo_final"] - vinfo["gaussian_loglik"]
        info[f"kernel_corr_l{layer}"] = neighbour_correlation(kept)
        info[f"prior_snr_l{layer}"] = decoder_snr(jax.random.fold_in(k_vae, 1000 + layer), vae.decoder, vae.latent_dim)
        info[f"vae_l{layer}_losses"] = vinfo["losses"]
    info["time_vae_s"] = time.perf_counter() - start
    return DeepWeightPrior(vaes), kernels, info
