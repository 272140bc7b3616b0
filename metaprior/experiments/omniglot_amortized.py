"""``metaprior run omniglot-amortized``: the amortized LSTM guide on Omniglot.

Kim and Heo's amortized inference of per-task Bayesian network weights on our Omniglot
splits (:func:`metaprior.data.omniglot_splits`): for each (ways, shots), meta-train the
guide and the shared batch-norm parameters of the Bayesian Conv4 on the query negative
ELBO after ``train_inner_steps`` inner steps (Flipout; :mod:`metaprior.inference.amortized_classifier`),
and score it on the same test episodes after each of ``eval_inner_steps``. For 5-way
1-shot, first-order MAML on the same net and budget is scored on the same episodes
(reliability of both plotted), and a few test tasks' posteriors are saved. Test
episodes come from the unrotated test alphabets, the same for every model and method.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.data import omniglot_splits, sample_episodes
from metaprior.experiments._common import save_datatree, write_metrics
from metaprior.experiments._plots import reliability_figure, training_figure
from metaprior.experiments._registry import Experiment
from metaprior.inference.amortized_classifier import (
    amortized_method,
    amortized_posterior_tree,
    conv4_inference,
    init_conv4_guide,
)
from metaprior.inference.evaluation import FewShotEvaluation, FewShotPredictive, evaluate_fewshot, predict_episodes
from metaprior.inference.maml import maml_method, nll_loss
from metaprior.inference.meta import fit, meta_learner
from metaprior.inference.method import Method, variant_rows
from metaprior.models.nets import Conv4


@dataclasses.dataclass(frozen=True)
class OmniglotAmortizedConfig:
    """Configuration; ``make_config`` gives the quick / default / full sizes. ``task_batch_size``:
    tasks run together (0: vmap all; 1: one at a time, faster for convolutions on CPU); the
    MAML baseline (5-way 1-shot only) uses ``maml_inner_steps`` in training and at test time."""

    image_size: int = 28
    split_seed: int = 0
    ways: tuple[int, ...] = (5, 20)
    shots: tuple[int, ...] = (1, 5)
    train_inner_steps: int = 5
    eval_inner_steps: tuple[int, ...] = (1, 5)
    filters: int = 64
    conv_impl: str = "im2col"  # Conv4 channels-last on the batch (nets.Im2colConv2d); "shift" / "lax": the older paths
    hidden_size: int = 128
    noise_size: int = 16
    init_log_var: float = -10.0
    beta: float = 1e-3
    inner_lr: float = 0.4
    num_steps: int = 20000
    task_batch: int = 32
    queries: int = 15
    learning_rate: float = 1e-3
    task_batch_size: int = 0
    steps_per_call: int = 10
    checkpoint_every: int = 500  # meta-training steps between checkpoints in --out (atomic; a killed run resumes there)
    test_episodes: int = 600
    test_queries: int = 15
    num_samples: int = 10
    maml_inner_steps: int = 5
    maml_first_order: bool = True
    posterior_tasks: int = 3
    posterior_draws: int = 50


def make_config(size: str) -> OmniglotAmortizedConfig:
    if size == "quick":
        small = dict(ways=(5,), shots=(1,), train_inner_steps=1, eval_inner_steps=(1,), filters=4, hidden_size=16)
        small.update(noise_size=4, num_steps=2, task_batch=2, queries=2, task_batch_size=1, steps_per_call=1)
        small.update(test_episodes=4, test_queries=2, num_samples=2, maml_inner_steps=1, posterior_tasks=2)
        return OmniglotAmortizedConfig(**small, posterior_draws=4)
    if size == "default":
        small = dict(filters=16, hidden_size=64, num_steps=300, task_batch=4, queries=5, task_batch_size=1)
        return OmniglotAmortizedConfig(**small, train_inner_steps=1, test_episodes=100, test_queries=5, num_samples=4)
    if size == "full":
        return OmniglotAmortizedConfig()
    raise ValueError(f"unknown size {size!r}")


def _task_batch_size(config: OmniglotAmortizedConfig) -> int | None:
    return None if config.task_batch_size <= 0 else config.task_batch_size


def _size(config: OmniglotAmortizedConfig) -> dict:
    return dict(filters=config.filters, image_size=config.image_size, conv_impl=config.conv_impl)


def _lstm(config: OmniglotAmortizedConfig) -> dict:
    return dict(hidden_size=config.hidden_size, noise_size=config.noise_size, init_log_var=config.init_log_var)


def _fit(rng_key, config: OmniglotAmortizedConfig, loss, params, images, ways: int, shots: int, desc, checkpoint):
    """Both models' meta-training: Adam with global-norm clipping on ``ways``-way ``shots``-shot episodes."""
    optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(config.learning_rate))
    sampler = lambda k, d: sample_episodes(k, d, config.task_batch, ways, shots, config.queries)
    kw = dict(data=images, sample_batch=sampler, steps_per_call=config.steps_per_call, checkpoint=checkpoint)
    kw["checkpoint_every"] = config.checkpoint_every
    return fit(rng_key, meta_learner(loss, optimizer, has_aux=True), params, config.num_steps, desc=desc, **kw)


