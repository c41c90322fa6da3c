#!/usr/bin/env bash
# Builds the browser SDK package into sdk-wasm/pkg (an npm-style package, @adclick/sdk):
#   cargo build --release --target wasm32-unknown-unknown -p adclick-sdk-wasm
#   wasm-bindgen --target web  ->  adclick_sdk_wasm.js, .d.ts, adclick_sdk_wasm_bg.wasm
#   wasm-opt -Oz (binaryen)    ->  smaller .wasm
#   sdk-wasm/package.json      ->  pkg/package.json (version: the workspace's)
# and prints raw and gzipped sizes. Installs missing toolchain pieces (see
# scripts/wasm-toolchain.sh); safe to run again (skips what is already installed).
#
# Usage: scripts/build-wasm.sh            (from anywhere; works from a fresh clone)
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/wasm-toolchain.sh
. scripts/wasm-toolchain.sh

CRATE=adclick-sdk-wasm
LIB=adclick_sdk_wasm
PKG=sdk-wasm/pkg

# Size-tuned release profile for this build only (the workspace profile serves servers).
export CARGO_PROFILE_RELEASE_OPT_LEVEL=z
export CARGO_PROFILE_RELEASE_LTO=true
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
export CARGO_PROFILE_RELEASE_PANIC=abort
export CARGO_PROFILE_RELEASE_DEBUG=false
export CARGO_PROFILE_RELEASE_STRIP=debuginfo

wasm_log "cargo build ($WASM_ROUTE route)"
wasm_cargo build --release --locked --target "$WASM_TARGET" -p "$CRATE"
WASM_IN="$WASM_TARGET_DIR/$WASM_TARGET/release/$LIB.wasm"

ensure_wasm_bindgen
rm -rf "$PKG"
mkdir -p "$PKG"
wasm-bindgen --target web --remove-name-section --remove-producers-section \
  --out-dir "$PKG" "$WASM_IN"

WASM_OUT="$PKG/${LIB}_bg.wasm"
smoke() {
  if command -v node >/dev/null 2>&1; then node scripts/wasm-smoke.mjs "$PKG"; else
    wasm_log "node not found: smoke test skipped"
  fi
}
if ensure_wasm_opt; then
  # The features rustc enables by default for wasm32-unknown-unknown.
  wasm-opt -Oz --strip-debug --strip-producers \
    --enable-bulk-memory --enable-mutable-globals --enable-nontrapping-float-to-int \
    --enable-sign-ext --enable-reference-types --enable-multivalue \
    -o "$WASM_OUT.opt" "$WASM_OUT"
  mv "$WASM_OUT" "$WASM_OUT.plain"
  mv "$WASM_OUT.opt" "$WASM_OUT"
  if smoke; then
    rm "$WASM_OUT.plain"
  else
    # Old binaryen releases mis-handle some wasm-bindgen output (externref tables):
    # ship the module as wasm-bindgen wrote it rather than a broken one.
    wasm_log "the wasm-opt output ($(wasm-opt --version)) failed the smoke test: keeping the unoptimised module"
    mv "$WASM_OUT.plain" "$WASM_OUT"
    smoke
  fi
else
  wasm_log "wasm-opt (binaryen) not available: package left unoptimised"
  smoke
fi

# The package version is the workspace's ([workspace.package] version in Cargo.toml).
VERSION=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
  p && /^version *=/ { gsub(/version *= *|"/, ""); print; exit }' Cargo.toml)
if [ -z "$VERSION" ]; then
  wasm_log "no [workspace.package] version in Cargo.toml"
  exit 1
fi
sed -E "s/\"version\": \"[^\"]*\"/\"version\": \"$VERSION\"/" sdk-wasm/package.json >"$PKG/package.json"
[ -f sdk-wasm/README.md ] && cp sdk-wasm/README.md "$PKG/README.md"
# wasm-bindgen writes a .gitignore ("*") into the package; keep it (pkg/ is build output).

size_line() {
  local f=$1 raw gz
  raw=$(wc -c <"$f")
  gz=$(gzip -9 -c "$f" | wc -c)
  printf '  %-28s %8d bytes raw %8d bytes gzip -9\n' "$(basename "$f")" "$raw" "$gz"
}
echo
echo "package: $PKG"
size_line "$WASM_OUT"
size_line "$PKG/$LIB.js"
total_raw=$(cat "$WASM_OUT" "$PKG/$LIB.js" | wc -c)
total_gz=$(( $(gzip -9 -c "$WASM_OUT" | wc -c) + $(gzip -9 -c "$PKG/$LIB.js" | wc -c) ))
printf '  %-28s %8d bytes raw %8d bytes gzip -9\n' "wasm + JS glue" "$total_raw" "$total_gz"
echo "  version $VERSION; size budget: scripts/check-wasm-size.sh"
