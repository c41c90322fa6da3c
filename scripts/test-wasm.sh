#!/usr/bin/env bash
# Runs the browser SDK's wasm-bindgen tests (sdk-wasm/src/wasm_tests.rs) under Node with
# wasm-bindgen-test-runner. Same toolchain route as scripts/build-wasm.sh (installs what
# is missing, idempotently); needs `node` on PATH.
#
# Usage: scripts/test-wasm.sh [extra cargo test args, e.g. a test name filter after --]
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/wasm-toolchain.sh
. scripts/wasm-toolchain.sh

if ! command -v node >/dev/null 2>&1; then
  apt_ensure nodejs
fi
ensure_wasm_bindgen

export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
# Node mode is the runner's default when no browser is requested; say so anyway.
unset WASM_BINDGEN_USE_BROWSER
export WASM_BINDGEN_TEST_TIMEOUT=${WASM_BINDGEN_TEST_TIMEOUT:-60}

wasm_cargo test --locked --target "$WASM_TARGET" -p adclick-sdk-wasm --lib "$@"
