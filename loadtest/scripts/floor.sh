#!/usr/bin/env bash
# The gateway's broadcast against the kernel's floor, one command: for
# ROUNDS in (1, 20), REPEAT times alternating, runs
#   raw   — `pushgate-loadtest floor`: no gateway, one process writes each
#           frame to N plain TCP sockets (WRITERS threads);
#   gw    — `pushgate-loadtest floor --gateway-bin`: the same sinks as
#           devices of a gateway it starts, each round one broadcast;
# and prints one line per run: p50/p99 latency, sender CPU per 1000
# deliveries, sink CPU per 1000. Same client (raw epoll, SINKS processes)
# on both sides, so the difference is the sending side. Run from the
# repository root after
#   cargo build --release -p pushgate -p pushgate-loadtest
# Knobs (environment): N (15000), REPEAT (3), WRITERS (1), SINKS (1),
# BIN (target/release). Every run is bounded (sinks stop after 120 s).
set -euo pipefail
N=${N:-15000}
REPEAT=${REPEAT:-3}
WRITERS=${WRITERS:-1}
SINKS=${SINKS:-1}
BIN=${BIN:-target/release}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

line() { # kind rounds json
    python3 - "$@" <<'PY'
import json, sys
kind, rounds, path = sys.argv[1:]
r = json.load(open(path))
lat = r["latency_ms"]
cpu = r["sender_cpu_ms_per_1000"]
sink = r["sink_cpu_ms"] * 1000 / r["frames_expected"]
print(f"{kind:4} rounds {rounds:>2}  p50 {lat['p50']:7.1f} ms  p99 {lat['p99']:7.1f} ms  "
      f"sender {cpu:5.2f} ms/1000  sink {sink:5.2f} ms/1000  "
      f"frames {r['frames_received']}/{r['frames_expected']}")
PY
}

echo "# $(date -u '+%F %T') UTC, load $(cut -d' ' -f1-3 /proc/loadavg), N=$N writers=$WRITERS sinks=$SINKS"
for rounds in 1 20; do
    for i in $(seq "$REPEAT"); do
        "$BIN/pushgate-loadtest" floor -n "$N" --count "$rounds" --threads "$WRITERS" \
            --sinks "$SINKS" --json "$dir/raw.json" >/dev/null 2>&1
        line raw "$rounds" "$dir/raw.json"
        "$BIN/pushgate-loadtest" floor -n "$N" --count "$rounds" --sinks "$SINKS" \
            --gateway-bin "$BIN/pushgate" --json "$dir/gw.json" >/dev/null 2>&1
        line gw "$rounds" "$dir/gw.json"
    done
done
echo "# done $(date -u '+%T') UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
