#!/usr/bin/env bash
# Webhooks: publications through the server API as fast as it answers (PUBLISHERS
# connections), each making a `publication` webhook event for one endpoint whose receiver
# is the bench's own sink (a minimal HTTP/1.1 server answering 200 at once). Three servers
# in turn: no endpoint (the publish path's baseline), one event per request, batches of up
# to 100 (or 20 ms). Server pinned to core 0, the load generator and sink to core 1
# (UNPINNED=1: any core). fsync = "always" (the default) unless FSYNC=never.
# Usage: bench/webhooks.sh [DURATION=5] [RUNS=3] [PUBLISHERS=4]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-5}
RUNS=${2:-3}
PUBLISHERS=${3:-4}
FSYNC=${FSYNC:-always}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
cargo build --release -q -p switchboard
B=./target/release/switchboard
PORT=8451
SINK=127.0.0.1:8452
DIR=$(mktemp -d)
cleanup() { kill "${SPID:-}" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
endpoint() {
  printf '[webhooks]\ndir = "%s/queue-%s"\nfsync = "%s"\n' "$DIR" "$1" "$FSYNC"
  [ "$1" = none ] && return
  printf '[[webhooks.endpoints]]\nurl = "http://%s/"\nsecrets = ["bench-secret-0123456789"]\n' "$SINK"
  printf 'events = ["publication"]\npublications = "all"\nconcurrency = 8\n'
  [ "$1" = batched ] && printf 'batch_max = 100\nbatch_ms = 20\n'
  return 0
}
for i in $(seq "$RUNS"); do
  for mode in none single batched; do
    endpoint "$mode" > "$DIR/$mode.toml"
    $PIN_SERVER $B serve --dev --listen 127.0.0.1:$PORT --config "$DIR/$mode.toml" >"$DIR/log" 2>&1 &
    SPID=$!
    for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
    $PIN_BENCH $B bench webhooks --server 127.0.0.1:$PORT --sink $SINK --rate 0 --duration "$DURATION" \
      --publishers "$PUBLISHERS" --payload 128 --json --server-pid $SPID --channel "bench:wh-$i" \
      --settle-secs 60 2>/dev/null | sed -n "s/^JSON /$mode /p"
    kill $SPID; wait $SPID 2>/dev/null || true
  done
done
