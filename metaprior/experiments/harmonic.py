"""``metaprior run harmonic``: the learned rich prior on harmonic signals.

Reproduces the toy experiment of Lacoste et al. (2018): meta-train the task-latent
model on harmonic tasks with the ELBO ("kl") and without its KL term ("nokl", the
paper's baseline), then, with the network fixed, fit q(z | support) on unseen tasks
for support sizes 1..256 and score the posterior predictive on held-out points.
Meta-training checkpoints each model into ``--out`` (``meta_kl.ckpt``,
``meta_nokl.ckpt``); a stopped run resumes there, a finished one trains on with a
larger ``--steps``.
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

from metaprior.data.tasks import TaskBatch, harmonic_fn, harmonic_second_moment, harmonic_tasks
from metaprior.experiments._common import save_datatree
from metaprior.experiments._plots import latent_functions_figure, support_size_figure
from metaprior.experiments._registry import ConfigError, Experiment
from metaprior.inference.guides import SetEncoder
from metaprior.inference.local import guide_for_num_tasks, task_batch_learner
from metaprior.inference.meta import fit
from metaprior.inference.svi import bind_modules, init_params
from metaprior.inference.task_latent import (
    PREDICTIVES,
    build_task_guide,
    infer_support_sizes,
    posterior_datatree,
    prior_importance_sizes,
    score_support_sizes,
    support_size_metrics,
    warmup_cosine_adam,
    with_params,
)
from metaprior.models import task_latent as tl
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
    adapt_restarts_large: int = 12  # for sizes above pad_support: sharp posteriors, more local optima
    adapt_candidates: int = 1024  # restarts start at the best of this many prior draws (0: plain draws)
    adapt_lr: float = 0.05
    adapt_particles: int = 1
    predictive_samples: int = 100
    predictive: str = "importance"  # or "mixture" (restarts' q by ELBO) or "best" (see infer_support_sizes)
    num_proposals: int = 1024  # importance proposals per task and support size
    posterior_support: int = 8
    exact_support: int = 4  # sizes up to this: prior importance sampling (no fitted guide), see evaluate
    exact_draws: int = 65536  # prior draws, shared by all tasks, for those sizes
    exact_tasks: int = 2000  # unseen tasks scored at those sizes, the eval tasks first (at least eval_tasks)


def make_config(size: str) -> HarmonicConfig:
    if size == "quick":
        small = dict(num_tasks=200, latent_dim=4, width=32, num_steps=40, eval_tasks=4, support_sizes=(1, 8))
        small.update(num_query=20, adapt_steps=20, adapt_restarts=2, adapt_restarts_large=2, adapt_candidates=8)
        small.update(num_proposals=64, exact_support=1, exact_draws=1024, exact_tasks=0)
        return HarmonicConfig(**small, predictive_samples=16)
    if size == "default":
        return HarmonicConfig(eval_tasks=50)
    if size == "full":
        # the paper's data (5,000 tasks, 100 eval tasks) with the FiLM net; `--set net=paper` gives the paper's
        # 12x128 residual MLP (MSE 0.31 after 20,000 steps given the true task parameters, harmonic_oracle.py)
        return HarmonicConfig(num_steps=20_000)
    raise ValueError(f"unknown size {size!r}")


def _check(config: HarmonicConfig) -> None:
    choices = dict(net=ARCHS, schedule=("warmup-cosine", "constant"), guide=("iaf", "normal"))
    choices.update(eval_guide=("iaf", "normal"), predictive=PREDICTIVES)
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ConfigError(f"config.{field} must be one of {allowed}, got {getattr(config, field)!r}")
    if config.task_batch > config.num_tasks:
        raise ConfigError(f"config.task_batch={config.task_batch} exceeds config.num_tasks={config.num_tasks}")
    if min(config.support_sizes) < 1:
        raise ConfigError(f"config.support_sizes must be >= 1, got {config.support_sizes}")


def meta_train(
    rng_key, config: HarmonicConfig, train: TaskBatch, *, kl_weight: float, desc: str, checkpoint: Path | None = None
):
    """Meta-train the network, encoder and task guides by variational EM over task batches (``local_steps``
    guide steps, then a step of the subsampled ELBO; ``kl_weight = 0``: the no-KL baseline): ``(net, encoder, fit)``."""
    k_net, k_guide, k_init, k_fit = jax.random.split(rng_key, 4)
    encoder = None
    if config.encoder_width:
        encoder = SetEncoder(1, 2 * config.latent_dim, width=config.encoder_width, key=jax.random.fold_in(k_net, 1))
    size = dict(width=config.width or None, num_layers=config.num_layers or None, omega=config.omega)
    net = make_task_latent_net(k_net, config.latent_dim, arch=config.net, **size)
    model = partial(task_latent_model, net=net, latent_dim=config.latent_dim)
    # lay the guide out on two tasks (its layout depends on site shapes only), then stretch it
    kw = dict(kind=config.guide, num_flows=config.num_flows, init_loc_scale=config.init_loc_scale, encoder=encoder)
    guide = build_task_guide(k_guide, model, jax.tree.map(lambda a: a[:2], train), **kw)
    guide = guide_for_num_tasks(guide, train.x.shape[0])
    params = init_params(k_init, model, guide, train, subsample_size=config.task_batch)
    optimizer = warmup_cosine_adam(config.learning_rate, config.num_steps, config.schedule)
    local = dict(local_optimizer=optax.adam(config.local_learning_rate), local_steps=config.local_steps)
    learner = task_batch_learner(
        model, guide, task_batch=config.task_batch, optimizer=optimizer, kl_weight=kl_weight, **local
    )
    kw = dict(steps_per_call=config.steps_per_call, checkpoint=checkpoint, checkpoint_every=config.checkpoint_every)
    result = fit(k_fit, learner, params, config.num_steps, data=train, desc=desc, **kw)
    trained = with_params(net, result.state.params["net$params"])
    if encoder is not None:
        encoder = with_params(encoder, result.state.params[guide.encoder_site])
    return trained, encoder, result


def evaluate(rng_key, config: HarmonicConfig, net, tasks: TaskBatch, *, kl_weight: float, encoder=None, desc=""):
    """Posterior draws of z given each task's first N points, scored on the points after the largest N: sizes up to
    ``exact_support`` by prior importance sampling on all ``tasks``, larger ones by fitted q(z | support) on the first
    ``eval_tasks``. Returns ``{N: dict(mse [T], nll [T], support, z, is_ess, ...)}``."""
    model = partial(task_latent_model, net=net, latent_dim=config.latent_dim, broadcast=True)
    model = bind_modules(model, {tl.NET_SITE: net})  # the learned prior, explicitly (fit_local checks)
    kw = dict(num_steps=config.adapt_steps, learning_rate=config.adapt_lr, num_restarts=config.adapt_restarts)
    kw.update(large_restarts=config.adapt_restarts_large, num_candidates=config.adapt_candidates)
    kw.update(num_particles=config.adapt_particles, kl_weight=kl_weight, num_proposals=config.num_proposals)
    kw.update(num_samples=config.predictive_samples, predictive=config.predictive, pad_to=config.pad_support)
    kw.update(guide_kind=config.eval_guide, num_flows=config.num_flows, init_loc_scale=config.init_loc_scale)
    exact = [n for n in config.support_sizes if n <= config.exact_support]
    fitted = [n for n in config.support_sizes if n > config.exact_support]
    first = jax.tree.map(lambda a: a[: config.eval_tasks], tasks)
    k_fit, k_exact = jax.random.split(rng_key)
    out = infer_support_sizes(k_fit, model, first, fitted, encoder=encoder, desc=desc, **kw) if fitted else {}
    predict, n_max = partial(task_latent_predict, net), max(config.support_sizes)
    score_support_sizes(predict, out, first.x[:, n_max:], first.y[:, n_max:])
    if exact:
        kw = dict(latent_dim=config.latent_dim, num_draws=config.exact_draws, num_samples=config.predictive_samples)
        exact_out = prior_importance_sizes(k_exact, predict, tasks, exact, desc=f"{desc}, N <= {exact[-1]}", **kw)
        score_support_sizes(predict, exact_out, tasks.x[:, n_max:], tasks.y[:, n_max:])
        out.update(exact_out)
    return dict(sorted(out.items()))


def run(rng_key, config: HarmonicConfig, out_dir: Path) -> dict[str, float]:
    """Meta-train both models, evaluate on unseen tasks, write plots and the posterior."""
    _check(config)
    out_dir = Path(out_dir)
    k_data, k_eval_data, k_kl, k_nokl, k_ev, k_post = jax.random.split(rng_key, 6)
    noise, zero = dict(noise_std=config.noise_std), harmonic_second_moment(config.noise_std)  # zero: E[y^2], exact
    train, _ = harmonic_tasks(k_data, config.num_tasks, config.max_examples, min_examples=config.min_examples, **noise)
    n_max = max(config.support_sizes)
    eval_tasks, eval_params = harmonic_tasks(k_eval_data, config.eval_tasks, n_max + config.num_query, **noise)
    extra = (config.exact_tasks if config.exact_support else 0) - config.eval_tasks
    if extra > 0:  # more unseen tasks for the exact small-N posteriors, after the eval tasks
        more, _ = harmonic_tasks(jax.random.fold_in(k_eval_data, 1), extra, n_max + config.num_query, **noise)
        eval_tasks = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), eval_tasks, more)
    metrics, nets, results = {}, {}, {}
    for tag, key, weight in (("kl", k_kl, 1.0), ("nokl", k_nokl, 0.0)):
        start = time.perf_counter()
        kw = dict(kl_weight=weight, desc=f"meta-train ({tag})", checkpoint=out_dir / f"meta_{tag}.ckpt")
        nets[tag], encoder, res = meta_train(key, config, train, **kw)
        metrics[f"train_time_{tag}_s"] = time.perf_counter() - start
        metrics[f"final_loss_{tag}"] = float(np.mean(res.losses[-max(1, len(res.losses) // 20) :]))
        start = time.perf_counter()
        desc = f"new-task inference ({tag})"
        results[tag] = evaluate(k_ev, config, nets[tag], eval_tasks, kl_weight=weight, encoder=encoder, desc=desc)
        metrics[f"eval_time_{tag}_s"] = time.perf_counter() - start
    metrics.update(support_size_metrics(results, baseline="nokl", model="kl", zero_mse_mean=zero))
    m, small = metrics, [n for n in config.support_sizes if n <= config.exact_support]
    m["train_time_s"] = m["train_time_kl_s"] + m["train_time_nokl_s"]
    m["kl_beats_nokl_mse_all_n"] = float(all(m[f"mse_kl_n{n}"] < m[f"mse_nokl_n{n}"] for n in config.support_sizes))
    m["kl_gap_above_zero_small_n"] = float(all(m[f"mse_gap_n{n}"] > m[f"mse_gap_n{n}_ci95"] for n in small))
    m["kl_intervals_apart_small_n"] = float(all(m[f"mse_cv_apart_n{n}"] for n in small))
    mu_x, predict_kl = float(eval_params.mu_x[0]), partial(task_latent_predict, nets["kl"])
    grid = jnp.linspace(mu_x - 3.5, mu_x + 3.5, 200)
    truth = harmonic_fn(jax.tree.map(lambda a: a[:1], eval_params), grid[None])[0]
    title = "Posterior predictive functions (KL model): 20 samples of z"
    latent_functions_figure(predict_kl, results["kl"], grid, truth, out_dir, "posterior_functions.png", title=title)
    panels = [("mse", "MSE on held-out points", "log"), ("nll", "predictive NLL on held-out points", "symlog")]
    support_size_figure({"KL (ELBO)": results["kl"], "no KL": results["nokl"]}, panels, out_dir, "mse_vs_support.png")
    n_post = config.posterior_support if config.posterior_support in results["kl"] else config.support_sizes[0]
    post = results["kl"][n_post]
    save_datatree(posterior_datatree(k_post, predict_kl, post["z"], post["support"]), out_dir / "posterior.nc")
    return metrics


METRICS_DOC = """
mse_{kl,nokl}_n{N}: mean over tasks of the held-out MSE of the posterior predictive mean (N = support size), plus
    _ci95. N <= exact_support (default 4): z drawn from each model's exact posterior under its declared prior
    z ~ N(0, I) by prior importance sampling (exact_draws per task), on exact_tasks unseen tasks (default 2,000);
    larger N: fitted q(z | support) on eval_tasks (default 50), with predictive="importance" reweighting to the
    same posterior. The no-KL model is scored under that prior too (its training ignored it)
