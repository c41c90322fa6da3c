#!/usr/bin/env bash
# Fails when the browser package is over its size budget: the .wasm plus the JS glue,
# each compressed with `gzip -9` (what a server's gzip or a CDN sends), at most
# ADCLICK_WASM_BUDGET bytes (default 71680 = 70 KiB). Run after scripts/build-wasm.sh.
#
# Usage: scripts/check-wasm-size.sh [PKG_DIR]     (default sdk-wasm/pkg)
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=${1:-sdk-wasm/pkg}
BUDGET=${ADCLICK_WASM_BUDGET:-71680}
LIB=adclick_sdk_wasm
for f in "$PKG/${LIB}_bg.wasm" "$PKG/$LIB.js"; do
  if [ ! -f "$f" ]; then
    echo "check-wasm-size: $f not found: run scripts/build-wasm.sh first" >&2
    exit 1
  fi
done
gz() { gzip -9 -c "$1" | wc -c; }
wasm=$(gz "$PKG/${LIB}_bg.wasm")
js=$(gz "$PKG/$LIB.js")
total=$((wasm + js))
printf 'browser package, gzip -9: wasm %d + JS %d = %d bytes (budget %d bytes = %d KiB)\n' \
  "$wasm" "$js" "$total" "$BUDGET" "$((BUDGET / 1024))"
if [ "$total" -gt "$BUDGET" ]; then
  echo "check-wasm-size: OVER BUDGET by $((total - BUDGET)) bytes" >&2
  exit 1
fi
