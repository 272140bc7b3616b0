"""A learned rich prior over task latents ("Learning a Rich Prior", Lacoste et al. 2018).

Task ``j`` has a latent code ``z_j ~ N(0, I_d)``; observations are

    y_ij ~ N(mu_alpha(x_ij, z_j), sigma_alpha(x_ij, z_j)^2),
    sigma = sigmoid(s) * 0.1 + 0.001,

where ``(mu, s) = net(x, z)``: the paper's residual MLP on ``concat(x, z)``, or (the
default here) a sine network on ``x`` FiLM-modulated by ``z``, see
:func:`make_task_latent_net`. The network
parameters ``alpha`` are shared by all tasks and point-estimated (a ``param`` site,
registered with :func:`numpyro.contrib.module.eqx_module`). The prior over functions
that this induces is what meta-training learns.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

from metaprior.data.tasks import TaskBatch, check_task_batch
from metaprior.models.nets import MLP, ConcatNet, FiLMSiren, MeanNoiseNet, ResidualMLP

__all__ = ["task_latent_model", "make_task_latent_net", "task_latent_predict", "noise_scale"]

NET_SITE = "net"


ARCHS = ("film", "paper")


def make_task_latent_net(
    rng_key: jax.Array,
    latent_dim: int,
    *,
    arch: str = "film",
    x_dim: int = 1,
    width: int | None = None,
    num_layers: int | None = None,
    omega: float = 15.0,
    noise_width: int = 32,
) -> eqx.Module:
    """The network ``(x, z) -> (mu, s)`` of the task-latent model.

    Two architectures, chosen by ``arch``:

    - ``"film"`` (default): the mean ``mu`` from :class:`~metaprior.models.nets.FiLMSiren`,
      a sine layer on ``x`` whose frequencies, phases and amplitudes are FiLM-modulated
      by ``z`` (width 64, one sine layer unless given), and the noise logit ``s`` from a
      separate one-hidden-layer ReLU MLP on ``concat(x, z)`` (``noise_width`` units), see
      :class:`~metaprior.models.nets.MeanNoiseNet` for why they are apart. With the true
      task parameters in place of ``z`` it reaches held-out MSE below 0.05 on the
      harmonic family within 5,000 steps, where the paper's net is still at 0.31 after
      20,000 (``benchmarks/harmonic_oracle.py``).
    - ``"paper"``: the paper's residual ReLU MLP on ``concat(x, z)`` (width 128, 12
      layers unless given), wrapped in :class:`~metaprior.models.nets.ConcatNet`.

    Args:
        rng_key: initialisation key.
        latent_dim: size ``d`` of the task latent.
        arch: ``"film"`` or ``"paper"``.
        x_dim: input features.
        width: units per hidden layer.
        num_layers: sine layers (film) or dense layers (paper, even).
        omega: film only: the largest first-layer frequency at initialisation, in units
            of ``x`` (the harmonic family has frequencies 5 to 14).
        noise_width: film only: hidden units of the noise network.

    Returns:
        An Equinox module called as ``net(x [x_dim], z [latent_dim]) -> [2]``.
    """
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
    if arch == "film":
        k_mean, k_noise = jax.random.split(rng_key)
        mean = FiLMSiren(x_dim, latent_dim, 1, width=width or 64, num_layers=num_layers or 1, omega=omega, key=k_mean)
        return MeanNoiseNet(mean, ConcatNet(MLP(x_dim + latent_dim, 1, (noise_width,), key=k_noise)))
    if arch == "paper":
        return ConcatNet(
            ResidualMLP(x_dim + latent_dim, 2, width=width or 128, num_layers=num_layers or 12, key=rng_key)
        )
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def noise_scale(s: jax.Array) -> jax.Array:
    """Heteroskedastic noise of the paper: ``sigmoid(s) * 0.1 + 0.001``."""
    return jax.nn.sigmoid(s) * 0.1 + 0.001


def _shared_fast(net: eqx.Module) -> bool:
    """Whether ``net`` has the broadcast path for shared draws (the default FiLM net)."""
    if not (isinstance(net, MeanNoiseNet) and isinstance(net.mean, FiLMSiren)):
        return False
    return isinstance(net.noise, ConcatNet) and isinstance(net.noise.body, MLP)


def _apply_task(net: eqx.Module, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One task: ``x: [N, D]``, ``z: [d]`` -> ``mu, sigma: [N]``."""

    def per_example(xi):
        out = net(xi, z)
        return out[0], noise_scale(out[1])

    return jax.vmap(per_example)(x)


def _apply(net: eqx.Module, x: jax.Array, z: jax.Array, broadcast: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x: [T, N, D]``, ``z: [T, d]`` -> ``mu, sigma: [T, N]``."""
    if broadcast and _shared_fast(net):  # the default net as broadcast arithmetic, one task at a time
        mu, sigma = jax.vmap(lambda xt, zt: _apply_shared(net, xt, zt[None]))(x, z)  # [T, 1, N]
        return mu[:, 0], sigma[:, 0]
    return jax.vmap(_apply_task, in_axes=(None, 0, 0))(net, x, z)


def _apply_shared(net: eqx.Module, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The default net (see :func:`_shared_fast`) at ``x: [..., D]`` for every draw ``z: [S, d]``
    -> ``mu, sigma: [S, ...]``, by :meth:`~metaprior.models.nets.FiLMSiren.apply_shared`."""
    return net.mean.apply_shared(x, z)[..., 0], noise_scale(net.noise.apply_shared(x, z)[..., 0])


def task_latent_model(
    batch: TaskBatch,
    *,
    net: eqx.Module,
    latent_dim: int,
    subsample_size: int | None = None,
    broadcast: bool = False,
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
        broadcast: evaluate the default FiLM net by broadcast arithmetic
            (:meth:`~metaprior.models.nets.FiLMSiren.apply_shared`): the same numbers up to
            float32 rounding, and faster (new-task inference uses it). Off by default, so
            that meta-training follows the trajectory of the per-example path: its outcome
            is sensitive to rounding (benchmarks/README.md, "Sixteenth session").

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
        mu, sigma = _apply(net, x, z[:, 0, :], broadcast)
        with numpyro.plate("examples", num_examples, dim=-1):
            numpyro.sample("y", dist.Normal(mu, sigma).mask(mask), obs=y)


def task_latent_predict(net: eqx.Module, z: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Predictive mean and noise scale for sampled latents.

    Args:
        net: the trained network.
        z: ``[samples, tasks, latent_dim]`` (or ``[samples, tasks, 1, latent_dim]`` as the
            ``z`` site returns it), or ``[samples, latent_dim]``: one set of draws shared by
            every task, whose ``z``-only computations (the FiLM mapping) then run once per
            draw instead of once per draw and task.
        x: ``[tasks, points, D]``.

    Returns:
        ``(mu, sigma)``, each ``[samples, tasks, points]``.
    """
    if z.ndim == 4:
        z = z[:, :, 0, :]
    if z.ndim == 2 and _shared_fast(net):  # draws shared by all tasks: broadcast arithmetic, same numbers
        return _apply_shared(net, x, z)
    if z.ndim == 2:  # z unbatched over the tasks: its own computations run once per draw
        return jax.vmap(lambda zs: jax.vmap(_apply_task, in_axes=(None, 0, None))(net, x, zs))(z)
    return jax.vmap(lambda zs: _apply(net, x, zs, broadcast=True))(z)
