"""MQTT conformance catalogue: one check per normative statement of the MQTT 3.1.1 and
MQTT 5.0 specifications ([MQTT-x.y.z-n]) that Switchboard implements, driven by Eclipse
Paho where a real client can express the statement and by raw packets where it cannot
(malformed packets, retransmissions, windows). Run by crates/server/tests/mqtt.rs against
a server whose `conf` namespace allows publishing and keeps history.

Usage: mqtt_conformance.py HOST PORT [ID...]   (prints one line per statement; exit 0
when every statement run holds)

No check depends on timing: where a statement says something must NOT arrive, a marker
published after it must arrive first; every wait is bounded (a hung server fails).
"""
import math
import socket
import struct
import sys
import threading
import time
import traceback
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST, PORT = sys.argv[1], int(sys.argv[2])
ONLY = set(sys.argv[3:])
WAIT = 30  # seconds: the bound on anything awaited
NS = "conf"


def topic(name="t"):
    return f"{NS}/{name}-{uuid.uuid4().hex[:10]}"


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)


# ---------------------------------------------------------------------------------------
# Raw packets


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s16(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*items):
    """An MQTT 5 properties block from already-encoded (id + value) items."""
    body = b"".join(items)
    return varint(len(body)) + body


def read_varint(buf, at):
    n, shift = 0, 0
    while True:
        b = buf[at]
        at += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, at
        shift += 7


def parse_props(buf, at):
    """(dict id -> [values], next index) for a properties block at buf[at]."""
    n, at = read_varint(buf, at)
    end, out = at + n, {}
    while at < end:
        pid, at = read_varint(buf, at)
        if pid in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
            v, at = buf[at], at + 1
        elif pid in (0x13, 0x21, 0x22, 0x23):
            v, at = struct.unpack(">H", buf[at:at + 2])[0], at + 2
        elif pid in (0x02, 0x11, 0x18, 0x27):
            v, at = struct.unpack(">I", buf[at:at + 4])[0], at + 4
        elif pid == 0x0B:
            v, at = read_varint(buf, at)
        elif pid == 0x26:
            k = struct.unpack(">H", buf[at:at + 2])[0]
            key = buf[at + 2:at + 2 + k].decode()
            at += 2 + k
            m = struct.unpack(">H", buf[at:at + 2])[0]
            v, at = (key, buf[at + 2:at + 2 + m].decode()), at + 2 + m
        else:  # strings and binary data
            m = struct.unpack(">H", buf[at:at + 2])[0]
            v, at = buf[at + 2:at + 2 + m], at + 2 + m
        out.setdefault(pid, []).append(v)
    return out, end


class Raw:
    """One MQTT connection spoken packet by packet."""

    def __init__(self, v5=True):
        self.v5 = v5
        self.sock = socket.create_connection((HOST, PORT), timeout=WAIT)
        self.buf = b""
        self.next_id = 1

    def send(self, data):
        self.sock.sendall(data)

    def read(self):
        """(first byte, body) of the next packet, or None once the server closed."""
        while True:
            if len(self.buf) >= 2:
                try:
                    n, at = read_varint(self.buf, 1)
                except IndexError:
                    n, at = None, None
                if n is not None and len(self.buf) >= at + n:
                    first, body = self.buf[0], self.buf[at:at + n]
                    self.buf = self.buf[at + n:]
                    return first, body
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            except socket.timeout:
                raise Failed(f"nothing from the server within {WAIT} s")
            if not chunk:
                return None
            self.buf += chunk

    def closed(self):
        """Reads until the server closes: the DISCONNECT reason it sent first (MQTT 5), or
        -1 when it closed without one."""
        reason = -1
        while True:
            p = self.read()
            if p is None:
                return reason
            if p[0] >> 4 == 14:
                reason = p[1][0] if p[1] else 0

    def connect(self, client_id="", clean=True, keep_alive=60, will=None, password=None, level=None,
                flags_extra=0, connect_props=b"", will_props=b""):
        """CONNECT; returns (code, session present, properties) from CONNACK, or None when
        the server closed without one."""
        level = level or (5 if self.v5 else 4)
        flags = (0x02 if clean else 0) | flags_extra
        payload = s16(client_id)
        if will:
            wtopic, wpayload, wqos = will
            flags |= 0x04 | (wqos << 3)
            if self.v5:
                payload += props(will_props) if will_props else props()
            payload += s16(wtopic) + s16(wpayload)
        if password is not None:
            flags |= 0x80 | 0x40
            payload += s16("user") + s16(password)
        body = s16("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive)
        if self.v5:
            body += props(connect_props) if connect_props else props()
        self.send(packet(0x10, body + payload))
        p = self.read()
        if p is None:
            return None
        first, body = p
        check(first == 0x20, f"CONNACK expected, got {first:#x}")
        ps = parse_props(body, 2)[0] if self.v5 and len(body) > 2 else {}
        return body[1], body[0] & 1, ps

    def pid(self):
        i = self.next_id
        self.next_id = self.next_id % 65535 + 1
        return i

    def subscribe(self, *filters, opts=0, sub_props=b"", pid=None):
        """SUBSCRIBE: (packet id, [codes])."""
        pid = pid or self.pid()
        body = struct.pack(">H", pid)
        if self.v5:
            body += props(sub_props) if sub_props else props()
        for f in filters:
            body += s16(f) + bytes([opts])
        self.send(packet(0x82, body))
        while True:
            p = self.read()
            check(p is not None, "closed instead of SUBACK")
            if p[0] >> 4 == 9:
                break
        first, body = p
        at = 2
        if self.v5:
            at = parse_props(body, 2)[1]
        return struct.unpack(">H", body[:2])[0], list(body[at:])

    def publish(self, t, payload, qos=0, retain=False, dup=False, pid=None, pub_props=b""):
        """PUBLISH; for QoS > 0 returns the packet id sent."""
        if isinstance(payload, str):
            payload = payload.encode()
        body = s16(t)
        if qos:
            pid = pid or self.pid()
            body += struct.pack(">H", pid)
        if self.v5:
            body += props(pub_props) if pub_props else props()
        self.send(packet(0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0), body + payload))
        return pid

    def expect(self, kind):
        """The next packet of this type (others in between are skipped): its body."""
        while True:
            p = self.read()
            check(p is not None, f"closed while waiting for packet type {kind}")
            if p[0] >> 4 == kind:
                return p

    def next_publish(self):
        first, body = self.expect(3)
        qos = (first >> 1) & 3
        n = struct.unpack(">H", body[:2])[0]
        t = body[2:2 + n].decode()
        at = 2 + n
        pid = None
        if qos:
            pid = struct.unpack(">H", body[at:at + 2])[0]
            at += 2
        ps = {}
        if self.v5:
            ps, at = parse_props(body, at)
        return {"topic": t, "payload": body[at:], "qos": qos, "retain": bool(first & 1),
                "dup": bool(first & 8), "pid": pid, "props": ps}

    def ack(self, pid):
        self.send(packet(0x40, struct.pack(">H", pid)))

    def close(self):
        self.sock.close()


