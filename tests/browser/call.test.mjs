// The call demo (/demo/call): two pages in headless Chromium, with fake camera media,
// find each other through presence, signal through Switchboard's direct messages, open
// an RTCDataChannel that carries messages both ways and a video call whose remote
// element receives frames — on one server, and with the pages on two nodes over Redis.
import test from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, screenshot } from './helpers.mjs';

const media = ['--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream'];

async function callBetween(browser, urlA, urlB, room, query = '') {
  const a = await browser.newPage();
  const b = await browser.newPage();
  await a.goto(`${urlA}/demo/call?room=${room}&name=ann${query}`);
  await b.goto(`${urlB}/demo/call?room=${room}&name=ben${query}`);
  for (const p of [a, b]) {
    await p.waitForFunction(() => document.getElementById('peer').dataset.state === 'connected'
      && window.call.dc?.readyState === 'open', null, { timeout: 30000 })
      .catch(async (e) => { throw new Error(`${e.message}; log: ${await p.evaluate(() => document.getElementById('log').innerText)}`); });
  }
  // The data channel, both ways (typed into the page's form).
  await a.fill('#text', 'hello from ann');
  await a.press('#text', 'Enter');
  await b.waitForFunction(() => window.call.received.includes('hello from ann'), null, { timeout: 20000 });
  await b.fill('#text', 'hello from ben');
  await b.press('#text', 'Enter');
  await a.waitForFunction(() => window.call.received.includes('hello from ben'), null, { timeout: 20000 });
  // Video: frames arrive and keep arriving on each page's remote element.
  for (const p of [a, b]) {
    await p.waitForFunction(() => {
      const v = document.getElementById('remote');
      return v.videoWidth > 0 && v.currentTime > 0.5;
    }, null, { timeout: 30000 });
    const frames = await p.evaluate(() => new Promise((resolve) => {
      const v = document.getElementById('remote');
      let n = 0;
      const step = () => { if (++n === 5) resolve(n); else v.requestVideoFrameCallback(step); };
      v.requestVideoFrameCallback(step);
    }));
    assert.equal(frames, 5);
  }
  return [a, b];
}

test('two pages complete a call through Switchboard: data channel both ways and video', async (t) => {
  const server = await startServer();
  const browser = await launchBrowser(media);
  t.after(async () => { await browser.close(); await server.stop(); });
  const [a] = await callBetween(browser, server.url, server.url, 'one');
  await screenshot(a, 'call');
  // Signaling went through direct messages.
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  const sent = Number(metrics.match(/switchboard_direct_messages_total (\d+)/)?.[1] ?? 0);
  assert.ok(sent >= 3, `only ${sent} direct messages (offer, answer, candidates)`);
});

test('the pages complete the call when they are on two nodes over Redis', async (t) => {
  const env = {
    SWITCHBOARD_BROKER__KIND: 'redis',
    SWITCHBOARD_BROKER__REDIS_URL: process.env.SWITCHBOARD_TEST_REDIS ?? 'redis://127.0.0.1:6379',
    SWITCHBOARD_BROKER__REDIS_PREFIX: `sbcall${process.pid}${Math.floor(Math.random() * 1e6)}`,
  };
  const a = await startServer({ env });
  const b = await startServer({ env });
  const browser = await launchBrowser(media);
  t.after(async () => { await browser.close(); await a.stop(); await b.stop(); });
  await callBetween(browser, a.url, b.url, 'two');
});

test('over Server-Sent Events, signaling goes out as POST /send and comes in as the stream\'s direct events', async (t) => {
  const server = await startServer();
  const browser = await launchBrowser(media);
  t.after(async () => { await browser.close(); await server.stop(); });
  const [a, b] = await callBetween(browser, server.url, server.url, 'sse', '&transports=sse');
  for (const p of [a, b]) assert.equal(await p.evaluate(() => document.querySelector('#badge span').textContent), 'via sse');
});
