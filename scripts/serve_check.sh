# Shared by the install checks (check_docker_install.sh, check_wheel_install.sh); source it from
# the repository root after setting CHECK_NAME. It sets PYTHON (default python3), HEALTH_TIMEOUT
# (default 180 s), T0 and WORK (a temp dir, removed on exit with any server still running), and
# defines: step / fail (log lines), start_server, wait_healthy, chat_once, stop_server_checked.
PYTHON=${PYTHON:-python3}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-180}
T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlx-loom-$CHECK_NAME-check.XXXXXX")
SERVER_PID=""

step() { echo "== $(basename "$0") [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "$(basename "$0"): FAILED: $*" >&2; [ -f "$WORK/server.log" ] && tail -n 40 "$WORK/server.log" >&2; exit 1; }

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$SERVER_PID" 2>/dev/null && { kill -KILL "$SERVER_PID" 2>/dev/null || true; return 1; }
    fi
    SERVER_PID=""
}

cleanup() {
    stop_server || true
    rm -rf "$WORK"
    step "temp dir removed"
}

free_port() { "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# start_server VENV PORT: `VENV/bin/mlx-loom serve` on 127.0.0.1:PORT, started from $WORK so nothing
# from a checkout can shadow the installed package; the default model (MLX_LOOM_MODEL unset).
start_server() {
    (cd "$WORK" && exec env -u MLX_LOOM_MODEL "$1/bin/mlx-loom" serve --host 127.0.0.1 --port "$2" \
        >"$WORK/server.log" 2>&1) &
    SERVER_PID=$!
}

# wait_healthy PORT TIMEOUT_S: until /health answers 200 (fails if the server exits first).
wait_healthy() {
    "$PYTHON" - "$1" "$2" "$SERVER_PID" <<'PYEOF' || fail "/health did not answer 200"
import os, sys, time, urllib.error, urllib.request
port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
last = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"server exited before /health answered 200 (last: {last})")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
            last = r.status
    except urllib.error.HTTPError as e:
        last = e.code
    except OSError as e:
        last = repr(e)
    time.sleep(1)
sys.exit(f"/health not 200 after {timeout:.0f} s (last: {last})")
PYEOF
}

# chat_once PORT: one greedy chat completion must answer 200 with non-empty content.
chat_once() {
    "$PYTHON" - "$1" <<'PYEOF' || fail "chat completion"
import json, sys, urllib.request
port = int(sys.argv[1])
body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    status, out = r.status, json.load(r)
content = out["choices"][0]["message"]["content"]
assert status == 200 and isinstance(content, str) and content.strip(), (status, out)
print(f"chat completion 200 from {out['model']}: {content!r}")
PYEOF
}

# stop_server_checked: SIGTERM must end the server within 15 s.
stop_server_checked() {
    stop_server || fail "server still running 15 s after SIGTERM"
}

trap cleanup EXIT