def closes(v5, pkt, codes=(-1, 0x81)):
    """Sends `pkt` on a fresh connection: the server must close it (MQTT 5: after a
    DISCONNECT with one of `codes`; -1 is a close without one)."""
    c = raw(v5)
    c.send(pkt)
    reason = c.closed()
    check(reason in codes, f"the connection stays open, or closed with {reason}")


def raw(v5=True, **kw):
    c = Raw(v5)
    r = c.connect(**kw)
    check(r is not None and r[0] == 0, f"CONNECT refused: {r}")
    return c


def publish_from(t, payload, qos=0, v5=True, retain=False):
    """A publication by another client (its own connection, closed afterwards)."""
    c = raw(v5, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pid = c.publish(t, payload, qos=qos, retain=retain)
    if qos == 1:
        c.expect(4)
    elif qos == 2:
        c.expect(5)
        c.send(packet(0x62, struct.pack(">H", pid)))
        c.expect(7)
    c.send(packet(0xE0, b"\x00" if v5 else b""))
    c.close()


def publishes_until(c, marker):
    """Publications `c` receives up to and including one whose payload is `marker`."""
    got = []
    while True:
        m = c.next_publish()
        got.append(m)
        if m["pid"] is not None and m["qos"] == 1:
            c.ack(m["pid"])
        if m["payload"] == marker:
            return got


# ---------------------------------------------------------------------------------------
# Paho


class Paho:
    """A Paho client whose callbacks land in events one can wait for."""

    def __init__(self, v5=True, client_id=None, clean=True, session_expiry=None, will=None, receive_maximum=None):
        self.v5 = v5
        self.client_id = client_id or f"paho-{uuid.uuid4().hex[:10]}"
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto, **kw)
        self.cv = threading.Condition()
        self.messages, self.connacks, self.subacks, self.unsubacks, self.disconnects = [], [], [], [], []
        self.c.on_connect = lambda c, u, flags, rc, p: self._add(self.connacks, (flags, rc, p))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self._add(self.subacks, (mid, rcs))
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self._add(self.unsubacks, (mid, rcs))
        self.c.on_message = lambda c, u, m: self._add(self.messages, m)
        self.c.on_disconnect = lambda c, u, flags, rc, p: self._add(self.disconnects, rc)
        if will:
            self.c.will_set(*will)
        cp = None
        if v5:
            cp = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                cp.SessionExpiryInterval = session_expiry
            if receive_maximum is not None:
                cp.ReceiveMaximum = receive_maximum
        self.c.reconnect_delay_set(60, 120)  # no automatic reconnects within a check
        if v5:
            self.c.connect(HOST, PORT, clean_start=clean, properties=cp)
        else:
            self.c.connect(HOST, PORT)
        self.c.loop_start()
        self.connack = self.wait(self.connacks, 1)[0]

    def _add(self, where, item):
        with self.cv:
            where.append(item)
            self.cv.notify_all()

    def wait(self, where, n):
        with self.cv:
            if not self.cv.wait_for(lambda: len(where) >= n, WAIT):
                raise Failed(f"waited {WAIT} s for {n} events, have {len(where)}")
            return where[:n]

    def subscribe(self, t, qos=0, **kw):
        n = len(self.subacks)
        if self.v5:
            self.c.subscribe(t, options=SubscribeOptions(qos=qos, **{k: v for k, v in kw.items() if k != "props"}),
                             properties=kw.get("props"))
        else:
            self.c.subscribe(t, qos)
        return self.wait(self.subacks, n + 1)[n][1]

    def until(self, marker):
        """Messages received up to and including the one whose payload is `marker`."""
        with self.cv:
            if not self.cv.wait_for(lambda: any(m.payload == marker for m in self.messages), WAIT):
                raise Failed(f"marker {marker!r} not received within {WAIT} s")
            i = next(i for i, m in enumerate(self.messages) if m.payload == marker)
            return self.messages[:i + 1]

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()


# ---------------------------------------------------------------------------------------
# The catalogue: (id, versions, statement, check). Checks take v5: bool.

CATALOGUE = []


def statement(sid, versions, text):
    """`sid`: the statement's id, or {version: id} where the versions number it apart;
    a `§` id is normative text the specification left unnumbered."""
    def add(f):
        CATALOGUE.append((sid, versions, text, f))
        return f
    return add


BOTH = ("3.1.1", "5")


@statement("MQTT-3.1.0-1", BOTH, "After a Network Connection is established the first packet sent by the Client MUST be a CONNECT packet")
def _(v5):
    c = Raw(v5)
    c.send(packet(0xC0, b""))  # PINGREQ first
    check(c.closed() in (-1, 0x82), "the connection stays open")


@statement("MQTT-3.1.0-2", BOTH, "The Server MUST process a second CONNECT packet sent from a Client as a Protocol Error and close the Network Connection")
def _(v5):
    c = raw(v5)
    body = s16("MQTT") + bytes([5 if v5 else 4, 2]) + struct.pack(">H", 60) + (props() if v5 else b"") + s16("again")
    c.send(packet(0x10, body))
    reason = c.closed()
    check(reason == (0x82 if v5 else -1), f"closed with {reason}")


@statement("MQTT-3.1.2-2", BOTH, "An unsupported protocol level gets CONNACK 'unacceptable protocol version' (3.1.1: 0x01 to level 3; MQTT 5: 0x84 to level 6) and the connection is closed")
def _(v5):
    c = Raw(v5=False)
    body = s16("MQTT") + bytes([6 if v5 else 3, 2]) + struct.pack(">H", 60) + s16("x")
    c.send(packet(0x10, body))
    p = c.read()
    check(p is not None and p[0] == 0x20 and p[1][1] in (0x01, 0x84), f"CONNACK {p}")
    check(c.closed() == -1, "the connection stays open")


@statement("MQTT-3.1.2-3", BOTH, "The Server MUST validate that the reserved flag in the CONNECT packet is set to 0")
def _(v5):
    c = Raw(v5)
    r = c.connect(flags_extra=0x01)
    check(r is None or r[0] >= 0x80, f"CONNACK {r}")
    check(c.closed() in (-1, 0x81), "the connection stays open")


