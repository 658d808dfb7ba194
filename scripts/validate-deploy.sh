#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker engine, no cluster needed):
#   docker-compose.yml          docker-compose config -q (docker-compose 1.29 from PyPI)
#   deploy/prometheus/*.yml     promtool check config
#   k8s/ base and overlays      rendered (resources, JSON 6902 patches, namespace) and checked
#                               with kubernetes-validate --strict; PrometheusRule == alerts.yml
# The validators live in virtualenvs under target/ (made on first use). tests/it/deploy.rs runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "validate-deploy: $*" >&2; }

venvs=target/validators
mkdir -p "$venvs"
# docker-compose 1.29 needs PyYAML 5.4, which only builds with Cython < 3 and no isolation;
# kubernetes-validate needs a newer jsonschema than docker-compose allows: two venvs.
if [ ! -x "$venvs/compose/bin/docker-compose" ]; then
  log "installing docker-compose into $venvs/compose"
  python3 -m venv "$venvs/compose"
  "$venvs/compose/bin/pip" install -q "cython<3.0.0" wheel
  "$venvs/compose/bin/pip" install -q --no-build-isolation "pyyaml==5.4.1"
  "$venvs/compose/bin/pip" install -q "docker-compose==1.29.2"
fi
if [ ! -x "$venvs/k8s/bin/kubernetes-validate" ]; then
  log "installing kubernetes-validate into $venvs/k8s"
  python3 -m venv "$venvs/k8s"
  "$venvs/k8s/bin/pip" install -q "kubernetes-validate==1.37.0" jsonpatch pyyaml
fi

log "docker-compose config -q"
"$venvs/compose/bin/docker-compose" -f docker-compose.yml config -q
log "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml >&2
log "k8s manifests"
"$venvs/k8s/bin/python" scripts/validate_k8s.py "$venvs/k8s/bin/kubernetes-validate"
log "all deployment files valid"
