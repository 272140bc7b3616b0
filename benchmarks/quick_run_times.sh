#!/usr/bin/env bash
# Wall time of every experiment's --quick run (mostly XLA compilation), an old commit
# and the working tree back to back per experiment, on the same machine:
#   git worktree add /tmp/old <commit> && benchmarks/quick_run_times.sh /tmp/old
# Writes benchmarks/results/quick_run_times.json. Needs ../shared/data (METAPRIOR_DATA).
set -uo pipefail
old=${1:?usage: benchmarks/quick_run_times.sh OLD_CHECKOUT}
new=$(cd "$(dirname "$0")/.." && pwd)
export METAPRIOR_DATA=${METAPRIOR_DATA:-$new/../shared/data} METAPRIOR_PROGRESS=0
rows=()
for name in harmonic sinusoid-maml sinusoid-llama omniglot-maml omniglot-llama omniglot-amortized sib-omniglot dwp-mnist validate; do
  for side in old new; do
    root=$old; [ "$side" = new ] && root=$new
    out=$(mktemp -d)
    t0=$(date +%s.%N)
    (cd "$root" && PYTHONPATH=$root "$new/.venv/bin/python" -m metaprior.cli run "$name" --quick --no-progress --out "$out" >/dev/null 2>&1)
    rc=$?
    t1=$(date +%s.%N)
    rm -rf "$out"
    rows+=("{\"experiment\": \"$name\", \"side\": \"$side\", \"rc\": $rc, \"wall_s\": $(echo "$t1 - $t0" | bc)}")
    echo "${rows[-1]}"
  done
done
(IFS=,; echo "{\"benchmark\": \"quick_run_times\", \"old\": \"$(git -C "$old" rev-parse --short HEAD)\", \"new\": \"$(git -C "$new" rev-parse --short HEAD)\", \"rows\": [${rows[*]}]}") \
  > "$new/benchmarks/results/quick_run_times.json"
