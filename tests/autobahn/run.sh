#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzingclient) against the conformance echo endpoint `/ws/echo`,
# excluding the long compression suites 12.* and 13.*. Needs Python 2.7 (pyenv's 2.7.18
# here); installs the suite into /tmp/ab on first use. Reports go to artifacts/autobahn/.
set -euo pipefail
cd "$(dirname "$0")"
PY2=${PY2:-$HOME/.pyenv/versions/2.7.18/bin/python}
[ -d /tmp/ab/lib/autobahntestsuite ] || "$PY2" -m pip install -q --target /tmp/ab/lib autobahntestsuite
(cd ../.. && cargo build --release -q -p switchboard)
# The suite sends messages up to 16 MiB; /ws/echo takes what limits.max_message_bytes allows.
SWITCHBOARD_LIMITS__MAX_MESSAGE_BYTES=16777216 ../../target/release/switchboard serve --dev --listen 127.0.0.1:8400 >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
sleep 1
# site.addsitedir, not PYTHONPATH: the zope namespace package needs its .pth processed.
"$PY2" -c "import site, sys; site.addsitedir('/tmp/ab/lib'); from autobahntestsuite import wstest; sys.argv = ['wstest', '-m', 'fuzzingclient', '-s', 'fuzzingclient.json']; wstest.run()"
python3 - <<'PY'
import json
r = json.load(open("../../artifacts/autobahn/index.json"))["switchboard"]
counts = {}
for case, v in r.items():
    counts[v["behavior"]] = counts.get(v["behavior"], 0) + 1
print("autobahn:", counts)
bad = sorted((c, v["behavior"]) for c, v in r.items() if v["behavior"] not in ("OK", "NON-STRICT", "INFORMATIONAL"))
for c, b in bad: print("  ", c, b)
PY
