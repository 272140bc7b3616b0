"""Inference: everything that turns a model into a posterior.

The meta-training loop (:func:`fit`, :func:`meta_learner`), SVI and new-task local
inference (:func:`elbo_loss`, :func:`fit_local`), guides, Laplace posteriors, MAML and
LLAMA, synthetic gradients (SIB), Flipout, NUTS baselines, ArviZ diagnostics and the
shared few-shot / regression evaluation.
"""

from metaprior.inference import laplace
from metaprior.inference.amortized_classifier import amortized_predictive, init_conv4_guide
from metaprior.inference.diagnostics import (
    expected_calibration_error,
    from_guide,
    from_mcmc,
    from_samples,
    plot_reliability,
    predictive_scores,
    reliability_curve,
    save_posterior,
    to_datatree,
)
from metaprior.inference.evaluation import evaluate_fewshot, grid_search, predict_episodes
from metaprior.inference.flipout import (
    LayerEstimator,
    apply_layer,
    categorical_expected_log_lik,
    per_example,
    sample_layer,
    shared_sample,
    stochastic_forward,
)
from metaprior.inference.laplace import LaplacePosterior, fit_laplace, log_det, predictive
from metaprior.inference.local import LocalFit, fit_local, restart_weights, sample_restart_mixture, task_batch_learner
from metaprior.inference.maml import (
    MAMLAux,
    SupportQuery,
    adapt,
    kfac_llama,
    laplace_predictive,
    ml_laplace,
    ml_point,
    point_predictive,
)
from metaprior.inference.mcmc import (
    NutsHealth,
    RestartInit,
    default_chain_method,
    grid_posterior,
    nuts_health,
    per_task_log_joint,
    restart_init,
    run_nuts,
)
from metaprior.inference.meta import FitResult, MetaLearner, MetaState, NonFiniteLossError, fit, meta_learner
from metaprior.inference.sib import sib_guide, sib_loss, sib_posterior, sib_predict, sib_predictive, support_initializer
from metaprior.inference.svi import elbo_loss, init_params
from metaprior.inference.synthetic_gradients import (
    DiagGaussian,
    SyntheticGradientInfo,
    SyntheticGradientState,
    SyntheticGradientVI,
    diag_gaussian_kl,
    reparameterize,
    run_synthetic_gradient_vi,
    sample_noise,
    synthetic_gradient,
    synthetic_gradient_vi,
)
from metaprior.inference.task_latent import build_task_guide, infer_support_sizes

__all__ = [
    "fit",
    "meta_learner",
    "FitResult",
    "MetaLearner",
    "MetaState",
    "NonFiniteLossError",
    "elbo_loss",
    "init_params",
    "fit_local",
    "LocalFit",
    "restart_weights",
    "sample_restart_mixture",
    "task_batch_learner",
    "DiagGaussian",
    "SyntheticGradientInfo",
    "SyntheticGradientState",
    "SyntheticGradientVI",
    "diag_gaussian_kl",
    "reparameterize",
    "run_synthetic_gradient_vi",
    "sample_noise",
    "synthetic_gradient",
    "synthetic_gradient_vi",
    "sib_guide",
    "sib_loss",
    "sib_posterior",
    "sib_predict",
    "sib_predictive",
    "support_initializer",
    "evaluate_fewshot",
    "predict_episodes",
    "grid_search",
    "kfac_llama",
    "point_predictive",
    "laplace_predictive",
    "build_task_guide",
    "infer_support_sizes",
    "amortized_predictive",
    "init_conv4_guide",
    "laplace",
    "LaplacePosterior",
    "fit_laplace",
    "log_det",
    "predictive",
    "MAMLAux",
    "SupportQuery",
    "adapt",
    "ml_laplace",
    "ml_point",
    "expected_calibration_error",
    "from_guide",
    "from_mcmc",
    "from_samples",
    "plot_reliability",
    "predictive_scores",
    "reliability_curve",
    "save_posterior",
    "to_datatree",
    "NutsHealth",
    "RestartInit",
    "default_chain_method",
    "grid_posterior",
    "nuts_health",
    "per_task_log_joint",
    "restart_init",
    "run_nuts",
    "LayerEstimator",
    "apply_layer",
    "categorical_expected_log_lik",
    "flipout",
    "per_example",
    "sample_layer",
    "shared_sample",
    "stochastic_forward",
]