@statement({"3.1.1": "MQTT-3.2.2-1", "5": "MQTT-3.2.2-2"}, BOTH, "If the Server accepts a connection with Clean Session / Clean Start set to 1, it MUST set Session Present to 0 in CONNACK")
def _(v5):
    cid = f"cs-{uuid.uuid4().hex[:8]}"
    p = Paho(v5, cid, clean=False, session_expiry=300)
    p.subscribe(topic(), 1)
    p.stop()
    p = Paho(v5, cid, clean=True)
    check(not p.connack[0].session_present, "session present with a clean start")
    p.stop()


@statement({"3.1.1": "MQTT-3.2.2-2", "5": "MQTT-3.2.2-3"}, BOTH, "If the Server accepts a connection with Clean Session / Clean Start 0 and has a stored Session, it MUST set Session Present to 1 and resume it (3.1.1: MQTT-3.1.2-4; 5: MQTT-3.1.2-5)")
def _(v5):
    cid, t = f"sp-{uuid.uuid4().hex[:8]}", topic()
    p = Paho(v5, cid, clean=False, session_expiry=300)
    p.subscribe(t, 1)
    p.stop()
    publish_from(t, "while away", qos=1)
    p = Paho(v5, cid, clean=False, session_expiry=300)
    check(p.connack[0].session_present, "no session present")
    # Its subscription is back without SUBSCRIBE, with what was published meanwhile.
    got = p.until(b"while away")
    check([m.payload for m in got] == [b"while away"], f"got {[m.payload for m in got]}")
    p.stop()
    Paho(v5, cid, clean=True).stop()


@statement({"3.1.1": "MQTT-3.2.2-3", "5": "MQTT-3.2.2-3"}, BOTH, "If the Server accepts a connection with Clean Session 0 and has no stored Session, it MUST set Session Present to 0")
def _(v5):
    p = Paho(v5, f"new-{uuid.uuid4().hex[:8]}", clean=False, session_expiry=60)
    check(not p.connack[0].session_present, "session present for a new client id")
    p.stop()


@statement({"3.1.1": "MQTT-3.2.2-4", "5": "MQTT-3.2.2-6"}, BOTH, "A CONNACK with a non-zero return code (MQTT 5: 128 or more) MUST have Session Present 0, and the connection MUST then be closed (3.1.1: MQTT-3.2.2-5; 5: MQTT-3.2.2-7)")
def _(v5):
    c = Raw(v5)
    r = c.connect(client_id="bad-token", password="not.a.jwt", clean=False)
    check(r is not None and r[0] == (0x86 if v5 else 0x04) and r[1] == 0, f"CONNACK {r}")
    check(c.closed() == -1, "the connection stays open")


@statement("MQTT-3.1.3-6", BOTH, "A zero-length ClientId gets a unique ClientId assigned (MQTT 5: returned as Assigned Client Identifier, MQTT-3.1.3-7)")
def _(v5):
    if v5:
        a, b = Raw(True), Raw(True)
        ra, rb = a.connect(client_id=""), b.connect(client_id="")
        check(ra[0] == 0 and rb[0] == 0, f"CONNACK {ra} {rb}")
        ida, idb = ra[2].get(0x12, [None])[0], rb[2].get(0x12, [None])[0]
        check(ida and idb and ida != idb, f"assigned ids {ida} {idb}")
    else:
        # Two connections with empty ids coexist: neither takes the other over.
        a, b = raw(False, client_id=""), raw(False, client_id="")
        a.send(packet(0xC0, b""))
        check(a.read() == (0xD0, b""), "the first connection was taken over")


@statement("MQTT-3.1.3-8", ("3.1.1",), "A zero-length ClientId with CleanSession 0 gets CONNACK 0x02 (Identifier rejected) and the connection is closed")
def _(v5):
    c = Raw(False)
    r = c.connect(client_id="", clean=False)
    check(r is not None and r[0] == 0x02, f"CONNACK {r}")
    check(c.closed() == -1, "the connection stays open")


@statement({"3.1.1": "MQTT-3.1.4-2", "5": "MQTT-3.1.4-3"}, BOTH, "If the ClientId represents a Client already connected, the Server MUST disconnect the existing Client (MQTT 5: DISCONNECT 0x8E)")
def _(v5):
    cid = f"dup-{uuid.uuid4().hex[:8]}"
    first = raw(v5, client_id=cid)
    second = raw(v5, client_id=cid)
    reason = first.closed()
    check(reason == (0x8E if v5 else -1), f"the first connection ended with {reason}")
    second.send(packet(0xC0, b""))
    check(second.read() == (0xD0, b""), "the second connection is not served")


@statement({"3.1.1": "MQTT-3.1.2-24", "5": "MQTT-3.1.2-22"}, BOTH, "If the Server does not receive a packet within one and a half times the Keep Alive, it MUST disconnect")
def _(v5):
    c = raw(v5, keep_alive=1)
    check(c.closed() in (-1, 0x8D), "the connection stays open")


@statement("MQTT-3.1.2-8", BOTH, "The Will Message MUST be published when the Network Connection is subsequently closed (MQTT 5: after the Will Delay Interval), unless DISCONNECT deleted it")
def _(v5):
    t = topic("will")
    w = Paho(v5)
    w.subscribe(t, 1)
    c = raw(v5, client_id=f"w-{uuid.uuid4().hex[:8]}", will=(t, b"gone", 1))
    c.close()  # no DISCONNECT
    got = w.until(b"gone")
    check(len(got) == 1, f"got {[m.payload for m in got]}")
    w.stop()


@statement("MQTT-3.1.3-10", ("5",), "The Server MUST maintain the order of User Properties when publishing the Will Message (its other properties passed on as a PUBLISH's are)")
def _(v5):
    t = topic("will")
    c = raw(True)
    c.subscribe(t, opts=1)
    sent = [("b", "2"), ("a", "1"), ("b", "1")]
    wp = b"\x03" + s16("text/plain") + b"".join(b"\x26" + s16(k) + s16(v) for k, v in sent)
    w = raw(True, client_id=f"w-{uuid.uuid4().hex[:8]}", will=(t, b"gone", 1), will_props=wp)
    w.close()  # no DISCONNECT
    m = c.next_publish()
    got = (m["payload"], m["props"].get(0x03), m["props"].get(0x26))
    check(got == (b"gone", [b"text/plain"], sent), f"the will came as {got}")


@statement("MQTT-3.14.4-3", BOTH, "On receipt of DISCONNECT (MQTT 5: reason 0x00) the Server MUST discard the Will Message without publishing it (MQTT-3.1.2-10)")
def _(v5):
    t = topic("will")
    w = Paho(v5)
    w.subscribe(t, 1)
    c = raw(v5, client_id=f"w-{uuid.uuid4().hex[:8]}", will=(t, b"gone", 1))
    c.send(packet(0xE0, b"\x00" if v5 else b""))
    check(c.closed() == -1, "the connection stays open after DISCONNECT")
    publish_from(t, "marker", qos=1)
    got = w.until(b"marker")
    check([m.payload for m in got] == [b"marker"], f"the will came: {[m.payload for m in got]}")
    w.stop()


