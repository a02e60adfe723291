#!/usr/bin/env bash
# CI check of the Docker image itself: the real Dockerfile built, the container run as shipped.
#   1. a Docker engine: Debian's docker.io (apt-get, as root, when dockerd is missing); dockerd is
#      started here when none answers, and stopped again at the end;
#   2. the base image: the Dockerfile's default PYTHON_IMAGE when it is present or can be pulled,
#      else a local Debian bookworm base (debootstrap from the host's configured Debian mirror, plus
#      python3, python3-venv, python3-dev, and the host's extra CA certificates from
#      /usr/local/share/ca-certificates, which pip then uses), imported with `docker import` as
#      $BASE_TAG and kept there for the next run (reused as long as the engine keeps the tag);
#   3. `docker build` of the Dockerfile (build-arg PYTHON_IMAGE only where the default cannot be had);
#   4. `docker run` with no options beyond a published port: the image's own user, entrypoint and
#      HEALTHCHECK; waits for Docker's health status `healthy` (fails on `unhealthy` or an exit);
#   5. one chat completion (200 with content); the server's process (pid 1) must not run as root;
#   6. removes the container (also on failure; its logs and health log are printed on failure).
# Prints the build, /health-ready and Docker-healthy times.
# Env: IMAGE (tag built, default mlx-loom:ci), BASE_TAG (default mlx-loom-ci-base:bookworm-2),
# DEBIAN_MIRROR (default: the first Debian mirror in /etc/apt/sources.list*), HEALTHY_TIMEOUT
# (seconds, default 420), PULL_TIMEOUT (seconds for `docker pull`, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-mlx-loom:ci}
BASE_TAG=${BASE_TAG:-mlx-loom-ci-base:bookworm-2}  # bump the suffix when build_local_base changes
HEALTHY_TIMEOUT=${HEALTHY_TIMEOUT:-420}
PULL_TIMEOUT=${PULL_TIMEOUT:-60}
NAME=mlx-loom-ci-$$
T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mlx-loom-image-check.XXXXXX")
DOCKERD_PID=""
CONTAINER=""

