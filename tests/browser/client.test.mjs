// The JavaScript client in Node: backoff schedule, pattern matching, delivery and resume
// against a real server, reconnect spread, and malformed frames.
import test from 'node:test';
import assert from 'node:assert/strict';
import WebSocket, { WebSocketServer } from 'ws';
import { Switchboard, backoffDelay, patternMatches } from '../../clients/js/switchboard.js';
import { startServer, startProxy, waitFor, sleep } from './helpers.mjs';

test('backoff delays stay within the full-jitter bound and spread across clients', () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const bound = Math.min(30000, 500 * 2 ** attempt);
    const samples = Array.from({ length: 500 }, () => backoffDelay(attempt, 500, 30000));
    for (const d of samples) assert.ok(d >= 0 && d < bound, `attempt ${attempt}: ${d} outside [0, ${bound})`);
    const spread = Math.max(...samples) - Math.min(...samples);
    assert.ok(spread > bound * 0.8, `attempt ${attempt}: samples bunched (spread ${spread} of ${bound})`);
  }
  assert.equal(backoffDelay(3, 500, 30000, () => 0.5), 2000);
  assert.equal(backoffDelay(20, 500, 30000, () => 0.5), 15000, 'capped');
});

test('patterns match like MQTT', () => {
  assert.ok(patternMatches('s:+/temp', 's:a/temp'));
  assert.ok(!patternMatches('s:+/temp', 's:a/b/temp'));
  assert.ok(patternMatches('s:#', 's:a/b/c'));
  assert.ok(patternMatches('s:a/#', 's:a'));
  assert.ok(!patternMatches('s:#', 't:a'));
});

test('a Node client receives in order, and resumes after its connection is cut', async (t) => {
  const server = await startServer();
  const proxy = await startProxy(server.port);
  t.after(async () => { proxy.close(); await server.stop(); });
  // WebSocket only: with the fallback order, an attempt whose WebSocket try fell in the
  // cut goes on to long polling, which may connect once the proxy is back — a race with
  // the cut's timing on a busy machine. (Resume is what this tests.)
  const sb = new Switchboard(proxy.url, { WebSocket, transports: ['websocket'], backoff: { base: 100, cap: 500 } });
  t.after(() => sb.close());
  const got = [];
  const sub = sb.subscribe('news:node');
  sub.on('message', (data, pub) => got.push(pub.offset));
  await waitFor(() => sb.state === 'connected' && sub.position !== null, { what: 'connected' });
  for (let i = 1; i <= 5; i++) await server.publish('news:node', { i });
  await waitFor(() => got.length === 5, { what: 'first five' });
  const states = [];
  sb.on('state', (s) => states.push(s));
  proxy.cut();
  for (let i = 6; i <= 15; i++) await server.publish('news:node', { i });
  await sleep(300);
  proxy.restore();
  await waitFor(() => got.length >= 15, { what: 'all fifteen after the cut' });
  await sleep(200);
  assert.deepEqual(got, Array.from({ length: 15 }, (_, i) => i + 1));
  const lost = states.find((s) => s.state === 'disconnected');
  assert.ok(lost && lost.willReconnect && lost.nextRetryAt, 'reconnect was scheduled with a retry time');
  assert.equal(sb.state, 'connected');
  assert.equal(sb.transport, 'websocket');
});

test('clients cut at once do not all retry at the same instant', async (t) => {
  const server = await startServer();
  const proxy = await startProxy(server.port);
  t.after(async () => { proxy.close(); await server.stop(); });
  const clients = Array.from({ length: 20 }, () => new Switchboard(proxy.url, { WebSocket, backoff: { base: 500, cap: 30000 } }));
  t.after(() => clients.forEach((c) => c.close()));
  clients.forEach((c) => c.subscribe('news:herd'));
  await waitFor(() => clients.every((c) => c.state === 'connected'), { what: 'all connected' });
  const retryAt = [];
  clients.forEach((c) => c.on('state', (s) => { if (s.state === 'disconnected' && s.nextRetryAt) retryAt.push(s.nextRetryAt); }));
  proxy.cut();
  await waitFor(() => retryAt.length >= 20, { what: 'every client scheduled a retry' });
  proxy.restore();
  const spread = Math.max(...retryAt) - Math.min(...retryAt);
  assert.ok(new Set(retryAt).size > 15, 'retry times collide');
  assert.ok(spread > 100, `retries bunched within ${spread} ms`);
  await waitFor(() => clients.every((c) => c.state === 'connected'), { what: 'all back' });
});

