"""``metaprior run omniglot-maml`` and ``omniglot-llama``: few-shot Omniglot.

5-way classification on Omniglot (background "small" sets split by alphabet, training
alphabets augmented with rotations as new classes; by default the held-out alphabets'
characters are dealt between validation and test, ``held_out="character"``, so that
``tau_pred`` is chosen at the test alphabets' difficulty) with the Conv4 net, whose
batch-norm scale and shift are meta-learned and neither adapted nor in the curvature
(Grant et al. 2018). One model is meta-trained on ``train_shots``-shot episodes and
scored on 600 test episodes at 1 and 5 shots. MAML predicts with the adapted network;
LLAMA meta-trains with ML-LAPLACE (K-FAC, ``tau = 0.001``, ``eta = 1e-6``) and predicts
with each test task's Laplace predictive ``mean_s softmax(f(x; phi_s))``,
``phi_s ~ N(phi_hat, (F + tau_pred I)^{-1})`` (``f`` the network or, "glm", its
linearisation), ``tau_pred`` and the predictive type chosen by empirical Bayes on
validation episodes. The default size trains in minutes on a laptop CPU; ``--full`` is
the paper's budget (60k steps of 32 tasks, 64 filters).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.data import episode_batches, omniglot_splits, sample_episodes
from metaprior.experiments._plots import reliability_figure, training_figure
from metaprior.experiments._registry import ConfigError, Experiment
from metaprior.inference import maml
from metaprior.inference.diagnostics import save_posterior, to_datatree
from metaprior.inference.evaluation import FewShotPredictive, evaluate_fewshot, grid_search
from metaprior.inference.maml import nll_loss
from metaprior.inference.meta import fit, meta_learner
from metaprior.models.nets import Conv4


@dataclasses.dataclass(frozen=True)
class OmniglotMAMLConfig:
    """Configuration; ``make_config`` gives the quick / default / full sizes."""

    method: str = "maml"  # "maml" (ML-POINT) or "llama" (ML-LAPLACE)
    filters: int = 32
    conv_impl: str = "im2col"  # Conv4 channels-last on the batch (nets.Im2colConv2d); "shift" / "lax": the older paths
    image_size: int = 28
    ways: int = 5
    train_shots: int = 1
    train_queries: int = 5
    eval_shots: tuple[int, ...] = (1, 5)
    eval_queries: int = 15
    meta_batch: int = 8
    num_steps: int = 1000
    meta_lr: float = 1e-3
    inner_lr: float = 0.4
    train_inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False
    eta: float = 1e-6
    tau: float = 1e-3
    kron_damping: str = "factored"
    log_det_tasks: int = 2
    fisher: str = "exact"
    split_seed: int = 0
    # "character": val and test share the held-out alphabets, disjoint by character; "alphabet": one vs two others
    held_out: str = "character"
    num_eval_episodes: int = 600
    num_val_episodes: int = 100
    eval_batch: int = 25
    num_posterior_samples: int = 16
    # half-decades around the validation optimum at 1,000 steps (near 2,000; 10 and 100 far worse)
    tau_grid: tuple[float, ...] = (300.0, 1000.0, 3000.0, 10000.0, 30000.0)
    # Laplace predictives tried with every tau on validation ("nn": sampled network, "glm": linearised);
    # at 1,000 steps both gave the same validation NLL (0.7867 vs 0.7872), so "nn" only (the paper's)
    pred_types: tuple[str, ...] = ("nn",)
    steps_per_call: int = 10
    checkpoint_every: int = 500  # meta-training steps between checkpoints in --out (atomic; a killed run resumes there)
    # meta-training checkpoint ("" = meta.ckpt in --out); omniglot-llama pointed at a copy of
    # omniglot-maml's with a larger --steps fine-tunes MAML's theta with ML-LAPLACE
    checkpoint: str = ""


def make_config(method: str, size: str) -> OmniglotMAMLConfig:
    base = OmniglotMAMLConfig(method=method)
    if size == "quick":
        small = dict(filters=4, meta_batch=2, num_steps=4, steps_per_call=2, num_eval_episodes=4, num_val_episodes=2)
        small.update(eval_batch=2, num_posterior_samples=3, tau_grid=(10.0, 1000.0), pred_types=("glm",))
        return dataclasses.replace(base, **small, log_det_tasks=1, eval_queries=3)
    if size == "full":
        return dataclasses.replace(
            base, filters=64, meta_batch=32, num_steps=60000, train_queries=15, log_det_tasks=32, steps_per_call=50
        )
    return base


def _apply(net, x):
    return net(x)


def _likelihood(f):
    return dist.Categorical(logits=f)


def _loss():
    return nll_loss(_apply, _likelihood)


def method(config: OmniglotMAMLConfig):
    """The run's :class:`~metaprior.inference.method.Method` (MAML or LLAMA on the Conv4)."""
    if config.method not in ("maml", "llama"):
        raise ConfigError(f"method must be 'maml' or 'llama', got {config.method!r}")
    size = dict(filters=config.filters, image_size=config.image_size, conv_impl=config.conv_impl)
    c = config
    kw = dict(train_inner_steps=c.train_inner_steps, eval_inner_steps=c.eval_inner_steps, first_order=c.first_order)
    kw.update(eta=c.eta, kron_damping=c.kron_damping, log_det_tasks=c.log_det_tasks, fisher=c.fisher)
    init = lambda key, ways: Conv4(ways, **size, key=key)
    kw.update(init=init, apply_fn=_apply, likelihood=_likelihood, prior_precision=c.tau)
    return maml.method_from(c.method, _loss(), optax.sgd(c.inner_lr), **kw)


