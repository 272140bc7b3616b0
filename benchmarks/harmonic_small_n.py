"""Issue 16: KL against no-KL at small support sizes on many unseen tasks.

`metaprior run harmonic` scores both models on 50 unseen tasks; at N <= 4 the per-task
spread of the MSE (about 1, from the random amplitudes) is wider than the gap between any
two predictors, the Bayes-optimal one included (``harmonic_bayes_oracle.py``). This script
takes a finished default run's trained models (``meta_kl.ckpt``, ``meta_nokl.ckpt`` in
``RUN``), draws ``--tasks`` fresh unseen tasks (a key no run uses), and scores both models
with the run's own new-task inference (``harmonic.evaluate``, same settings) at the small
sizes, in chunks, beside the Bayes-optimal predictor under the true task distribution on
the same tasks. It reports each row's mean and 95% interval, the paired gap, and whether
the KL and no-KL intervals are apart.

Usage:
    .venv/bin/metaprior run harmonic --out runs/harmonic      # trains the two models
    .venv/bin/python benchmarks/harmonic_small_n.py runs/harmonic --tasks 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaprior.experiments import harmonic as H
from metaprior.inference.evaluation import mean_ci95
from metaprior.models.task_latent import task_latent_predict

sys.path.insert(0, str(Path(__file__).parent))
from harmonic_bayes_oracle import oracle_task, prior_draws, write_result  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def prior_is_mean(net, num: int, d: int, key, xs, ys, xq):
    """One task's posterior-mean prediction under a model's declared prior ``z ~ N(0, I)``:
    self-normalised importance sampling with ``num`` prior draws (exact as ``num`` grows;
    no fitted guide involved), in chunks of 1,024 draws; ``xs [1, n, 1]``, ``ys [n]``, ``xq [1, Q, 1]``."""
    z = jax.random.normal(key, (num // 1024, 1024, 1, d))

    def chunk(zc):
        mu, sigma = task_latent_predict(net, zc, xs)  # [1024, 1, n]
        loglik = jnp.sum(jax.scipy.stats.norm.logpdf(ys, mu[:, 0], sigma[:, 0]), axis=-1)
        return loglik, task_latent_predict(net, zc, xq)[0][:, 0]

    loglik, f = jax.lax.map(chunk, z)
    w = jax.nn.softmax(loglik.reshape(-1))
    return w @ f.reshape(-1, f.shape[-1])


def query_mse(pred, y) -> list[float]:
    """Per-task MSE of predictions ``pred`` (``[T, Q]``, or a list of ``[Q]``) at ``y [T, Q]``."""
    return np.asarray(jnp.mean((jnp.stack(pred) - y) ** 2, axis=-1)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished `metaprior run harmonic` folder (default size)")
    ap.add_argument("--seed", type=int, default=0, help="the run's --seed")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=250, help="tasks per evaluate call")
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--proposals", type=int, default=0, help="importance proposals per task (0: the run's)")
    ap.add_argument(
        "--prior-is", type=int, default=0, help="also each model's exact posterior mean by this many prior draws"
    )
    ap.add_argument("--draws", type=int, default=50_000, help="true-prior draws per task for the oracle (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "harmonic_small_n.json"))
    args = ap.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    run_dir = Path(args.run)
    for tag in ("kl", "nokl"):
        if not (run_dir / f"meta_{tag}.ckpt").exists():
            raise SystemExit(f"{run_dir / f'meta_{tag}.ckpt'} is missing: run `metaprior run harmonic --out {run_dir}`")
    config = dataclasses.replace(H.make_config("default"), support_sizes=sizes, eval_tasks=args.chunk)
    if args.proposals:
        config = dataclasses.replace(config, num_proposals=args.proposals)
    # the run's keys (run() splits them the same way); the checkpoints are finished, so meta_train only loads them
    k_data, _, k_kl, k_nokl, k_ev, _ = jax.random.split(jax.random.key(args.seed), 6)
    train, _ = H.harmonic_tasks(
        k_data, config.num_tasks, config.max_examples, min_examples=config.min_examples, noise_std=config.noise_std
    )
    models = {}
    for tag, key, weight in (("kl", k_kl, 1.0), ("nokl", k_nokl, 0.0)):
        net, encoder, _ = H.meta_train(
            key, config, train, kl_weight=weight, desc=f"load ({tag})", checkpoint=run_dir / f"meta_{tag}.ckpt"
        )
        models[tag] = (net, encoder, weight)
    n_max = max(sizes)
    tasks, _ = H.harmonic_tasks(
        jax.random.key(2**31 - 7), args.tasks, n_max + config.num_query, noise_std=config.noise_std
    )
    tags = ("kl", "nokl", "oracle", "zero") + (("kl_prior_is", "nokl_prior_is") if args.prior_is else ())
    mse = {tag: {n: [] for n in sizes} for tag in tags}
    prior_is = {
        tag: jax.jit(partial(prior_is_mean, net, args.prior_is, config.latent_dim)) for tag, (net, *_) in models.items()
    }
    draws = prior_draws(jax.random.key(12345), args.draws) if args.draws else None
    oracle = jax.jit(lambda xs, ys, q: oracle_task(draws, xs, ys, q, config.noise_std, min(10_000, args.draws)))
    start = time.perf_counter()
    for c0 in range(0, args.tasks, args.chunk):
        part = jax.tree.map(lambda a: a[c0 : c0 + args.chunk], tasks)
        x, y = part.x, part.y  # [T, points, 1], [T, points]
        for tag, (net, encoder, weight) in models.items():
            for n in sizes if args.prior_is else ():
                keys = jax.random.split(jax.random.fold_in(k_ev, c0 + n), len(x))
                pred = [prior_is[tag](keys[t], x[t : t + 1, :n], y[t, :n], x[t : t + 1, n_max:]) for t in range(len(x))]
                mse[f"{tag}_prior_is"][n].extend(query_mse(pred, y[:, n_max:]))
            out = H.evaluate(jax.random.fold_in(k_ev, c0), config, net, part, kl_weight=weight, encoder=encoder)
            for n in sizes:
                mse[tag][n].extend(np.asarray(out[n]["mse"]).tolist())
        for n in sizes:
            mse["zero"][n].extend(query_mse(jnp.zeros_like(y[:, n_max:]), y[:, n_max:]))
            if draws is not None:
                pred = [oracle(x[t, :n, 0], y[t, :n], x[t, n_max:, 0])[0] for t in range(len(x))]
                mse["oracle"][n].extend(query_mse(pred, y[:, n_max:]))
        done = min(c0 + args.chunk, args.tasks)
        print(f"{done}/{args.tasks} tasks, {time.perf_counter() - start:.0f} s", flush=True)
    rows = {}
    for n in sizes:
        row = {}
        for tag in mse:
            if mse[tag][n]:
                row[f"mse_{tag}"], row[f"mse_{tag}_ci95"] = mean_ci95(np.asarray(mse[tag][n]))
        for sfx in ("", "_prior_is") if args.prior_is else ("",):
            gap = np.asarray(mse[f"nokl{sfx}"][n]) - np.asarray(mse[f"kl{sfx}"][n])
            row[f"mse_gap{sfx}"], row[f"mse_gap{sfx}_ci95"] = mean_ci95(gap)
            kl_top = row[f"mse_kl{sfx}"] + row[f"mse_kl{sfx}_ci95"]
            row[f"intervals_apart{sfx}"] = bool(kl_top < row[f"mse_nokl{sfx}"] - row[f"mse_nokl{sfx}_ci95"])
        rows[f"n{n}"] = row
        print(f"N={n}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    result = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        jax=jax.__version__,
        run=str(run_dir),
        tasks=args.tasks,
        num_proposals=config.num_proposals,
        draws=args.draws,
        wall_s=time.perf_counter() - start,
        rows=rows,
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
