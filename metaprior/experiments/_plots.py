"""The experiments' shared figures: training curves, reliability diagrams, sampled functions,
metrics against support size, posterior marginals, the deep weight prior's figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from metaprior.experiments._common import save_figure
from metaprior.inference.dwp_source import mean_std

__all__ = [
    "smooth",
    "training_figure",
    "reliability_figure",
    "functions_figure",
    "support_size_figure",
    "marginals_figure",
    "errorbar_figure",
    "prior_samples_figure",
    "scatter_figure",
]


def smooth(values: Sequence[float], points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Moving average over ``len(values) // points`` steps: ``(step, value)`` arrays."""
    values = np.asarray(values, dtype=np.float64)
    w = max(1, len(values) // points)
    return np.arange(len(values) - w + 1) + w, np.convolve(values, np.ones(w) / w, mode="valid")


def training_figure(
    curves: Mapping[str, Sequence[float]],
    out_dir: str | os.PathLike,
    name: str = "training.png",
    *,
    ylabel: str = "meta-loss (moving average)",
    log: bool = False,
    title: str | None = None,
) -> Path:
    """One smoothed loss curve per entry of ``curves`` (``{label: losses}``), saved as ``name``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, losses in curves.items():
        if len(losses):
            ax.plot(*smooth(losses), lw=1, label=label)
    ax.set_xlabel("meta-training step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(curves) > 1:
        ax.legend(fontsize="small")
    return save_figure(fig, out_dir, name)


def reliability_figure(
    curves: Mapping[str, tuple], out_dir: str | os.PathLike, title: str, name: str = "reliability.png"
) -> Path:
    """A reliability diagram of ``{label: reliability_curve(...)}``, saved as ``name``."""
    import matplotlib.pyplot as plt

    from metaprior.inference.diagnostics import plot_reliability

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    plot_reliability(curves, ax=ax)
    ax.set_title(title)
    return save_figure(fig, out_dir, name)


def functions_figure(
    panels: Sequence[Mapping], out_dir: str | os.PathLike, name: str, *, title: str, label: str = "posterior samples"
) -> Path:
    """Sampled functions against the truth, one panel per task, saved as ``name``.

    Each panel is a mapping with ``title``, ``grid [G]``, ``samples [S, G]`` (at most 30
    are drawn), ``truth [G]``, ``support_x [N]`` and ``support_y [N]``.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], panels):
        samples = np.asarray(p["samples"])[:30]
        alpha = 0.3 if len(samples) > 1 else 1.0
        ax.plot(p["grid"], samples.T, color="C0", alpha=alpha, lw=0.9)
        ax.plot(p["grid"], p["truth"], color="k", lw=1.8, label="true function")
        ax.scatter(p["support_x"], p["support_y"], color="C3", zorder=3, s=12, label="support")
        ax.set_title(p["title"])
        ax.set_xlabel("x")
    axes[0][0].plot([], [], color="C0", label=label)
    axes[0][0].set_ylabel("y")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, y=1.03)
    return save_figure(fig, out_dir, name)


def latent_functions_figure(
    predict, results: Mapping[int, Mapping], grid, truth, out_dir: str | os.PathLike, name: str, *, title: str
) -> Path:
    """Task 0's predictive functions at support sizes 1, 2, 8 and 256 (those present, else the
    first four): 20 posterior draws of ``z`` per panel through ``predict(z [S, 1, d], x [1, G, 1])
    -> (mu, sigma)``, against ``truth [G]`` on ``grid [G]`` (the paper's Figure 1 for task latents)."""
    panels = []
    for n in [n for n in (1, 2, 8, 256) if n in results] or list(results)[:4]:
        mu, _ = predict(np.asarray(results[n]["z"])[:20, :1], np.asarray(grid)[None, :, None])
        s = results[n]["support"]
        panel = dict(title=f"{n} point{'s' if n > 1 else ''}", grid=grid, samples=mu[:, 0], truth=truth)
        panels.append(dict(panel, support_x=s.x[0, :, 0], support_y=s.y[0]))
    return functions_figure(panels, out_dir, name, title=title, label="samples of z")