def _inner(config: OmniglotMAMLConfig) -> dict:
    return dict(apply_fn=_apply, loss_fn=_loss(), inner_optimizer=optax.sgd(config.inner_lr))


def point_predictive(config: OmniglotMAMLConfig, theta) -> FewShotPredictive:
    """MAML's :data:`~metaprior.inference.evaluation.FewShotPredictive`: the adapted network's softmax."""
    stacked = method(config).predictive(theta, config.ways)  # [1, T, Q, W]: MAML's one variant
    return lambda *args: stacked(*args)[0]


def laplace_samples(config: OmniglotMAMLConfig, theta, tau: float, pred_type: str = "nn"):
    """LLAMA's Laplace predictive draws ``(rng_key, sx, sy, qx) -> [T, S, Q, W]`` (jitted)."""
    kw = dict(num_steps=config.eval_inner_steps, num_samples=config.num_posterior_samples, pred_type=pred_type)
    return maml.laplace_sampler(theta, likelihood=_likelihood, prior_precision=tau, **kw, **_inner(config))


def laplace_predictive(config: OmniglotMAMLConfig, theta, tau: float, pred_type: str = "nn") -> FewShotPredictive:
    """LLAMA's predictive: the mean over Laplace draws of the adapted network's softmax."""
    samples = laplace_samples(config, theta, tau, pred_type)
    return lambda key, sx, sy, qx: samples(key, sx, sy, qx).mean(1)


def _episodes(rng_key, images, config, num, shots):
    return episode_batches(rng_key, images, num, config.ways, shots, config.eval_queries, batch_size=config.eval_batch)


