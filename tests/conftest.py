"""Shared fixtures: keys and the real-data directory."""

from __future__ import annotations

import os
from pathlib import Path

import jax
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
