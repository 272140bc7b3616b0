"""``metaprior run dwp-mnist``: the deep weight prior, notMNIST kernels -> MNIST.

Atanov et al. (2019)'s MNIST experiments with :mod:`metaprior.inference.dwp`: source
kernels from nets trained on notMNIST (or the authors' released kernels, ``source=released``),
one kernel VAE per layer (``dwp_prior.npz``), Bayesian nets on little MNIST data under the
deep weight, normal and log-uniform priors (Figure 2), prior-sampled init vs Xavier (Figure 4).

Data. Only the 10,000-image test sets of MNIST and notMNIST are available. notMNIST: a fixed
permutation gives 9,000 images to train the source nets and 1,000 to check them. MNIST: a fixed
permutation (key ``split_seed``, independent of ``--seed``) gives a pool of the first 5,000 images
and a held-out test part of the last 5,000 (the first ``test_size`` of which are scored). Training
sets come from the pool only: for data split ``s`` a permutation of the pool (key ``fold_in(split_seed,
1 + s)``), whose first N images form the training set of size N (``stratify``: reordered so that each
has N / 10 images per class, as the authors' code stratifies). So every training set is disjoint from
the test part, and for one split the sizes are nested. Every prior's term is weighted by ``kl_weight``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from metaprior.data.dwp_kernels import load_released_kernels
from metaprior.experiments._common import save_datatree
from metaprior.experiments._plots import errorbar_figure, prior_samples_figure
from metaprior.experiments._registry import ConfigError, Experiment
from metaprior.inference.dwp import (
    PRIORS,
    DWPSettings,
    bayesian_nets,
    init_curves,
    learn_prior,
    mean_std,
    paired_win_rate,
    posterior_datatree,
    posterior_diagnostics,
)

__all__ = ["PRIORS", "DWPConfig", "make_config", "source_data", "mnist_splits", "run"]


@dataclasses.dataclass(frozen=True)
class DWPConfig(DWPSettings):
    """The pipeline's sizes (:class:`~metaprior.inference.dwp_source.DWPSettings`; ``num_steps``,
    what ``--steps`` sets, is per Bayesian net) and the data protocol."""

    kl_weight: float = 0.01  # every prior's; at the ELBO's 1 the DWP collapses the 5x5 kernels (benchmarks/README.md)
    data_dir: str = ""  # "" -> $METAPRIOR_DATA
    split_seed: int = 0
    test_size: int = 5000
    stratify: bool = True


def make_config(size: str) -> DWPConfig:
    """``"quick"``: a smoke test (3x3 kernels, a few steps; numbers meaningless).
    ``"default"``: the paper's kernels and target net at N = 50, 100, smaller source nets,
    fewer steps (17 minutes on 2 CPU cores). ``"full"``: the paper's (10 splits, 10,000 steps)."""
    if size == "quick":
        return DWPConfig(
            sizes=(20, 40), num_splits=2, test_size=100, num_source_nets=2, source_filters=(4, 4),
            kernel_sizes=(3, 3), latent_dims=(2, 2), source_steps=10, source_batch=16, vae_hidden=(8,),
            vae_steps=20, filters=(2, 4), num_steps=10, batch_size=10, num_eval_samples=2,
            posterior_samples=4, init_train_size=100, init_splits=2, init_eval_steps=(0, 5), init_batch=16,
            steps_per_call=5, min_kernel_norm=1e-3,
        )  # fmt: skip
    if size == "default":
        # the paper's target net; `--set sizes=50,100,500,1000` adds sizes (benchmarks/README.md)
        return DWPConfig(
            sizes=(50, 100),
            num_splits=5,
            test_size=1000,
            source_filters=(16, 32),
            source_steps=1500,
            source_batch=32,
            kernel_augment="dihedral",
            vae_hidden=(64, 64),
            vae_steps=10000,
            filters=(32, 128),
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
    if config.source not in ("nets", "released"):
        raise ConfigError(f"config.source must be 'nets' or 'released', got {config.source!r}")
    if config.lr_schedule not in ("constant", "linear"):
        raise ConfigError(f"config.lr_schedule must be 'constant' or 'linear', got {config.lr_schedule!r}")
    for name in ("source_filters", "filters", "latent_dims"):
        if len(getattr(config, name)) != n:
            raise ConfigError(f"config.{name} has {len(getattr(config, name))} entries, config.kernel_sizes has {n}")
    if max(config.sizes) > 5000 or config.init_train_size > 5000:
        raise ConfigError(
            f"sizes {config.sizes} / init_train_size {config.init_train_size} exceed the 5,000-image pool"
        )
    if not 1 <= config.test_size <= 5000:
        raise ConfigError(f"config.test_size must be in 1..5000, got {config.test_size}")
    if config.batch_size > min(config.sizes):
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the smallest training set {min(config.sizes)}"
        )
    if config.num_splits < 1 or config.init_splits < 1 or config.num_source_nets < 1:
        raise ConfigError("config.num_splits, init_splits and num_source_nets must be >= 1")
    if sorted(config.init_eval_steps) != list(config.init_eval_steps) or min(config.init_eval_steps) < 0:
        raise ConfigError(f"config.init_eval_steps must be increasing and >= 0, got {config.init_eval_steps}")


def source_data(data_dir: str | None = None):
    """notMNIST: ``(train_x [9000, 28, 28, 1], train_y, val_x [1000, ...], val_y)``."""
    from metaprior.data import load_notmnist

    x, y = load_notmnist("test", data_dir)
    perm = np.asarray(jax.random.permutation(jax.random.key(0), x.shape[0]))
    cut = x.shape[0] - x.shape[0] // 10
    train, val = perm[:cut], perm[cut:]
    return x[train], y[train], x[val], y[val]


