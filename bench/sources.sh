#!/usr/bin/env bash
# Publication sources to SUBS WebSocket subscribers of one channel: N rows inserted into a
# PostgreSQL outbox (statements of 100 rows, each its own transaction) and N messages
# published to a RabbitMQ queue (Python pika), each published by Switchboard to the
# channel. Reports publications/s (first delivery to last) and latency from the
# producer's stamp (`{"t":<Unix µs>}`, taken when the row or message is made) to the
# subscriber. Memory broker; server on core 0, listener and producer on core 1
# (UNPINNED=1: any core). Needs PostgreSQL (127.0.0.1:5432, trust) and RabbitMQ
# (127.0.0.1:5672, guest/guest), as the tests do.
# Usage: bench/sources.sh [SUBS=1000] [N=20000]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-1000}
N=${2:-20000}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
ulimit -n "$(ulimit -Hn)"
python3 -c 'import pika' 2>/dev/null || pip3 install -q pika || pip3 install -q --break-system-packages pika
cargo build --release -q -p switchboard
B=./target/release/switchboard
PORT=8481
T=sb_bench_outbox_$$
Q=sb_bench_queue_$$
DIR=$(mktemp -d)
PSQL="psql -h 127.0.0.1 -U postgres -q -v ON_ERROR_STOP=1"
cleanup() {
  kill "${SPID:-}" "${LPID:-}" 2>/dev/null || true
  $PSQL -c "DROP TABLE IF EXISTS $T" >/dev/null 2>&1 || true
  python3 -c "import pika; c=pika.BlockingConnection(); c.channel().queue_delete('$Q')" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
# The outbox, with the DDL of docs/sources.md.
awk '/^```sql$/ && !n++ {f=1; next} f && /^```$/ {exit} f' docs/sources.md | sed "s/switchboard_outbox/$T/g" | $PSQL >/dev/null
python3 -c "import pika; c=pika.BlockingConnection(); c.channel().queue_declare('$Q')"
cat > "$DIR/config.toml" <<TOML
[[sources]]
kind = "postgres_outbox"
url = "postgres://postgres@127.0.0.1:5432/postgres"
table = "$T"
notify = "$T"
[[sources]]
kind = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "$Q"
TOML
$PIN_SERVER $B serve --dev --listen 127.0.0.1:$PORT --config "$DIR/config.toml" >"$DIR/log" 2>&1 &
SPID=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
for source in postgres rabbitmq; do
  $PIN_BENCH $B bench listen --server 127.0.0.1:$PORT --subscribers "$SUBS" --expect "$N" \
    --channel "bench:src-$source" --json --server-pid $SPID --settle-secs 180 >"$DIR/out" 2>"$DIR/err" &
  LPID=$!
  for _ in $(seq 600); do grep -q '^ready' "$DIR/err" && break; sleep 0.1; done
  if [ "$source" = postgres ]; then
    for _ in $(seq $((N / 100))); do
      echo "INSERT INTO $T (channel, data) SELECT 'bench:src-postgres', json_build_object('t', (extract(epoch from clock_timestamp()) * 1000000)::bigint, 'p', repeat('x', 100)) FROM generate_series(1, 100);"
    done | $PIN_BENCH $PSQL >/dev/null
  else
    $PIN_BENCH python3 - "$Q" "$N" <<'PY'
import json, sys, time, pika
q, n = sys.argv[1], int(sys.argv[2])
ch = pika.BlockingConnection().channel()
for i in range(n):
    body = json.dumps({"channel": "bench:src-rabbitmq", "data": {"t": int(time.time() * 1e6), "p": "x" * 100}})
    ch.basic_publish(exchange="", routing_key=q, body=body, properties=pika.BasicProperties(message_id=f"m-{i}"))
PY
  fi
  wait $LPID || true
  sed -n "s/^JSON /$source /p" "$DIR/out"
done
