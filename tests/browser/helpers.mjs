// Shared helpers: real server processes, a cuttable TCP proxy, headless Chromium.
import { spawn } from 'node:child_process';
import { after } from 'node:test';
import net from 'node:net';
import path from 'node:path';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '../..');
export const BIN = process.env.SWITCHBOARD_BIN ?? path.join(root, 'target/debug/switchboard');
export const ARTIFACTS = path.join(root, 'artifacts');

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
    s.on('error', reject);
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Every server a test file started is stopped when its tests are done, even when a test
// failed before registering its own cleanup (say, Chromium did not launch): a server left
// running would keep `node --test` from ever exiting.
const started = new Set();
after(() => { for (const s of started) s.child?.kill('SIGKILL'); });

export async function waitFor(fn, { timeout = 20000, every = 50, what = 'condition' } = {}) {
  const end = Date.now() + timeout;
  for (;;) {
    try { const v = await fn(); if (v) return v; } catch { /* not yet */ }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(every);
  }
}

/**
 * A `switchboard serve --dev` process. With `tls: { cert, key }` it serves HTTPS (h2 and
 * HTTP/1.1) at `httpsUrl`, and plain HTTP at `url` on a second listener for the test's
 * own requests (Node's fetch does not take a CA of its own).
 */
export async function startServer({ env = {}, port, tls } = {}) {
  if (!fs.existsSync(BIN)) throw new Error(`${BIN} is missing: run cargo build first (./scripts/test does)`);
  port ??= await freePort();
  const s = { port, url: `http://127.0.0.1:${port}`, child: null, env };
  if (tls) {
    const plain = await freePort();
    s.httpsUrl = `https://localhost:${port}`;
    s.url = `http://127.0.0.1:${plain}`;
    env = {
      ...env,
      SWITCHBOARD_TLS__CERT: tls.cert,
      SWITCHBOARD_TLS__KEY: tls.key,
      SWITCHBOARD_TLS__HTTP_LISTEN: `127.0.0.1:${plain}`,
      SWITCHBOARD_TLS__HTTP_MODE: 'serve',
    };
  }
  s.start = async () => {
    s.child = spawn(BIN, ['serve', '--dev', '--listen', `127.0.0.1:${port}`, '--drain-secs', '3'], {
      env: { ...process.env, RUST_LOG: 'warn', ...env }, stdio: ['ignore', 'ignore', 'inherit'],
    });
    s.exited = new Promise((r) => s.child.once('exit', (code, sig) => r({ code, sig })));
    started.add(s);
    await waitFor(async () => (await fetch(`${s.url}/readyz`)).ok, { what: `server on ${port}` });
  };
  s.stop = async () => { if (s.child) { s.child.kill('SIGTERM'); const r = await s.exited; s.child = null; return r; } };
  s.kill = async () => { if (s.child) { s.child.kill('SIGKILL'); await s.exited; s.child = null; } };
  s.publish = async (channel, data, extra = {}) => {
    const r = await fetch(`${s.url}/api/publish`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ channel, data, ...extra }) });
    if (!r.ok) throw new Error(`publish: HTTP ${r.status} ${await r.text()}`);
    return r.json();
  };
  await s.start();
  return s;
}

/** A TCP proxy in front of a server whose connections the test can cut. */
export async function startProxy(targetPort) {
  const sockets = new Set();
  let blocked = false;
  const server = net.createServer((client) => {
    if (blocked) { client.destroy(); return; }
    const upstream = net.connect(targetPort, '127.0.0.1');
    sockets.add(client); sockets.add(upstream);
    client.pipe(upstream); upstream.pipe(client);
    const done = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
    client.on('error', done); upstream.on('error', done); client.on('close', done); upstream.on('close', done);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    /** Drops every open connection and refuses new ones until `restore`. */
    cut() { blocked = true; for (const s of sockets) s.destroy(); sockets.clear(); },
    restore() { blocked = false; },
    close() { for (const s of sockets) s.destroy(); server.close(); },
  };
}

/** Headless Chromium. `--disable-quic` turns off HTTP/3 for pages and fetches; it does
 *  not turn off WebTransport (the JS client's first choice), but `quic` drops it too. */
export async function launchBrowser(extraArgs = [], { quic = false } = {}) {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', ...(quic ? [] : ['--disable-quic']), ...extraArgs],
  });
}

export async function screenshot(page, name) {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}
