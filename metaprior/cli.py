"""Command line: ``metaprior list`` and ``metaprior run NAME``.

Each run writes into ``--out DIR``: ``metrics.json`` (flat keys, documented in the
README), PNG plots, and the posterior as an ArviZ netCDF file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def _parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _coerce(field_type, current, raw: str):
    """Convert ``raw`` to the type of the config field's current value."""
    if isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, tuple):
        items = [s.strip() for s in raw.split(",") if s.strip()]
        elem = current[0] if current else raw
        if isinstance(elem, tuple):  # a tuple of tuples: "5x1,20x1" is ((5, 1), (20, 1))
            return tuple(tuple(_coerce(None, elem[0], p) for p in s.split("x")) for s in items)
        return tuple(_coerce(None, elem, s) for s in items)
    return raw


def _check_out(out: Path) -> str | None:
    """Why ``out`` cannot be the output folder, or ``None``: it (or its nearest existing
    ancestor) must be a writable folder."""
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaprior", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the experiments")
    p_list.add_argument("-v", "--verbose", action="store_true", help="also show metrics keys")
    p_run = sub.add_parser("run", help="run one experiment")
    p_run.add_argument("name", help="experiment name (see `metaprior list`)")
    p_run.add_argument("--out", type=Path, default=None, help="output folder (default runs/NAME)")
    p_run.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    size = p_run.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (CI, smoke test); compiled with XLA's backend optimisations off, which halves its "
        "compile-dominated time (set JAX_DISABLE_MOST_OPTIMIZATIONS=0 to keep them)",
    )
    size.add_argument("--full", action="store_true", help="paper-size run (long)")
    p_run.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p_run.add_argument(
        "--set",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (repeatable), e.g. --set num_tasks=1000",
    )
    p_run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from metaprior.experiments import discover

    experiments = discover()
    if args.command == "list":
        width = max(len(n) for n in experiments) if experiments else 0
        for name, exp in sorted(experiments.items()):
            print(f"{name:<{width}}  {exp.description}")
            if args.verbose and exp.metrics_doc:
                for line in exp.metrics_doc.strip().splitlines():
                    print(f"{'':<{width}}    {line}")
        return 0

    if args.name not in experiments:
        known = ", ".join(sorted(experiments))
        print(f"metaprior: unknown experiment {args.name!r}; known: {known}", file=sys.stderr)
        return 2
    exp = experiments[args.name]
    size = "quick" if args.quick else "full" if args.full else "default"
    config = exp.make_config(size)
    overrides = dict(args.set)
    if args.steps is not None:
        if args.steps < 1:
            print(f"metaprior: --steps must be >= 1, got {args.steps}", file=sys.stderr)
            return 2
        overrides["num_steps"] = str(args.steps)
    if overrides:
        fields = {f.name: f for f in dataclasses.fields(config)}
        changes = {}
        for key, raw in overrides.items():
            if key not in fields:
                opt = "--steps" if key == "num_steps" else f"--set {key}"
                print(
                    f"metaprior: {opt}: experiment {args.name!r} has no config field {key!r}; "
                    f"fields: {', '.join(fields)}",
                    file=sys.stderr,
                )
                return 2
            try:
                changes[key] = _coerce(fields[key].type, getattr(config, key), raw)
            except ValueError as err:
                print(f"metaprior: --set {key}={raw}: {err}", file=sys.stderr)
                return 2
            current = getattr(config, key)
            counts = key.startswith("num_") or key.endswith(("_steps", "_tasks"))
            if counts and type(current) is int and current >= 1 and changes[key] < 1:
                print(f"metaprior: --set {key}={raw}: {key} is a count and must be >= 1", file=sys.stderr)
                return 2
        config = dataclasses.replace(config, **changes)
    if args.no_progress:
        os.environ["METAPRIOR_PROGRESS"] = "0"

    import jax

    unoptimised = size == "quick" and "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ
    previous = jax.config.read("jax_disable_most_optimizations")
    if unoptimised:
        # a tiny run is mostly compilation: XLA's backend optimisations cost more than they
        # save there (benchmarks/README.md, "--quick run times: optimisations off"); the
        # setting is restored when the run ends, for in-process callers
        jax.config.update("jax_disable_most_optimizations", True)
    try:
        return _run(exp, args, size, config)
    finally:
        if unoptimised:
            jax.config.update("jax_disable_most_optimizations", previous)


def _remove_if_empty(out: Path, created: bool) -> None:
    """A run that failed before writing anything leaves no folder behind."""
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _run(exp, args, size: str, config) -> int:
    """Run one experiment into ``--out`` and write its metrics: the CLI's exit status."""
    import jax

    from metaprior.experiments._common import write_metrics

    out = args.out if args.out is not None else Path("runs") / args.name
    problem = _check_out(out)
    if problem:
        print(f"metaprior: --out {out}: {problem}", file=sys.stderr)
        return 2
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    print(f"metaprior run {args.name} ({size}) -> {out}", file=sys.stderr)
    start = time.perf_counter()
    from metaprior.experiments import ConfigError
    from metaprior.inference.meta import NonFiniteLossError

    try:
        metrics = dict(exp.run(jax.random.key(args.seed), config, out))
    except (ConfigError, NonFiniteLossError) as err:
        _remove_if_empty(out, created)
        print(f"metaprior: {args.name}: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 3
    except BaseException:
        _remove_if_empty(out, created)
        raise
    metrics.setdefault("wall_time_s", time.perf_counter() - start)
    metrics.setdefault("seed", args.seed)
    metrics.setdefault("size", size)
    write_metrics(out / "metrics.json", metrics)
    print(f"wrote {out / 'metrics.json'} ({len(metrics)} keys)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
