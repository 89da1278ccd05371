#!/usr/bin/env bash
# Re-measures the rows of BENCHMARKS.md's summary table, one after the
# other, REPEAT times each, and prints the lines that matter. Each step is
# one `pushgate-loadtest bench` (or `floor`) command that starts and stops
# its own gateway, so every run is bounded. Run from the repository root
# after
#   cargo build --release -p pushgate -p pushgate-loadtest
# on a machine nobody else is using (the figures are wall-clock and CPU).
# Knobs (environment): N (15000), REPEAT (2), BIN (target/release).
# Takes about 10 minutes with the defaults.
set -euo pipefail
N=${N:-15000}
REPEAT=${REPEAT:-2}
BIN=${BIN:-target/release}
LT="$BIN/pushgate-loadtest"
GW="$BIN/pushgate"

step() { # title, then the command
    local title=$1
    shift
    echo "== $title  ($(date -u +%T) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
    echo "   $*"
    "$@" 2>&1 | grep -E "ramp |latency|api p50|bytes per connection|rss growth|cpu ms per 1000|load client|over [0-9.]+s|recovered|back in|all back|round|redelivered|stored|result:" | sed 's/^/   /' || true
}

for i in $(seq "$REPEAT"); do
    step "idle ws, $N" "$LT" bench idle -n "$N" --ramp 0 --hold 3 --gateway-bin "$GW" -q
    step "idle wss, $N" "$LT" bench idle -n "$N" --ramp 0 --hold 3 --tls --gateway-bin "$GW" -q
done
for i in $(seq "$REPEAT"); do
    step "20 broadcasts to $N" "$LT" bench broadcast -n "$N" --count 20 --ramp 0 --hold 2 --gateway-bin "$GW" -q
    step "one broadcast to $N" "$LT" bench broadcast -n "$N" --count 1 --ramp 0 --hold 2 --gateway-bin "$GW" -q
done
REPEAT=$REPEAT N=$N BIN=$BIN "$(dirname "$0")/floor.sh"
for i in $(seq "$REPEAT"); do
    step "device pushes to $N at 5000/s" "$LT" bench device -n "$N" --rate 5000 --duration 10 --ramp 0 --gateway-bin "$GW" -q
    step "storm, $N" "$LT" bench storm -n "$N" --ramp 0 --gateway-bin "$GW" -q
done
for rate in 20000 40000; do
    for i in $(seq "$REPEAT"); do
        step "durable pushes, redb, batch 100, $rate/s offered" "$LT" bench device --store redb -n 1000 \
            --api-conns 128 --rate "$rate" --duration 8 --batch 100 --gateway-bin "$GW" -q
    done
done
echo "== done $(date -u +%T) UTC"
