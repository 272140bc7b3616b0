"""The deep weight prior (DWP): an implicit VAE prior over convolution kernels.

Atanov et al. (2019) put a prior on every 2-D kernel ``w [k, k]`` of a conv layer ``l``
(one kernel per pair of output and input channels) through a latent variable::

    p_l(w) = integral p_l(w | z; phi_l) p(z) dz,    p(z) = N(0, I),
    p_l(w | z; phi_l) = N(w | mu_phi(z), diag sigma_phi(z)^2)

The decoder ``phi_l`` is that of a VAE trained on the kernels of layer ``l`` of nets
already trained on a *source* task (notMNIST for an MNIST target); its encoder
``r_l(z | w; psi_l)`` is kept and used by the auxiliary variational bound on the
target task (:mod:`metaprior.inference.guides.auxiliary`).

This module holds the model side:

- :class:`ConvNet`: the paper's MNIST network (conv k1 -> leaky ReLU -> 2x2 max-pool ->
  conv k2 -> leaky ReLU -> 2x2 max-pool -> linear), used for the source nets, for
  ordinary training from a prior-sampled initialisation, and as the target-task net.
  Its forward pass takes the kernels and the convolution as arguments, so the same
  network runs with point kernels, sampled kernels or a weight-noise estimator.
- :class:`KernelEncoder`, :class:`KernelDecoder`, :class:`KernelVAE` and
  :func:`kernel_vae_elbo`: the kernel VAE (fully factorised Gaussians, MLPs with ELU,
  which the paper's appendix allows for small kernels).
- :class:`DeepWeightPrior`: the trained VAEs of all conv layers as one reusable prior
  object, saved and loaded atomically (:meth:`DeepWeightPrior.save`,
  :meth:`DeepWeightPrior.load`).
- Kernel priors for the target task, all with the same call inside the model:
  :class:`DeepKernelPrior` (the DWP of one layer), :class:`NormalKernelPrior` and
  :class:`LogUniformKernelPrior` (the baselines, with their closed-form or approximate
  KL to a factorised Gaussian).
- :func:`dwp_model`: the target-task NumPyro model. For every conv layer ``l``, in a
  plate over its kernels, ``z ~ p(z)`` then ``w ~ p_l(w | z)``; then the labels given
  the images. Biases and the dense layer are ``param`` sites: point estimates, with no
  prior, as in the paper.

Shapes: images are ``[N, H, W, C]`` (channels last, as the data loaders give them);
inside the network activations are ``[N, C, H, W]`` and kernels ``[out, in, k, k]``
(Equinox's ``Conv2d`` layout).

References:
    A. Atanov, A. Ashukha, K. Struminsky, D. Vetrov, M. Welling. "The Deep Weight
    Prior." ICLR 2019 (arXiv:1810.06943). Sec. 3 (the prior and the auxiliary bound),
    Sec. 4.1 and Appendix (the MNIST network, source kernels, VAE).
    D. Molchanov, A. Ashukha, D. Vetrov. "Variational Dropout Sparsifies Deep Neural
    Networks." ICML 2017, Eq. (14) (the log-uniform KL approximation).
"""

from __future__ import annotations

import abc
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

from metaprior._io import atomic_write_bytes, read_tagged_npz
from metaprior.models.nets import MLP

__all__ = [
    "ConvNet",
    "conv2d",
    "conv2d_im2col",
    "max_pool2",
    "KernelEncoder",
    "KernelDecoder",
    "KernelVAE",
    "kernel_vae_elbo",
    "decoder_snr",
    "collect_kernels",
    "drop_small_kernels",
    "DeepWeightPrior",
    "KernelPrior",
    "DeepKernelPrior",
    "NormalKernelPrior",
    "LogUniformKernelPrior",
    "KernelSites",
    "kernel_sites",
    "dwp_model",
    "dwp_model_params",
    "without_kernels",
]


# --------------------------------------------------------------------------- the network


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


# --------------------------------------------------------------------------- the kernel VAE


