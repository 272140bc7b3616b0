"""Equinox networks shared by the models: MLP, residual MLP, and the 4-block conv net.

All are pytrees, so ``jax.grad``, ``jax.vmap`` over tasks, and NumPyro's
``eqx_module`` work on them directly. Shapes are stated per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = [
    "MLP",
    "ResidualMLP",
    "ConcatNet",
    "FiLMSiren",
    "MeanNoiseNet",
    "BatchStatNorm",
    "ShiftConv2d",
    "Im2colConv2d",
    "Im2colConv2dJVP",
    "cols_matmul",
    "Conv4",
    "CONV_IMPLS",
    "conv4_output_size",
    "max_pool_2x2_nhwc",
]

CONV_IMPLS = ("lax", "shift", "im2col")


class MLP(eqx.Module):
    """A plain fully connected network acting on one example.

    Call: ``x: [in_size] -> [out_size]`` (``jax.vmap`` it over examples).
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden: tuple[int, ...],
        *,
        key: jax.Array,
        activation: Callable = jax.nn.relu,
    ):
        sizes = (in_size, *hidden, out_size)
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class ResidualMLP(eqx.Module):
    """Residual MLP of "Learning a Rich Prior" (Lacoste et al. 2018): input projection,
    ``num_layers`` dense layers of ``width`` units with LayerNorm and ReLU, a residual
    connection around every pair of layers, and a linear head.

    Call: ``x: [in_size] -> [out_size]``.
    """

    inp: eqx.nn.Linear
    layers: tuple[eqx.nn.Linear, ...]
    norms: tuple[eqx.nn.LayerNorm, ...]
    head: eqx.nn.Linear

    def __init__(self, in_size: int, out_size: int, *, width: int = 128, num_layers: int = 12, key: jax.Array):
        if num_layers < 2 or num_layers % 2:
            raise ValueError(f"num_layers must be an even number >= 2, got {num_layers}")
        k_in, k_head, *k_layers = jax.random.split(key, num_layers + 2)
        self.inp = eqx.nn.Linear(in_size, width, key=k_in)
        self.layers = tuple(eqx.nn.Linear(width, width, key=k) for k in k_layers)
        self.norms = tuple(eqx.nn.LayerNorm(width) for _ in range(num_layers))
        self.head = eqx.nn.Linear(width, out_size, key=k_head)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.inp(x)
        for i in range(0, len(self.layers), 2):
            r = h
            h = jax.nn.relu(self.norms[i](self.layers[i](h)))
            h = self.norms[i + 1](self.layers[i + 1](h))
            h = jax.nn.relu(h + r)
        return self.head(h)


