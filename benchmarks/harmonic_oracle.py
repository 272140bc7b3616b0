"""How many steps the harmonic network needs when the task is *given* (an oracle latent).

`metaprior run harmonic` learns the network and every task's latent z together. This
script measures the easier half alone: the same residual MLP on ``concat(x, c)``, with
``c`` the task's true parameters in place of z, trained by the model's own
likelihood (heteroskedastic Gaussian, ``sigma = sigmoid(s) * 0.1 + 0.001``) on the same
5,000 meta-training tasks, task batch 32, Adam. Nothing is inferred, so its held-out MSE
is a lower bound on what the latent model can reach after the same number of steps.

``c = (a1, a2, w - 6, sin b1, cos b1, sin b2, cos b2, mu_x / 4)``: 8 numbers, the size of
the experiment's latent. A second run with ``c = 0`` (no task information) gives the
floor, the MSE of the best single function of x (about Var f = 1).

Reported every ``--eval-every`` steps: held-out MSE and NLL per point on 100 unseen tasks
(100 points each), and steps/s.

Usage:
    .venv/bin/python benchmarks/harmonic_oracle.py [--width 128 --layers 12] [--steps 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaprior.data.tasks import harmonic_tasks
from metaprior.models.task_latent import make_task_latent_net, task_latent_predict

HERE = Path(__file__).resolve().parent


def features(p) -> jax.Array:
    """The oracle code ``c`` of each task, ``[tasks, 8]``."""
    return jnp.stack([p.a1, p.a2, p.omega - 6.0, jnp.sin(p.b1), jnp.cos(p.b1), jnp.sin(p.b2), jnp.cos(p.b2),
                      p.mu_x / 4.0], axis=-1)


def nll_per_point(net, c, x, y, mask):
    mu, sigma = task_latent_predict(net, c[None], x)
    lp = jax.scipy.stats.norm.logpdf(y, mu[0], sigma[0])
    return -(lp * mask).sum() / mask.sum(), (((mu[0] - y) ** 2) * mask).sum() / mask.sum()


def train(key, args, train_set, codes, test_set, test_codes, label):
    net = make_task_latent_net(jax.random.fold_in(key, 0), 8, width=args.width, num_layers=args.layers)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)
    num_tasks = train_set.x.shape[0]

    def loss(params, idx):
        net = eqx.combine(params, static)
        return nll_per_point(net, codes[idx], train_set.x[idx], train_set.y[idx], train_set.mask[idx])[0]

    @jax.jit
    def chunk(params, opt_state, start):
        def body(carry, i):
            params, opt_state = carry
            idx = jax.random.choice(jax.random.fold_in(key, i), num_tasks, (args.batch,), replace=False)
            value, grads = jax.value_and_grad(loss)(params, idx)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), values = jax.lax.scan(body, (params, opt_state), start + jnp.arange(args.eval_every))
        return params, opt_state, values.mean()

    @jax.jit
    def evaluate(params):
        net = eqx.combine(params, static)
        return nll_per_point(net, test_codes, test_set.x, test_set.y, test_set.mask)

    rows = []
    start = time.perf_counter()
    for s in range(0, args.steps, args.eval_every):
        params, opt_state, train_nll = chunk(params, opt_state, s)
        nll, mse = evaluate(params)
        rows.append({"step": s + args.eval_every, "train_nll": float(train_nll), "test_nll": float(nll),
                     "test_mse": float(mse), "elapsed_s": time.perf_counter() - start})
        print(f"{label} step {rows[-1]['step']:6d}: train NLL/pt {float(train_nll):9.2f}, "
              f"test NLL/pt {float(nll):9.2f}, test MSE {float(mse):.3f} ({rows[-1]['elapsed_s']:.0f} s)",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-tasks", type=int, default=5000)
    parser.add_argument("--no-floor", action="store_true", help="skip the c = 0 run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")

    key = jax.random.key(0)
    train_set, p = harmonic_tasks(jax.random.fold_in(key, 1), args.num_tasks, 50, min_examples=4, noise_std=0.05)
    test_set, tp = harmonic_tasks(jax.random.fold_in(key, 2), 100, 100, noise_std=0.05)
    codes, test_codes = features(p), features(tp)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} {jax.default_backend()}",
        "width": args.width, "layers": args.layers, "batch": args.batch, "lr": args.lr,
        "num_tasks": args.num_tasks,
        "oracle": train(key, args, train_set, codes, test_set, test_codes, "oracle c"),
    }
    if not args.no_floor:
        result["no_information"] = train(key, args, train_set, jnp.zeros_like(codes), test_set,
                                         jnp.zeros_like(test_codes), "c = 0   ")
    out = args.out or HERE / "results" / f"harmonic_oracle_{args.width}x{args.layers}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