def _flat_apply(mlp: MLP, x: jax.Array, in_size: int) -> jax.Array:
    batch = x.shape[: x.ndim - 1]
    out = jax.vmap(mlp)(x.reshape(-1, in_size))
    return out.reshape(batch + out.shape[-1:])


def _split_gaussian(out: jax.Array, min_scale: float) -> tuple[jax.Array, jax.Array]:
    loc, raw = jnp.split(out, 2, axis=-1)
    return loc, jax.nn.softplus(raw) + min_scale


class KernelEncoder(eqx.Module):
    """The recognition model ``r(z | w; psi) = N(z | m_psi(w), diag s_psi(w)^2)``.

    Call: ``w: [..., k, k] -> (loc [..., latent_dim], scale [..., latent_dim])``. The
    scale is ``softplus(.) + min_scale``.
    """

    mlp: MLP
    kernel_size: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    min_scale: float = eqx.field(static=True)

    def __init__(
        self, kernel_size: int, latent_dim: int, hidden: Sequence[int], *, key: jax.Array, min_scale: float = 1e-3
    ):
        self.mlp = MLP(kernel_size * kernel_size, 2 * latent_dim, tuple(hidden), key=key, activation=jax.nn.elu)
        self.kernel_size = kernel_size
        self.latent_dim = latent_dim
        self.min_scale = min_scale

    def __call__(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = self.kernel_size
        if w.shape[-2:] != (k, k):
            raise ValueError(f"KernelEncoder expects kernels [..., {k}, {k}], got shape {w.shape}")
        flat = w.reshape(w.shape[:-2] + (k * k,))
        return _split_gaussian(_flat_apply(self.mlp, flat, k * k), self.min_scale)


class KernelDecoder(eqx.Module):
    """The generative model ``p(w | z; phi) = N(w | mu_phi(z), diag sigma_phi(z)^2)``.

    Call: ``z: [..., latent_dim] -> (loc [..., k, k], scale [..., k, k])``.
    """

    mlp: MLP
    kernel_size: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    min_scale: float = eqx.field(static=True)

    def __init__(
        self, kernel_size: int, latent_dim: int, hidden: Sequence[int], *, key: jax.Array, min_scale: float = 1e-3
    ):
        self.mlp = MLP(latent_dim, 2 * kernel_size * kernel_size, tuple(hidden), key=key, activation=jax.nn.elu)
        self.kernel_size = kernel_size
        self.latent_dim = latent_dim
        self.min_scale = min_scale

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"KernelDecoder expects z [..., {self.latent_dim}], got shape {z.shape}")
        k = self.kernel_size
        loc, scale = _split_gaussian(_flat_apply(self.mlp, z, self.latent_dim), self.min_scale)
        shape = z.shape[:-1] + (k, k)
        return loc.reshape(shape), scale.reshape(shape)