step() { echo "== $(basename "$0") [$(( $(date +%s) - T0 ))s] $*"; }
fail() {
    echo "$(basename "$0"): FAILED: $*" >&2
    if [ -n "$CONTAINER" ]; then
        docker logs --tail 40 "$CONTAINER" >&2 2>&1 || true
        docker inspect -f '{{json .State.Health}}' "$CONTAINER" >&2 2>/dev/null || true
    fi
    exit 1
}
cleanup() {
    [ -n "$CONTAINER" ] && { docker rm -f "$CONTAINER" >/dev/null 2>&1 || true; step "container $CONTAINER removed"; }
    if [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        step "dockerd (pid $DOCKERD_PID, started here) stopped"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

as_root_apt() {  # as_root_apt PKG...: install Debian packages (root only)
    [ "$(id -u)" = 0 ] || fail "missing $*; install them (apt-get install $*) or run as root"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

start_engine() {
    command -v dockerd >/dev/null 2>&1 || { step "installing Debian's docker.io"; as_root_apt docker.io; }
    if docker info >/dev/null 2>&1; then
        step "using the running Docker engine"
        return
    fi
    step "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
    tail -n 20 "$WORK/dockerd.log" >&2
    fail "dockerd did not answer within 60 s"
}

debian_mirror() {
    [ -n "${DEBIAN_MIRROR:-}" ] && { echo "$DEBIAN_MIRROR"; return; }
    { grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* || true; } \
        | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ' \
        | grep . || echo http://deb.debian.org/debian
}

build_local_base() {
    command -v debootstrap >/dev/null 2>&1 || { step "installing debootstrap"; as_root_apt debootstrap; }
    local mirror root
    mirror=$(debian_mirror)
    root="$WORK/rootfs"
    step "debootstrap bookworm from $mirror (+ python3, python3-venv, python3-dev)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,passwd,ca-certificates \
        bookworm "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    # The host's own CAs (e.g. a TLS-intercepting egress proxy's) so pip in the build reaches PyPI as the
    # host does; pip and requests are pointed at the system bundle (pip's vendored one lacks them).
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates in the base"
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    local bundle=/etc/ssl/certs/ca-certificates.crt
    tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' -c "ENV SSL_CERT_FILE=$bundle" \
        -c "ENV PIP_CERT=$bundle" -c "ENV REQUESTS_CA_BUNDLE=$bundle" - "$BASE_TAG" >/dev/null \
        || fail "docker import"
}

# base_image: prints the PYTHON_IMAGE to build on, or nothing for the Dockerfile's default.
base_image() {
    local default
    default=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
    if docker image inspect "$default" >/dev/null 2>&1 \
            || timeout "$PULL_TIMEOUT" docker pull -q "$default" >/dev/null 2>&1; then
        step "base: $default (the Dockerfile's default)" >&2
    elif docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
        step "base: $default cannot be pulled; reusing the local $BASE_TAG" >&2
        echo "$BASE_TAG"
    else
        step "base: $default cannot be pulled; building $BASE_TAG" >&2
        build_local_base >&2
        echo "$BASE_TAG"
    fi
}

build_image() {
    local base=$1 args=()
    [ -n "$base" ] && args+=(--build-arg "PYTHON_IMAGE=$base")
    # The classic builder where BuildKit (buildx) is missing, as with Debian's docker.io.
    docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
    step "docker build -t $IMAGE ${args[*]} . (log: tail on failure)"
    local t=$(date +%s) previous
    previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    docker build --force-rm "${args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log" >&2; fail "docker build"; }
    BUILD_S=$(( $(date +%s) - t ))
    step "built $IMAGE in ${BUILD_S}s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
    # the previous build of this tag, now untagged (kept if a container still uses it)
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
}

# wait_healthy: polls /health from the host (ready time) and Docker's own health status.
wait_healthy() {
    local t=$(date +%s) status ready=""
    while :; do
        if [ -z "$ready" ] && curl -fs -o /dev/null "http://127.0.0.1:$PORT/health"; then
            ready=$(( $(date +%s) - t ))
            step "/health 200 after ${ready}s (Docker's check runs every 30 s)"
        fi
        status=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$CONTAINER")
        case "$status" in
            "running healthy") break ;;
            "running unhealthy") fail "Docker marks the container unhealthy" ;;
            running*) ;;
            *) fail "container is $status" ;;
        esac
        [ $(( $(date +%s) - t )) -lt "$HEALTHY_TIMEOUT" ] || fail "not healthy after ${HEALTHY_TIMEOUT}s ($status)"
        sleep 2
    done
    HEALTHY_S=$(( $(date +%s) - t ))
    READY_S=${ready:-$HEALTHY_S}
    step "Docker health status: healthy after ${HEALTHY_S}s"
}

chat_once() {
    local out
    out=$(curl -fsS --max-time 120 "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}') \
        || fail "chat completion request"
    python3 - "$out" <<'PYEOF' || fail "chat completion answer: $out"
import json, sys
out = json.loads(sys.argv[1])
content = out["choices"][0]["message"]["content"]
assert isinstance(content, str) and content.strip(), out
print(f"chat completion 200 from {out['model']}: {content!r}")
PYEOF
}

check_not_root() {
    local uid
    uid=$(docker exec "$CONTAINER" python -c "import os; print(os.stat('/proc/1').st_uid)") || fail "docker exec"
    [ "$uid" != 0 ] || fail "the server (pid 1) runs as root"
    step "the server (pid 1) runs as uid $uid, not root"
}

command -v curl >/dev/null 2>&1 || as_root_apt curl
start_engine
BASE=$(base_image)
build_image "$BASE"
PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
step "docker run -d -p 127.0.0.1:$PORT:8000 $IMAGE (as shipped)"
CONTAINER=$(docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" "$IMAGE") || fail "docker run"
CONTAINER=$NAME
wait_healthy
chat_once
check_not_root
step "OK: build ${BUILD_S}s, /health 200 after ${READY_S}s, healthy after ${HEALTHY_S}s; total $(( $(date +%s) - T0 ))s"
