// TLS and HTTP/2 in a real browser: over h2 one page holds more streams to one origin
// than HTTP/1.1's six connections allow — SSE streams and WebSockets (RFC 8441 extended
// CONNECT, seen by the server) on one connection — and over plain HTTP/1.1 the 7th
// stream of the same page stalls.
import test from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BIN, startServer, launchBrowser } from './helpers.mjs';

/** A development CA and certificate in a temporary directory, and the key's SPKI hash. */
function devCert() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-tls-'));
  const out = execFileSync(BIN, ['cert', 'dev', '--dir', dir], { encoding: 'utf8' });
  const spki = /--ignore-certificate-errors-spki-list=(\S+)/.exec(out)?.[1];
  assert.ok(spki, `no SPKI hash in: ${out}`);
  return { dir, spki, cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem'), ca: path.join(dir, 'ca.pem') };
}

async function metric(server, name) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' ') || l.startsWith(name + '{'));
  return line ? Number(line.split(' ').pop()) : 0;
}

// The page: `sse` EventSource streams and `ws` WebSockets on channel `tabs`, every one
// recording what it receives, and the WebSockets publishing through the server.
const manyStreams = (sse, ws) => `
  window.got = []; window.open = []; window.es = []; window.wsPositions = [];
  for (let i = 0; i < ${sse}; i++) {
    window.got.push([]); window.open.push(false);
    const es = new EventSource('/sse?channel=tabs');
    window.es.push(es);
    es.onopen = () => { window.open[i] = true; };
    es.onmessage = (e) => window.got[i].push(JSON.parse(e.data).data);
  }
  for (let j = 0; j < ${ws}; j++) {
    const i = ${sse} + j;
    window.got.push([]); window.open.push(false);
    const w = new WebSocket(location.origin.replace('http', 'ws') + '/ws?channel=tabs', 'switchboard.v1');
    w.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.subscribed) window.open[i] = true;
      if (m.pub) { window.got[i].push(m.pub.data); window.wsPositions.push(m.pub.epoch + ':' + m.pub.offset); }
    };
  }`;

test('over HTTP/2 one page receives on 10 EventSource streams and 2 WebSockets (RFC 8441) to one origin', async (t) => {
  const c = devCert();
  const server = await startServer({ tls: c });
  const browser = await launchBrowser([`--ignore-certificate-errors-spki-list=${c.spki}`]);
  t.after(async () => { await browser.close(); await server.stop(); fs.rmSync(c.dir, { recursive: true, force: true }); });
  const page = await browser.newPage();
  await page.goto(`${server.httpsUrl}/healthz`);
  assert.equal(await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol), 'h2');
  await page.evaluate(manyStreams(10, 2));
  await page.waitForFunction(() => window.open.every(Boolean), null, { timeout: 20000 });
  await server.publish('tabs', { n: 1 });
  await page.waitForFunction(() => window.got.every((g) => g.length === 1), null, { timeout: 20000 });
  assert.deepEqual(await page.evaluate(() => window.got), Array.from({ length: 12 }, () => [{ n: 1 }]));
  // The WebSockets came as extended CONNECTs on the h2 connection, not HTTP/1.1 upgrades.
  assert.equal(await metric(server, 'switchboard_ws_over_http2_total'), 2);
  // Resuming over RFC 8441: a WebSocket subscribing `since` the first publication gets
  // the two published while it was away, in order, then live ones.
  const first = await page.evaluate(() => window.wsPositions[0]);
  await server.publish('tabs', { n: 2 });
  await server.publish('tabs', { n: 3 });
  await page.evaluate((since) => {
    window.resumed = [];
    const w = new WebSocket(location.origin.replace('http', 'ws') + '/ws', 'switchboard.v1');
    w.onopen = () => w.send(JSON.stringify({ id: 1, cmd: 'subscribe', channel: 'tabs', since }));
    w.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.ok) window.resumedOk = m.ok;
      if (m.pub) window.resumed.push(m.pub.data);
    };
  }, first);
  await page.waitForFunction(() => window.resumed.length === 2, null, { timeout: 20000 });
  await server.publish('tabs', { n: 4 });
  await page.waitForFunction(() => window.resumed.length === 3, null, { timeout: 20000 });
  assert.deepEqual(await page.evaluate(() => window.resumed), [{ n: 2 }, { n: 3 }, { n: 4 }]);
  assert.equal(await page.evaluate(() => window.resumedOk.recovered), true);
  assert.equal(await metric(server, 'switchboard_ws_over_http2_total'), 3);
  // The whole page used one TLS connection.
  assert.equal(await metric(server, 'switchboard_tls_handshakes_total{outcome="ok"}'), 1);
});

test('over plain HTTP/1.1 the same page stalls its 7th stream: six connections per origin', async (t) => {
  const server = await startServer();
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); await server.stop(); });
  const page = await browser.newPage();
  await page.goto(`${server.url}/healthz`);
  await page.evaluate(manyStreams(7, 0));
  // Six streams open; the seventh waits for a connection that never frees up.
  await page.waitForFunction(() => window.open.filter(Boolean).length === 6, null, { timeout: 20000 });
  await server.publish('tabs', { n: 1 });
  await page.waitForFunction(() => window.got.filter((g) => g.length === 1).length === 6, null, { timeout: 20000 });
  // The seventh is not open, and the server holds six streams: it was never sent.
  assert.equal(await page.evaluate(() => window.open[6] || window.got[6].length > 0), false);
  assert.equal(await metric(server, 'switchboard_connections{transport="sse"}'), 6);
  // It was waiting for a connection: closing one stream lets it through.
  await page.evaluate(() => window.es[0].close());
  await page.waitForFunction(() => window.open[6], null, { timeout: 20000 });
  await server.publish('tabs', { n: 2 });
  await page.waitForFunction(() => window.got[6].length === 1, null, { timeout: 20000 });
  assert.deepEqual(await page.evaluate(() => window.got[6]), [{ n: 2 }]);
});
