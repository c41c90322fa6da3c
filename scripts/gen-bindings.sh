#!/usr/bin/env bash
# Builds the adclick-ffi library and generates its Kotlin, Swift and Python bindings with the
# crate's own uniffi-bindgen (same UniFFI version as the library), from the built library
# (UniFFI "library mode": no UDL). The library is copied next to the bindings.
#
# Usage: bash scripts/gen-bindings.sh [OUT_DIR] [--release]
#   OUT_DIR defaults to target/bindings. Output:
#     OUT_DIR/adclick_ffi.py                      Python (loads libadclick_ffi.so beside it)
#     OUT_DIR/uniffi/adclick_ffi/adclick_ffi.kt   Kotlin (JNA; needs net.java.dev.jna:jna)
#     OUT_DIR/adclick_ffi.swift, adclick_ffiFFI.h, adclick_ffiFFI.modulemap   Swift
#     OUT_DIR/libadclick_ffi.so (.dylib on macOS)
# The tests (tests/tests/ffi_bindings.rs) do the same steps themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bindings
profile=debug
for a in "$@"; do
  case "$a" in
    --release) profile=release ;;
    *) out=$a ;;
  esac
done
flags=()
[ "$profile" = release ] && flags+=(--release)
cargo build -q "${flags[@]}" -p adclick-ffi --lib --bin uniffi-bindgen
target=${CARGO_TARGET_DIR:-target}
case "$(uname -s)" in
  Darwin) lib=$target/$profile/libadclick_ffi.dylib ;;
  *) lib=$target/$profile/libadclick_ffi.so ;;
esac
mkdir -p "$out"
"$target/$profile/uniffi-bindgen" generate --library "$lib" \
  --language python --language kotlin --language swift --no-format --metadata-no-deps --out-dir "$out" >&2
cp "$lib" "$out/"
echo "bindings and $(basename "$lib") in $out" >&2
