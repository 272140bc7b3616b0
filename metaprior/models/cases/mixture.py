"""Case (d): tasks drawn from a mixture of a few clusters, the cluster index enumerated.

Cluster ``k`` is a line ``y = a_k + b_k x``; task ``j`` belongs to cluster
``c_j ~ Categorical(pi)`` and ``y_ij ~ N(a_{c_j} + b_{c_j} x_ij, sigma^2)``. The
discrete ``c_j`` is marked ``infer={"enumerate": "parallel"}``, so it is summed out
exactly: by ``TraceEnum_ELBO`` in SVI and by NumPyro's enumeration inside NUTS (both
through funsor). :func:`cluster_probabilities` gives each task's posterior cluster
probabilities, Rao-Blackwellised over the draws of the continuous latents.

Mixtures are symmetric under relabelling the clusters; the intercepts are ordered
(``a_1 < ... < a_K``, NumPyro's ordered-vector transform) so that chains agree on one
labelling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer.util import log_likelihood

from metaprior.data.tasks import TaskBatch, check_task_batch
from metaprior.models.cases.linear import _task_rows

__all__ = ["task_mixture_model", "task_mixture_tasks", "cluster_probabilities"]

CLUSTER_SITE = "c"


def task_mixture_model(
    batch: TaskBatch,
    *,
    num_clusters: int = 3,
    prior_scale: float = 2.0,
    concentration: float = 2.0,
    subsample_size: int | None = None,
) -> None:
    """A mixture of linear-regression task clusters as a NumPyro program.

    Sites:
        ``weights`` ``[K]`` (simplex), ``intercept`` ``[K]`` (ordered), ``slope`` ``[K]``,
        ``noise`` ``[]`` (positive): global.
        ``c`` (sample, in ``plate("tasks")``, enumerated): ``[tasks, 1]``.
        ``y`` (sample, in ``plate("tasks")`` x ``plate("examples")``): ``[tasks, examples]``.

    Args:
        batch: ``TaskBatch(x [T, N, 1], y [T, N] or None, mask [T, N])``.
        num_clusters: ``K``.
        prior_scale: prior standard deviation of intercepts and slopes.
        concentration: symmetric Dirichlet concentration of the cluster weights.
        subsample_size: tasks drawn per call (log-likelihood scaled, unbiased ELBO); all if None.
    """
    check_task_batch(batch, name="batch", x_dim=1)
    num_tasks, num_examples, _ = batch.x.shape
    k = num_clusters
    weights = numpyro.sample("weights", dist.Dirichlet(jnp.full(k, concentration)))
    intercept = numpyro.sample(
        "intercept",
        dist.TransformedDistribution(
            dist.Normal(0.0, prior_scale).expand([k]).to_event(1), dist.transforms.OrderedTransform()
        ),
    )
    slope = numpyro.sample("slope", dist.Normal(0.0, prior_scale).expand([k]).to_event(1))
    noise = numpyro.sample("noise", dist.HalfNormal(1.0))
    with numpyro.plate("tasks", num_tasks, subsample_size=subsample_size, dim=-2) as idx:
        c = numpyro.sample(CLUSTER_SITE, dist.Categorical(weights), infer={"enumerate": "parallel"})
        # c: [T, 1], or [K, 1, 1] while enumerated; the mean broadcasts to [..., T, N].
        x, y, mask = _task_rows(batch, idx)
        mean = intercept[c] + slope[c] * x[..., 0]
        with numpyro.plate("examples", num_examples, dim=-1):
            numpyro.sample("y", dist.Normal(mean, noise).mask(mask), obs=y)


def task_mixture_tasks(
    rng_key: jax.Array,
    num_tasks: int,
    num_examples: int,
    *,
    intercepts: tuple[float, ...] = (-2.0, 0.0, 2.0),
    slopes: tuple[float, ...] = (1.0, -1.0, 0.5),
    weights: tuple[float, ...] = (0.3, 0.4, 0.3),
    noise: float = 0.5,
    x_range: tuple[float, float] = (-2.0, 2.0),
) -> tuple[TaskBatch, jax.Array]:
    """Tasks from a fixed mixture of lines.

    Returns:
        ``(TaskBatch(x [T, N, 1], y [T, N], mask), clusters [T])``.
    """
    k_c, k_x, k_y = jax.random.split(rng_key, 3)
    c = jax.random.choice(k_c, len(weights), (num_tasks,), p=jnp.asarray(weights))
    x = jax.random.uniform(k_x, (num_tasks, num_examples), minval=x_range[0], maxval=x_range[1])
    y = jnp.asarray(intercepts)[c, None] + jnp.asarray(slopes)[c, None] * x
    y = y + noise * jax.random.normal(k_y, x.shape)
    return TaskBatch(x[..., None], y, jnp.ones(x.shape, bool)), c


def cluster_probabilities(
    samples: dict[str, jax.Array], batch: TaskBatch, *, num_clusters: int = 3, **model_kwargs
) -> jax.Array:
    """Posterior cluster probabilities of every task, ``p(c_j = k | data)``.

    For each draw of the continuous latents, ``p(c_j = k | theta, y_j)`` is proportional
    to ``weights_k * prod_i p(y_ij | c_j = k, theta)``, with the likelihood evaluated by
    the model itself (``c`` substituted); the result is averaged over draws.

    Args:
        samples: ``{site: [draws, ...]}`` continuous latents (``weights`` included).
        batch: the observed tasks.
        num_clusters: ``K`` (as given to the model).
        **model_kwargs: the model's other keyword arguments.

    Returns:
        ``[tasks, K]`` probabilities.
    """
    num_tasks = batch.x.shape[0]
    num_draws = samples["weights"].shape[0]
    per_cluster = []
    for k in range(num_clusters):
        fixed = dict(samples)
        fixed[CLUSTER_SITE] = jnp.full((num_draws, num_tasks, 1), k)
        ll = log_likelihood(task_mixture_model, fixed, batch, num_clusters=num_clusters, **model_kwargs)["y"]
        per_cluster.append(ll.sum(-1) + jnp.log(samples["weights"][:, None, k]))
    logits = jnp.stack(per_cluster, axis=-1)  # [draws, T, K]
    return jax.nn.softmax(logits, axis=-1).mean(0)
