"""Shared fixtures: keys and the real-data directory."""

from __future__ import annotations

import os
from pathlib import Path

# The suite compiles hundreds of small programs and runs little compute in each, so XLA's
# backend optimisations cost more than they save: with them off the quick harmonic run
# takes 78 s instead of 155 s (2-core CPU, benchmarks/README.md "Test-suite time"). Set
# before jax is imported; notebook kernels and subprocess tests inherit it. Export
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the optimised programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture
def rng_key():
    """A fixed PRNG key; tests that need several split it."""
    return jax.random.key(0)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` (or ``$METAPRIOR_DATA``); skips the test where it is absent."""
    path = Path(os.environ.get("METAPRIOR_DATA", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set METAPRIOR_DATA)")
    return path
