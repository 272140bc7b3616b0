"""Per-task convolution kernels on CPU: XLA's convolution, ShiftConv2d and the channels-last Im2colConv2d path.

MAML's adapted weights, LLAMA's Laplace samples and the amortized guide's weight samples
give every task its own conv kernels; the network is ``vmap``-ed over tasks. XLA lowers a
``vmap`` of convolutions with batched kernels to one grouped convolution, which its CPU
backend runs far slower than an ordinary one. :class:`metaprior.models.nets.ShiftConv2d`
computes the same layer as a sum of shifted batched matrix products.

Measured, side by side in one process: the gradient of a scalar of the outputs of
:class:`~metaprior.models.nets.Conv4` (5-way head) with respect to its parameters, for

- ``per_task``: ``--tasks`` tasks, each with its own parameters, ``--images`` images each;
- ``shared``: the same images through one network (ordinary training).

``im2col`` (``Conv4``'s default since issue 17) runs the whole net channels-last on the
batch; ``shift`` and ``lax`` call each layer per example channels-first.

Median wall and process CPU seconds over ``--repeats`` after a compiling call.

Usage: ``python benchmarks/conv_impl.py [--tasks 8] [--images 80] [--filters 32]
[--repeats 3]``; writes ``benchmarks/results/conv_impl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from metaprior.models.nets import Conv4


def _time(fn, *args, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "compile_s": compile_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--filters", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "conv_impl.json"))
    args = ap.parse_args(argv)
    x = jax.random.normal(jax.random.key(0), (args.tasks, args.images, 28, 28, 1))
    report = {
        "config": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": jax.default_backend()},
        "results": {},
    }
    outputs = {}
    for impl in ("lax", "shift", "im2col"):
        net = Conv4(5, filters=args.filters, conv_impl=impl, key=jax.random.key(1))
        params, static = eqx.partition(net, eqx.is_inexact_array)
        per_task = jax.tree.map(
            lambda a: a + 0.01 * jax.random.normal(jax.random.key(2), (args.tasks,) + a.shape), params
        )

        def task_loss(p, xs, static=static):
            return jnp.sum(jnp.tanh(jax.vmap(lambda pi, xi: eqx.combine(pi, static)(xi))(p, xs)))

        def shared_loss(p, xs, static=static):
            return jnp.sum(jnp.tanh(eqx.combine(p, static)(xs.reshape((-1,) + xs.shape[2:]))))

        for case, fn, p in (("per_task", task_loss, per_task), ("shared", shared_loss, params)):
            grad = jax.jit(jax.grad(fn))
            report["results"][f"{case}_{impl}"] = _time(grad, p, x, repeats=args.repeats)
            print(case, impl, report["results"][f"{case}_{impl}"], flush=True)
        outputs[impl] = task_loss(per_task, x)
    r = report["results"]
    report["speedup_per_task_shift_over_lax"] = r["per_task_lax"]["wall_s"] / r["per_task_shift"]["wall_s"]
    report["speedup_shared_shift_over_lax"] = r["shared_lax"]["wall_s"] / r["shared_shift"]["wall_s"]
    report["speedup_per_task_im2col_over_shift"] = r["per_task_shift"]["wall_s"] / r["per_task_im2col"]["wall_s"]
    report["speedup_shared_im2col_over_lax"] = r["shared_lax"]["wall_s"] / r["shared_im2col"]["wall_s"]
    report["max_abs_diff_outputs"] = float(jnp.abs(outputs["lax"] - outputs["shift"]))
    report["max_abs_diff_outputs_im2col"] = float(jnp.abs(outputs["lax"] - outputs["im2col"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    return report


if __name__ == "__main__":
    main()
