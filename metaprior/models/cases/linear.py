"""Case (a): a hierarchical linear-regression meta-dataset, conjugate.

Task ``j`` has weights ``w_j ~ N(mu, task_scale^2 I)`` around a shared mean
``mu ~ N(0, prior_scale^2 I)``; ``y_ij ~ N(x_ij . w_j, noise_scale^2)`` with known
scales. Everything is linear-Gaussian, so the posterior over ``(mu, w_1..w_T)`` is a
Gaussian known in closed form (:func:`hierarchical_linear_posterior`): the ground truth
against which NUTS itself is checked.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from metaprior.data.tasks import TaskBatch, check_task_batch

__all__ = [
    "hierarchical_linear_model",
    "hierarchical_linear_tasks",
    "hierarchical_linear_posterior",
    "GaussianPosterior",
]


def _task_rows(batch: TaskBatch, idx: jax.Array):
    """The rows of the (sub)sampled tasks: ``x, y, mask`` at ``idx``."""
    return batch.x[idx], None if batch.y is None else batch.y[idx], batch.mask[idx]


def hierarchical_linear_model(
    batch: TaskBatch,
    *,
    prior_scale: float = 1.0,
    task_scale: float = 0.5,
    noise_scale: float = 0.5,
    subsample_size: int | None = None,
) -> None:
    """Hierarchical linear regression as a NumPyro program.

    Sites:
        ``mu`` (sample): ``[features]``, shared mean of the task weights.
        ``w`` (sample, in ``plate("tasks")``): ``[tasks, 1, features]``.
        ``y`` (sample, in ``plate("tasks")`` x ``plate("examples")``): ``[tasks, examples]``.

    Args:
        batch: ``TaskBatch(x [T, N, D], y [T, N] or None, mask [T, N])``.
        prior_scale: prior standard deviation of ``mu``.
        task_scale: spread of task weights around ``mu``.
        noise_scale: observation noise.
        subsample_size: tasks drawn per call (log-likelihood scaled, unbiased ELBO); all if None.
    """
    check_task_batch(batch, name="batch")
    num_tasks, num_examples, num_features = batch.x.shape
    mu = numpyro.sample("mu", dist.Normal(0.0, prior_scale).expand([num_features]).to_event(1))
    with numpyro.plate("tasks", num_tasks, subsample_size=subsample_size, dim=-2) as idx:
        w = numpyro.sample("w", dist.Normal(mu, task_scale).to_event(1))
        x, y, mask = _task_rows(batch, idx)
        mean = jnp.einsum("tnd,td->tn", x, w[:, 0, :])
        with numpyro.plate("examples", num_examples, dim=-1):
            numpyro.sample("y", dist.Normal(mean, noise_scale).mask(mask), obs=y)


def hierarchical_linear_tasks(
    rng_key: jax.Array,
    num_tasks: int,
    num_examples: int,
    *,
    prior_scale: float = 1.0,
    task_scale: float = 0.5,
    noise_scale: float = 0.5,
    x_range: tuple[float, float] = (-2.0, 2.0),
) -> tuple[TaskBatch, dict[str, jax.Array]]:
    """Tasks drawn from the model itself: features ``[1, x]`` with ``x ~ U(x_range)``.

    Returns:
        ``(TaskBatch(x [T, N, 2], y [T, N], mask), {"mu": [2], "w": [T, 2]})``.
    """
    k_mu, k_w, k_x, k_y = jax.random.split(rng_key, 4)
    mu = prior_scale * jax.random.normal(k_mu, (2,))
    w = mu + task_scale * jax.random.normal(k_w, (num_tasks, 2))
    u = jax.random.uniform(k_x, (num_tasks, num_examples), minval=x_range[0], maxval=x_range[1])
    x = jnp.stack([jnp.ones_like(u), u], axis=-1)
    y = jnp.einsum("tnd,td->tn", x, w) + noise_scale * jax.random.normal(k_y, u.shape)
    return TaskBatch(x, y, jnp.ones(u.shape, bool)), {"mu": mu, "w": w}


class GaussianPosterior(NamedTuple):
    """An exact Gaussian posterior over ``theta = concat(mu, w.ravel())``.

    Attributes:
        mean: ``{"mu": [D], "w": [T, D]}`` posterior means.
        std: ``{"mu": [D], "w": [T, D]}`` marginal standard deviations.
        joint_mean: ``[D + T * D]``.
        joint_cov: ``[D + T * D, D + T * D]``.
    """

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    joint_mean: np.ndarray
    joint_cov: np.ndarray


def hierarchical_linear_posterior(
    batch: TaskBatch,
    *,
    prior_scale: float = 1.0,
    task_scale: float = 0.5,
    noise_scale: float = 0.5,
) -> GaussianPosterior:
    """The exact posterior of :func:`hierarchical_linear_model` (float64, NumPy).

    With ``theta = (mu, w_1, ..., w_T)``, the prior precision is
    ``Lambda_0 = [[I / s0^2 + T I / tau^2, -1^T (x) I / tau^2], [-1 (x) I / tau^2, I / tau^2]]``
    and the likelihood adds ``A^T A / sigma^2`` on the task blocks (``A_j`` the unmasked
    design of task ``j``); then ``Sigma = (Lambda_0 + A^T A / sigma^2)^-1`` and
    ``m = Sigma A^T y / sigma^2``.

    References:
        Bishop (2006), "Pattern Recognition and Machine Learning", eq. (2.113)-(2.117)
        (linear-Gaussian models); Gelman et al. (2013), "Bayesian Data Analysis", 3rd ed.,
        section 15.3 (hierarchical linear models with known variances).
    """
    if batch.y is None:
        raise ValueError("batch.y is None: the posterior needs observations")
    x = np.asarray(batch.x, np.float64)
    y = np.asarray(batch.y, np.float64)
    m = np.asarray(batch.mask, bool)
    num_tasks, _, d = x.shape
    p = d * (num_tasks + 1)
    eye = np.eye(d)
    precision = np.zeros((p, p))
    rhs = np.zeros(p)
    precision[:d, :d] = eye / prior_scale**2 + num_tasks * eye / task_scale**2
    for j in range(num_tasks):
        s = slice(d * (j + 1), d * (j + 2))
        xj, yj = x[j][m[j]], y[j][m[j]]
        precision[:d, s] = precision[s, :d] = -eye / task_scale**2
        precision[s, s] = eye / task_scale**2 + xj.T @ xj / noise_scale**2
        rhs[s] = xj.T @ yj / noise_scale**2
    cov = np.linalg.inv(precision)
    cov = 0.5 * (cov + cov.T)
    mean = cov @ rhs
    sd = np.sqrt(np.diag(cov))
    return GaussianPosterior(
        mean={"mu": mean[:d], "w": mean[d:].reshape(num_tasks, d)},
        std={"mu": sd[:d], "w": sd[d:].reshape(num_tasks, d)},
        joint_mean=mean,
        joint_cov=cov,
    )
