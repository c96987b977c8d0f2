#!/usr/bin/env bash
# MQTT fan-out, Switchboard beside Mosquitto in one run: SUBS MQTT 3.1.1 subscribers (QoS 0)
# on one topic, one MQTT publisher (QoS 0) at RATE publications/s, 128 B payloads, the same
# load generator (`switchboard bench fanout` with mqtt:// URLs) for both; each server pinned
# to core 0, the generator to core 1 (UNPINNED=1: any core); RUNS runs per server.
# Usage: bench/mqtt.sh [SUBS=5000] [RATE=20] [DURATION=10] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-5000}
RATE=${2:-20}
DURATION=${3:-10}
RUNS=${4:-3}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
ulimit -n "$(ulimit -Hn)"
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }
cargo build --release -q -p switchboard
B=./target/release/switchboard
DIR=$(mktemp -d)
SB_PORT=8420
SB_MQTT=18831
MOSQ_PORT=18832
cleanup() { kill "${SPID:-}" "${MPID:-}" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
wait_port() { for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

run() { # name, server pid, subscribe url, publish url
  for i in $(seq "$RUNS"); do
    $PIN_BENCH $B bench fanout --subscribers "$SUBS" --rate "$RATE" --duration "$DURATION" --payload 128 --json \
      --subscribe-url "$3" --publish-url "$4" --server-pid "$2" --channel "mqtt-$1-$i" | sed -n "s/^JSON /$1 /p"
  done
}

# (One publisher connection at RATE/s: the per-connection command rate is raised for it.)
SWITCHBOARD_NAMESPACES__MQTTBENCH__ALLOW_PUBLISH=true SWITCHBOARD_WS__MAX_COMMANDS_PER_SEC=100000 SWITCHBOARD_MQTT__LISTEN=127.0.0.1:$SB_MQTT $PIN_SERVER $B serve --dev --listen 127.0.0.1:$SB_PORT >"$DIR/sb.log" 2>&1 &
SPID=$!
wait_port $SB_MQTT
# (Namespace `mqttbench`: clients may publish, no presence — no join events at connect.)
run switchboard $SPID "mqtt://127.0.0.1:$SB_MQTT/mqttbench/\$CHANNEL" "mqtt://127.0.0.1:$SB_MQTT/mqttbench/\$CHANNEL"
kill $SPID; wait $SPID 2>/dev/null || true; SPID=

cat >"$DIR/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
log_dest none
EOF
$PIN_SERVER mosquitto -c "$DIR/mosquitto.conf" >"$DIR/mosq.log" 2>&1 &
MPID=$!
wait_port $MOSQ_PORT
run mosquitto $MPID "mqtt://127.0.0.1:$MOSQ_PORT/mqttbench/\$CHANNEL" "mqtt://127.0.0.1:$MOSQ_PORT/mqttbench/\$CHANNEL"
