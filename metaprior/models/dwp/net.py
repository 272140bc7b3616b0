"""The deep weight prior's convolutional network and its conv ops (channels-first kernels)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["ConvNet", "conv2d", "conv2d_im2col", "max_pool2", "without_kernels"]


def conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'VALID' 2-D convolution, stride 1, no bias.

    Args:
        x: ``[N, C_in, H, W]``.
        kernel: ``[C_out, C_in, k, k]``.

    Returns:
        ``[N, C_out, H - k + 1, W - k + 1]``.
    """
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def conv2d_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The same convolution as :func:`conv2d`, as one matrix product over image patches.

    ``x [N, C_in, H, W]`` is unfolded into ``[N, H', W', k * k * C_in]`` patches by
    ``k * k`` shifted slices, then multiplied by the kernel matrix. Under ``jax.vmap``
    over kernels (several networks trained at once) this stays a batched matrix
    product, where XLA on CPU turns :func:`conv2d` into a grouped convolution several
    times slower; it is also faster inside ``lax.scan``. Same arguments and result as
    :func:`conv2d` (tested).
    """
    _, c, h, w = x.shape
    out, c_in, k, k2 = kernel.shape
    if c_in != c or k != k2:
        raise ValueError(f"conv2d_im2col: input has {c} channels, kernel is {kernel.shape}")
    ho, wo = h - k + 1, w - k + 1
    xt = jnp.transpose(x, (0, 2, 3, 1))
    cols = jnp.concatenate([xt[:, a : a + ho, b : b + wo, :] for a in range(k) for b in range(k)], axis=-1)
    mat = jnp.transpose(kernel, (2, 3, 1, 0)).reshape(k * k * c, out)
    return jnp.transpose(cols @ mat, (0, 3, 1, 2))


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, 'VALID' (floor): ``[N, C, H, W] -> [N, C, H//2, W//2]``."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def _xavier_normal(rng_key: jax.Array, shape: tuple[int, ...], fan_in: int, fan_out: int) -> jax.Array:
    return jax.random.normal(rng_key, shape) * math.sqrt(2.0 / (fan_in + fan_out))


class ConvNet(eqx.Module):
    """The MNIST network of the deep-weight-prior paper (its "FConvMNIST").

    ``conv(k1, filters[0])`` -> leaky ReLU -> 2x2 max-pool -> ``conv(k2, filters[1])`` ->
    leaky ReLU -> 2x2 max-pool -> flatten -> linear. Convolutions are 'VALID' with
    stride 1 (28 -> 22 -> 11 -> 7 -> 3 for the paper's 7x7 and 5x5 kernels). Weights
    are initialised Xavier-normal (Glorot & Bengio 2010), as in the paper's code;
    biases as Equinox initialises them.

    Call: ``x: [N, H, W, C] -> logits [N, num_classes]``.

    Attributes:
        convs: the conv layers (kernels ``[out, in, k, k]``, biases ``[out, 1, 1]``).
        head: the dense layer.
        negative_slope: the leaky ReLU's slope (PyTorch's default 0.01).
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    head: eqx.nn.Linear
    negative_slope: float = eqx.field(static=True, default=0.01)

    def __init__(
        self,
        *,
        filters: Sequence[int] = (32, 128),
        kernel_sizes: Sequence[int] = (7, 5),
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        key: jax.Array,
        negative_slope: float = 0.01,
    ):
        if len(filters) != len(kernel_sizes) or not filters:
            raise ValueError(
                f"filters {tuple(filters)} and kernel_sizes {tuple(kernel_sizes)} must have the same, non-zero length"
            )
        keys = jax.random.split(key, 2 * len(filters) + 2)
        chans = (in_channels, *filters)
        convs, side = [], image_size
        for i, (c_in, c_out, k) in enumerate(zip(chans[:-1], chans[1:], kernel_sizes)):
            conv = eqx.nn.Conv2d(c_in, c_out, kernel_size=k, key=keys[2 * i])
            weight = _xavier_normal(keys[2 * i + 1], conv.weight.shape, c_in * k * k, c_out * k * k)
            convs.append(eqx.tree_at(lambda c: c.weight, conv, weight))
            side = (side - k + 1) // 2
            if side < 1:
                raise ValueError(f"image_size={image_size} is too small for kernel sizes {tuple(kernel_sizes)}")
        features = chans[-1] * side * side
        head = eqx.nn.Linear(features, num_classes, key=keys[-2])
        head = eqx.tree_at(lambda h: h.weight, head, _xavier_normal(keys[-1], head.weight.shape, features, num_classes))
        self.convs = tuple(convs)
        self.head = head
        self.negative_slope = negative_slope

    @property
    def kernel_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        """``[(out, in, k, k)]`` per conv layer (static: read from the layer settings)."""
        return tuple((c.out_channels, c.in_channels, c.kernel_size[0], c.kernel_size[1]) for c in self.convs)

    def apply(
        self, x: jax.Array, kernels: Sequence[Any], *, conv: Callable[[jax.Array, Any], jax.Array] = conv2d
    ) -> jax.Array:
        """The forward pass with the given kernels and convolution.

        Args:
            x: images ``[N, H, W, C]``.
            kernels: one entry per conv layer, passed to ``conv`` as is (a kernel array
                ``[out, in, k, k]`` for the default :func:`conv2d`; for a weight-noise
                estimator whatever it takes, e.g. ``(rng_key, loc, scale)``).
            conv: ``conv(h [N, C_in, H, W], kernel) -> [N, C_out, H', W']`` without bias.

        Returns:
            logits ``[N, num_classes]``.
        """
        if x.ndim != 4:
            raise ValueError(f"ConvNet expects images [N, H, W, C], got shape {x.shape}")
        if len(kernels) != len(self.convs):
            raise ValueError(f"ConvNet has {len(self.convs)} conv layers, got {len(kernels)} kernels")
        h = jnp.transpose(x, (0, 3, 1, 2))
        for layer, kernel in zip(self.convs, kernels):
            h = conv(h, kernel) + layer.bias[None]
            h = max_pool2(jax.nn.leaky_relu(h, self.negative_slope))
        h = h.reshape(h.shape[0], -1)
        return jax.vmap(self.head)(h)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.apply(x, [c.weight for c in self.convs])

    def with_kernels(self, kernels: Sequence[jax.Array]) -> ConvNet:
        """The same network with its conv kernels replaced (each ``[out, in, k, k]``)."""
        for shape, kernel in zip(self.kernel_shapes, kernels):
            if tuple(kernel.shape) != shape:
                raise ValueError(f"kernel shape {tuple(kernel.shape)} does not match the layer's {shape}")
        return eqx.tree_at(lambda n: [c.weight for c in n.convs], self, list(kernels))


def without_kernels(net: ConvNet) -> ConvNet:
    """``net`` with its conv kernels removed (set to ``None``): biases and dense layer only.

    This is what :func:`dwp_model` registers as a ``param`` site, so that the kernels,
    which are latent there, are not also parameters.
    """
    return eqx.tree_at(lambda n: [c.weight for c in n.convs], net, [None] * len(net.convs), is_leaf=lambda v: v is None)
