"""The Bayes-optimal predictor on the harmonic eval tasks: what any method can reach at small N.

`metaprior run harmonic` scores the KL and no-KL models' posterior-predictive means on
the same unseen tasks. This script scores the best possible predictor on those tasks:
the posterior mean under the *true* task distribution (Lacoste et al. 2018, section 4.1;
``metaprior.data.tasks.harmonic_tasks``) and the true noise, by self-normalised
importance sampling with the true prior as proposal (``--draws`` task-parameter sets per
task). Its held-out MSE is a lower bound for any method's expected MSE at that support
size; the gap between the zero predictor (``f = 0``, about Var f = 1) and this bound is
all the room a learned prior has. The ESS is reported: where it is small (N >= 4 with
noise 0.05) the bound is itself noisy.

It then says how many eval tasks would put the 95% intervals of the oracle's MSE and the
no-KL model's apart (from the per-task spreads, normal approximation), using a run's
``metrics.json`` for the no-KL row (``--metrics``).

Usage:
    .venv/bin/python benchmarks/harmonic_bayes_oracle.py --metrics runs/harmonic/metrics.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaprior.data.tasks import HarmonicParams, harmonic_fn, harmonic_tasks
from metaprior.experiments.harmonic import make_config
from metaprior.inference.evaluation import mean_ci95

RESULTS = Path(__file__).parent / "results"


def prior_draws(rng_key, num: int) -> HarmonicParams:
    k = jax.random.split(rng_key, 5)
    return HarmonicParams(
        omega=jax.random.uniform(k[0], (num,), minval=5.0, maxval=7.0),
        b1=jax.random.uniform(k[1], (num,), maxval=2 * math.pi),
        b2=jax.random.uniform(k[2], (num,), maxval=2 * math.pi),
        a1=jax.random.normal(k[3], (num,)),
        a2=jax.random.normal(k[4], (num,)),
        mu_x=jnp.zeros((num,)),
    )


def oracle_task(draws: HarmonicParams, xs, ys, xq, noise: float, chunk: int):
    """One task: posterior-mean prediction at ``xq`` given support ``(xs, ys)``; ``(pred, ess)``."""
    num = draws.omega.shape[0]

    def loglik(part):
        f = harmonic_fn(part, jnp.broadcast_to(xs, (part.omega.shape[0], xs.shape[0])))
        return jnp.sum(jax.scipy.stats.norm.logpdf(ys, f, noise), axis=-1)

    parts = jax.tree.map(lambda a: a.reshape(num // chunk, chunk), draws)
    log_w = jax.lax.map(loglik, parts).reshape(-1)
    w = jax.nn.softmax(log_w)
    f_q = jax.lax.map(lambda part: harmonic_fn(part, jnp.broadcast_to(xq, (chunk, xq.shape[0]))), parts).reshape(
        num, -1
    )
    return w @ f_q, 1.0 / jnp.sum(w**2)


def write_result(path: str, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (folders made as needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4,8", help="support sizes")
    ap.add_argument("--draws", type=int, default=200_000, help="true-prior draws per task")
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0, help="the run's --seed (same eval tasks)")
    ap.add_argument("--metrics", default="", help="a default run's metrics.json, for the comparison")
    ap.add_argument("--out", default=str(RESULTS / "harmonic_bayes_oracle.json"))
    args = ap.parse_args()
    config = make_config("default")
    sizes = [int(s) for s in args.sizes.split(",")]
    # the eval tasks of `metaprior run harmonic --seed S` (run() splits the key the same way)
    k_eval = jax.random.split(jax.random.key(args.seed), 6)[1]
    n_max = max(config.support_sizes)
    tasks, _ = harmonic_tasks(k_eval, config.eval_tasks, n_max + config.num_query, noise_std=config.noise_std)
    x, y = tasks.x[..., 0], tasks.y
    xq, yq = x[:, n_max:], y[:, n_max:]
    draws = prior_draws(jax.random.key(12345), args.draws)
    run = jax.jit(lambda xs, ys, q: oracle_task(draws, xs, ys, q, config.noise_std, args.chunk))
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else {}
    rows = {}
    zero = np.asarray(jnp.mean(yq**2, axis=-1))
    rows["zero_predictor"] = dict(zip(("mse", "mse_ci95"), mean_ci95(zero), strict=True))
    start = time.perf_counter()
    for n in sizes:
        preds, ess = zip(*(run(x[t, :n], y[t, :n], xq[t]) for t in range(x.shape[0])), strict=True)
        mse = np.asarray(jnp.mean((jnp.stack(preds) - yq) ** 2, axis=-1))
        m, ci = mean_ci95(mse)
        row = dict(mse=m, mse_ci95=ci, ess_median=float(np.median(ess)), ess_min=float(np.min(ess)))
        row["oracle_minus_zero"], row["oracle_minus_zero_ci95"] = mean_ci95(mse - zero)
        for tag in ("kl", "nokl"):
            if f"mse_{tag}_n{n}" in metrics:
                row[f"mse_{tag}"] = metrics[f"mse_{tag}_n{n}"]
                row[f"mse_{tag}_ci95"] = metrics[f"mse_{tag}_n{n}_ci95"]
        if "mse_nokl" in row and row["mse_nokl"] > m:
            # tasks T such that 1.96 (sd_a + sd_b) / sqrt(T) < gap, with the sds of this run's 50 tasks
            sd_sum = (ci + row["mse_nokl_ci95"]) * math.sqrt(x.shape[0]) / 1.96
            row["tasks_for_oracle_vs_nokl_apart"] = math.ceil((1.96 * sd_sum / (row["mse_nokl"] - m)) ** 2)
        rows[f"n{n}"] = row
        print(f"N={n}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    result = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        jax=jax.__version__,
        eval_tasks=int(x.shape[0]),
        draws=args.draws,
        wall_s=time.perf_counter() - start,
        metrics_file=args.metrics,
        rows=rows,
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
