"""ProtoNets' training ways, chosen on validation characters at equal training time (issue 36).

Snell et al. (2017) train Prototypical networks on episodes with more ways than they test
with (60-way for Omniglot). Here each number of training ways in ``--ways`` gets the same
``--budget`` seconds of meta-training (the default size's Conv4 and settings of
``metaprior run fewshot``; ``num_steps`` is only a cap) and is scored on the same
validation episodes (the validation characters of the Omniglot split, never the test
ones) at 5-way 1-shot and 20-way 1-shot. The fewshot recipe's ``protonet_ways`` is set
from this.

Usage::

    METAPRIOR_DATA=../shared/data .venv/bin/python benchmarks/protonet_ways.py --ways 5 20 60 --budget 120

Writes ``benchmarks/results/protonet_ways.json`` and prints one line per number of ways.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp

from metaprior.data import omniglot_splits
from metaprior.data.episodes import episode_batches
from metaprior.experiments import fewshot as X
from metaprior.inference import fewshot as F
from metaprior.inference.evaluation import evaluate_fewshot

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 20, 60])
    parser.add_argument("--budget", type=float, default=120.0, help="meta-training seconds per model")
    parser.add_argument("--episodes", type=int, default=200, help="validation episodes per shape")
    parser.add_argument("--out", type=Path, default=RESULTS / "protonet_ways.json")
    args = parser.parse_args()
    config = X.make_config("default")
    splits = omniglot_splits(config.image_size, rotations=True, seed=config.split_seed, held_out=config.held_out)
    train, val = jnp.asarray(splits["train"].images), jnp.asarray(splits["val"].images)
    print(f"{train.shape[0]} training classes, {val.shape[0]} validation classes")
    shapes = ((5, 1), (20, 1))
    batch = config.eval_batch
    episodes = {
        (w, k): list(episode_batches(jax.random.key(10 + w), val, args.episodes, w, k, 15, batch_size=batch))
        for w, k in shapes
    }
    rows = []
    for ways in args.ways:
        s = dataclasses.replace(
            config, ways=ways, protonet_ways=0, budget_s=args.budget, num_steps=10**7, curve_points=0
        )
        t = F.train_method("protonet", jax.random.key(0), s, train)
        row = dict(train_ways=ways, train_time_s=t.train_time_s, train_steps=t.info["train_steps"])
        for (w, k), eps in episodes.items():
            predict = t.predictives(w)["protonet"]
            m = evaluate_fewshot(jax.random.key(1), predict, eps, progress=False).metrics()
            row[f"val_{w}w{k}s_acc"], row[f"val_{w}w{k}s_acc_ci95"] = m["acc"], m["acc_ci95"]
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    machine = f"{platform.processor() or platform.machine()}, {jax.device_count()} JAX device(s), CPU"
    meta = dict(budget_s=args.budget, episodes=args.episodes, filters=config.filters, meta_batch=config.meta_batch)
    args.out.write_text(json.dumps(dict(rows=rows, machine=machine, **meta), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
