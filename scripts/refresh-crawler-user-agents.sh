#!/usr/bin/env bash
# Refreshes the vendored crawler-user-agents pattern list (the collector's built-in bot
# list, embedded in the binary with include_str!) from npm. Pinned version below; the files
# are committed, so nothing is fetched at build or run time. After a refresh run
# `cargo test -p adclick-collector --lib useragent` : every pattern must compile with the
# Rust regex crate or be listed in useragent::KNOWN_UNSUPPORTED, and every listed instance
# must classify as a bot.
#
#   bash scripts/refresh-crawler-user-agents.sh            # the pinned version
#   bash scripts/refresh-crawler-user-agents.sh 1.61.0     # another one (then pin it here)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-1.60.0}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "crawler-user-agents@$VERSION" >/dev/null)
tgz=$(ls "$tmp"/crawler-user-agents-*.tgz)
sha=$(sha256sum "$tgz" | cut -d' ' -f1)
(cd "$tmp" && tar xzf "$tgz")
# The list must be a JSON array of objects with a "pattern" string, as the collector reads it.
python3 - "$tmp/package/crawler-user-agents.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert isinstance(d, list) and all(isinstance(e.get("pattern"), str) for e in d), "unexpected list format"
print(f"{len(d)} patterns")
PY
dest=collector/data/crawler-user-agents
mkdir -p "$dest"
cp "$tmp/package/crawler-user-agents.json" "$tmp/package/LICENSE" "$dest/"
printf 'crawler-user-agents %s\nsource: npm %s\nsha256 of the npm tarball: %s\n' \
  "$VERSION" "$(basename "$tgz")" "$sha" > "$dest/VERSION"
echo "crawler-user-agents $VERSION vendored into $dest"