class ConcatNet(eqx.Module):
    """A conditional network ``(x, z) -> body(concat(x, z))``.

    Call: ``x: [x_dim], z: [latent_dim] -> [out_size]``. The adapter that gives an
    unconditional body (e.g. :class:`ResidualMLP`) the ``(x, z)`` signature of
    :class:`FiLMSiren`.
    """

    body: eqx.Module

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        return self.body(jnp.concatenate([x, z]))

    def apply_shared(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """``x: [..., x_dim]`` at every one of ``z: [S, latent_dim]`` -> ``[S, ..., out_size]``
        (an :class:`MLP` body only): the first layer split as ``W_x x + (W_z z + b)``, so its
        ``z`` part runs once per draw, then broadcast matrix products."""
        if not isinstance(self.body, MLP):
            raise TypeError(f"ConcatNet.apply_shared needs an MLP body, got {type(self.body).__name__}")
        first, d = self.body.layers[0], x.shape[-1]
        grid = (slice(None),) + (None,) * (x.ndim - 1)
        h = x[None] @ first.weight[:, :d].T + (z @ first.weight[:, d:].T + first.bias)[grid]
        for layer in self.body.layers[1:]:
            h = self.body.activation(h) @ layer.weight.T + layer.bias
        return h


class FiLMSiren(eqx.Module):
    """A sine network on ``x`` whose hidden layers are FiLM-modulated by ``z``.

    ``h_0 = x``; ``h_l = sin((1 + gamma_l(z)) * (W_l h_{l-1} + b_l) + beta_l(z))`` for
    ``l = 1..num_layers``; ``out = head((1 + alpha(z)) * h_L)``. A mapping MLP on ``z``
    gives every ``gamma_l, beta_l`` (``[width]`` each) and the output gain ``alpha``
    (``[width]``). So ``z`` sets each unit's frequency (gamma), phase (beta) and amplitude
    (alpha), instead of entering as one more input coordinate.

    It is the pi-GAN generator (Chan et al. 2021, eq. 3: FiLM of a SIREN's sine layers by
    a mapping network) with an output gain added, and the SIREN initialisation
    (Sitzmann et al. 2020, section 3.2): first-layer weights ``U(-omega, omega)`` (the
    largest input frequency, in units of ``x``; biases ``U(-pi, pi)``), deeper weights
    ``U(-sqrt(6 / width), sqrt(6 / width))``. The mapping network's last layer starts at
    ``mapping_scale`` times Equinox's initialisation, so training starts from a plain
    SIREN that ``z`` perturbs.

    Call: ``x: [x_dim], z: [latent_dim] -> [out_size]``.
    """

    layers: tuple[eqx.nn.Linear, ...]
    mapping: MLP
    head: eqx.nn.Linear
    width: int = eqx.field(static=True)

    def __init__(
        self,
        x_dim: int,
        latent_dim: int,
        out_size: int,
        *,
        width: int = 64,
        num_layers: int = 1,
        mapping_width: int = 64,
        mapping_layers: int = 2,
        omega: float = 15.0,
        mapping_scale: float = 0.1,
        key: jax.Array,
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not omega > 0:
            raise ValueError(f"omega must be > 0, got {omega!r}")
        k_layers, k_map, k_head = jax.random.split(key, 3)
        layers = []
        for i, k in enumerate(jax.random.split(k_layers, num_layers)):
            kw, kb = jax.random.split(k)
            fan_in = x_dim if i == 0 else width
            bound = omega if i == 0 else (6.0 / width) ** 0.5
            layer = eqx.nn.Linear(fan_in, width, key=kw)
            w = jax.random.uniform(kw, (width, fan_in), minval=-bound, maxval=bound)
            b = jax.random.uniform(kb, (width,), minval=-jnp.pi, maxval=jnp.pi)
            layers.append(eqx.tree_at(lambda m: (m.weight, m.bias), layer, (w, b)))
        self.layers = tuple(layers)
        mapping = MLP(latent_dim, (2 * num_layers + 1) * width, (mapping_width,) * mapping_layers, key=k_map)
        last = mapping.layers[-1]
        self.mapping = eqx.tree_at(
            lambda m: (m.layers[-1].weight, m.layers[-1].bias),
            mapping,
            (last.weight * mapping_scale, last.bias * mapping_scale),
        )
        self.head = eqx.nn.Linear(width, out_size, key=k_head)
        self.width = width

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        film = self.mapping(z).reshape(2 * len(self.layers) + 1, self.width)
        h = x
        for i, layer in enumerate(self.layers):
            h = jnp.sin((1.0 + film[2 * i]) * layer(h) + film[2 * i + 1])
        return self.head((1.0 + film[-1]) * h)

    def apply_shared(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """``x: [..., x_dim]`` at every one of ``z: [S, latent_dim]`` -> ``[S, ..., out_size]``.

        The same numbers as ``__call__`` vmapped over both, for many draws of ``z`` shared
        by many inputs (prior importance sampling): the mapping runs once per draw and the
        sine layers as broadcast arithmetic, which on CPU is several times faster than the
        nested vmap (benchmarks/README.md, "Sixteenth session").
        """
        film = jax.vmap(self.mapping)(z).reshape(z.shape[0], 2 * len(self.layers) + 1, self.width)
        grid = (slice(None),) + (None,) * (x.ndim - 1)  # [S] -> [S, 1, ..., 1]
        h = x[None]
        for i, layer in enumerate(self.layers):
            h = jnp.sin((1.0 + film[:, 2 * i])[grid] * (h @ layer.weight.T + layer.bias) + film[:, 2 * i + 1][grid])
        gain = (1.0 + film[:, -1])[grid]  # [S, 1, ..., 1, width]
        return jnp.stack([(h * gain * w).sum(-1) for w in self.head.weight], axis=-1) + self.head.bias


class MeanNoiseNet(eqx.Module):
    """Two conditional networks side by side: ``(x, z) -> concat(mean(x, z), noise(x, z))``.

    A heteroskedastic Gaussian likelihood trained on one shared network lets the noise
    output steer the shared features: with :class:`FiLMSiren` the noise logit is raised
    by growing the FiLM gains, which also scales the mean, and training stalls near
    predicting zero (with the task given: held-out MSE 0.49 to 1.05 after 2,000 steps,
    against 0.18 with separate networks; benchmarks/README.md, "Harmonic: a network that
    learns the task family"). Kept apart, the mean's gradient is that of a per-point
    weighted squared error.

    Call: ``x: [x_dim], z: [latent_dim] -> [mean_out + noise_out]``.
    """

    mean: eqx.Module
    noise: eqx.Module

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        return jnp.concatenate([self.mean(x, z), self.noise(x, z)])


class BatchStatNorm(eqx.Module):
    """Batch normalisation with the statistics of the current batch, always.

    This is the "transductive" batch norm of MAML (Finn et al. 2017) and most
    few-shot code: there are no running averages, so the layer is a pure function of
    its input and the scale/shift parameters.

    Call: ``x: [N, C, H, W] -> [N, C, H, W]`` (statistics over N, H, W).
    """

    scale: jax.Array
    shift: jax.Array
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, channels: int, eps: float = 1e-5):
        self.scale = jnp.ones((channels,))
        self.shift = jnp.zeros((channels,))
        self.eps = eps

    def nhwc(self, x: jax.Array) -> jax.Array:
        """The same normalisation for channels-last input ``[N, H, W, C]``."""
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.var(x, axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale + self.shift

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=(0, 2, 3), keepdims=True)
        var = jnp.var(x, axis=(0, 2, 3), keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return x * self.scale[None, :, None, None] + self.shift[None, :, None, None]


def conv4_output_size(image_size: int, num_blocks: int = 4) -> int:
    """Spatial size after ``num_blocks`` 2x2 max-pools (floor division, 'VALID' pooling)."""
    size = image_size
    for _ in range(num_blocks):
        size //= 2
    return size


class ShiftConv2d(eqx.nn.Conv2d):
    """``eqx.nn.Conv2d`` computed as a sum of shifted matrix products, one per kernel tap.

    ``y[:, i, j] = sum_{a, b} W[:, :, a, b] @ x_pad[:, i + a, j + b]`` (+ bias): the same
    numbers as the convolution (float32 round-off aside), from pad, slice and ``dot``
    only. Under ``vmap`` over per-task kernels (MAML's adapted weights, per-task weight
    samples) XLA turns a convolution into a grouped one, which its CPU backend runs
    ~14x slower than these batched matrix products (measured: ``benchmarks/conv_impl.py``);
    with one shared kernel XLA's own convolution is ~2x faster, so that stays the default
    of :class:`Conv4` (``conv_impl="lax"``). Any order of derivatives, ``jvp`` included.
    Strided, dilated, grouped or non-zero-padded layers fall back to the parent.
    """

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        if (
            self.groups != 1
            or tuple(self.stride) != (1, 1)
            or tuple(self.dilation) != (1, 1)
            or self.padding_mode != "ZEROS"
            or x.ndim != 3
        ):
            return super().__call__(x, key=key)
        (top, bottom), (left, right) = self.padding
        xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right)))
        kh, kw = self.kernel_size
        height, width = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        out = 0.0
        for a in range(kh):
            for b in range(kw):
                out = out + jnp.einsum("oc,chw->ohw", self.weight[:, :, a, b], xp[:, a : a + height, b : b + width])
        if self.use_bias:
            out = out + self.bias
        return out


