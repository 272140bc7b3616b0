"""Which leaves of an Equinox network a Laplace posterior covers, and how K-FAC sees them.

K-FAC needs, for every dense or conv layer, the second moments of the layer's input
(with a homogeneous coordinate for the bias) and of the gradient at its output. Those
are captured without touching the network's code: every selected ``eqx.nn.Linear`` /
``eqx.nn.Conv2d`` is wrapped in a :class:`_Tapped` module whose input and output pass
through identity functions with a custom VJP. The VJP of the identity returns, as the
"gradient" of a zero probe array, the outer product of the value (input side) or of
its cotangent (output side). Summed by JAX over every call of the layer (vmapped
calls included), ``jax.grad`` with respect to the probes yields exactly

    A = sum_{n, t} a~_{n,t} a~_{n,t}^T      G = sum_{n, t} g_{n,t} g_{n,t}^T

over examples n and spatial locations t. The taps are ordinary JAX code, so the factors
are differentiable (reverse over reverse): LLAMA's meta-gradient flows through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

LAYER_TYPES = (eqx.nn.Linear, eqx.nn.Conv2d)


def is_layer(node: Any) -> bool:
    """Whether ``node`` is a layer K-FAC has a Kronecker structure for."""
    return isinstance(node, LAYER_TYPES)


def laplace_filter(net: PyTree) -> PyTree:
    """The default filter: weights and biases of every ``Linear`` / ``Conv2d`` layer.

    Everything else (batch-norm scale and shift, LayerNorm parameters, embeddings) is
    excluded from the posterior and stays at its point estimate, as in LLAMA (Grant et
    al. 2018, section 5.2).

    Returns:
        A pytree of bools with the structure of ``net`` (for ``eqx.partition``).
    """

    def mark(node):
        if is_layer(node):
            return jax.tree.map(eqx.is_array, node)
        return jax.tree.map(lambda _: False, node)

    return jax.tree.map(mark, net, is_leaf=is_layer)


def resolve_filter(net: PyTree, filter_spec: PyTree | Callable | None) -> PyTree:
    """``None`` -> :func:`laplace_filter`; a callable or bool pytree is used as given."""
    return laplace_filter(net) if filter_spec is None else filter_spec


def layers_of(tree: PyTree) -> list:
    """The ``Linear`` / ``Conv2d`` nodes of ``tree`` in flattening order."""
    return [n for n in jax.tree.leaves(tree, is_leaf=is_layer) if is_layer(n)]


class BlockSpec(NamedTuple):
    """How one layer maps to a K-FAC block (static).

    Attributes:
        layer_index: position among :func:`layers_of` the network.
        kind: ``"linear"`` or ``"conv"``.
        has_bias: whether the bias is in the posterior (adds the homogeneous coordinate).
        out_size: output features / channels.
        in_size: input features, or ``in_channels * prod(kernel_size)`` for a conv.
        conv: ``(kernel_size, stride, padding, dilation)`` for a conv, else ``None``.
    """

    layer_index: int
    kind: str
    has_bias: bool
    out_size: int
    in_size: int
    conv: tuple | None


def block_specs(net: PyTree, params: PyTree) -> tuple[BlockSpec, ...]:
    """One :class:`BlockSpec` per layer whose weight is in ``params``.

    Args:
        net: the whole network.
        params: ``eqx.filter(net, filter_spec)`` (unselected leaves are ``None``).

    Raises:
        ValueError: a selected leaf lies outside every Linear/Conv2d layer, a bias is
            selected without its weight, or a layer has no Kronecker form here (grouped
            conv, non-zero padding mode).
    """
    net_layers, par_layers = layers_of(net), layers_of(params)
    covered = sum((l.weight is not None) + (getattr(l, "bias", None) is not None) for l in par_layers)
    total = len(jax.tree.leaves(params))
    if covered != total:
        raise ValueError(
            f"structure='kfac' covers only eqx.nn.Linear / eqx.nn.Conv2d weights and biases, "
            f"but the filter selects {total - covered} other array leaves (batch-norm scale/shift?); "
            "exclude them with filter_spec or use structure='diag' / 'full'"
        )
    specs = []
    for i, (layer, sel) in enumerate(zip(net_layers, par_layers)):
        has_w, has_b = sel.weight is not None, getattr(sel, "bias", None) is not None
        if not has_w:
            if has_b:
                raise ValueError(f"layer {i}: the filter selects the bias without the weight (unsupported by kfac)")
            continue
        out_size = layer.weight.shape[0]
        if isinstance(layer, eqx.nn.Linear):  # "scalar" in/out features have weights [out, 1] / [1, in]
            specs.append(BlockSpec(i, "linear", has_b, out_size, layer.weight.shape[1], None))
        else:
            if layer.groups != 1:
                raise ValueError(f"layer {i}: grouped convolutions (groups={layer.groups}) are not supported by kfac")
            if str(layer.padding_mode).upper() != "ZEROS":
                raise ValueError(f"layer {i}: padding_mode={layer.padding_mode!r}; kfac supports 'ZEROS'")
            conv = (
                tuple(layer.kernel_size),
                tuple(layer.stride),
                tuple(map(tuple, layer.padding)),
                tuple(layer.dilation),
            )
            in_size = layer.weight.shape[1] * math.prod(layer.kernel_size)
            specs.append(BlockSpec(i, "conv", has_b, out_size, in_size, conv))
    return tuple(specs)


# ----------------------------------------------------------------------------- taps


def _homogeneous_patches(conv: tuple | None, x: jax.Array) -> jax.Array:
    """Layer input as columns ``[in_size + 1, locations]`` with a row of ones appended."""
    if conv is None:
        cols = x.reshape(-1, 1)
    else:
        kernel, stride, padding, dilation = conv
        p = jax.lax.conv_general_dilated_patches(x[None], kernel, stride, padding, rhs_dilation=dilation)[0]
        cols = p.reshape(p.shape[0], -1)
    return jnp.concatenate([cols, jnp.ones((1, cols.shape[1]), cols.dtype)], axis=0)


def _patch_moment_nhwc(conv: tuple, x: jax.Array) -> jax.Array:
    """``A = sum a~ a~^T`` over every location of a batch ``x [N, H, W, C]``: the columns
    ``a~`` in the ``(C, kh, kw)`` order of :func:`_homogeneous_patches` (the weights'
    ``[O, C, kh, kw]`` order), a one appended. Stride and dilation 1 (what
    :meth:`metaprior.models.nets.Im2colConv2d.nhwc` computes). The columns are built
    tap-major, as the layer builds them (one concatenation), and ``A`` is reordered."""
    kernel, _, padding, _ = conv
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = kernel
    channels, taps = x.shape[-1], kh * kw
    height, width = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    cols = jnp.concatenate(
        [xp[:, a : a + height, b : b + width] for a in range(kh) for b in range(kw)]
        + [jnp.ones(x.shape[:1] + (height, width, 1), x.dtype)],
        axis=-1,
    ).reshape(-1, taps * channels + 1)  # tap-major: column t * C + c
    moment = cols.T @ cols
    order = [t * channels + c for c in range(channels) for t in range(taps)] + [taps * channels]
    order = np.asarray(order)
    return moment[order][:, order]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tap_input(conv, channels_last, x, probe):
    del conv, channels_last, probe
    return x


def _tap_input_fwd(conv, channels_last, x, probe):
    del conv, channels_last, probe
    return x, x


def _tap_input_bwd(conv, channels_last, x, ct):
    """The input's second moment: a batch ``[N, H, W, C]`` at once (channels-last), or one
    example (``[C, H, W]`` or ``[D]``; JAX sums the per-example calls)."""
    if channels_last:
        return ct, _patch_moment_nhwc(conv, x)
    cols = _homogeneous_patches(conv, x)
    return ct, cols @ cols.T


_tap_input.defvjp(_tap_input_fwd, _tap_input_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap_output(channels_last, y, probe):
    del channels_last, probe
    return y


def _tap_output_fwd(channels_last, y, probe):
    del channels_last, probe
    return y, None


def _tap_output_bwd(channels_last, _, ct):
    """The output cotangent's second moment over locations (and the batch, channels-last)."""
    if channels_last:
        g = ct.reshape(-1, ct.shape[-1])
        return ct, g.T @ g
    g = ct.reshape(1, 1) if ct.ndim == 0 else ct.reshape(ct.shape[0], -1)  # a "scalar" Linear's output is ()
    return ct, g @ g.T


