#!/usr/bin/env bash
# Installs what the Python client example (examples/python/) needs into the project-local
# venv `.venv/` (the same one scripts/setup-nats.sh fills): prometheus-client (the metrics
# format test's OpenMetrics parser), grpcio and grpcio-tools (the
# stubs are generated from proto/proto/adclick/v1/adclick.proto at run time, nothing
# generated is committed). Prints the venv's python on stdout (nothing else goes to
# stdout, so `py=$(bash scripts/setup-python.sh)` works). Idempotent and quiet when the
# pinned versions are already installed; never touches the system Python.
#
# Usage: bash scripts/setup-python.sh   (from anywhere; the venv is <repo>/.venv)
# Env:   ADCLICK_VENV overrides the venv directory (default <repo>/.venv).
set -euo pipefail

GRPC_VERSION=1.76.0
# The strict OpenMetrics parser the metrics format test uses (tests/tests/metrics_format.rs).
PROM_VERSION=0.23.1
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ADCLICK_VENV:-$root/.venv}"
py="$venv/bin/python"
log() { printf '[setup-python] %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"

installed() {
  [ -x "$py" ] && "$py" - "$GRPC_VERSION" "$PROM_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import grpc, grpc_tools.protoc  # noqa: F401  (both import)
import prometheus_client.openmetrics.parser  # noqa: F401
want, prom = sys.argv[1], sys.argv[2]
sys.exit(0 if version("grpcio") == want and version("grpcio-tools") == want
         and version("prometheus-client") == prom else 1)
PY
}

if installed; then
  printf '%s\n' "$py"
  exit 0
fi

ensure_venv || exit 1
log "installing grpcio==$GRPC_VERSION grpcio-tools==$GRPC_VERSION into $venv (from PyPI)"
if ! "$py" -m pip install -q --disable-pip-version-check \
  "grpcio==$GRPC_VERSION" "grpcio-tools==$GRPC_VERSION" "prometheus-client==$PROM_VERSION" >&2; then
  log "pip install failed: PyPI must be reachable (or a mirror set with PIP_INDEX_URL)"
  exit 1
fi
if ! installed; then
  log "grpcio/grpcio-tools $GRPC_VERSION installed but do not import from $py"
  exit 1
fi
log "installed grpcio and grpcio-tools $GRPC_VERSION, prometheus-client $PROM_VERSION"
printf '%s\n' "$py"
