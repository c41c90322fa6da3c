#!/usr/bin/env bash
# Installs what the Kotlin binding test (tests/tests/ffi_bindings.rs) needs, idempotently:
# - a JDK (java, javac) and JNA (/usr/share/java/jna.jar) from Debian: default-jdk-headless
#   and libjna-java (apt-get; as root, or with sudo -n);
# - the Kotlin compiler from the npm registry (package kotlin-compiler, pinned below) into
#   the project-local <repo>/.kotlin/ (never global).
# Prints the path of kotlinc on stdout (nothing else goes to stdout, so
# `kotlinc=$(bash scripts/setup-kotlin.sh)` works). Quick when everything is there.
#
# Usage: bash scripts/setup-kotlin.sh
# Env:   ADCLICK_KOTLIN_DIR overrides the install directory (default <repo>/.kotlin).
set -euo pipefail

KOTLIN_VERSION=2.4.20
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${ADCLICK_KOTLIN_DIR:-$root/.kotlin}"
kotlinc="$dir/node_modules/kotlin-compiler/bin/kotlinc"
JNA_JAR=/usr/share/java/jna.jar
log() { printf '[setup-kotlin] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
  else log "need root (or passwordless sudo) to run: $*"; return 1
  fi
}

missing=()
command -v javac >/dev/null 2>&1 && command -v java >/dev/null 2>&1 || missing+=(default-jdk-headless)
[ -f "$JNA_JAR" ] || missing+=(libjna-java)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${missing[*]} and no apt-get: install a JDK 17+ and JNA ($JNA_JAR) by hand"
    exit 1
  fi
  log "installing ${missing[*]} (apt-get)"
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  [ -f "$JNA_JAR" ] || { log "libjna-java installed but $JNA_JAR is missing"; exit 1; }
fi

installed_version() {
  [ -f "$dir/node_modules/kotlin-compiler/package.json" ] &&
    node -p 'require(process.argv[1]).version' "$dir/node_modules/kotlin-compiler/package.json" 2>/dev/null
}

if [ ! -x "$kotlinc" ] || [ "$(installed_version || true)" != "$KOTLIN_VERSION" ]; then
  for tool in node npm; do
    command -v "$tool" >/dev/null 2>&1 || { log "$tool not found: install Node.js and npm (Debian: apt-get install nodejs npm)"; exit 1; }
  done
  mkdir -p "$dir"
  # A package.json of its own, so npm installs here and not into a parent project.
  [ -f "$dir/package.json" ] || printf '{ "private": true }\n' > "$dir/package.json"
  log "installing kotlin-compiler@$KOTLIN_VERSION into $dir (npm registry)"
  if ! (cd "$dir" && npm install --silent --no-audit --no-fund --save-exact "kotlin-compiler@$KOTLIN_VERSION" >&2); then
    log "npm install kotlin-compiler failed: the npm registry must be reachable"
    exit 1
  fi
  chmod +x "$dir"/node_modules/kotlin-compiler/bin/* 2>/dev/null || true
  [ -x "$kotlinc" ] || { log "kotlin-compiler installed but $kotlinc is missing"; ls "$dir/node_modules/kotlin-compiler" >&2; exit 1; }
  log "installed kotlinc $KOTLIN_VERSION"
fi
printf '%s\n' "$kotlinc"