nll_{kl,nokl}_n{N}: mean held-out predictive NLL per point (mixture over posterior samples of z), plus _ci95
tasks_n{N}: how many unseen tasks size N was scored on
restart_ess_{kl,nokl}_n{N}: mean over tasks of the effective number of restarts in the ELBO-weighted mixture
    predictive (1 = one restart carries all the weight; fitted sizes only)
train_time_{kl,nokl}_s, train_time_s: meta-training wall time of this invocation (a resumed run counts only the
    steps it ran); eval_time_{kl,nokl}_s: new-task inference time
final_loss_{kl,nokl}: mean negative ELBO (or NLL) over the last 5% of steps
mse_{kl,nokl}_n{N}_cv, _cv_ci95: mean MSE with the zero predictor's (mse_zero_n{N}, exact mean 1 + noise_std^2)
    as a control variate: same expectation, narrower interval; mse_cv_apart_n{N}: 1.0 if KL's is below no-KL's
mse_gap_n{N}: mean over tasks of (no-KL MSE - KL MSE) on the same task, plus _ci95 (the paired interval;
    positive: the KL model is better)
is_ess_{kl,nokl}_n{N}: mean over tasks of the importance sampler's effective sample size (out of exact_draws for
    N <= exact_support, else out of num_proposals with predictive="importance")
kl_beats_nokl_mse_all_n: 1.0 if the KL model's MSE is below the baseline's at every N
kl_gap_above_zero_small_n: 1.0 if at every N <= exact_support the paired gap's 95% interval lies above zero
kl_intervals_apart_small_n: 1.0 if at every N <= exact_support the two models' _cv_ci95 intervals are apart
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
