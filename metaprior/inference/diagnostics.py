"""Diagnostics: calibration of classifiers, and any posterior of the library as ArviZ.

Two families live here because every experiment reports both:

- Calibration: :func:`expected_calibration_error`, :func:`reliability_curve` and
  :func:`plot_reliability` (equal-width confidence bins, Guo et al. 2017).
- ArviZ: :func:`to_datatree` and its front ends :func:`from_mcmc`, :func:`from_guide` and
  :func:`from_samples` turn MCMC draws, an SVI guide, a Laplace posterior or an amortized
  guide into one ``xarray.DataTree`` with ``posterior``, ``posterior_predictive``,
  ``observed_data`` and ``log_likelihood`` groups, whose dims are named after the model's
  plates (``tasks``, ``examples``), so ``az.summary``, ``az.plot_ppc_dist``, ``az.loo``
  and ``az.compare`` work on all of them. :func:`save_posterior` writes the file the
  experiments keep.

These functions run outside ``jit`` (they return Python floats, NumPy arrays and xarray
objects); the sampling they call is jitted inside NumPyro.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpyro.primitives import Messenger

__all__ = [
    "expected_calibration_error",
    "reliability_curve",
    "plot_reliability",
    "to_datatree",
    "from_samples",
    "from_guide",
    "from_mcmc",
    "save_posterior",
    "load_posterior",
    "predictive_scores",
]

POSTERIOR_FORMAT = "metaprior-posterior-v1"  # the root attribute ``metaprior_format`` of every file we write


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def _check_probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim < 2:
        raise ValueError(f"probs must have shape [N, K] (class probabilities), got {probs.shape}")
    if labels.shape != probs.shape[:-1]:
        raise ValueError(
            f"labels must have shape {probs.shape[:-1]} (probs without its class axis), got {labels.shape}"
        )
    if probs.size == 0:
        raise ValueError("probs is empty")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    num_classes = probs.shape[-1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return probs.reshape(-1, num_classes), labels.reshape(-1)


def reliability_curve(probs, labels, num_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean confidence, accuracy and count in equal-width confidence bins.

    The confidence of a prediction is its top class probability; bin ``b`` holds the
    predictions with confidence in ``(b / num_bins, (b + 1) / num_bins]`` (the first bin
    also holds confidence 0).

    Args:
        probs: ``[N, K]`` predicted class probabilities (extra leading axes are flattened).
        labels: ``[N]`` true class indices.
        num_bins: number of equal-width bins on ``[0, 1]``.

    Returns:
        ``(bin_confidence, bin_accuracy, bin_count)``, each ``[num_bins]``; confidence and
        accuracy are NaN in empty bins, whose count is 0.

    References:
        Guo, Pleiss, Sun, Weinberger (2017), "On Calibration of Modern Neural Networks",
        Section 2 (reliability diagrams).
    """
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    probs, labels = _check_probs_labels(probs, labels)
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    # Right-closed bins (b/M, (b+1)/M]: ceil(c * M) - 1, with c = 0 sent to the first bin.
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins).astype(np.int64)
    sum_conf = np.bincount(index, weights=confidence, minlength=num_bins)
    sum_acc = np.bincount(index, weights=correct, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_confidence = np.where(count > 0, sum_conf / count, np.nan)
        bin_accuracy = np.where(count > 0, sum_acc / count, np.nan)
    return bin_confidence, bin_accuracy, count


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``.

    Args:
        probs: ``[N, K]`` predicted class probabilities (extra leading axes are flattened).
        labels: ``[N]`` true class indices.
        num_bins: number of equal-width bins on ``[0, 1]`` (15 in Guo et al. and in the
            few-shot calibration literature).

    Returns:
        The ECE as a Python float in ``[0, 1]``.

    References:
        Guo, Pleiss, Sun, Weinberger (2017), "On Calibration of Modern Neural Networks",
        Eq. (3); Naeini, Cooper, Hauskrecht (2015).
    """
    conf, acc, count = reliability_curve(probs, labels, num_bins)
    filled = count > 0
    weights = count[filled] / count.sum()
    return float(np.sum(weights * np.abs(acc[filled] - conf[filled])))


def plot_reliability(curves: Mapping[str, tuple], ax=None):
    """Reliability diagram: accuracy against confidence per bin, one line per method.

    Args:
        curves: ``{label: (bin_confidence, bin_accuracy, bin_count)}`` as returned by
            :func:`reliability_curve`; empty bins are skipped.
        ax: a matplotlib axis (a new figure if ``None``).

    Returns:
        The axis.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for label, (conf, acc, count) in curves.items():
        conf, acc, count = map(np.asarray, (conf, acc, count))
        filled = count > 0
        total = count.sum()
        ece = float(np.sum(count[filled] / total * np.abs(acc[filled] - conf[filled])))
        ax.plot(conf[filled], acc[filled], marker="o", ms=3, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize="small", loc="upper left")
    return ax


# --------------------------------------------------------------------------------------
# ArviZ
# --------------------------------------------------------------------------------------

_SAMPLE_DIMS = ("chain", "draw")


def to_datatree(
    posterior: Mapping[str, Any],
    *,
    posterior_predictive: Mapping[str, Any] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    log_likelihood: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
):
    """Assemble an ArviZ ``xarray.DataTree`` from arrays.

    Args:
        posterior: ``{name: [chain, draw, ...]}`` posterior draws.
        posterior_predictive: ``{name: [chain, draw, ...]}`` replicated observations.
        observed_data: ``{name: [...]}`` the observations (no sample dims).
        log_likelihood: ``{name: [chain, draw, ...]}`` pointwise log-likelihood of the
            observations (event dims summed).
        dims: ``{name: [dim, ...]}`` names of the non-sample dims of each variable
            (shared by all groups; a log-likelihood drops the trailing event dims).
        coords: ``{dim: values}``; integer coordinates where absent.
        attrs: global attributes of the tree (e.g. ``{"method": "nuts"}``).

    Returns:
        An ``xarray.DataTree`` with the groups that were given.
    """
    import arviz as az

    groups = {
        "posterior": posterior,
        "posterior_predictive": posterior_predictive,
        "log_likelihood": log_likelihood,
        "observed_data": observed_data,
    }
    data = {}
    for group, values in groups.items():
        if values is None:
            continue
        data[group] = {name: np.asarray(value) for name, value in values.items()}
        if group != "observed_data":
            for name, value in data[group].items():
                if value.ndim < 2:
                    raise ValueError(f"{group}[{name!r}] must have leading (chain, draw) dims, got shape {value.shape}")
    return az.from_dict(
        data,
        sample_dims=list(_SAMPLE_DIMS),
        dims=dict(dims or {}),
        coords=dict(coords or {}),
        attrs={"/": dict(attrs)} if attrs else None,
    )


class _unobserve(Messenger):
    """Handler: every observed site is resampled (the posterior predictive of the program)."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["value"] = None
            msg["is_observed"] = False


def _site_dims(name: str, site: Mapping[str, Any]) -> tuple[list[str], tuple[int, ...]]:
    """Dim names of a traced site's value, and the axes to squeeze.

    A batch dim that belongs to a plate is named after it; a batch dim of size 1 outside
    any plate (a task-level site broadcast against ``plate("examples", dim=-1)``) is
    squeezed; the others are ``{name}_dim_{i}``.
    """
    shape = np.shape(site["value"])
    fn = site.get("fn")
    event_ndim = len(getattr(fn, "event_shape", ())) if fn is not None else 0
    batch_ndim = len(shape) - event_ndim
    frames = {frame.dim: frame for frame in site.get("cond_indep_stack", ())}
    names, squeeze, unnamed = [], [], 0
    for i, size in enumerate(shape):
        frame = frames.get(i - batch_ndim) if i < batch_ndim else None
        if frame is not None and frame.size == size:
            names.append(frame.name)
        elif i < batch_ndim and size == 1:
            squeeze.append(i)
        else:
            names.append(f"{name}_dim_{unnamed}")
            unnamed += 1
    return names, tuple(squeeze)


def _trace_model(rng_key, model, sample: Mapping[str, Any], model_args, model_kwargs):
    from numpyro import handlers

    return handlers.trace(handlers.seed(handlers.substitute(model, data=dict(sample)), rng_key)).get_trace(
        *model_args, **model_kwargs
    )


def _is_discrete_enumerated(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and site.get("infer", {}).get("enumerate")


def _draw_discrete(rng_key, model, samples, sites, batch_ndims, model_args, model_kwargs):
    """Draw enumerated discrete sites from their conditional posterior given each draw."""
    from numpyro.infer import Predictive

    return Predictive(
        model, samples, batch_ndims=batch_ndims, infer_discrete=True, return_sites=list(sites), parallel=True
    )(rng_key, *model_args, **model_kwargs)


def from_samples(
    rng_key,
    model: Callable,
    samples: Mapping[str, Any],
    *model_args,
    sample_ndims: int = 1,
    attrs: Mapping[str, Any] | None = None,
    **model_kwargs,
):
    """Any posterior given as draws of the model's latent sites, as an ArviZ DataTree.

    The model is the same NumPyro program the posterior was fitted on, called with its
    observations. From it come the ``observed_data``, the ``posterior_predictive`` (every
    observed site resampled given each draw), the pointwise ``log_likelihood``
    (:func:`numpyro.infer.util.log_likelihood`, masks applied) and the dim names: a batch
    dim that belongs to a plate is named after it (``tasks``, ``examples``), others
    ``{site}_dim_{i}``. Discrete latents that the model enumerates
    (``infer={"enumerate": "parallel"}``) and the draws lack are drawn from their
    conditional posterior first (:class:`numpyro.infer.Predictive` with
    ``infer_discrete=True``), so they appear in ``posterior`` and the predictive is that
    of the same tasks; the log-likelihood is then conditional on them.

    Args:
        rng_key: PRNG key for the predictive and discrete draws.
        model: the NumPyro program.
        samples: ``{site: [draw, ...]}`` (``sample_ndims=1``, one chain) or
            ``{site: [chain, draw, ...]}`` (``sample_ndims=2``). Sites the model does not
            sample (guide-internal ones) are dropped.
        *model_args, **model_kwargs: the model's arguments, observations included.
        sample_ndims: 1 or 2, the number of leading sample axes of ``samples``.
        attrs: global attributes of the tree.

    Returns:
        ``xarray.DataTree`` with ``posterior``, ``posterior_predictive``,
        ``log_likelihood`` and ``observed_data``.
    """
    import jax
    from numpyro.infer import Predictive
    from numpyro.infer.util import log_likelihood

    if sample_ndims not in (1, 2):
        raise ValueError(f"sample_ndims must be 1 or 2, got {sample_ndims}")
    if not samples:
        raise ValueError("samples is empty")
    key_trace, key_discrete, key_pred = jax.random.split(rng_key, 3)
    first = {k: np.asarray(v)[(0,) * sample_ndims] for k, v in samples.items()}
    trace = _trace_model(key_trace, model, first, model_args, model_kwargs)
    latent = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]]
    observed = [n for n, s in trace.items() if s["type"] == "sample" and s["is_observed"]]
    deterministic = [n for n, s in trace.items() if s["type"] == "deterministic"]
    samples = {k: v for k, v in samples.items() if k in latent}
    if sample_ndims == 1:
        samples = {k: np.asarray(v)[None] for k, v in samples.items()}
    missing = [n for n in latent if n not in samples]
    discrete = [n for n in missing if _is_discrete_enumerated(trace[n])]
    if set(missing) - set(discrete):
        raise ValueError(f"samples lack the model's latent sites {sorted(set(missing) - set(discrete))}")
    samples = {k: jax.numpy.asarray(v) for k, v in samples.items()}
    if discrete:
        samples.update(_draw_discrete(key_discrete, model, samples, discrete, 2, model_args, model_kwargs))
    predictive = Predictive(
        _unobserve(model), samples, batch_ndims=2, parallel=True, return_sites=observed + deterministic
    )(key_pred, *model_args, **model_kwargs)
    loglik = log_likelihood(model, samples, *model_args, batch_ndims=2, parallel=True, **model_kwargs)
    dims, posterior = {}, {}
    for n in latent:
        dims[n], squeeze = _site_dims(n, trace[n])
        posterior[n] = np.squeeze(np.asarray(samples[n]), axis=tuple(2 + a for a in squeeze))
    for n in observed:
        dims[n], _ = _site_dims(n, trace[n])
    posterior.update({n: predictive[n] for n in deterministic})
    return to_datatree(
        posterior,
        posterior_predictive={n: predictive[n] for n in observed},
        observed_data={n: trace[n]["value"] for n in observed},
        log_likelihood=loglik,
        dims=dims,
        attrs=attrs,
    )


def from_guide(
    rng_key,
    model: Callable,
    guide: Callable,
    params: Mapping[str, Any],
    *model_args,
    num_samples: int = 1000,
    attrs: Mapping[str, Any] | None = None,
    **model_kwargs,
):
    """An SVI guide's posterior (draws from ``guide`` at ``params``) as an ArviZ DataTree.

    Works for any guide with NumPyro ``param`` sites: the library's plate-aware guides,
    NumPyro's autoguides, an amortized guide for given tasks. The draws form one chain.

    Args:
        rng_key: PRNG key.
        model: the NumPyro program the guide was fitted to.
        guide: the guide; called as ``guide(*model_args, **model_kwargs)``.
        params: the fitted parameters (e.g. ``svi.get_params(state)``).
        *model_args, **model_kwargs: the model's arguments, observations included.
        num_samples: number of posterior draws.
        attrs: global attributes of the tree.

    Returns:
        ``xarray.DataTree`` (see :func:`from_samples`).
    """
    import jax
    from numpyro.infer import Predictive

    key_guide, key_rest = jax.random.split(rng_key)
    draws = Predictive(guide, params=dict(params), num_samples=num_samples, parallel=True)(
        key_guide, *model_args, **model_kwargs
    )
    return from_samples(key_rest, model, draws, *model_args, attrs=attrs, **model_kwargs)


def from_mcmc(mcmc, *model_args, rng_key=None, attrs: Mapping[str, Any] | None = None, **model_kwargs):
    """A finished :class:`numpyro.infer.MCMC` run as an ArviZ DataTree, chains kept.

    Args:
        mcmc: the run (its kernel's ``model`` is used).
        *model_args, **model_kwargs: the model's arguments; the run's own when omitted.
        rng_key: PRNG key for the posterior predictive (a fixed key when omitted).
        attrs: global attributes of the tree.

    Returns:
        ``xarray.DataTree`` (see :func:`from_samples`); also a ``sample_stats`` group with
        ``diverging`` when the kernel recorded it.
    """
    import jax

    if not model_args and not model_kwargs:
        model_args, model_kwargs = mcmc._args, mcmc._kwargs
    model = mcmc.sampler.model
    rng_key = jax.random.key(0) if rng_key is None else rng_key
    samples = mcmc.get_samples(group_by_chain=True)
    tree = from_samples(rng_key, model, samples, *model_args, sample_ndims=2, attrs=attrs, **model_kwargs)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    if "diverging" in extra:
        import arviz as az

        tree["sample_stats"] = az.from_dict({"sample_stats": {"diverging": np.asarray(extra["diverging"])}})[
            "sample_stats"
        ]
    return tree


def save_posterior(tree, path: str | os.PathLike) -> Path:
    """Write an ArviZ/xarray DataTree to netCDF (HDF5 groups) atomically (the file every
    experiment saves), tagged with the root attribute ``metaprior_format`` that
    :func:`load_posterior` checks. ``tree`` itself is not modified."""
    from metaprior._io import atomic_path

    path = Path(path)
    tree = tree.copy()
    tree.attrs = {**tree.attrs, "metaprior_format": POSTERIOR_FORMAT}
    with atomic_path(path) as tmp:
        tree.to_netcdf(tmp, engine="h5netcdf")
    return path


def load_posterior(path: str | os.PathLike):
    """Read a posterior file written by :func:`save_posterior` (every experiment's
    ``posterior.nc``) into memory, as an ArviZ/xarray DataTree.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not netCDF / HDF5, is truncated, lacks our
            ``metaprior_format`` tag (an ArviZ file from elsewhere: open it with
            ``arviz.from_netcdf`` instead), or has no ``posterior`` group.
    """
    import xarray as xr

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"posterior file {path} does not exist")
    try:
        with xr.open_datatree(path, engine="h5netcdf") as opened:
            tree = opened.load()
    except Exception as err:  # OSError from h5py, ValueError from xarray ...
        raise ValueError(f"posterior file {path} is unreadable or not netCDF ({type(err).__name__}: {err})") from err
    tag = tree.attrs.get("metaprior_format")
    if tag != POSTERIOR_FORMAT:
        raise ValueError(
            f"posterior file {path} is not a metaprior posterior (metaprior_format={tag!r}, expected "
            f"{POSTERIOR_FORMAT!r}); an ArviZ file from elsewhere opens with arviz.from_netcdf"
        )
    if "posterior" not in tree.children:
        raise ValueError(f"posterior file {path} has no 'posterior' group (groups: {sorted(tree.children)})")
    return tree


def predictive_scores(
    rng_key,
    model: Callable,
    samples: Mapping[str, Any],
    train_args: tuple,
    test_args: tuple,
    *,
    level: float = 0.9,
    **model_kwargs,
) -> dict[str, float]:
    """Held-out predictive NLL and central-interval coverage of a posterior given as draws.

    The model is called on the held-out examples of the same tasks (``test_args``) with
    each draw of the latents substituted. Enumerated discrete latents the draws lack are
    first drawn given the training data (``train_args``), as in :func:`from_samples`.

    Args:
        rng_key: PRNG key.
        model: the NumPyro program (one observed site).
        samples: ``{site: [draws, ...]}`` latent draws.
        train_args: the model's positional arguments with the training observations.
        test_args: the same with held-out observations (same tasks, other examples).
        level: central predictive interval level for the coverage.
        **model_kwargs: the model's keyword arguments (both calls).

    Returns:
        ``{"nll": mean over held-out points of -log p(y* | data), "coverage": fraction
        of held-out points inside the central ``level`` interval of the posterior
        predictive}``; the predictive density is the Monte Carlo mixture
        ``mean_s p(y* | latents_s)``; masked slots are left out. For a discrete outcome
        (Bernoulli, Categorical, Poisson...) the coverage is NaN: a central interval of a
        few integers covers the observed value by construction (a Bernoulli's 90% interval
        is ``[0, 1]`` unless p is within 0.05 of 0 or 1), so it says nothing; the NLL is the
        score to read there.
    """
    import jax
    from jax.scipy.special import logsumexp
    from numpyro.infer import Predictive
    from numpyro.infer.util import log_likelihood

    key_trace, key_discrete, key_pred = jax.random.split(rng_key, 3)
    samples = {k: jax.numpy.asarray(v) for k, v in samples.items()}
    first = {k: v[0] for k, v in samples.items()}
    trace = _trace_model(key_trace, model, first, test_args, model_kwargs)
    observed = [n for n, s in trace.items() if s["type"] == "sample" and s["is_observed"]]
    if len(observed) != 1:
        raise ValueError(f"predictive_scores needs a model with one observed site, got {observed}")
    (obs,) = observed
    missing = [n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"] and n not in samples]
    discrete = [n for n in missing if _is_discrete_enumerated(trace[n])]
    if set(missing) - set(discrete):
        raise ValueError(f"samples lack the model's latent sites {sorted(set(missing) - set(discrete))}")
    if discrete:
        samples = {**samples, **_draw_discrete(key_discrete, model, samples, discrete, 1, train_args, model_kwargs)}
    y = np.asarray(trace[obs]["value"])
    mask = np.broadcast_to(np.asarray(getattr(trace[obs]["fn"], "_mask", True)), y.shape)
    loglik = np.asarray(log_likelihood(model, samples, *test_args, parallel=True, **model_kwargs)[obs], np.float64)
    log_pred = np.asarray(logsumexp(loglik, axis=0)) - np.log(loglik.shape[0])
    nll = float(-log_pred[mask].mean())
    if trace[obs]["fn"].support.is_discrete:
        return {"nll": nll, "coverage": float("nan")}
    y_rep = np.asarray(
        Predictive(_unobserve(model), samples, return_sites=[obs], parallel=True)(key_pred, *test_args, **model_kwargs)[
            obs
        ]
    )
    lo, hi = np.quantile(y_rep, [(1 - level) / 2, (1 + level) / 2], axis=0)
    inside = (y >= lo) & (y <= hi)
    return {"nll": nll, "coverage": float(inside[mask].mean())}
