#!/usr/bin/env bash
# Refreshes the vendored uPlot (the dashboard's charts, served at /ui) from npm: pinned
# version below; the files are committed, so nothing is fetched at build or run time.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-1.6.32}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack "uplot@$VERSION" >/dev/null && tar xzf uplot-*.tgz)
dest=aggregator/ui/vendor/uplot
mkdir -p "$dest"
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" "$dest/"
echo "$VERSION" > "$dest/VERSION"
echo "uPlot $VERSION vendored into $dest"
