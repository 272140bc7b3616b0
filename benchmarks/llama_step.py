"""One LLAMA meta-step (ML-LAPLACE with a K-FAC log-determinant) of the 4-block conv net:
JAX/Equinox vs a torch.func version of the same computation.

The JAX side is ``metaprior.inference.maml.kfac_llama`` exactly as ``metaprior run
omniglot-llama`` builds it (exact Fisher, factored damping, ``tau = 1e-3``,
``eta = 1e-6``, inner SGD lr 0.4 on the conv and linear weights) + ``meta.meta_learner``
(Adam), jitted once. The peer is ``benchmarks/peers/llama_step_torch.py``: the same
objective written with ``torch.func`` (grad through the inner loop, the K-FAC factors and
two Cholesky factorisations per block; ``vmap`` over tasks), run with the peer's own
Python. Both start from the same weights and batch (written to an ``.npz`` for the peer),
so the first step's loss, mean log-determinant and gradient norm are compared too.

    .venv/bin/python benchmarks/llama_step.py --peer-python /tmp/torchvenv/bin/python

Writes ``benchmarks/results/llama_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

from metaprior.inference.maml import SupportQuery, kfac_llama, nll_loss
from metaprior.inference.meta import meta_learner
from metaprior.models.nets import Conv4

HERE = Path(__file__).resolve().parent


def _apply(net, x):
    return net(x)


def _likelihood(f):
    return dist.Categorical(logits=f)


def setup(tasks, ways, shots, queries, filters, inner_steps, log_det_tasks, eta, tau):
    net = Conv4(ways, filters=filters, key=jax.random.key(0))
    objective = kfac_llama(
        nll_loss(_apply, _likelihood),
        optax.sgd(0.4),
        inner_steps,
        apply_fn=_apply,
        likelihood=_likelihood,
        prior_precision=tau,
        eta=eta,
        kron_damping="factored",
        fisher="exact",
        log_det_tasks=log_det_tasks,
    )
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = SupportQuery(
        jax.random.uniform(k1, (tasks, ways * shots, 28, 28, 1)),
        jnp.broadcast_to(jnp.repeat(jnp.arange(ways), shots), (tasks, ways * shots)),
        jax.random.uniform(k2, (tasks, ways * queries, 28, 28, 1)),
        jnp.broadcast_to(jnp.repeat(jnp.arange(ways), queries), (tasks, ways * queries)),
    )
    return net, objective, batch


def export(path, net, batch):
    arrays = {f"p.conv{i}.weight": c.weight for i, c in enumerate(net.convs)}
    arrays |= {f"p.conv{i}.bias": c.bias.reshape(-1) for i, c in enumerate(net.convs)}
    arrays |= {f"p.norm{i}.scale": n.scale for i, n in enumerate(net.norms)}
    arrays |= {f"p.norm{i}.shift": n.shift for i, n in enumerate(net.norms)}
    arrays |= {"p.head.weight": net.head.weight, "p.head.bias": net.head.bias}
    arrays |= dict(sx=batch.support_x, sy=batch.support_y, qx=batch.query_x, qy=batch.query_y)
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def jax_step(net, objective, batch, repeats):
    learner = meta_learner(objective, optax.adam(1e-3), has_aux=True)
    step = jax.jit(learner.step)
    state = learner.init(net)
    t = time.perf_counter()
    compiled = step.lower(jax.random.key(0), state, batch).compile()
    compile_s = time.perf_counter() - t
    # the objective at the initial weights, for the comparison with the peer
    (loss0, aux0), g0 = eqx.filter_jit(eqx.filter_value_and_grad(objective, has_aux=True))(
        net, jax.random.key(0), batch
    )
    grad_norm0 = float(jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g0))))
    state, info = compiled(jax.random.key(0), state, batch)  # warm-up
    jax.block_until_ready(info.loss)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        state, info = compiled(jax.random.key(i), state, batch)
        jax.block_until_ready(info.loss)
        times.append(time.perf_counter() - t)
    return times, compile_s, float(loss0), float(aux0.log_det), grad_norm0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", default=None, help="python of the PyTorch environment (omit: JAX only)")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument(
        "--log-det-tasks",
        type=int,
        nargs="+",
        default=[2, 32],
        help="tasks whose log-determinant enters the step (omniglot-llama: 2 by default, 32 with --full)",
    )
    p.add_argument("--eta", type=float, default=1e-6)
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "llama_step.json")
    a = p.parse_args(argv)
    rows = []
    for m in a.log_det_tasks:
        net, objective, batch = setup(a.tasks, a.ways, a.shots, a.queries, a.filters, a.inner_steps, m, a.eta, a.tau)
        times, compile_s, loss0, ld0, gn0 = jax_step(net, objective, batch, a.repeats)
        row = {"log_det_tasks": m, "jax_median_s": float(np.median(times)), "jax_seconds": times}
        row.update(jax_compile_s=compile_s, jax_loss0=loss0, jax_log_det0=ld0, jax_grad_norm0=gn0)
        if a.peer_python:
            with tempfile.TemporaryDirectory() as tmp:
                npz = Path(tmp) / "llama_step.npz"
                export(npz, net, batch)
                cmd = [a.peer_python, str(HERE / "peers" / "llama_step_torch.py"), "--npz", str(npz)]
                cmd += ["--inner-steps", str(a.inner_steps), "--log-det-tasks", str(m), "--repeats", str(a.repeats)]
                cmd += ["--eta", str(a.eta), "--tau", str(a.tau)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peer = json.loads(out.strip().splitlines()[-1])
            row.update(torch_median_s=float(np.median(peer["seconds"])), torch_seconds=peer["seconds"])
            row.update(torch_loss0=peer["loss0"], torch_log_det0=peer["log_det0"], torch_version=peer["torch"])
            row.update(torch_threads=peer["threads"], torch_over_jax=row["torch_median_s"] / row["jax_median_s"])
            row["log_det0_rel_diff"] = abs(ld0 - peer["log_det0"]) / abs(ld0)
            row["loss0_abs_diff"] = abs(loss0 - peer["loss0"])
            row.update(torch_grad_norm0=peer["grad_norm0"], grad_norm0_rel_diff=abs(gn0 - peer["grad_norm0"]) / gn0)
        rows.append(row)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items() if "seconds" not in k}))
    result = {
        "benchmark": "llama_step",
        "tasks": a.tasks,
        "ways": a.ways,
        "shots": a.shots,
        "queries": a.queries,
        "filters": a.filters,
        "inner_steps": a.inner_steps,
        "eta": a.eta,
        "tau": a.tau,
        "repeats": a.repeats,
        "rows": rows,
        "jax": jax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores)".strip(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
