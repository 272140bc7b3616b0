"""Compile time of every experiment's ``--quick`` run, XLA's backend optimisations on and off.

Each run is a fresh process (no in-memory compilation cache carried over, and the
persistent cache is off) that runs ``metaprior run NAME --quick`` in-process with JAX's
monitoring listeners attached, and reports the seconds JAX spent in its three compile
stages (tracing to a jaxpr, lowering to MLIR, and XLA's backend compilation) summed over
every function it compiled, next to the wall time of the run. Both settings of
``JAX_DISABLE_MOST_OPTIMIZATIONS`` back to back per experiment (``1`` is what ``--quick``
does by default since issue 17; ``0`` is the optimised build a default run compiles).

    METAPRIOR_DATA=../shared/data .venv/bin/python benchmarks/quick_compile_times.py

Writes ``benchmarks/results/quick_compile_times.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
}

CHILD = """
import json, sys, time, tempfile, collections
import jax
totals = collections.Counter(); counts = collections.Counter()
def listen(event, duration, **kw):
    totals[event] += duration; counts[event] += 1
jax.monitoring.register_event_duration_secs_listener(listen)
from metaprior.cli import main
t = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    rc = main(["run", sys.argv[1], "--quick", "--no-progress", "--out", out])
wall = time.perf_counter() - t
print("RESULT " + json.dumps({"rc": rc, "wall_s": wall, "totals": dict(totals), "counts": dict(counts)}))
"""


def run_one(name: str, disable: int) -> dict:
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS=str(disable), METAPRIOR_PROGRESS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} (disable={disable}) failed:\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT ") :])
    row = {
        "experiment": name,
        "disable_most_optimizations": disable,
        "process_s": process_s,
        "run_wall_s": res["wall_s"],
    }
    for event, key in EVENTS.items():
        row[key] = res["totals"].get(event, 0.0)
    row["compiles"] = res["counts"].get("/jax/core/compile/backend_compile_duration", 0)
    row["compile_s"] = row["trace_s"] + row["lower_s"] + row["backend_compile_s"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", nargs="+", default=None, help="experiments (default: every registered one)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "quick_compile_times.json")
    a = p.parse_args(argv)
    if a.names is None:
        from metaprior.experiments import discover

        a.names = sorted(discover())
    rows = []
    for name in a.names:
        for disable in (0, 1):
            row = run_one(name, disable)
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    lines = [
        "| experiment | compile, optimised (s) | compile, --quick now (s) | ratio "
        "| wall, optimised (s) | wall, now (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    tot = {0: [0.0, 0.0], 1: [0.0, 0.0]}
    for name in a.names:
        on, off = (
            next(r for r in rows if r["experiment"] == name and r["disable_most_optimizations"] == d) for d in (0, 1)
        )
        for d, r in ((0, on), (1, off)):
            tot[d][0] += r["compile_s"]
            tot[d][1] += r["process_s"]
        lines.append(
            f"| {name} | {on['compile_s']:.1f} | {off['compile_s']:.1f} | {on['compile_s'] / off['compile_s']:.2f} "
            f"| {on['process_s']:.1f} | {off['process_s']:.1f} |"
        )
    lines.append(
        f"| total | {tot[0][0]:.0f} | {tot[1][0]:.0f} | {tot[0][0] / tot[1][0]:.2f} "
        f"| {tot[0][1]:.0f} | {tot[1][1]:.0f} |"
    )
    print("\n".join(lines))
    result = {
        "benchmark": "quick_compile_times",
        "rows": rows,
        "table": lines,
        "machine": f"{platform.machine()} {platform.processor()} ({os.cpu_count()} cores)".strip(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
