"""metaprior: hierarchical Bayesian meta-learning models as NumPyro programs.

Subpackages (data flows one way: data -> models -> inference -> diagnostics):

- :mod:`metaprior.data`: keyed task generators, real-data loaders, episode sampler.
- :mod:`metaprior.models`: NumPyro programs with ``plate("tasks")`` / ``plate("examples")``.
- :mod:`metaprior.inference`: guides, Laplace, the meta-training loop, NUTS, diagnostics.
- :mod:`metaprior.experiments`: one module per paper experiment (``metaprior run NAME``).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
