"""The command line: listing, argument errors, config overrides."""

import dataclasses

from metaprior.cli import main
from metaprior.experiments import discover


def test_list_shows_every_experiment(capsys):
    assert main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    for name in discover():
        assert name in out
    assert "mse_{kl,nokl}_n{N}" in out  # metrics keys are documented


def test_unknown_experiment(capsys):
    assert main(["run", "no-such-thing", "--quick"]) == 2
    assert "unknown experiment 'no-such-thing'" in capsys.readouterr().err


def test_unknown_config_field(capsys, tmp_path):
    assert main(["run", "harmonic", "--quick", "--out", str(tmp_path), "--set", "nope=1"]) == 2
    assert "no config field 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_bad_override_value(capsys, tmp_path):
    assert main(["run", "harmonic", "--quick", "--out", str(tmp_path), "--set", "num_tasks=many"]) == 2
    assert "--set num_tasks=many" in capsys.readouterr().err


def test_every_experiment_has_three_sizes_with_num_steps():
    for name, exp in discover().items():
        for size in ("quick", "default", "full"):
            config = exp.make_config(size)
            assert dataclasses.is_dataclass(config), name
            assert "num_steps" in {f.name for f in dataclasses.fields(config)}, name


def test_override_coerces_to_the_field_type():
    from metaprior.cli import _coerce

    assert _coerce(None, ((5, 1), (20, 1)), "5x5, 20x1") == ((5, 5), (20, 1))
    assert _coerce(None, ("a", "b"), "maml,llama") == ("maml", "llama")
    assert _coerce(None, (1.0,), "10,100.5") == (10.0, 100.5)
    assert _coerce(None, True, "off") is False
