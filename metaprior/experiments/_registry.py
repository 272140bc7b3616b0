"""The experiment contract and its registry.

Every module in :mod:`metaprior.experiments` whose name does not start with an
underscore defines ``EXPERIMENTS``: a list of :class:`Experiment`. The CLI
discovers them; nothing else has to be edited to add one.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Size = Literal["quick", "default", "full"]


class ConfigError(ValueError):
    """A config value an experiment cannot run with (raised before it writes anything):
    the CLI prints the message and exits with status 2."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One runnable experiment.

    Attributes:
        name: the CLI name (``metaprior run NAME``).
        description: one line for ``metaprior list``.
        make_config: ``size -> config``; ``"quick"`` is the tiny CI run, ``"default"``
            a few minutes on a laptop CPU, ``"full"`` the paper-size run. The config is a
            frozen dataclass; a ``num_steps`` field makes ``--steps`` work.
        run: ``(rng_key, config, out_dir) -> metrics``. Writes its PNG plots and the
            posterior (ArviZ netCDF) into ``out_dir`` and returns a flat dict of numbers;
            the CLI writes ``metrics.json``.
        metrics_doc: the ``metrics.json`` keys, documented (shown by ``metaprior list -v``).
    """

    name: str
    description: str
    make_config: Callable[[Size], Any]
    run: Callable[[Any, Any, Path], dict[str, float]]
    metrics_doc: str = ""


def discover() -> dict[str, Experiment]:
    """Import every experiment module and return ``{name: Experiment}``."""
    from metaprior import experiments as pkg

    found: dict[str, Experiment] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for exp in getattr(module, "EXPERIMENTS", []):
            if exp.name in found:
                raise RuntimeError(f"experiment name {exp.name!r} registered twice")
            found[exp.name] = exp
    return found
