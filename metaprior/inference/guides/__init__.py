"""Guides: plate-aware task-local guides (IAF, Normal), and more from later modules."""

from metaprior.inference.guides.amortized import (
    AmortizedInference,
    AmortizedInfo,
    AmortizedLSTMGuide,
    AmortizedParams,
    GaussianLayers,
    amortized_meta_loss,
    episode_predictions,
    gaussian_kl,
    negative_elbo,
    numpyro_guide,
    predictive_probs,
    refine,
    sample_weights,
    standard_normal,
    task_posterior,
)
from metaprior.inference.guides.auxiliary import AuxiliaryGuide, AuxiliarySite, latent_elbo, local_reparam_conv2d
from metaprior.inference.guides.encoder import SetEncoder
from metaprior.inference.guides.task_local import LocalSite, TaskIAFGuide, TaskNormalGuide

__all__ = [
    "AuxiliaryGuide",
    "AuxiliarySite",
    "LocalSite",
    "SetEncoder",
    "TaskIAFGuide",
    "TaskNormalGuide",
    "latent_elbo",
    "local_reparam_conv2d",
    "AmortizedInference",
    "AmortizedInfo",
    "AmortizedLSTMGuide",
    "AmortizedParams",
    "GaussianLayers",
    "amortized_meta_loss",
    "episode_predictions",
    "gaussian_kl",
    "negative_elbo",
    "numpyro_guide",
    "predictive_probs",
    "refine",
    "sample_weights",
    "standard_normal",
    "task_posterior",
]
