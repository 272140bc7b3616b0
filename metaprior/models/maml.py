"""The hierarchical model behind MAML and LLAMA (Grant et al. 2018, Figure 1).

    theta                                 shared, point-estimated (a ``param`` site)
    phi_j ~ N(theta, tau^{-1} I)          per task, in plate("tasks")
    y_ij^support ~ p(y | f(x_ij; phi_j))  in plate("examples")
    y_ij^query   ~ p(y | f(x_ij; phi_j))  in plate("examples")

``f`` is any Equinox network; ``p(y | f)`` any NumPyro distribution built from the
network's outputs (``likelihood(f)``). Only the leaves selected by ``filter_spec`` are
task-specific (default: Linear/Conv2d weights and biases); the rest (batch-norm scale
and shift) are shared and live in ``theta`` alone.

The inference that makes this model useful for meta-learning (MAML's inner loop as a
point estimate of ``phi_j``, the Laplace correction of LLAMA) is in
:mod:`metaprior.inference.maml`; the program here gives prior, posterior and
predictive by the usual NumPyro handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

__all__ = ["maml_model", "phi_site_names", "task_networks", "task_specific_filter", "THETA_SITE"]

THETA_SITE = "theta"
PyTree = Any


def task_specific_filter(net: PyTree) -> PyTree:
    """Default task-specific leaves: weights and biases of ``eqx.nn.Linear`` /
    ``eqx.nn.Conv2d`` layers (batch-norm scale/shift stay shared). The same choice as
    :func:`metaprior.inference.laplace.laplace_filter`, which adapts and covers them."""
    is_layer = lambda n: isinstance(n, (eqx.nn.Linear, eqx.nn.Conv2d))

    def mark(node):
        if is_layer(node):
            return jax.tree.map(eqx.is_array, node)
        return jax.tree.map(lambda _: False, node)

    return jax.tree.map(mark, net, is_leaf=is_layer)


def _selected(net: PyTree, filter_spec) -> tuple[PyTree, PyTree]:
    return eqx.partition(net, task_specific_filter(net) if filter_spec is None else filter_spec)


def phi_site_names(net: PyTree, filter_spec: PyTree | Callable | None = None) -> list[str]:
    """The names of the ``phi`` sample sites, one per task-specific leaf of ``net``.

    ``"phi" + keystr(path)``, e.g. ``"phi.layers[0].weight"`` for an MLP.
    """
    params, _ = _selected(net, filter_spec)
    return ["phi" + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def task_networks(net: PyTree, phi: dict[str, jax.Array], filter_spec=None) -> PyTree:
    """The per-task networks: ``net`` with its task-specific leaves replaced by ``phi``.

    Args:
        net: ``theta`` (its structure and shared leaves are used).
        phi: ``{site name: [tasks, 1, *leaf shape]}`` as the model's sites return them
            (or ``[tasks, *leaf shape]``).

    Returns:
        A network whose task-specific leaves have a leading ``[tasks]`` axis (map it with
        ``eqx.filter_vmap`` or ``jax.vmap`` over ``in_axes`` built from ``filter_spec``).
    """
    params, rest = _selected(net, filter_spec)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, leaf in paths_leaves:
        value = phi["phi" + jax.tree_util.keystr(path)]
        if value.ndim == leaf.ndim + 2:
            value = value[:, 0]
        leaves.append(value)
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), rest)


def _apply_tasks(net: PyTree, phi_params: PyTree, rest: PyTree, apply_fn: Callable, x: jax.Array) -> jax.Array:
    """``x [T, N, ...] -> f [T, N, C]`` with per-task parameters ``phi_params`` (leading T)."""
    return jax.vmap(lambda p, xt: apply_fn(eqx.combine(p, rest), xt))(phi_params, x)


def maml_model(
    support_x: jax.Array,
    support_y: jax.Array | None = None,
    query_x: jax.Array | None = None,
    query_y: jax.Array | None = None,
    *,
    net: PyTree,
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    likelihood: Callable[[jax.Array], dist.Distribution],
    prior_precision: float = 1e-3,
    filter_spec: PyTree | Callable | None = None,
) -> None:
    """The MAML / LLAMA hierarchical model as a NumPyro program.

    Sites:
        ``theta$params`` (param): the shared network ``theta`` (all its arrays).
        ``phi<path>`` (sample, in ``plate("tasks")``): ``[tasks, 1, *leaf]`` for every
            task-specific leaf, prior ``N(theta_leaf, tau^{-1})`` per element
            (event dims = the leaf's dims).
        ``y_support`` (sample, ``plate("tasks")`` x ``plate("examples")``):
            ``[tasks, support]`` (+ the likelihood's event shape).
        ``y_query`` (likewise, when ``query_x`` is given): ``[tasks, query]``.

    Args:
        support_x: ``[tasks, support, ...]`` inputs as ``apply_fn`` takes them per task.
        support_y: ``[tasks, support, ...]`` or ``None`` (sampled: prior predictive).
        query_x: ``[tasks, query, ...]`` or ``None`` (no query site).
        query_y: ``[tasks, query, ...]`` or ``None``.
        net: the network; its arrays initialise ``theta``.
        apply_fn: ``(net, x [N, ...]) -> f [N, C]`` for one task.
        likelihood: ``f [..., N, C] -> Distribution`` with batch shape ``[..., N]``.
        prior_precision: ``tau``.
        filter_spec: task-specific leaves (default: Linear/Conv2d weights and biases).

    References:
        Grant et al. (2018), section 3, Figure 1 and eq. (1)-(2).
    """
    if support_x.ndim < 2:
        raise ValueError(f"support_x must be [tasks, support, ...], got shape {support_x.shape}")
    if query_y is not None and query_x is None:
        raise ValueError("query_y is given without query_x")
    num_tasks = support_x.shape[0]
    theta = eqx_module(THETA_SITE, net)
    params, rest = _selected(theta, filter_spec)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    scale = 1.0 / jnp.sqrt(prior_precision)
    with numpyro.plate("tasks", num_tasks, dim=-2):
        phi = [
            numpyro.sample(
                "phi" + jax.tree_util.keystr(path),
                dist.Normal(leaf, scale).to_event(leaf.ndim),
            )[:, 0]
            for path, leaf in paths_leaves
        ]
        phi = jax.tree_util.tree_unflatten(treedef, phi)
        f_support = _apply_tasks(theta, phi, rest, apply_fn, support_x)
        with numpyro.plate("examples", support_x.shape[1], dim=-1):
            numpyro.sample("y_support", likelihood(f_support), obs=support_y)
        if query_x is not None:
            f_query = _apply_tasks(theta, phi, rest, apply_fn, query_x)
            with numpyro.plate("examples", query_x.shape[1], dim=-1):
                numpyro.sample("y_query", likelihood(f_query), obs=query_y)
