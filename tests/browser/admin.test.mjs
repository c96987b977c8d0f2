// The admin dashboard in headless Chromium: it loads, and its numbers move after publishes.
import test from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, screenshot } from './helpers.mjs';

test('the admin dashboard loads and its numbers update after a publish', async (t) => {
  const server = await startServer();
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); await server.stop(); });
  const page = await browser.newPage();
  await page.goto(`${server.url}/admin`);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('node '), null, { timeout: 20000 });
  const before = Number(await page.textContent('#t-pub'));
  // A subscriber, so the channel shows up among the top channels.
  const sse = await fetch(`${server.url}/sse?channel=news:admin`);
  for (let i = 0; i < 5; i++) await server.publish('news:admin', { i });
  await page.waitForFunction((b) => Number(document.getElementById('t-pub').textContent) >= b + 5, before, { timeout: 20000 });
  await page.waitForFunction(() => document.getElementById('c-sse').textContent === '1', null, { timeout: 20000 });
  await page.waitForFunction(() => [...document.querySelectorAll('#channels td')].some((td) => td.textContent === 'news:admin'), null, { timeout: 20000 });
  // The publish action on the page works too.
  await page.fill('#p-ch', 'news:admin');
  await page.click('#f-pub button');
  await page.waitForFunction(() => document.getElementById('log').textContent.startsWith('publish: 200'), null, { timeout: 20000 });
  await page.waitForTimeout(1500); // let the charts gather a few samples for the screenshot
  await screenshot(page, 'admin');
  assert.ok(Number(await page.textContent('#t-pub')) >= before + 6);
  await sse.body?.cancel();
});
