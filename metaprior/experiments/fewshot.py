"""``metaprior run fewshot``: every few-shot method on one backbone, one budget, the same episodes.

Each method of :mod:`metaprior.inference.fewshot` (MAML second- and first-order, LLAMA
with its sampled-network and GLM Laplace predictives, the amortized LSTM guide, SIB at
T = 0 and T = 3, Prototypical networks) is meta-trained once on the Omniglot training
alphabets (background "small" sets, rotations as new classes) with the same Conv4, the
same number of steps and tasks per step, and scored on the same test beds
(:mod:`metaprior.data.testbeds`):

- ``id``: held-out Omniglot characters, 5-way 1- and 5-shot and 20-way 1-shot;
- ``ood_mnist``, ``ood_notmnist``: MNIST digits and notMNIST letters, 5-way 1- and 5-shot;
- Lake et al.'s 20 one-shot runs (20-way, within alphabet) when ``omniglot/all_runs.zip``
  is in the data directory, scored as error rate with the runs' own protocol.

Every method sees the same episodes (one key per bed) and the same evaluation key. Each
method's meta-training keeps a checkpoint in ``--out`` (``{method}.ckpt``): a killed run
resumes there. Outputs: ``metrics.json``, ``fewshot_table.md`` (also printed),
``reliability_{bed}.png`` (all methods on one figure per bed), ``acc_vs_ece.png``,
``training.png``, ``val_acc_vs_seconds.png`` and ``curves.json`` (every method's validation
accuracy against its training seconds, one panel per in-domain shape: what a CPU user chooses
a budget by) and ``posterior.nc`` (each Bayesian method's predictive draws on a few in-domain
episodes).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metaprior.data import omniglot_splits
from metaprior.data.testbeds import BEDS, fewshot_testbeds, ood_pool
from metaprior.experiments._common import atomic_write_bytes, save_datatree, write_metrics
from metaprior.experiments._plots import curves_figure, reliability_figure, scatter_figure, training_figure
from metaprior.experiments._registry import ConfigError, Experiment
from metaprior.inference.diagnostics import to_datatree
from metaprior.inference.evaluation import evaluate_fewshot
from metaprior.inference.fewshot import (
    BAYESIAN,
    METHODS,
    PER_WAY,
    VARIANTS,
    FewShotSettings,
    combine_ways,
    fewshot_table,
    learning_curves,
    oneshot_errors,
    train_method,
)

__all__ = ["FewShotConfig", "make_config", "run"]


@dataclasses.dataclass(frozen=True)
class FewShotConfig(FewShotSettings):
    """The backbone and budget (:class:`~metaprior.inference.fewshot.FewShotSettings`) and the
    test beds.

    Attributes:
        methods: the training units to run (:data:`~metaprior.inference.fewshot.METHODS`).
        beds: which of ``id``, ``ood_mnist``, ``ood_notmnist``.
        id_shapes, ood_shapes: ``(ways, shots)`` of the in-domain / out-of-domain beds.
        num_episodes, queries, bootstrap: episodes per bed, queries per class, resamples of
            the episode bootstrap; posterior_episodes, posterior_draws: the ArviZ file.
        split_seed, held_out, data_dir: the Omniglot split (as ``omniglot-maml``) and where
            the data are (``""``: ``$METAPRIOR_DATA``).
        per_way: MAML, FOMAML and LLAMA get one model per number of ways scored, trained at
            those ways (the MAML paper's protocol: its 20-way model is trained at 20 ways);
            ``False``: the ``ways``-way model for every bed, its head tiled.
        curve_points: snapshots per run scored on validation episodes of each in-domain shape.
        protonet_ways: ProtoNets' training ways (20: best of 5 / 20 / 60 on validation
            characters at 120 s each, ``benchmarks/README.md`` "ProtoNets' training ways").
    """

    methods: tuple[str, ...] = METHODS
    beds: tuple[str, ...] = BEDS
    id_shapes: tuple[tuple[int, int], ...] = ((5, 1), (5, 5), (20, 1))
    ood_shapes: tuple[tuple[int, int], ...] = ((5, 1), (5, 5))
    num_episodes: int = 600
    queries: int = 15
    bootstrap: int = 1000
    posterior_episodes: int = 3
    posterior_draws: int = 20
    split_seed: int = 0
    held_out: str = "character"
    data_dir: str = ""
    per_way: bool = True
    curve_points: int = 3
    protonet_ways: int = 20


def make_config(size: str) -> FewShotConfig:
    """``"quick"``: a smoke test (numbers meaningless). ``"default"``: the table at a budget
    that runs in under an hour on 2 CPU cores (``benchmarks/README.md``). ``"full"``: the
    MAML paper's Omniglot budget (60k steps of 32 tasks, 64 filters)."""
    if size == "quick":
        small = dict(filters=4, meta_batch=2, num_steps=4, steps_per_call=2, num_val_episodes=2, num_samples=2)
        small.update(sib_pretrain_steps=4, sib_pretrain_batch=16, sib_draws=2, amortized_hidden=8, amortized_noise=4)
        small.update(tau_grid=(1000.0,), num_episodes=4, queries=3, val_queries=3, eval_batch=2, bootstrap=20)
        shapes = dict(id_shapes=((5, 1), (20, 1)), ood_shapes=((5, 1),))  # two episode shapes: two compiles
        return FewShotConfig(**small, **shapes, posterior_draws=3, posterior_episodes=2, curve_points=1)
    if size == "default":  # 16 filters: the budget at which omniglot-maml's figures were recorded
        return FewShotConfig(filters=16)
    if size == "full":
        full = dict(filters=64, meta_batch=32, num_steps=60000, train_queries=15, sib_pretrain_steps=20000)
        return FewShotConfig(**full, num_samples=16)
    raise ValueError(f"unknown size {size!r}")