class KernelVAE(eqx.Module):
    """A VAE over ``k x k`` kernels (encoder and decoder MLPs of the same hidden sizes).

    Attributes:
        encoder: :class:`KernelEncoder`, ``r(z | w; psi)``.
        decoder: :class:`KernelDecoder`, ``p(w | z; phi)``.
        hidden: the hidden layer sizes (kept to rebuild the module on load).
    """

    encoder: KernelEncoder
    decoder: KernelDecoder
    hidden: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        kernel_size: int,
        latent_dim: int,
        hidden: Sequence[int] = (64, 64),
        *,
        key: jax.Array,
        min_scale: float = 1e-3,
    ):
        k_enc, k_dec = jax.random.split(key)
        self.encoder = KernelEncoder(kernel_size, latent_dim, hidden, key=k_enc, min_scale=min_scale)
        self.decoder = KernelDecoder(kernel_size, latent_dim, hidden, key=k_dec, min_scale=min_scale)
        self.hidden = tuple(int(h) for h in hidden)

    @property
    def kernel_size(self) -> int:
        return self.decoder.kernel_size

    @property
    def latent_dim(self) -> int:
        return self.decoder.latent_dim

    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable), for saving."""
        return {
            "kernel_size": self.kernel_size,
            "latent_dim": self.latent_dim,
            "hidden": list(self.hidden),
            "min_scale": self.decoder.min_scale,
        }

    def sample(self, rng_key: jax.Array, num_kernels: int, *, noise: bool = True) -> jax.Array:
        """Kernels from the prior ``p(w) = int p(w | z) p(z) dz``: ``[num_kernels, k, k]``.

        With ``noise=False`` the decoder's mean ``mu_phi(z)`` is returned for each
        ``z ~ p(z)`` (what the paper's code uses to initialise a network).
        """
        k_z, k_w = jax.random.split(rng_key)
        z = jax.random.normal(k_z, (num_kernels, self.latent_dim))
        loc, scale = self.decoder(z)
        if not noise:
            return loc
        return loc + scale * jax.random.normal(k_w, loc.shape)


def kernel_vae_elbo(rng_key: jax.Array, vae: KernelVAE, kernels: jax.Array) -> jax.Array:
    """One-sample ELBO of each kernel under the VAE (reparameterised, analytic KL).

    ``ELBO(w) = E_{r(z|w)} log p(w | z) - KL(r(z | w) || N(0, I)) <= log p(w)``
    (Kingma & Welling 2014, Eq. 10).

    Args:
        rng_key: key for the ``z`` samples.
        vae: the kernel VAE.
        kernels: ``[K, k, k]``.

    Returns:
        ``[K]`` ELBO per kernel (nats).
    """
    loc, scale = vae.encoder(kernels)
    z = loc + scale * jax.random.normal(rng_key, loc.shape)
    w_loc, w_scale = vae.decoder(z)
    log_lik = jnp.sum(dist.Normal(w_loc, w_scale).log_prob(kernels), axis=(-2, -1))
    kl = jnp.sum(0.5 * (loc**2 + scale**2 - 1.0) - jnp.log(scale), axis=-1)
    return log_lik - kl


def decoder_snr(
    rng_key: jax.Array,
    decoder: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    latent_dim: int,
    num_samples: int = 4000,
) -> float:
    """How much of a prior kernel is structure: median over ``z ~ p(z)`` of
    ``||mu_phi(z)|| / ||sigma_phi(z)||`` (Frobenius norms over the kernel).

    Below 1, a draw ``w ~ p(w | z)`` is mostly independent per-weight noise around a
    small mean: the VAE has explained the source kernels as noise, and under the
    variational posterior such a prior pulls the target kernels' means toward the
    small ``mu_phi(z)`` (the deep weight prior's failure mode on our source nets; see
    benchmarks/README.md "Deep weight prior on small MNIST").

    Args:
        rng_key: key for the ``z`` draws.
        decoder: ``z [..., latent_dim] -> (loc, scale)``, each ``[..., k, k]`` (a
            :class:`KernelDecoder`).
        latent_dim: the size of ``z``.
        num_samples: draws of ``z``.

    Returns:
        The median ratio (a float).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    z = jax.random.normal(rng_key, (num_samples, latent_dim))
    loc, scale = decoder(z)
    ratio = jnp.sqrt(jnp.sum(loc**2, axis=(-2, -1))) / jnp.sqrt(jnp.sum(scale**2, axis=(-2, -1)))
    return float(jnp.median(ratio))


def collect_kernels(nets: ConvNet, layer: int) -> jax.Array:
    """All 2-D kernels of conv layer ``layer`` of a stack of networks.

    Args:
        nets: a :class:`ConvNet` whose arrays carry a leading ``[num_nets]`` axis (e.g.
            from ``eqx.filter_vmap`` over seeds), or a single network.
        layer: conv layer index.

    Returns:
        ``[num_nets * out * in, k, k]``.
    """
    weight = nets.convs[layer].weight
    k = weight.shape[-1]
    return weight.reshape(-1, k, k)


def drop_small_kernels(kernels: jax.Array, min_norm: float) -> np.ndarray:
    """The kernels whose Frobenius norm is at least ``min_norm`` (as NumPy, host side).

    L2-regularised source nets leave unused kernels near zero; the paper drops them
    before training the VAE, since they carry no structure.
    """
    kernels = np.asarray(kernels)
    norms = np.sqrt(np.sum(kernels**2, axis=(-2, -1)))
    return kernels[norms >= min_norm]


# --------------------------------------------------------------------------- the prior object

_FORMAT = "metaprior-deep-weight-prior-v1"


class DeepWeightPrior(eqx.Module):
    """The deep weight prior of a network: one kernel VAE per conv layer.

    A reusable object: build it from trained VAEs, :meth:`save` it, :meth:`load` it in
    another run. :meth:`layer` gives the model-side prior of one layer.

    Attributes:
        vaes: one :class:`KernelVAE` per conv layer, in layer order.
    """

    vaes: tuple[KernelVAE, ...]

    def __init__(self, vaes: Sequence[KernelVAE]):
        self.vaes = tuple(vaes)

    @property
    def kernel_sizes(self) -> tuple[int, ...]:
        return tuple(v.kernel_size for v in self.vaes)

    def layer(self, index: int) -> DeepKernelPrior:
        """The prior of conv layer ``index`` as a :class:`DeepKernelPrior`."""
        return DeepKernelPrior(self.vaes[index].decoder)

    def priors(self) -> tuple[DeepKernelPrior, ...]:
        """:meth:`layer` for every layer."""
        return tuple(self.layer(i) for i in range(len(self.vaes)))

    def sample_kernels(
        self, rng_key: jax.Array, shape: tuple[int, int, int, int], layer: int, *, noise: bool = True
    ) -> jax.Array:
        """Kernels of one layer drawn from the prior, shaped ``[out, in, k, k]``.

        Used to initialise a network from the prior (the paper's Sec. 4.3 takes the
        decoder mean, ``noise=False``).
        """
        out, inp, k, k2 = shape
        vae = self.vaes[layer]
        if (k, k2) != (vae.kernel_size, vae.kernel_size):
            raise ValueError(
                f"layer {layer}'s prior is over {vae.kernel_size}x{vae.kernel_size} kernels, asked for {k}x{k2}"
            )
        return vae.sample(rng_key, out * inp, noise=noise).reshape(shape)

    def init_net(self, rng_key: jax.Array, net: ConvNet, *, noise: bool = False) -> ConvNet:
        """``net`` with every conv kernel sampled from this prior (biases, head kept)."""
        keys = jax.random.split(rng_key, len(net.convs))
        kernels = [self.sample_kernels(k, s, i, noise=noise) for i, (k, s) in enumerate(zip(keys, net.kernel_shapes))]
        return net.with_kernels(kernels)

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write the prior to ``path`` (an ``.npz``) atomically.

        The file holds a format tag, the VAEs' constructor arguments (JSON), optional
        JSON ``metadata`` (e.g. how the source kernels were made) and the arrays. It is
        written to a temporary name in the same folder, flushed and renamed over
        ``path``: a crash leaves the old file or the new one, never half of one.
        """
        arrays = {
            f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(eqx.filter(self, eqx.is_array)))
        }
        arrays["__format__"] = np.array(_FORMAT)
        arrays["__config__"] = np.array(json.dumps([v.config() for v in self.vaes]))
        arrays["__metadata__"] = np.array(json.dumps(metadata or {}))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = Path(path)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeepWeightPrior:
        """Read a prior written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a saved deep weight prior, or its arrays do not
                match the stored configuration.
        """
        prior, _ = cls.load_with_metadata(path)
        return prior

    @classmethod
    def load_with_metadata(cls, path: str | os.PathLike) -> tuple[DeepWeightPrior, dict[str, Any]]:
        """:meth:`load`, also returning the ``metadata`` dict given to :meth:`save`."""
        path = Path(path)
        arrays = read_tagged_npz(path, _FORMAT, label="deep weight prior")
        configs = json.loads(arrays["__config__"].item())
        skeleton = cls([KernelVAE(key=jax.random.key(0), **c) for c in configs])
        params, static = eqx.partition(skeleton, eqx.is_array)
        like, treedef = jax.tree.flatten(params)
        leaves = []
        for i, ref in enumerate(like):
            value = arrays.get(f"leaf_{i}")
            if value is None or value.shape != ref.shape or value.dtype != ref.dtype:
                got = "missing" if value is None else f"{value.shape} {value.dtype}"
                raise ValueError(
                    f"{path}: array {i} is {got}, the stored configuration expects {ref.shape} {ref.dtype}"
                )
            leaves.append(jnp.asarray(value))
        if f"leaf_{len(like)}" in arrays:
            raise ValueError(f"{path}: more arrays than the stored configuration has")
        prior = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
        return prior, json.loads(arrays["__metadata__"].item())


# --------------------------------------------------------------------------- kernel priors


class KernelSites(NamedTuple):
    """Names of the sites of conv layer ``l`` in :func:`dwp_model`."""

    w: str
    z: str
    plate: str


def kernel_sites(layer: int) -> KernelSites:
    """``KernelSites(w="conv{l}_w", z="conv{l}_z", plate="conv{l}_kernels")``."""
    return KernelSites(f"conv{layer}_w", f"conv{layer}_z", f"conv{layer}_kernels")


class KernelPrior(eqx.Module):
    """A prior over the 2-D kernels of one conv layer (abstract).

    Called inside the model's plate over the layer's kernels; emits the sample sites
    and returns the kernels ``[num_kernels, k, k]``.
    """

    @abc.abstractmethod
    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        """Sample sites for one layer; returns ``w [num_kernels, k, k]``."""


class DeepKernelPrior(KernelPrior):
    """The DWP of one layer: ``z ~ N(0, I)``, ``w ~ N(mu_phi(z), diag sigma_phi(z)^2)``.

    Sites: ``sites.z`` ``[K, latent_dim]`` (event 1) and ``sites.w`` ``[K, k, k]``
    (event 2), ``K`` the plate's size. Any decoder with the :class:`KernelDecoder` call
    works (the tests use a linear-Gaussian one, whose marginal ``p(w)`` is analytic).
    """

    decoder: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    latent_dim: int = eqx.field(static=True)

    def __init__(self, decoder, latent_dim: int | None = None):
        self.decoder = decoder
        self.latent_dim = int(latent_dim if latent_dim is not None else decoder.latent_dim)

    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        z = numpyro.sample(sites.z, dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1))
        loc, scale = self.decoder(z)
        if loc.shape[-2:] != (kernel_size, kernel_size):
            raise ValueError(f"the decoder makes {loc.shape[-2:]} kernels, the layer has {kernel_size}x{kernel_size}")
        return numpyro.sample(sites.w, dist.Normal(loc, scale).to_event(2))


class NormalKernelPrior(KernelPrior):
    """Fully factorised ``N(0, scale^2)`` on every weight (the paper's "SN" baseline)."""

    scale: float = eqx.field(static=True, default=1.0)

    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        k = kernel_size
        return numpyro.sample(sites.w, dist.Normal(jnp.zeros((k, k)), self.scale).to_event(2))

    def kl(self, loc: jax.Array, scale: jax.Array) -> jax.Array:
        """``KL(N(loc, scale^2) || N(0, self.scale^2))`` summed over each kernel.

        Args:
            loc, scale: ``[K, k, k]``.

        Returns:
            ``[K]``.
        """
        s0 = self.scale
        per_weight = jnp.log(s0 / scale) + (scale**2 + loc**2) / (2 * s0**2) - 0.5
        return jnp.sum(per_weight, axis=(-2, -1))


# Molchanov et al. (2017), Eq. (14): -KL(q || p) ~= k1 sigmoid(k2 + k3 log a) - 0.5 log(1 + 1/a) - k1
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


class LogUniformKernelPrior(KernelPrior):
    """The improper log-uniform prior ``p(|w|) proportional to 1 / |w|`` on every weight.

    In the model the site is an improper flat density plus a factor ``-log|w|`` (so the
    model cannot be run forward from this prior). Training uses its KL to a Gaussian
    ``q(w) = N(theta, alpha theta^2)``, which depends on ``alpha`` only and is
    approximated as in Molchanov et al. (2017), Eq. (14):

        -KL(q || p) ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1,

    ``k1 = 0.63576, k2 = 1.87320, k3 = 1.48695`` (an additive constant of the improper
    prior dropped; accurate to about 0.01 nats per weight).
    """

    def __call__(self, sites: KernelSites, kernel_size: int) -> jax.Array:
        k = kernel_size
        w = numpyro.sample(sites.w, dist.ImproperUniform(dist.constraints.real, (), (k, k)))
        numpyro.factor(sites.w + "_log_uniform", -jnp.sum(jnp.log(jnp.abs(w)), axis=(-2, -1)))
        return w

    @staticmethod
    def kl(loc: jax.Array, scale: jax.Array) -> jax.Array:
        """Approximate ``KL(N(loc, scale^2) || LogUniform)`` summed over each kernel.

        ``log alpha = log scale^2 - log loc^2``.

        Args:
            loc, scale: ``[K, k, k]``.

        Returns:
            ``[K]``.
        """
        tiny = jnp.finfo(jnp.result_type(loc)).tiny
        log_alpha = jnp.log(scale**2 + tiny) - jnp.log(loc**2 + tiny)
        neg_kl = _K1 * jax.nn.sigmoid(_K2 + _K3 * log_alpha) - 0.5 * jax.nn.softplus(-log_alpha) - _K1
        return -jnp.sum(neg_kl, axis=(-2, -1))


# --------------------------------------------------------------------------- the target model


def dwp_model_params(net: ConvNet) -> dict[str, Any]:
    """The model's ``param`` sites at ``net``'s values: ``{"net$params": ...}``.

    The conv biases and the dense layer (point estimates; the kernels are latent).
    """
    params, _ = eqx.partition(without_kernels(net), eqx.is_inexact_array)
    return {"net$params": params}


def dwp_model(
    images: jax.Array,
    labels: jax.Array | None = None,
    *,
    net: ConvNet,
    priors: Sequence[KernelPrior],
    batch_size: int | None = None,
    conv: Callable[[jax.Array, jax.Array], jax.Array] = conv2d,
) -> jax.Array:
    """The target-task model with a prior over every conv kernel.

    For conv layer ``l`` with kernels ``[out, in, k, k]``, in ``plate("conv{l}_kernels",
    out * in)``: the layer's :class:`KernelPrior` emits its sites (for the deep weight
    prior ``z ~ N(0, I)`` then ``w ~ p_l(w | z)``). Then, in ``plate("examples", N,
    subsample_size=batch_size)``, ``y_n ~ Categorical(logits = f(x_n; W, b, V))`` with
    the biases ``b`` and dense weights ``V`` a ``param`` site (``"net$params"``): point
    estimates without a prior, as in the paper.

    Args:
        images: ``[N, H, W, C]``, the whole training set (the plate subsamples it).
        labels: ``[N]`` int, or ``None`` to sample them.
        net: a :class:`ConvNet` giving the architecture and the initial biases and
            dense layer (its kernels are ignored).
        priors: one :class:`KernelPrior` per conv layer.
        batch_size: examples per step (``None``: all); the likelihood is scaled by
            ``N / batch_size`` through the plate, so the ELBO stays unbiased.
        conv: the convolution (:func:`conv2d`, or :func:`conv2d_im2col` when the model
            is vmapped over several data sets).

    Returns:
        logits ``[batch, num_classes]`` of the examples in the subsample.
    """
    if len(priors) != len(net.convs):
        raise ValueError(f"the net has {len(net.convs)} conv layers, got {len(priors)} priors")
    body = eqx_module("net", without_kernels(net))
    kernels = []
    for layer, (shape, prior) in enumerate(zip(net.kernel_shapes, priors)):
        out, inp, k, _ = shape
        sites = kernel_sites(layer)
        with numpyro.plate(sites.plate, out * inp):
            w = prior(sites, k)
        kernels.append(w.reshape(shape))
    num = images.shape[0]
    with numpyro.plate("examples", num, subsample_size=batch_size) as idx:
        logits = body.apply(images[idx], kernels, conv=conv)
        numpyro.sample("y", dist.Categorical(logits=logits), obs=None if labels is None else labels[idx])
    return logits
