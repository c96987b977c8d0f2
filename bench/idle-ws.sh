#!/usr/bin/env bash
# Server RSS per idle WebSocket (or, with TRANSPORT=sse, SSE; TRANSPORT=mqtt, MQTT 3.1.1)
# connection at N connections, opened by several load generator processes (one process
# may hold < 20,000 files here).
# Usage: [TRANSPORT=ws|sse|mqtt] [BIN=path] [SETTLE=2] bench/idle-ws.sh [TOTAL=19000] [PROCS=2]
# (BIN: a server binary to measure instead of building this checkout's, e.g. an earlier
# build kept for a before/after run. SETTLE: seconds to let the connections sit before
# measuring — an idle connection parks without a task at once, one that was busy at
# first by its first heartbeat (25 s): SETTLE=30 measures after it.)
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-19000}
PROCS=${2:-2}
TRANSPORT=${TRANSPORT:-ws}
SETTLE=${SETTLE:-2}
PORT=8190
ulimit -n "$(ulimit -Hn)"
if [ -z "${BIN:-}" ]; then cargo build --release -q -p switchboard; fi
BIN=${BIN:-./target/release/switchboard}
MQTT_PORT=8191
SWITCHBOARD_MQTT__LISTEN=127.0.0.1:$MQTT_PORT taskset -c 0 "$BIN" serve --dev --listen 127.0.0.1:$PORT >/tmp/sb-idle.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; kill $(jobs -p) 2>/dev/null || true' EXIT
sleep 0.5
rss() { awk '/VmRSS/ {print $2}' /proc/$SERVER/status; }
BEFORE=$(rss)
PER=$((TOTAL / PROCS))
for _ in $(seq "$PROCS"); do
  if [ "$TRANSPORT" = mqtt ]; then
    TARGET=(--subscribe-url "mqtt://127.0.0.1:$MQTT_PORT/idle")
  else
    TARGET=(--server 127.0.0.1:$PORT --transport "$TRANSPORT")
  fi
  taskset -c 1 ./target/release/switchboard bench idle "${TARGET[@]}" --connections "$PER" --hold $((SETTLE + 30)) >/tmp/sb-idle-bench.$_.log 2>&1 &
done
START=$(date +%s.%N)
# Wait until the server holds every connection (its fds), bounded at 60 s.
for _ in $(seq 600); do
  FDS=$(ls /proc/$SERVER/fd | wc -l)
  [ "$FDS" -ge $((PER * PROCS)) ] && break
  sleep 0.1
done
END=$(date +%s.%N)
sleep "$SETTLE"
AFTER=$(rss)
CONNS=$(( $(ls /proc/$SERVER/fd | wc -l) - (FDS - PER * PROCS) ))
echo "connections:        $((PER * PROCS)) (server fds: $(ls /proc/$SERVER/fd | wc -l))"
echo "open time:          $(echo "$END - $START" | bc) s"
echo "server RSS before:  ${BEFORE} kB"
echo "server RSS after:   ${AFTER} kB"
echo "RSS per connection: $(( (AFTER - BEFORE) * 1024 / (PER * PROCS) )) B"
