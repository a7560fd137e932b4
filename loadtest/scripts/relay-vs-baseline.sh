#!/usr/bin/env bash
# Relay: polyge against the tokio baseline, interleaved runs, each server doing its relaying on
# core 0 (polyge: its one worker thread; the baseline: the whole process, one runtime thread)
# and polyge-load on core 1. polyge's password and writer threads are left unpinned: they log
# the load tool's accounts in before each run and are idle while frames flow.
#
#   loadtest/scripts/relay-vs-baseline.sh [PAIRS] [SECONDS] [RUNS] [RATE] [OUT_DIR]
#
# RATE 0 runs closed loop (16 frames in flight per pair); a RATE runs both open loop at the
# same offered frames/s, for latency at equal load. Results: OUT_DIR/{polyge,baseline}-N.json
# and a summary of medians. Build first: cargo build --release --workspace
set -euo pipefail
PAIRS=${1:-1000}
SECONDS_PER_RUN=${2:-5}
RUNS=${3:-3}
RATE=${4:-0}
OUT=${5:-target/relay-vs-baseline}
BIN=${BIN:-./target/release}
ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 5918 5919; do
    # A server from an earlier run may still be exiting.
    for _ in $(seq 50); do listening $port || break; sleep 0.2; done
    if listening $port; then echo "port $port is busy" >&2; exit 1; fi
done
data=$(mktemp -d)
"$BIN/polyge" --listen 127.0.0.1:5918 --data-dir "$data" --workers 1 \
    --rate-per-sec 10000000 --rate-burst 10000000 >"$OUT/polyge.log" 2>&1 &
polyge=$!
taskset -c 0 "$BIN/polyge-baseline" 127.0.0.1:5919 1 >"$OUT/baseline.log" 2>&1 &
baseline=$!
trap 'kill $polyge $baseline 2>/dev/null; wait; rm -rf "$data"' EXIT
for port in 5918 5919; do
    for _ in $(seq 50); do listening $port && break; sleep 0.1; done
    if ! listening $port; then echo "no server on port $port" >&2; exit 1; fi
done
for task in /proc/$polyge/task/*; do
    if [ "$(cat "$task/comm")" = "polyge-worker-0" ]; then
        taskset -p -c 0 "$(basename "$task")" >/dev/null
    fi
done
for i in $(seq "$RUNS"); do
    for server in polyge baseline; do
        if [ $server = polyge ]; then
            args=(--target 127.0.0.1:5918 --server-pid $polyge)
        else
            args=(--target 127.0.0.1:5919 --server-pid $baseline --baseline)
        fi
        echo "== run $i: $server"
        rm -f "$OUT/$server-$i.json"
        if ! taskset -c 1 "$BIN/polyge-load" relay "${args[@]}" --pairs "$PAIRS" \
            --duration "$SECONDS_PER_RUN" --rate "$RATE" --json "$OUT/$server-$i.json" | tail -5
        then
            echo "== run $i: $server FAILED (loss, corruption or an error: see above)"
        fi
    done
done
echo "polyge CPU seconds per thread over all runs (accounts setup included):"
for task in /proc/$polyge/task/*; do
    read -r -a f <"$task/stat"
    printf '  %-16s %s\n' "$(cat "$task/comm")" "$(((f[13] + f[14]) / $(getconf CLK_TCK)))"
done
python3 - "$OUT" "$RUNS" <<'PY'
import json, os, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
med = {}
for server in ("polyge", "baseline"):
    rs = []
    for i in range(1, runs + 1):
        path = f"{out}/{server}-{i}.json"
        if not os.path.exists(path):
            print(f"{server} run {i}: no results (the tool failed before writing {path})")
            continue
        r = json.load(open(path))
        if not r["clean"]:
            print(f"{server} run {i}: NOT CLEAN, left out of the medians: {r['totals']}")
            continue
        rs.append(r)
    if not rs:
        print(f"{server}: no clean run")
        continue
    rate = [r["delivered_per_sec"] for r in rs]
    cpu = [r["server_cpu_ns_per_frame"] or 0 for r in rs]
    p99 = [r["latency"][0]["p99_us"] for r in rs]
    p50 = [r["latency"][0]["p50_us"] for r in rs]
    gen = [round(100 * r.get("generator_busy", 0)) for r in rs]
    med[server] = (statistics.median(rate), statistics.median(cpu), statistics.median(p50), statistics.median(p99))
    print(f"{server:9} delivered/s {[round(x) for x in rate]} median {med[server][0]:.0f}; "
          f"CPU ns/frame {[round(x) for x in cpu]} median {med[server][1]:.0f}; "
          f"p50 us {p50} p99 us {p99} (medians {med[server][2]:.0f} / {med[server][3]:.0f}); "
          f"load generator busy % {gen}")
if len(med) == 2:
    p, b = med["polyge"], med["baseline"]
    print(f"ratio polyge/baseline: delivered {p[0] / b[0]:.2f}x, CPU per frame {b[1] / max(p[1], 1):.2f}x less, "
          f"p99 {p[3]} vs {b[3]} us")
else:
    sys.exit(1)
PY
