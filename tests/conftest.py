"""Shared fixtures: keys and the real-data directory."""

from __future__ import annotations

import gc
import os
import resource
import shutil
import tempfile
from pathlib import Path

# The suite compiles hundreds of small programs and runs little compute in each, so XLA's
# backend optimisations cost more than they save: with them off the quick harmonic run
# takes 78 s instead of 155 s (2-core CPU, benchmarks/README.md "Test-suite time"). Set
# before jax is imported; notebook kernels and subprocess tests inherit it. Export
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the optimised programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One on-disk compilation cache for the whole run, shared by the xdist workers and every
# subprocess and notebook kernel they start: the kill-and-resume tests run the same
# experiment three times and the notebooks repeat the experiments' programs, so most of
# those compiles are loads (benchmarks/README.md "Test-suite time"). A fresh folder per run,
# made by the process that starts it (xdist's workers inherit the variable) and removed at
# its end: nothing carries over between runs. Export JAX_COMPILATION_CACHE_DIR to choose
# the folder yourself (then it is kept), or "" for no cache.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"metaprior-test-xla-{os.getpid()}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """Drop JAX's compiled programs and traces after each module.

    An xdist worker runs about half the suite in one process, and JAX keeps every
    executable (and the constants captured in it) for the process's lifetime: without
    this a worker's memory only grows, and two workers beside a heavy test can exhaust
    the 24 GiB machine (a worker once died of a fatal signal in CI). With
    ``METAPRIOR_TEST_RSS=FILE`` each module's resident memory before and after the
    release, and the process's peak, are appended to FILE.
    """
    yield
    before = _rss_mb()
    jax.clear_caches()
    gc.collect()
    log = os.environ.get("METAPRIOR_TEST_RSS")
    if log:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(log, "a") as f:
            name = request.module.__name__
            f.write(f"{os.getpid()} {name} rss_mb={before:.0f}->{_rss_mb():.0f} peak_mb={peak:.0f}\n")


def pytest_sessionfinish(session):
    """The process that made the run's compilation cache removes it."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