def _log(message: str) -> None:
    print(f"fewshot: {message}", file=sys.stderr, flush=True)


def _pools(config: FewShotConfig, splits) -> dict[str, np.ndarray]:
    pools = {"id": splits["test"].images}
    for bed in config.beds:
        if bed != "id":
            pools[bed] = ood_pool(bed, config.image_size, config.data_dir or None)
    return pools


def _posterior(rng_key, config: FewShotConfig, trained, bed):
    """Per-draw predictive probabilities of every Bayesian variant on the first episodes of ``bed``."""
    episodes = jax.tree.map(lambda a: a[: config.posterior_episodes], next(bed.batches(config.posterior_episodes)))
    posterior, dims = {}, {}
    for t in trained.values():
        for variant, predict in t.predictives(bed.ways, num_samples=1).items():
            if variant in BAYESIAN and predict is not None:
                keys = jax.random.split(jax.random.fold_in(rng_key, BAYESIAN.index(variant)), config.posterior_draws)
                draws = [np.asarray(predict(k, episodes.support_x, episodes.support_y, episodes.query_x)) for k in keys]
                posterior[f"{variant}_probs"] = np.stack(draws)[None]
                dims[f"{variant}_probs"] = ["episode", "query", "class"]
    dims["query_y"] = ["episode", "query"]
    attrs = {"experiment": "fewshot", "bed": bed.name, "methods": ",".join(sorted(posterior))}
    return to_datatree(posterior, observed_data={"query_y": np.asarray(episodes.query_y)}, dims=dims, attrs=attrs)


