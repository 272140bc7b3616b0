"""``metaprior run harmonic``: the learned rich prior on harmonic signals.

Reproduces the toy experiment of Lacoste et al. (2018): meta-train the task-latent
model on harmonic tasks with the ELBO ("kl") and without its KL term ("nokl", the
paper's baseline), then, with the network fixed, fit q(z | support) on unseen tasks
for support sizes 1..256 and score the posterior predictive on held-out points.

Meta-training keeps a checkpoint per model in the output folder (``meta_kl.ckpt``,
``meta_nokl.ckpt``): a run stopped part-way resumes there when started again with the
same ``--out``, and a finished one with a larger ``--steps`` trains on from it.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import Predictive
from tqdm import tqdm

from metaprior.data.tasks import TaskBatch, harmonic_fn, harmonic_tasks
from metaprior.experiments._common import mean_ci95, save_datatree, save_figure
from metaprior.experiments._registry import Experiment
from metaprior.inference.guides import SetEncoder, TaskIAFGuide, TaskNormalGuide
from metaprior.inference.local import (
    LocalFit,
    fit_local,
    guide_for_num_tasks,
    restart_weights,
    sample_restart_mixture,
    task_batch_learner,
)
from metaprior.inference.meta import fit, progress_enabled
from metaprior.inference.svi import init_params
from metaprior.models.task_latent import ARCHS, make_task_latent_net, task_latent_model, task_latent_predict


@dataclasses.dataclass(frozen=True)
class HarmonicConfig:
    """Configuration; ``make_config`` gives the quick / default / full sizes."""

    num_tasks: int = 5000
    min_examples: int = 4
    max_examples: int = 50
    noise_std: float = 0.05
    latent_dim: int = 8
    net: str = "film"  # "film" (FiLM-modulated sine net, default) or "paper" (12x128 residual ReLU MLP)
    width: int = 0  # 0: the architecture's default (film 64, paper 128)
    num_layers: int = 0  # 0: the architecture's default (film 1 sine layer, paper 12)
    omega: float = 15.0  # film: largest first-layer frequency at initialisation
    guide: str = "normal"  # meta-training guide: "normal" or "iaf"
    eval_guide: str = "iaf"  # new-task posterior q(z | support): "iaf" or "normal"
    encoder_width: int = 64  # a Deep Sets encoder proposes each task's q(z) from its data; 0: none
    num_flows: int = 2
    task_batch: int = 32
    num_steps: int = 5000
    learning_rate: float = 1e-3
    schedule: str = "warmup-cosine"  # or "constant"; warm-up over 5% of num_steps, cosine to 1%
    local_learning_rate: float = 0.03
    local_steps: int = 5  # E-step iterations on the drawn tasks' guides per meta-step
    init_loc_scale: float = 0.0  # spread of initial task codes (see TaskNormalGuide.build)
    steps_per_call: int = 10
    checkpoint_every: int = 500  # meta-training steps between checkpoints (atomic; a killed run resumes there)
    eval_tasks: int = 100
    support_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 256)
    num_query: int = 100
    pad_support: int = 64  # support sizes up to this are padded to one shape (one compilation)
    adapt_steps: int = 200
    adapt_restarts: int = 6
    adapt_candidates: int = 1024  # restarts start at the best of this many prior draws (0: plain draws)
    adapt_lr: float = 0.05
    adapt_particles: int = 1
    predictive_samples: int = 100
    predictive: str = "mixture"  # "mixture": ELBO-weighted mixture of the restarts' q; "best": best restart only
    posterior_support: int = 8


def make_config(size: str) -> HarmonicConfig:
    if size == "quick":
        return HarmonicConfig(
            num_tasks=200,
            latent_dim=4,
            width=32,
            num_steps=40,
            eval_tasks=4,
            support_sizes=(1, 8),
            num_query=20,
            adapt_steps=20,
            adapt_restarts=2,
            adapt_candidates=8,
            predictive_samples=16,
            posterior_support=8,
        )
    if size == "default":
        return HarmonicConfig(
            num_steps=5000,
            eval_tasks=50,
        )
    if size == "full":
        # the paper's data (5,000 tasks, 100 eval tasks, 4 restarts) with the default FiLM
        # net; `--set net=paper` gives the paper's 12x128 residual MLP, which even with the
        # true task parameters is at MSE 0.31 after 20,000 steps (benchmarks/harmonic_oracle.py).
        # It checkpoints into --out and resumes.
        return HarmonicConfig(num_steps=20_000)
    raise ValueError(f"unknown size {size!r}")


def _check(config: HarmonicConfig) -> None:
    if config.net not in ARCHS:
        raise ValueError(f"config.net must be one of {ARCHS}, got {config.net!r}")
    if config.schedule not in ("warmup-cosine", "constant"):
        raise ValueError(f"config.schedule must be 'warmup-cosine' or 'constant', got {config.schedule!r}")
    for field in ("guide", "eval_guide"):
        if getattr(config, field) not in ("iaf", "normal"):
            raise ValueError(f"config.{field} must be 'iaf' or 'normal', got {getattr(config, field)!r}")
    if config.predictive not in ("mixture", "best"):
        raise ValueError(f"config.predictive must be 'mixture' or 'best', got {config.predictive!r}")
    if config.task_batch > config.num_tasks:
        raise ValueError(f"config.task_batch={config.task_batch} exceeds config.num_tasks={config.num_tasks}")
    if min(config.support_sizes) < 1:
        raise ValueError(f"config.support_sizes must be >= 1, got {config.support_sizes}")


def _build_guide(config: HarmonicConfig, rng_key, model, batch, encoder=None, kind=None, **kwargs):
    kwargs["encoder"] = encoder
    if (kind or config.guide) == "iaf":
        return TaskIAFGuide.build(
            rng_key, model, batch, num_flows=config.num_flows, init_loc_scale=config.init_loc_scale, **kwargs
        )
    return TaskNormalGuide.build(rng_key, model, batch, init_loc_scale=config.init_loc_scale, **kwargs)


def make_optimizer(config: HarmonicConfig) -> optax.GradientTransformation:
    """Adam on the network, with a linear warm-up over 5% of the steps and cosine decay to 1%.

    A resumed run with a larger ``num_steps`` keeps the optimiser's step count, so the
    schedule is stretched to the new length from where it stands.
    """
    if config.schedule == "constant":
        return optax.adam(config.learning_rate)
    lr = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        max(1, config.num_steps // 20),
        config.num_steps,
        end_value=0.01 * config.learning_rate,
    )
    return optax.adam(lr)


def meta_train(
    rng_key, config: HarmonicConfig, train: TaskBatch, *, kl_weight: float, desc: str, checkpoint: Path | None = None
):
    """Meta-train the network, the encoder and the per-task guides.

    Returns ``(net, encoder or None, FitResult)``.

    Variational EM over task batches (:func:`~metaprior.inference.local.task_batch_learner`):
    each step refreshes the drawn tasks' guides with ``local_steps`` steps, then moves the
    network and those guides along the subsampled ELBO's gradient.
    """
    k_net, k_guide, k_init, k_fit = jax.random.split(rng_key, 4)
    encoder = None
    if config.encoder_width:
        encoder = SetEncoder(1, 2 * config.latent_dim, width=config.encoder_width, key=jax.random.fold_in(k_net, 1))
    net = make_task_latent_net(
        k_net,
        config.latent_dim,
        arch=config.net,
        width=config.width or None,
        num_layers=config.num_layers or None,
        omega=config.omega,
    )
    model = partial(task_latent_model, net=net, latent_dim=config.latent_dim)
    # Lay the guide out on two tasks (its layout depends on site shapes only) and stretch
    # it to all of them: building on the full set would run the network on every task.
    proto = jax.tree.map(lambda a: a[:2], train)
    guide = guide_for_num_tasks(_build_guide(config, k_guide, model, proto, encoder), train.x.shape[0])
    params = init_params(k_init, model, guide, train, subsample_size=config.task_batch)
    learner = task_batch_learner(
        model,
        guide,
        task_batch=config.task_batch,
        optimizer=make_optimizer(config),
        local_optimizer=optax.adam(config.local_learning_rate),
        local_steps=config.local_steps,
        kl_weight=kl_weight,
    )
    result = fit(
        k_fit,
        learner,
        params,
        config.num_steps,
        data=train,
        steps_per_call=config.steps_per_call,
        desc=desc,
        checkpoint=checkpoint,
        checkpoint_every=config.checkpoint_every,
    )
    trained = _with_params(net, result.state.params["net$params"])
    if encoder is not None:
        encoder = _with_params(encoder, result.state.params[guide.encoder_site])
    return trained, encoder, result


def _with_params(net, params):
    import equinox as eqx

    _, static = eqx.partition(net, eqx.is_inexact_array)
    return eqx.combine(params, static)


def _buckets(sizes: tuple[int, ...], pad_to: int) -> list[tuple[int, tuple[int, ...]]]:
    """Group support sizes into padded shapes: sizes up to ``pad_to`` share one shape
    (``pad_to`` slots, or the largest size if smaller), larger sizes get their own."""
    small = tuple(n for n in sizes if n <= pad_to)
    out = [(max(small), small)] if small else []
    return out + [(n, (n,)) for n in sizes if n > pad_to]


def evaluate(
    rng_key,
    config: HarmonicConfig,
    net,
    tasks: TaskBatch,
    *,
    kl_weight: float,
    encoder=None,
    desc: str = "new-task inference",
):
    """Fit q(z | first N points) per task for each support size; score on the query points.

    Support sizes up to ``config.pad_support`` are fitted in one call of
    :func:`fit_local` (one compilation): their support sets are padded to one shape and
    masked, and the sizes are stacked along the tasks axis (independent local fits);
    each larger size is one more call. The guide is ``config.eval_guide``.

    Returns ``{N: dict(mse [T], nll [T], fit=LocalFit, support=TaskBatch, z)}``.
    """
    model = partial(task_latent_model, net=net, latent_dim=config.latent_dim)
    sizes = tuple(config.support_sizes)
    n_max = max(sizes)
    num_tasks = tasks.x.shape[0]
    query = TaskBatch(tasks.x[:, n_max:], tasks.y[:, n_max:], tasks.mask[:, n_max:])
    out = {}
    buckets = _buckets(sizes, config.pad_support)
    bar = tqdm(total=len(sizes), desc=desc, unit="size", disable=not progress_enabled(None), leave=False)
    for b, (slots, group) in enumerate(buckets):
        k_guide, k_fit, k_pred = jax.random.split(jax.random.fold_in(rng_key, b), 3)
        padded = TaskBatch(
            jnp.concatenate([tasks.x[:, :slots]] * len(group)),
            jnp.concatenate([tasks.y[:, :slots]] * len(group)),
            jnp.concatenate([tasks.mask[:, :slots] & (jnp.arange(slots) < n)[None] for n in group]),
        )
        guide = _build_guide(
            config, k_guide, model, jax.tree.map(lambda a: a[:2], padded), encoder, kind=config.eval_guide
        )
        local = fit_local(
            k_fit,
            model,
            guide,
            padded,
            num_steps=config.adapt_steps,
            num_restarts=config.adapt_restarts,
            optimizer=optax.adam(optax.cosine_decay_schedule(config.adapt_lr, config.adapt_steps, alpha=0.01)),
            num_particles=config.adapt_particles,
            kl_weight=kl_weight,
            num_candidates=config.adapt_candidates,
        )
        if config.predictive == "mixture":
            z_all = sample_restart_mixture(k_pred, local, padded, config.predictive_samples, site="z")
        else:
            z_all = Predictive(local.guide, params=local.params, num_samples=config.predictive_samples)(k_pred, padded)[
                "z"
            ]
        for i, n in enumerate(group):
            rows = slice(i * num_tasks, (i + 1) * num_tasks)
            z = z_all[:, rows]
            mu, sigma = task_latent_predict(net, z, query.x)  # [S, T, Q]
            mse = jnp.mean((mu.mean(axis=0) - query.y) ** 2, axis=-1)
            log_p = jax.scipy.stats.norm.logpdf(query.y[None], mu, sigma)
            nll = -jnp.mean(jax.scipy.special.logsumexp(log_p, axis=0) - jnp.log(log_p.shape[0]), axis=-1)
            support = TaskBatch(tasks.x[:, :n], tasks.y[:, :n], tasks.mask[:, :n])
            fit_n = LocalFit(
                guide_for_num_tasks(local.guide, num_tasks), *jax.tree.map(lambda a: a[rows], tuple(local[1:]))
            )
            weights = np.asarray(restart_weights(fit_n))
            out[n] = dict(
                mse=np.asarray(mse),
                nll=np.asarray(nll),
                fit=fit_n,
                support=support,
                z=np.asarray(z),
                restart_ess=1.0 / np.sum(weights**2, axis=-1),
            )
        bar.update(len(group))
    bar.close()
    return out


def posterior_datatree(rng_key, config, net, result):
    """ArviZ DataTree of q(z | support) for the evaluation tasks at one support size."""
    import arviz as az

    support, z = result["support"], result["z"][:, :, 0, :]  # [S, T, d]
    mu, sigma = task_latent_predict(net, result["z"], support.x)
    y_rep = mu + sigma * jax.random.normal(rng_key, mu.shape)
    log_lik = jax.scipy.stats.norm.logpdf(support.y[None], mu, sigma)
    return az.from_dict(
        {
            "posterior": {"z": z[None]},
            "posterior_predictive": {"y": np.asarray(y_rep)[None]},
            "log_likelihood": {"y": np.asarray(log_lik)[None]},
            "observed_data": {"y": np.asarray(support.y)},
        },
        dims={"z": ["tasks", "latent"], "y": ["tasks", "examples"]},
    )


def plot_posterior_functions(rng_key, config, net, params, task_index, results, out_dir, name):
    """The paper's Figure 1: predictive functions for one task at several support sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [n for n in (1, 2, 8, 256) if n in results] or list(results)[:4]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.2), sharey=True, squeeze=False)
    mu_x = float(params.mu_x[task_index])
    grid = jnp.linspace(mu_x - 3.5, mu_x + 3.5, 200)
    truth = harmonic_fn(jax.tree.map(lambda a: a[task_index : task_index + 1], params), grid[None])[0]
    for ax, n in zip(axes[0], sizes):
        z = results[n]["z"][:20, task_index : task_index + 1]
        mu, _ = task_latent_predict(net, jnp.asarray(z), grid[None, :, None])
        ax.plot(grid, np.asarray(mu[:, 0].T), color="C0", alpha=0.3, lw=1)
        ax.plot(grid, truth, color="k", lw=2, label="true f")
        s = results[n]["support"]
        ax.scatter(s.x[task_index, :, 0], s.y[task_index], color="C3", zorder=3, s=12, label="support")
        ax.set_title(f"{n} point{'s' if n > 1 else ''}")
        ax.set_xlabel("x")
    axes[0][0].set_ylabel("y")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Posterior predictive functions (KL model): 20 samples of z", y=1.04)
    save_figure(fig, out_dir, name)