@statement("MQTT-3.3.1-4", BOTH, "A PUBLISH packet MUST NOT have both QoS bits set to 1; if it does, the connection is closed")
def _(v5):
    closes(v5, packet(0x36, s16(topic()) + b"\x00\x01" + (props() if v5 else b"") + b"x"))


@statement("MQTT-3.3.1-2", BOTH, "The DUP flag MUST be set to 0 for all QoS 0 messages (a QoS 0 PUBLISH with DUP is malformed)")
def _(v5):
    closes(v5, packet(0x38, s16(topic()) + (props() if v5 else b"") + b"x"))


@statement("MQTT-3.3.2-2", BOTH, "The Topic Name in a PUBLISH packet MUST NOT contain wildcard characters")
def _(v5):
    c = raw(v5)
    pid = c.publish(f"{NS}/+/x", "x", qos=1)
    if v5:
        first, body = c.expect(4)
        check(struct.unpack(">H", body[:2])[0] == pid and body[2] == 0x90, f"PUBACK {body!r}")
    else:
        check(c.closed() == -1, "3.1.1: accepted a wildcard topic")


@statement({"3.1.1": "MQTT-2.3.1-1", "5": "MQTT-2.2.1-3"}, BOTH, "SUBSCRIBE, UNSUBSCRIBE and PUBLISH (QoS > 0) MUST contain a non-zero Packet Identifier")
def _(v5):
    for p in (packet(0x32, s16(topic()) + b"\x00\x00" + (props() if v5 else b"") + b"x"),
              packet(0x82, b"\x00\x00" + (props() if v5 else b"") + s16(topic()) + b"\x00"),
              packet(0xA2, b"\x00\x00" + (props() if v5 else b"") + s16(topic()))):
        c = raw(v5)
        c.send(p)
        check(c.closed() in (-1, 0x81, 0x82), f"packet id 0 accepted: {p!r}")


@statement("MQTT-3.3.4-1", BOTH, "The receiver of a PUBLISH MUST respond according to its QoS: PUBACK for QoS 1, PUBREC for QoS 2, with its Packet Identifier")
def _(v5):
    c = raw(v5)
    pid = c.publish(topic(), "one", qos=1)
    check(struct.unpack(">H", c.expect(4)[1][:2])[0] == pid, "PUBACK for another packet id")
    pid = c.publish(topic(), "two", qos=2)
    check(struct.unpack(">H", c.expect(5)[1][:2])[0] == pid, "PUBREC for another packet id")


@statement({"3.1.1": "MQTT-4.6.0-6", "5": "MQTT-4.6.0-5"}, BOTH, "On an Ordered Topic (every topic, by default) the Server MUST send PUBLISH packets to consumers in the order they were received from any given Client")
def _(v5):
    t = topic()
    s = Paho(v5)
    s.subscribe(t, 1)
    p = raw(v5)
    for i in range(30):
        p.publish(t, f"m{i}", qos=1 if i % 2 else 0)
    p.publish(t, "end", qos=1)
    got = [m.payload.decode() for m in s.until(b"end")]
    check(got == [f"m{i}" for i in range(30)] + ["end"], f"order {got}")
    s.stop()


@statement({"3.1.1": "MQTT-4.3.3-2", "5": "MQTT-4.3.3-10"}, BOTH, "QoS 2: the receiver MUST NOT cause duplicate delivery of a PUBLISH sent again (DUP) with the same Packet Identifier before PUBREL")
def _(v5):
    t = topic()
    s = Paho(v5)
    s.subscribe(t, 2)
    c = raw(v5, client_id=f"q2-{uuid.uuid4().hex[:8]}")
    c.publish(t, "once", qos=2, pid=7)
    c.expect(5)
    c.publish(t, "once", qos=2, pid=7, dup=True)
    c.expect(5)
    c.send(packet(0x62, struct.pack(">H", 7)))
    c.expect(7)
    publish_from(t, "marker", qos=2)
    got = [m.payload for m in s.until(b"marker")]
    check(got == [b"once", b"marker"], f"got {got}")
    s.stop()


@statement("MQTT-4.4.0-1", BOTH, "On reconnect with Clean Session 0 the Server MUST resend unacknowledged PUBLISH packets with their original Packet Identifiers and DUP set (MQTT-3.3.1-1)")
def _(v5):
    cid, t = f"re-{uuid.uuid4().hex[:8]}", topic()
    expiry = (struct.pack(">B", 0x11) + struct.pack(">I", 300)) if v5 else b""
    c = raw(v5, client_id=cid, clean=False, connect_props=expiry)
    c.subscribe(t, opts=1)
    publish_from(t, "unacked", qos=1)
    first = c.next_publish()
    check(first["qos"] == 1 and not first["dup"], f"first delivery {first}")
    c.close()  # without PUBACK
    c = Raw(v5)
    r = c.connect(client_id=cid, clean=False, connect_props=expiry)
    check(r[0] == 0 and r[1] == 1, f"CONNACK {r}")
    again = c.next_publish()
    check(again["payload"] == b"unacked" and again["dup"] and again["pid"] == first["pid"],
          f"resent as {again}, first was {first}")
    c.ack(again["pid"])
    c.send(packet(0xE0, b"\x00" if v5 else b""))
    raw(v5, client_id=cid, clean=True).close()
    resend_pubrel(v5)


def resend_pubrel(v5):
    """MQTT-4.4.0-1's second half: a PUBREL sent again for a QoS 2 message whose PUBREC
    the Server had received."""
    cid, t = f"rel-{uuid.uuid4().hex[:8]}", topic()
    expiry = (struct.pack(">B", 0x11) + struct.pack(">I", 300)) if v5 else b""
    c = raw(v5, client_id=cid, clean=False, connect_props=expiry)
    c.subscribe(t, opts=2)
    publish_from(t, "two", qos=2)
    m = c.next_publish()
    c.send(packet(0x50, struct.pack(">H", m["pid"])))  # PUBREC
    first, body = c.expect(6)
    check(first == 0x62 and struct.unpack(">H", body[:2])[0] == m["pid"], "PUBREL")
    c.close()  # without PUBCOMP
    c = Raw(v5)
    r = c.connect(client_id=cid, clean=False, connect_props=expiry)
    check(r[0] == 0 and r[1] == 1, f"CONNACK {r}")
    first, body = c.expect(6)
    check(struct.unpack(">H", body[:2])[0] == m["pid"], "PUBREL for another packet id")
    c.send(packet(0x70, struct.pack(">H", m["pid"])))  # PUBCOMP
    c.send(packet(0xE0, b"\x00" if v5 else b""))
    raw(v5, client_id=cid, clean=True).close()