def mnist_splits(config: DWPConfig, data_dir: str | None = None):
    """MNIST pool and held-out test part (module docstring): ``(pool_x [5000, 28, 28, 1], pool_y,
    test_x [test_size, ...], test_y, orders [splits, 5000])``, ``orders[s, :N]`` the pool images
    of split ``s``'s training set of size N."""
    from metaprior.data import balanced_order, load_mnist

    x, y = load_mnist("test", data_dir)
    key = jax.random.key(config.split_seed)
    perm = np.asarray(jax.random.permutation(key, x.shape[0]))
    half = x.shape[0] // 2
    pool, test = perm[:half], perm[half:][: config.test_size]
    num = max(config.num_splits, config.init_splits)
    orders = np.stack([np.asarray(jax.random.permutation(jax.random.fold_in(key, 1 + s), half)) for s in range(num)])
    if config.stratify:  # class-balanced prefixes, as the authors' code splits
        orders = np.stack([balanced_order(o, y[pool]) for o in orders])
    return x[pool], y[pool], x[test], y[test], orders


def run(rng_key, config: DWPConfig, out_dir: Path) -> dict[str, float]:
    """All four steps; writes ``dwp_prior.npz``, three plots and ``posterior.nc``."""
    _check(config)
    out_dir = Path(out_dir)
    data_dir = config.data_dir or None
    k_prior, k_bnn, k_init, k_plot, k_post = jax.random.split(rng_key, 5)
    released = config.source == "released"
    source = load_released_kernels(data_dir, config.kernel_sizes) if released else source_data(data_dir)
    prior, kernels, info = learn_prior(k_prior, config, source, checkpoint_dir=out_dir)
    prior.save(
        out_dir / "dwp_prior.npz",
        metadata={
            "source": "released kernels (dwp-kernels/)" if released else "notMNIST (9,000 of the 10,000 test images)",
            "num_source_nets": config.num_source_nets,
            "source_filters": list(config.source_filters),
            "kernel_sizes": list(config.kernel_sizes),
            "min_kernel_norm": config.min_kernel_norm,
        },
    )
    metrics: dict[str, float] = {k: v for k, v in info.items() if not k.endswith("_losses")}

    pool_x, pool_y, test_x, test_y, orders = mnist_splits(config, data_dir)
    start = time.perf_counter()
    accs, fits = bayesian_nets(k_bnn, config, prior, pool_x, pool_y, test_x, test_y, orders, checkpoint_dir=out_dir)
    metrics["time_bnn_s"] = time.perf_counter() - start
    for (kind, n), acc in accs.items():
        metrics[f"acc_{kind}_n{n}"], metrics[f"acc_{kind}_n{n}_std"] = mean_std(acc)
    for n in config.sizes:
        for base in ("normal", "loguniform"):
            metrics[f"dwp_minus_{base}_n{n}"] = metrics[f"acc_dwp_n{n}"] - metrics[f"acc_{base}_n{n}"]
    metrics.update(posterior_diagnostics(jax.random.fold_in(k_bnn, 9), config, prior, fits), kl_weight=config.kl_weight)

    start = time.perf_counter()
    curves = init_curves(k_init, config, prior, pool_x, pool_y, test_x, test_y, orders, checkpoint_dir=out_dir)
    metrics["time_init_s"] = time.perf_counter() - start
    for name, acc in curves.items():
        for step, row in zip(config.init_eval_steps, acc):
            metrics[f"init_{name}_acc_at_step{step}"], metrics[f"init_{name}_acc_at_step{step}_std"] = mean_std(row)
    for step, a, b in zip(config.init_eval_steps, curves["dwp"], curves["xavier"]):
        metrics[f"init_dwp_wins_at_step{step}"] = paired_win_rate(a, b)

    sizes, steps = config.sizes, config.init_eval_steps
    labels = {"dwp": "deep weight prior", "normal": "standard normal", "loguniform": "log-uniform"}
    series = {labels[kind]: (sizes, [accs[(kind, n)] for n in sizes]) for kind in PRIORS}
    title = "Bayesian conv net, prior over kernels (mean +- std over splits)"
    ylabel = "test accuracy (posterior predictive)"
    errorbar_figure(
        series, out_dir, "accuracy_vs_size.png", xlabel="MNIST training examples", ylabel=ylabel, title=title, logx=True
    )
    prior_samples_figure(k_plot, prior, kernels, out_dir)
    series = {"kernels from the deep weight prior": (steps, curves["dwp"]), "Xavier": (steps, curves["xavier"])}
    title = "Ordinary training: initialisation (mean +- std over splits)"
    errorbar_figure(
        series, out_dir, "init_convergence.png", xlabel="training steps (Adam)", ylabel="test accuracy", title=title
    )
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
vae_l{L}_gain_over_gaussian: held-out ELBO minus the log-likelihood of independent per-weight Gaussians (nats)
kernel_corr_l{L}: correlation of adjacent weights in layer L's source kernels (position means removed)
prior_snr_l{L}: median over z ~ p(z) of |decoder mean| / |decoder sd| (kernel norms) of layer L's prior (the
    authors' priors: about 1.5 for 7x7, 0.92 for 5x5)
q_mean_kernel_share_{prior}_l{L}: share of layer L's posterior kernel means in their mean (1: one kernel), all N
dwp_bound_gap_l{L}: importance-weighted log p(w) minus the auxiliary bound at DWP posterior means, smallest N (nats)
prior_vi_share_l{L}: the same share after mean-field VI under layer L's deep weight prior alone, without data
time_source_s, time_vae_s, time_bnn_s, time_init_s: wall time of each step; kl_weight: of every prior's term (1: ELBO)
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
