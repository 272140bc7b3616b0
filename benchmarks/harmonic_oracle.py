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

Candidates (``--nets``, run one after the other in one invocation, same data and steps):
    film          the default net: one sine layer on x, FiLM-modulated by c (width 64)
    film2         the same with two sine layers
    paper         the paper's residual ReLU MLP on concat(x, c) (``--width``, ``--layers``)
    fourier       64 fixed random Fourier features of x (frequencies U(0, 15)), concatenated
                  with c, into the same residual MLP
    siren         a plain SIREN (sine activations, Sitzmann et al. 2020 init) on concat(x, c)
Optimiser variants (any candidate): ``--schedule warmup-cosine`` (linear warm-up over 5%
of the steps, cosine decay to 1%), ``--clip 1.0`` (global-norm clipping).

Usage:
    .venv/bin/python benchmarks/harmonic_oracle.py --nets film,paper,fourier,siren --steps 5000 --no-floor
    .venv/bin/python benchmarks/harmonic_oracle.py --nets paper --width 128 --layers 12 --steps 20000
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
import optax

from metaprior.data.tasks import harmonic_tasks
from metaprior.models.nets import ResidualMLP
from metaprior.models.task_latent import make_task_latent_net, task_latent_predict

HERE = Path(__file__).resolve().parent


def features(p) -> jax.Array:
    """The oracle code ``c`` of each task, ``[tasks, 8]``."""
    return jnp.stack(
        [p.a1, p.a2, p.omega - 6.0, jnp.sin(p.b1), jnp.cos(p.b1), jnp.sin(p.b2), jnp.cos(p.b2), p.mu_x / 4.0], axis=-1
    )


class FourierConcat(eqx.Module):
    """Fixed random Fourier features of x, concatenated with c, into a residual MLP."""

    freqs: jax.Array
    phases: jax.Array
    body: ResidualMLP

    def __call__(self, x, c):
        f = jax.lax.stop_gradient(self.freqs) * x[0] + jax.lax.stop_gradient(self.phases)
        return self.body(jnp.concatenate([jnp.sin(f), jnp.cos(f), c]))


class Siren(eqx.Module):
    """A SIREN on concat(x, c): sine activations, first layer x-weights U(-omega, omega)."""

    layers: tuple

    def __init__(self, in_size, width, num_layers, omega, key):
        keys = jax.random.split(key, num_layers + 1)
        sizes = (in_size,) + (width,) * num_layers + (2,)
        layers = []
        for i, (a, b, k) in enumerate(zip(sizes[:-1], sizes[1:], keys)):
            bound = omega if i == 0 else (6.0 / a) ** 0.5
            kw, kb = jax.random.split(k)
            lin = eqx.nn.Linear(a, b, key=kw)
            w = jax.random.uniform(kw, (b, a), minval=-bound, maxval=bound)
            if i == 0:  # c enters at unit scale, x at frequency omega
                w = w.at[:, 1:].multiply(1.0 / omega)
            layers.append(
                eqx.tree_at(
                    lambda m: (m.weight, m.bias), lin, (w, jax.random.uniform(kb, (b,), minval=-jnp.pi, maxval=jnp.pi))
                )
            )
        self.layers = tuple(layers)

    def __call__(self, x, c):
        h = jnp.concatenate([x, c])
        for layer in self.layers[:-1]:
            h = jnp.sin(layer(h))
        return self.layers[-1](h)


def build_net(name, key, args):
    if name == "film":
        return make_task_latent_net(key, 8, arch="film", width=args.film_width, omega=args.omega)
    if name == "film2":
        return make_task_latent_net(key, 8, arch="film", num_layers=2, width=args.film_width, omega=args.omega)
    if name == "paper":
        return make_task_latent_net(key, 8, arch="paper", width=args.width, num_layers=args.layers)
    if name == "fourier":
        k1, k2, k3 = jax.random.split(key, 3)
        return FourierConcat(
            jax.random.uniform(k1, (64,), maxval=15.0),
            jax.random.uniform(k2, (64,), maxval=2 * jnp.pi),
            ResidualMLP(128 + 8, 2, width=args.width, num_layers=args.layers, key=k3),
        )
    if name == "siren":
        return Siren(1 + 8, 64, 3, 15.0, key)
    raise ValueError(f"unknown net {name!r}")


def make_optimizer(args):
    lr = args.lr
    if args.schedule == "warmup-cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, args.lr, max(1, args.steps // 20), args.steps, end_value=args.lr * 0.01
        )
    opt = optax.adam(lr)
    if args.clip:
        opt = optax.chain(optax.clip_by_global_norm(args.clip), opt)
    return opt


def nll_per_point(net, c, x, y, mask):
    mu, sigma = task_latent_predict(net, c[None], x)
    lp = jax.scipy.stats.norm.logpdf(y, mu[0], sigma[0])
    return -(lp * mask).sum() / mask.sum(), (((mu[0] - y) ** 2) * mask).sum() / mask.sum()


def train(key, args, train_set, codes, test_set, test_codes, label, net_name):
    net = build_net(net_name, jax.random.fold_in(key, 0), args)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    opt = make_optimizer(args)
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
        rows.append(
            {
                "step": s + args.eval_every,
                "train_nll": float(train_nll),
                "test_nll": float(nll),
                "test_mse": float(mse),
                "elapsed_s": time.perf_counter() - start,
            }
        )
        print(
            f"{label} step {rows[-1]['step']:6d}: train NLL/pt {float(train_nll):9.2f}, "
            f"test NLL/pt {float(nll):9.2f}, test MSE {float(mse):.3f} ({rows[-1]['elapsed_s']:.0f} s)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="film", help="comma-separated candidates (see the module docstring)")
    parser.add_argument("--width", type=int, default=64, help="paper / fourier nets: width")
    parser.add_argument("--layers", type=int, default=6, help="paper / fourier nets: layers")
    parser.add_argument("--film-width", type=int, default=64, help="film nets: width")
    parser.add_argument("--omega", type=float, default=15.0, help="film nets: first-layer frequency bound")
    parser.add_argument("--schedule", choices=("constant", "warmup-cosine"), default="constant")
    parser.add_argument("--clip", type=float, default=0.0, help="global-norm clipping (0: none)")
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
    nets = args.nets.split(",")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} {jax.default_backend()}",
        "width": args.width,
        "layers": args.layers,
        "batch": args.batch,
        "lr": args.lr,
        "schedule": args.schedule,
        "clip": args.clip,
        "num_tasks": args.num_tasks,
        "nets": {},
    }
    for name in nets:
        n_params = sum(a.size for a in jax.tree.leaves(eqx.filter(build_net(name, key, args), eqx.is_array)))
        entry = {
            "num_params": int(n_params),
            "oracle": train(key, args, train_set, codes, test_set, test_codes, f"{name:8s} oracle c", name),
        }
        if not args.no_floor:
            entry["no_information"] = train(
                key,
                args,
                train_set,
                jnp.zeros_like(codes),
                test_set,
                jnp.zeros_like(test_codes),
                f"{name:8s} c = 0   ",
                name,
            )
        result["nets"][name] = entry
    tag = (
        "_".join(nets)
        + ("" if args.schedule == "constant" else f"_{args.schedule}")
        + (f"_clip{args.clip:g}" if args.clip else "")
    )
    out = args.out or HERE / "results" / f"harmonic_oracle_{tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
