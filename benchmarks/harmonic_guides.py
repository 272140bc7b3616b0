"""Meta-training throughput: plate-aware TaskIAFGuide vs NumPyro's AutoIAFNormal.

Same model (the harmonic task-latent model at paper size: residual MLP 12 x 128,
latent 8), same 5,000 meta-training tasks, same optimizer, measured in one process.

- TaskIAFGuide: one IAF per task, task batch 32 through ``plate("tasks", subsample_size=32)``.
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
from metaprior.inference.meta import meta_learner
from metaprior.inference.svi import elbo_loss, init_params
from metaprior.models.task_latent import make_task_latent_net, task_latent_model

HERE = Path(__file__).resolve().parent


def time_steps(step, state, num_steps: int, repeats: int = 3) -> float:
    """Median seconds per step over ``repeats`` timed blocks, after one compile call."""
    state = step(state, 0)
    jax.block_until_ready(state)
    times = []
    for r in range(repeats):
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
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "harmonic_guides.json")
    args = parser.parse_args()

    key = jax.random.key(0)
    batch, _ = harmonic_tasks(key, args.num_tasks, 50, min_examples=4)
    net = make_task_latent_net(jax.random.key(1), 8, width=args.width, num_layers=args.layers)
    model = partial(task_latent_model, net=net, latent_dim=8)
    optimizer = optax.adam(1e-3)

    # ours: subsampled step through the library's learner
    kwargs = {"subsample_size": args.task_batch}
    guide = TaskIAFGuide.build(key, model, batch, num_flows=2, hidden_dim=32, **kwargs)
    params = init_params(key, model, guide, batch, **kwargs)
    learner = meta_learner(elbo_loss(model, guide, model_kwargs=kwargs), optimizer)
    ours_step = jax.jit(lambda s, i: learner.step(jax.random.fold_in(key, i), s, batch)[0])
    ours = time_steps(ours_step, learner.init(params), args.steps)

    # NumPyro's AutoIAFNormal: try subsampling first and record what happens
    auto = AutoIAFNormal(model, num_flows=2, hidden_dims=[64])
    try:
        SVI(model, auto, optimizer, Trace_ELBO()).init(key, batch, subsample_size=args.task_batch)
        auto_subsample_error = None
    except Exception as err:  # noqa: BLE001 - we record whatever NumPyro raises
        auto_subsample_error = f"{type(err).__name__}: {err}"
    svi = SVI(model, auto, optimizer, Trace_ELBO())
    auto_state = svi.init(key, batch)
    auto_step = jax.jit(lambda s, i: svi.update(s, batch)[0])
    auto_time = time_steps(auto_step, auto_state, args.auto_steps, repeats=2)

    result = {
        "benchmark": "harmonic_guides",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}",
        "load_average_1m_at_end": os.getloadavg()[0],
        "num_tasks": args.num_tasks,
        "task_batch": args.task_batch,
        "network": f"residual MLP {args.layers} x {args.width}, latent 8",
        "task_iaf_steps_per_s": 1.0 / ours,
        "task_iaf_tasks_per_s": args.task_batch / ours,
        "auto_iaf_steps_per_s": 1.0 / auto_time,
        "auto_iaf_tasks_per_s": args.num_tasks / auto_time,
        "auto_iaf_subsample_error": auto_subsample_error,
        "steps_per_s_ratio": (1.0 / ours) / (1.0 / auto_time),
        "tasks_per_s_ratio": (args.task_batch / ours) / (args.num_tasks / auto_time),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
