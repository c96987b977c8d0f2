#!/usr/bin/env bash
# MQTT issue scenario, Switchboard beside Mosquitto in one run: PUBS publishers → SUBS
# subscribers on one topic, 16 B payloads, QoS 0 and QoS 1 (subscriptions and
# publications; subscribers acknowledge, each QoS 1 publisher waits for its PUBACK), at
# each total rate of RATES publications/s. Prints one JSON line per run; the maximum rate
# of a server is the highest it delivered in full (nothing lost, deliveries/s within 5%
# of rate × subscribers). Server pinned to core 0, generator to core 1 (UNPINNED=1: any
# core).
# Usage: bench/mqtt-rates.sh [SUBS=1000] [PUBS=5] [DURATION=10] ["RATES"="25 50 100 200 400 800"] [QOS="0 1"]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-1000}
PUBS=${2:-5}
DURATION=${3:-10}
RATES=${4:-25 50 100 200 400 800}
QOS_LEVELS=${5:-0 1}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
ulimit -n "$(ulimit -Hn)"
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }
cargo build --release -q -p switchboard
B=./target/release/switchboard
DIR=$(mktemp -d)
SB_PORT=8421
SB_MQTT=18833
MOSQ_PORT=18834
cleanup() { kill "${SPID:-}" "${MPID:-}" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

run() { # name, server pid, port
  for qos in $QOS_LEVELS; do
    for rate in $RATES; do
      local url="mqtt://127.0.0.1:$3/mqttbench/\$CHANNEL"
      $PIN_BENCH $B bench fanout --subscribers "$SUBS" --publishers "$PUBS" --qos "$qos" --rate "$rate" \
        --duration "$DURATION" --payload 16 --json --subscribe-url "$url" --publish-url "$url" \
        --server-pid "$2" --channel "rates-$1-$qos-$rate" 2>/dev/null | sed -n "s/^JSON /$1 qos=$qos rate=$rate /p"
    done
  done
}

# (Publisher connections at up to RATE/PUBS each: the per-connection command rate is
# raised for them. Namespace `mqttbench`: clients may publish, no presence.)
SWITCHBOARD_NAMESPACES__MQTTBENCH__ALLOW_PUBLISH=true SWITCHBOARD_WS__MAX_COMMANDS_PER_SEC=100000 \
  SWITCHBOARD_MQTT__LISTEN=127.0.0.1:$SB_MQTT $PIN_SERVER $B serve --dev --listen 127.0.0.1:$SB_PORT >"$DIR/sb.log" 2>&1 &
SPID=$!
wait_port $SB_MQTT
run switchboard $SPID $SB_MQTT
kill $SPID; wait $SPID 2>/dev/null || true; SPID=

cat >"$DIR/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
max_connections -1
max_inflight_messages 20
max_queued_messages 1000
persistence false
log_dest none
EOF
$PIN_SERVER mosquitto -c "$DIR/mosquitto.conf" >"$DIR/mosq.log" 2>&1 &
MPID=$!
wait_port $MOSQ_PORT
run mosquitto $MPID $MOSQ_PORT
