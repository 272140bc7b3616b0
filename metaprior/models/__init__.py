
# --- MAML / LLAMA hierarchical model (issue 4) ---
from metaprior.models.maml import maml_model, phi_site_names, task_networks, task_specific_filter  # noqa: E402

__all__ = [*globals().get("__all__", ()),
           "maml_model", "phi_site_names", "task_networks", "task_specific_filter"]
# --- end of issue 4 block ---