_tap_output.defvjp(_tap_output_fwd, _tap_output_bwd)


class _Tapped(eqx.Module):
    """A layer whose input and output second moments flow into ``probe_a`` / ``probe_g``."""

    layer: eqx.Module
    probe_a: jax.Array
    probe_g: jax.Array
    conv: tuple | None = eqx.field(static=True)

    def __call__(self, x, *, key=None):
        x = _tap_input(self.conv, False, x, self.probe_a)
        y = self.layer(x, key=key)
        return _tap_output(False, y, self.probe_g)

    def nhwc(self, x):
        """The batched channels-last call of a wrapped ``Im2colConv2d`` (``x [N, H, W, C]``),
        tapped on the whole batch at once: the same ``A`` and ``G`` as the per-example
        channels-first call, without leaving the channels-last path."""
        _, stride, _, dilation = self.conv
        if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or self.layer.groups != 1:
            y = jax.vmap(self)(jnp.transpose(x, (0, 3, 1, 2)))  # per example, channels-first
            return jnp.transpose(y, (0, 2, 3, 1))
        x = _tap_input(self.conv, True, x, self.probe_a)
        return _tap_output(True, self.layer.nhwc(x), self.probe_g)


def zero_probes(specs: tuple[BlockSpec, ...], dtype=jnp.float32) -> tuple:
    """``((A-probe [in+1, in+1], G-probe [out, out]) per block)``, all zeros."""
    return tuple(
        (jnp.zeros((s.in_size + 1, s.in_size + 1), dtype), jnp.zeros((s.out_size, s.out_size), dtype)) for s in specs
    )


