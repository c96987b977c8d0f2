// The demo chat and the JavaScript client in real headless Chromium.
import test from 'node:test';
import assert from 'node:assert/strict';
import { startServer, startProxy, launchBrowser, screenshot, waitFor, sleep, freePort } from './helpers.mjs';

const connected = (page, transport) =>
  page.waitForFunction((t) => {
    const b = document.getElementById('badge');
    return b.dataset.state === 'connected' && (!t || b.dataset.transport === t);
  }, transport, { timeout: 20000 });

const offsets = (page) => page.$$eval('#messages .msg', (els) => els.map((e) => Number(e.dataset.offset)));
const texts = (page) => page.$$eval('#messages .msg .text', (els) => els.map((e) => e.textContent));

test('two browsers chat: messages, presence and typing reach the other page', async (t) => {
  const server = await startServer();
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); await server.stop(); });
  const alice = await browser.newPage();
  const bob = await browser.newPage();
  await alice.goto(`${server.url}/demo/chat?name=alice`);
  await bob.goto(`${server.url}/demo/chat?name=bob`);
  await connected(alice);
  await connected(bob);
  await bob.waitForFunction(() => [...document.querySelectorAll('#people li')].map((l) => l.firstChild.textContent).sort().join() === 'alice,bob', null, { timeout: 20000 });
  await alice.fill('#text', 'hel');
  await bob.waitForFunction(() => document.getElementById('typing').textContent.includes('alice is typing'), null, { timeout: 20000 });
  await alice.fill('#text', 'hello bob');
  await alice.press('#text', 'Enter');
  await bob.waitForFunction(() => [...document.querySelectorAll('#messages .msg .text')].some((e) => e.textContent === 'hello bob'), null, { timeout: 20000 });
  await bob.fill('#text', 'hi alice!');
  await bob.press('#text', 'Enter');
  await alice.waitForFunction(() => [...document.querySelectorAll('#messages .msg .text')].some((e) => e.textContent === 'hi alice!'), null, { timeout: 20000 });
  await screenshot(alice, 'chat-alice');
  await screenshot(bob, 'chat-bob');
  assert.deepEqual(await texts(alice), ['hello bob', 'hi alice!']);
});

test('a cut connection heals by itself and shows every message once, in order', async (t) => {
  const server = await startServer();
  const proxy = await startProxy(server.port);
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); proxy.close(); await server.stop(); });
  const page = await browser.newPage();
  await page.goto(`${proxy.url}/demo/chat?name=carol&room=cut`);
  await connected(page);
  for (let i = 1; i <= 5; i++) await server.publish('demo:cut', { name: 'feed', text: `m${i}` });
  await page.waitForFunction(() => document.querySelectorAll('#messages .msg').length === 5, null, { timeout: 20000 });
  proxy.cut();
  await page.waitForFunction(() => document.getElementById('badge').dataset.state === 'disconnected', null, { timeout: 20000 });
  await screenshot(page, 'chat-disconnected');
  for (let i = 6; i <= 20; i++) await server.publish('demo:cut', { name: 'feed', text: `m${i}` });
  await sleep(500);
  proxy.restore();
  await page.waitForFunction(() => document.querySelectorAll('#messages .msg').length >= 20, null, { timeout: 30000 });
  await sleep(300);
  assert.deepEqual(await offsets(page), Array.from({ length: 20 }, (_, i) => i + 1));
  assert.deepEqual(await texts(page), Array.from({ length: 20 }, (_, i) => `m${i + 1}`));
});

test('a server restart with the Redis broker loses nothing the page should show', async (t) => {
  const redisEnv = {
    SWITCHBOARD_BROKER__KIND: 'redis',
    SWITCHBOARD_BROKER__REDIS_URL: process.env.SWITCHBOARD_TEST_REDIS ?? 'redis://127.0.0.1:6379',
    SWITCHBOARD_BROKER__REDIS_PREFIX: `sbbrowser${process.pid}${Math.floor(Math.random() * 1e6)}`,
  };
  const a = await startServer({ env: redisEnv });
  const b = await startServer({ env: redisEnv });
  const proxy = await startProxy(a.port);
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); proxy.close(); await a.stop(); await b.stop(); });
  const page = await browser.newPage();
  await page.goto(`${proxy.url}/demo/chat?name=dave&room=restart`);
  await connected(page);
  let n = 0;
  let publishing = true;
  const publisher = (async () => {
    while (publishing) {
      n++;
      await b.publish('demo:restart', { name: 'feed', text: `r${n}` }, { key: `r${n}` });
      await sleep(50);
    }
  })();
  await sleep(500);
  const stopped = await a.stop(); // SIGTERM: drain, clients told to come back
  assert.equal(stopped.code, 0);
  await sleep(1000);
  await a.start();
  await sleep(1000);
  publishing = false;
  await publisher;
  await page.waitForFunction((total) => document.querySelectorAll('#messages .msg').length >= total, n, { timeout: 40000 });
  await sleep(300);
  assert.deepEqual(await offsets(page), Array.from({ length: n }, (_, i) => i + 1));
  await screenshot(page, 'chat-after-restart');
});

test('with WebSockets blocked the client falls back to SSE, then to long polling, and still chats', async (t) => {
  const off = { SWITCHBOARD_WS__ENABLED: 'false', SWITCHBOARD_WEBTRANSPORT__ENABLED: 'false' };
  const noWs = await startServer({ env: off });
  const noWsNoSse = await startServer({ env: { ...off, SWITCHBOARD_SSE__ENABLED: 'false' } });
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); await noWs.stop(); await noWsNoSse.stop(); });
  for (const [server, transport] of [[noWs, 'sse'], [noWsNoSse, 'longpoll']]) {
    const page = await browser.newPage();
    await page.goto(`${server.url}/demo/chat?name=erin&room=fallback`);
    await connected(page, transport);
    await server.publish('demo:fallback', { name: 'feed', text: `via ${transport}` });
    await page.waitForFunction((txt) => [...document.querySelectorAll('#messages .msg .text')].some((e) => e.textContent === txt), `via ${transport}`, { timeout: 20000 });
    await page.fill('#text', `erin over ${transport}`);
    await page.press('#text', 'Enter');
    await page.waitForFunction((txt) => [...document.querySelectorAll('#messages .msg .text')].some((e) => e.textContent === txt), `erin over ${transport}`, { timeout: 20000 });
    const h = await (await fetch(`${server.url}/api/history?channel=demo:fallback`)).json();
    assert.ok(h.publications.some((p) => p.data.text === `erin over ${transport}`), `publish over ${transport} was not stored`);
    await screenshot(page, `chat-${transport}`);
    await page.close();
  }
});
