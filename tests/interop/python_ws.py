"""Interop: the independent Python `websockets` client against Switchboard.

Usage: python3 python_ws.py HOST:PORT   (exits non-zero on any failure)
"""
import asyncio
import json
import sys
import urllib.request

import websockets

HOST = sys.argv[1]
CHANNEL = "interop:python"


def publish(data):
    req = urllib.request.Request(
        f"http://{HOST}/api/publish",
        data=json.dumps({"channel": CHANNEL, "data": data}).encode(),
        headers={"content-type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req))


PUSHES = []  # pushes that arrived while waiting for a reply


async def call(ws, cmd, _ids=[0]):
    _ids[0] += 1
    cmd["id"] = _ids[0]
    await ws.send(json.dumps(cmd))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("id") == cmd["id"]:
            return msg
        PUSHES.append(msg)


async def next_pub(ws):
    while True:
        msg = PUSHES.pop(0) if PUSHES else json.loads(await asyncio.wait_for(ws.recv(), 10))
        if "pub" in msg:
            return msg["pub"]


async def main():
    # websockets offers permessage-deflate by default.
    async with websockets.connect(f"ws://{HOST}/ws", subprotocols=["switchboard.v1"]) as ws:
        assert ws.subprotocol == "switchboard.v1", ws.subprotocol
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate"), f"deflate not negotiated: {ext!r}"
        hello = await call(ws, {"cmd": "connect", "client": {"name": "python-websockets"}})
        assert hello["ok"]["version"] == "v1", hello
        sub = await call(ws, {"cmd": "subscribe", "channel": CHANNEL})
        assert sub["ok"]["recovered"] is True, sub
        first = publish({"n": 1, "text": "x" * 500})
        p = await next_pub(ws)
        assert p["offset"] == first["offset"] and p["data"]["n"] == 1, p
        mine = await call(ws, {"cmd": "publish", "channel": CHANNEL, "data": {"n": 2}})
        assert mine["ok"]["offset"] == first["offset"] + 1, mine
        p = await next_pub(ws)
        assert p["data"]["n"] == 2, p
        await ws.ping()  # our ping, their pong
    # Resume after a disconnect.
    publish({"n": 3})
    publish({"n": 4})
    async with websockets.connect(f"ws://{HOST}/ws") as ws:
        sub = await call(ws, {"cmd": "subscribe", "channel": CHANNEL,
                              "since": f"{first['epoch']}:{first['offset'] + 1}"})
        assert sub["ok"]["recovered"] is True and sub["ok"]["replayed"] == 2, sub
        got = [(await next_pub(ws))["data"]["n"] for _ in range(2)]
        assert got == [3, 4], got
    print("python websockets interop: OK")


asyncio.run(main())
