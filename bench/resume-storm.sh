#!/usr/bin/env bash
# Resume storm: N WebSocket clients resume one channel at once from the start of its
# epoch, each replayed M publications (the same shared, encoded-once deliveries). Reports
# the server's peak RSS above what it held before, and the bytes it wrote.
# Loopback only; bounded.
#   bench/resume-storm.sh [CLIENTS=5000] [MESSAGES=100]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
M=${2:-100}
PORT=8191
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p switchboard
./target/release/switchboard serve --dev --listen 127.0.0.1:$PORT >/tmp/sb-resume.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf http://127.0.0.1:$PORT/readyz >/dev/null && break; sleep 0.1; done
PAD=$(head -c 100 /dev/zero | tr '\0' x)
EPOCH=""
for _ in $(seq "$M"); do
  EPOCH=$(curl -sf -X POST http://127.0.0.1:$PORT/api/publish -d "{\"channel\":\"bench:resume\",\"data\":\"$PAD\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["epoch"])')
done
rss() { awk "/$1/ {print \$2}" /proc/$SERVER/status; }
metric() { curl -sf http://127.0.0.1:$PORT/metrics | awk -v m="$1" '$1 == m {print $2}'; }
BEFORE=$(rss VmRSS)
BYTES0=$(metric switchboard_bytes_out_total)
./target/release/switchboard bench idle --server 127.0.0.1:$PORT --connections "$N" --hold 5 \
  --subscribe-url "ws://127.0.0.1:$PORT/ws?channel=bench:resume&since=$EPOCH:0" >/tmp/sb-resume-bench.log 2>&1
PEAK=$(rss VmHWM)
BYTES=$(metric switchboard_bytes_out_total)
echo "clients:                 $N, each replayed $M publications"
echo "server RSS before:       ${BEFORE} kB"
echo "server peak RSS:         ${PEAK} kB (+$((PEAK - BEFORE)) kB, $(((PEAK - BEFORE) * 1024 / N)) B per client)"
echo "bytes written in storm:  $(python3 -c "print(int(float('$BYTES') - float('$BYTES0')))")"
