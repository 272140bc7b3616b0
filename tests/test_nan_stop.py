"""Every experiment stops at a NaN loss with a message naming the step and the checkpoint.

All experiments meta-train through ``inference.meta.fit``, whose NaN check is on the
losses it brings back from each compiled chunk. The test hook
``METAPRIOR_TEST_NAN_AT_STEP=N`` turns step N's loss into NaN there, so the check is
exercised end to end from the CLI: the run must exit with status 3, print which
experiment, the step and where the last good checkpoint is (or that none was written),
and leave no ``metrics.json``. ``validate`` fits with NumPyro's ``SVI.run`` and is not
covered by this hook (it raises ``FloatingPointError`` on a non-finite final loss).
"""

from __future__ import annotations

import pytest

from metaprior.cli import main

EXPERIMENTS = [
    "harmonic",
    "sinusoid-maml",
    "sinusoid-llama",
    "omniglot-maml",
    "omniglot-llama",
    "omniglot-amortized",
    "sib-omniglot",
    "dwp-mnist",
]
NEEDS_DATA = {"omniglot-maml", "omniglot-llama", "omniglot-amortized", "sib-omniglot", "dwp-mnist"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_nan_at_step_0_stops_the_run(name, tmp_path, monkeypatch, capsys, request):
    if name in NEEDS_DATA:
        data = request.getfixturevalue("shared_data_dir")  # skips where ../shared/data is absent
        monkeypatch.setenv("METAPRIOR_DATA", str(data))
    monkeypatch.setenv("METAPRIOR_TEST_NAN_AT_STEP", "0")
    status = main(["run", name, "--quick", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 3, err
    assert f"metaprior: {name}:" in err and "loss became nan at step 0" in err
    assert "last good checkpoint" in err or "no checkpoint was written" in err
    assert not (tmp_path / "metrics.json").exists()


def test_nan_after_a_checkpoint_names_it(tmp_path, monkeypatch, capsys):
    """Harmonic with a checkpoint every 20 steps and a NaN at step 30: the message names
    the checkpoint file and step 20, and that checkpoint still loads."""
    from metaprior._io import read_tagged_npz
    from metaprior.inference.meta import _FORMAT

    monkeypatch.setenv("METAPRIOR_TEST_NAN_AT_STEP", "30")
    status = main(
        ["run", "harmonic", "--quick", "--no-progress", "--set", "checkpoint_every=20", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert status == 3, err
    assert "at step 30" in err and f"{tmp_path / 'meta_kl.ckpt'} (step 20) is intact" in err
    assert read_tagged_npz(tmp_path / "meta_kl.ckpt", _FORMAT, label="checkpoint")["__losses__"].size == 20
