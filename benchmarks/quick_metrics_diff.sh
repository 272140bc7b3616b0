#!/usr/bin/env bash
# Every experiment's --quick metrics.json from an old checkout and from this tree, same seed,
# compared key by key (timing keys left out): the refactoring check of issue 18.
#   git worktree add /tmp/old <commit> && benchmarks/quick_metrics_diff.sh /tmp/old
# Writes benchmarks/results/quick_metrics_diff.json. Needs ../shared/data (METAPRIOR_DATA).
set -uo pipefail
old=${1:?usage: benchmarks/quick_metrics_diff.sh OLD_CHECKOUT}
new=$(cd "$(dirname "$0")/.." && pwd)
export METAPRIOR_DATA=${METAPRIOR_DATA:-$new/../shared/data} METAPRIOR_PROGRESS=0
work=$(mktemp -d)
names="harmonic sinusoid-maml sinusoid-llama omniglot-maml omniglot-llama omniglot-amortized sib-omniglot dwp-mnist validate"
for side in old new; do
  root=$old; [ "$side" = new ] && root=$new
  mkdir -p "$work/$side"
  for name in $names; do
    out=$(mktemp -d)
    (cd "$root" && PYTHONPATH=$root "$new/.venv/bin/python" -m metaprior.cli run "$name" --quick --no-progress \
      --out "$out" >"$work/$side/$name.log" 2>&1) || echo "$side $name failed: $work/$side/$name.log"
    cp "$out/metrics.json" "$work/$side/$name.json" 2>/dev/null; ls "$out" >"$work/$side/$name.files"; rm -rf "$out"
  done
done
"$new/.venv/bin/python" - "$work" "$new/benchmarks/results/quick_metrics_diff.json" $names <<'PY'
import json, sys
work, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {}
for n in names:
    a, b = (json.load(open(f"{work}/{s}/{n}.json")) for s in ("old", "new"))
    keys = [k for k in a if "time" not in k and not k.endswith("_s")]
    differ = {k: [a[k], b.get(k)] for k in keys if b.get(k) != a[k]}
    files = [open(f"{work}/{s}/{n}.files").read().split() for s in ("old", "new")]
    rows[n] = {"compared": len(keys), "differ": differ, "added": sorted(set(b) - set(a)), "files_same": files[0] == files[1]}
    print(f"{n}: {len(keys)} keys compared, {len(differ)} differ, added {rows[n]['added']}")
json.dump({"benchmark": "quick_metrics_diff", "rows": rows}, open(dest, "w"), indent=1)
PY
