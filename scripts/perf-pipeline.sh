#!/bin/bash
# Profiles `adclick bench pipeline` as a whole: runs the bench, waits until it says the
# load starts (the request bodies are built before that and are not profiled), records
# `perf record -a -g` for 10 s of the load, and notes the pids of the aggregator, the
# collectors and the bench (all are the `adclick` binary, so summarize per pid):
#
#   scripts/perf-pipeline.sh target/release/adclick /tmp/pp --rate 250000 --duration 15s
#   for p in $(cut -d' ' -f1 /tmp/pp.pids); do
#     python3 docs/perf/summarize.py /tmp/pp.data --pid "$p" --paths 0; done
#
# Needs perf (root or perf_event_paranoid <= 1 for -a). Outputs: OUT.bench.txt (the
# bench's table), OUT.pids ("pid role" lines), OUT.data (the profile).
set -euo pipefail
BIN=$1
OUT=$2
shift 2
"$BIN" bench pipeline "$@" > "$OUT.bench.txt" 2>&1 &
B=$!
until grep -q "load starts" "$OUT.bench.txt"; do
  kill -0 "$B" 2>/dev/null || { cat "$OUT.bench.txt"; exit 1; }
  sleep 0.2
done
sleep 2
for p in $(pgrep -P "$B"); do
  echo "$p $(tr '\0' ' ' < "/proc/$p/cmdline" | awk '{print $2}')"
done > "$OUT.pids"
echo "$B bench" >> "$OUT.pids"
perf record -a -g -F 499 -o "$OUT.data" -- sleep "${REC_SECS:-10}" 2> "$OUT.perf.log"
wait "$B"
