#!/usr/bin/env bash
# The base images of the stack, on a host that cannot pull them: pull the official images when a
# registry answers, else build stand-ins from Debian's packages (debootstrap + `docker import`).
#
#   deploy/stack/base-images.sh            # prints PYTHON_IMAGE=... and REDIS_IMAGE=... to use
#
# Stand-ins (air-gapped build farms, CI without a registry):
#   xmr-standin/python:3.11-bookworm   Debian bookworm minbase + python3 (3.11) + venv + CA certificates
#   xmr-standin/redis:7-bookworm       Debian bookworm minbase + Debian's redis-server, user redis, /data
# Both come from the Debian mirror in MIRROR (default deb.debian.org); debs are cached in
# CACHE_DIR between runs. The python stand-in trusts the host's local CAs
# (/usr/local/share/ca-certificates), so that pip works in builds behind a TLS-intercepting
# proxy. Needs root (debootstrap) and a running Docker engine.
set -euo pipefail

PYTHON_OFFICIAL="${PYTHON_OFFICIAL:-python:3.11-slim-bookworm}"
REDIS_OFFICIAL="${REDIS_OFFICIAL:-redis:7.4-alpine}"
PYTHON_STANDIN="${PYTHON_STANDIN:-xmr-standin/python:3.11-bookworm}"
REDIS_STANDIN="${REDIS_STANDIN:-xmr-standin/redis:7-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${CACHE_DIR:-/var/cache/xmr-debootstrap}"
PULL_TIMEOUT_S="${PULL_TIMEOUT_S:-60}"

log() { echo "base-images: $*" >&2; }

have() { docker image inspect "$1" >/dev/null 2>&1; }

# pull IMAGE: true when the image is here or a registry gave it.
pull() {
    have "$1" && return 0
    timeout "$PULL_TIMEOUT_S" docker pull --quiet "$1" >/dev/null 2>&1
}

# standin NAME PACKAGES [--change ...]: debootstrap a minbase rootfs with PACKAGES, strip what a
# container never reads (docs, man pages, locales, apt lists), import it as NAME.
standin() {
    local name="$1" packages="$2"
    shift 2
    local root
    root="$(mktemp -d /var/tmp/xmr-rootfs.XXXXXX)"
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$root'" RETURN
    mkdir -p "$CACHE_DIR"
    log "building $name from Debian bookworm ($packages)"
    debootstrap --variant=minbase --include="$packages" --cache-dir="$CACHE_DIR" \
        bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || {
        tail -20 "$root.log" >&2
        rm -f "$root.log"
        return 1
    }
    rm -f "$root.log"
    # Trust what the host trusts: behind a TLS-intercepting proxy, pip in the build needs its CA.
    if [ -x "$root/usr/sbin/update-ca-certificates" ] \
        && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1
        log "$name trusts the local CAs of this host"
    fi
    if [ -x "$root/usr/bin/redis-server" ]; then
        mkdir -p "$root/data"
        chroot "$root" chown redis:redis /data
    fi
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
        "$root"/var/cache/debconf/*-old
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
        -exec rm -rf {} + 2>/dev/null || true
    tar --numeric-owner -C "$root" -c . | docker import "$@" - "$name" >/dev/null
    log "$name: $(docker image inspect --format '{{.Size}}' "$name" | awk '{printf "%.0f MB", $1/1e6}')"
}

command -v docker >/dev/null || { log "error: no docker CLI"; exit 1; }
docker info >/dev/null 2>&1 || { log "error: no Docker engine answers (deploy/stack/engine.sh start)"; exit 1; }

# image OFFICIAL STANDIN PACKAGES [--change ...]: prints the image to use: the official one where
# it is here or a registry gives it, else the stand-in (made when missing).
image() {
    local official="$1" name="$2" packages="$3"
    shift 3
    if pull "$official"; then
        echo "$official"
        return
    fi
    if ! have "$name"; then
        command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
        log "cannot pull $official: making a stand-in"
        standin "$name" "$packages" "$@"
    fi
    echo "$name"
}

python_image="$(image "$PYTHON_OFFICIAL" "$PYTHON_STANDIN" python3,python3-venv,ca-certificates \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')"
redis_image="$(image "$REDIS_OFFICIAL" "$REDIS_STANDIN" redis-server \
    --change 'USER redis' --change 'WORKDIR /data' --change 'EXPOSE 6379' \
    --change 'CMD ["redis-server", "--protected-mode", "no"]')"

echo "PYTHON_IMAGE=$python_image"
echo "REDIS_IMAGE=$redis_image"
