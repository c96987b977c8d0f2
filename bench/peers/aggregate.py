"""Medians of the side-by-side runs as a Markdown table (used by bench/run-peers.sh)."""
import json
import os
import statistics
import subprocess
import sys

out, subs, rate, duration, runs = sys.argv[1:]


def load(name):
    path = os.path.join(out, name + ".jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


rows = {n: load(n) for n in ["switchboard", "nchan", "socketio"]}


def med(name, key):
    values = [r[key] for r in rows[name] if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (r.stdout.strip() or r.stderr.strip() or "?").splitlines()[0]


cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
sb_version = sh("./target/release/switchboard --version")
nginx_version = sh("nginx -v 2>&1")
nchan_version = sh("dpkg-query -W -f='${Version}' libnginx-mod-nchan")
sio_version = sh("node -p \"require('./bench/peers/socketio/node_modules/socket.io/package.json').version\"")
node_version = sh("node --version")

print(f"### Side by side: fan-out, {subs} subscribers, {rate} publications/s, 128 B, {duration} s, median of {runs} runs\n")
print(
    f"Machine: {os.cpu_count()} vCPU {cpu}; each server pinned to core 0, the load generator to core 1. "
    f"Versions: {sb_version}, {nginx_version} + nchan {nchan_version}, socket.io {sio_version} on node {node_version}.\n"
)
print(f"Command: `bench/run-peers.sh {subs} {rate} {duration} {runs}`\n")
print("| server | deliveries/s | deliveries per server CPU-s | p50 ms | p99 ms | not delivered within 10 s | server RSS MiB |")
print("|---|---|---|---|---|---|---|")
for n in rows:
    print(
        f"| {n} | {med(n, 'deliveries_per_sec'):,.0f} | {med(n, 'deliveries_per_cpu_sec'):,.0f} | "
        f"{med(n, 'latency_p50_ms'):.1f} | {med(n, 'latency_p99_ms'):.1f} | {med(n, 'lost'):,.0f} | {med(n, 'server_rss_mib'):.1f} |"
    )
sb = med("switchboard", "deliveries_per_cpu_sec")
print()
for n in ["nchan", "socketio"]:
    o = med(n, "deliveries_per_cpu_sec")
    if o == o and o > 0:
        print(f"- Switchboard ÷ {n}, deliveries per server CPU-second: **{sb / o:.1f}×**")
