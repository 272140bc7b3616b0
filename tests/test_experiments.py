"""Every registered experiment runs at its --quick size and honours the output contract:
a flat metrics.json, PNG plots, and a posterior ArviZ file that az.summary can read."""

import json

import pytest

from metaprior.cli import main
from metaprior.experiments import discover

NAMES = sorted(discover())


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_the_contract(name, tmp_path, monkeypatch):
    import arviz as az
    import xarray as xr

    monkeypatch.setenv("METAPRIOR_PROGRESS", "0")
    out = tmp_path / name
    assert main(["run", name, "--quick", "--out", str(out), "--seed", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["size"] == "quick" and metrics["seed"] == 1 and metrics["wall_time_s"] > 0
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())
    assert list(out.glob("*.png")), "no plot written"
    files = sorted(out.glob("*.nc"))
    assert files, "no posterior file written"
    tree = xr.open_datatree(files[0])
    assert "posterior" in tree.children
    summary = az.summary(tree, group="posterior" if hasattr(az, "summary") else None)
    assert len(summary) > 0
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