def run(rng_key: jax.Array, config: OmniglotMAMLConfig, out_dir: Path) -> dict[str, float]:
    """Meta-train on the training alphabets; choose ``tau_pred`` on validation
    alphabets (LLAMA); score on test alphabets; plot; save a posterior."""
    out_dir = Path(out_dir)
    splits = omniglot_splits(config.image_size, rotations=True, seed=config.split_seed, held_out=config.held_out)
    train = jnp.asarray(splits["train"].images)
    k_init, k_train, k_val, k_test, k_post = jax.random.split(rng_key, 5)
    size = dict(filters=config.filters, image_size=config.image_size, conv_impl=config.conv_impl)
    net = Conv4(config.ways, **size, key=k_init)
    learner = meta_learner(method(config).loss, optax.adam(config.meta_lr), has_aux=True)
    shape = (config.meta_batch, config.ways, config.train_shots, config.train_queries)
    sampler = lambda k, images: sample_episodes(k, images, *shape)
    start = time.perf_counter()
    kw = dict(steps_per_call=config.steps_per_call, checkpoint_every=config.checkpoint_every)
    kw["checkpoint"] = config.checkpoint or out_dir / "meta.ckpt"
    kw.update(data=train, sample_batch=sampler, desc=f"omniglot-{config.method}")
    result = fit(k_train, learner, net, config.num_steps, **kw)
    theta = result.state.params
    metrics: dict[str, float] = dict(train_steps=config.num_steps, train_time_s=time.perf_counter() - start)
    metrics.update(meta_batch=config.meta_batch, filters=config.filters, train_shots=config.train_shots)
    metrics["final_train_loss"] = float(np.mean(result.losses[-max(1, len(result.losses) // 10) :]))

    tau_pred, pred_type = None, "nn"
    if config.method == "llama":  # empirical Bayes for (tau_pred, pred_type) on validation episodes
        val = jnp.asarray(splits["val"].images)

        def val_nll(kind_tau):
            kind, tau = kind_tau
            episodes = _episodes(k_val, val, config, config.num_val_episodes, config.train_shots)
            predict = laplace_predictive(config, theta, tau, kind)
            desc = f"validation {kind} tau={tau:g}"
            return evaluate_fewshot(jax.random.fold_in(k_val, 1), predict, episodes, desc=desc).metrics()["nll"]

        (pred_type, tau_pred), scores = grid_search(val_nll, itertools.product(config.pred_types, config.tau_grid))
        metrics.update({f"val_nll_{kind}_tau{tau:g}": nll for (kind, tau), nll in scores.items()})
        metrics["tau_pred"], metrics["pred_glm"] = tau_pred, float(pred_type == "glm")
        predict = laplace_predictive(config, theta, tau_pred, pred_type)
    else:
        predict = point_predictive(config, theta)

    test = jnp.asarray(splits["test"].images)
    curves = {}
    for shots in config.eval_shots:
        k_shots = jax.random.fold_in(k_test, shots)
        episodes = _episodes(k_shots, test, config, config.num_eval_episodes, shots)
        ev = evaluate_fewshot(jax.random.fold_in(k_shots, 1), predict, episodes, desc=f"test {shots}-shot")
        metrics.update(ev.metrics(suffix=f"_{config.ways}w{shots}s"))
        curves[f"{config.method} {shots}-shot"] = ev.reliability()

    reliability_figure(curves, out_dir, f"omniglot-{config.method}: reliability (test episodes)")
    training_figure({config.method: result.losses}, out_dir)
    save_posterior(_posterior_tree(k_post, config, theta, test, tau_pred, pred_type), out_dir / "posterior.nc")
    return metrics


def _posterior_tree(rng_key, config, theta, test, tau_pred, pred_type="nn"):
    """Predictive class probabilities of one test episode (1-shot) as an ArviZ tree:
    Laplace samples for LLAMA, the single adapted network for MAML."""
    ep = next(_episodes(rng_key, test, dataclasses.replace(config, eval_batch=1), 1, config.train_shots))
    if config.method == "llama":
        probs = laplace_samples(config, theta, tau_pred, pred_type)(rng_key, ep.support_x, ep.support_y, ep.query_x)
        probs = np.asarray(probs[0])  # [S, Q, W]
    else:
        probs = np.asarray(point_predictive(config, theta)(rng_key, ep.support_x, ep.support_y, ep.query_x))
    attrs = {"method": config.method, "tau_pred": float(tau_pred or 0.0), "pred_type": pred_type}
    dims = {"probs": ["query", "class"], "query_y": ["query"]}
    return to_datatree(
        {"probs": probs[None]}, observed_data={"query_y": np.asarray(ep.query_y[0])}, dims=dims, attrs=attrs
    )


METRICS_DOC = """
acc_5w1s, acc_5w5s: mean accuracy over 600 test episodes (15 queries per class), with _ci95
ece_5w1s, ece_5w5s: expected calibration error (15 bins) over all test queries
nll_5w1s, nll_5w5s: predictive NLL per query
tau_pred, pred_glm, val_nll_{nn,glm}_tau*: LLAMA only; the predictive prior precision and
  predictive type (pred_glm = 1 for the linearised network, 0 for sampled networks) chosen
  by validation NLL, and the validation NLL of every pair tried
train_steps, train_time_s, meta_batch, filters, train_shots, final_train_loss
"""

EXPERIMENTS = [
    Experiment(
        name="omniglot-maml",
        description="MAML (ML-POINT) on 5-way 1/5-shot Omniglot with the 4-block conv net",
        make_config=functools.partial(make_config, "maml"),
        run=run,
        metrics_doc=METRICS_DOC,
    ),
    Experiment(
        name="omniglot-llama",
        description="LLAMA (ML-LAPLACE, K-FAC) on 5-way 1/5-shot Omniglot: accuracy and calibration",
        make_config=functools.partial(make_config, "llama"),
        run=run,
        metrics_doc=METRICS_DOC,
    ),
]
