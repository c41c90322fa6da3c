#!/usr/bin/env bash
# Installs `promtool` (Debian's `prometheus` package) for the metrics format test
# (tests/tests/metrics_format.rs: `promtool check metrics` on every server's /metrics) and
# the alert rules check (`promtool check rules deploy/prometheus/alerts.yml`). Idempotent:
# does nothing when promtool is on PATH. Prints promtool's path on stdout.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup-promtool] installing Debian's prometheus package (for promtool)" >&2
  $SUDO apt-get update -qq >&2
  # The package's service is not wanted: only the promtool binary is used.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
fi
command -v promtool
