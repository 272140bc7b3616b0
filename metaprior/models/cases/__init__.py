"""Small models whose posterior is known (closed form, or NUTS as the ground truth).

They are the validation cases of :mod:`metaprior.experiments.validate`:

- (a) :func:`hierarchical_linear_model`: conjugate, exact posterior
  :func:`hierarchical_linear_posterior`.
- (b) :func:`hierarchical_bnn_model`: a hierarchical Bayesian MLP on sinusoid tasks.
- (d) :func:`task_mixture_model`: task clusters with the cluster index enumerated.

(Case (c), the task-latent model of :mod:`metaprior.models.task_latent`, needs no copy here.)
"""

from metaprior.models.cases.bnn import bnn_apply, hierarchical_bnn_model, make_bnn
from metaprior.models.cases.linear import (
    GaussianPosterior,
    hierarchical_linear_model,
    hierarchical_linear_posterior,
    hierarchical_linear_tasks,
)
from metaprior.models.cases.mixture import cluster_probabilities, task_mixture_model, task_mixture_tasks

__all__ = [
    "hierarchical_linear_model",
    "hierarchical_linear_tasks",
    "hierarchical_linear_posterior",
    "GaussianPosterior",
    "hierarchical_bnn_model",
    "make_bnn",
    "bnn_apply",
    "task_mixture_model",
    "task_mixture_tasks",
    "cluster_probabilities",
]
