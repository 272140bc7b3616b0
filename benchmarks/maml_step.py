"""One second-order MAML meta-step of the 4-block conv net: JAX/Equinox vs torch.func.

Both sides do the same computation on the same shapes: ``tasks`` 5-way ``shots``-shot
episodes with ``queries`` queries per class (random 28x28 images), ``inner_steps`` SGD
steps (lr 0.4) on the conv and linear weights (batch norm shared), query cross-entropy,
the gradient through the inner loop, and an Adam update. The JAX side is
``metaprior.inference.maml.ml_point`` + ``meta.meta_learner``, jitted once; the peer is
``benchmarks/peers/maml_step_torch.py`` (functional_call + grad + vmap), run with the
peer's own Python, given by ``--peer-python``.

    .venv/bin/python benchmarks/maml_step.py --peer-python /tmp/torchvenv/bin/python

Writes ``benchmarks/results/maml_step.json`` (median seconds per step, ratio).
"""

from __future__ import annotations

import argparse
import json
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
from metaprior.models.nets import Conv4

HERE = Path(__file__).resolve().parent


def jax_step_seconds(tasks, ways, shots, queries, inner_steps, filters, repeats, conv_impl="shift"):
    net = Conv4(ways, filters=filters, conv_impl=conv_impl, key=jax.random.key(0))
    loss = nll_loss(lambda n, x: n(x), lambda f: dist.Categorical(logits=f))
    learner = meta_learner(ml_point(loss, optax.sgd(0.4), inner_steps), optax.adam(1e-3), has_aux=True)
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
    state, info = step(jax.random.key(0), state, batch)
    jax.block_until_ready(info.loss)
    compile_s = time.perf_counter() - t
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        state, info = step(jax.random.key(i), state, batch)
        jax.block_until_ready(info.loss)
        times.append(time.perf_counter() - t)
    return times, compile_s


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
    p.add_argument("--conv-impl", choices=["shift", "lax"], default="shift",
                   help="JAX conv layers: per-task kernels as shifted matmuls (the experiments' choice) or XLA conv")
    p.add_argument("--out", type=Path, default=HERE / "results" / "maml_step.json")
    a = p.parse_args(argv)
    rows = []
    for k in a.inner_steps:
        times, compile_s = jax_step_seconds(a.tasks, a.ways, a.shots, a.queries, k, a.filters, a.repeats,
                                            a.conv_impl)
        row = {"inner_steps": k, "jax_median_s": float(np.median(times)), "jax_seconds": times,
               "jax_compile_s": compile_s}
        if a.peer_python:
            cmd = [a.peer_python, str(HERE / "peers" / "maml_step_torch.py"), "--tasks", str(a.tasks),
                   "--ways", str(a.ways), "--shots", str(a.shots), "--queries", str(a.queries),
                   "--inner-steps", str(k), "--filters", str(a.filters), "--repeats", str(a.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peer = json.loads(out.strip().splitlines()[-1])
            row.update(torch_median_s=float(np.median(peer["seconds"])), torch_seconds=peer["seconds"],
                       torch_version=peer["torch"], torch_threads=peer["threads"],
                       torch_over_jax=float(np.median(peer["seconds"]) / np.median(times)))
        rows.append(row)
        print(json.dumps({k2: v for k2, v in row.items() if not k2.endswith("seconds")}), flush=True)
    result = {"benchmark": "maml_step", "tasks": a.tasks, "ways": a.ways, "shots": a.shots,
              "queries": a.queries, "filters": a.filters, "repeats": a.repeats, "conv_impl": a.conv_impl,
              "rows": rows,
              "jax": jax.__version__, "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