@statement("MQTT-3.6.1-1", BOTH, "Bits 3,2,1,0 of PUBREL's fixed header MUST be 0,0,1,0; others are malformed and close the connection")
def _(v5):
    closes(v5, packet(0x60, b"\x00\x01"))


@statement("MQTT-3.8.1-1", BOTH, "Bits 3,2,1,0 of SUBSCRIBE's fixed header MUST be 0,0,1,0; others are malformed and close the connection")
def _(v5):
    closes(v5, packet(0x80, b"\x00\x01" + (props() if v5 else b"") + s16(topic()) + b"\x00"))


@statement("MQTT-3.10.1-1", BOTH, "Bits 3,2,1,0 of UNSUBSCRIBE's fixed header MUST be 0,0,1,0; others are malformed and close the connection")
def _(v5):
    closes(v5, packet(0xA0, b"\x00\x01" + (props() if v5 else b"") + s16(topic())))


@statement({"3.1.1": "MQTT-3.8.3-3", "5": "MQTT-3.8.3-2"}, BOTH, "The payload of a SUBSCRIBE packet MUST contain at least one Topic Filter; one without is a protocol violation")
def _(v5):
    closes(v5, packet(0x82, b"\x00\x01" + (props() if v5 else b"")), (-1, 0x82, 0x81))


@statement({"3.1.1": "MQTT-3.8.3-4", "5": "MQTT-3.8.3-5"}, BOTH, "The Server MUST treat a SUBSCRIBE whose reserved option bits are non-zero (3.1.1: or QoS 3) as malformed (the 3.1.1 text prints this id as MQTT-3-8.3-4)")
def _(v5):
    for opts in ((0xC0,) if v5 else (0x03, 0xC0)):
        c = raw(v5)
        c.send(packet(0x82, b"\x00\x01" + (props() if v5 else b"") + s16(topic()) + bytes([opts])))
        check(c.closed() in (-1, 0x81), f"options {opts:#x} accepted")


@statement("MQTT-3.8.4-1", BOTH, "The Server MUST respond to SUBSCRIBE with SUBACK carrying the same Packet Identifier (MQTT-3.8.4-2) and one return code per Topic Filter (MQTT-3.8.4-5)")
def _(v5):
    c = raw(v5)
    pid, codes = c.subscribe(topic(), f"{NS}/+/x", "bad topic #", opts=1, pid=4242)
    check(pid == 4242, f"SUBACK for packet id {pid}")
    check(len(codes) == 3 and codes[:2] == [1, 1] and codes[2] >= 0x80, f"codes {codes}")


@statement("MQTT-3.8.4-3", BOTH, "A SUBSCRIBE with a Topic Filter identical to an existing Subscription's MUST replace it, and its retained messages MUST be re-sent (MQTT 5 with Retain Handling 0: MQTT-3.8.4-4)")
def _(v5):
    t = topic()
    publish_from(t, "kept", qos=1)
    c = raw(v5)
    c.subscribe(t, opts=0)
    m = c.next_publish()
    check((m["payload"], m["retain"], m["qos"]) == (b"kept", True, 0), f"retained as {m}")
    c.subscribe(t, opts=1)
    m = c.next_publish()
    check((m["payload"], m["retain"], m["qos"]) == (b"kept", True, 1), f"re-sent as {m}")
    c.ack(m["pid"])
    publish_from(t, "after", qos=1)
    m = c.next_publish()
    check((m["payload"], m["retain"], m["qos"]) == (b"after", False, 1), f"delivered as {m}")
    # One subscription, not two: one copy.
    c.ack(m["pid"])
    publish_from(t, "marker", qos=0)
    got = [x["payload"] for x in publishes_until(c, b"marker")]
    check(got == [b"marker"], f"a second copy: {got}")


@statement("MQTT-3.3.1-8", ("3.1.1",), "A PUBLISH sent because of a new subscription (a retained message) MUST have RETAIN set to 1")
def _(v5):
    t = topic()
    publish_from(t, "kept", qos=1, retain=True)
    c = raw(v5)
    c.subscribe(t)
    m = c.next_publish()
    check(m["payload"] == b"kept" and m["retain"], f"retained as {m}")


@statement("MQTT-3.3.1-9", ("3.1.1",), "A PUBLISH sent because it matches an established subscription MUST have RETAIN set to 0")
def _(v5):
    t = topic()
    c = raw(False)
    c.subscribe(t)
    publish_from(t, "live", qos=0, v5=False, retain=True)
    m = c.next_publish()
    check(m["payload"] == b"live" and not m["retain"], f"delivered as {m}")


@statement("MQTT-3.3.1-12", ("5",), "With Retain As Published 0, the Server MUST set RETAIN to 0 when forwarding, whatever the PUBLISH had")
def _(v5):
    t = topic()
    c = raw(True)
    c.subscribe(t)
    publish_from(t, "live", qos=0, retain=True)
    m = c.next_publish()
    check(m["payload"] == b"live" and not m["retain"], f"delivered as {m}")


@statement("MQTT-3.3.1-13", ("5",), "With Retain As Published 1, the Server MUST set RETAIN as it was in the PUBLISH it received")
def _(v5):
    t = topic()
    c = raw(True)
    c.subscribe(t, opts=0x08)
    publish_from(t, "kept", qos=0, retain=True)
    publish_from(t, "plain", qos=0)
    got = [(m["payload"], m["retain"]) for m in (c.next_publish(), c.next_publish())]
    check(got == [(b"kept", True), (b"plain", False)], f"delivered as {got}")


def forwarded(pub_props):
    """The properties a subscriber's PUBLISH carries for a publication with `pub_props`."""
    t = topic()
    c = raw(True)
    c.subscribe(t, opts=1)
    p = raw(True)
    p.publish(t, "x", qos=1, pub_props=pub_props)
    p.expect(4)
    p.close()
    m = c.next_publish()
    c.ack(m["pid"])
    c.close()
    return m["props"]


@statement("MQTT-3.3.2-4", ("5",), "A Server MUST send the Payload Format Indicator unaltered to all subscribers receiving the Application Message")
def _(v5):
    for f in (0, 1):
        got = forwarded(bytes([0x01, f])).get(0x01)
        check(got == [f], f"payload format indicator {f} forwarded as {got}")


@statement("MQTT-3.3.2-15", ("5",), "The Server MUST send the Response Topic unaltered to all subscribers receiving the Application Message")
def _(v5):
    got = forwarded(b"\x08" + s16("replies/a b/1")).get(0x08)
    check(got == [b"replies/a b/1"], f"response topic forwarded as {got}")


