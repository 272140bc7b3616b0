"""Task-level Laplace posteriors of any NumPyro model with a ``plate("tasks")``.

Where :func:`~metaprior.inference.laplace.laplace` works on an Equinox network's weights,
:func:`task_laplace` works on a model's own latent sites: at a mode of the joint density
(the shared sites held at their values there), every task's local latents get the
Gaussian ``N(mode_j, P_j^{-1})`` with ``P_j`` the Hessian of ``-log p(data, latents)`` in
that task's latents. Tasks are conditionally independent given the shared sites, so the
Hessian is block-diagonal over tasks, and all ``T`` blocks of size ``d`` come from ``d``
Hessian-vector products (each probe puts a one at the same coordinate of every task);
no ``[T d, T d]`` matrix is formed.

``structure="full"`` keeps each block; ``"diag"`` keeps its diagonal (the precision's
diagonal, as :class:`~metaprior.inference.laplace.DiagCurvature` does). A Hessian is only
a valid precision at a minimum: a block that is not positive definite is an error naming
the tasks, never a NaN draw.

References:
    MacKay (1992), "A practical Bayesian framework for backpropagation networks";
    Grant et al. (2018), section 4 (a Laplace posterior per task around a shared mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.util import log_density

__all__ = ["TaskLaplace", "task_laplace", "sample_task_laplace"]


class TaskLaplace(NamedTuple):
    """Per-task Gaussians over the local latents.

    Attributes:
        mean: ``[T, d]`` each task's local latents at the mode, flattened.
        precision: ``[T, d, d]`` (``full``) or ``[T, d]`` (``diag``).
        structure: ``"full"`` or ``"diag"``.
        sites: the local sites, in flattening order.
        shapes: each site's value shape at the mode (the task axis included).
        task_axes: each site's task axis in its value.
        fixed: the other latent sites' values at the mode (held there).
    """

    mean: jax.Array
    precision: jax.Array
    structure: str
    sites: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    task_axes: tuple[int, ...]
    fixed: dict[str, jax.Array]


def _layout(model, args, kwargs, mode, local_sites, plate):
    tr = handlers.trace(handlers.substitute(handlers.seed(model, jax.random.key(0)), data=mode)).get_trace(
        *args, **kwargs
    )
    axes, shapes = [], []
    for name in local_sites:
        if name not in tr or tr[name]["type"] != "sample" or tr[name]["is_observed"]:
            raise ValueError(f"task_laplace: {name!r} is not a latent sample site of the model")
        site = tr[name]
        support = site["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is not constraints.real:
            raise ValueError(
                f"task_laplace: site {name!r} has support {site['fn'].support}; the Laplace approximation here "
                "is over real-valued latents (reparameterise the site, e.g. with a TransformedDistribution)"
            )
        frames = [f for f in site["cond_indep_stack"] if f.name == plate]
        if not frames:
            raise ValueError(f"task_laplace: site {name!r} is not inside plate {plate!r}")
        axes.append(len(site["fn"].batch_shape) + frames[0].dim)
        shapes.append(tuple(np.shape(mode[name])))
    return tuple(axes), tuple(shapes)


def task_laplace(
    model: Callable,
    *args: Any,
    mode: dict[str, jax.Array],
    local_sites: Sequence[str],
    structure: str = "full",
    plate: str = "tasks",
    **kwargs: Any,
) -> TaskLaplace:
    """The per-task Laplace posterior of ``model(*args, **kwargs)`` at ``mode``.

    Args:
        model: a NumPyro program with a ``plate(plate)`` over tasks.
        *args, **kwargs: its arguments (the observed tasks).
        mode: ``{site: value}`` of every latent site at the mode (e.g. ``AutoDelta``'s
            median after SVI); the sites not in ``local_sites`` are held there.
        local_sites: the real-valued latent sites inside the tasks plate.
        structure: ``"full"`` (a ``d x d`` precision per task) or ``"diag"``.
        plate: the tasks plate's name.

    Returns:
        :class:`TaskLaplace`.

    Raises:
        ValueError: an unknown structure, a site that is not a real latent of the plate,
            or a task whose precision is not positive definite (the mode is not a minimum).
    """
    if structure not in ("full", "diag"):
        raise ValueError(
            f"structure must be 'full' or 'diag' for a model's own latents, got {structure!r} "
            "('kfac' needs a network's layers: use metaprior.inference.laplace.laplace)"
        )
    local_sites = tuple(local_sites)
    if not local_sites:
        raise ValueError("task_laplace: local_sites is empty")
    mode = {k: jnp.asarray(v) for k, v in mode.items()}
    axes, shapes = _layout(model, args, kwargs, mode, local_sites, plate)
    num_tasks = shapes[0][axes[0]]
    fixed = {k: v for k, v in mode.items() if k not in local_sites}
    flat = _flatten(mode, local_sites, axes)  # [T, d]
    d = flat.shape[1]

    def log_joint(u):
        values = {**fixed, **_unflatten(u, local_sites, shapes, axes)}
        return log_density(model, args, kwargs, values)[0]

    grad = jax.grad(log_joint)
    probes = jnp.broadcast_to(jnp.eye(d, dtype=flat.dtype)[:, None, :], (d, num_tasks, d))
    columns = jax.vmap(lambda e: jax.jvp(grad, (flat,), (e,))[1])(probes)  # [d(k), T, d(i)] = H_t[i, k]
    blocks = -jnp.transpose(columns, (1, 2, 0))
    blocks = 0.5 * (blocks + jnp.swapaxes(blocks, 1, 2))
    lowest = np.asarray(jnp.linalg.eigvalsh(blocks)[:, 0])
    bad = np.flatnonzero(~(lowest > 0))
    if bad.size:
        raise ValueError(
            f"task_laplace: the precision (Hessian of -log p) of task(s) {bad[:5].tolist()} is not positive "
            f"definite (lowest eigenvalue {float(lowest[bad[0]]):.3g}): the mode is not a minimum there. "
            "Run the MAP longer, or check that the model has a mode"
        )
    precision = blocks if structure == "full" else jnp.diagonal(blocks, axis1=1, axis2=2)
    return TaskLaplace(flat, precision, structure, local_sites, shapes, axes, fixed)


def sample_task_laplace(rng_key: jax.Array, posterior: TaskLaplace, num_samples: int) -> dict[str, jax.Array]:
    """``{site: [num_samples, *shape]}`` draws: the local sites from their Gaussians, the
    other latent sites at the mode (broadcast)."""
    eps = jax.random.normal(rng_key, (num_samples, *posterior.mean.shape), posterior.mean.dtype)
    if posterior.structure == "full":
        chol = jnp.linalg.cholesky(posterior.precision)  # P = L L^T: draw L^{-T} eps
        delta = jax.vmap(
            lambda e: jax.vmap(lambda c, v: jax.scipy.linalg.solve_triangular(c, v, trans="T", lower=True))(chol, e)
        )(eps)
    else:
        delta = eps / jnp.sqrt(posterior.precision)
    draws = jax.vmap(lambda u: _unflatten(u, posterior.sites, posterior.shapes, posterior.task_axes))(
        posterior.mean + delta
    )
    fixed = {k: jnp.broadcast_to(v, (num_samples, *v.shape)) for k, v in posterior.fixed.items()}
    return {**fixed, **draws}


def _flatten(values, sites, axes) -> jax.Array:
    return jnp.concatenate(
        [jnp.moveaxis(values[s], a, 0).reshape(values[s].shape[a], -1) for s, a in zip(sites, axes)], axis=1
    )


def _unflatten(u, sites, shapes, axes) -> dict[str, jax.Array]:
    out, start = {}, 0
    for s, shape, a in zip(sites, shapes, axes):
        moved = (shape[a],) + shape[:a] + shape[a + 1 :]
        size = math.prod(moved[1:])
        out[s] = jnp.moveaxis(u[:, start : start + size].reshape(moved), 0, a)
        start += size
    return out
