#!/usr/bin/env bash
# Side-by-side fan-out: Switchboard, Nchan and Socket.IO, in one run, same machine, same
# load generator, same scenario. Each server is pinned to core 0 and the generator to
# core 1 — or, with UNPINNED=1, both run unpinned on every core, as a user would run
# them. Writes a Markdown table (medians of RUNS runs) to bench/results/ and appends it
# to docs/benchmarks.md. Loopback only; bounded in count and time.
#
#   bench/run-peers.sh [SUBSCRIBERS=5000] [RATE=100] [DURATION=10] [RUNS=3]
#   UNPINNED=1 bench/run-peers.sh 5000 20
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-5000}
RATE=${2:-100}
DURATION=${3:-10}
RUNS=${4:-3}
PAYLOAD=128
ulimit -n "$(ulimit -Hn)"
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then
  PIN_SERVER=""
  PIN_BENCH=""
fi

need_pkg() { dpkg -s "$1" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; }; }
need_pkg nginx libnginx-mod-nchan
[ -d bench/peers/socketio/node_modules/socket.io ] || (cd bench/peers/socketio && npm install --no-audit --no-fund --silent)
cargo build --release -q -p switchboard

OUT=$(mktemp -d)
BENCH="./target/release/switchboard bench"
cleanup() {
  [ -f /tmp/sb-nchan.pid ] && kill "$(cat /tmp/sb-nchan.pid)" 2>/dev/null || true
  kill "${SPID:-}" 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

run_peer() { # name, bench-args…
  local name=$1; shift
  for i in $(seq "$RUNS"); do
    echo "== $name run $i/$RUNS" >&2
    $PIN_BENCH $BENCH fanout --subscribers "$SUBS" --rate "$RATE" --duration "$DURATION" --payload "$PAYLOAD" --json "$@" \
      | sed -n 's/^JSON //p' >> "$OUT/$name.jsonl" || true
  done
}

# Switchboard
$PIN_SERVER ./target/release/switchboard serve --dev --listen 127.0.0.1:8200 >/dev/null 2>&1 &
SPID=$!; wait_port 8200
run_peer switchboard --server 127.0.0.1:8200 --channel bench:fanout --server-pid "$SPID"
kill "$SPID"; wait "$SPID" 2>/dev/null || true

# Nchan
mkdir -p /tmp/sb-nchan-body
$PIN_SERVER nginx -c "$PWD/bench/peers/nchan.conf"; wait_port 8201
NPIDS=$(pgrep -P "$(cat /tmp/sb-nchan.pid)" | paste -sd, -)
run_peer nchan --subscribe-url ws://127.0.0.1:8201/sub/fanout --publish-url 'http://127.0.0.1:8201/pub?id=fanout' \
  --publish-body '$DATA' --server-pid "$NPIDS"
kill "$(cat /tmp/sb-nchan.pid)"; sleep 1

# Socket.IO
(cd bench/peers/socketio && PORT=8202 exec $PIN_SERVER node server.mjs >/dev/null 2>&1) &
SPID=$!; wait_port 8202
NODE_PID=$(pgrep -f "node server.mjs" | head -1)
run_peer socketio --subscribe-url 'ws://127.0.0.1:8202/socket.io/?EIO=4&transport=websocket' --first-frame 40 \
  --publish-url http://127.0.0.1:8202/publish --publish-body '$DATA' --server-pid "$NODE_PID"
kill "$NODE_PID" 2>/dev/null || true

mkdir -p bench/results
RESULT=bench/results/peers-$(date +%Y-%m-%d).md
python3 bench/peers/aggregate.py "$OUT" "$SUBS" "$RATE" "$DURATION" "$RUNS" > "$RESULT"
[ "${UNPINNED:-0}" = 1 ] && sed -i '1s/$/ (unpinned: servers and generator on any core)/' "$RESULT"
cat "$RESULT"
printf '\n' >> docs/benchmarks.md
cat "$RESULT" >> docs/benchmarks.md
echo "appended to docs/benchmarks.md and saved as $RESULT" >&2
