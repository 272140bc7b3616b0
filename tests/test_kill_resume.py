"""SIGKILL a running experiment, rerun the same command, get the uninterrupted result.

The CLI runs in a subprocess (``python -m metaprior.cli run harmonic --quick`` with 300
meta-training steps and a checkpoint every 50). One run goes uninterrupted. Another is
killed with SIGKILL at a seeded random delay after its first checkpoint appears, then
rerun with the same command: its final checkpoints must equal the uninterrupted run's
bitwise (the CPU computation is deterministic: same XLA program, same inputs, one
device) and its ``metrics.json`` must equal it in every key but wall times.

The same kill-and-rerun is run for every other experiment that checkpoints (on
../shared/data): sinusoid-maml / -llama, omniglot-maml / -llama, omniglot-amortized,
sib-omniglot, dwp-mnist and fewshot (one method), each at its ``--quick`` size with training stretched over
several checkpoints; the test checks that the kill landed before training ended.

A third run is killed in the middle of a checkpoint write: the test hook
``METAPRIOR_TEST_SLOW_WRITE_S`` sleeps between writing the temporary file and renaming
it; the kill lands while a temporary file exists. The previous checkpoint must still
load, the rerun must remove the stale temporary and finish with the same result.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ARGS = ["run", "harmonic", "--quick", "--no-progress", "--set", "num_steps=300", "--set", "checkpoint_every=50"]
SIB_ARGS = ["run", "sib-omniglot", "--quick", "--no-progress"]
TIMEOUT = 300


def _cmd(out: Path, args=ARGS) -> list[str]:
    return [sys.executable, "-m", "metaprior.cli", *args, "--out", str(out)]


def _env(**extra) -> dict:
    return dict(os.environ, METAPRIOR_PROGRESS="0", **extra)


def _run(out: Path, args=ARGS, **env) -> None:
    subprocess.run(_cmd(out, args), check=True, env=_env(**env), timeout=TIMEOUT, capture_output=True)


def _start(out: Path, args=ARGS, **env) -> subprocess.Popen:
    return subprocess.Popen(_cmd(out, args), env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _same_result(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.ckpt"))
    assert names and names == sorted(p.name for p in b.glob("*.ckpt"))
    for name in names:
        x, y = _arrays(a / name), _arrays(b / name)
        assert x.keys() == y.keys()
        for k in x.keys() - {"__train_time_s__"}:  # the seconds spent differ between runs
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    timed = {k for k in ma if k.endswith("_s")}
    assert ma.keys() == mb.keys()
    assert {k: v for k, v in ma.items() if k not in timed} == {k: v for k, v in mb.items() if k not in timed}
    assert not list(b.glob(".*.tmp")), "a temporary file was left behind"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _run(out)
    return out


def test_sigkill_after_a_checkpoint_then_rerun_equals_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _start(out)
    _wait_for(lambda: (out / "meta_kl.ckpt").exists(), proc, "the first checkpoint")
    time.sleep(random.Random(0).uniform(0.0, 1.5))  # seeded "random point" after it
    _kill(proc)
    assert not (out / "metrics.json").exists()
    _run(out)
    _same_result(uninterrupted, out)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(uninterrupted, tmp_path):
    from metaprior._io import read_tagged_npz
    from metaprior.inference.meta import _FORMAT

    out = tmp_path / "midwrite"
    proc = _start(out, METAPRIOR_TEST_SLOW_WRITE_S="1.0")
    # the second write of the first model's checkpoint: an old one exists and a new one is in flight
    _wait_for(
        lambda: (out / "meta_kl.ckpt").exists() and list(out.glob(".meta_kl.ckpt.*.tmp")),
        proc,
        "a checkpoint write after the first",
    )
    _kill(proc)
    assert list(out.glob(".meta_kl.ckpt.*.tmp")), "the kill should land mid-write"
    previous = read_tagged_npz(out / "meta_kl.ckpt", _FORMAT, label="checkpoint")  # still readable
    assert previous["__losses__"].size in range(50, 300, 50)  # a whole earlier checkpoint, not a partial one
    _run(out)
    _same_result(uninterrupted, out)


# The other experiments that meta-train, each with its --quick size stretched just enough that
# training spans several checkpoints (``checkpoint_every`` steps apart), and with
# METAPRIOR_TEST_SLOW_WRITE_S making every checkpoint write take that long, so that a kill
# at a seeded random delay (below the slow write) after the first checkpoint lands while
# training is still going: the test checks that the run really was cut short.
_SET = lambda **kw: [a for k, v in kw.items() for a in ("--set", f"{k}={v}")]  # noqa: E731
KILL_CASES = {
    "sinusoid-maml": _SET(num_steps=200, steps_per_call=10, checkpoint_every=20),
    "sinusoid-llama": _SET(num_steps=200, laplace_steps=100, steps_per_call=10, checkpoint_every=20),
    "omniglot-maml": _SET(num_steps=12, checkpoint_every=2),
    "omniglot-llama": _SET(num_steps=12, checkpoint_every=2, eval_shots=1, tau_grid=1000.0),
    "omniglot-amortized": _SET(num_steps=6, checkpoint_every=1),
    "sib-omniglot": [],  # one checkpoint per training run (pretraining, then each shots x T)
    "dwp-mnist": _SET(checkpoint_every=5),  # source nets, each VAE, each prior's nets, each init segment
    # one method and one test bed: the resume path is the same fit for every method
    "fewshot": _SET(methods="protonet", beds="id", num_steps=12, steps_per_call=2, checkpoint_every=2),
}
SLOW_WRITE_S = 0.3


def _steps_done(out: Path) -> dict[str, int]:
    return {p.name: _arrays(p)["__losses__"].size for p in out.glob("*.ckpt")}


@pytest.mark.parametrize("name", sorted(KILL_CASES))
def test_sigkill_after_the_first_checkpoint_then_rerun_equals_uninterrupted(name, tmp_path, shared_data_dir):
    """Killed after its first checkpoint appears and rerun with the same command, every
    experiment that checkpoints ends where an uninterrupted run does."""
    args = ["run", name, "--quick", "--no-progress", *KILL_CASES[name]]
    # the three runs share one persistent compilation cache: the second and third load the
    # first's executables (the same programs, so the same results) instead of compiling again
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env = dict(METAPRIOR_DATA=str(shared_data_dir), **cache)
    straight, out = tmp_path / "straight", tmp_path / "killed"
    _run(straight, args, **env)
    proc = _start(out, args, METAPRIOR_TEST_SLOW_WRITE_S=str(SLOW_WRITE_S), **env)
    _wait_for(lambda: any(out.glob("*.ckpt")), proc, "the first checkpoint")
    time.sleep(random.Random(name).uniform(0.0, SLOW_WRITE_S))  # seeded "random point" after it
    _kill(proc)
    assert not (out / "metrics.json").exists()
    done, total = _steps_done(out), _steps_done(straight)
    assert done.keys() < total.keys() or any(done[k] < total[k] for k in done), (done, total)
    _run(out, args, **env)
    _same_result(straight, out)


def test_validate_sigkill_after_a_finished_case_then_rerun_equals_uninterrupted(tmp_path):
    """validate checkpoints per case (``case_{name}.json``, written after the case's files):
    killed once the first case is done and rerun, it skips that case and ends with the
    uninterrupted run's metrics and case records (every key but wall times; the report's
    time column differs too)."""
    args = ["run", "validate", "--quick", "--no-progress", "--set", "cases=linear,mixture"]
    cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    straight, out = tmp_path / "straight", tmp_path / "killed"
    _run(straight, args, **cache)
    proc = _start(out, args, **cache)
    _wait_for(lambda: (out / "case_linear.json").exists(), proc, "the first case's checkpoint")
    _kill(proc)
    assert not (out / "case_mixture.json").exists(), "the kill should land before the second case ends"
    assert not (out / "metrics.json").exists()
    first = (out / "case_linear.json").read_bytes()
    _run(out, args, **cache)
    assert (out / "case_linear.json").read_bytes() == first  # not rerun
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731
    for name in ("case_linear.json", "case_mixture.json"):
        a, b = (json.loads((d / name).read_text()) for d in (straight, out))
        assert untimed(a["metrics"]) == untimed(b["metrics"]) and a["healthy"] == b["healthy"], name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, out))
    assert untimed(ma) == untimed(mb)
    assert (out / "validation.md").exists()
