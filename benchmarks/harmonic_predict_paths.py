"""Issue 16: the harmonic net's broadcast prediction path against the per-example vmap, side by side.

`task_latent_predict` evaluates the default FiLM net for many draws of ``z`` in two places
of `metaprior run harmonic`: the likelihood pass of prior importance sampling (``z [S, d]``
shared by every task, at each task's 4 support points) and the scoring of posterior draws
(``z [S, T, d]``, 100 draws per task at 100 held-out points). The broadcast path
(``FiLMSiren.apply_shared``, ``ConcatNet.apply_shared``) computes the same numbers as the
nested ``jax.vmap`` of the module's ``__call__`` (the path every other net takes). This
times both, back to back in one process, on the default net's shapes (width 64, latent 8,
random weights: the cost does not depend on them) and checks that they agree.

Usage:
    .venv/bin/python benchmarks/harmonic_predict_paths.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from metaprior.models.task_latent import _apply, _apply_task, make_task_latent_net, task_latent_predict

RESULTS = Path(__file__).parent / "results"


def per_example(net, z, x):
    """The nested-vmap path: ``z [S, d]`` shared, or ``[S, T, d]`` per task."""
    if z.ndim == 2:
        return jax.vmap(lambda zs: jax.vmap(_apply_task, in_axes=(None, 0, None))(net, x, zs))(z)
    return jax.vmap(lambda zs: _apply(net, x, zs))(z)


def timed(fn, *args, repeats: int) -> float:
    """Seconds per call of a jitted ``fn`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "harmonic_predict_paths.json"))
    args = ap.parse_args()
    net = make_task_latent_net(jax.random.key(0), 8)
    keys = jax.random.split(jax.random.key(1), 4)
    # the sampler: 16 x 1,024 shared draws, 32 tasks x 4 support points, as prior_importance_sizes runs it
    x_sup = 3.0 * jax.random.normal(keys[0], (32, 4, 1))
    z_shared = jax.random.normal(keys[1], (16, 1024, 8))
    # scoring: 100 draws per task, 200 tasks x 100 held-out points, as score_support_sizes runs it
    x_q = 3.0 * jax.random.normal(keys[2], (200, 100, 1))
    z_task = jax.random.normal(keys[3], (100, 200, 8))
    rows = {}
    for name, path in (("broadcast", task_latent_predict), ("per_example_vmap", per_example)):

        def loglik(z, x, path=path):
            return jax.lax.map(lambda zc: jax.scipy.stats.norm.logpdf(0.3, *path(net, zc, x)).sum(-1), z)

        def score(z, x, path=path):
            mu, sigma = path(net, z, x)
            return jnp.mean(mu, axis=0), jnp.mean(sigma, axis=0)

        rows[name] = dict(
            sampler_ms_per_task_16384_draws=1e3 * timed(jax.jit(loglik), z_shared, x_sup, repeats=args.repeats) / 32,
            scoring_ms_per_task=1e3 * timed(jax.jit(score), z_task, x_q, repeats=args.repeats) / 200,
        )
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    agree = {}
    for label, z, x in (("shared", z_shared[0], x_sup), ("per_task", z_task, x_q)):
        fast, ref = task_latent_predict(net, z, x), per_example(net, z, x)
        agree[label] = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(fast, ref)]
    ratio = {k: rows["per_example_vmap"][k] / rows["broadcast"][k] for k in rows["broadcast"]}
    result = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        jax=jax.__version__,
        rows=rows,
        speedup=ratio,
        max_abs_difference_mu_sigma=agree,
    )
    print("speed-up (vmap / broadcast):", {k: round(v, 2) for k, v in ratio.items()}, "max |diff|:", agree)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
