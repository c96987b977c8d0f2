#!/usr/bin/env python3
"""A real webhook receiver for the tests (crates/server/tests/webhooks.rs).

usage: receiver.py PORT LOG SECRET [--fail N] [--mode 500|timeout|close|hang]

Listens on 127.0.0.1:PORT (0: any free port, printed as "port N" on stdout). The first N
requests fail the way --mode says (500, an answer after 3 s — logged with status "late" —,
a closed connection, no answer at all); later ones get 200. Every request is appended to LOG as one JSON line:
{"id": header id, "events": [event ids], "types": [...], "verified": bool, "status": code}.
The signature check is the Python snippet of docs/webhooks.md, verbatim (a test compares).
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# --- docs/webhooks.md: python ---
import hashlib
import hmac
import time


def verify(secrets, headers, body, tolerance=300):
    """True when one of the `v1=` signatures is HMAC-SHA256(secret, "timestamp.body") for
    one of `secrets` (bytes) and the timestamp is within `tolerance` seconds of now."""
    ts = headers.get("Switchboard-Timestamp", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > tolerance:
        return False
    given = [p[3:] for p in headers.get("Switchboard-Signature", "").split(",") if p.startswith("v1=")]
    for secret in secrets:
        expected = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(expected, g) for g in given):
            return True
    return False
# --- end ---


def main():
    port, log, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
    fail, mode = 0, "500"
    args = sys.argv[4:]
    while args:
        if args[0] == "--fail":
            fail = int(args[1])
        elif args[0] == "--mode":
            mode = args[1]
        args = args[2:]
    lock = threading.Lock()
    seen = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                seen["n"] += 1
                failing = seen["n"] <= fail
            status = 200
            if failing:
                status = {"close": 0, "hang": "hang", "timeout": "late"}.get(mode, 500)
            events = json.loads(body)["events"]
            line = {
                "id": self.headers.get("Switchboard-Id"),
                "events": [e["id"] for e in events],
                "types": [e["type"] for e in events],
                "data": [e["data"] for e in events],
                "verified": verify([secret], self.headers, body),
                "status": status,
            }
            # Logged when it arrives, before any failure is acted out.
            with lock, open(log, "a") as f:
                f.write(json.dumps(line) + "\n")
            if status == 0:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if status == "hang":
                time.sleep(600)
                return
            if status == "late":
                time.sleep(3)  # past the server's timeout
            self.send_response(200 if status == "late" else status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
