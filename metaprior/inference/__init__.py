
# --- Synthetic-gradient amortized inference, SIB's inner loop (issue 7) ---
from metaprior.inference.synthetic_gradients import (  # noqa: E402
    DiagGaussian, SyntheticGradientInfo, SyntheticGradientState, SyntheticGradientVI,
    diag_gaussian_kl, reparameterize, run_synthetic_gradient_vi, sample_noise, synthetic_gradient,
    synthetic_gradient_vi)

__all__ = [*globals().get("__all__", ()),
           "DiagGaussian", "SyntheticGradientInfo", "SyntheticGradientState", "SyntheticGradientVI",
           "diag_gaussian_kl", "reparameterize", "run_synthetic_gradient_vi", "sample_noise",
           "synthetic_gradient", "synthetic_gradient_vi"]
# --- end of issue 7 block ---

# --- MAML as empirical Bayes, LLAMA, Laplace posteriors (issue 4) ---
from metaprior.inference import laplace  # noqa: E402  (the subpackage: full / diag / kfac)
from metaprior.inference.laplace import LaplacePosterior, fit_laplace, log_det, predictive  # noqa: E402
from metaprior.inference.maml import MAMLAux, SupportQuery, adapt, ml_laplace, ml_point  # noqa: E402

__all__ = [*globals().get("__all__", ()),
           "laplace", "LaplacePosterior", "fit_laplace", "log_det", "predictive",
           "MAMLAux", "SupportQuery", "adapt", "ml_laplace", "ml_point"]
# --- end of issue 4 block ---

# --- NUTS baselines, ArviZ conversion, calibration (issue 8) ---
from metaprior.inference.diagnostics import (  # noqa: E402
    expected_calibration_error, from_guide, from_mcmc, from_samples, plot_reliability,
    predictive_scores, reliability_curve, save_posterior, to_datatree)
from metaprior.inference.mcmc import (  # noqa: E402
    NutsHealth, RestartInit, default_chain_method, grid_posterior, nuts_health, per_task_log_joint, restart_init,
    run_nuts)

__all__ = [*globals().get("__all__", ()),
           "expected_calibration_error", "from_guide", "from_mcmc", "from_samples", "plot_reliability",
           "predictive_scores", "reliability_curve", "save_posterior", "to_datatree",
           "NutsHealth", "RestartInit", "default_chain_method", "grid_posterior", "nuts_health",
           "per_task_log_joint", "restart_init", "run_nuts"]
# --- end of issue 8 block ---

# --- Flipout and weight-noise estimators (issue 5) ---
from metaprior.inference.flipout import (  # noqa: E402
    LayerEstimator, apply_layer, categorical_expected_log_lik, per_example, sample_layer,
    shared_sample, stochastic_forward)
# ``metaprior.inference.flipout`` stays the module (``flipout.flipout`` is the estimator):
# re-exporting the function under the module's name would shadow the module.

__all__ = [*globals().get("__all__", ()),
           "LayerEstimator", "apply_layer", "categorical_expected_log_lik", "flipout", "per_example",
           "sample_layer", "shared_sample", "stochastic_forward"]
# --- end of issue 5 block ---
