"""One MAML meta-step (second- and first-order) of the 4-block conv net: JAX/Equinox vs torch.func.

Both sides do the same computation on the same shapes: ``tasks`` 5-way ``shots``-shot
episodes with ``queries`` queries per class (random 28x28 images), ``inner_steps`` SGD
steps (lr 0.4) on the conv and linear weights (batch norm shared), query cross-entropy,
the gradient through the inner loop, and an Adam update. The JAX side is
``metaprior.inference.maml.ml_point`` + ``meta.meta_learner``, jitted once; the peer is
``benchmarks/peers/maml_step_torch.py`` (functional_call + grad + vmap), run with the
peer's own Python, given by ``--peer-python``.

    .venv/bin/python benchmarks/maml_step.py --peer-python /tmp/torchvenv/bin/python --peak

Each row times the JAX conv paths given by ``--conv-impl`` (default: the old channels-first
``shift`` and the new channels-last ``im2col``) and then the peer, back to back in one
process tree. FLOPs per step are XLA's cost analysis of the compiled step; ``--peak``
adds the dense matmul FLOP/s of ``scaling.py`` for the fraction of peak. Writes
``benchmarks/results/maml_step.json`` (median seconds per step, ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.inference.maml import SupportQuery, ml_point, nll_loss
from metaprior.inference.meta import meta_learner
from metaprior.models.nets import CONV_IMPLS, Conv4

HERE = Path(__file__).resolve().parent


def jax_step_seconds(
    tasks, ways, shots, queries, inner_steps, filters, repeats, conv_impl="im2col", first_order=False, unroll=1
):
    net = Conv4(ways, filters=filters, conv_impl=conv_impl, key=jax.random.key(0))
    loss = nll_loss(lambda n, x: n(x), lambda f: dist.Categorical(logits=f))
    learner = meta_learner(
        ml_point(loss, optax.sgd(0.4), inner_steps, first_order=first_order, unroll=unroll),
        optax.adam(1e-3),
        has_aux=True,
    )
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = SupportQuery(
        jax.random.uniform(k1, (tasks, ways * shots, 28, 28, 1)),
        jnp.broadcast_to(jnp.repeat(jnp.arange(ways), shots), (tasks, ways * shots)),
        jax.random.uniform(k2, (tasks, ways * queries, 28, 28, 1)),
        jnp.broadcast_to(jnp.repeat(jnp.arange(ways), queries), (tasks, ways * queries)),
    )
    step = jax.jit(learner.step)
    state = learner.init(net)
    t = time.perf_counter()
    compiled = step.lower(jax.random.key(0), state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    state, info = compiled(jax.random.key(0), state, batch)  # warm-up
    jax.block_until_ready(info.loss)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        state, info = compiled(jax.random.key(i), state, batch)
        jax.block_until_ready(info.loss)
        times.append(time.perf_counter() - t)
    return times, compile_s, flops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=None, help="python of the PyTorch environment (omit: JAX only)")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--conv-impl",
        nargs="+",
        choices=list(CONV_IMPLS),
        default=["shift", "im2col"],
        help="JAX conv paths to time: im2col (channels-last, the experiments' choice), shift (the "
        "channels-first per-example path it replaced), lax (XLA's convolution)",
    )
    p.add_argument("--orders", nargs="+", choices=["second", "first"], default=["second", "first"])
    p.add_argument("--unroll", action="store_true", help="unroll the inner loop (adapt(unroll=True))")
    p.add_argument("--peak", action="store_true", help="also measure the dense float32 matmul peak (FLOP/s)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "maml_step.json")
    a = p.parse_args(argv)
    rows = []
    for order in a.orders:
        for k in a.inner_steps:
            row = {"order": order, "inner_steps": k}
            for impl in a.conv_impl:
                times, compile_s, flops = jax_step_seconds(
                    a.tasks,
                    a.ways,
                    a.shots,
                    a.queries,
                    k,
                    a.filters,
                    a.repeats,
                    impl,
                    first_order=order == "first",
                    unroll=True if a.unroll else 1,
                )
                med = float(np.median(times))
                row.update(
                    {
                        f"jax_{impl}_median_s": med,
                        f"jax_{impl}_seconds": times,
                        f"jax_{impl}_compile_s": compile_s,
                        f"jax_{impl}_flops": flops,
                        f"jax_{impl}_flops_per_s": flops / med,
                    }
                )
            if a.peer_python:
                cmd = [
                    a.peer_python,
                    str(HERE / "peers" / "maml_step_torch.py"),
                    "--tasks",
                    str(a.tasks),
                    "--ways",
                    str(a.ways),
                    "--shots",
                    str(a.shots),
                    "--queries",
                    str(a.queries),
                    "--inner-steps",
                    str(k),
                    "--filters",
                    str(a.filters),
                    "--repeats",
                    str(a.repeats),
                ]
                cmd += ["--first-order"] if order == "first" else []
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                peer = json.loads(out.strip().splitlines()[-1])
                t_med = float(np.median(peer["seconds"]))
                row.update(
                    torch_median_s=t_med,
                    torch_seconds=peer["seconds"],
                    torch_version=peer["torch"],
                    torch_threads=peer["threads"],
                )
                for impl in a.conv_impl:
                    row[f"torch_over_jax_{impl}"] = t_med / row[f"jax_{impl}_median_s"]
            rows.append(row)
            print(
                json.dumps(
                    {
                        k2: (round(v, 4) if isinstance(v, float) else v)
                        for k2, v in row.items()
                        if not k2.endswith("seconds")
                    }
                ),
                flush=True,
            )
    peak = None
    if a.peak:
        import scaling  # benchmarks/scaling.py: the same matmul-peak measurement

        peak = scaling.matmul_peak(log=print)
        for row in rows:
            for impl in a.conv_impl:
                row[f"jax_{impl}_fraction_of_peak"] = row[f"jax_{impl}_flops_per_s"] / peak["peak_flops_per_s"]
    result = {
        "benchmark": "maml_step",
        "tasks": a.tasks,
        "ways": a.ways,
        "shots": a.shots,
        "queries": a.queries,
        "filters": a.filters,
        "repeats": a.repeats,
        "conv_impl": a.conv_impl,
        "unroll": a.unroll,
        "rows": rows,
        "matmul_peak": peak,
        "jax": jax.__version__,
        # allocator settings both sides ran under (the peer inherits this environment)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