def support_size_figure(
    results: Mapping[str, Mapping[int, Mapping[str, Sequence[float]]]],
    panels: Sequence[tuple[str, str, str]],
    out_dir: str | os.PathLike,
    name: str,
) -> Path:
    """Per-task metrics against support size with 95% intervals, one line per model.

    Args:
        results: ``{model label: {N: {metric: per-task values}}}``.
        panels: ``(metric, title, y scale)`` per panel.
    """
    import matplotlib.pyplot as plt

    from metaprior.inference.evaluation import mean_ci95

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for (label, res), color in zip(results.items(), ("C0", "C1", "C2", "C3")):
        sizes = sorted(res)
        for ax, (key, _, _) in zip(axes[0], panels):
            means = [mean_ci95(res[n][key]) for n in sizes]
            ax.errorbar(
                sizes,
                [m for m, _ in means],
                yerr=[c for _, c in means],
                label=label,
                color=color,
                marker="o",
                capsize=3,
            )
    for ax, (_, title, scale) in zip(axes[0], panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale(scale)
        ax.set_xlabel("support size")
        ax.set_title(title)
    axes[0][0].legend()
    return save_figure(fig, out_dir, name)


def marginals_figure(
    all_draws: Mapping[str, Mapping[str, np.ndarray]],
    sites: Sequence[str],
    names: Sequence[str],
    out_dir: str | os.PathLike,
    name: str,
    *,
    title: str = "",
    max_panels: int = 8,
) -> Path:
    """Marginals of a few scalar parameters: ``all_draws["nuts"]`` filled, each other method a
    line (a dotted vertical line for a point estimate), saved as ``name``.

    The panels are the first scalar of every site, then further scalars in order, up to
    ``max_panels``; ``names`` are the scalars of :func:`metaprior.inference.validation.flatten_draws`.
    """
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    from metaprior.inference.validation import flatten_draws

    flat = {m: flatten_draws(d, sites)[0] for m, d in all_draws.items()}
    first_of_site: dict[str, int] = {}
    for i, n in enumerate(names):
        first_of_site.setdefault(n.split("[")[0], i)
    firsts = list(first_of_site.values())
    panels = (firsts + [i for i in range(len(names)) if i not in firsts])[:max_panels]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, p in zip(axes.ravel(), panels):
        ref = flat["nuts"][:, p]
        lo, hi = np.quantile(ref, [0.001, 0.999])
        pad = 0.5 * (hi - lo) + 1e-6
        grid = np.linspace(lo - pad, hi + pad, 200)
        ax.hist(ref, bins=50, range=(grid[0], grid[-1]), density=True, color="0.8", label="NUTS")
        for method, values in flat.items():
            if method == "nuts":
                continue
            v, color = values[:, p], f"C{list(flat).index(method) % 10}"
            if np.std(v) < 1e-9:  # a point estimate
                ax.axvline(v[0], lw=1, ls=":", label=method, color=color)
            else:
                ax.plot(grid, gaussian_kde(v)(grid), lw=1, label=method, color=color)
        ax.set_title(names[p], fontsize="small")
        ax.set_yticks([])
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize="x-small")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def errorbar_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence]],
    out_dir: str | os.PathLike,
    name: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
) -> Path:
    """Mean +- sd (over the values at each x) per line: ``{label: (xs, [values at x])}``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, (xs, values)) in enumerate(series.items()):
        mean, std = zip(*(mean_std(v) for v in values))
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label, color=f"C{i}")
    if logx:
        ax.set_xscale("log")
        ax.set_xticks(list(xs), [str(x) for x in xs])
        ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    return save_figure(fig, out_dir, name)


def prior_samples_figure(rng_key, prior, kernels: Sequence[np.ndarray], out_dir, num: int = 36) -> Path:
    """The paper's Figure 1c: real source kernels beside samples from the learned prior."""
    import matplotlib.pyplot as plt

    layers = len(prior.vaes)
    side = int(np.sqrt(num))
    fig, axes = plt.subplots(layers, 2, figsize=(7, 3.6 * layers), squeeze=False)
    for layer in range(layers):
        k_real, k_samp = jax.random.split(jax.random.fold_in(rng_key, layer))
        real = np.asarray(kernels[layer])
        pick = np.asarray(jax.random.choice(k_real, real.shape[0], (min(num, real.shape[0]),), replace=False))
        samples = np.asarray(prior.vaes[layer].sample(k_samp, num))
        for ax, group, title in (
            (axes[layer][0], real[pick], "source kernels (notMNIST nets)"),
            (axes[layer][1], samples, "samples from the prior"),
        ):
            k = group.shape[-1]
            canvas = np.full((side * (k + 1) - 1, side * (k + 1) - 1), np.nan)
            for t, w in enumerate(group[: side * side]):
                r, c = divmod(t, side)
                w = w / (np.abs(w).max() + 1e-8)
                canvas[r * (k + 1) : r * (k + 1) + k, c * (k + 1) : c * (k + 1) + k] = w
            ax.imshow(canvas, cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(f"layer {layer} ({k}x{k}): {title}", fontsize=9)
            ax.axis("off")
    return save_figure(fig, out_dir, "prior_samples.png")


def scatter_figure(
    points: Mapping[str, Mapping[str, tuple[float, float]]],
    out_dir: str | os.PathLike,
    name: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """One marker per group and colour per label: ``{group: {label: (x, y)}}`` (e.g. test bed ->
    method -> (ECE, accuracy)), saved as ``name``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    labels = sorted({label for pts in points.values() for label in pts})
    for marker, (group, pts) in zip("osD^v<>px*", points.items()):
        for label, (x, y) in pts.items():
            ax.scatter(x, y, marker=marker, color=f"C{labels.index(label) % 10}", s=40)
        ax.scatter([], [], marker=marker, color="0.4", label=group)
    for label in labels:
        ax.plot([], [], color=f"C{labels.index(label) % 10}", lw=5, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize="x-small", ncol=2, loc="best")
    return save_figure(fig, out_dir, name)


def curves_figure(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    out_dir: str | os.PathLike,
    name: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """One panel per entry of ``panels`` (``{panel: {label: [(x, y), ...]}}``), a line per label
    (e.g. episode shape -> method -> (training seconds, validation accuracy)), saved as ``name``."""
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per label in every panel
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1) + 1.5, 3.6), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o", ms=3, lw=1.2, label=label, color=colours[label])
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=colours[label], marker="o", ms=3, label=label) for label in labels]
    fig.legend(handles=handles, loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    return save_figure(fig, out_dir, name)
