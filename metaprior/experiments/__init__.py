"""Paper experiments, one small module each, run with ``metaprior run NAME``."""

from metaprior.experiments._registry import ConfigError, Experiment, discover

__all__ = ["ConfigError", "Experiment", "discover"]
