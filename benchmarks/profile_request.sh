#!/usr/bin/env bash
# Profile one N = 1 request on a base checkout ("before") and this one ("after"), config by config in
# turns, then write benchmarks/results/profile_request.md comparing them.
#   bash benchmarks/profile_request.sh /path/to/base-checkout [tokens] [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=$1; TOKENS=${2:-64}; RUNS=${3:-3}
PY=${PY:-.venv/bin/python}
rm -f benchmarks/results/profile_request_before.json benchmarks/results/profile_request_after.json
for config in sampled-async greedy-async sampled-sync; do
    PYTHONPATH= "$PY" benchmarks/profile_request.py --root "$BASE" --label before --append \
        --configs "$config" --tokens "$TOKENS" --runs "$RUNS"
    PYTHONPATH= "$PY" benchmarks/profile_request.py --label after --append \
        --configs "$config" --tokens "$TOKENS" --runs "$RUNS"
done
"$PY" benchmarks/profile_request.py --compare before after
