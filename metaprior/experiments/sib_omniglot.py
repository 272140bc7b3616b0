"""``metaprior run sib-omniglot``: empirical Bayes with synthetic gradients on Omniglot.

Reproduces the central claim of Hu et al. (2020) on our data: a few steps of the
transductive synthetic-gradient inner loop (``T > 0``) classify better than the
amortized initialisation alone (``T = 0``). Steps:

1. pretrain a :class:`~metaprior.models.nets.Conv4` by ordinary classification on the
   meta-training classes (Omniglot small background sets split by alphabet, training
   alphabets rotated), then fix it and embed every image;
2. for each of 1-shot and 5-shot and each ``T`` in ``inner_steps``, meta-train SIB
   (prior, ``lambda``, ``xi``, temperature) from the same initial values on the ELBO
   of the query labels;
3. score all of them on the *same* 600 test episodes (unseen alphabet(s)), so the
   differences between ``T`` values are paired.

Pretraining and every meta-training run keep a checkpoint in the output folder
(``pretrain.ckpt``, ``sib_5w1s_T3.ckpt``...): a run stopped part-way resumes there, and
a second run into the same folder with a larger ``num_steps`` continues training (the
times then count only what that invocation ran).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaprior.data import omniglot_splits, sample_episodes
from metaprior.experiments._common import mean_ci95, save_datatree, save_figure
from metaprior.experiments._plots import smooth
from metaprior.experiments._registry import Experiment
from metaprior.inference.diagnostics import from_guide
from metaprior.inference.evaluation import FewShotPredictive, evaluate_fewshot
from metaprior.inference.meta import fit, meta_learner
from metaprior.inference.method import Method, variant_rows
from metaprior.inference.sib import sib_guide, sib_method
from metaprior.models.nets import Conv4
from metaprior.models.sib import embed_classes, pretrain_loss, sample_classification_batch, sib_model


@dataclasses.dataclass(frozen=True)
class SIBOmniglotConfig:
    """Configuration; ``make_config`` gives the quick / default / full sizes."""

    image_size: int = 28
    split_seed: int = 0
    filters: int = 64
    pretrain_steps: int = 3000
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    ways: int = 5
    shots: tuple[int, ...] = (1, 5)
    queries: int = 15
    inner_steps: tuple[int, ...] = (0, 1, 3, 5)
    # eta of equation (9). 1-shot, 1,500 steps, same 600 test episodes: T=3 minus T=0 is
    # -0.3 points at 0.1, +0.7 at 0.01, +0.5 at 0.001 (benchmarks/README.md "SIB"): at 0.1
    # the KL part of each step pulls every class towards the shared prior mean.
    inner_lr: float = 0.01
    init_std: float = 0.1
    # xi's hidden layers batch-normalised over each task's queries, as in the authors'
    # dni_linear (False: xi sees each query's logits alone). benchmarks/README.md "SIB".
    xi_query_norm: bool = True
    task_batch: int = 32
    num_steps: int = 3000
    learning_rate: float = 1e-3
    steps_per_call: int = 50
    test_episodes: int = 600
    predictive_draws: int = 16
    posterior_tasks: int = 4
    posterior_draws: int = 200


def make_config(size: str) -> SIBOmniglotConfig:
    if size == "quick":
        small = dict(filters=8, pretrain_steps=20, pretrain_batch=32, shots=(1,), inner_steps=(0, 3), task_batch=4)
        small.update(num_steps=20, steps_per_call=10, test_episodes=20, predictive_draws=2, posterior_tasks=2)
        return SIBOmniglotConfig(**small, posterior_draws=10)
    if size == "default":
        return SIBOmniglotConfig(
            filters=32, pretrain_steps=500, pretrain_batch=32, pretrain_lr=3e-3, num_steps=1500, learning_rate=3e-3
        )
    if size == "full":
        return SIBOmniglotConfig()
    raise ValueError(f"unknown size {size!r}")


def pretrain(rng_key, config: SIBOmniglotConfig, images, checkpoint: Path | None = None) -> tuple[Conv4, np.ndarray]:
    """Ordinary classification over the meta-training classes; returns ``(net, losses)``."""
    k_net, k_fit = jax.random.split(rng_key)
    net = Conv4(images.shape[0], filters=config.filters, image_size=config.image_size, key=k_net)
    params, static = eqx.partition(net, eqx.is_array)
    loss = lambda p, key, batch: pretrain_loss(eqx.combine(p, static), key, batch)
    sampler = lambda k, d: sample_classification_batch(k, d, config.pretrain_batch)
    kw = dict(steps_per_call=config.steps_per_call, desc="pretrain", checkpoint=checkpoint)
    result = fit(
        k_fit,
        meta_learner(loss, optax.adam(config.pretrain_lr)),
        params,
        config.pretrain_steps,
        data=images,
        sample_batch=sampler,
        **kw,
    )
    return eqx.combine(result.state.params, static), result.losses


def sib(config: SIBOmniglotConfig, num_features: int, num_steps: int) -> Method:
    """SIB with ``T = num_steps`` on ``num_features``-dimensional features: the
    :func:`~metaprior.inference.sib.sib_method` that ``metaprior run fewshot`` trains too."""
    inner = dict(inner_optimizer=optax.sgd(config.inner_lr), num_samples=config.predictive_draws)
    return sib_method(
        num_features, num_steps=num_steps, init_std=config.init_std, query_norm=config.xi_query_norm, **inner
    )


def meta_train(
    rng_key, config: SIBOmniglotConfig, features, shots: int, num_steps: int, checkpoint: Path | None = None
):
    """SIB meta-training on embedded training classes ``[classes, examples, features]``."""
    k_init, k_fit = jax.random.split(rng_key)
    m = sib(config, features.shape[-1], num_steps)
    optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(config.learning_rate))
    sampler = lambda k, d: sample_episodes(k, d, config.task_batch, config.ways, shots, config.queries)
    kw = dict(steps_per_call=config.steps_per_call, desc=f"SIB {shots}-shot T={num_steps}", checkpoint=checkpoint)
    learner = meta_learner(m.loss, optimizer, has_aux=True)
    init = m.init(k_init, config.ways)
    return fit(k_fit, learner, init, config.num_steps, data=features, sample_batch=sampler, **kw)


def predictive(config: SIBOmniglotConfig, params, num_steps: int) -> FewShotPredictive:
    """SIB's posterior predictive ``(key, sx, sy, qx) -> probs [T, Q, ways]`` after ``num_steps``
    synthetic-gradient steps."""
    m = sib(config, params.prior_loc.shape[-1], num_steps)
    return variant_rows(m, m.predictive(params, config.ways))[m.name]


def run(rng_key, config: SIBOmniglotConfig, out_dir: Path) -> dict[str, float]:
    k_pre, k_meta, k_test, k_pred, k_post = jax.random.split(rng_key, 5)
    splits = omniglot_splits(config.image_size, rotations=True, seed=config.split_seed)
    train, test = splits["train"], splits["test"]

    start = time.perf_counter()
    net, pre_losses = pretrain(k_pre, config, jnp.asarray(train.images), out_dir / "pretrain.ckpt")
    embed = jax.jit(embed_classes)
    train_f = jax.block_until_ready(embed(net, jnp.asarray(train.images)))
    test_f = jax.block_until_ready(embed(net, jnp.asarray(test.images)))
    metrics: dict[str, float] = {
        "pretrain_time_s": time.perf_counter() - start,
        "pretrain_final_loss": float(np.mean(pre_losses[-config.steps_per_call :])),
        "num_train_classes": train.num_classes,
        "num_test_classes": test.num_classes,
        "feature_dim": int(train_f.shape[-1]),
    }

    meta_time = 0.0
    curves, accs = {}, {}
    for shots in config.shots:
        # The same test episodes for every T: differences between T are paired.
        episodes = sample_episodes(
            jax.random.fold_in(k_test, shots), test_f, config.test_episodes, config.ways, shots, config.queries
        )
        for num_steps in config.inner_steps:
            name = f"5w{shots}s_T{num_steps}" if config.ways == 5 else f"{config.ways}w{shots}s_T{num_steps}"
            t0 = time.perf_counter()
            result = meta_train(k_meta, config, train_f, shots, num_steps, out_dir / f"sib_{name}.ckpt")  # same init
            meta_time += time.perf_counter() - t0
            curves[(shots, num_steps)] = result.losses
            ev = evaluate_fewshot(
                jax.random.fold_in(k_pred, shots),
                predictive(config, result.state.params, num_steps),
                episodes,
                chunk=100,
                desc=f"SIB {name}",
            )
            accs[(shots, num_steps)] = ev.per_episode_accuracy()
            metrics.update(ev.metrics(suffix=f"_{name}"))
            metrics[f"final_loss_{name}"] = float(np.mean(result.losses[-config.steps_per_call :]))
            if shots == 1 and num_steps == 3:
                tree = from_guide(
                    k_post,
                    sib_model,
                    functools.partial(sib_guide, num_steps=num_steps, inner_optimizer=optax.sgd(config.inner_lr)),
                    {},
                    result.state.params,
                    jax.tree.map(lambda a: a[: config.posterior_tasks], episodes),
                    num_ways=config.ways,
                    num_samples=config.posterior_draws,
                    attrs={"experiment": "sib-omniglot", "shots": shots, "inner_steps": num_steps},
                )
                save_datatree(tree, out_dir / "posterior.nc")
        base = config.inner_steps[0]
        for num_steps in config.inner_steps[1:]:
            diff = accs[(shots, num_steps)] - accs[(shots, base)]
            key = f"gain_{config.ways}w{shots}s_T{num_steps}_vs_T{base}"
            metrics[key], metrics[f"{key}_ci95"] = mean_ci95(diff)
    metrics["meta_train_time_s"] = meta_time
    plot(config, metrics, curves, out_dir)
    return metrics


def plot(config: SIBOmniglotConfig, metrics, curves, out_dir: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for shots in config.shots:
        ts = list(config.inner_steps)
        mean = [metrics[f"acc_{config.ways}w{shots}s_T{t}"] for t in ts]
        ci = [metrics[f"acc_{config.ways}w{shots}s_T{t}_ci95"] for t in ts]
        ax.errorbar(ts, mean, yerr=ci, marker="o", capsize=3, label=f"{config.ways}-way {shots}-shot")
        for t in ts:
            ax_loss.plot(*smooth(curves[(shots, t)]), label=f"{shots}-shot T={t}", lw=1)
    ax.set_xlabel("synthetic-gradient steps T")
    ax.set_ylabel(f"test accuracy ({config.test_episodes} episodes, 95% CI)")
    ax.set_xticks(list(config.inner_steps))
    ax.set_title("SIB on Omniglot: accuracy against T")
    ax.legend()
    ax_loss.set_xlabel("meta-training step")
    ax_loss.set_ylabel("negative ELBO per task")
    ax_loss.set_title("meta-training")
    ax_loss.legend(fontsize=7, ncol=2)
    save_figure(fig, out_dir, "sib_accuracy_vs_steps.png")


METRICS_DOC = """
acc_5w{1,5}s_T{t}: test accuracy (mean over episodes) of SIB meta-trained and run with T=t steps
acc_5w{1,5}s_T{t}_ci95: half-width of its normal 95% interval over the test episodes
gain_5w{1,5}s_T{t}_vs_T0 (+ _ci95): paired accuracy difference to T=0 on the same episodes
ece_5w{1,5}s_T{t}, nll_5w{1,5}s_T{t}: expected calibration error (15 bins) and NLL per query
final_loss_5w{1,5}s_T{t}: negative ELBO per task at the end of meta-training
pretrain_time_s, meta_train_time_s: wall time of pretraining (+ embedding), of all meta-training runs
pretrain_final_loss, num_train_classes, num_test_classes, feature_dim: context
"""

EXPERIMENTS = [
    Experiment(
        name="sib-omniglot",
        description="SIB (Hu et al. 2020): synthetic-gradient empirical Bayes, Omniglot 5-way, accuracy vs T",
        make_config=make_config,
        run=run,
        metrics_doc=METRICS_DOC,
    )
]
