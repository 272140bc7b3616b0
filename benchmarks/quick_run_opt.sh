#!/usr/bin/env bash
# Wall time of every experiment's --quick run from the CLI with XLA's backend optimisations
# on (JAX_DISABLE_MOST_OPTIMIZATIONS=0) and off (=1, what --quick now does by default),
# back to back per experiment. One JSON line per run on stdout.
#   benchmarks/quick_run_opt.sh > /tmp/qt.log
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export METAPRIOR_DATA=${METAPRIOR_DATA:-$root/../shared/data} METAPRIOR_PROGRESS=0
cd "$root"
for name in harmonic sinusoid-maml sinusoid-llama omniglot-maml omniglot-llama omniglot-amortized sib-omniglot dwp-mnist validate fewshot; do
  for opt in 0 1; do
    out=$(mktemp -d)
    t0=$(date +%s.%N)
    JAX_DISABLE_MOST_OPTIMIZATIONS=$opt .venv/bin/python -m metaprior.cli run "$name" --quick --no-progress --out "$out" >/dev/null 2>&1
    rc=$?
    t1=$(date +%s.%N)
    rm -rf "$out"
    echo "{\"experiment\": \"$name\", \"disable_most_optimizations\": $opt, \"rc\": $rc, \"wall_s\": $(echo "$t1 - $t0" | bc)}"
  done
done
