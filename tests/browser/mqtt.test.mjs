// A device on MQTT and a browser page on WebSocket exchange messages through the same
// channel, both ways: mosquitto_pub → page, page → mosquitto_sub.
import test from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { startServer, launchBrowser, freePort, waitFor } from './helpers.mjs';

const run = promisify(execFile);

test('a device on MQTT and a page on WebSocket exchange messages both ways', async (t) => {
  const mqttPort = await freePort();
  const server = await startServer({ env: { SWITCHBOARD_MQTT__LISTEN: `127.0.0.1:${mqttPort}` } });
  const browser = await launchBrowser();
  t.after(async () => { await browser.close(); await server.stop(); });
  const page = await browser.newPage();
  await page.goto(`${server.url}/healthz`);
  await page.evaluate(async (url) => {
    const { Switchboard } = await import(`${url}/client.js`);
    window.got = [];
    const sb = new Switchboard(url, { transports: ['websocket'] });
    window.sub = sb.subscribe('demo:device1');
    window.sub.on('message', (data) => window.got.push(data));
  }, server.url);
  await page.waitForFunction(() => window.sub.position, null, { timeout: 20000 });

  // The device listens, then the device publishes: the page gets it.
  const device = spawn('mosquitto_sub', ['-h', '127.0.0.1', '-p', String(mqttPort), '-V', 'mqttv5',
    '-t', 'demo/device1', '-C', '2', '-W', '60']);
  let heard = '';
  device.stdout.on('data', (d) => { heard += d; });
  const deviceDone = new Promise((r) => device.once('exit', r));
  // Both subscribed (the page and the device) before anything is published.
  await waitFor(async () => {
    const r = await (await fetch(`${server.url}/api/channels?scope=node`)).json();
    return r.channels.find((c) => c.channel === 'demo:device1')?.subscribers === 2;
  }, { what: 'the device subscribed' });
  await run('mosquitto_pub', ['-h', '127.0.0.1', '-p', String(mqttPort), '-t', 'demo/device1',
    '-m', '{"temp":21.5}', '-q', '1']);
  await page.waitForFunction(() => window.got.length === 1, null, { timeout: 20000 });
  assert.deepEqual(await page.evaluate(() => window.got), [{ temp: 21.5 }]);

  // The page publishes: the device hears it (its own first message was the device's).
  await page.evaluate(() => window.sub.publish({ cmd: 'reboot' }));
  await deviceDone;
  assert.deepEqual(heard.trim().split('\n'), ['{"temp":21.5}', '{"cmd":"reboot"}']);
});
