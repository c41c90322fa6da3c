#!/usr/bin/env bash
# scripts/bench.sh [OUT.md]: runs the benchmark set of issue 13 and a Redis side-by-side in
# one go, then writes a markdown table (to OUT.md, or stdout without an argument).
#
#   1. builds the release `adclick` (cargo build --release -p adclick-cli);
#   2. adclick bench aggregator  (apply-only state path, one core, memory per cell);
#   3. adclick bench topads      (TopAds n=100 / last 60 min over many distinct ads);
#   4. adclick bench pipeline    (loadgen + collectors + aggregator on this machine);
#   5. redis-server (Debian's, installed with apt-get when missing) on 127.0.0.1, a free
#      port, no persistence: redis-benchmark doing pipelined HINCRBY over many keys.
#
# Each adclick benchmark prints one `RESULT key=value ...` line; this script parses those.
# Not part of CI. Sizes come from the environment (defaults = the issue's figures):
#
#   AGG_CLICKS=5000000 AGG_ADS=1000000          adclick bench aggregator
#   TOPADS_ADS=10000000                         adclick bench topads (10M ads: ~5 GiB peak RSS,
#                                               ~2 min; it stops early when less than
#                                               TOPADS_MIN_FREE_MIB=2048 would be left)
#   PIPE_RATE=80000 PIPE_DURATION=15s PIPE_COLLECTORS=2 PIPE_ADS=100000
#   REDIS_REQUESTS=10000000 REDIS_KEYS=10000000 REDIS_PIPELINE=64 REDIS_CLIENTS=50
#   SKIP="topads pipeline"                      skip some of: aggregator topads pipeline redis
#   ROUNDS=1                                    with ROUNDS=N > 1, N-1 more alternating pairs of
#                                               `bench aggregator --no-memory` and the Redis run
#                                               (this box's speed drifts by +-10-20% within
#                                               minutes): one row per pair and the median
#                                               of the pairs' ratios
#   ADCLICK=path/to/adclick                     use this binary, do not build
#   BASE_ADCLICK=path/to/older/adclick          also run `bench aggregator` with this binary,
#                                               right after, for a before/after row of the
#                                               same run (e.g. main built in a worktree)
#
# Quick run:  AGG_CLICKS=500000 AGG_ADS=100000 TOPADS_ADS=1000000 PIPE_DURATION=5s \
#             REDIS_REQUESTS=1000000 REDIS_KEYS=1000000 scripts/bench.sh
set -euo pipefail

cd "$(dirname "$0")/.."

AGG_CLICKS=${AGG_CLICKS:-5000000}
AGG_ADS=${AGG_ADS:-1000000}
TOPADS_ADS=${TOPADS_ADS:-10000000}
TOPADS_MIN_FREE_MIB=${TOPADS_MIN_FREE_MIB:-2048}
PIPE_RATE=${PIPE_RATE:-80000}
PIPE_DURATION=${PIPE_DURATION:-15s}
PIPE_COLLECTORS=${PIPE_COLLECTORS:-2}
PIPE_ADS=${PIPE_ADS:-100000}
REDIS_REQUESTS=${REDIS_REQUESTS:-10000000}
REDIS_KEYS=${REDIS_KEYS:-10000000}
REDIS_PIPELINE=${REDIS_PIPELINE:-64}
REDIS_CLIENTS=${REDIS_CLIENTS:-50}
SKIP=${SKIP:-}
ROUNDS=${ROUNDS:-1}
OUT=${1:-}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/adclick-bench-sh.XXXXXX")
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
REDIS_PID=""

