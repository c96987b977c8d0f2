#!/usr/bin/env bash
# Datagrams vs the stream under packet loss: inside a network namespace whose loopback
# drops LOSS percent of UDP packets at random (nftables `numgen random`; this kernel has
# no sch_netem for `tc netem`, which would do the same), SUBS WebTransport subscribers
# receive volatile publications at RATE/s (64 B; the publisher's HTTP requests are TCP and
# stay whole), once as datagrams (`datagrams: true`) and once on the reliable stream,
# RUNS times each. A datagram lost is lost; on the stream a lost packet is sent again
# and holds back what follows it (head-of-line blocking): the tail latency.
# Needs root (ip netns, nft). Usage: bench/wt-loss.sh [LOSS=1] [SUBS=100] [RATE=50] [DURATION=10] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
LOSS=${1:-1}
SUBS=${2:-100}
RATE=${3:-50}
DURATION=${4:-10}
RUNS=${5:-3}
command -v nft >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables; }
cargo build --release -q -p switchboard
B=./target/release/switchboard
NS=sbloss$$
PORT=8432
ip netns add $NS
LOG=$(mktemp)
PIDFILE=$(mktemp)
cleanup() {
  kill "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null || true
  ip netns del $NS 2>/dev/null || true
  rm -f "$LOG" "$PIDFILE"
}
trap cleanup EXIT
ip netns exec $NS ip link set lo up
# Loss on UDP only (QUIC), both directions: the publisher's HTTP requests to the server
# stay lossless, so what is measured is the WebTransport leg alone.
ip netns exec $NS nft add table inet loss
ip netns exec $NS nft "add chain inet loss out { type filter hook output priority 0; }"
ip netns exec $NS nft "add rule inet loss out meta l4proto udp numgen random mod 100 < $LOSS drop"
in_ns() { ip netns exec $NS "$@"; }
# (The server's own pid, for the cleanup: `ip netns exec` may fork.)
ip netns exec $NS bash -c 'echo $$ >"$0"; exec "$1" serve --dev --listen 127.0.0.1:"$2"' "$PIDFILE" "$B" "$PORT" >"$LOG" 2>&1 &
for _ in $(seq 100); do in_ns bash -c "(echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null" && break; sleep 0.1; done
BODY='{"channel":"$CHANNEL","data":$DATA,"volatile":true}'
for i in $(seq "$RUNS"); do
  for mode in datagrams stream; do
    flag=""; [ $mode = datagrams ] && flag="--datagrams"
    in_ns $B bench fanout --server 127.0.0.1:$PORT --transport wt $flag --publish-body "$BODY" \
      --subscribers "$SUBS" --rate "$RATE" --duration "$DURATION" --payload 64 --settle-secs 5 --json \
      --channel "bench:loss-$mode-$i" 2>/dev/null | sed -n "s/^JSON /$mode loss=$LOSS% /p" || true
  done
done