def run(rng_key: jax.Array, config: FewShotConfig, out_dir: Path) -> dict[str, float]:
    out_dir = Path(out_dir)
    unknown = sorted(set(config.methods) - set(METHODS)) + sorted(set(config.beds) - set(BEDS))
    if unknown:
        raise ConfigError(f"unknown methods or beds {unknown}; methods: {METHODS}, beds: {BEDS}")
    k_beds, k_train, k_eval, k_post = jax.random.split(rng_key, 4)
    k_curve = jax.random.fold_in(k_eval, 1000)
    splits = omniglot_splits(config.image_size, rotations=True, seed=config.split_seed, held_out=config.held_out)
    shapes = {bed: config.id_shapes if bed == "id" else config.ood_shapes for bed in config.beds}
    beds = fewshot_testbeds(
        k_beds, _pools(config, splits), shapes, num_episodes=config.num_episodes, queries=config.queries
    )
    metrics: dict = dict(num_steps=config.num_steps, meta_batch=config.meta_batch, filters=config.filters)
    trained, curves, reliability, points = {}, {}, {b.name: {} for b in beds}, {b.name: {} for b in beds}
    per_ways = {}
    ways_scored = sorted({b.ways for b in beds})
    for i, method in enumerate(config.methods):
        models = {}
        for ways in ways_scored if config.per_way and method in PER_WAY else [config.ways]:
            name = f"{method}.ckpt" if ways == config.ways else f"{method}_{ways}w.ckpt"
            s, data = dataclasses.replace(config, ways=ways), (splits["train"].images, splits["val"].images)
            models[ways] = train_method(method, jax.random.fold_in(k_train, i), s, *data, checkpoint=out_dir / name)
        t = combine_ways(models, config.ways)
        trained[method], curves[method], per_ways[method] = t, t.losses, models
        metrics[f"{method}_train_time_s"] = t.train_time_s
        metrics.update({f"{method}_{k}": v for k, v in t.info.items()})
        groups = {ways: t.grouped_predictives(ways) for ways in sorted({b.ways for b in beds})}  # one compile per shape
        for j, bed in enumerate(beds):
            for variants, predict in groups[bed.ways].items():
                if predict is None:
                    continue
                start = time.perf_counter()
                desc = f"{'+'.join(variants)} {bed.name}"
                key = jax.random.fold_in(k_eval, j)
                evs = evaluate_fewshot(key, predict, bed.batches(config.eval_batch), desc=desc, grouped=True)
                seconds = (time.perf_counter() - start) / len(variants)  # a group's time, shared
                for variant, ev in zip(variants, evs):
                    prefix = f"{variant}_{bed.name}_"
                    metrics[f"{prefix}eval_time_s"] = seconds
                    metrics.update(ev.metrics(prefix=prefix))
                    ci = ev.bootstrap(num_resamples=config.bootstrap, seed=j)
                    metrics.update({f"{prefix}{k}": v for k, v in ci.items()})
                    reliability[bed.name][variant] = ev.reliability()
                    points[bed.name][variant] = (metrics[f"{prefix}ece"], metrics[f"{prefix}acc"])
        _log(f"{method} done in {t.train_time_s:.0f} s of training")
        write_metrics(out_dir / "metrics.json", {**metrics, "partial": 1})  # a killed run shows what finished
    metrics.update(oneshot_errors(jax.random.fold_in(k_eval, 99), trained, config.image_size, config.data_dir or None))
    if config.curve_points > 0:
        _log("scoring the training snapshots on validation episodes")
        kw = dict(num_episodes=config.num_val_episodes, queries=config.val_queries, batch_size=config.eval_batch)
        lines = learning_curves(
            k_curve, per_ways, jnp.asarray(splits["val"].images), config.id_shapes, config.ways, **kw
        )
        atomic_write_bytes(out_dir / "curves.json", json.dumps(lines, indent=1).encode())
        for shape, by_variant in lines.items():
            metrics.update({f"{v}_val_{shape}_acc": pts[-1][1] for v, pts in by_variant.items()})
        kw = dict(xlabel="training seconds", ylabel=f"validation accuracy ({config.num_val_episodes} episodes)")
        title = "held-out validation characters: accuracy against training time"
        curves_figure(lines, out_dir, "val_acc_vs_seconds.png", **kw, title=title)

    variants = [v for m in config.methods for v in VARIANTS[m]]
    table = fewshot_table(metrics, variants, [b.name for b in beds])
    atomic_write_bytes(out_dir / "fewshot_table.md", table.encode())
    print(table, file=sys.stderr)
    for bed in beds:
        title = f"{bed.name}: {bed.num_episodes} episodes, {bed.queries} queries per class"
        reliability_figure(reliability[bed.name], out_dir, title, name=f"reliability_{bed.name}.png")
    kw = dict(xlabel="ECE (15 bins)", ylabel="accuracy", title="accuracy against calibration, every bed")
    scatter_figure(points, out_dir, "acc_vs_ece.png", **kw)
    training_figure(curves, out_dir, log=False)
    id_bed = next((b for b in beds if b.bed == "id" and b.ways == config.ways), beds[0])
    if any(v in BAYESIAN for v in variants):
        save_datatree(_posterior(k_post, config, trained, id_bed), out_dir / "posterior.nc")
    return metrics


METRICS_DOC = """
{variant}_{bed}_{W}w{S}s_{acc,ece,nll}: accuracy (mean over episodes), ECE (15 bins, all queries),
    NLL per query; variant in maml, maml_fo, llama_nn, llama_glm, amortized, sib_t0, sib_t3, protonet;
    bed in id, ood_mnist, ood_notmnist; absent where the variant has no W-way predictive
{variant}_{bed}_{W}w{S}s_acc_ci95: half-width of the normal 95% interval of the accuracy
{variant}_{bed}_{W}w{S}s_{acc,ece,nll}_{lo,hi}: 95% percentile bootstrap interval over episodes
{variant}_{bed}_{W}w{S}s_eval_time_s: seconds to score the bed (variants scored in one pass, as LLAMA's
    nn and glm sharing one Laplace fit, split the pass's time evenly)
{variant}_oneshot_error: error rate on Lake's 20 one-shot runs (oneshot_note says why when skipped)
{method}_train_time_s: meta-training seconds (SIB: with pretraining; LLAMA: with the tau_pred search), summed
    over a method's models; {method}_{W}w_train_time_s: each model's (per_way: MAML, FOMAML, LLAMA trained
    at every W scored; its other keys then also come as {method}_{W}w_{key} for W other than ways)
{method}_train_steps: meta-training steps run (SIB: {method}_pretrain_steps, {method}_train_steps_t{T}); with
    --set budget_s=S every method trains S seconds (num_steps a cap) and these say how far it got
{variant}_val_{W}w{S}s_acc: validation accuracy (num_val_episodes episodes of the validation characters) of
    the trained model at each in-domain shape; curves.json and val_acc_vs_seconds.png hold it against the
    training seconds of each of curve_points snapshots (SIB: pretraining included)
llama_tau_pred_{nn,glm}: LLAMA's predictive prior precision chosen on validation NLL
llama_val_nll_{nn,glm}_tau{tau}: validation NLL per query of each predictive at each tau of tau_grid
num_steps, meta_batch, filters: the shared budget
"""

EXPERIMENTS = [
    Experiment(
        name="fewshot",
        description="one few-shot table: every method, same Conv4 and budget, in-domain, MNIST/notMNIST, Lake runs",
        make_config=make_config,
        run=run,
        metrics_doc=METRICS_DOC,
    )
]
