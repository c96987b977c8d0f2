#!/usr/bin/env bash
# WebTransport beside WebSocket, one server, one run: SUBS subscribers on one channel over
# each transport in turn, a publisher at RATE/s through the server API, 128 B payloads;
# server pinned to core 0, the load generator to core 1 (UNPINNED=1: any core).
# Usage: bench/wt.sh [SUBS=1000] [RATE=20] [DURATION=10] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-1000}
RATE=${2:-20}
DURATION=${3:-10}
RUNS=${4:-3}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p switchboard
B=./target/release/switchboard
PORT=8431
LOG=$(mktemp)
cleanup() { kill "${SPID:-}" 2>/dev/null || true; rm -f "$LOG"; }
trap cleanup EXIT
# (--dev: WebTransport on the same port number over UDP, with the development certificate.)
$PIN_SERVER $B serve --dev --listen 127.0.0.1:$PORT >"$LOG" 2>&1 &
SPID=$!
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
for i in $(seq "$RUNS"); do
  for t in ws wt; do
    $PIN_BENCH $B bench fanout --server 127.0.0.1:$PORT --transport $t --subscribers "$SUBS" --rate "$RATE" \
      --duration "$DURATION" --payload 128 --json --server-pid $SPID --channel "bench:wt-$t-$i" 2>/dev/null \
      | sed -n "s/^JSON /$t /p"
  done
done
