#!/usr/bin/env bash
# Tenant isolation, one command: app b's device-push latency alone, then
# while app a broadcasts to N devices. Starts its own gateway (memory
# store, loopback ports 18080/18081), stops it at the end; every run is
# bounded. Run from the repository root after
#   cargo build --release -p pushgate -p pushgate-loadtest
# Knobs (environment): N (app a's devices, 15000), BROADCASTS (100),
# INTERVAL_MS (100: ten broadcasts a second), RATE (app b's pushes/s, 500),
# DURATION (seconds of app b's pushes, 10).
set -euo pipefail
N=${N:-15000}
BROADCASTS=${BROADCASTS:-100}
INTERVAL_MS=${INTERVAL_MS:-100}
RATE=${RATE:-500}
DURATION=${DURATION:-10}
BIN=${BIN:-target/release}

dir=$(mktemp -d)
gw=
cleanup() {
    [ -n "$gw" ] && kill "$gw" 2>/dev/null && wait "$gw" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/pushgate.toml" <<TOML
[device]
listen = "127.0.0.1:18080"
max_pending_handshakes = 16384
[api]
listen = "127.0.0.1:18081"
[store]
kind = "memory"
[shutdown]
drain_secs = 1
[[app]]
id = "a"
device_secret = "isolation-secret-a-0123456789"
api_keys = ["isolation-key-a"]
[[app]]
id = "b"
device_secret = "isolation-secret-b-0123456789"
api_keys = ["isolation-key-b"]
TOML

"$BIN/pushgate" serve --config "$dir/pushgate.toml" 2>"$dir/gateway.log" &
gw=$!
for _ in $(seq 100); do
    curl -sf http://127.0.0.1:18081/healthz >/dev/null && break
    sleep 0.1
done

lt=("$BIN/pushgate-loadtest" run --url ws://127.0.0.1:18080/v1/connect --api http://127.0.0.1:18081)
b=(device --app b --secret isolation-secret-b-0123456789 --api-key isolation-key-b
   --device-prefix iso-b -n 200 --rate "$RATE" --duration "$DURATION" --hold 1)

echo "== app b alone: $RATE device pushes/s for $DURATION s"
"${lt[@]}" "${b[@]}" >"$dir/alone.txt" 2>&1 || true
grep -E "latency|api p50|pushes|lost|dup" "$dir/alone.txt" || cat "$dir/alone.txt"

echo "== app b while app a broadcasts to $N devices ($BROADCASTS broadcasts, ${INTERVAL_MS} ms apart)"
"${lt[@]}" broadcast --app a --secret isolation-secret-a-0123456789 --api-key isolation-key-a \
    --device-prefix iso-a -n "$N" --ramp 0 --count "$BROADCASTS" --interval-ms "$INTERVAL_MS" \
    --hold 1 >"$dir/a.txt" 2>&1 &
a=$!
# Start app b's pushes once app a's devices are up and its broadcasts run.
for _ in $(seq 600); do
    up=$(curl -sf http://127.0.0.1:18081/metrics | awk '/^pushgate_connections\{app="a"\}/ {print $2}')
    [ "${up:-0}" -ge "$N" ] && break
    sleep 0.1
done
"${lt[@]}" "${b[@]}" >"$dir/during.txt" 2>&1 || true
wait "$a" || true
grep -E "latency|api p50|pushes|lost|dup" "$dir/during.txt" || cat "$dir/during.txt"
echo "-- app a:"
grep -E "deliver|latency|lost" "$dir/a.txt" || tail -n 20 "$dir/a.txt"
