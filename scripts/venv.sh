# Sourced by scripts/setup-*.sh: creates the project-local venv `$venv` when missing, with
# one clear message when python3 or its venv module is not there. Expects `venv` and `log`
# to be set by the sourcing script.
ensure_venv() {
  if [ -x "$venv/bin/python" ]; then
    return 0
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    log "python3 not found: install Python 3 (3.9 or later) with venv support (Debian: apt-get install python3-venv)"
    return 1
  fi
  log "creating $venv"
  if ! python3 -m venv "$venv" >&2; then
    log "python3 -m venv failed (Debian: apt-get install python3-venv)"
    return 1
  fi
}
