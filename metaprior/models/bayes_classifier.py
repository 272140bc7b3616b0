"""A Bayesian few-shot classifier: per-task network weights with a Gaussian prior.

For task ``j`` with examples ``(x_jn, y_jn)``::

    w_j   ~ N(prior_loc, prior_scale^2)             in plate("tasks")
    y_jn  ~ Categorical(logits = f(x_jn; w_j, s))   in plate("tasks") x plate("examples")

The weights ``w_j`` are the arrays of the network's *weight layers*
(:class:`equinox.nn.Linear` and :class:`equinox.nn.Conv` modules, in tree order), a
tuple of layers per task. Everything else in the network (batch-norm scale and shift)
is a shared, deterministic parameter ``s`` taken from the ``net`` argument, as in MAML
where batch norm is excluded from fast adaptation (Finn et al. 2017). The prior is a
standard normal by default, or any per-array Gaussian (a learned prior).

Networks are evaluated batch-wise through a *layered forward*
``forward(net, x, apply_layer) -> logits`` in which every weight layer ``i`` is applied
as ``apply_layer(i, h)`` on the whole batch ``h: [N, ...]``. The model passes sampled
weights; inference code passes weight-noise estimators (Flipout) through the same
hook, without this module knowing about them. :func:`conv4_forward` and
:func:`mlp_forward` are the layered forwards of :class:`metaprior.models.nets.Conv4`
and :class:`metaprior.models.nets.MLP`; they compute exactly what the networks' own
``__call__`` computes (tested).

References:
    C. Finn, P. Abbeel, S. Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of
    Deep Networks." ICML 2017.
    Kim and Heo, "Amortized Inference of Bayesian Neural Network Parameters for Solving
    Meta-learning Problems" (per-task network weights with a Gaussian prior).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from metaprior.models.nets import MLP, Conv4

__all__ = [
    "LayeredForward",
    "is_weight_layer",
    "weight_layers",
    "shared_params",
    "weight_site_names",
    "standard_normal_prior",
    "conv4_forward",
    "mlp_forward",
    "layered_forward",
    "bayes_classifier",
]

PyTree = Any
ApplyLayer = Callable[[int, jax.Array], jax.Array]
LayeredForward = Callable[[PyTree, jax.Array, ApplyLayer], jax.Array]
"""``forward(net, x: [N, ...], apply_layer) -> logits: [N, classes]``."""


def is_weight_layer(node: Any) -> bool:
    """Whether a pytree node is a weight layer (a dense or convolution Equinox layer)."""
    return isinstance(node, (eqx.nn.Linear, eqx.nn.Conv))


def weight_layers(net: PyTree) -> tuple:
    """The weight layers of ``net`` in tree order (Conv4: the 4 convs, then the head)."""
    nodes = jax.tree.leaves(net, is_leaf=is_weight_layer)
    return tuple(node for node in nodes if is_weight_layer(node))


def shared_params(net: PyTree) -> PyTree:
    """``net`` with the weight layers' arrays replaced by ``None``: the shared, deterministic
    parameters (batch-norm scale and shift) that the layered forwards still read."""
    spec = jax.tree.map(lambda _: True, net)
    spec = eqx.tree_at(
        weight_layers, spec, replace=tuple(jax.tree.map(lambda _: False, layer) for layer in weight_layers(spec))
    )
    return eqx.filter(net, spec)


def weight_site_names(layers: tuple) -> tuple[tuple[str, ...], ...]:
    """NumPyro site names of each layer's arrays, e.g. ``("layer0.weight", "layer0.bias")``."""
    names = []
    for i, layer in enumerate(layers):
        paths = jax.tree_util.tree_flatten_with_path(layer)[0]
        names.append(tuple(f"layer{i}{jax.tree_util.keystr(path)}" for path, _ in paths))
    return tuple(names)


def standard_normal_prior(layers: tuple, scale: float = 1.0) -> tuple[tuple, tuple]:
    """``(loc, scale)`` pytrees of an isotropic ``N(0, scale^2)`` prior over ``layers``."""
    loc = jax.tree.map(jnp.zeros_like, layers)
    return loc, jax.tree.map(lambda a: jnp.full_like(a, scale), layers)


