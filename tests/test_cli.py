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


_QUICK_FLAG = """
import sys, jax
import metaprior.cli as cli
seen, run = [], cli._run
def spy(*args):
    seen.append(jax.config.read("jax_disable_most_optimizations"))
    return run(*args)
cli._run = spy
assert cli.main(["run", "sinusoid-maml", "--quick", "--no-progress", "--out", sys.argv[1]]) == 0
print(seen[0], jax.config.read("jax_disable_most_optimizations"))
"""


def test_quick_runs_compile_without_backend_optimisations_unless_asked(tmp_path):
    """``--quick`` turns XLA's backend optimisations off for its compile-bound tiny run and
    restores the setting afterwards (in-process callers); an explicit
    JAX_DISABLE_MOST_OPTIMIZATIONS (here 0) is left as the user set it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    seen = {}
    for label, extra in (("unset", {}), ("zero", {"JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})):
        proc = subprocess.run(
            [sys.executable, "-c", _QUICK_FLAG, str(tmp_path / label)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[label] = proc.stdout.strip().splitlines()[-1]
    assert seen == {"unset": "True False", "zero": "False False"}
