"""``metaprior run omniglot-maml`` and ``omniglot-llama``: few-shot Omniglot.

5-way classification on Omniglot (background "small" sets, split by alphabet, the
training alphabets augmented with 90/180/270 degree rotations as new classes; by
default the three held-out alphabets' characters are dealt between validation and
test, ``held_out="character"``, so that ``tau_pred`` is chosen on the test
alphabets' difficulty: with 8 alphabets in all, a validation set of whole alphabets is
one alphabet, much harder than the two test alphabets), with
the 4-block conv net (3x3 conv, batch norm with batch statistics, ReLU, 2x2 max-pool).
Batch-norm scale and shift are shared (meta-learned) and neither adapted nor in the
curvature, as in Grant et al. (2018). The inner loop is ``optax.sgd(inner_lr)``.

One model is meta-trained on ``train_shots``-shot episodes and evaluated on 600 test
episodes at 1 and 5 shots (15 queries per class). MAML predicts with the adapted
network; LLAMA meta-trains with ML-LAPLACE (K-FAC, ``tau = 0.001``, ``eta = 1e-6``)
and predicts with the Laplace posterior predictive of each test task,
``mean_s softmax(f(x; phi_s))``, ``phi_s ~ N(phi_hat, (F + tau_pred I)^{-1})`` with the
K-FAC Fisher ``F`` of the support set, ``f`` either the network or its linearisation at
``phi_hat`` (the GLM predictive); ``tau_pred`` and the predictive type are chosen by
empirical Bayes on validation episodes (maximum query log-likelihood), never on the
test episodes.

The default size trains on a laptop CPU in minutes and is far weaker than the paper's
(60k steps of 32 tasks with 64 filters); ``--full`` is the paper's budget.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.data import omniglot_splits, sample_episodes
from metaprior.experiments._common import mean_ci95, save_figure
from metaprior.experiments._registry import Experiment
from metaprior.inference.diagnostics import (
    expected_calibration_error,
    plot_reliability,
    reliability_curve,
    save_posterior,
    to_datatree,
)
from metaprior.inference.laplace import laplace, log_det, predictive
from metaprior.inference.maml import adapt, ml_laplace, ml_point, nll_loss
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
    # "character": val and test share the held-out alphabets, disjoint by character
    # (omniglot_splits(held_out=...)); "alphabet": val is one alphabet, test two others
    held_out: str = "character"
    num_eval_episodes: int = 600
    num_val_episodes: int = 100
    eval_batch: int = 25
    num_posterior_samples: int = 16
    # half-decades around the optimum seen on validation episodes (1,000 steps: best
    # near 2,000; 10 and 100 were far worse, 1e5 equal to 1e4)
    tau_grid: tuple[float, ...] = (300.0, 1000.0, 3000.0, 10000.0, 30000.0)
    # Laplace predictives tried on the validation episodes with every tau: "nn" samples
    # the network's weights, "glm" its linearisation at the adapted weights
    # (laplace.predictive(pred_type=...)); the pair with the best validation NLL is used.
    # At 1,000 steps both gave the same validation NLL at their best tau (0.7867 vs
    # 0.7872), so the default tries "nn" only (the paper's); add "glm" to compare.
    pred_types: tuple[str, ...] = ("nn",)
    steps_per_call: int = 10
    # Resume from / write to this meta-training checkpoint ("" = meta.ckpt in --out). Pointing
    # omniglot-llama at a copy of omniglot-maml's checkpoint with a larger --steps
    # fine-tunes MAML's theta with ML-LAPLACE (both objectives share the state layout).
    checkpoint: str = ""


def make_config(method: str, size: str) -> OmniglotMAMLConfig:
    base = OmniglotMAMLConfig(method=method)
    if size == "quick":
        return dataclasses.replace(
            base,
            filters=4,
            meta_batch=2,
            num_steps=4,
            steps_per_call=2,
            num_eval_episodes=4,
            num_val_episodes=2,
            eval_batch=2,
            num_posterior_samples=3,
            tau_grid=(10.0, 1000.0),
            pred_types=("glm",),
            log_det_tasks=1,
            eval_queries=3,
        )
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


def objective(config: OmniglotMAMLConfig):
    inner = optax.sgd(config.inner_lr)
    if config.method == "maml":
        return ml_point(_loss(), inner, config.train_inner_steps, first_order=config.first_order)
    if config.method == "llama":
        posterior_fn = functools.partial(
            laplace,
            apply_fn=_apply,
            likelihood=_likelihood,
            structure="kfac",
            fisher=config.fisher,
            prior_precision=config.tau,
        )
        return ml_laplace(
            _loss(),
            inner,
            config.train_inner_steps,
            posterior_fn,
            eta=config.eta,
            log_det_fn=functools.partial(log_det, kron_damping=config.kron_damping),
            log_det_tasks=config.log_det_tasks,
            first_order=config.first_order,
        )
    raise ValueError(f"method must be 'maml' or 'llama', got {config.method!r}")


def _adapted(config, theta, episodes):
    def one(sx, sy):
        phi, _ = adapt(
            theta,
            sx,
            sy,
            loss_fn=_loss(),
            inner_optimizer=optax.sgd(config.inner_lr),
            num_steps=config.eval_inner_steps,
        )
        return phi

    return jax.vmap(one)(episodes.support_x, episodes.support_y)


def point_probs(theta, episodes, *, config):
    """MAML: ``softmax f(query; phi_hat)``, ``[T, Q, ways]``."""
    phis = _adapted(config, theta, episodes)
    return jax.vmap(lambda phi, qx: jax.nn.softmax(_apply(phi, qx)))(phis, episodes.query_x)


def posterior_probs(rng_key, theta, episodes, tau, *, config, num_samples, pred_type="nn"):
    """LLAMA: Laplace posterior predictive ``mean_s softmax f(query; phi_s)``, ``[T, Q, ways]``
    (``pred_type="glm"``: ``f`` linearised at the adapted weights).

    Returns ``(mean probs [T, Q, W], per-sample probs [T, S, Q, W])``.
    """
    phis = _adapted(config, theta, episodes)

    def one(key, phi, sx, sy, qx):
        post = laplace(
            None, phi, sx, sy, apply_fn=_apply, likelihood=_likelihood, structure="kfac", prior_precision=tau
        )
        f = predictive(key, post, qx, apply_fn=_apply, num_samples=num_samples, pred_type=pred_type)
        return jax.nn.softmax(f)

    keys = jax.random.split(rng_key, episodes.support_x.shape[0])
    samples = jax.vmap(one)(keys, phis, episodes.support_x, episodes.support_y, episodes.query_x)
    return samples.mean(1), samples


def _episodes(rng_key, images, config, num, shots):
    sample = jax.jit(sample_episodes, static_argnums=(2, 3, 4, 5))
    for i in range(0, num, config.eval_batch):
        yield sample(
            jax.random.fold_in(rng_key, i),
            images,
            min(config.eval_batch, num - i),
            config.ways,
            shots,
            config.eval_queries,
        )


def _evaluate(rng_key, probs_fn, images, config, num, shots, desc="evaluate"):
    from tqdm import tqdm

    from metaprior.inference.meta import progress_enabled

    probs, labels = [], []
    with tqdm(total=num, desc=desc, unit="episode", disable=not progress_enabled(None), leave=False) as bar:
        for i, ep in enumerate(_episodes(rng_key, images, config, num, shots)):
            probs.append(np.asarray(probs_fn(jax.random.fold_in(rng_key, 10_000 + i), ep)))
            labels.append(np.asarray(ep.query_y))
            bar.update(ep.query_y.shape[0])
    return np.concatenate(probs), np.concatenate(labels)  # [E, Q, W], [E, Q]


def run(rng_key: jax.Array, config: OmniglotMAMLConfig, out_dir: Path) -> dict[str, float]:
    """Meta-train on the training alphabets; choose ``tau_pred`` on validation
    alphabets (LLAMA); score on test alphabets; plot; save a posterior."""
    out_dir = Path(out_dir)
    splits = omniglot_splits(
        image_size=config.image_size, rotations=True, seed=config.split_seed, held_out=config.held_out
    )
    train = jnp.asarray(splits["train"].images)
    k_init, k_train, k_val, k_test, k_post = jax.random.split(rng_key, 5)
    net = Conv4(
        config.ways, filters=config.filters, image_size=config.image_size, conv_impl=config.conv_impl, key=k_init
    )
    learner = meta_learner(objective(config), optax.adam(config.meta_lr), has_aux=True)
    sampler = functools.partial(_train_batch, config=config)
    start = time.perf_counter()
    result = fit(
        k_train,
        learner,
        net,
        config.num_steps,
        data=train,
        sample_batch=sampler,
        steps_per_call=config.steps_per_call,
        desc=f"omniglot-{config.method}",
        checkpoint=config.checkpoint or out_dir / "meta.ckpt",
    )
    train_time = time.perf_counter() - start
    theta = result.state.params
    metrics: dict[str, float] = {
        "train_steps": config.num_steps,
        "train_time_s": train_time,
        "meta_batch": config.meta_batch,
        "filters": config.filters,
        "train_shots": config.train_shots,
        "final_train_loss": float(np.mean(result.losses[-max(1, len(result.losses) // 10) :])),
    }

    tau_pred, pred_type = None, "nn"
    if config.method == "llama":
        val = jnp.asarray(splits["val"].images)
        best = None
        for pred_type in config.pred_types:
            probs_at = jax.jit(
                functools.partial(
                    posterior_probs, config=config, pred_type=pred_type, num_samples=config.num_posterior_samples
                )
            )
            for tau in config.tau_grid:
                p, y = _evaluate(
                    k_val,
                    lambda k, ep, tau=tau: probs_at(k, theta, ep, tau)[0],
                    val,
                    config,
                    config.num_val_episodes,
                    config.train_shots,
                    desc=f"validation {pred_type} tau={tau:g}",
                )
                nll = -np.mean(np.log(np.take_along_axis(p, y[..., None], -1) + 1e-12))
                metrics[f"val_nll_{pred_type}_tau{tau:g}"] = float(nll)
                if best is None or nll < best[0]:
                    best = (nll, tau, pred_type, probs_at)
        _, tau_pred, pred_type, probs_at = best
        metrics["tau_pred"] = tau_pred
        metrics["pred_glm"] = float(pred_type == "glm")
        probs_fn = lambda k, ep: probs_at(k, theta, ep, tau_pred)[0]
    else:
        point = jax.jit(functools.partial(point_probs, config=config))
        probs_fn = lambda k, ep: point(theta, ep)

    test = jnp.asarray(splits["test"].images)
    curves = {}
    for shots in config.eval_shots:
        p, y = _evaluate(
            jax.random.fold_in(k_test, shots),
            probs_fn,
            test,
            config,
            config.num_eval_episodes,
            shots,
            desc=f"test {shots}-shot",
        )
        acc = (p.argmax(-1) == y).mean(-1)
        key = f"{config.ways}w{shots}s"
        metrics[f"acc_{key}"], metrics[f"acc_{key}_ci95"] = mean_ci95(acc)
        flat_p, flat_y = p.reshape(-1, p.shape[-1]), y.reshape(-1)
        metrics[f"ece_{key}"] = expected_calibration_error(flat_p, flat_y, num_bins=15)
        metrics[f"nll_{key}"] = float(-np.mean(np.log(flat_p[np.arange(flat_y.size), flat_y] + 1e-12)))
        curves[f"{config.method} {shots}-shot"] = reliability_curve(flat_p, flat_y, num_bins=15)

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    plot_reliability(curves, ax=ax)
    ax.set_title(f"omniglot-{config.method}: reliability (test episodes)")
    save_figure(fig, out_dir, "reliability.png")
    save_figure(_training_figure(result.losses), out_dir, "training.png")
    save_posterior(_posterior_tree(k_post, config, theta, test, tau_pred, pred_type), out_dir / "posterior.nc")
    return metrics


def _train_batch(rng_key, images, *, config):
    return sample_episodes(rng_key, images, config.meta_batch, config.ways, config.train_shots, config.train_queries)


def _posterior_tree(rng_key, config, theta, test, tau_pred, pred_type="nn"):
    """Predictive class probabilities of one test episode (1-shot) as an ArviZ tree:
    Laplace samples for LLAMA, the single adapted network for MAML."""
    ep = next(_episodes(rng_key, test, dataclasses.replace(config, eval_batch=1), 1, config.train_shots))
    if config.method == "llama":
        _, samples = jax.jit(
            functools.partial(
                posterior_probs, config=config, pred_type=pred_type, num_samples=config.num_posterior_samples
            )
        )(rng_key, theta, ep, tau_pred)
        probs = np.asarray(samples[0])  # [S, Q, W]
    else:
        probs = np.asarray(jax.jit(functools.partial(point_probs, config=config))(theta, ep))  # [1, Q, W]
    return to_datatree(
        {"probs": probs[None]},
        observed_data={"query_y": np.asarray(ep.query_y[0])},
        dims={"probs": ["query", "class"], "query_y": ["query"]},
        attrs={"method": config.method, "tau_pred": float(tau_pred or 0.0), "pred_type": pred_type},
    )


def _training_figure(losses):
    import matplotlib.pyplot as plt

    losses = np.asarray(losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = max(1, len(losses) // 100)
    ax.plot(np.arange(len(losses) - w + 1) + w, np.convolve(losses, np.ones(w) / w, mode="valid"))
    ax.set_xlabel("meta-training step")
    ax.set_ylabel("meta-loss (moving average)")
    return fig


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
