// Pages on another origin — as every real application serves its pages — use the server
// over each transport, the README's snippets run as written, and an origin outside the
// allowlist is refused on every transport.
import test from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { startServer, launchBrowser, freePort, root, waitFor } from './helpers.mjs';

/** Serves `html` at every path of a second origin. */
async function pageOrigin(html) {
  const port = await freePort();
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(html);
  });
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${port}`, close: () => server.close() };
}

const clientPage = (serverUrl) => `<!doctype html><meta charset="utf-8"><script type="module">
  const t = new URLSearchParams(location.search).get('t');
  window.got = []; window.errors = [];
  try {
    const { Switchboard } = await import('${serverUrl}/client.js');
    const sb = new Switchboard('${serverUrl}', { transports: [t], backoff: { base: 200, cap: 1000 } });
    sb.on('state', (s) => { window.state = s.state; window.transport = s.transport; });
    sb.on('error', (e) => window.errors.push(e.type + ': ' + String(e.error?.message ?? e.error?.code ?? e.detail)));
    window.sub = sb.subscribe('demo:cors-' + t);
    window.sub.on('message', (data) => window.got.push(data));
  } catch (e) { window.errors.push('import: ' + e); }
</script>`;

test('a page on another origin connects, receives and publishes over WebTransport, WebSocket, SSE and long polling', async (t) => {
  const server = await startServer();
  const page = await pageOrigin(clientPage(server.url));
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); page.close(); await server.stop(); });
  for (const transport of ['webtransport', 'websocket', 'sse', 'longpoll']) {
    const tab = await browser.newPage();
    await tab.goto(`${page.url}/?t=${transport}`);
    await tab.waitForFunction((tr) => window.state === 'connected' && window.transport === tr && window.sub.position,
      transport, { timeout: 20000 }).catch(async (e) => {
      throw new Error(`${transport}: ${e.message}; errors: ${await tab.evaluate(() => window.errors.join('; '))}`);
    });
    await server.publish(`demo:cors-${transport}`, { from: 'server' });
    await tab.waitForFunction(() => window.got.length === 1, null, { timeout: 20000 });
    // Publishing from the page: a command on the session, or a CORS POST for SSE and polling.
    await tab.evaluate(() => window.sub.publish({ from: 'page' }));
    await tab.waitForFunction(() => window.got.length === 2, null, { timeout: 20000 });
    assert.deepEqual(await tab.evaluate(() => window.got), [{ from: 'server' }, { from: 'page' }], transport);
    assert.deepEqual(await tab.evaluate(() => window.errors), [], transport);
    await tab.close();
  }
});

/** The README's `html` blocks, pointed at `serverUrl` instead of 127.0.0.1:8000. */
function readmeSnippets(serverUrl) {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  return [...readme.matchAll(/```html\n([\s\S]*?)```/g)].map((m) => m[1].replaceAll('http://127.0.0.1:8000', serverUrl));
}

test("the README's browser snippets run as written from another origin", async (t) => {
  const server = await startServer();
  const snippets = readmeSnippets(server.url);
  assert.equal(snippets.length, 2, 'the README has an EventSource snippet and a client snippet');
  const browser = await launchBrowser();
  const pages = [];
  t.after(async () => { await browser.close(); pages.forEach((p) => p.close()); await server.stop(); });
  const logs = [];
  for (const [i, html] of snippets.entries()) {
    const page = await pageOrigin(`<!doctype html><meta charset="utf-8">${html}`);
    pages.push(page);
    const tab = await browser.newPage();
    tab.on('console', (m) => logs.push(`${i}: ${m.text()}`));
    tab.on('pageerror', (e) => logs.push(`${i}: pageerror ${e.message}`));
    await tab.goto(page.url);
  }
  // The client snippet connects and sees its own publication.
  // (WebTransport first, where the browser has it.)
  await waitFor(() => logs.some((l) => l.startsWith('1: connected webtransport')), { what: `the client snippet to connect; got ${logs}` });
  await waitFor(() => logs.some((l) => /^1: \d+ /.test(l)), { what: `the client snippet's own message; got ${logs}` });
  // The EventSource snippet prints what the server publishes.
  await new Promise((r) => setTimeout(r, 500));
  await server.publish('news:1', { text: 'hello' });
  await waitFor(() => logs.some((l) => l.startsWith('0: news:1 1')), { what: `the EventSource snippet's message; got ${logs}` });
  assert.ok(!logs.some((l) => l.includes('pageerror') || /CORS|blocked/i.test(l)), logs.join('\n'));
});

test('an origin outside the allowlist is refused on every transport', async (t) => {
  const server = await startServer({ env: { SWITCHBOARD_SECURITY__ALLOWED_ORIGINS: 'https://app.example.com' } });
  const page = await pageOrigin(clientPage(server.url));
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); page.close(); await server.stop(); });
  const refused = async () => {
    const text = await (await fetch(`${server.url}/metrics`)).text();
    return Number(text.match(/switchboard_errors_total\{code="origin_not_allowed"\} (\d+)/)?.[1] ?? 0);
  };
  for (const transport of ['webtransport', 'websocket', 'sse', 'longpoll']) {
    const before = await refused();
    const tab = await browser.newPage();
    await tab.goto(`${page.url}/?t=${transport}`);
    await waitFor(async () => (await refused()) > before, { what: `${transport} to be refused` });
    assert.notEqual(await tab.evaluate(() => window.state), 'connected', transport);
    await tab.close();
  }
  // A cross-site publish is refused before it publishes anything.
  const tab = await browser.newPage();
  await tab.goto(page.url + '/?t=none');
  const status = await tab.evaluate(async (u) => {
    try {
      await fetch(u + '/publish', { method: 'POST', mode: 'no-cors', body: JSON.stringify({ channel: 'demo:x', data: 1 }) });
      return 'sent';
    } catch (e) { return 'failed'; }
  }, server.url);
  assert.equal(status, 'sent', 'an opaque request goes out');
  const history = await (await fetch(`${server.url}/api/history?channel=demo:x`)).json();
  assert.deepEqual(history.publications, [], 'and publishes nothing');
  await tab.close();
});