test('a malformed server frame is reported, never thrown, and the client reconnects', async (t) => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise((r) => wss.once('listening', r));
  let connections = 0;
  wss.on('connection', (ws) => { connections++; ws.on('message', () => ws.send('this is not json {')); });
  t.after(() => wss.close());
  const url = `http://127.0.0.1:${wss.address().port}`;
  const sb = new Switchboard(url, { WebSocket, transports: ['websocket'], backoff: { base: 50, cap: 100 }, openTimeout: 1000 });
  t.after(() => sb.close());
  const errors = [];
  sb.on('error', (e) => errors.push(e));
  await waitFor(() => errors.some((e) => e.type === 'protocol') && connections >= 2, { what: 'protocol error and a reconnect' });
});

test('a publication\'s properties (meta) go from a client\'s publish to the others, over WebSocket and long polling', async (t) => {
  const server = await startServer();
  const a = new Switchboard(server.url, { WebSocket, transports: ['websocket'] });
  const b = new Switchboard(server.url, { WebSocket, transports: ['longpoll'] });
  t.after(async () => { a.close(); b.close(); await server.stop(); });
  const got = [];
  const subA = a.subscribe('demo:meta');
  const subB = b.subscribe('demo:meta');
  for (const [name, sub] of [['a', subA], ['b', subB]]) sub.on('message', (data, pub) => got.push([name, data, pub.meta]));
  await waitFor(() => subA.position !== null && subB.position !== null, { what: 'both subscribed' });
  const meta = { content_type: 'text/plain', correlation: 'AAE=', headers: [['trace', 't-1'], ['trace', 't-2']] };
  await subA.publish({ q: 1 }, { meta });
  await subA.publish({ q: 2 });
  await subB.publish({ q: 3 }, { meta: { ttl: 60 } }); // over HTTP: the long-polling client's publish
  await waitFor(() => got.length === 6, { what: 'the three publications on both clients' });
  const seen = (who) => got.filter(([name]) => name === who).map(([, data, m]) => [data, m]);
  const want = [[{ q: 1 }, meta], [{ q: 2 }, undefined], [{ q: 3 }, { ttl: 60 }]];
  for (const who of ['a', 'b']) assert.deepEqual(seen(who), want, who);
  await assert.rejects(subA.publish(1, { meta: { format: 3 } }), (e) => e.code === 'invalid_request');
});

test('direct messages go from one client to another, and to a missing one fail', async (t) => {
  const server = await startServer({ env: { SWITCHBOARD_DIRECT__POLICY: 'anyone' } });
  const a = new Switchboard(server.url, { WebSocket });
  const b = new Switchboard(server.url, { WebSocket });
  t.after(async () => { a.close(); b.close(); await server.stop(); });
  const got = [];
  b.on('message:direct', (data, from) => got.push({ data, from }));
  await waitFor(() => a.state === 'connected' && b.state === 'connected' && b.clientId, { what: 'both connected' });
  const r = await a.send({ client: b.clientId }, { candidate: 'x' });
  assert.equal(r.delivered, 1);
  await waitFor(() => got.length === 1, { what: 'the direct message' });
  assert.deepEqual(got[0], { data: { candidate: 'x' }, from: { client: a.clientId, user: null } });
  await assert.rejects(a.send({ client: 'gone' }, 1), (e) => e.code === 'target_not_connected');
});

test('a long-polling client takes direct messages between polls and sends them over HTTP', async (t) => {
  const server = await startServer({ env: { SWITCHBOARD_DIRECT__POLICY: 'anyone' } });
  const ws = new Switchboard(server.url, { WebSocket });
  // Nothing subscribed: it polls for its direct messages alone.
  const lp = new Switchboard(server.url, { transports: ['longpoll'], pollWait: 20 });
  t.after(async () => { ws.close(); lp.close(); await server.stop(); });
  const toWs = [];
  const toLp = [];
  ws.on('message:direct', (data, from) => toWs.push({ data, from }));
  lp.on('message:direct', (data, from) => toLp.push({ data, from }));
  await waitFor(() => ws.state === 'connected' && lp.state === 'connected' && lp.transport === 'longpoll' && lp.clientId && ws.clientId,
    { what: 'both connected, one by long polling' });
  for (const n of [1, 2, 3]) assert.equal((await ws.send({ client: lp.clientId }, { n })).delivered, 1);
  await waitFor(() => toLp.length === 3, { what: 'three direct messages at the poller' });
  assert.deepEqual(toLp.map((m) => m.data.n), [1, 2, 3]);
  assert.deepEqual(toLp[0].from, { client: ws.clientId, user: null });
  const r = await lp.send({ client: ws.clientId }, 'from the poller');
  assert.equal(r.delivered, 1);
  await waitFor(() => toWs.length === 1, { what: 'the poller\'s message' });
  assert.deepEqual(toWs[0], { data: 'from the poller', from: { client: lp.clientId, user: null } });
});
