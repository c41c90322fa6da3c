# Sourced by scripts/build-wasm.sh and scripts/test-wasm.sh (not run directly).
#
# Picks how to build for wasm32-unknown-unknown and installs what is missing, idempotently:
# - the ordinary route when the rustup toolchain has the wasm32-unknown-unknown target
#   (`rustup target add wasm32-unknown-unknown`);
# - otherwise the route of ../shared/WASM-TOOLCHAIN.md: Debian's rustc-web/cargo-web with
#   its std sources (rust-web-src), `-Zbuild-std`, and lld-22 for the rust-lld linker.
# Then makes sure the wasm-bindgen CLI matches the wasm-bindgen version in Cargo.lock.
#
# Defines: wasm_cargo <cargo args...> (cargo for the wasm32 target, with -Zbuild-std on
# the Debian route), WASM_ROUTE, WASM_TARGET_DIR, WASM_BINDGEN_VERSION; and the functions
# ensure_wasm_bindgen and ensure_wasm_opt. Expects to run from the repository root.

WASM_TARGET=wasm32-unknown-unknown
# A target directory of its own: the Debian route uses another compiler than host builds.
WASM_TARGET_DIR=${WASM_TARGET_DIR:-$PWD/target/wasm}

wasm_log() { printf '[wasm] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    wasm_log "need root to run: $*"; return 1
  fi
}

# Installs the Debian packages given that are not installed yet (apt-get update once).
apt_ensure() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    wasm_log "missing ${missing[*]} and no apt-get: install them (or rustup's wasm32 target)"
    return 1
  fi
  wasm_log "installing ${missing[*]} (apt-get)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

if command -v rustup >/dev/null 2>&1 \
  && rustup target list --installed 2>/dev/null | grep -qx "$WASM_TARGET"; then
  WASM_ROUTE=rustup
  wasm_cargo() { CARGO_TARGET_DIR="$WASM_TARGET_DIR" cargo "$@"; }
else
  WASM_ROUTE=debian
  apt_ensure rustc-web cargo-web rust-web-src lld-22
  DEB_RUSTC=$(dpkg -L rustc-web | grep -E 'bin/rustc$' | head -1)
  DEB_CARGO=$(dpkg -L cargo-web | grep -E 'bin/cargo$' | head -1)
  if [ -z "$DEB_RUSTC" ] || [ -z "$DEB_CARGO" ]; then
    wasm_log "rustc-web/cargo-web are installed but their rustc/cargo were not found"
    return 1 2>/dev/null || exit 1
  fi
  # std is rebuilt from source here, so the whole module can do without the
  # reference-types feature: wasm-bindgen then keeps JS objects in a JS-side heap instead
  # of an externref table, which Debian's binaryen (108) corrupts when it rewrites the
  # module (and the output also runs on browsers without reference types).
  export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="${CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS:--Ctarget-feature=-reference-types}"
  # Debian's cargo and rustc, named explicitly (rustup's come first on PATH); the
  # first subcommand argument is cargo's (build/test), -Zbuild-std goes after it.
  wasm_cargo() {
    local sub=$1
    shift
    env PATH="$(dirname "$DEB_RUSTC"):$PATH" RUSTC="$DEB_RUSTC" RUSTC_BOOTSTRAP=1 \
      CARGO_TARGET_DIR="$WASM_TARGET_DIR" \
      "$DEB_CARGO" "$sub" -Zbuild-std=std,panic_abort "$@"
  }
fi
wasm_log "route: $WASM_ROUTE (target dir $WASM_TARGET_DIR)"

WASM_BINDGEN_VERSION=$(awk '
  $0 == "name = \"wasm-bindgen\"" { found = 1; next }
  found && /^version = / { gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ -z "$WASM_BINDGEN_VERSION" ]; then
  wasm_log "no wasm-bindgen entry in Cargo.lock"
  return 1 2>/dev/null || exit 1
fi

# The wasm-bindgen CLI (and wasm-bindgen-test-runner) at exactly the Cargo.lock version.
ensure_wasm_bindgen() {
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  local have=""
  command -v wasm-bindgen >/dev/null 2>&1 && have=$(wasm-bindgen --version | awk '{print $2}')
  if [ "$have" = "$WASM_BINDGEN_VERSION" ] && command -v wasm-bindgen-test-runner >/dev/null 2>&1; then
    return 0
  fi
  wasm_log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (have: ${have:-none}; takes minutes)"
  # Not --locked: the CLI's lock pins an entry the registry may no longer have.
  # The host toolchain (rustup's cargo) builds it, not the Debian one.
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
}

# wasm-opt (binaryen), for size. Missing and not installable: a warning, not an error.
ensure_wasm_opt() {
  command -v wasm-opt >/dev/null 2>&1 && return 0
  apt_ensure binaryen || true
  command -v wasm-opt >/dev/null 2>&1
}
