#!/usr/bin/env bash
# Durable history (serve --data-dir) beside the in-memory broker, one run each:
#  1. publish throughput and latency: PUBLISHERS connections publishing as fast as the
#     server answers (and, second, at RATE/s) to one channel with 10 subscribers, 128 B,
#     for each broker: memory, durable with fsync always / batched / never;
#  2. restart time with RETAINED publications retained (one channel, history_size =
#     RETAINED): the server is killed with SIGKILL and started again; the time until
#     /readyz answers, and the journal replay's own figure from the log.
# Server pinned to core 0, the load generator to core 1 (UNPINNED=1: any core). The data
# directory is on $TMPDIR's filesystem (DATA=dir to choose).
# Usage: bench/durable.sh [DURATION=5] [RATE=2000] [PUBLISHERS=4] [RETAINED=1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-5}
RATE=${2:-2000}
PUBLISHERS=${3:-4}
RETAINED=${4:-1000000}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
cargo build --release -q -p switchboard
B=./target/release/switchboard
PORT=8461
DATA=${DATA:-$(mktemp -d)}
cleanup() { kill -9 "${SPID:-}" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT
start() { # config-file
  $PIN_SERVER $B serve --dev --listen 127.0.0.1:$PORT --config "$1" >"$DATA/log" 2>&1 &
  SPID=$!
  for _ in $(seq 600); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "server did not start" >&2; exit 1
}
for mode in memory always batched never; do
  rm -rf "$DATA/history"; mkdir -p "$DATA/history"
  {
    printf '[namespaces.bench]\nhistory_size = 100\n[broker]\n'
    [ "$mode" != memory ] && printf 'data_dir = "%s/history"\nfsync = "%s"\n' "$DATA" "$mode"
  } > "$DATA/$mode.toml"
  start "$DATA/$mode.toml"
  for rate in 0 "$RATE"; do
    $PIN_BENCH $B bench fanout --server 127.0.0.1:$PORT --subscribers 10 --rate "$rate" --duration "$DURATION" \
      --publishers "$PUBLISHERS" --payload 128 --json --server-pid $SPID --channel "bench:d-$mode-$rate" 2>/dev/null \
      | sed -n "s/^JSON /$mode rate=$rate /p"
  done
  kill $SPID; wait $SPID 2>/dev/null || true
done
# 2. Restart with RETAINED publications retained.
rm -rf "$DATA/history"
printf '[namespaces.bench]\nhistory_size = %s\nhistory_ttl_secs = 86400\n[broker]\ndata_dir = "%s/history"\nfsync = "never"\n' \
  "$RETAINED" "$DATA" > "$DATA/big.toml"
start "$DATA/big.toml"
published=0
while [ "$published" -lt "$RETAINED" ]; do
  $PIN_BENCH $B bench fanout --server 127.0.0.1:$PORT --subscribers 1 --rate 0 --duration 10 --publishers 4 \
    --payload 128 --json --server-pid $SPID --channel bench:big >/dev/null 2>&1 || true
  published=$(curl -fs "http://127.0.0.1:$PORT/api/history?channel=bench:big&limit=1" | sed -n 's/.*"offset":\([0-9]*\).*/\1/p')
done
rss=$(awk '/VmRSS/ {print $2}' /proc/$SPID/status)
kill -9 $SPID; wait $SPID 2>/dev/null || true
journal=$(stat -c %s "$DATA/history/history.journal")
t0=$(date +%s%N)
start "$DATA/big.toml"
t1=$(date +%s%N)
replay=$(sed -n 's/.*took_ms=\([0-9]*\).*/\1/p' "$DATA/log" | head -1)
rss2=$(awk '/VmRSS/ {print $2}' /proc/$SPID/status)
retained=$(curl -fs "http://127.0.0.1:$PORT/api/history?channel=bench:big&limit=1" | sed -n 's/.*"offset":\([0-9]*\).*/\1/p')
echo "restart {\"publications\":$published,\"journal_bytes\":$journal,\"rss_kib_before\":$rss,\"restart_to_ready_ms\":$(( (t1 - t0) / 1000000 )),\"replay_ms\":${replay:-0},\"rss_kib_after\":$rss2,\"offset_after\":$retained}"
