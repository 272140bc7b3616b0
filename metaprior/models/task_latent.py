"""A learned rich prior over task latents ("Learning a Rich Prior", Lacoste et al. 2018).

Task ``j`` has a latent code ``z_j ~ N(0, I_d)``; observations are

    y_ij ~ N(mu_alpha(x_ij, z_j), sigma_alpha(x_ij, z_j)^2),
    sigma = sigmoid(s) * 0.1 + 0.001,

where ``(mu, s)`` is the output of a residual MLP on ``concat(x, z)``. The network
parameters ``alpha`` are shared by all tasks and point-estimated (a ``param`` site,
registered with :func:`numpyro.contrib.module.eqx_module`). The prior over functions
that this induces is what meta-training learns.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

from metaprior.data.tasks import TaskBatch, check_task_batch
from metaprior.models.nets import ResidualMLP

__all__ = ["task_latent_model", "make_task_latent_net", "task_latent_predict", "noise_scale"]

NET_SITE = "net"


def make_task_latent_net(rng_key: jax.Array, latent_dim: int, *, x_dim: int = 1, width: int = 128,
                         num_layers: int = 12) -> ResidualMLP:
    """The paper's network: residual MLP on ``concat(x, z)`` with a linear head to ``(mu, s)``.

    Args:
        rng_key: initialisation key.
        latent_dim: size ``d`` of the task latent.
        x_dim: input features.
        width: units per dense layer (paper: 128).
        num_layers: dense layers, residual connection every other layer (paper: 12).
    """
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    return ResidualMLP(x_dim + latent_dim, 2, width=width, num_layers=num_layers, key=rng_key)


def noise_scale(s: jax.Array) -> jax.Array:
    """Heteroskedastic noise of the paper: ``sigmoid(s) * 0.1 + 0.001``."""
    return jax.nn.sigmoid(s) * 0.1 + 0.001


def _apply(net: eqx.Module, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x: [T, N, D]``, ``z: [T, d]`` -> ``mu, sigma: [T, N]``."""

    def per_example(xi, zi):
        out = net(jnp.concatenate([xi, zi]))
        return out[0], noise_scale(out[1])

    per_task = jax.vmap(per_example, in_axes=(0, None))
    return jax.vmap(per_task)(x, z)


def task_latent_model(
    batch: TaskBatch,
    *,
    net: eqx.Module,
    latent_dim: int,
    subsample_size: int | None = None,
) -> None:
    """The task-latent model as a NumPyro program.

    Sites:
        ``net$params`` (param): the shared network ``alpha``.
        ``z`` (sample, in ``plate("tasks")``): ``[tasks, 1, latent_dim]``, prior N(0, I).
        ``y`` (sample, in ``plate("tasks")`` x ``plate("examples")``): ``[tasks, examples]``,
        observed when ``batch.y`` is given, masked where ``batch.mask`` is False.

    Args:
        batch: ``TaskBatch(x [T, N, D], y [T, N] or None, mask [T, N])``.
        net: the network (its arrays are the initial value of ``net$params``; with
            ``substitute`` or trained params it is the learned prior).
        latent_dim: ``d``.
        subsample_size: if given, each call draws that many tasks without replacement and
            scales their log-likelihood by ``T / subsample_size`` (unbiased ELBO).

    References:
        Lacoste et al. (2018), "Uncertainty in Multitask Transfer Learning", eq. (2)-(4).
    """
    check_task_batch(batch, name="batch")
    num_tasks, num_examples, _ = batch.x.shape
    if subsample_size is not None and not 1 <= subsample_size <= num_tasks:
        raise ValueError(f"subsample_size must be in [1, {num_tasks}], got {subsample_size}")
    net = eqx_module(NET_SITE, net)
    with numpyro.plate("tasks", num_tasks, subsample_size=subsample_size, dim=-2) as idx:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1))
        x = batch.x[idx]
        y = None if batch.y is None else batch.y[idx]
        mask = batch.mask[idx]
        mu, sigma = _apply(net, x, z[:, 0, :])
        with numpyro.plate("examples", num_examples, dim=-1):
            numpyro.sample("y", dist.Normal(mu, sigma).mask(mask), obs=y)


def task_latent_predict(net: eqx.Module, z: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Predictive mean and noise scale for sampled latents.

    Args:
        net: the trained network.
        z: ``[samples, tasks, latent_dim]`` (or ``[samples, tasks, 1, latent_dim]`` as the
            ``z`` site returns it).
        x: ``[tasks, points, D]``.

    Returns:
        ``(mu, sigma)``, each ``[samples, tasks, points]``.
    """
    if z.ndim == 4:
        z = z[:, :, 0, :]
    return jax.vmap(lambda zs: _apply(net, x, zs))(z)