def max_pool_2x2_nhwc(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 ('VALID': an odd last row/column is dropped) of
    ``[N, H, W, C]``: a reshape to ``[N, H/2, 2, W/2, 2, C]`` and two elementwise maxima.

    The values equal ``lax.reduce_window``'s. Its gradient is a compare-and-select
    (elementwise) instead of ``select_and_scatter``, which XLA's CPU backend runs slowly
    and which is slower again under a second derivative. At ties the gradient is split
    between the tied entries (``reduce_window`` gives it to one); after a ReLU the only
    ties with non-zero probability are at 0, where the ReLU's derivative is 0 either way.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    rows = jnp.maximum(x[:, :, 0], x[:, :, 1])  # [N, H/2, W/2, 2, C]
    return jnp.maximum(rows[:, :, :, 0], rows[:, :, :, 1])


@jax.custom_vjp
def cols_matmul(cols: jax.Array, kernel: jax.Array) -> jax.Array:
    """``cols [M, K] @ kernel [K, O]``, with a reverse-mode rule whose kernel gradient XLA's
    CPU backend runs without transposing the output cotangent.

    JAX's own transpose of a matrix product computes the kernel gradient as
    ``dot_general(g, cols)`` with the cotangent ``g [M, O]`` first; XLA's CPU dot then
    copies ``g`` into ``[O, M]`` (contraction innermost), a strided copy of the largest
    array of a conv step (a sixth of a MAML meta-step at 28x28, ``benchmarks/maml_step.py``).
    Here the gradient is ``dot_general(cols, g)``, so the copy is of ``cols`` when its
    ``K`` is small (the first layer) and of nothing XLA has to stride over otherwise. The
    numbers are the same product's (float32 round-off aside); the rule is itself made of
    differentiable products, so reverse-over-reverse (second-order MAML) works. A
    ``custom_vjp`` has no forward mode: :class:`Im2colConv2dJVP` (``Conv4(fast_vjp=False)``)
    uses the plain product (for ``jax.jvp`` / ``jax.linearize`` through the net).
    """
    return cols @ kernel


def _cols_matmul_fwd(cols, kernel):
    return cols @ kernel, (cols, kernel)


def _cols_matmul_bwd(res, g):
    cols, kernel = res
    d_cols = g @ kernel.T
    d_kernel = jax.lax.dot_general(cols, g, (((0,), (0,)), ((), ())))
    return d_cols.astype(cols.dtype), d_kernel.astype(kernel.dtype)


cols_matmul.defvjp(_cols_matmul_fwd, _cols_matmul_bwd)


class Im2colConv2d(ShiftConv2d):
    """A conv layer with a batched channels-last call: ``nhwc(x [N, H, W, C])``.

    :meth:`nhwc` builds the ``kh * kw * C`` columns of every output pixel from shifted
    slices of the zero-padded input (im2col) and multiplies them by the kernel as one
    matrix ``[kh * kw * C, O]``: one matrix product per layer with a contraction of
    ``9 C`` (instead of nine of ``C``), in the layout XLA's CPU dot wants, and no
    transposes of activations. Under ``vmap`` over per-task kernels it is one batched
    matrix product. The per-example ``__call__`` (``[C, H, W]``, for generic callers; Laplace's
    K-FAC taps wrap :meth:`nhwc` as well) is :class:`ShiftConv2d`'s; both compute the same numbers
    (float32 round-off aside). Weights keep Equinox's ``[O, C, kh, kw]`` layout.

    It multiplies through :func:`cols_matmul`, whose gradient XLA runs faster on CPU but
    which has no forward-mode derivative; :class:`Im2colConv2dJVP` uses the plain product
    (``jax.jvp`` / ``jax.linearize`` work, the gradients are the same). The choice is a
    class attribute, not a field, so the pytree (and every checkpoint's structure) is
    the same as before it existed.
    """

    fast_vjp: ClassVar[bool] = True

    def nhwc(self, x: jax.Array) -> jax.Array:
        if (
            self.groups != 1
            or tuple(self.stride) != (1, 1)
            or tuple(self.dilation) != (1, 1)
            or self.padding_mode != "ZEROS"
        ):
            return jnp.transpose(jax.vmap(super().__call__)(jnp.transpose(x, (0, 3, 1, 2))), (0, 2, 3, 1))
        # Materialise the input once: without the barrier XLA fuses the previous block's
        # batch norm, ReLU and pool into each of the kh * kw slices below, recomputing them
        # from the 4x larger pre-pool activations once per slice.
        x = jax.lax.optimization_barrier(x)
        (top, bottom), (left, right) = self.padding
        xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        kh, kw = self.kernel_size
        n, height, width = xp.shape[0], xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        cols = jnp.concatenate(
            [xp[:, a : a + height, b : b + width] for a in range(kh) for b in range(kw)], axis=-1
        )  # [N, H', W', kh * kw * C], tap-major
        kernel = jnp.transpose(self.weight, (2, 3, 1, 0)).reshape(-1, self.out_channels)  # [kh * kw * C, O]
        matmul = cols_matmul if self.fast_vjp else jnp.matmul
        out = matmul(cols.reshape(-1, cols.shape[-1]), kernel).reshape(n, height, width, -1)
        if self.use_bias:
            out = out + self.bias.reshape(-1)
        return out


class Im2colConv2dJVP(Im2colConv2d):
    """:class:`Im2colConv2d` multiplying with the plain product: forward-mode
    differentiation (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) works through it;
    reverse mode gives the same gradients, a little slower on CPU."""

    fast_vjp: ClassVar[bool] = False


def _runs_nhwc(conv: eqx.Module) -> bool:
    """An :class:`Im2colConv2d`, or one wrapped by Laplace's K-FAC taps (which give the
    wrapper an ``nhwc`` call that taps the batch; ``inference.laplace._layers``)."""
    tapped = isinstance(getattr(conv, "layer", None), Im2colConv2d) and hasattr(conv, "nhwc")
    return isinstance(conv, Im2colConv2d) or tapped


class Conv4(eqx.Module):
    """The standard few-shot conv net: ``num_blocks`` x [3x3 conv, batch norm, ReLU,
    2x2 max-pool], then a linear head (Vinyals et al. 2016; Finn et al. 2017).

    Call: ``x: [N, H, W, C]`` (a batch; batch norm uses its statistics) ``-> [N, out_size]``.
    With ``out_size=None`` it returns the flattened features ``[N, features]``.

    Attributes:
        convs: the conv layers (weights ``[filters, in, 3, 3]``, bias ``[filters]``);
            ``conv_impl="im2col"`` (default) makes them :class:`Im2colConv2d` and runs the
            whole net channels-last on the batch (the fastest on CPU: 2.4x the ``shift``
            path on a MAML step with per-task weights, ``benchmarks/maml_step.py``, and
            1.3x XLA's convolution with shared weights); ``"shift"``
            :class:`ShiftConv2d` and ``"lax"`` plain ``eqx.nn.Conv2d``, both
            called per example channels-first (NCHW) with a ``reduce_window`` max-pool.
            All three give the same function of the same weights.
            ``fast_vjp`` (im2col only): see :class:`Im2colConv2d`; ``False`` for
            ``jax.jvp`` / ``jax.linearize`` through the net (reverse mode works either way).
        norms: :class:`BatchStatNorm` per block (scale, shift).
        head: final :class:`equinox.nn.Linear` or ``None``.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[BatchStatNorm, ...]
    head: eqx.nn.Linear | None

    def __init__(
        self,
        out_size: int | None,
        *,
        in_channels: int = 1,
        filters: int = 64,
        image_size: int = 28,
        num_blocks: int = 4,
        conv_impl: str = "im2col",
        fast_vjp: bool = True,
        key: jax.Array,
    ):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        im2col = Im2colConv2d if fast_vjp else Im2colConv2dJVP
        conv_cls = {"lax": eqx.nn.Conv2d, "shift": ShiftConv2d, "im2col": im2col}[conv_impl]
        keys = jax.random.split(key, num_blocks + 1)
        chans = (in_channels,) + (filters,) * num_blocks
        self.convs = tuple(
            conv_cls(a, b, kernel_size=3, padding=1, key=k) for a, b, k in zip(chans[:-1], chans[1:], keys[:-1])
        )
        self.norms = tuple(BatchStatNorm(filters) for _ in range(num_blocks))
        side = conv4_output_size(image_size, num_blocks)
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for {num_blocks} pooling blocks")
        self.head = None if out_size is None else eqx.nn.Linear(filters * side * side, out_size, key=keys[-1])

    def features(self, x: jax.Array) -> jax.Array:
        """``x: [N, H, W, C] -> [N, features]`` (the flattened output of the last block)."""
        if x.ndim != 4:
            raise ValueError(f"Conv4 expects images [N, H, W, C], got shape {x.shape}")
        if all(_runs_nhwc(c) for c in self.convs):  # channels-last on the batch
            h = x
            for conv, norm in zip(self.convs, self.norms):
                h = max_pool_2x2_nhwc(jax.nn.relu(norm.nhwc(conv.nhwc(h))))
            # flatten in (C, H, W) order, as the channels-first path does
            return jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
        # per example, channels-first (the shift and lax layers)
        h = jnp.transpose(x, (0, 3, 1, 2))
        for conv, norm in zip(self.convs, self.norms):
            h = jax.vmap(conv)(h)
            h = jax.nn.relu(norm(h))
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        return h.reshape(h.shape[0], -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.features(x)
        if self.head is None:
            return h
        return jax.vmap(self.head)(h)
