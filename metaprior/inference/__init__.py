
# --- MAML as empirical Bayes, LLAMA, Laplace posteriors (issue 4) ---
from metaprior.inference import laplace  # noqa: E402  (the subpackage: full / diag / kfac)
from metaprior.inference.laplace import LaplacePosterior, fit_laplace, log_det, predictive  # noqa: E402
from metaprior.inference.maml import MAMLAux, SupportQuery, adapt, ml_laplace, ml_point  # noqa: E402

__all__ = [*globals().get("__all__", ()),
           "laplace", "LaplacePosterior", "fit_laplace", "log_det", "predictive",
           "MAMLAux", "SupportQuery", "adapt", "ml_laplace", "ml_point"]
# --- end of issue 4 block ---