@statement("MQTT-3.3.2-14", ("5",), "The Response Topic MUST NOT contain wildcard characters (the Server closes with 0x82)")
def _(v5):
    c = raw(True)
    c.publish(topic(), "x", qos=1, pub_props=b"\x08" + s16("replies/#"))
    check(c.closed() == 0x82, "accepted")


@statement("MQTT-3.3.2-16", ("5",), "The Server MUST send the Correlation Data unaltered to all subscribers receiving the Application Message")
def _(v5):
    got = forwarded(b"\x09" + s16(b"\x00\xff\x10id")).get(0x09)
    check(got == [b"\x00\xff\x10id"], f"correlation data forwarded as {got}")


@statement("MQTT-3.3.2-17", ("5",), "The Server MUST send all User Properties unaltered when forwarding the Application Message (but `token`, this server's credential)")
def _(v5):
    got = forwarded(b"\x26" + s16("unit") + s16("°C") + b"\x26" + s16("") + s16("")).get(0x26)
    check(got == [("unit", "°C"), ("", "")], f"user properties forwarded as {got}")


@statement("MQTT-3.3.2-18", ("5",), "The Server MUST maintain the order of User Properties when forwarding the Application Message")
def _(v5):
    sent = [("k", "3"), ("a", "1"), ("k", "2"), ("k", "1")]
    got = forwarded(b"".join(b"\x26" + s16(k) + s16(v) for k, v in sent)).get(0x26)
    check(got == sent, f"user properties forwarded as {got}")


@statement("MQTT-3.3.2-20", ("5",), "A Server MUST send the Content Type unaltered to all subscribers receiving the Application Message")
def _(v5):
    got = forwarded(b"\x03" + s16("application/json; charset=utf-8")).get(0x03)
    check(got == [b"application/json; charset=utf-8"], f"content type forwarded as {got}")


@statement("MQTT-3.3.2-6", ("5",), "The PUBLISH sent by the Server MUST contain the Message Expiry Interval minus the time the message waited in the Server")
def _(v5):
    started = time.monotonic()
    got = forwarded(b"\x02" + struct.pack(">I", 3600)).get(0x02)
    # It waited in the server no longer than this check took (no bound on how long).
    waited = math.ceil(time.monotonic() - started)
    check(got is not None and 3600 - waited <= got[0] <= 3600, f"sent after at most {waited} s: expiry {got}")
    # Waiting in a persistent session: what is left of it.
    t, cid = topic(), f"exp-{uuid.uuid4().hex[:8]}"
    c = raw(True, client_id=cid, clean=False, connect_props=b"\x11" + struct.pack(">I", 300))
    c.subscribe(t, opts=1)
    c.send(packet(0xE0, b"\x00"))
    c.close()
    p = raw(True)
    p.publish(t, "waits", qos=1, pub_props=b"\x02" + struct.pack(">I", 60))
    p.expect(4)
    p.close()
    time.sleep(2.1)  # (time passing, not a bound on anything)
    c = raw(True, client_id=cid, clean=False, connect_props=b"\x11" + struct.pack(">I", 0))
    m = c.next_publish()
    got = m["props"].get(0x02)
    check(m["payload"] == b"waits" and got is not None and got[0] <= 58, f"after 2.1 s: {m['payload']} expiry {got}")
    c.close()


@statement("MQTT-3.3.2-5", ("5",), "If the Message Expiry Interval has passed before the Server started delivering it to a subscriber, it MUST delete that subscriber's copy")
def _(v5):
    t, kept, cid = topic(), topic("retained"), f"exp-{uuid.uuid4().hex[:8]}"
    c = raw(True, client_id=cid, clean=False, connect_props=b"\x11" + struct.pack(">I", 300))
    c.subscribe(t, opts=1)
    c.send(packet(0xE0, b"\x00"))
    c.close()
    p = raw(True)
    for tt, payload, expiry in ((t, "expires", 1), (t, "stays", None), (kept, "kept", None), (kept, "gone", 1)):
        p.publish(tt, payload, qos=1, retain=True, pub_props=b"" if expiry is None else b"\x02" + struct.pack(">I", expiry))
        p.expect(4)
    p.close()
    time.sleep(2.1)  # past the 1 s expiries (time passing, not a bound on anything)
    c = raw(True, client_id=cid, clean=False, connect_props=b"\x11" + struct.pack(">I", 0))
    got = [m["payload"] for m in publishes_until(c, b"stays")]
    check(got == [b"stays"], f"the session after the first expired: {got}")
    # Nor is an expired retained message sent to a new subscription.
    c.subscribe(kept, opts=1)
    publish_from(kept, "marker", qos=1)
    got = [(m["payload"], m["retain"]) for m in publishes_until(c, b"marker")]
    check(got == [(b"marker", False)], f"subscribing after the retained message expired: {got}")
    c.close()


def retain_handling(handling, twice, expected):
    """Subscribes (twice if asked) with Retain Handling `handling` to a topic with a
    retained message; what arrives before a marker published afterwards: (payload, retain)."""
    t = topic()
    publish_from(t, "kept", qos=1)
    p = Paho(True)
    for _ in range(2 if twice else 1):
        p.subscribe(t, 0, retainHandling=handling)
    p.c.publish(t, "marker")
    got = [(m.payload, m.retain) for m in p.until(b"marker")]
    p.stop()
    check(got == expected, f"got {got}")


@statement("MQTT-3.3.1-9", ("5",), "Retain Handling 0: the Server MUST send the retained messages matching the Topic Filter on subscribing")
def _(v5):
    retain_handling(0, False, [(b"kept", True), (b"marker", False)])


@statement("MQTT-3.3.1-10", ("5",), "Retain Handling 1: retained messages are sent if the subscription did not exist, and MUST NOT be if it did")
def _(v5):
    # The second SUBSCRIBE finds the subscription there: nothing more.
    retain_handling(1, True, [(b"kept", True), (b"marker", False)])


@statement("MQTT-3.3.1-11", ("5",), "Retain Handling 2: the Server MUST NOT send the retained messages")
def _(v5):
    retain_handling(2, False, [(b"marker", False)])


@statement("MQTT-3.10.4-4", BOTH, "The Server MUST respond to UNSUBSCRIBE with UNSUBACK, even when no Topic Filter matched (MQTT-3.10.4-5; MQTT 5: 0x11 No subscription existed)")
def _(v5):
    t = topic()
    p = Paho(v5)
    p.subscribe(t, 1)
    n = len(p.unsubacks)
    p.c.unsubscribe([t, topic("never")])
    mid, codes = p.wait(p.unsubacks, n + 1)[n]
    if v5:
        check([c.value for c in codes] == [0x00, 0x11], f"UNSUBACK codes {codes}")
    p.stop()