def plot_mse(results_kl, results_nokl, out_dir):
    """The paper's Figure 2: MSE (and NLL) against support size, both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results_kl)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, res, color in (("KL (ELBO)", results_kl, "C0"), ("no KL", results_nokl, "C1")):
        for ax, key in zip(axes, ("mse", "nll")):
            means = [mean_ci95(res[n][key]) for n in sizes]
            ax.errorbar(
                sizes,
                [m for m, _ in means],
                yerr=[c for _, c in means],
                label=label,
                color=color,
                marker="o",
                capsize=3,
            )
    for ax, title in zip(axes, ("MSE on held-out points", "predictive NLL on held-out points")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("support size")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].set_yscale("symlog")
    axes[0].legend()
    save_figure(fig, out_dir, "mse_vs_support.png")


def run(rng_key, config: HarmonicConfig, out_dir: Path) -> dict[str, float]:
    """Meta-train both models, evaluate on unseen tasks, write plots and the posterior."""
    _check(config)
    out_dir = Path(out_dir)
    k_data, k_eval_data, k_kl, k_nokl, k_ev, k_post = jax.random.split(rng_key, 6)
    train, _ = harmonic_tasks(
        k_data, config.num_tasks, config.max_examples, min_examples=config.min_examples, noise_std=config.noise_std
    )
    n_max = max(config.support_sizes)
    eval_tasks, eval_params = harmonic_tasks(
        k_eval_data, config.eval_tasks, n_max + config.num_query, noise_std=config.noise_std
    )
    metrics: dict[str, float] = {}
    nets, encoders, results = {}, {}, {}
    for tag, key, weight in (("kl", k_kl, 1.0), ("nokl", k_nokl, 0.0)):
        start = time.perf_counter()
        # a checkpoint per model in the output folder: a stopped run resumes there (the
        # same seed and config give the same parameters as an uninterrupted run)
        nets[tag], encoders[tag], res = meta_train(
            key, config, train, kl_weight=weight, desc=f"meta-train ({tag})", checkpoint=out_dir / f"meta_{tag}.ckpt"
        )
        metrics[f"train_time_{tag}_s"] = time.perf_counter() - start
        metrics[f"final_loss_{tag}"] = float(np.mean(res.losses[-max(1, len(res.losses) // 20) :]))
        start = time.perf_counter()
        results[tag] = evaluate(
            k_ev,
            config,
            nets[tag],
            eval_tasks,
            kl_weight=weight,
            encoder=encoders[tag],
            desc=f"new-task inference ({tag})",
        )
        metrics[f"eval_time_{tag}_s"] = time.perf_counter() - start
        for n, r in results[tag].items():
            metrics[f"mse_{tag}_n{n}"], metrics[f"mse_{tag}_n{n}_ci95"] = mean_ci95(r["mse"])
            metrics[f"nll_{tag}_n{n}"], metrics[f"nll_{tag}_n{n}_ci95"] = mean_ci95(r["nll"])
            metrics[f"restart_ess_{tag}_n{n}"] = float(np.mean(r["restart_ess"]))
    metrics["train_time_s"] = metrics["train_time_kl_s"] + metrics["train_time_nokl_s"]
    metrics["kl_beats_nokl_mse_all_n"] = float(
        all(metrics[f"mse_kl_n{n}"] < metrics[f"mse_nokl_n{n}"] for n in config.support_sizes)
    )
    plot_posterior_functions(
        k_post, config, nets["kl"], eval_params, 0, results["kl"], out_dir, "posterior_functions.png"
    )
    plot_mse(results["kl"], results["nokl"], out_dir)
    n_post = config.posterior_support if config.posterior_support in results["kl"] else config.support_sizes[0]
    tree = posterior_datatree(k_post, config, nets["kl"], results["kl"][n_post])
    save_datatree(tree, out_dir / "posterior.nc")
    return metrics


METRICS_DOC = """
mse_{kl,nokl}_n{N}: mean over eval tasks of the held-out MSE of the posterior predictive mean (N = support size),
    plus _ci95
nll_{kl,nokl}_n{N}: mean held-out predictive NLL per point (mixture over posterior samples of z), plus _ci95
restart_ess_{kl,nokl}_n{N}: mean over tasks of the effective number of restarts in the ELBO-weighted mixture
    predictive (1 = one restart carries all the weight; predictive="mixture")
train_time_{kl,nokl}_s, train_time_s: meta-training wall time of this invocation (a resumed run counts only the
    steps it ran); eval_time_{kl,nokl}_s: new-task inference time
final_loss_{kl,nokl}: mean negative ELBO (or NLL) over the last 5% of steps
kl_beats_nokl_mse_all_n: 1.0 if the KL model's MSE is below the baseline's at every N
"""

EXPERIMENTS = [
    Experiment(
        name="harmonic",
        description="learned rich prior over task latents on harmonic signals (KL vs no-KL baseline)",
        make_config=make_config,
        run=run,
        metrics_doc=METRICS_DOC,
    )
]
