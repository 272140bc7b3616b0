"""Issue 16: KL against no-KL at small support sizes on many unseen tasks.

At N <= 4 the per-task spread of the MSE (about 1, from the random amplitudes) is wider
than the gap between any two predictors, the Bayes-optimal one included
(``harmonic_bayes_oracle.py``), so telling them apart takes thousands of tasks. This script
takes a finished default run's trained models (``meta_kl.ckpt``, ``meta_nokl.ckpt`` in
``RUN``), draws ``--tasks`` fresh unseen tasks (a key no run uses), and scores both models
with the run's own new-task inference (``harmonic.evaluate``, same settings) at the small
sizes, in chunks (at N <= ``exact_support``: prior importance sampling; ``--exact-support 0``
gives the fitted guides' predictive instead), beside the Bayes-optimal predictor under the
true task distribution on the same tasks (``--draws 0`` skips it). It reports each row's
mean and 95% interval, the paired gap, and whether the KL and no-KL intervals are apart; also
each mean with the zero predictor's MSE as a control variate (its expectation is known exactly,
``harmonic_second_moment``), which narrows the intervals without changing what they estimate.

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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaprior.data.tasks import harmonic_second_moment
from metaprior.experiments import harmonic as H
from metaprior.inference.evaluation import control_variate_ci95, mean_ci95

sys.path.insert(0, str(Path(__file__).parent))
from harmonic_bayes_oracle import oracle_task, prior_draws, write_result  # noqa: E402

RESULTS = Path(__file__).parent / "results"


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
        "--exact-support",
        type=int,
        default=None,
        help="sizes up to this by prior importance sampling (default: the run's, 4; 0: fitted guides at every size)",
    )
    ap.add_argument("--exact-draws", type=int, default=0, help="prior draws per task (0: the run's)")
    ap.add_argument(
        "--predictive", default="", help="fitted sizes' predictive (importance, mixture, best; default the run's)"
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
    if args.exact_support is not None:
        config = dataclasses.replace(config, exact_support=args.exact_support)
    if args.exact_draws:
        config = dataclasses.replace(config, exact_draws=args.exact_draws)
    if args.predictive:
        config = dataclasses.replace(config, predictive=args.predictive)
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
    tags = ("kl", "nokl", "oracle", "zero")
    mse = {tag: {n: [] for n in sizes} for tag in tags}
    draws = prior_draws(jax.random.key(12345), args.draws) if args.draws else None
    oracle = jax.jit(lambda xs, ys, q: oracle_task(draws, xs, ys, q, config.noise_std, min(10_000, args.draws)))
    start = time.perf_counter()
    for c0 in range(0, args.tasks, args.chunk):
        part = jax.tree.map(lambda a: a[c0 : c0 + args.chunk], tasks)
        x, y = part.x, part.y  # [T, points, 1], [T, points]
        for tag, (net, encoder, weight) in models.items():
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
        gap = np.asarray(mse["nokl"][n]) - np.asarray(mse["kl"][n])
        row["mse_gap"], row["mse_gap_ci95"] = mean_ci95(gap)
        row["intervals_apart"] = bool(row["mse_kl"] + row["mse_kl_ci95"] < row["mse_nokl"] - row["mse_nokl_ci95"])
        zero, second = np.asarray(mse["zero"][n]), harmonic_second_moment(config.noise_std)
        for tag in ("kl", "nokl", "oracle"):  # the zero predictor's MSE, known mean, as a control variate
            if mse[tag][n]:
                row[f"mse_{tag}_cv"], row[f"mse_{tag}_cv_ci95"] = control_variate_ci95(mse[tag][n], zero, second)
        row["intervals_apart_cv"] = bool(
            row["mse_kl_cv"] + row["mse_kl_cv_ci95"] < row["mse_nokl_cv"] - row["mse_nokl_cv_ci95"]
        )
        rows[f"n{n}"] = row
        print(f"N={n}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    result = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        jax=jax.__version__,
        run=str(run_dir),
        tasks=args.tasks,
        num_proposals=config.num_proposals,
        exact_support=config.exact_support,
        exact_draws=config.exact_draws,
        predictive=config.predictive,
        draws=args.draws,
        wall_s=time.perf_counter() - start,
        rows=rows,
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