@statement("MQTT-3.10.4-2", BOTH, "After UNSUBSCRIBE the Server MUST stop adding new messages for that filter for delivery to the Client")
def _(v5):
    t, m = topic(), topic("marker")
    p = Paho(v5)
    p.subscribe(t, 1)
    p.subscribe(m, 1)
    n = len(p.unsubacks)
    p.c.unsubscribe(t)
    p.wait(p.unsubacks, n + 1)
    publish_from(t, "after", qos=1)
    publish_from(m, "marker", qos=1)
    got = [x.payload for x in p.until(b"marker")]
    check(got == [b"marker"], f"got {got}")
    p.stop()


@statement("MQTT-3.10.3-2", BOTH, "The payload of an UNSUBSCRIBE packet MUST contain at least one Topic Filter; one without is a protocol violation")
def _(v5):
    closes(v5, packet(0xA2, b"\x00\x01" + (props() if v5 else b"")), (-1, 0x82, 0x81))


@statement("MQTT-3.12.4-1", BOTH, "The Server MUST send a PINGRESP packet in response to a PINGREQ packet")
def _(v5):
    c = raw(v5)
    c.send(packet(0xC0, b""))
    check(c.read() == (0xD0, b""), "no PINGRESP")


@statement({"3.1.1": "MQTT-1.5.3-1", "5": "MQTT-1.5.4-1"}, BOTH, "A packet with ill-formed UTF-8 in a string MUST close the connection (MQTT 5: a Malformed Packet)")
def _(v5):
    closes(v5, packet(0x30, s16(b"conf/\xc3\x28") + (props() if v5 else b"") + b"x"))


@statement({"3.1.1": "MQTT-1.5.3-2", "5": "MQTT-1.5.4-2"}, BOTH, "A string containing U+0000 MUST close the connection (MQTT 5: a Malformed Packet)")
def _(v5):
    closes(v5, packet(0x82, b"\x00\x01" + (props() if v5 else b"") + s16(b"conf/a\x00b") + b"\x00"))


@statement({"3.1.1": "MQTT-4.7.1-2", "5": "MQTT-4.7.1-1"}, BOTH, "The multi-level wildcard MUST be the last character and follow a level separator: otherwise the filter is refused")
def _(v5):
    c = raw(v5)
    for f in (f"{NS}/a#", f"{NS}/#/a"):
        codes = c.subscribe(f)[1]
        check(codes == [0x8F if v5 else 0x80], f"{f}: {codes}")


@statement({"3.1.1": "MQTT-4.7.1-3", "5": "MQTT-4.7.1-2"}, BOTH, "The single-level wildcard MUST occupy an entire level of the filter: otherwise the filter is refused")
def _(v5):
    c = raw(v5)
    for f in (f"{NS}/a+", f"{NS}/+a/b"):
        codes = c.subscribe(f)[1]
        check(codes == [0x8F if v5 else 0x80], f"{f}: {codes}")


@statement("MQTT-4.7.3-1", BOTH, "Topic Names and Topic Filters MUST be at least one character long")
def _(v5):
    c = raw(v5)
    codes = c.subscribe("")[1]
    check(codes == [0x8F if v5 else 0x80], f"empty filter: {codes}")
    c.send(packet(0x30, s16("") + (props() if v5 else b"") + b"x"))
    check(c.closed() in (-1, 0x82), "an empty topic name was accepted")


@statement("MQTT-3.3.4-6", ("5",), "A PUBLISH sent from a Client to a Server MUST NOT contain a Subscription Identifier")
def _(v5):
    c = raw(True)
    c.publish(topic(), "x", qos=1, pub_props=b"\x0b\x05")
    check(c.closed() == 0x82, "accepted")


@statement("MQTT-3.3.4-3", ("5",), "The Server MUST send the Subscription Identifiers of the matching subscriptions in the PUBLISH (all of them when it sends one copy, MQTT-3.3.4-4)")
def _(v5):
    t = topic()
    p = Paho(True)
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 7
    p.subscribe(t, 1, props=sp)
    sp = Properties(PacketTypes.SUBSCRIBE)
    sp.SubscriptionIdentifier = 300
    p.subscribe(f"{NS}/#", 1, props=sp)
    publish_from(t, "both", qos=1)
    got = p.until(b"both")
    ids = sorted(getattr(got[-1].properties, "SubscriptionIdentifier", []))
    check(ids == [7, 300], f"subscription identifiers {ids}")
    p.stop()


@statement("§3.8.2.1.2", ("5",), "A Subscription Identifier of 0 is a Protocol Error")
def _(v5):
    c = raw(True)
    c.send(packet(0x82, b"\x00\x01" + props(b"\x0b\x00") + s16(topic()) + b"\x00"))
    check(c.closed() == 0x82, "accepted")


@statement("§3.3.4", ("5",), "A Topic Alias of 0 or greater than the Topic Alias Maximum is a Protocol Error: DISCONNECT 0x94 (Topic Alias invalid)")
def _(v5):
    for alias in (0, None):
        c = Raw(True)
        r = c.connect()
        limit = r[2].get(0x22, [0])[0]
        c.publish(topic(), "x", pub_props=b"\x23" + struct.pack(">H", limit + 1 if alias is None else alias))
        check(c.closed() == 0x94, f"alias {alias} accepted")


@statement("MQTT-3.3.2-7", ("5",), "Topic Alias mappings MUST NOT be carried forward from one Network Connection to another")
def _(v5):
    t = topic()
    c = raw(True, client_id=f"alias-{uuid.uuid4().hex[:8]}")
    c.publish(t, "defines", pub_props=b"\x23\x00\x01")
    c.send(packet(0xE0, b"\x00"))
    c.close()
    c = raw(True)
    c.publish("", "uses", pub_props=b"\x23\x00\x01")
    check(c.closed() == 0x82, "an alias from another connection was used")


@statement("MQTT-3.3.4-9", ("5",), "The Server MUST NOT send more than the Client's Receive Maximum QoS 1 and 2 PUBLISH packets without acknowledgement")
def _(v5):
    t, mark = topic(), topic("marker")
    c = raw(True, connect_props=b"\x21\x00\x02")  # Receive Maximum 2
    c.subscribe(t, opts=1)
    c.subscribe(mark, opts=0)
    for i in range(5):
        publish_from(t, f"m{i}", qos=1)
    publish_from(mark, "marker", qos=0)
    got = publishes_until_unacked(c, b"marker")
    check([m["payload"] for m in got] == [b"m0", b"m1", b"marker"], f"before any PUBACK: {[m['payload'] for m in got]}")
    for m in got[:2]:
        c.ack(m["pid"])
    rest = []
    for _ in range(3):
        rest.append(c.next_publish())
        c.ack(rest[-1]["pid"])
    check([m["payload"] for m in rest] == [b"m2", b"m3", b"m4"], f"after PUBACKs: {rest}")


