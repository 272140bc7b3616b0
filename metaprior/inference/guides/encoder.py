"""A permutation-invariant encoder of a task's examples, for amortised task guides.

:class:`SetEncoder` maps one task's examples ``(x [N, D_x], y [N], mask [N])`` to an
offset ``[2 * D]`` of a task guide's base Normal (``loc`` and ``log_scale``), so every
task's q(z) starts from what its own data says and the per-task parameters only refine
it (:class:`~metaprior.inference.guides.TaskNormalGuide` /
:class:`~metaprior.inference.guides.TaskIAFGuide` with ``encoder=``).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from metaprior.models.nets import MLP

__all__ = ["SetEncoder"]


class SetEncoder(eqx.Module):
    """Deep Sets encoder (Zaheer et al. 2017): ``rho(masked mean_i phi(x_i, y_i))``.

    ``phi`` and ``rho`` are ReLU MLPs. The last layer of ``rho`` starts at zero, so a
    guide with a fresh encoder is exactly the guide without one.

    Call: ``x: [N, x_dim], y: [N], mask: [N] bool -> [out_size]``.
    """

    phi: MLP
    rho: MLP

    def __init__(self, x_dim: int, out_size: int, *, width: int = 64, key: jax.Array):
        k_phi, k_rho = jax.random.split(key)
        self.phi = MLP(x_dim + 1, width, (width, width), key=k_phi)
        rho = MLP(width, out_size, (width,), key=k_rho)
        last = rho.layers[-1]
        self.rho = eqx.tree_at(
            lambda m: (m.layers[-1].weight, m.layers[-1].bias),
            rho,
            (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
        )

    def __call__(self, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
        h = jax.vmap(self.phi)(jnp.concatenate([x, y[:, None]], axis=-1))
        w = mask.astype(h.dtype)[:, None]
        pooled = (h * w).sum(0) / jnp.maximum(w.sum(), 1.0)
        return self.rho(pooled)
