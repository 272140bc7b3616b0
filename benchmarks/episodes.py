"""Episode sampling throughput, and its cost next to a MAML Conv4 meta-training step.

Measures, for 5-way 1-shot 15-query episodes of 28x28 Omniglot, 32 tasks a batch:

1. ``sample``: one jitted call of :func:`metaprior.data.sample_episodes` (dispatch
   included, result blocked on), median over repeats -> episodes/s.
2. ``sample_scan``: 100 batches sampled inside one jitted ``lax.scan`` (no dispatch
   per batch; a checksum of each batch is carried so nothing is dead code).
3. ``maml_step``: one jitted first-order MAML step through the project's
   :func:`metaprior.inference.meta.meta_learner` (Adam, lr 1e-3) on a pre-sampled
   batch: a 64-filter :class:`metaprior.models.nets.Conv4`, one inner SGD step
   (lr 0.4) on the support set per task, ``vmap`` over the 32 tasks, query
   cross-entropy, first-order (inner gradient under ``stop_gradient``).
4. ``maml_step_with_sampling``: the same step with the sampling fused into the
   jitted function, as :func:`metaprior.inference.meta.fit` runs it.

The data are the real Omniglot train split of ``../shared/data`` (rotations on) and
a synthetic array the size of the usual full meta-training set (1200 characters x
4 rotations = 4800 classes), since the sampler's cost grows with the class count.

The MAML step is timed once, on the real split (its cost does not depend on the
class count). On a CPU a step is seconds, so use a small ``--step-repeats`` there.

Usage: ``python benchmarks/episodes.py [--data-dir DIR] [--repeats N] [--step-repeats N]``; writes
``benchmarks/results/episodes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from metaprior.data import omniglot_splits, sample_episodes
from metaprior.inference.meta import meta_learner
from metaprior.models.nets import Conv4

TASKS, WAYS, SHOTS, QUERIES = 32, 5, 1, 15
INNER_LR = 0.4


def _median_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds (all threads) of a call, after one
    call that compiles. On a shared machine the CPU time is the steadier figure."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _maml_loss(static):
    def cross_entropy(params, x, y):
        logits = eqx.combine(params, static)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def task_loss(params, sx, sy, qx, qy):
        grads = jax.lax.stop_gradient(jax.grad(cross_entropy)(params, sx, sy))  # first-order
        adapted = jax.tree.map(lambda p, g: p - INNER_LR * g, params, grads)
        return cross_entropy(adapted, qx, qy)

    def loss_fn(params, rng_key, batch):
        del rng_key
        return jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, *batch).mean()

    return loss_fn


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_sampler(images: jax.Array, repeats: int, scan_batches: int = 100) -> dict:
    """Sampler timings on ``images [classes, 20, 28, 28, 1]`` (a device array)."""
    key = jax.random.key(0)
    sample = jax.jit(lambda k, x: sample_episodes(k, x, TASKS, WAYS, SHOTS, QUERIES))

    @jax.jit
    def sample_scan(k, x):
        def body(carry, i):
            ep = sample_episodes(jax.random.fold_in(k, i), x, TASKS, WAYS, SHOTS, QUERIES)
            return carry + ep.support_x.sum() + ep.query_x.sum(), None

        return jax.lax.scan(body, jnp.zeros(()), jnp.arange(scan_batches))[0]

    t_sample, c_sample = _median_seconds(sample, key, images, repeats=repeats)
    _log(f"{images.shape[0]} classes: sample {1e3 * t_sample:.3f} ms (CPU {1e3 * c_sample:.3f} ms)")
    t_scan, c_scan = _median_seconds(sample_scan, key, images, repeats=max(3, repeats // 10))
    t_scan, c_scan = t_scan / scan_batches, c_scan / scan_batches
    _log(f"{images.shape[0]} classes: sample in scan {1e3 * t_scan:.3f} ms a batch (CPU {1e3 * c_scan:.3f} ms)")
    return {
        "classes": int(images.shape[0]),
        "sample_ms": 1e3 * t_sample,
        "sample_cpu_ms": 1e3 * c_sample,
        "episodes_per_s": TASKS / t_sample,
        "sample_scan_ms_per_batch": 1e3 * t_scan,
        "sample_scan_cpu_ms_per_batch": 1e3 * c_scan,
        "episodes_per_s_scan": TASKS / t_scan,
    }


def bench_maml_step(images: jax.Array, repeats: int, fused: bool) -> dict:
    """First-order MAML Conv4 step timings (see the module docstring)."""
    key = jax.random.key(0)
    model = Conv4(WAYS, in_channels=1, filters=64, image_size=28, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_array)
    learner = meta_learner(_maml_loss(static), optax.adam(1e-3))
    state = learner.init(params)
    step = jax.jit(learner.step)
    batch = jax.jit(lambda k, x: sample_episodes(k, x, TASKS, WAYS, SHOTS, QUERIES))(key, images)
    t_step, c_step = _median_seconds(step, key, state, batch, repeats=repeats)
    out = {"maml_step_ms": 1e3 * t_step, "maml_step_cpu_ms": 1e3 * c_step}
    _log(f"MAML step {out['maml_step_ms']:.1f} ms (CPU {out['maml_step_cpu_ms']:.1f} ms)")
    if fused:

        @jax.jit
        def step_with_sampling(k, s, x):
            k_batch, k_step = jax.random.split(k)
            return learner.step(k_step, s, sample_episodes(k_batch, x, TASKS, WAYS, SHOTS, QUERIES))

        t_fused, c_fused = _median_seconds(step_with_sampling, key, state, images, repeats=repeats)
        out["maml_step_with_sampling_ms"], out["maml_step_with_sampling_cpu_ms"] = 1e3 * t_fused, 1e3 * c_fused
        _log(f"MAML step with sampling {1e3 * t_fused:.1f} ms (CPU {1e3 * c_fused:.1f} ms)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("METAPRIOR_DATA", "../shared/data"))
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of the sampler")
    parser.add_argument("--step-repeats", type=int, default=10, help="timed MAML steps")
    parser.add_argument("--no-fused", action="store_true", help="skip the step with fused sampling")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "episodes.json"))
    args = parser.parse_args()
    load_start = os.getloadavg()[0]

    train = jax.device_put(omniglot_splits(data_dir=args.data_dir)["train"].images)
    synthetic = jax.random.uniform(jax.random.key(2), (4800, 20, 28, 28, 1))
    sampler = {
        "omniglot_train_shared": bench_sampler(train, args.repeats),
        "synthetic_4800_classes": bench_sampler(synthetic, args.repeats),
    }
    step = bench_maml_step(train, args.step_repeats, fused=not args.no_fused)
    for r in sampler.values():
        r["ratio_sample_to_maml_step"] = r["sample_ms"] / step["maml_step_ms"]
        r["ratio_sample_scan_to_maml_step"] = r["sample_scan_ms_per_batch"] / step["maml_step_ms"]
        r["cpu_ratio_sample_to_maml_step"] = r["sample_cpu_ms"] / step["maml_step_cpu_ms"]

    device = jax.devices()[0]
    out = {
        "what": f"{WAYS}-way {SHOTS}-shot {QUERIES}-query, {TASKS} tasks a batch, 28x28x1 float32",
        "device": f"{device.platform}: {device.device_kind}",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg()[0],
        "jax": jax.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "step_repeats": args.step_repeats,
        "sampler": sampler,
        "maml_step": step,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
