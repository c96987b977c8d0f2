#!/usr/bin/env bash
# TLS figures, every one from the same server process in one run:
#   1. fan-out over wss:// against ws:// (the same server: ws:// subscribers on its plain
#      listener, wss:// on its TLS listener), alternating, RUNS of each;
#   2. TLS handshakes per second and per server CPU-second (`bench idle` opening N wss://
#      connections: each is a TCP connect, a TLS 1.3 handshake and a WebSocket upgrade);
#   3. server RSS per idle wss:// connection at N.
# Server pinned to core 0, load generator to core 1 (UNPINNED=1: any core).
# Usage: bench/tls.sh [SUBS=5000] [RATE=20] [DURATION=10] [RUNS=3] [IDLE=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-5000}
RATE=${2:-20}
DURATION=${3:-10}
RUNS=${4:-3}
IDLE=${5:-10000}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p switchboard
B=./target/release/switchboard
DIR=$(mktemp -d)
$B cert dev --dir "$DIR" >/dev/null
TLS_PORT=8410
PLAIN_PORT=8411
SWITCHBOARD_TLS__CERT=$DIR/cert.pem SWITCHBOARD_TLS__KEY=$DIR/key.pem \
  SWITCHBOARD_TLS__HTTP_LISTEN=127.0.0.1:$PLAIN_PORT SWITCHBOARD_TLS__HTTP_MODE=serve \
  $PIN_SERVER $B serve --dev --listen 127.0.0.1:$TLS_PORT >/tmp/sb-tls.log 2>&1 &
SPID=$!
trap 'kill $SPID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$PLAIN_PORT) 2>/dev/null && break; sleep 0.1; done
PUBLISH=(--publish-url "http://127.0.0.1:$PLAIN_PORT/api/publish")

echo "## fan-out: $SUBS subscribers, $RATE publications/s, ${DURATION}s, $RUNS runs each"
for i in $(seq "$RUNS"); do
  for mode in ws wss; do
    if [ $mode = ws ]; then TARGET=(--server 127.0.0.1:$PLAIN_PORT); else TARGET=(--server 127.0.0.1:$TLS_PORT --tls-ca "$DIR/ca.pem"); fi
    $PIN_BENCH $B bench fanout "${TARGET[@]}" "${PUBLISH[@]}" --channel "bench:tls-$mode-$i" --subscribers "$SUBS" \
      --rate "$RATE" --duration "$DURATION" --server-pid $SPID --json | sed -n "s/^JSON /$mode /p"
  done
done

echo "## handshakes and idle memory: $IDLE wss:// connections"
cpu() { awk '{print $14 + $15}' /proc/$SPID/stat; }
rss() { awk '/VmRSS/ {print $2}' /proc/$SPID/status; }
sleep 1
RSS0=$(rss); CPU0=$(cpu); T0=$(date +%s.%N)
FDS0=$(ls /proc/$SPID/fd | wc -l)
$PIN_BENCH $B bench idle --server 127.0.0.1:$TLS_PORT --tls-ca "$DIR/ca.pem" --connections "$IDLE" --hold 20 \
  --channel bench:tls-idle >/tmp/sb-tls-idle.log 2>&1 &
for _ in $(seq 1200); do
  [ $(( $(ls /proc/$SPID/fd | wc -l) - FDS0 )) -ge "$IDLE" ] && break
  sleep 0.05
done
T1=$(date +%s.%N); CPU1=$(cpu)
sleep 3
RSS1=$(rss)
HZ=$(getconf CLK_TCK)
echo "connections:                 $IDLE"
echo "open time:                   $(echo "$T1 - $T0" | bc) s"
echo "handshakes per second:       $(echo "$IDLE / ($T1 - $T0)" | bc)"
echo "server CPU while opening:    $(echo "scale=2; ($CPU1 - $CPU0) / $HZ" | bc) s"
echo "handshakes per server CPU-s: $(echo "$IDLE * $HZ / ($CPU1 - $CPU0)" | bc)"
echo "server RSS per connection:   $(( (RSS1 - RSS0) * 1024 / IDLE )) B"
wait