def tap_network(net: PyTree, specs: tuple[BlockSpec, ...], probes: tuple) -> PyTree:
    """``net`` with every layer named in ``specs`` wrapped in a :class:`_Tapped`."""
    by_index = {s.layer_index: (s, p) for s, p in zip(specs, probes)}
    counter = iter(range(10**9))

    def wrap(node):
        if not is_layer(node):
            return node
        i = next(counter)
        if i not in by_index:
            return node
        spec, (pa, pg) = by_index[i]
        return _Tapped(node, pa, pg, spec.conv)

    return jax.tree.map(wrap, net, is_leaf=is_layer)


# ------------------------------------------------------ parameters <-> block matrices


def layer_matrices(params: PyTree, specs: tuple[BlockSpec, ...]) -> list[jax.Array]:
    """Each block's parameters as one matrix ``[out, in_size (+1 for the bias)]``."""
    layers = layers_of(params)
    mats = []
    for s in specs:
        layer = layers[s.layer_index]
        w = layer.weight.reshape(s.out_size, s.in_size)
        if s.has_bias:
            w = jnp.concatenate([w, layer.bias.reshape(s.out_size, 1)], axis=1)
        mats.append(w)
    return mats


def matrices_to_params(mats: list[jax.Array], params: PyTree, specs: tuple[BlockSpec, ...]) -> PyTree:
    """Inverse of :func:`layer_matrices`: a pytree like ``params`` holding ``mats``."""
    by_index = {s.layer_index: (s, m) for s, m in zip(specs, mats)}
    counter = iter(range(10**9))

    def put(node):
        if not is_layer(node):
            return node
        i = next(counter)
        spec, m = by_index[i]
        w = m[:, : spec.in_size].reshape(node.weight.shape)
        node = eqx.tree_at(lambda l: l.weight, node, w)
        if spec.has_bias:
            node = eqx.tree_at(lambda l: l.bias, node, m[:, -1].reshape(node.bias.shape))
        return node

    return jax.tree.map(put, params, is_leaf=is_layer)


def flat_indices(params: PyTree, specs: tuple[BlockSpec, ...]) -> list[jax.Array]:
    """For each block, the positions in ``ravel_pytree(params)`` of ``vec(W~)``.

    ``vec`` stacks columns (the Kronecker convention ``(A kron G) vec(X) = vec(G X A)``).
    """
    leaves = jax.tree.leaves(params)
    offsets, start = [], 0
    for leaf in leaves:
        offsets.append(start)
        start += leaf.size
    index_tree = jax.tree.unflatten(jax.tree.structure(params), list(range(len(leaves))))
    layers = layers_of(index_tree)
    out = []
    for s in specs:
        layer = layers[s.layer_index]
        w_off = offsets[layer.weight]
        rows = jnp.arange(s.out_size)[:, None]
        idx = w_off + rows * s.in_size + jnp.arange(s.in_size)[None, :]
        if s.has_bias:
            idx = jnp.concatenate([idx, offsets[layer.bias] + rows], axis=1)
        out.append(idx.T.reshape(-1))  # column-major vec
    return out
