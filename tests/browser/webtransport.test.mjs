// WebTransport in real headless Chromium: the page's client picks WebTransport first
// (HTTP/3 over UDP, the server's development certificate trusted by its hash from
// /wt/cert-hash), receives stored publications in order on the stream and volatile ones
// as datagrams, publishes, and resumes after the server closes the session (a restart,
// over Redis so history survives it); with UDP unreachable it falls back to WebSocket.
import test from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, freePort } from './helpers.mjs';

const redisEnv = () => ({
  SWITCHBOARD_BROKER__KIND: 'redis',
  SWITCHBOARD_BROKER__REDIS_URL: process.env.SWITCHBOARD_TEST_REDIS ?? 'redis://127.0.0.1:6379',
  SWITCHBOARD_BROKER__REDIS_PREFIX: `sbwt${process.pid}${Math.floor(Math.random() * 1e6)}`,
});

async function openPage(browser, server, channel, opts) {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  // A secure context (http://127.0.0.1), as WebTransport requires.
  await page.goto(`${server.url}/healthz`);
  await page.evaluate(async ([url, channel, opts]) => {
    const { Switchboard } = await import(`${url}/client.js`);
    window.got = [];
    window.states = [];
    window.sb = new Switchboard(url, { backoff: { base: 100, cap: 500 }, ...opts });
    window.sb.on('state', (s) => window.states.push(`${s.state}:${s.transport}`));
    window.sub = window.sb.subscribe(channel, { datagrams: true });
    window.sub.on('message', (data, pub) => window.got.push({ data, datagram: Boolean(pub.datagram), offset: pub.offset }));
  }, [server.url, channel, opts ?? {}]);
  return page;
}

test('a page on WebTransport gets stored publications in order, volatile ones as datagrams, publishes and resumes', async (t) => {
  const server = await startServer({ env: redisEnv() });
  const browser = await launchBrowser([], { quic: true });
  t.after(async () => { await browser.close(); await server.stop(); });
  const channel = 'demo:wt-page';
  const page = await openPage(browser, server, channel);
  await page.waitForFunction(() => window.sb.state === 'connected' && window.sub.position, null, { timeout: 20000 })
    .catch(async (e) => { throw new Error(`${e.message}; states: ${await page.evaluate(() => window.states.join(', '))}`); });
  assert.equal(await page.evaluate(() => window.sb.transport), 'webtransport');

  for (let i = 0; i < 20; i++) await server.publish(channel, { n: i });
  await server.publish(channel, { n: 'blip' }, { volatile: true });
  await page.waitForFunction(() => window.got.length === 21, null, { timeout: 20000 });
  const got = await page.evaluate(() => window.got);
  assert.deepEqual(got.filter((m) => !m.datagram).map((m) => m.data.n), [...Array(20).keys()]);
  assert.deepEqual(got.filter((m) => m.datagram).map((m) => m.data.n), ['blip']);

  // The page publishes over its session.
  await page.evaluate(() => window.sub.publish({ n: 'from the page' }));
  await page.waitForFunction(() => window.got.some((m) => m.data.n === 'from the page'), null, { timeout: 20000 });

  // The server restarts (SIGTERM: a `disconnect` with reconnect, then the close); what is
  // published while it is down arrives after the page resumes, nothing twice.
  await server.stop();
  await server.start();
  for (let i = 20; i < 25; i++) await server.publish(channel, { n: i });
  await page.waitForFunction(() => window.got.filter((m) => typeof m.data.n === 'number').length === 25, null, { timeout: 30000 });
  const numbers = (await page.evaluate(() => window.got)).map((m) => m.data.n).filter((n) => typeof n === 'number');
  assert.deepEqual(numbers, [...Array(25).keys()]);
  const states = await page.evaluate(() => window.states);
  assert.ok(states.filter((s) => s === 'connected:webtransport').length >= 2, states.join(', '));
});

test('with UDP unreachable the page falls back to WebSocket and the demo chat still works', async (t) => {
  // The server's WebTransport listener is on another port than the page tries.
  const server = await startServer({ env: { SWITCHBOARD_WEBTRANSPORT__LISTEN: `127.0.0.1:${await freePort()}` } });
  const browser = await launchBrowser([], { quic: true });
  t.after(async () => { await browser.close(); await server.stop(); });
  const page = await openPage(browser, server, 'demo:wt-fallback');
  await page.waitForFunction(() => window.sb.state === 'connected' && window.sub.position, null, { timeout: 20000 });
  assert.equal(await page.evaluate(() => window.sb.transport), 'websocket');
  await server.publish('demo:wt-fallback', { n: 1 });
  await page.waitForFunction(() => window.got.length === 1, null, { timeout: 20000 });

  const chat = await browser.newPage();
  await chat.goto(`${server.url}/demo/chat?name=zoe`);
  await chat.waitForFunction(() => document.getElementById('badge').dataset.state === 'connected', null, { timeout: 20000 });
  assert.equal(await chat.evaluate(() => document.getElementById('badge').dataset.transport), 'websocket');
  await chat.fill('#text', 'over the fallback');
  await chat.press('#text', 'Enter');
  await chat.waitForFunction(() => [...document.querySelectorAll('#messages .msg .text')].some((e) => e.textContent === 'over the fallback'), null, { timeout: 20000 });
});