def aliased(c, n, alias_max):
    """The next `n` publications `c` receives, their topics resolved through the topic
    aliases the server defined (each checked within `alias_max`): (topic, payload, alias)."""
    known, out = {}, []
    for _ in range(n):
        m = c.next_publish()
        if m["pid"] is not None:
            c.ack(m["pid"])
        alias = m["props"].get(0x23, [None])[0]
        t = m["topic"]
        if alias is not None:
            check(1 <= alias <= alias_max, f"topic alias {alias} past the client's maximum {alias_max}")
            if t:
                known[alias] = t
            else:
                check(alias in known, f"topic alias {alias} used before it was defined")
                t = known[alias]
        out.append((t, m["payload"], alias))
    return out


@statement("MQTT-3.1.2-27", ("5",), "If Topic Alias Maximum is absent or zero, the Server MUST NOT send any Topic Aliases to the Client")
def _(v5):
    t = topic()
    c = raw(True)
    c.subscribe(t, opts=1)
    for i in range(3):
        publish_from(t, f"m{i}", qos=1)
    got = aliased(c, 3, 0)
    check(got == [(t, f"m{i}".encode(), None) for i in range(3)], f"got {got}")


@statement("MQTT-3.1.2-26", ("5",), "The Server MUST NOT send a Topic Alias in a PUBLISH packet to the Client greater than Topic Alias Maximum")
def _(v5):
    ts = [topic(f"a{i}") for i in range(3)]
    c = raw(True, connect_props=b"\x22\x00\x02")  # Topic Alias Maximum 2
    for t in ts:
        c.subscribe(t, opts=1)
    sent = [(t, f"{t}:{n}".encode()) for n in range(2) for t in ts]
    for t, payload in sent:
        publish_from(t, payload, qos=1)
    # (Publications on different topics may pass each other: compared as a set.)
    got = [(t, payload) for t, payload, _ in aliased(c, len(sent), 2)]
    check(sorted(got) == sorted(sent), f"resolved through the aliases: {got}")


def publishes_until_unacked(c, marker):
    got = []
    while True:
        m = c.next_publish()
        got.append(m)
        if m["payload"] == marker:
            return got


@statement("MQTT-3.1.2-24", ("5",), "The Server MUST NOT send packets exceeding the Client's Maximum Packet Size; such a message is discarded (MQTT-3.1.2-25)")
def _(v5):
    t = topic()
    c = raw(True, connect_props=b"\x27" + struct.pack(">I", 128))
    c.subscribe(t)
    publish_from(t, "x" * 500, qos=1)
    publish_from(t, "marker", qos=1)
    got = [m["payload"] for m in publishes_until(c, b"marker")]
    check(got == [b"marker"], f"got {[len(g) for g in got]} bytes")


@statement("MQTT-4.13.1-1", ("5",), "On a Malformed Packet or Protocol Error the Server sends DISCONNECT with the reason (0x81 / 0x82) and MUST close the connection")
def _(v5):
    c = raw(True)
    c.send(packet(0x60, b"\x00\x01"))  # PUBREL with wrong flags
    check(c.closed() == 0x81, "no DISCONNECT 0x81")
    c = raw(True)
    c.send(packet(0x10, s16("MQTT") + b"\x05\x02\x00\x3c" + props() + s16("x")))
    check(c.closed() == 0x82, "no DISCONNECT 0x82")


@statement("MQTT-3.8.3-3", ("5",), "No Local: Application Messages MUST NOT be forwarded to a connection whose ClientID published them")
def _(v5):
    t = topic()
    p = Paho(True)
    p.subscribe(t, 1, noLocal=True)
    p.c.publish(t, "own", qos=1)
    publish_from(t, "other", qos=1)
    got = [m.payload for m in p.until(b"other")]
    check(got == [b"other"], f"got {got}")
    p.stop()


@statement("MQTT-3.8.3-4", ("5",), "It is a Protocol Error to set No Local on a Shared Subscription")
def _(v5):
    c = raw(True)
    c.send(packet(0x82, b"\x00\x01" + props() + s16(f"$share/g/{topic()}") + b"\x04"))
    check(c.closed() == 0x82, "accepted")


@statement("§4.8.2", ("5",), "A Shared Subscription's messages go to one of its sessions each (load-balanced), not to all")
def _(v5):
    t = topic()
    members = [raw(True), raw(True)]
    for c in members:
        check(c.subscribe(f"$share/g/{t}", opts=1)[1] == [1], "shared subscription refused")
    sent = [f"m{i}".encode() for i in range(10)]
    for m in sent:
        publish_from(t, m, qos=1)
    got, cv = [], threading.Condition()

    def member(c):
        # Each member acknowledges what it gets, until the server closes it.
        try:
            while True:
                m = c.next_publish()
                c.ack(m["pid"])
                with cv:
                    got.append(m["payload"])
                    cv.notify_all()
        except (Failed, OSError):
            pass

    threads = [threading.Thread(target=member, args=(c,), daemon=True) for c in members]
    for th in threads:
        th.start()
    with cv:
        cv.wait_for(lambda: len(got) >= len(sent), WAIT)
    # One more publication after every message arrived: a copy still on its way to a
    # second member would come before it.
    publish_from(t, "end", qos=1)
    with cv:
        check(cv.wait_for(lambda: b"end" in got, WAIT), "the last publication never came")
        copies = list(got)
    for c in members:
        c.close()
    check(sorted(copies) == sorted(sent + [b"end"]), f"copies: {sorted(copies)}")


# ---------------------------------------------------------------------------------------


def main():
    passed = failed = 0
    ids = set()
    for sid, versions, text, f in CATALOGUE:
        for v in versions:
            vid = sid[v] if isinstance(sid, dict) else sid
            ids.add((v, vid))
            if ONLY and vid not in ONLY:
                continue
            name = f"[{vid}] MQTT {v}"
            try:
                f(v == "5")
                print(f"ok    {name}: {text}", flush=True)
                passed += 1
            except Exception as e:  # a failed check or the server closing early
                detail = str(e) if isinstance(e, Failed) else traceback.format_exc()
                print(f"FAIL  {name}: {text}\n      {detail}", flush=True)
                failed += 1
    numbered = {i for i in ids if i[1].startswith("MQTT-")}
    counts = ", ".join(f"MQTT {v}: {len({i for i in numbered if i[0] == v})}" for v in ("3.1.1", "5"))
    print(f"{len(numbered)} numbered statements ({counts}) and {len(ids) - len(numbered)} unnumbered; "
          f"{passed + failed} checks run: {passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
