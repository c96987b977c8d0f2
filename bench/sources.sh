#!/usr/bin/env bash
# Publication sources to SUBS WebSocket subscribers of one channel: N rows inserted into a
# PostgreSQL outbox (statements of 100 rows, each its own transaction), N messages
# published to a RabbitMQ queue (Python pika), N entries added to a Redis Stream
# (redis-py, pipelines of 100) and N messages published to a NATS JetStream stream
# (nats-py, 100 acks awaited at a time; a nats-server -js of the bench's own on port
# 8482), each published by Switchboard to the channel. Reports
# publications/s (first delivery to last) and latency from the producer's stamp
# (`{"t":<Unix µs>}`, taken when the row, message or entry is made) to the subscriber.
# Memory broker; server on core 0, listener and producer on core 1 (UNPINNED=1: any
# core). Needs PostgreSQL (127.0.0.1:5432, trust), RabbitMQ (127.0.0.1:5672,
# guest/guest) and Redis (127.0.0.1:6379), as the tests do.
# RATE=R paces the producers instead: one row per transaction (one INSERT, then
# pg_sleep(1/R)), one message or entry every 1/R s, so latency is a source's own
# delay (commit → NOTIFY → claim → publish → fan-out), not queueing behind a burst.
# Usage: [RATE=R] bench/sources.sh [SUBS=1000] [N=20000]
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${1:-1000}
N=${2:-20000}
RATE=${RATE:-0}
PIN_SERVER="taskset -c 0"
PIN_BENCH="taskset -c 1"
if [ "${UNPINNED:-0}" = 1 ]; then PIN_SERVER=""; PIN_BENCH=""; fi
ulimit -n "$(ulimit -Hn)"
python3 -c 'import pika, redis, nats' 2>/dev/null || pip3 install -q pika redis nats-py ||
  pip3 install -q --break-system-packages pika redis nats-py
cargo build --release -q -p switchboard
B=./target/release/switchboard
PORT=8481
T=sb_bench_outbox_$$
Q=sb_bench_queue_$$
S=sb_bench_stream_$$
DIR=$(mktemp -d)
PSQL="psql -h 127.0.0.1 -U postgres -q -v ON_ERROR_STOP=1"
NATS_PORT=8482
cleanup() {
  kill "${SPID:-}" "${LPID:-}" "${NPID:-}" 2>/dev/null || true
  $PSQL -c "DROP TABLE IF EXISTS $T" >/dev/null 2>&1 || true
  python3 -c "import pika; c=pika.BlockingConnection(); c.channel().queue_delete('$Q')" 2>/dev/null || true
  redis-cli -p 6379 DEL "$S" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
# The outbox, with the DDL of docs/sources.md.
awk '/^```sql$/ && !n++ {f=1; next} f && /^```$/ {exit} f' docs/sources.md | sed "s/switchboard_outbox/$T/g" | $PSQL >/dev/null
python3 -c "import pika; c=pika.BlockingConnection(); c.channel().queue_declare('$Q')"
# A NATS server with JetStream of the bench's own, and its stream.
nats-server -js -a 127.0.0.1 -p $NATS_PORT -sd "$DIR/nats" >/dev/null 2>&1 &
NPID=$!
python3 - "$NATS_PORT" <<'PY'
import asyncio, sys, nats
async def main():
    for _ in range(100):
        try:
            nc = await nats.connect(f"nats://127.0.0.1:{sys.argv[1]}")
            break
        except Exception:
            await asyncio.sleep(0.1)
    await nc.jetstream().add_stream(name="SBBENCH", subjects=["sbbench.>"])
    await nc.close()
asyncio.run(main())
PY
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
[[sources]]
kind = "redis_stream"
url = "redis://127.0.0.1:6379"
stream = "$S"
[[sources]]
kind = "nats_jetstream"
url = "nats://127.0.0.1:$NATS_PORT"
stream = "SBBENCH"
TOML
$PIN_SERVER $B serve --dev --listen 127.0.0.1:$PORT --config "$DIR/config.toml" >"$DIR/log" 2>&1 &
SPID=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
for source in postgres rabbitmq redis nats; do
  $PIN_BENCH $B bench listen --server 127.0.0.1:$PORT --subscribers "$SUBS" --expect "$N" \
    --channel "bench:src-$source" --json --server-pid $SPID --settle-secs 180 >"$DIR/out" 2>"$DIR/err" &
  LPID=$!
  for _ in $(seq 600); do grep -q '^ready' "$DIR/err" && break; sleep 0.1; done
  if [ "$source" = postgres ] && [ "$RATE" != 0 ]; then
    for _ in $(seq "$N"); do
      echo "INSERT INTO $T (channel, data) VALUES ('bench:src-postgres', json_build_object('t', (extract(epoch from clock_timestamp()) * 1000000)::bigint, 'p', repeat('x', 100)));"
      echo "SELECT pg_sleep(1.0 / $RATE);"
    done | $PIN_BENCH $PSQL >/dev/null
  elif [ "$source" = postgres ]; then
    for _ in $(seq $((N / 100))); do
      echo "INSERT INTO $T (channel, data) SELECT 'bench:src-postgres', json_build_object('t', (extract(epoch from clock_timestamp()) * 1000000)::bigint, 'p', repeat('x', 100)) FROM generate_series(1, 100);"
    done | $PIN_BENCH $PSQL >/dev/null
  elif [ "$source" = nats ]; then
    $PIN_BENCH python3 - "$NATS_PORT" "$N" "$RATE" <<'PY'
import asyncio, json, sys, time, nats
port, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
async def main():
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream()
    start = time.monotonic()
    pending = []
    for i in range(n):
        if rate:
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        body = json.dumps({"channel": "bench:src-nats", "data": {"t": int(time.time() * 1e6), "p": "x" * 100}})
        pending.append(js.publish("sbbench.all", body.encode()))
        if rate or len(pending) == 100:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await nc.close()
asyncio.run(main())
PY
  elif [ "$source" = redis ]; then
    $PIN_BENCH python3 - "$S" "$N" "$RATE" <<'PY'
import json, sys, time, redis
s, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
r = redis.Redis()
start = time.monotonic()
pipe = r.pipeline(transaction=False)
for i in range(n):
    if rate:
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    data = json.dumps({"t": int(time.time() * 1e6), "p": "x" * 100})
    pipe.xadd(s, {"channel": "bench:src-redis", "data": data})
    if rate or i % 100 == 99:
        pipe.execute()
pipe.execute()
PY
  else
    $PIN_BENCH python3 - "$Q" "$N" "$RATE" <<'PY'
import json, sys, time, pika
q, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ch = pika.BlockingConnection().channel()
start = time.monotonic()
for i in range(n):
    if rate:
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    body = json.dumps({"channel": "bench:src-rabbitmq", "data": {"t": int(time.time() * 1e6), "p": "x" * 100}})
    ch.basic_publish(exchange="", routing_key=q, body=body, properties=pika.BasicProperties(message_id=f"m-{i}"))
PY
  fi
  wait $LPID || true
  sed -n "s/^JSON /$source /p" "$DIR/out"
done
