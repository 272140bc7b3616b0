"""Paper experiments, one small module each, run with ``metaprior run NAME``."""

from metaprior.experiments._registry import Experiment, discover

__all__ = ["Experiment", "discover"]