cleanup() {
    if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench.sh: $*" >&2; }

skipped() { [[ " $SKIP " == *" $1 "* ]]; }

# --- build --------------------------------------------------------------------------
if [[ -n "${ADCLICK:-}" ]]; then
    BIN=$ADCLICK
else
    log "building the release binary"
    cargo build --release -q -p adclick-cli >&2
    BIN="${CARGO_TARGET_DIR:-target}/release/adclick"
fi
[[ -x "$BIN" ]] || { log "no executable at $BIN"; exit 1; }

# --- adclick benchmarks ---------------------------------------------------------------
declare -A R=()     # "<bench>.<key>" -> value
FAILED=()

# run_bench_as KEY BINARY NAME ARGS...: runs `BINARY bench NAME ARGS`, keeps its output in
# $WORK/KEY.out, parses its RESULT line into R under KEY.
run_bench_as() {
    local key=$1 bin=$2 name=$3
    shift 3
    log "$bin bench $name $*"
    if ! "$bin" bench "$name" "$@" >"$WORK/$key.out" 2>"$WORK/$key.err"; then
        log "adclick bench $name failed:"
        tail -n 5 "$WORK/$key.err" >&2 || true
        FAILED+=("$key")
        return 0
    fi
    cat "$WORK/$key.out" >&2
    local line kv
    line=$(grep -m1 '^RESULT ' "$WORK/$key.out" || true)
    if [[ -z "$line" ]]; then
        log "adclick bench $name printed no RESULT line"
        FAILED+=("$key")
        return 0
    fi
    for kv in ${line#RESULT }; do
        R["$key.${kv%%=*}"]=${kv#*=}
    done
}

# run_bench NAME ARGS...: run_bench_as NAME "$BIN" NAME ARGS...
run_bench() {
    run_bench_as "$1" "$BIN" "$@"
}

skipped aggregator || run_bench aggregator --clicks "$AGG_CLICKS" --ads "$AGG_ADS"
if [[ -n "${BASE_ADCLICK:-}" ]] && ! skipped aggregator; then
    [[ -x "$BASE_ADCLICK" ]] || { log "no executable at BASE_ADCLICK=$BASE_ADCLICK"; exit 1; }
    run_bench_as aggregator_base "$BASE_ADCLICK" aggregator --clicks "$AGG_CLICKS" --ads "$AGG_ADS"
fi
skipped topads || run_bench topads --ads "$TOPADS_ADS" --min-free-mib "$TOPADS_MIN_FREE_MIB"
skipped pipeline || run_bench pipeline --rate "$PIPE_RATE" --duration "$PIPE_DURATION" \
    --collectors "$PIPE_COLLECTORS" --ads "$PIPE_ADS"

# --- Redis side-by-side ---------------------------------------------------------------
free_port() {
    local p
    for _ in $(seq 1 100); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

REDIS_OPS=""
REDIS_VERSION=""
if ! skipped redis; then
    if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
        log "installing redis-server and redis-tools with apt-get"
        SUDO=""
        [[ $(id -u) -eq 0 ]] || SUDO=sudo
        $SUDO apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server redis-tools >&2
    fi
    REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')
    PORT=$(free_port)
    mkdir -p "$WORK/redis"
    # No RDB snapshots, no AOF: the comparison is in-memory counting.
    redis-server --bind 127.0.0.1 --port "$PORT" --dir "$WORK/redis" --save "" \
        --appendonly no --daemonize no --logfile "$WORK/redis/redis.log" &
    REDIS_PID=$!
    for _ in $(seq 1 100); do
        [[ $(redis-cli -p "$PORT" ping 2>/dev/null || true) == PONG ]] && break
        sleep 0.1
    done
    [[ $(redis-cli -p "$PORT" ping 2>/dev/null || true) == PONG ]] || {
        log "redis-server did not start"
        exit 1
    }
    # redis_round: one redis-benchmark run against the (empty) server; prints its ops/s.
    redis_round() {
        log "redis-benchmark: $REDIS_REQUESTS pipelined (-P $REDIS_PIPELINE) HINCRBY over $REDIS_KEYS keys"
        # --csv: "test","rps",... ; the command line is the test name.
        redis-benchmark -p "$PORT" -c "$REDIS_CLIENTS" -n "$REDIS_REQUESTS" -r "$REDIS_KEYS" \
            -P "$REDIS_PIPELINE" --csv HINCRBY 'h:__rand_int__' f 1 >"$WORK/redis.csv"
        cat "$WORK/redis.csv" >&2
        awk -F'","' 'NR > 1 && /HINCRBY/ { gsub(/"/, "", $2); print $2; exit }' "$WORK/redis.csv"
    }
    REDIS_OPS=$(redis_round)
    # More alternating pairs (ROUNDS): the aggregator, then Redis on an emptied server.
    ROUND_OPS=("$REDIS_OPS")
    for ((i = 2; i <= ROUNDS; i++)); do
        skipped aggregator || run_bench_as "aggregator_round$i" "$BIN" aggregator \
            --clicks "$AGG_CLICKS" --ads "$AGG_ADS" --no-memory
        redis-cli -p "$PORT" flushall >/dev/null
        ROUND_OPS+=("$(redis_round)")
    done
    REDIS_KEYS_HELD=$(redis-cli -p "$PORT" dbsize)
    REDIS_MEM=$(redis-cli -p "$PORT" info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p')
    redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
    [[ -n "$REDIS_OPS" ]] || { log "could not parse redis-benchmark output"; FAILED+=(redis); }
fi

# --- table ----------------------------------------------------------------------------
v() { echo "${R[$1]:-n/a}"; }
ratio() { # ratio A B: A / B with 2 decimals, or n/a
    awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else print "n/a" }'
}
fmt() { # thousands separators for integers, as is otherwise
    awk -v x="$1" 'BEGIN { if (x ~ /^[0-9]+$/) { s = ""; while (length(x) > 3) { s = "," substr(x, length(x) - 2) s; x = substr(x, 1, length(x) - 3) } print x s } else print x }'
}

{
    echo "### scripts/bench.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ): $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "| benchmark | figure | ratio aggregator/Redis |"
    echo "|---|---|---|"
    if ! skipped aggregator; then
        echo "| aggregator apply, one core ($(fmt "$AGG_CLICKS") clicks, $(fmt "$AGG_ADS") ads, 2% dup, 1% late) | **$(fmt "$(v aggregator.clicks_per_sec)") clicks/s** ($(v aggregator.ns_per_click) ns/click) | $(ratio "$(v aggregator.clicks_per_sec)" "$REDIS_OPS") |"
        echo "| the same per CPU-second of the timed loop (other load on the machine excluded) | $(fmt "$(v aggregator.clicks_per_cpu_sec)") clicks/s | $(ratio "$(v aggregator.clicks_per_cpu_sec)" "$REDIS_OPS") |"
        echo "| aggregator memory per active minute cell (without dedup) / per dedup entry | $(v aggregator.bytes_per_cell) B / $(v aggregator.dedup_bytes_per_entry) B | — |"
        if [[ -n "${BASE_ADCLICK:-}" ]]; then
            echo "| before: \`$BASE_ADCLICK\` (same run, right after): per CPU-second of the timed loop | $(fmt "$(v aggregator_base.clicks_per_cpu_sec)") clicks/s (after/before $(ratio "$(v aggregator.clicks_per_cpu_sec)" "$(v aggregator_base.clicks_per_cpu_sec)")) | $(ratio "$(v aggregator_base.clicks_per_cpu_sec)" "$REDIS_OPS") |"
        fi
    fi
    if ! skipped topads; then
        echo "| TopAds(n=100, last 60 min), $(fmt "$(v topads.ads)") ads, in process: p50 / p99 | $(v topads.p50_ms) / $(v topads.p99_ms) ms | — |"
        echo "| TopAds same, one country: p50 / p99 ($(v topads.filtered_runs) runs) | $(v topads.filtered_p50_ms) / $(v topads.filtered_p99_ms) ms | — |"
    fi
    if ! skipped pipeline; then
        echo "| pipeline at $(fmt "$PIPE_RATE")/s offered, $PIPE_COLLECTORS collectors: offered / acked / counted | $(v pipeline.offered_per_sec) / $(v pipeline.acked_per_sec) / **$(v pipeline.counted_per_sec)** clicks/s | — |"
        echo "| pipeline: undelivered after the drain (acked - counted - refused as repeats) | $(v pipeline.undelivered) of $(v pipeline.acked) acked ($(v pipeline.refused) refused; SDK backlog at the end of the load: $(v pipeline.sdk_backlog)) | — |"
        echo "| pipeline: click -> queryable p50 / p99 | $(v pipeline.probe_p50_ms) / $(v pipeline.probe_p99_ms) ms | — |"
        echo "| pipeline: TopAds over gRPC under load p50 / p99 | $(v pipeline.topads_p50_ms) / $(v pipeline.topads_p99_ms) ms | — |"
        echo "| pipeline: CPU aggregator / collectors / loadgen | $(v pipeline.cpu_aggregator) / $(v pipeline.cpu_collectors) / $(v pipeline.cpu_loadgen) cores | — |"
        echo "| pipeline: peak RSS aggregator / largest collector | $(v pipeline.rss_aggregator_mib) / $(v pipeline.rss_collector_max_mib) MiB | — |"
    fi
    if ! skipped redis && ! skipped aggregator && ((ROUNDS > 1)); then
        RATIOS=()
        for ((i = 1; i <= ROUNDS; i++)); do
            key=aggregator_round$i
            ((i == 1)) && key=aggregator
            agg=$(v "$key.clicks_per_cpu_sec")
            ops=${ROUND_OPS[i - 1]:-}
            RATIOS+=("$(ratio "$agg" "$ops")")
            echo "| round $i of $ROUNDS: aggregator per CPU-second / Redis HINCRBY ops/s, run one after the other | $(fmt "$agg") / $(fmt "${ops%.*}") | ${RATIOS[i - 1]} |"
        done
        echo "| median of the $ROUNDS rounds' ratios | — | **$(printf '%s\n' "${RATIOS[@]}" | tr -d x | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) m = a[(NR + 1) / 2]; else m = (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.2fx", m }')** |"
    fi
    if ! skipped redis; then
        echo "| Redis $REDIS_VERSION HINCRBY, pipelined -P $REDIS_PIPELINE, $REDIS_CLIENTS clients, $(fmt "$REDIS_KEYS") keys (${REDIS_KEYS_HELD:-?} held, $(( ${REDIS_MEM:-0} / 1048576 )) MiB) | **$(fmt "${REDIS_OPS%.*}") ops/s** | 1.00x |"
    fi
    echo
    echo "Load average at the start / end: $LOAD_START / $(cut -d' ' -f1-3 /proc/loadavg) (the machine may be"
    echo "shared: per-CPU-second figures are the ones other load changes least). Redis runs one thread"
    echo "for commands; redis-benchmark (the client) shares the same cores. The aggregator figure is one"
    echo "thread with clicks generated and encoded beforehand. RESULT lines:"
    echo
    echo '```'
    cat "$WORK"/*.out 2>/dev/null | grep '^RESULT ' || true
    echo '```'
    if ((${#FAILED[@]})); then
        echo
        echo "Failed: ${FAILED[*]} (see the log above)."
    fi
} >"$WORK/table.md"

if [[ -n "$OUT" ]]; then
    cp "$WORK/table.md" "$OUT"
    log "wrote $OUT"
else
    cat "$WORK/table.md"
fi
((${#FAILED[@]} == 0))
