// Interop: the independent Node `ws` client against Switchboard, with permessage-deflate.
// Usage: node node_ws.mjs HOST:PORT   (exits non-zero on any failure)
import WebSocket from 'ws';
import assert from 'node:assert/strict';

const HOST = process.argv[2];
const CHANNEL = 'interop:node';

function open(url, opts) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, 'switchboard.v1', opts);
    const queue = [];
    const waiters = [];
    ws.on('message', (data) => {
      const msg = JSON.parse(data.toString());
      const w = waiters.shift();
      if (w) w(msg); else queue.push(msg);
    });
    ws.next = () => new Promise((res, rej) => {
      if (queue.length) return res(queue.shift());
      const t = setTimeout(() => rej(new Error('timeout')), 10000);
      waiters.push((m) => { clearTimeout(t); res(m); });
    });
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

let id = 0;
const pushes = []; // pushes that arrived while waiting for a reply
async function call(ws, cmd) {
  cmd.id = ++id;
  ws.send(JSON.stringify(cmd));
  for (;;) {
    const m = await ws.next();
    if (m.id === cmd.id) return m;
    pushes.push(m);
  }
}

async function nextPub(ws) {
  for (;;) {
    const m = pushes.length ? pushes.shift() : await ws.next();
    if (m.pub) return m.pub;
  }
}

async function publish(data) {
  const r = await fetch(`http://${HOST}/api/publish`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ channel: CHANNEL, data }),
  });
  assert.equal(r.status, 200);
  return r.json();
}

const ws = await open(`ws://${HOST}/ws`, { perMessageDeflate: true });
assert.equal(ws.protocol, 'switchboard.v1');
assert.match(ws.extensions, /permessage-deflate/, `deflate not negotiated: ${ws.extensions}`);
const sub = await call(ws, { cmd: 'subscribe', channel: CHANNEL });
assert.equal(sub.ok.recovered, true);
const first = await publish({ n: 1, text: 'y'.repeat(1000) });
let p = await nextPub(ws);
assert.equal(p.offset, first.offset);
assert.equal(p.data.text.length, 1000);
// A compressed command (ws compresses messages over its threshold).
const mine = await call(ws, { cmd: 'publish', channel: CHANNEL, data: { n: 2, pad: 'z'.repeat(2000) } });
assert.equal(mine.ok.offset, first.offset + 1);
p = await nextPub(ws);
assert.equal(p.data.n, 2);
await new Promise((res) => { ws.once('close', (code) => { assert.equal(code, 1000); res(); }); ws.close(1000); });
console.log('node ws interop: OK');
