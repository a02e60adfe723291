#!/usr/bin/env bash
# CI check of the Docker image's install steps, without a Docker engine:
#   1. builds the image's source tree in a temp dir from this checkout, filtered by .dockerignore
#      (so a file the install needs but the build context leaves out fails here);
#   2. runs scripts/docker_install.sh (what the Dockerfile RUNs) into a FRESH venv in that temp dir,
#      and checks that the native kernels it builds load there (unless MLX_LOOM_NATIVE_BUILD=0);
#   3. checks that every dependency resolves to a binary wheel for linux/arm64 too (pip dry run);
#   4. runs the Dockerfile's HEALTHCHECK command (must fail: nothing listens yet), starts
#      `mlx-loom serve` from the fresh venv on a free loopback port, waits for /health 200, runs the
#      HEALTHCHECK command again (must pass), sends one chat completion (200 with content);
#   5. stops the server and deletes the temp dir (also on failure).
# Env: PYTHON (interpreter for the venv, default python3), HEALTH_TIMEOUT (seconds, default 180),
# SKIP_ARM64_RESOLVE=1 to skip step 3.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CHECK_NAME=docker
# shellcheck source=scripts/serve_check.sh
source scripts/serve_check.sh  # PYTHON, HEALTH_TIMEOUT, T0, WORK (removed on exit), step / fail

grep -q 'scripts/docker_install.sh' Dockerfile || fail "Dockerfile does not RUN scripts/docker_install.sh"

step "build context from .dockerignore -> $WORK/src"
"$PYTHON" - "$REPO" "$WORK/src" <<'EOF'
"""Copy the Docker build context: every file under the repo that .dockerignore does not exclude.

Docker's rules: patterns in order, the last one matching a path or one of its parent directories
decides; `!` re-includes; `*` and `?` stay within one path segment, `**` spans segments."""
import os, re, shutil, sys

repo, dest = sys.argv[1], sys.argv[2]

def to_regex(pat):
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pat[i] == "[" and "]" in pat[i + 1:]:
            j = pat.index("]", i + 1)
            cls = pat[i + 1:j]
            out, i = out + "[" + ("^" + cls[1:] if cls.startswith("!") else cls) + "]", j + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out + r"\Z")

rules = []
for line in open(os.path.join(repo, ".dockerignore")):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    neg = line.startswith("!")
    pat = os.path.normpath(line[1:] if neg else line).lstrip("/")
    rules.append((neg, pat, to_regex(pat)))

def excluded(rel):
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    verdict = False
    for neg, _, rx in rules:
        if any(rx.match(p) for p in prefixes):
            verdict = not neg
    return verdict

def may_reinclude_below(rel):
    return any(neg and ("*" in pat or pat.startswith(rel + "/")) for neg, pat, _ in rules)

copied = 0
for root, dirs, files in os.walk(repo):
    rel_root = os.path.relpath(root, repo).replace(os.sep, "/")
    rel_root = "" if rel_root == "." else rel_root + "/"
    dirs[:] = [d for d in dirs
               if not (excluded(rel_root + d) and not may_reinclude_below(rel_root + d))]
    for name in files:
        rel = rel_root + name
        if not excluded(rel):
            os.makedirs(os.path.join(dest, rel_root), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(dest, rel))
            copied += 1
print(f"{copied} files in the build context")
EOF

step "scripts/docker_install.sh into a fresh venv ($WORK/venv)"
T_INSTALL=$(date +%s)
PYTHON="$PYTHON" bash "$WORK/src/scripts/docker_install.sh" "$WORK/venv"
INSTALL_S=$(( $(date +%s) - T_INSTALL ))
VPY="$WORK/venv/bin/python"
(cd "$WORK" && "$VPY" -c "import mlx_loom, sys; sys.exit(0 if mlx_loom.__file__.startswith('$WORK/venv/') else 1)") \
    || fail "the venv imports 'mlx_loom' from outside itself (not a non-editable install?)"
if [ "${MLX_LOOM_NATIVE_BUILD:-1}" != 0 ]; then
    step "the native CPU kernels the image claims are built and load"
    (cd "$WORK" && "$VPY" -c "import sys, mlx_loom.kernels; from mlx_loom.kernels import qmm; \
print(qmm.describe()); sys.exit(0 if qmm.native_available() else 1)") \
        || fail "the installed package has no working native kernels"
fi

if [ "${SKIP_ARM64_RESOLVE:-0}" != 1 ]; then
    step "every dependency has a linux/arm64 cp311 wheel (glibc <= 2.36, as in bookworm)"
    PLATFORMS=(--platform manylinux2014_aarch64)
    for v in 17 27 28 31 34 35 36; do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
    "$VPY" -m pip install -q --dry-run --ignore-installed --only-binary=:all: \
        --python-version 3.11 --implementation cp "${PLATFORMS[@]}" \
        --target "$WORK/arm64-target" "$WORK/src" \
        || fail "some dependency has no linux/arm64 wheel: the arm64 image would not build"
fi

PORT=$(free_port)
HEALTHCHECK_CMD=$("$PYTHON" - <<'EOF'
import json, re, shlex
text = re.sub(r"\\\n", " ", open("Dockerfile").read())
line = next(l for l in text.splitlines() if l.startswith("HEALTHCHECK"))
cmd = line.split(" CMD ", 1)[1].strip()
print(shlex.join(json.loads(cmd)) if cmd.startswith("[") else cmd)  # exec form or shell form
EOF
)
run_healthcheck() { (cd "$WORK" && PATH="$WORK/venv/bin:$PATH" MLX_LOOM_PORT=$PORT sh -c "$HEALTHCHECK_CMD") >/dev/null 2>&1; }
run_healthcheck && fail "the Dockerfile HEALTHCHECK passes with no server on port $PORT"

step "mlx-loom serve from the fresh venv on 127.0.0.1:$PORT"
T_SERVE=$(date +%s)
start_server "$WORK/venv" "$PORT"
wait_healthy "$PORT" "$HEALTH_TIMEOUT"
HEALTHY_S=$(( $(date +%s) - T_SERVE ))
step "/health 200 after ${HEALTHY_S}s"
run_healthcheck || fail "the Dockerfile HEALTHCHECK fails against a healthy server"

chat_once "$PORT"
stop_server_checked
step "OK: install ${INSTALL_S}s, /health 200 after ${HEALTHY_S}s; total $(( $(date +%s) - T0 ))s"
