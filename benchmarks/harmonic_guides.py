"""Meta-training throughput: plate-aware TaskIAFGuide vs NumPyro's AutoIAFNormal.

Same model (the harmonic task-latent model at paper size: residual MLP 12 x 128,
latent 8), same 5,000 meta-training tasks, same optimizer, measured in one process.

- TaskIAFGuide: one IAF per task, task batch 32, through the library's meta-training step
  :func:`metaprior.inference.local.task_batch_learner` (what ``metaprior run harmonic``
  uses), without E-steps (the bare step) and with ``local_steps=5`` (the experiment's
  default: five extra passes over the batch per step).
- AutoIAFNormal: NumPyro's guide flattens all tasks' latents into one flow over
  ``5,000 * 8`` dimensions. It refuses subsampled local latents (the script records the
  error it raises), so its only option is a full-batch step over all 5,000 tasks.

Reported: steps/s, and tasks/s (tasks whose latents are updated per second).

Usage:
    .venv/bin/python benchmarks/harmonic_guides.py [--num-tasks 5000] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoIAFNormal

from metaprior.data.tasks import harmonic_tasks
from metaprior.inference.guides import TaskIAFGuide
from metaprior.inference.local import guide_for_num_tasks, task_batch_learner
from metaprior.inference.svi import init_params
from metaprior.models.task_latent import make_task_latent_net, task_latent_model

HERE = Path(__file__).resolve().parent


def time_steps(step, state, num_steps: int, repeats: int = 3) -> float:
    """Median seconds per step over ``repeats`` timed blocks, after one compile call."""
    state = step(state, 0)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(num_steps):
            state = step(state, i + 1)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / num_steps)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=int, default=5000)
    parser.add_argument("--task-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--auto-steps", type=int, default=3)
    parser.add_argument(
        "--auto-num-tasks",
        type=int,
        default=250,
        help="tasks for the AutoIAFNormal run (its MADE needs hidden >= 8 x tasks)",
    )
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "harmonic_guides.json")
    args = parser.parse_args()

    key = jax.random.key(0)
    batch, _ = harmonic_tasks(key, args.num_tasks, 50, min_examples=4)
    net = make_task_latent_net(jax.random.key(1), 8, arch="paper", width=args.width, num_layers=args.layers)
    model = partial(task_latent_model, net=net, latent_dim=8)
    optimizer = optax.adam(1e-3)

    # ours: the library's row-sparse step; the guide is laid out on two tasks and stretched
    # (building it on all tasks would run the network on every task once, eagerly)
    proto = jax.tree.map(lambda a: a[:2], batch)
    guide = guide_for_num_tasks(TaskIAFGuide.build(key, model, proto, num_flows=2, hidden_dim=32), args.num_tasks)
    params = init_params(key, model, guide, batch, subsample_size=args.task_batch)
    ours = {}
    for local_steps in (0, 5):
        learner = task_batch_learner(
            model, guide, task_batch=args.task_batch, optimizer=optimizer, local_steps=local_steps
        )
        step = jax.jit(lambda s, i, learner=learner: learner.step(jax.random.fold_in(key, i), s, batch)[0])
        ours[local_steps] = time_steps(step, learner.init(params), args.steps)
        print(f"TaskIAFGuide, local_steps={local_steps}: {1e3 * ours[local_steps]:.1f} ms/step", flush=True)

    # NumPyro's AutoIAFNormal: try subsampling first and record what happens
    auto = AutoIAFNormal(model, num_flows=2, hidden_dims=[8 * args.task_batch])
    try:
        SVI(model, auto, optimizer, Trace_ELBO()).init(key, batch, subsample_size=args.task_batch)
        auto_subsample_error = None
    except Exception as err:  # noqa: BLE001 - we record whatever NumPyro raises
        auto_subsample_error = f"{type(err).__name__}: {err}"
    # Full batch: its MADE maps 8N latents through hidden layers of at least 8N units
    # (NumPyro requires hidden >= input), i.e. >= 2 (8N)^2 weights per flow: 12.8 GB of
    # float32 per flow at N = 5,000, beyond this machine. Measured at --auto-num-tasks.
    d = 8 * args.num_tasks
    auto_full_gb = 2 * 2 * d * d * 4 / 1e9
    n_auto = args.auto_num_tasks
    small = jax.tree.map(lambda a: a[:n_auto], batch)
    auto = AutoIAFNormal(model, num_flows=2, hidden_dims=[8 * n_auto])
    svi = SVI(model, auto, optimizer, Trace_ELBO())
    auto_state = svi.init(key, small)
    auto_step = jax.jit(lambda s, i: svi.update(s, small)[0])
    auto_time = time_steps(auto_step, auto_state, args.auto_steps, repeats=2)
    print(f"AutoIAFNormal, {n_auto} tasks full batch: {1e3 * auto_time:.1f} ms/step", flush=True)

    result = {
        "benchmark": "harmonic_guides",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}",
        "load_average_1m_at_end": os.getloadavg()[0],
        "num_tasks": args.num_tasks,
        "task_batch": args.task_batch,
        "network": f"residual MLP {args.layers} x {args.width}, latent 8",
        "task_iaf_steps_per_s": 1.0 / ours[0],
        "task_iaf_tasks_per_s": args.task_batch / ours[0],
        "task_iaf_estep5_steps_per_s": 1.0 / ours[5],
        "auto_iaf_steps_per_s": 1.0 / auto_time,
        "auto_iaf_num_tasks": n_auto,
        "auto_iaf_tasks_per_s": n_auto / auto_time,
        "auto_iaf_weights_gb_at_num_tasks": auto_full_gb,
        "auto_iaf_subsample_error": auto_subsample_error,
        "steps_per_s_ratio": auto_time / ours[0],
        "steps_per_s_ratio_estep5": auto_time / ours[5],
        "tasks_per_s_ratio": (args.task_batch / ours[0]) / (n_auto / auto_time),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
