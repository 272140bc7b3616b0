"""Every registered experiment runs at its --quick size and honours the output contract:
a flat metrics.json, PNG plots, and a posterior ArviZ file that az.summary can read and
``load_posterior`` accepts as ours (every file carries the ``metaprior_format`` tag)."""

import json

import pytest

from metaprior.cli import main
from metaprior.experiments import discover

NAMES = sorted(discover())


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_the_contract(name, tmp_path, monkeypatch):
    import arviz as az

    from metaprior.inference.diagnostics import load_posterior

    monkeypatch.setenv("METAPRIOR_PROGRESS", "0")
    out = tmp_path / name
    assert main(["run", name, "--quick", "--out", str(out), "--seed", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["size"] == "quick" and metrics["seed"] == 1 and metrics["wall_time_s"] > 0
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())
    assert list(out.glob("*.png")), "no plot written"
    files = sorted(out.glob("*.nc"))
    assert files, "no posterior file written"
    trees = [load_posterior(f) for f in files]
    tree = trees[0]
    assert "posterior" in tree.children
    summary = az.summary(tree, group="posterior" if hasattr(az, "summary") else None)
    assert len(summary) > 0
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_harmonic_quick_metrics_contract(tmp_path, monkeypatch):
    """The harmonic run's metrics: every documented key for every support size, intervals
    non-negative, ``kl_beats_nokl_mse_all_n`` and ``kl_gap_above_zero_small_n`` exactly the
    conjunctions of the per-N comparisons they summarise, and the small sizes scored by prior
    importance sampling (an ESS, no restarts) while the others are fitted."""
    from metaprior.experiments.harmonic import make_config

    monkeypatch.setenv("METAPRIOR_PROGRESS", "0")
    out = tmp_path / "harmonic"
    assert main(["run", "harmonic", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sizes = make_config("quick").support_sizes
    for tag in ("kl", "nokl"):
        for n in sizes:
            for key in (f"mse_{tag}_n{n}", f"nll_{tag}_n{n}"):
                assert isinstance(metrics[key], float), key
                assert metrics[key + "_ci95"] >= 0, key
            assert metrics[f"mse_{tag}_n{n}"] >= 0
        for key in (f"train_time_{tag}_s", f"eval_time_{tag}_s", f"final_loss_{tag}"):
            assert key in metrics
    expected = float(all(metrics[f"mse_kl_n{n}"] < metrics[f"mse_nokl_n{n}"] for n in sizes))
    assert metrics["kl_beats_nokl_mse_all_n"] == expected
    # N = 1 is scored by prior importance sampling (exact_support=1), N = 8 by fitted guides
    config = make_config("quick")
    small = [n for n in sizes if n <= config.exact_support]
    assert small == [1] and all(metrics[f"tasks_n{n}"] == config.eval_tasks for n in sizes)
    assert 1 <= metrics["is_ess_kl_n1"] <= config.exact_draws and "restart_ess_kl_n1" not in metrics
    assert "restart_ess_kl_n8" in metrics
    expected = float(all(metrics[f"mse_gap_n{n}"] > metrics[f"mse_gap_n{n}_ci95"] for n in small))
    assert metrics["kl_gap_above_zero_small_n"] == expected
    # the control-variate intervals: finite, and the "apart" flags are exactly their comparison
    for n in sizes:
        hi = metrics[f"mse_kl_n{n}_cv"] + metrics[f"mse_kl_n{n}_cv_ci95"]
        lo = metrics[f"mse_nokl_n{n}_cv"] - metrics[f"mse_nokl_n{n}_cv_ci95"]
        assert metrics[f"mse_cv_apart_n{n}"] == float(hi < lo) and metrics[f"mse_zero_n{n}"] > 0
    assert metrics["kl_intervals_apart_small_n"] == float(all(metrics[f"mse_cv_apart_n{n}"] for n in small))
    assert (out / "meta_kl.ckpt").exists() and (out / "meta_nokl.ckpt").exists()
