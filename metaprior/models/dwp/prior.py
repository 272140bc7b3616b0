"""The deep weight prior: one kernel VAE decoder per conv layer, saved and loaded atomically."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from metaprior._io import atomic_write_bytes, read_tagged_npz
from metaprior.models.dwp.model import DeepKernelPrior
from metaprior.models.dwp.net import ConvNet
from metaprior.models.dwp.vae import KernelVAE

__all__ = ["DeepWeightPrior"]

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
