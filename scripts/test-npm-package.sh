#!/usr/bin/env bash
# Tests the browser SDK as it would be published: checks the size budget
# (scripts/check-wasm-size.sh), runs `npm pack` on sdk-wasm/pkg, checks the tarball's file
# list, installs the tarball into a scratch project in a temp dir (offline: the package
# has no dependencies), and runs sdk-wasm/tests/package.test.mjs there with `node --test`
# (imports through the package's `exports`; consent gating; storage; a real HTTP server
# as the collector). Builds the package first when sdk-wasm/pkg is missing.
#
# Usage: scripts/test-npm-package.sh      (needs node >= 20 and npm)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PKG=$root/sdk-wasm/pkg
log() { printf '[npm-package] %s\n' "$*" >&2; }

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "$tool not found: install Node.js 20+ with npm (Debian: apt-get install nodejs npm)"
    exit 1
  fi
done
[ -f "$PKG/adclick_sdk_wasm_bg.wasm" ] || bash scripts/build-wasm.sh

bash scripts/check-wasm-size.sh "$PKG"

version=$(node -p 'require(process.argv[1]).version' "$PKG/package.json")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "npm pack (version $version)"
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tgz="$work/adclick-sdk-$version.tgz"
[ -f "$tgz" ] || { log "npm pack did not write $tgz"; ls "$work" >&2; exit 1; }
listed=$(tar tzf "$tgz" | sort | tr '\n' ' ')
want="package/README.md package/adclick_sdk_wasm.d.ts package/adclick_sdk_wasm.js package/adclick_sdk_wasm_bg.wasm package/adclick_sdk_wasm_bg.wasm.d.ts package/package.json "
if [ "$listed" != "$want" ]; then
  log "tarball files differ from the expected list"
  log "  got:  $listed"
  log "  want: $want"
  exit 1
fi
log "$(basename "$tgz"): $(wc -c <"$tgz") bytes, files: $listed"

mkdir "$work/app"
cd "$work/app"
printf '{ "name": "scratch", "version": "1.0.0", "private": true, "type": "module" }\n' >package.json
npm install --offline --no-audit --no-fund --silent "$tgz"
cp "$root/sdk-wasm/tests/package.test.mjs" .
log "node --test against the installed package"
ADCLICK_EXPECT_VERSION=$version node --test package.test.mjs
