"""How the cost of a meta-training step grows: tasks in the set, task batch, width.

For the harmonic task-latent model (issue 2: residual MLP, per-task IAF guide, task
subsampling through ``plate("tasks", N, subsample_size=B)``) and the MAML conv net
(issue 4: Conv4, 5-way 1-shot, 15 queries, second-order, one inner step), this
measures the compiled step's time and memory against

  (a) the number of tasks in the meta-training set, 100 to 100,000,
  (b) the task batch size,
  (c) the network width,

and the achieved FLOP/s of the MAML meta-step against this machine's dense matmul
FLOP/s (measured here, the physical limit of the step).

Two harmonic steps are measured side by side in (a):

- ``dense``: the library path, ``meta_learner(elbo_loss(...), optax.adam)``. The
  ELBO reads only the ``B`` subsampled tasks, but the gradient of the per-task guide
  table is a dense ``[N, ...]`` array and Adam updates every row, every step.
- ``rows``: :func:`metaprior.inference.local.task_batch_learner` (what ``metaprior run
  harmonic`` uses), here without E-steps: the same objective on the ``B`` gathered rows
  only (the model run on the gathered task batch, the guide laid out for ``B`` tasks,
  both scaled by ``N / B``, which is exactly the subsampled ELBO because every latent of
  these guides is inside the tasks plate), one Adam state per task row, gathered and
  scattered back in place (state donated to the step).

Time: median over ``--repeats`` rounds of ``--steps`` steps each; rounds visit the
configurations of a sweep in turn, so a change of machine load hits all of them
alike. Memory: XLA's buffer plan for the compiled step (``memory_analysis``): ``peak_bytes``
= arguments (the resident state and data) + outputs not written in place of a donated
input + temporaries (the step's working memory).
The load average (``os.getloadavg``) is recorded before and after every sweep: the
development machine's 2 cores are shared.

Run:  python benchmarks/scaling.py            (78 min at load average ~24 on the shared
                                               2-core machine, 35 of them compiling;
                                               not timed on an idle machine)
      python benchmarks/scaling.py --quick    (a smoke test at tiny sizes)
      python benchmarks/scaling.py --replot   (redraw the plots from the JSON)
Writes benchmarks/results/scaling.json and benchmarks/results/scaling_*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


# --------------------------------------------------------------------------- timing


class Compiled(NamedTuple):
    """A compiled step ``(state, key, data) -> state``, its initial state (``init()``; a
    donating step consumes it, so each configuration is timed from one state) and data."""

    step: Callable[[Any, jax.Array, Any], Any]
    init: Callable[[], Any]
    data: Any
    memory: dict[str, int]
    flops: float


def _compile(step_fn: Callable, state: Any, data: Any, *, donate: bool) -> Compiled:
    """jit ``step_fn(state, key, data) -> state`` (the data an argument, as in ``fit``, not a
    constant folded into the program); record XLA's memory plan and FLOP count."""
    jitted = jax.jit(step_fn, donate_argnums=(0,) if donate else ())
    compiled = jitted.lower(state, jax.random.key(0), data).compile()
    mem = compiled.memory_analysis()
    memory = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "xla_peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0)),
    }
    # Everything the step's buffer plan holds: inputs, outputs not written in place of a
    # donated input, and temporaries. (XLA's own CPU "peak" leaves out the temporaries of
    # loops, e.g. MAML's inner-loop scan, so it can be below temp_bytes.)
    memory["peak_bytes"] = (
        memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    return Compiled(compiled, lambda: state, data, memory, flops)


def _time_round(c: Compiled, state: Any, num_steps: int, seed: int) -> tuple[float, Any]:
    keys = jax.random.split(jax.random.key(seed), num_steps)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for k in keys:
        state = c.step(state, k, c.data)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / num_steps, state


def sweep(configs: dict[str, Callable[[], Compiled]], *, repeats: int, steps: int, log) -> dict[str, dict]:
    """Compile every configuration, then time them round-robin; medians and spreads."""
    built = {}
    for name, make in configs.items():
        t = time.perf_counter()
        built[name] = make()
        log(f"  compiled {name} in {time.perf_counter() - t:.1f}s")
    states = {name: c.init() for name, c in built.items()}
    for name, c in built.items():  # one warm-up step each (allocations, caches)
        _, states[name] = _time_round(c, states[name], 1, 0)
    times = {name: [] for name in built}
    for r in range(repeats):
        for name, c in built.items():
            t, states[name] = _time_round(c, states[name], steps, r + 1)
            times[name].append(t)
    out = {}
    for name, c in built.items():
        ts = np.asarray(times[name])
        out[name] = {
            "step_s_median": float(np.median(ts)),
            "step_s_min": float(ts.min()),
            "step_s_max": float(ts.max()),
            "step_s_all": ts.tolist(),
            "flops": c.flops,
            **c.memory,
        }
        log(
            f"  {name}: {1e3 * np.median(ts):.1f} ms/step (min {1e3 * ts.min():.1f}, max {1e3 * ts.max():.1f}), "
            f"peak {c.memory['peak_bytes'] / 2**20:.1f} MiB, temp {c.memory['temp_bytes'] / 2**20:.1f} MiB"
        )
    del states
    return out


# --------------------------------------------------------------------------- matmul peak


def matmul_peak(*, sizes=(512, 1024, 2048), repeats: int = 5, log) -> dict:
    """Dense float32 matmul FLOP/s (``2 n^3`` per product), best size, median of repeats."""
    out = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(jnp.dot)
        f(a, b).block_until_ready()
        inner = max(1, int(2e9 // (2 * n**3)))  # ~2 GFLOP per timed call
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(inner):
                r = f(a, b)
            r.block_until_ready()
            ts.append((time.perf_counter() - t) / inner)
        out[str(n)] = 2 * n**3 / float(np.median(ts))
        log(f"  matmul {n}x{n}: {out[str(n)] / 1e9:.1f} GFLOP/s")
    best = max(out, key=out.get)
    return {"flops_per_s_by_size": out, "peak_flops_per_s": out[best], "peak_size": int(best)}


# --------------------------------------------------------------------------- harmonic


def harmonic_step(
    num_tasks: int,
    task_batch: int,
    width: int,
    *,
    kind: str = "dense",
    latent_dim: int = 8,
    num_flows: int = 2,
    num_layers: int = 12,
    num_examples: int = 50,
) -> Callable[[], Compiled]:
    """The harmonic experiment's meta-training step at the given sizes (issue-2 defaults)."""

    def make() -> Compiled:
        from metaprior.data.tasks import harmonic_tasks
        from metaprior.inference.guides import TaskIAFGuide
        from metaprior.inference.local import guide_for_num_tasks
        from metaprior.inference.meta import meta_learner
        from metaprior.inference.svi import elbo_loss, init_params
        from metaprior.models.task_latent import make_task_latent_net, task_latent_model

        k = jax.random.split(jax.random.key(0), 4)
        data, _ = harmonic_tasks(k[0], num_tasks, num_examples, min_examples=4)
        net = make_task_latent_net(k[1], latent_dim, arch="paper", width=width, num_layers=num_layers)
        model = partial(task_latent_model, net=net, latent_dim=latent_dim)
        # Lay the guide out on two tasks (building on all N would run the network on every
        # task once, eagerly) and stretch it to N: the layout depends on site shapes only.
        proto = jax.tree.map(lambda a: a[:2], data)
        guide = guide_for_num_tasks(TaskIAFGuide.build(k[2], model, proto, num_flows=num_flows), num_tasks)
        params = init_params(k[3], model, guide, data, subsample_size=task_batch)
        if kind == "dense":
            loss = elbo_loss(model, guide, model_kwargs={"subsample_size": task_batch})
            learner = meta_learner(loss, optax.adam(1e-3))
            state = learner.init(params)
            return _compile(lambda s, key, data: learner.step(key, s, data)[0], state, data, donate=False)

        # kind == "rows": the library's row-sparse step (task_batch_learner, no E-steps):
        # the same objective on the B gathered rows, their Adam moments scattered back.
        from metaprior.inference.local import task_batch_learner

        learner = task_batch_learner(
            model, guide, task_batch=task_batch, optimizer=optax.adam(1e-3), local_optimizer=optax.adam(1e-3)
        )
        state = learner.init(params)
        return _compile(lambda s, key, data: learner.step(key, s, data)[0], state, data, donate=True)

    return make


# --------------------------------------------------------------------------- MAML


def maml_step(
    num_tasks: int,
    task_batch: int,
    filters: int,
    *,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    inner_steps: int = 1,
    image_size: int = 28,
    num_classes: int = 100,
    examples_per_class: int = 20,
    conv_impl: str = "shift",
) -> Callable[[], Compiled]:
    """One MAML meta-step of the Conv4 net (issue 4) on a meta-training set of ``num_tasks``
    fixed episodes (class and example indices into an image array); each step draws
    ``task_batch`` of them. Images are random: only the cost is measured."""

    def make() -> Compiled:
        import numpyro.distributions as dist

        from metaprior.data.episodes import sample_episode_indices
        from metaprior.inference.local import subsample_indices
        from metaprior.inference.maml import SupportQuery, ml_point, nll_loss
        from metaprior.inference.meta import meta_learner
        from metaprior.models.nets import Conv4

        k = jax.random.split(jax.random.key(1), 4)
        images = jax.random.uniform(k[0], (num_classes, examples_per_class, image_size, image_size, 1))
        tasks = sample_episode_indices(k[1], num_classes, examples_per_class, num_tasks, ways, shots, queries)
        net = Conv4(ways, filters=filters, image_size=image_size, conv_impl=conv_impl, key=k[2])
        objective = ml_point(
            nll_loss(lambda n, x: n(x), lambda logits: dist.Categorical(logits=logits)), optax.sgd(0.4), inner_steps
        )
        learner = meta_learner(objective, optax.adam(1e-3), has_aux=True)
        labels = jnp.repeat(jnp.arange(ways), shots + queries).reshape(ways, shots + queries)

        def sample_batch(key, data):
            images, tasks = data
            idx = subsample_indices(key, num_tasks, task_batch)
            cls, ex = tasks.classes[idx], tasks.examples[idx]  # [B, ways], [B, ways, shots+queries]
            x = images[cls[:, :, None], ex]  # [B, ways, shots+queries, H, W, 1]
            y = jnp.broadcast_to(labels, (task_batch, ways, shots + queries))

            def flat(a):
                return a.reshape((task_batch, -1) + a.shape[3:])

            return SupportQuery(
                flat(x[:, :, :shots]), flat(y[:, :, :shots]), flat(x[:, :, shots:]), flat(y[:, :, shots:])
            )

        def step(state, key, data):
            k_batch, k_step = jax.random.split(key)
            return learner.step(k_step, state, sample_batch(k_batch, data))[0]

        return _compile(step, learner.init(net), (images, tasks), donate=False)

    return make


# --------------------------------------------------------------------------- plots


def _plots(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in ("harmonic", "maml"):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, (axis, label) in zip(
            axes,
            [("num_tasks", "tasks in the meta-training set N"), ("task_batch", "task batch B"), ("width", "width")],
        ):
            for series, rows in report[model][axis].items():
                xs = [r["x"] for r in rows]
                ys = [1e3 * r["step_s_median"] for r in rows]
                lo = [1e3 * r["step_s_min"] for r in rows]
                hi = [1e3 * r["step_s_max"] for r in rows]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[np.subtract(ys, lo), np.subtract(hi, ys)],
                    marker="o",
                    capsize=3,
                    label=f"{series} time",
                )
            ax.set_xscale("log", base=10 if axis == "num_tasks" else 2)
            ax.set_xlabel(label)
            ax.set_ylabel("ms / step (median, min-max)")
            ax2 = ax.twinx()
            for series, rows in report[model][axis].items():
                xs = [r["x"] for r in rows]
                ax2.plot(
                    xs, [r["temp_bytes"] / 2**20 for r in rows], ls="--", marker="x", label=f"{series} working MiB"
                )
                ax2.plot(
                    xs, [r["argument_bytes"] / 2**20 for r in rows], ls=":", marker="+", label=f"{series} resident MiB"
                )
            ax2.set_yscale("log")
            ax2.set_ylabel("MiB: step temporaries (--), resident state+data (:)")
            ax.set_title(f"{model}: {axis}")
            ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = out_dir / f"scaling_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


# --------------------------------------------------------------------------- main


def _rows(results: dict[str, dict], xs: dict[str, int]) -> list[dict]:
    return [{"x": xs[name], **results[name]} for name in xs]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds per configuration")
    p.add_argument("--steps", type=int, default=2, help="steps per timing round")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--replot", action="store_true", help="only redraw the plots from --out")
    p.add_argument(
        "--maml-conv",
        choices=("lax", "shift"),
        default="shift",
        help="Conv4 conv_impl of the MAML step (shift: batched matmuls; lax: XLA's grouped conv)",
    )
    args = p.parse_args(argv)
    if args.replot:
        report = json.loads(args.out.read_text())
        _plots(report, args.out.parent)
        return report
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    def load():
        return [round(x, 2) for x in os.getloadavg()]

    q = args.quick
    task_counts = [100, 1000] if q else [100, 1000, 10000, 100000]
    report: dict = {
        "command": "python benchmarks/scaling.py"
        + (" --quick" if q else "")
        + f" --repeats {args.repeats} --steps {args.steps} --maml-conv {args.maml_conv}",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": str(jax.devices()[0]),
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "python": sys.version.split()[0],
        },
        "load_avg_1_5_15": {"start": load()},
    }
    log(f"device {report['machine']['device']}, load {load()}")

    log("matmul peak")
    report["matmul"] = matmul_peak(sizes=(256, 512) if q else (512, 1024, 2048), repeats=args.repeats, log=log)
    report["load_avg_1_5_15"]["after_matmul"] = load()

    kw = dict(repeats=args.repeats, steps=args.steps, log=log)
    # The sweeps share one centre configuration (N = n_mid, the default batch and width).
    n_mid = 1000
    if q:
        h_extra = dict(num_layers=2, num_examples=20)
        hb, hw, h_batches, h_widths = 8, 32, [4, 8], [16, 32]
        m_extra = dict(image_size=16)
        mb, mf, m_batches, m_filters = 2, 8, [1, 2], [4, 8]
    else:
        h_extra = {}
        hb, hw, h_batches, h_widths = 32, 128, [8, 32, 128], [32, 128, 256]
        m_extra = {}
        mb, mf, m_batches, m_filters = 4, 32, [1, 4, 16], [16, 32, 64]

    harmonic: dict = {
        "config": {
            "centre_num_tasks": n_mid,
            "task_batch": hb,
            "width": hw,
            "latent_dim": 8,
            "num_flows": 2,
            "num_layers": h_extra.get("num_layers", 12),
            "num_examples": h_extra.get("num_examples", 50),
            "optimizer": "adam",
        }
    }
    configs, axes = {}, {"num_tasks": {}, "task_batch": {}, "width": {}}
    for kind in ("dense", "rows"):
        # The dense step at 100,000 tasks needs ~5 GB (state 2 GB, plus a new copy per step);
        # its growth is plain by 10,000, so it stops there on this 24 GB shared machine.
        for n in task_counts if kind == "rows" else [c for c in task_counts if c <= 10000]:
            name = f"{kind}_N{n}_B{hb}_W{hw}"
            configs[name] = harmonic_step(n, hb, hw, kind=kind, **h_extra)
            axes["num_tasks"].setdefault(kind, {})[name] = n
    for b in h_batches:
        name = f"dense_N{n_mid}_B{b}_W{hw}"
        configs.setdefault(name, harmonic_step(n_mid, b, hw, **h_extra))
        axes["task_batch"].setdefault("dense", {})[name] = b
    for w in h_widths:
        name = f"dense_N{n_mid}_B{hb}_W{w}"
        configs.setdefault(name, harmonic_step(n_mid, hb, w, **h_extra))
        axes["width"].setdefault("dense", {})[name] = w
    log(f"harmonic: {len(configs)} configurations")
    res = sweep(configs, **kw)
    for axis, series in axes.items():
        harmonic[axis] = {kind: _rows(res, xs) for kind, xs in series.items()}
    report["harmonic"] = harmonic
    report["load_avg_1_5_15"]["after_harmonic"] = load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")  # partial, rewritten at the end

    maml: dict = {
        "config": {
            "centre_num_tasks": n_mid,
            "task_batch": mb,
            "filters": mf,
            "ways": 5,
            "shots": 1,
            "queries": 15,
            "inner_steps": 1,
            "second_order": True,
            "image_size": m_extra.get("image_size", 28),
            "conv_impl": args.maml_conv,
        }
    }
    m_extra = {**m_extra, "conv_impl": args.maml_conv}
    configs, axes = {}, {"num_tasks": {}, "task_batch": {}, "width": {}}
    for n in task_counts:
        name = f"N{n}_B{mb}_F{mf}"
        configs[name] = maml_step(n, mb, mf, **m_extra)
        axes["num_tasks"].setdefault("maml", {})[name] = n
    for b in m_batches:
        name = f"N{n_mid}_B{b}_F{mf}"
        configs.setdefault(name, maml_step(n_mid, b, mf, **m_extra))
        axes["task_batch"].setdefault("maml", {})[name] = b
    for f in m_filters:
        name = f"N{n_mid}_B{mb}_F{f}"
        configs.setdefault(name, maml_step(n_mid, mb, f, **m_extra))
        axes["width"].setdefault("maml", {})[name] = f
    log(f"MAML: {len(configs)} configurations")
    res = sweep(configs, **kw)
    for axis, series in axes.items():
        maml[axis] = {kind: _rows(res, xs) for kind, xs in series.items()}
    peak = report["matmul"]["peak_flops_per_s"]
    fl = {}
    for axis in ("task_batch", "width"):
        for r in maml[axis]["maml"]:
            achieved = r["flops"] / r["step_s_median"]
            r["achieved_flops_per_s"] = achieved
            r["fraction_of_matmul_peak"] = achieved / peak
            fl[f"{axis}={r['x']}"] = achieved / peak
    maml["fraction_of_matmul_peak"] = fl
    report["maml"] = maml
    report["load_avg_1_5_15"]["end"] = load()
    report["wall_s"] = time.perf_counter() - t0

    # Flatness in N: spread of the median step time over N, against the timing noise.
    for model, series in (("harmonic", report["harmonic"]["num_tasks"]), ("maml", report["maml"]["num_tasks"])):
        for name, rows in series.items():
            med = np.array([r["step_s_median"] for r in rows])
            noise = np.median([(r["step_s_max"] - r["step_s_min"]) / r["step_s_median"] for r in rows])
            temp = [r["temp_bytes"] for r in rows]
            series_summary = {
                "time_ratio_largest_to_smallest_N": float(med[-1] / med[0]),
                "median_relative_spread_within_config": float(noise),
                "temp_bytes_ratio_largest_to_smallest_N": float(temp[-1] / max(temp[0], 1)),
                "argument_bytes_largest_N": rows[-1]["argument_bytes"],
            }
            report[model].setdefault("flatness", {})[name] = series_summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(report, args.out.parent)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out} and {report['plots']} in {report['wall_s']:.0f}s, load {load()}")
    return report


if __name__ == "__main__":
    main()