def method(config: OmniglotAmortizedConfig) -> Method:
    """The guide as a :class:`~metaprior.inference.method.Method` (the one ``metaprior run
    fewshot`` trains too): one variant per number of ``eval_inner_steps``."""
    inner = dict(inner_optimizer=optax.sgd(config.inner_lr), train_inner_steps=config.train_inner_steps)
    kw = dict(eval_inner_steps=config.eval_inner_steps, num_samples=config.num_samples, beta=config.beta)
    return amortized_method(**_size(config), **_lstm(config), **inner, **kw, task_batch_size=_task_batch_size(config))


def meta_train(rng_key, config: OmniglotAmortizedConfig, images, ways: int, shots: int, checkpoint=None):
    """Meta-train the guide for one (ways, shots); returns ``(params, net, FitResult)``."""
    k_init, k_fit = jax.random.split(rng_key)
    m = method(config)
    net = init_conv4_guide(k_init, ways, **_size(config), **_lstm(config))[1]  # the posterior tree's template
    desc = f"amortized {ways}w{shots}s K={config.train_inner_steps}"
    result = _fit(k_fit, config, m.loss, m.init(k_init, ways), images, ways, shots, desc, checkpoint)
    return result.state.params, net, result


def predictive(config: OmniglotAmortizedConfig, params, net) -> FewShotPredictive:
    """The guide's posterior predictive after each of ``eval_inner_steps`` inner steps: ``[len, T, Q, ways]``."""
    return method(config).predictive(params, net.head.out_features)


def maml(config: OmniglotAmortizedConfig) -> Method:
    """The MAML baseline (first-order by default) on the same Conv4, ``maml_inner_steps``
    inner steps in training and at test time."""
    steps = dict(train_inner_steps=config.maml_inner_steps, eval_inner_steps=config.maml_inner_steps)
    init = lambda key, ways: Conv4(ways, **_size(config), key=key)
    kw = dict(init=init, apply_fn=_apply, first_order=config.maml_first_order, **steps)
    return maml_method(_loss(), optax.sgd(config.inner_lr), **kw)


def train_maml(rng_key, config: OmniglotAmortizedConfig, images, ways: int, shots: int, checkpoint=None):
    """The MAML baseline on the same net and budget; returns ``(theta, FitResult)``."""
    k_net, k_fit = jax.random.split(rng_key)
    m = maml(config)
    result = _fit(k_fit, config, m.loss, m.init(k_net, ways), images, ways, shots, f"MAML {ways}w{shots}s", checkpoint)
    return result.state.params, result


def maml_predictive(config: OmniglotAmortizedConfig, theta) -> FewShotPredictive:
    """MAML's adapted softmax probabilities ``[T, Q, ways]``."""
    m = maml(config)
    return variant_rows(m, m.predictive(theta, theta.head.out_features))[m.name]


def _apply(net, x):
    return net(x)


def _loss():
    return nll_loss(_apply, lambda f: dist.Categorical(logits=f))


