"""How much can T inner steps gain on the sib-omniglot features? (issue 7)

Loads a finished ``metaprior run sib-omniglot`` folder (its pretrained feature net and the
1-shot T=0 / T=3 SIB checkpoints), rebuilds the run's 600 test episodes, and scores the
posterior mean ``theta^T.loc`` of the classifier weights on them for:

- the learned inner loop at T=0 and T=3 (the run's own models);
- an *oracle* that replaces ``xi`` by the true gradient of the query cross-entropy (it
  reads the query labels, so it is an upper bound on what any synthetic gradient can
  do with T steps, not a method);
- entropy minimisation on the queries (a hand-written transductive gradient that uses
  no labels: the simplest thing ``xi`` could learn).

Both hand-written loops start from the T=0 model's ``lambda(support)`` and temperature,
without the KL term, at several step sizes. Usage::

    METAPRIOR_DATA=../shared/data .venv/bin/python benchmarks/sib_headroom.py --run runs/sib-omniglot

Writes ``benchmarks/results/sib_headroom.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaprior.data import omniglot_splits, sample_episodes
from metaprior.experiments import sib_omniglot as so
from metaprior.inference.sib import sib_posterior, support_initializer
from metaprior.models.sib import cosine_logits, embed_classes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="output folder of metaprior run sib-omniglot")
    ap.add_argument("--seed", type=int, default=0, help="the run's --seed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sib_headroom.json")
    args = ap.parse_args()
    for name in ("pretrain.ckpt", "sib_5w1s_T0.ckpt", "sib_5w1s_T3.ckpt"):
        if not (args.run / name).exists():
            raise SystemExit(f"{args.run / name} is missing: pass the folder of a finished sib-omniglot run")
    start = time.perf_counter()
    cfg = so.make_config("default")
    k_pre, k_meta, k_test, _, _ = jax.random.split(jax.random.key(args.seed), 5)
    splits = omniglot_splits(cfg.image_size, rotations=True, seed=cfg.split_seed)
    net, _ = so.pretrain(k_pre, cfg, jnp.asarray(splits["train"].images), args.run / "pretrain.ckpt")
    train_f = embed_classes(net, jnp.asarray(splits["train"].images))
    test_f = embed_classes(net, jnp.asarray(splits["test"].images))
    eps = sample_episodes(jax.random.fold_in(k_test, 1), test_f, cfg.test_episodes, cfg.ways, 1, cfg.queries)
    y = np.asarray(eps.query_y)

    def accuracy(logits) -> float:
        return float((np.asarray(logits).argmax(-1) == y).mean())

    results: dict[str, float] = {}
    params = {}
    for t in (0, 3):
        params[t] = so.meta_train(k_meta, cfg, train_f, 1, t, args.run / f"sib_5w1s_T{t}.ckpt").state.params
        post = sib_posterior(
            jax.random.key(1), params[t], eps, num_ways=cfg.ways, num_steps=t, inner_optimizer=optax.sgd(cfg.inner_lr)
        )
        logits = jax.vmap(lambda w, qx, p=params[t]: cosine_logits(w, qx, p.log_logit_scale))(post.loc, eps.query_x)
        results[f"learned_T{t}"] = accuracy(logits)
    p0 = params[0]

    def refine(kind: str, eta: float, steps: int):
        def one(sx, sy, qx, qy):
            w = support_initializer(p0, sx, sy, cfg.ways).loc

            def loss(w):
                logp = jax.nn.log_softmax(cosine_logits(w, qx, p0.log_logit_scale))
                if kind == "oracle":
                    return -jnp.sum(logp[jnp.arange(qy.shape[0]), qy])
                return -jnp.sum(jnp.exp(logp) * logp)

            for _ in range(steps):
                w = w - eta * jax.grad(loss)(w)
            return cosine_logits(w, qx, p0.log_logit_scale)

        return jax.jit(jax.vmap(one))(eps.support_x, eps.support_y, eps.query_x, eps.query_y)

    for kind in ("oracle", "entropy"):
        for eta in (0.01, 0.1, 1.0):
            results[f"{kind}_T3_eta{eta:g}"] = accuracy(refine(kind, eta, 3))
    record = {
        "benchmark": "sib_headroom",
        "run": str(args.run),
        "episodes": cfg.test_episodes,
        "accuracy_posterior_mean": results,
        "wall_s": time.perf_counter() - start,
        "machine": f"{platform.machine()} CPU, {jax.device_count()} JAX device(s)",
        "jax": jax.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    for k, v in results.items():
        print(f"{k:24s} {100 * v:5.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