def _max_pool(h: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def conv4_forward(net: Conv4, x: jax.Array, apply_layer: ApplyLayer) -> jax.Array:
    """Layered forward of :class:`~metaprior.models.nets.Conv4` (same computation as its
    ``__call__``): ``x: [N, H, W, C] -> logits [N, out]``; layer ``i < num_blocks`` is
    block ``i``'s convolution on ``[N, C, H, W]``, layer ``num_blocks`` the head."""
    if x.ndim != 4:
        raise ValueError(f"conv4_forward expects images [N, H, W, C], got shape {x.shape}")
    h = jnp.transpose(x, (0, 3, 1, 2))
    for i, norm in enumerate(net.norms):
        h = _max_pool(jax.nn.relu(norm(apply_layer(i, h))))
    return apply_layer(len(net.norms), h.reshape(h.shape[0], -1))


def mlp_forward(net: MLP, x: jax.Array, apply_layer: ApplyLayer) -> jax.Array:
    """Layered forward of :class:`~metaprior.models.nets.MLP`: ``x: [N, in] -> [N, out]``."""
    num_layers = len(net.layers)
    for i in range(num_layers - 1):
        x = net.activation(apply_layer(i, x))
    return apply_layer(num_layers - 1, x)


def layered_forward(net: PyTree) -> LayeredForward:
    """The layered forward for one of the shared networks (Conv4, MLP).

    Raises:
        TypeError: another network type; pass its layered forward explicitly.
    """
    if isinstance(net, Conv4):
        return conv4_forward
    if isinstance(net, MLP):
        return mlp_forward
    raise TypeError(f"no layered forward known for {type(net).__name__}; pass forward=")


def bayes_classifier(
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    net: PyTree,
    forward: LayeredForward | None = None,
    prior: tuple[PyTree, PyTree] | None = None,
) -> jax.Array:
    """Bayesian classifier with per-task weights (a NumPyro model).

    Sites: ``"layer{i}.{array}"`` per weight-layer array (batch shape ``[tasks, 1]``, event
    shape the array's; the task plate is ``dim=-2``), ``"logits"`` (deterministic,
    ``[tasks, examples, classes]``) and ``"y"`` (batch shape ``[tasks, examples]``).

    Args:
        x: ``[tasks, examples, ...]`` inputs (images ``[tasks, examples, H, W, C]`` for Conv4).
        y: ``[tasks, examples]`` int labels, or ``None`` to sample them (prior/posterior
            predictive).
        net: the network. Its weight layers give the shapes (their values are unused);
            its other arrays (batch-norm scale and shift) are used as given.
        forward: the layered forward of ``net`` (default :func:`layered_forward`).
        prior: ``(loc, scale)``, pytrees with the structure of ``weight_layers(net)``;
            default standard normal.

    Returns:
        ``[tasks, examples]`` the labels (observed or sampled).
    """
    forward = layered_forward(net) if forward is None else forward
    template = weight_layers(net)
    prior_loc, prior_scale = standard_normal_prior(template) if prior is None else prior
    names = weight_site_names(template)
    num_tasks, num_examples = x.shape[:2]
    tasks = numpyro.plate("tasks", num_tasks, dim=-2)
    layers = []
    with tasks:
        for layer_names, loc, scale in zip(names, prior_loc, prior_scale):
            loc_leaves, treedef = jax.tree.flatten(loc)
            values = [
                numpyro.sample(name, dist.Normal(m, s).to_event(m.ndim))[:, 0]
                for name, m, s in zip(layer_names, loc_leaves, jax.tree.leaves(scale))
            ]
            layers.append(jax.tree.unflatten(treedef, values))

    def task_logits(task_layers, task_x):
        return forward(net, task_x, lambda i, h: jax.vmap(task_layers[i])(h))

    logits = numpyro.deterministic("logits", jax.vmap(task_logits)(tuple(layers), x))
    with tasks, numpyro.plate("examples", num_examples, dim=-1):
        return numpyro.sample("y", dist.Categorical(logits=logits), obs=y)
