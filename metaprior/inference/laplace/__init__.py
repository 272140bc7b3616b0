"""Laplace posteriors for Equinox networks: full, diagonal and K-FAC curvature.

- :func:`laplace`: the posterior at given weights (MAP, or MAML's adapted weights);
  :func:`fit_laplace` finds the MAP first (single task).
- :func:`log_det`, :func:`sample_params`, :func:`predictive`,
  :func:`log_marginal_likelihood`: what a posterior is used for.
- :data:`STRUCTURES`: ``"full"``, ``"diag"``, ``"kfac"`` (chosen by argument).
- :func:`task_laplace`, :func:`sample_task_laplace`: the per-task Laplace posterior of
  any NumPyro model's own local latents (full or diagonal; validation of a user's model).
- :func:`laplace_filter`: the default choice of leaves (Linear / Conv2d weights and
  biases; batch-norm scale and shift excluded).
"""

from metaprior.inference.laplace._layers import laplace_filter
from metaprior.inference.laplace.curvature import (
    STRUCTURES,
    DiagCurvature,
    Fisher,
    FullCurvature,
    KFACBlock,
    KFACCurvature,
    Structure,
    factored_kron_log_det,
    kron_log_det,
    output_hessian_sqrt,
)
from metaprior.inference.laplace.posterior import (
    LaplacePosterior,
    fit_laplace,
    laplace,
    log_det,
    log_marginal_likelihood,
    precision_matrix,
    predictive,
    sample_networks,
    sample_params,
    vmap_apply,
)
from metaprior.inference.laplace.tasks import TaskLaplace, sample_task_laplace, task_laplace

__all__ = [
    "STRUCTURES",
    "TaskLaplace",
    "sample_task_laplace",
    "task_laplace",
    "DiagCurvature",
    "Fisher",
    "FullCurvature",
    "KFACBlock",
    "KFACCurvature",
    "LaplacePosterior",
    "Structure",
    "factored_kron_log_det",
    "fit_laplace",
    "kron_log_det",
    "laplace",
    "laplace_filter",
    "log_det",
    "log_marginal_likelihood",
    "output_hessian_sqrt",
    "precision_matrix",
    "predictive",
    "sample_networks",
    "sample_params",
    "vmap_apply",
]