def run(rng_key, config: OmniglotAmortizedConfig, out_dir: Path) -> dict[str, float]:
    out_dir = Path(out_dir)  # holds one checkpoint per training run: a killed run resumes there
    k_train, k_test, k_pred, k_maml, k_post = jax.random.split(rng_key, 5)
    splits = omniglot_splits(config.image_size, rotations=True, seed=config.split_seed)
    train = jnp.asarray(splits["train"].images)
    test = splits["test"]
    metrics: dict[str, float] = dict(num_train_classes=splits["train"].num_classes, num_test_classes=test.num_classes)
    metrics.update(train_inner_steps=config.train_inner_steps, num_steps=config.num_steps, filters=config.filters)
    metrics["beta"] = config.beta
    test_images = jnp.asarray(test.images)
    curves, reliability, train_time = {}, {}, 0.0
    for ways in config.ways:
        for shots in config.shots:
            name = f"{ways}w{shots}s"
            shape = (config.test_episodes, ways, shots, config.test_queries)
            episodes = sample_episodes(jax.random.fold_in(k_test, 100 * ways + shots), test_images, *shape)
            t0 = time.perf_counter()
            key, ckpt = jax.random.fold_in(k_train, 100 * ways + shots), out_dir / f"amortized_{name}.ckpt"
            params, net, result = meta_train(key, config, train, ways, shots, checkpoint=ckpt)
            seconds = time.perf_counter() - t0
            train_time += seconds
            metrics[f"train_time_{name}_s"] = seconds
            metrics[f"final_loss_{name}"] = float(np.mean(result.losses[-config.steps_per_call :]))
            curves[name] = result.losses
            t0 = time.perf_counter()
            all_probs = predict_episodes(k_pred, predictive(config, params, net), episodes, episode_axis=1)
            metrics[f"eval_time_{name}_s"] = time.perf_counter() - t0
            for steps, probs in zip(sorted(config.eval_inner_steps), all_probs):
                ev = FewShotEvaluation(probs, np.asarray(episodes.query_y))
                metrics.update(ev.metrics(suffix=f"_{name}_steps{steps}"))
                if ways == 5 and shots == 1:
                    reliability[f"amortized K={steps}"] = ev.reliability()
            if ways == 5 and shots == 1:
                steps = max(config.eval_inner_steps)
                attrs = {"experiment": "omniglot-amortized", "inner_steps": steps}
                kw = dict(num_tasks=config.posterior_tasks, num_draws=config.posterior_draws, attrs=attrs)
                inference = conv4_inference(
                    net, beta=config.beta, inner_optimizer=optax.sgd(config.inner_lr), num_inner_steps=steps
                )
                tree = amortized_posterior_tree(k_post, params, net, episodes, inference, **kw)
                save_datatree(tree, out_dir / "posterior.nc")
                t0 = time.perf_counter()
                theta, maml_result = train_maml(
                    k_maml, config, train, ways, shots, checkpoint=out_dir / f"maml_{ways}w{shots}s.ckpt"
                )
                metrics["maml_train_time_s"] = time.perf_counter() - t0
                ev = evaluate_fewshot(k_pred, maml_predictive(config, theta), episodes, desc="MAML")
                metrics.update(ev.metrics(suffix=f"_maml_{name}"))
                reliability[f"MAML K={config.maml_inner_steps}"] = ev.reliability()
                curves["MAML 5w1s"] = maml_result.losses
            # Partial results survive an interrupted run; the CLI rewrites the file at the end.
            write_metrics(out_dir / "metrics.json", {**metrics, "train_time_s": train_time, "partial": 1})
            plot(config, curves, reliability, out_dir)
    metrics["train_time_s"] = train_time
    return metrics


def plot(config: OmniglotAmortizedConfig, curves, reliability, out_dir: Path) -> None:
    """``reliability.png`` (5-way 1-shot, guide vs MAML) and ``training.png`` (loss curves)."""
    if reliability:
        reliability_figure(reliability, out_dir, f"Omniglot 5-way 1-shot, {config.test_episodes} test episodes")
    training_figure(curves, out_dir)


METRICS_DOC = """
acc_{W}w{S}s_steps{K}, *_ci95: test accuracy over test_episodes episodes (95% CI half-width),
    W-way S-shot, K inner steps at test time (models trained with train_inner_steps)
ece_{W}w{S}s_steps{K}, nll_{W}w{S}s_steps{K}: expected calibration error (15 bins) and NLL per query
acc_maml_5w1s (+ _ci95), ece_maml_5w1s, nll_maml_5w1s: first-order MAML, same net, budget and episodes
train_time_s, train_time_{W}w{S}s_s, maml_train_time_s, eval_time_{W}w{S}s_s: seconds
    (eval: all eval_inner_steps in one pass over the test episodes)
num_steps, train_inner_steps, filters, beta: the budget and settings used
final_loss_{W}w{S}s: mean meta-loss over the last steps_per_call steps
"""

EXPERIMENTS = [
    Experiment(
        name="omniglot-amortized",
        description="Amortized LSTM guide for Bayesian Conv4 weights with Flipout on Omniglot (Kim & Heo)",
        make_config=make_config,
        run=run,
        metrics_doc=METRICS_DOC,
    )
]
