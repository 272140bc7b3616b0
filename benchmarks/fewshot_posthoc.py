"""Post-hoc studies on a finished ``metaprior run fewshot`` folder (issue 19).

Each study rebuilds the run's test beds (the same key, the same episodes), restores the
methods from the run's checkpoints (no training) and scores variants that the table
does not:

- ``way20``: MAML's tiled 20-way head against the test-time inner loop (steps, step size);
- ``sib-draws``: SIB's predictive against its number of classifier-weight draws;
- ``tau-ood``: LLAMA's predictive spread (``tau_pred``) on notMNIST 5-way 1-shot.

Usage (the default size's settings; the run folder must hold the checkpoints)::

    METAPRIOR_DATA=../shared/data .venv/bin/python benchmarks/fewshot_posthoc.py --run runs/fewshot way20

Writes ``benchmarks/results/fewshot_posthoc_{study}.json`` and prints one line per variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
import optax

from metaprior.data import omniglot_splits
from metaprior.data.testbeds import fewshot_testbeds, ood_pool
from metaprior.experiments import fewshot as X
from metaprior.inference import fewshot as F
from metaprior.inference import maml
from metaprior.inference.evaluation import FewShotEvaluation, predict_episodes

RESULTS = Path(__file__).resolve().parent / "results"


def _setup(run: Path, method: str, pools_fn, shape):
    config = X.make_config("default")
    k_beds, k_train, _, _ = jax.random.split(jax.random.key(0), 4)  # the recipe's keys at --seed 0
    splits = omniglot_splits(config.image_size, rotations=True, seed=config.split_seed, held_out=config.held_out)
    pools = pools_fn(config, splits)
    beds = fewshot_testbeds(k_beds, pools, {b: (shape,) for b in pools}, num_episodes=config.num_episodes, queries=15)
    key = jax.random.fold_in(k_train, F.METHODS.index(method))
    ckpt = run / f"{method}.ckpt"
    trained = F.train_method(method, key, config, splits["train"].images, splits["val"].images, checkpoint=ckpt)
    return config, beds, trained


def _score(predict, bed, config, *, rows=1, key=None):
    key = jax.random.key(7) if key is None else key
    episodes = list(bed.batches(config.eval_batch))
    labels = np.concatenate([np.asarray(e.query_y) for e in episodes])
    start = time.perf_counter()
    probs = predict_episodes(key, predict, episodes, episode_axis=1, progress=False) if rows > 1 else None
    if probs is None:
        probs = predict_episodes(key, predict, episodes, progress=False)[None]
    seconds = time.perf_counter() - start
    out = []
    for p in probs:
        ev = FewShotEvaluation(p, labels)
        m = {**ev.metrics(), **ev.bootstrap(num_resamples=200, seed=0)}
        m.update(mean_confidence=float(p.max(-1).mean()), seconds=seconds)
        out.append(m)
    return out


def way20(run: Path) -> dict:
    config, beds, t = _setup(run, "maml", lambda c, s: {"id": s["test"].images}, (20, 1))
    rows = {}
    for lr, steps in [(0.4, 3), (1.6, 3), (0.4, 12), (1.6, 6)]:
        inner = dict(apply_fn=F._apply, loss_fn=F._nll(), inner_optimizer=optax.sgd(lr), num_steps=steps)
        rows[f"lr{lr:g}_steps{steps}"] = _score(
            maml.point_predictive(F.with_ways(t.params, 20), **inner), beds[0], config
        )[0]
    return rows


def sib_draws(run: Path) -> dict:
    config, beds, t = _setup(run, "sib", lambda c, s: {"id": s["test"].images}, (5, 1))
    rows = {}
    for n in (1, 4, 8, 32):
        for name, predict in t.predictives(5, num_samples=n).items():
            key = jax.random.fold_in(jax.random.split(jax.random.key(0), 4)[2], 0)  # the recipe's key of id_5w1s
            rows[f"{name}_draws{n}"] = _score(predict, beds[0], config, key=key)[0]
    return rows


def tau_ood(run: Path) -> dict:
    pools = lambda c, s: {"ood_notmnist": ood_pool("ood_notmnist", c.image_size, None)}
    config, beds, t = _setup(run, "llama", pools, (5, 1))
    rows = {}
    for tau in (1e2, 1e3, 1e4, 1e5):
        kw = dict(
            likelihood=F._likelihood, prior_precision=tau, num_samples=config.num_samples, pred_type=("nn", "glm")
        )
        predict = maml.laplace_predictive(F.with_ways(t.params, 5), **kw, **F._maml_inner(config))
        for name, m in zip(("nn", "glm"), _score(predict, beds[0], config, rows=2)):
            rows[f"{name}_tau{tau:g}"] = m
    return rows


STUDIES = {"way20": way20, "sib-draws": sib_draws, "tau-ood": tau_ood}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--run", type=Path, default=Path("runs/fewshot"), help="a finished fewshot --out folder")
    args = parser.parse_args()
    if not (args.run / "metrics.json").is_file():
        parser.error(f"--run {args.run} holds no metrics.json: run `metaprior run fewshot --out {args.run}` first")
    rows = STUDIES[args.study](args.run)
    for name, m in rows.items():
        print(
            f"{name}: acc {m['acc']:.3f} ± {m['acc_ci95']:.3f}  ece {m['ece']:.3f} [{m['ece_lo']:.3f}, "
            f"{m['ece_hi']:.3f}]  nll {m['nll']:.3f}  confidence {m['mean_confidence']:.3f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = dict(study=args.study, run=str(args.run), machine=platform.processor() or platform.machine(), rows=rows)
    (RESULTS / f"fewshot_posthoc_{args.study.replace('-', '_')}.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
