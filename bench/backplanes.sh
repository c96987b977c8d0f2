#!/usr/bin/env bash
# Fan-out across three nodes through each backplane: SUBS WebSocket subscribers of one
# channel spread evenly over the nodes, a publisher at each RATE on the first node —
# every delivery on the other two crossed the backplane. The reference is one in-memory
# node holding all SUBS. A private redis-server, a Redis Cluster of three masters and a
# nats-server -js are started on free ports (nothing of the machine's own is touched).
# Loopback only; bounded.
#
#   bench/backplanes.sh [RATES="50 100 200"] [DURATION=10]   (SUBS=3000 PUBLISHERS=4 in the environment)
#
# "server CPU" counts every Switchboard node *and* the backplane's processes.
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${1:-"50 100 200"}
DURATION=${2:-10}
SUBS=${SUBS:-3000}
PUBLISHERS=${PUBLISHERS:-4}   # publisher connections on the first node, the rate shared among them
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p switchboard
BIN=./target/release/switchboard
tmp=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
REDIS_PID=$!
pids+=("$REDIS_PID")
NATS_PORT=$(free_port)
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$tmp/nats" >/dev/null 2>&1 &
NATS_PID=$!
pids+=("$NATS_PID")
CLUSTER_PORTS=()
CLUSTER_PIDS=()
for _ in 1 2 3; do
  p=$(free_port)
  while (echo >/dev/tcp/127.0.0.1/$((p + 10000))) 2>/dev/null || [ "$p" -ge 55000 ]; do p=$(free_port); done
  mkdir -p "$tmp/rc-$p"
  redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --cluster-enabled yes \
    --cluster-config-file nodes.conf --dir "$tmp/rc-$p" >/dev/null &
  CLUSTER_PIDS+=($!)
  pids+=($!)
  CLUSTER_PORTS+=("$p")
done
wait_port "$REDIS_PORT"
wait_port "$NATS_PORT"
for p in "${CLUSTER_PORTS[@]}"; do wait_port "$p"; done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
for _ in $(seq 200); do
  redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | grep -q cluster_state:ok && break
  sleep 0.1
done
CLUSTER_URL=$(printf 'redis://127.0.0.1:%s,' "${CLUSTER_PORTS[@]}")
CLUSTER_URL=${CLUSTER_URL%,}
CLUSTER_PID_LIST=$(IFS=,; echo "${CLUSTER_PIDS[*]}")

# run KIND NODES BACKPLANE_PIDS RATE [cluster]: one fan-out run, its JSON line on stdout.
run() {
  local kind=$1 n=$2 bp_pid=$3 rate=$4 cluster=${5:-}
  local node_pids=() addrs=() redis_url="redis://127.0.0.1:$REDIS_PORT" redis_cluster=false
  if [ -n "$cluster" ]; then redis_url=$CLUSTER_URL; redis_cluster=true; fi
  for i in $(seq "$n"); do
    local port
    port=$(free_port)
    SWITCHBOARD_BROKER__KIND=$kind \
      SWITCHBOARD_BROKER__REDIS_URL="$redis_url" SWITCHBOARD_BROKER__REDIS_CLUSTER="$redis_cluster" \
      SWITCHBOARD_BROKER__NATS_URL="nats://127.0.0.1:$NATS_PORT" \
      SWITCHBOARD_BROKER__REDIS_PREFIX="bench$rate" SWITCHBOARD_BROKER__NATS_PREFIX="bench$rate" \
      SWITCHBOARD_LIMITS__ACCEPT_RATE_PER_SEC=0 \
      "$BIN" serve --dev --listen "127.0.0.1:$port" >"$tmp/node-$kind-$i.log" 2>&1 &
    node_pids+=($!)
    pids+=($!)
    addrs+=("127.0.0.1:$port")
  done
  for a in "${addrs[@]}"; do
    for _ in $(seq 200); do curl -sf "http://$a/readyz" >/dev/null && break; sleep 0.05; done
  done
  local server_pids
  server_pids=$(IFS=,; echo "${node_pids[*]}${bp_pid:+,$bp_pid}")
  local others
  others=$(IFS=,; echo "${addrs[*]:1}")
  "$BIN" bench fanout --server "${addrs[0]}" ${others:+--nodes "$others"} --subscribers "$SUBS" \
    --rate "$rate" --publishers "$PUBLISHERS" --duration "$DURATION" --payload 128 --channel "bench:bp$rate" \
    --server-pid "$server_pids" --json 2>"$tmp/bench.err" | grep '^JSON' || { cat "$tmp/bench.err" >&2; true; }
  kill "${node_pids[@]}" 2>/dev/null || true
  wait "${node_pids[@]}" 2>/dev/null || true
}

for rate in $RATES; do
  echo "# rate $rate/s, $SUBS subscribers"
  echo "memory (1 node): $(run memory 1 "" "$rate")"
  echo "redis (3 nodes): $(run redis 3 "$REDIS_PID" "$rate")"
  echo "redis cluster (3 nodes): $(run redis 3 "$CLUSTER_PID_LIST" "$rate" cluster)"
  echo "nats (3 nodes):  $(run nats 3 "$NATS_PID" "$rate")"
done
