"""``metaprior run sinusoid-maml`` and ``sinusoid-llama``: MAML's sinusoid regression.

Tasks ``y = A sin(x - b)`` (Finn et al. 2017, section 5.1): an MLP with two hidden layers
of 40 ReLU units, inner loop ``optax.sgd(0.01)``; one model per support size K in
``shots`` (Meta-SGD's protocol), K query points per task in training, scored on 600 new
tasks after 10 inner steps. ``sinusoid-llama`` meta-trains with ML-LAPLACE (K-FAC
log-determinant, Grant et al. 2018; at the default size only for the last
``laplace_steps`` steps, after ML-POINT; ``--full`` throughout) and predicts with each new
task's Laplace posterior ``N(phi_hat, (H + tau_pred I)^{-1})``; the noise ``sigma`` and
``tau_pred`` are chosen by empirical Bayes on separate validation tasks, never on the test tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.data.tasks import SinusoidParams, SupportQuery, sinusoid_fn, sinusoid_meta_batch, sinusoid_support_query
from metaprior.experiments._common import mean_ci95
from metaprior.experiments._plots import functions_figure, training_figure
from metaprior.experiments._registry import ConfigError, Experiment
from metaprior.inference.diagnostics import save_posterior, to_datatree
from metaprior.inference.evaluation import grid_search, sampled_regression_scores
from metaprior.inference.laplace import vmap_apply
from metaprior.inference.maml import laplace_predict, method_from, mse_loss, point_predict
from metaprior.inference.meta import fit, meta_learner
from metaprior.models.nets import MLP

X_RANGE = (-5.0, 5.0)
# MSE = Gaussian NLL with sigma^2 = 1/2 (up to a constant): the likelihood LLAMA's
# training-time log-determinant uses, so its curvature matches the inner loss.
TRAIN_SIGMA = math.sqrt(0.5)


@dataclasses.dataclass(frozen=True)
class SinusoidMAMLConfig:
    """Configuration; ``make_config`` gives the quick / default / full sizes."""

    method: str = "maml"  # "maml" (ML-POINT) or "llama" (ML-LAPLACE)
    shots: tuple[int, ...] = (5, 10)
    hidden: tuple[int, ...] = (40, 40)
    num_steps: int = 20000
    meta_batch: int = 25
    meta_lr: float = 1e-3
    inner_lr: float = 0.01
    train_inner_steps: int = 1
    eval_inner_steps: int = 10
    first_order: bool = False
    eta: float = 1e-6
    tau: float = 1e-3
    kron_damping: str = "factored"  # log-det of the training objective (see laplace.log_det)
    log_det_tasks: int = 5  # tasks per batch whose log-det enters the objective (unbiased)
    # LLAMA: the last laplace_steps steps optimise ML-LAPLACE, those before ML-POINT (the
    # log-det's curvature dominates a step's cost); laplace_steps = num_steps: throughout
    laplace_steps: int = 500
    steps_per_call: int = 200
    checkpoint_every: int = 500  # meta-training steps between checkpoints in --out (atomic; a killed run resumes there)
    num_eval_tasks: int = 600
    num_val_tasks: int = 200
    num_eval_points: int = 100
    num_posterior_samples: int = 200
    sigma_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
    tau_grid: tuple[float, ...] = (0.001, 0.1, 1.0, 10.0, 100.0, 1000.0)


def make_config(method: str, size: str) -> SinusoidMAMLConfig:
    base = SinusoidMAMLConfig(method=method)
    if size == "quick":
        small = dict(shots=(10,), num_steps=40, steps_per_call=20, laplace_steps=20, num_eval_tasks=20)
        small.update(num_val_tasks=10, num_eval_points=20, num_posterior_samples=20)
        return dataclasses.replace(base, **small, sigma_grid=(0.1, 0.5), tau_grid=(1.0, 100.0))
    if size == "full":
        return dataclasses.replace(base, num_steps=70000, laplace_steps=70000, log_det_tasks=25)
    return base


def _likelihood(sigma):
    return lambda f: dist.Normal(f[..., 0], sigma)


def objective(config: SinusoidMAMLConfig, method: str | None = None):
    """The meta-objective of ``method`` (default ``config.method``)."""
    method = config.method if method is None else method
    if method not in ("maml", "llama"):
        raise ConfigError(f"method must be 'maml' or 'llama', got {method!r}")
    kw = dict(eta=config.eta, kron_damping=config.kron_damping, log_det_tasks=config.log_det_tasks)
    kw.update(likelihood=_likelihood(TRAIN_SIGMA), prior_precision=config.tau, first_order=config.first_order)
    kw.update(train_inner_steps=config.train_inner_steps, eval_inner_steps=config.eval_inner_steps)
    init = lambda key, _ways: MLP(1, 1, config.hidden, key=key)
    inner = optax.sgd(config.inner_lr)
    return method_from(method, mse_loss(vmap_apply), inner, init=init, apply_fn=vmap_apply, **kw).loss


def _inner(config):
    inner = dict(apply_fn=vmap_apply, loss_fn=mse_loss(vmap_apply), inner_optimizer=optax.sgd(config.inner_lr))
    return dict(inner, num_steps=config.eval_inner_steps, link=lambda f: f[..., 0])


def point_predictions(theta, tasks: SupportQuery, x=None, *, config) -> jax.Array:
    """Adapted predictions ``[T, Q]`` at the query inputs (or at ``x [T, Q, 1]``)."""
    x = tasks.query_x if x is None else x
    return point_predict(theta, tasks.support_x, tasks.support_y, x, **_inner(config))


def posterior_functions(rng_key, theta, tasks: SupportQuery, sigma, tau, num_samples, x=None, *, config):
    """Laplace posterior draws of ``f`` at the query inputs: ``[T, S, Q]``."""
    x = tasks.query_x if x is None else x
    kw = dict(likelihood=_likelihood(sigma), prior_precision=tau, num_samples=num_samples)
    return laplace_predict(rng_key, theta, tasks.support_x, tasks.support_y, x, **kw, **_inner(config))


def run(rng_key: jax.Array, config: SinusoidMAMLConfig, out_dir: Path) -> dict[str, float]:
    """Meta-train one model per K in ``config.shots``; evaluate; plot; save posterior."""
    out_dir = Path(out_dir)
    k_init, k_train, k_eval, k_val, k_plot = jax.random.split(rng_key, 5)
    # (method, steps) phases: MAML throughout; LLAMA's ML-LAPLACE for the last laplace_steps
    n_lap = min(config.laplace_steps, config.num_steps) if config.method == "llama" else 0
    phases = [(m, n) for m, n in (("maml", config.num_steps - n_lap), ("llama", n_lap)) if n > 0]
    metrics: dict[str, float] = {"train_steps": config.num_steps, "meta_batch": config.meta_batch}
    if config.method == "llama":
        metrics["laplace_steps"] = n_lap
    models, histories = {}, {}
    for k in config.shots:
        params, losses = MLP(1, 1, config.hidden, key=k_init), []
        start = time.perf_counter()
        for i, (method, steps) in enumerate(phases):
            learner = meta_learner(objective(config, method), optax.adam(config.meta_lr), has_aux=True)
            sampler = lambda key, _: sinusoid_meta_batch(key, config.meta_batch, k)
            kw = dict(steps_per_call=min(config.steps_per_call, steps), checkpoint_every=config.checkpoint_every)
            kw["checkpoint"] = out_dir / f"meta_k{k}_{method}.ckpt"
            key = jax.random.fold_in(jax.random.fold_in(k_train, k), i)
            desc = f"sinusoid-{config.method} K={k} ({method})"
            result = fit(key, learner, params, steps, sample_batch=sampler, desc=desc, **kw)
            params = result.state.params
            losses.append(result.losses)
        metrics[f"train_time_k{k}_s"] = time.perf_counter() - start
        models[k], histories[k] = params, np.concatenate(losses)

    predict = jax.jit(functools.partial(point_predictions, config=config))
    sample_f = jax.jit(functools.partial(posterior_functions, config=config), static_argnums=(5,))
    for k in config.shots:
        tasks, _ = sinusoid_support_query(
            jax.random.fold_in(k_eval, k), config.num_eval_tasks, k, config.num_eval_points
        )
        mse = jnp.mean((predict(models[k], tasks) - tasks.query_y) ** 2, axis=1)
        metrics[f"mse_k{k}"], metrics[f"mse_k{k}_ci95"] = mean_ci95(mse)
        if config.method != "llama":
            continue
        # Empirical Bayes for the predictive's sigma and tau on validation tasks.
        val, _ = sinusoid_support_query(jax.random.fold_in(k_val, k), config.num_val_tasks, k, config.num_eval_points)

        def val_lpd(tau_sigma):
            tau, sigma = tau_sigma
            f = sample_f(k_plot, models[k], val, sigma, tau, config.num_posterior_samples)
            return jnp.mean(sampled_regression_scores(k_plot, f, val.query_y, sigma)[0])

        (tau, sigma), _ = grid_search(val_lpd, itertools.product(config.tau_grid, config.sigma_grid), minimize=False)
        f = sample_f(jax.random.fold_in(k_plot, k), models[k], tasks, sigma, tau, config.num_posterior_samples)
        lpd, inside = sampled_regression_scores(jax.random.fold_in(k_plot, 2 * k), f, tasks.query_y, sigma)
        suffix = "" if k == max(config.shots) else f"_k{k}"
        metrics[f"coverage90{suffix}"] = float(jnp.mean(inside))
        metrics[f"nll_k{k}"], metrics[f"nll_k{k}_ci95"] = mean_ci95(-jnp.mean(lpd, axis=1))
        metrics[f"sigma_k{k}"], metrics[f"tau_pred_k{k}"] = sigma, tau

    sigma, tau = metrics.get(f"sigma_k{max(config.shots)}"), metrics.get(f"tau_pred_k{max(config.shots)}")
    save_posterior(
        _figure(k_plot, config, models[max(config.shots)], sigma, tau, sample_f, predict, out_dir),
        out_dir / "posterior.nc",
    )
    training_figure({f"K={k}": h for k, h in histories.items()}, out_dir, log=True)
    return metrics


def _figure(rng_key, config, theta, sigma, tau, sample_f, predict, out_dir):
    """The two tasks of Grant et al. (2018) Figure 5 (10 points from the whole range, and
    from the lower half only: ambiguous, wider spread expected), plotted; returns their
    function draws as an ArviZ tree."""
    k = max(config.shots)
    params = SinusoidParams(amplitude=jnp.array([3.0, 3.0]), phase=jnp.array([0.5, 0.5]))
    k1, k2 = jax.random.split(rng_key)
    sx = jnp.stack(
        [
            jax.random.uniform(k1, (k, 1), minval=-5.0, maxval=5.0),
            jax.random.uniform(k2, (k, 1), minval=-5.0, maxval=0.0),
        ]
    )
    sy = sinusoid_fn(params, sx[..., 0])
    grid = jnp.linspace(*X_RANGE, 200)
    gx = jnp.broadcast_to(grid[None, :, None], (2, 200, 1))
    tasks = SupportQuery(sx, sy, gx, sinusoid_fn(params, gx[..., 0]))
    if config.method == "llama":
        f = sample_f(rng_key, theta, tasks, sigma, tau, config.num_posterior_samples)  # [2, S, 200]
    else:
        f = predict(theta, tasks)[:, None, :]
    titles = (f"{k} points from [-5, 5]", f"{k} points from [-5, 0] (ambiguous)")
    panels = [
        dict(title=titles[j], grid=grid, samples=f[j], truth=tasks.query_y[j], support_x=sx[j, :, 0], support_y=sy[j])
        for j in range(2)
    ]
    label = "Laplace posterior samples" if config.method == "llama" else "MAML adapted function"
    title = f"sinusoid-{config.method}: new tasks after {config.eval_inner_steps} inner steps"
    functions_figure(panels, out_dir, "posterior_samples.png", title=title, label=label)
    return to_datatree(
        {"f": np.asarray(f).transpose(1, 0, 2)[None]},
        observed_data={"y_support": np.asarray(sy), "x_support": np.asarray(sx[..., 0])},
        dims={"f": ["task", "x"], "y_support": ["task", "support"], "x_support": ["task", "support"]},
        coords={"x": np.asarray(grid), "task": ["whole_range", "lower_half"]},
        attrs={"method": config.method, "sigma": float(sigma or 0.0), "tau_pred": float(tau or 0.0)},
    )


METRICS_DOC = """
mse_k5, mse_k10: query MSE over 600 new tasks after 10 inner steps (with _ci95)
coverage90: LLAMA only; fraction of query points (K=10) inside the 90% posterior
  predictive interval (Laplace samples + observation noise); coverage90_k5 likewise
nll_k5, nll_k10: LLAMA only; query predictive NLL per point (with _ci95)
sigma_k*, tau_pred_k*: LLAMA only; noise and prior precision chosen on validation tasks
train_time_k5_s, train_time_k10_s, train_steps, meta_batch, laplace_steps (LLAMA)
"""

EXPERIMENTS = [
    Experiment(
        name="sinusoid-maml",
        description="MAML (ML-POINT) on sinusoid regression, K=5 and K=10",
        make_config=functools.partial(make_config, "maml"),
        run=run,
        metrics_doc=METRICS_DOC,
    ),
    Experiment(
        name="sinusoid-llama",
        description="LLAMA (ML-LAPLACE, K-FAC) on sinusoid regression: MSE and posterior coverage",
        make_config=functools.partial(make_config, "llama"),
        run=run,
        metrics_doc=METRICS_DOC,
    ),
]
