#!/usr/bin/env bash
# Schemathesis in positive mode over the real server's OpenAPI document: every generated valid
# request must get a non-5xx answer (check not_a_server_error). The server runs the default model
# with a short context (--max-model-len 256) so each generated request ends in seconds; the run is
# bounded by FUZZ_MAX_TIME seconds (default 300). Needs schemathesis (`pip install schemathesis`,
# done by `make fuzz-api`). Exit status: schemathesis's (non-zero on any server error).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MAX_TIME=${FUZZ_MAX_TIME:-300}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlx-loom-fuzz.XXXXXX")
PORT=$("$VENV/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$VENV/bin/mlx-loom" serve --host 127.0.0.1 --port "$PORT" --max-model-len 256 >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 360); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { tail -n 40 "$WORK/server.log"; exit 1; }
    sleep 0.5
done
set +e
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/openapi.json" --mode positive \
    --checks not_a_server_error --max-time "$MAX_TIME" --request-timeout 120 --workers 1 \
    --seed "${FUZZ_SEED:-1}" --suppress-health-check all
STATUS=$?
set -e
echo "server log, errors only:"
grep -E "ERROR|Traceback" "$WORK/server.log" | head -n 40 || echo "(none)"
exit $STATUS
