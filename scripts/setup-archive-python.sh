#!/usr/bin/env bash
# Installs what the raw click archive's tests need into the project-local venv `.venv/`
# (the one scripts/setup-python.sh and scripts/setup-nats.sh fill): `moto[server]`, a real
# S3-compatible server the S3 destination is tested against (boto3 comes with it), and
# `duckdb`, the engine the archive is read back with (scripts/archive-duckdb.py). Prints
# the venv's python on stdout (nothing else goes to stdout, so
# `py=$(bash scripts/setup-archive-python.sh)` works). Idempotent and quiet when the pinned
# versions are already installed; never touches the system Python.
#
# Usage: bash scripts/setup-archive-python.sh   (from anywhere; the venv is <repo>/.venv)
# Env:   ADCLICK_VENV overrides the venv directory (default <repo>/.venv).
set -euo pipefail

MOTO_VERSION=5.2.6
DUCKDB_VERSION=2.0.1
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ADCLICK_VENV:-$root/.venv}"
py="$venv/bin/python"
log() { printf '[setup-archive-python] %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"

installed() {
  [ -x "$py" ] && "$py" - "$MOTO_VERSION" "$DUCKDB_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import boto3, duckdb, flask, moto.server  # noqa: F401  (all import)
sys.exit(0 if version("moto") == sys.argv[1] and version("duckdb") == sys.argv[2] else 1)
PY
}

if installed; then
  printf '%s\n' "$py"
  exit 0
fi

ensure_venv || exit 1
log "installing moto[server]==$MOTO_VERSION duckdb==$DUCKDB_VERSION into $venv (from PyPI)"
if ! "$py" -m pip install -q --disable-pip-version-check \
  "moto[server]==$MOTO_VERSION" "duckdb==$DUCKDB_VERSION" >&2; then
  log "pip install failed: PyPI must be reachable (or a mirror set with PIP_INDEX_URL)"
  exit 1
fi
if ! installed; then
  log "moto $MOTO_VERSION / duckdb $DUCKDB_VERSION installed but do not import from $py"
  exit 1
fi
log "installed moto[server] $MOTO_VERSION and duckdb $DUCKDB_VERSION"
printf '%s\n' "$py"
