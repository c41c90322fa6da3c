#!/usr/bin/env bash
# Real-browser end-to-end tests of the browser SDK and the dashboard: headless Chromium (Debian packages
# chromium + chromium-driver, installed if missing) against `adclick dev`, checked through
# the query API. Needs the package built (scripts/build-wasm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
[ -f sdk-wasm/pkg/adclick_sdk_wasm_bg.wasm ] || bash scripts/build-wasm.sh
cargo build -q -p adclick-cli --bin adclick
python3 sdk-wasm/tests/browser_e2e.py
# The dashboard (/ui) against adclick dev; saves target/ui-dashboard.png.
python3 tests/browser/dashboard_e2e.py
