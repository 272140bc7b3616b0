"""Meta-step time of the amortized guide: Flipout vs a weight sample per example vs one
shared sample, on the same batch.

One meta-step of :func:`metaprior.inference.guides.amortized_meta_loss` (guide, inner
steps on the support set, query negative ELBO, meta-gradient, Adam update) for the
Bayesian Conv4 on synthetic 28x28 episodes; only the layer estimator of the expected
log-likelihood changes (:mod:`metaprior.inference.flipout`). Reported per estimator:
median wall seconds per step, CPU seconds per step (the process's CPU time, which is
the fairer figure on a shared machine), and the compile time.

Usage:
    .venv/bin/python benchmarks/flipout.py [--filters 16] [--tasks 4] [--inner-steps 1]
        [--ways 5] [--shots 1] [--queries 15] [--steps 5] [--repeats 3]
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
import numpy as np
import optax

from metaprior.data import Episodes
from metaprior.inference import flipout as fo
from metaprior.inference.guides.amortized import (
    AmortizedInference,
    AmortizedLSTMGuide,
    AmortizedParams,
    amortized_meta_loss,
    standard_normal,
)
from metaprior.inference.meta import meta_learner
from metaprior.models.bayes_classifier import conv4_forward, shared_params, weight_layers
from metaprior.models.nets import Conv4

HERE = Path(__file__).resolve().parent
ESTIMATORS = {"flipout": fo.flipout, "per_example": fo.per_example, "shared_sample": fo.shared_sample}


def make_step(args, estimator):
    k_net, k_embed, k_guide = jax.random.split(jax.random.key(0), 3)
    net = Conv4(args.ways, filters=args.filters, key=k_net)
    guide = AmortizedLSTMGuide(
        weight_layers(net),
        Conv4(None, filters=args.filters, key=k_embed),
        num_classes=args.ways,
        input_shape=(28, 28, 1),
        key=k_guide,
        hidden_size=args.hidden,
    )
    inference = AmortizedInference(
        fo.categorical_expected_log_lik(conv4_forward, estimator),
        standard_normal(weight_layers(net)),
        1e-3,
        optax.sgd(0.4),
        args.inner_steps,
    )
    loss = amortized_meta_loss(inference, task_batch_size=None if args.task_batch_size <= 0 else args.task_batch_size)
    learner = meta_learner(loss, optax.adam(1e-3), has_aux=True)
    return jax.jit(learner.step), learner.init(AmortizedParams(guide, shared_params(net)))


def episodes(args) -> Episodes:
    k_s, k_q = jax.random.split(jax.random.key(1))
    t, w = args.tasks, args.ways
    labels = lambda n: jnp.broadcast_to(jnp.repeat(jnp.arange(w, dtype=jnp.int32), n), (t, w * n))
    return Episodes(
        jax.random.uniform(k_s, (t, w * args.shots, 28, 28, 1)),
        labels(args.shots),
        jax.random.uniform(k_q, (t, w * args.queries, 28, 28, 1)),
        labels(args.queries),
    )


def time_estimator(args, estimator) -> dict:
    step, state = make_step(args, estimator)
    batch = episodes(args)
    wall, cpu = time.perf_counter(), time.process_time()
    state, info = step(jax.random.key(0), state, batch)
    jax.block_until_ready(info.loss)
    compile_wall, compile_cpu = time.perf_counter() - wall, time.process_time() - cpu
    walls, cpus = [], []
    for r in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.steps):
            state, info = step(jax.random.key(1 + r * args.steps + i), state, batch)
        jax.block_until_ready(info.loss)
        walls.append((time.perf_counter() - wall) / args.steps)
        cpus.append((time.process_time() - cpu) / args.steps)
    return {
        "step_wall_s": float(np.median(walls)),
        "step_cpu_s": float(np.median(cpus)),
        "compile_wall_s": compile_wall,
        "compile_cpu_s": compile_cpu,
        "final_loss": float(info.loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--task-batch-size", type=int, default=1, help="lax.map chunk; <= 0 vmaps all tasks")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "flipout.json")
    args = parser.parse_args()

    results = {}
    for name in args.only:
        results[name] = time_estimator(args, ESTIMATORS[name])
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("shared_sample", {}).get("step_cpu_s")
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": str(jax.devices()[0]),
            "jax": jax.__version__,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "results": results,
        "cpu_time_ratio_vs_shared_sample": {k: v["step_cpu_s"] / base for k, v in results.items()} if base else {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["cpu_time_ratio_vs_shared_sample"], indent=2))


if __name__ == "__main__":
    main()
