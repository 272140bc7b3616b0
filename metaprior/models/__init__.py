"""NumPyro models and the Equinox networks they use."""

from metaprior.models.dwp import (
    ConvNet,
    DeepKernelPrior,
    DeepWeightPrior,
    KernelPrior,
    KernelVAE,
    LogUniformKernelPrior,
    NormalKernelPrior,
    dwp_model,
)

__all__ = [
    "ConvNet",
    "DeepKernelPrior",
    "DeepWeightPrior",
    "KernelPrior",
    "KernelVAE",
    "LogUniformKernelPrior",
    "NormalKernelPrior",
    "dwp_model",
]

# --- SIB: empirical Bayes with synthetic gradients (issue 7) ---
from metaprior.models.sib import (  # noqa: E402
    SIBParams, SyntheticGradientNet, cosine_logits, embed_classes, init_sib_params, pretrain_loss,
    sample_classification_batch, sib_guide, sib_loss, sib_model, sib_posterior, sib_predict,
    support_initializer)

__all__ = [*globals().get("__all__", ()),
           "SIBParams", "SyntheticGradientNet", "cosine_logits", "embed_classes", "init_sib_params", "pretrain_loss",
           "sample_classification_batch", "sib_guide", "sib_loss", "sib_model", "sib_posterior",
           "sib_predict", "support_initializer"]
# --- end of issue 7 block ---

# --- MAML / LLAMA hierarchical model (issue 4) ---
from metaprior.models.maml import maml_model, phi_site_names, task_networks, task_specific_filter  # noqa: E402

__all__ = [*globals().get("__all__", ()),
           "maml_model", "phi_site_names", "task_networks", "task_specific_filter"]
# --- end of issue 4 block ---

# --- Validation cases with known posteriors (issue 8) ---
from metaprior.models.cases import (  # noqa: E402
    GaussianPosterior, bnn_apply, cluster_probabilities, hierarchical_bnn_model,
    hierarchical_linear_model, hierarchical_linear_posterior, hierarchical_linear_tasks, make_bnn,
    task_mixture_model, task_mixture_tasks)

__all__ = [*globals().get("__all__", ()),
           "GaussianPosterior", "bnn_apply", "cluster_probabilities", "hierarchical_bnn_model",
           "hierarchical_linear_model", "hierarchical_linear_posterior", "hierarchical_linear_tasks",
           "make_bnn", "task_mixture_model", "task_mixture_tasks"]
# --- end of issue 8 block ---

# --- Bayesian few-shot classifier with per-task weights (issue 5) ---
from metaprior.models.bayes_classifier import (  # noqa: E402
    LayeredForward, bayes_classifier, conv4_forward, is_weight_layer, layered_forward, mlp_forward,
    shared_params, standard_normal_prior, weight_layers, weight_site_names)

__all__ = [*globals().get("__all__", ()),
           "LayeredForward", "bayes_classifier", "conv4_forward", "is_weight_layer", "layered_forward",
           "mlp_forward", "shared_params", "standard_normal_prior", "weight_layers", "weight_site_names"]
# --- end of issue 5 block ---
