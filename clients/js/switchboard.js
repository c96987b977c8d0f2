// Switchboard JavaScript client — dependency-free ES module for browsers and Node ≥ 18.
//
//   import { Switchboard } from '/client.js';
//   const sb = new Switchboard('https://rt.example.com', { getToken });
//   const sub = sb.subscribe('chat:room1', { rewind: 50 });
//   sub.on('message', (data, pub) => render(data));
//   sub.publish({ text: 'hi' });
//
// Transports, tried in order on every (re)connect: WebTransport (HTTP/3; where the
// browser has it) → WebSocket → SSE (+ HTTP POST for publish) → long poll. Reconnects use full-jitter backoff, resume every subscription
// from its last position (nothing missed, nothing twice), and honour the server's advice
// (drain retry hints, Retry-After). A heartbeat watchdog treats a silent connection as
// dead. Malformed server frames never throw: they raise an `error` event and reconnect.
// Protocol reference: docs/protocol.md.

const DEFAULTS = {
  transports: ['webtransport', 'websocket', 'sse', 'longpoll'],
  // How long a WebTransport session may take to open before the next transport is tried
  // (UDP blocked on the way: fall back quickly).
  webTransportTimeout: 3000,
  backoff: { base: 500, cap: 30000 },
  pollWait: 25,
  openTimeout: 10000,
  pingInterval: 25000,
};

/** Full-jitter backoff: a delay in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt, base = 500, cap = 30000, random = Math.random) {
  return random() * Math.min(cap, base * 2 ** Math.max(0, attempt));
}

/** MQTT-style match of a `ns:a/+/#` pattern against a channel name. */
export function patternMatches(pattern, channel) {
  const i = pattern.indexOf(':');
  if (i < 0 || !channel.startsWith(pattern.slice(0, i + 1))) return false;
  const p = pattern.slice(i + 1).split('/');
  const c = channel.slice(i + 1).split('/');
  for (let k = 0; k < p.length; k++) {
    if (p[k] === '#') return true;
    if (k >= c.length) return false;
    if (p[k] !== '+' && p[k] !== c[k]) return false;
  }
  return p.length === c.length;
}

const isPattern = (s) => s.includes('+') || s.includes('#');

class Emitter {
  constructor() { this._handlers = new Map(); }
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return this;
  }
  off(event, fn) { this._handlers.get(event)?.delete(fn); return this; }
  emit(event, ...args) {
    for (const fn of this._handlers.get(event) ?? []) {
      try { fn(...args); } catch (e) { setTimeout(() => { throw e; }); }
    }
  }
}

function parsePosition(s) {
  if (!s) return null;
  if (typeof s === 'object') return { epoch: String(s.epoch), offset: Number(s.offset) };
  const i = String(s).lastIndexOf(':');
  return i > 0 ? { epoch: s.slice(0, i), offset: Number(s.slice(i + 1)) } : null;
}

const formatPosition = (p) => `${p.epoch}:${p.offset}`;

/** One subscription: a channel (or live-only pattern) and its position. */
export class Subscription extends Emitter {
  constructor(client, channel, opts = {}) {
    super();
    this.client = client;
    this.channel = channel;
    this.pattern = isPattern(channel);
    this.rewind = opts.rewind ?? 0;
    // Over WebTransport: volatile publications as datagrams (unreliable, unordered).
    this.datagrams = Boolean(opts.datagrams);
    this.subscriptionToken = opts.token;
    this._position = parsePosition(opts.since);
    this.active = true;
  }

  /** `epoch:offset` of the last publication delivered (or where it started). */
  get position() { return this._position ? formatPosition(this._position) : null; }

  publish(data, opts = {}) { return this.client._publish(this.channel, data, opts); }
  presence() { return this.client._presence(this.channel, false); }
  presenceStats() { return this.client._presence(this.channel, true); }
  unsubscribe() { this.client._unsubscribe(this); }

  _start(epoch, offset) {
    if (!this.pattern && epoch !== undefined) this._position = { epoch, offset };
  }

  _deliver(pub) {
    if (!this.pattern && !pub.volatile && pub.offset !== undefined) {
      const p = this._position;
      if (p && p.epoch === pub.epoch && pub.offset <= p.offset) return; // seen already
      this._position = { epoch: pub.epoch, offset: pub.offset };
    }
    this.emit('message', pub.data, pub);
  }

  _reset(info) {
    this._position = { epoch: info.epoch, offset: info.offset };
    this.emit('reset', info);
  }
}

/** The client. */
export class Switchboard extends Emitter {
  constructor(url, opts = {}) {
    super();
    const given = Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined));
    this.opts = { ...DEFAULTS, ...given, backoff: { ...DEFAULTS.backoff, ...(opts.backoff ?? {}) } };
    const u = new URL(url, globalThis.location?.href);
    this.httpBase = `${u.protocol === 'wss:' || u.protocol === 'https:' ? 'https:' : 'http:'}//${u.host}`;
    this.wsUrl = `${u.protocol === 'https:' || u.protocol === 'wss:' ? 'wss:' : 'ws:'}//${u.host}/ws`;
    // WebTransport: the HTTP port's number over UDP unless told otherwise.
    this.wtUrl = opts.webTransportUrl ?? `https://${u.host}/wt?protocol=switchboard.v1`;
    this.token = opts.token ?? null;
    this.subs = new Map();
    this.state = 'idle';
    this.transport = null;
    this.attempt = 0;
    this._conn = null;
    this._timer = null;
    this._closed = false;
    this._generation = 0;
    if (opts.autoConnect !== false) queueMicrotask(() => this.connect());
  }

  subscribe(channel, opts = {}) {
    if (this.subs.has(channel)) return this.subs.get(channel);
    const sub = new Subscription(this, channel, opts);
    this.subs.set(channel, sub);
    this._conn?.subscribe(sub);
    return sub;
  }

  connect() {
    if (this._closed || this.state === 'connecting' || this.state === 'connected') return;
    clearTimeout(this._timer);
    this._open();
  }

  /** Closes for good. */
  close() {
    this._closed = true;
    clearTimeout(this._timer);
    this._generation++;
    this._conn?.close();
    this._conn = null;
    this._setState('closed', { reason: 'closed by the application' });
  }

  _setState(state, detail = {}) {
    this.state = state;
    this.emit('state', { state, transport: this.transport, attempt: this.attempt, ...detail });
  }

  async _token(force = false) {
    if (this.opts.getToken && (force || !this.token)) {
      try { this.token = await this.opts.getToken(); } catch (e) { this.emit('error', { type: 'token', error: e }); }
    }
    return this.token;
  }

  async _open() {
    const gen = ++this._generation;
    const order = this.opts.transports.filter((t) => TRANSPORTS[t]?.available(this));
    for (const name of order) {
      if (gen !== this._generation || this._closed) return;
      this.transport = name;
      this._setState('connecting', { transport: name });
      const conn = new TRANSPORTS[name](this, gen);
      try {
        await withTimeout(conn.open(), this.opts.openTimeout);
        if (gen !== this._generation) { conn.close(); return; }
        this._conn = conn;
        this.attempt = 0;
        this._setState('connected', { transport: name });
        return;
      } catch (e) {
        conn.close();
        if (e?.fatal) return this._lost(e.reason ?? 'refused', { reconnect: false, gen });
        if (e?.auth) await this._token(true);
        this.emit('error', { type: 'transport', transport: name, error: e });
        if (e?.retryAfterMs) return this._lost(`${name} refused`, { gen, delayMs: e.retryAfterMs });
      }
    }
    this._lost('no transport could connect', { gen });
  }

  /** The connection is gone: schedule the next attempt (unless told not to). */
  _lost(reason, { reconnect = true, delayMs, gen } = {}) {
    if (gen !== undefined && gen !== this._generation) return;
    this._generation++;
    this._conn?.close();
    this._conn = null;
    if (this._closed) return;
    if (!reconnect) {
      this._setState('disconnected', { reason, willReconnect: false });
      return;
    }
    const jitter = backoffDelay(this.attempt, this.opts.backoff.base, this.opts.backoff.cap);
    const delay = delayMs !== undefined ? delayMs + jitter / 4 : jitter;
    this.attempt++;
    const nextRetryAt = Date.now() + delay;
    this._setState('disconnected', { reason, willReconnect: true, nextRetryAt, delayMs: delay });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _protocolError(detail) {
    this.emit('error', { type: 'protocol', detail });
    this._lost('protocol error');
  }

  // Routing of server events to subscriptions.
  _route(pub) {
    const exact = this.subs.get(pub.channel);
    if (exact) exact._deliver(pub);
    for (const sub of this.subs.values()) {
      if (sub.pattern && patternMatches(sub.channel, pub.channel)) sub._deliver(pub);
    }
  }

  _presenceEvent(kind, ev) {
    this.subs.get(ev.channel)?.emit(kind, ev);
  }

  _unsubscribe(sub) {
    if (this.subs.get(sub.channel) !== sub) return;
    this.subs.delete(sub.channel);
    sub.active = false;
    this._conn?.unsubscribe(sub);
  }

  /** A direct message to one connection (`{client}`) or every connection of a user
   *  (`{user}`). Not stored. Over SSE and polling it goes as `POST /send`, from this
   *  connection (its client key) when it has one; `opts.channel` names the channel both
   *  are present in, for servers whose `[direct] policy` is `presence`. */
  async send(to, data, opts = {}) {
    if (this._conn?.call) return this._conn.call({ cmd: 'send', to, data });
    const body = { to, data };
    if (opts.channel) body.channel = opts.channel;
    const key = this._conn?.clientKey;
    const q = key ? `?client_key=${encodeURIComponent(key)}` : '';
    return this._httpJson(`/send${q}`, { method: 'POST', body: JSON.stringify(body) });
  }

  /** This connection's client id (what others `send` to), once connected. */
  get clientId() { return this._conn?.clientId ?? null; }

  async _publish(channel, data, opts) {
    if (this._conn?.publish) return this._conn.publish(channel, data, opts);
    return this._httpPublish(channel, data, opts);
  }

  async _presence(channel, stats) {
    if (this._conn?.presence) return this._conn.presence(channel, stats);
    return this._httpJson(`/${stats ? 'presence_stats' : 'presence'}?channel=${encodeURIComponent(channel)}`);
  }

  async _httpPublish(channel, data, opts) {
    const body = { channel, data };
    if (opts.volatile !== undefined) body.volatile = opts.volatile;
    if (opts.key) body.key = opts.key;
    if (opts.meta) body.meta = opts.meta;
    return this._httpJson('/publish', { method: 'POST', body: JSON.stringify(body) });
  }

  /** `serverCertificateHashes` for WebTransport: given, or the server's development
   *  certificate (`/wt/cert-hash`; none when it uses a real certificate). */
  async _certHashes() {
    if (this.opts.serverCertificateHashes) return this.opts.serverCertificateHashes;
    try {
      const r = await fetch(`${this.httpBase}/wt/cert-hash`);
      if (!r.ok) return undefined;
      const v = await r.json();
      const bytes = Uint8Array.from(atob(v.value), (ch) => ch.charCodeAt(0));
      return [{ algorithm: v.algorithm, value: bytes }];
    } catch { return undefined; }
  }

  async _httpJson(path, init = {}) {
    const headers = { 'content-type': 'application/json' };
    const token = await this._token();
    if (token) headers.authorization = `Bearer ${token}`;
    const r = await fetch(this.httpBase + path, { ...init, headers });
    const v = await r.json().catch(() => ({}));
    if (!r.ok) throw Object.assign(new Error(v?.error?.message ?? `HTTP ${r.status}`), { code: v?.error?.code, status: r.status });
    return v;
  }

  /** Fills in positions for subscriptions that have none (and replays their rewind),
   *  so SSE and polling can send one complete cursor. */
  async _preflight(subs) {
    for (const sub of subs) {
      if (sub.pattern || sub._position) continue;
      const q = new URLSearchParams({ channel: sub.channel });
      if (sub.rewind) q.set('rewind', String(sub.rewind));
      const token = await this._token();
      if (token) q.set('token', token);
      if (sub.subscriptionToken) q.set('sub_token', sub.subscriptionToken);
      const r = await fetch(`${this.httpBase}/poll?${q}`);
      const v = await r.json().catch(() => null);
      if (r.status === 409 && v?.error?.code === 'history_disabled') continue; // live-only: no position
      if (!r.ok || !v) throw httpError(r, v);
      const [epochOffset] = [v.cursor];
      const start = parsePosition(epochOffset);
      const msgs = v.messages ?? [];
      if (msgs.length) sub._position = { epoch: start.epoch, offset: msgs[0].offset - 1 };
      else sub._position = start;
      for (const m of msgs) sub._deliver(m);
    }
  }
}

function httpError(r, v) {
  const code = v?.error?.code;
  const e = new Error(v?.error?.message ?? `HTTP ${r.status}`);
  e.code = code;
  if (r.status === 503) e.retryAfterMs = (Number(r.headers.get('retry-after')) || 1) * 1000;
  if (r.status === 401 && (code === 'token_expired' || code === 'token_invalid')) e.auth = true;
  if (r.status === 401 && code === 'token_revoked') { e.fatal = true; e.reason = code; }
  if (r.status === 404 && code === 'transport_disabled') e.disabled = true;
  return e;
}

function withTimeout(p, ms) {
  let t;
  return Promise.race([p, new Promise((_, rej) => { t = setTimeout(() => rej(new Error('timed out')), ms); })])
    .finally(() => clearTimeout(t));
}

function safeJson(text) {
  try { return JSON.parse(text); } catch { return undefined; }
}

// --- WebSocket ---------------------------------------------------------------------

class WebSocketTransport {
  static available(c) { return Boolean(c.opts.WebSocket ?? globalThis.WebSocket); }

  constructor(client, gen) {
    this.c = client;
    this.gen = gen;
    this.pending = new Map();
    this.nextId = 1;
    this.lastHeard = Date.now();
    this.advice = null;
  }

  open() {
    return new Promise((resolve, reject) => {
      const WS = this.c.opts.WebSocket ?? globalThis.WebSocket;
      let opened = false;
      try { this.ws = new WS(this.c.wsUrl, 'switchboard.v1'); } catch (e) { reject(e); return; }
      this.ws.onopen = () => {
        opened = true;
        this.hello().then(resolve, reject);
      };
      this.ws.onerror = () => { if (!opened) reject(new Error('websocket failed to open')); };
      this.ws.onclose = (ev) => {
        if (!opened) { reject(new Error(`websocket closed (${ev.code})`)); return; }
        this.onClose(ev.code, ev.reason);
      };
      this.ws.onmessage = (ev) => this.onMessage(ev.data);
    });
  }

  /** After the transport opened: `connect`, the subscriptions, the heartbeat. */
  async hello() {
    try {
      const token = await this.c._token();
      const hello = await this.call({ cmd: 'connect', token: token ?? undefined, client: this.c.opts.client });
      this.clientId = hello.client;
      this.pingEvery = hello.ping_interval_ms ?? this.c.opts.pingInterval;
      if (hello.expires_in_ms) this.armRefresh(hello.expires_in_ms);
      for (const sub of this.c.subs.values()) this.subscribe(sub);
      this.watchdog = setInterval(() => this.heartbeat(), this.pingEvery);
    } catch (e) {
      if (e.code === 'token_expired' || e.code === 'token_invalid') e.auth = true;
      if (e.code === 'token_revoked') { e.fatal = true; e.reason = e.code; }
      throw e;
    }
  }

  heartbeat() {
    if (Date.now() - this.lastHeard > 3 * this.pingEvery) {
      this.c._lost('heartbeat timeout', { gen: this.gen });
      return;
    }
    this.call({ cmd: 'ping' }).catch(() => {});
  }

  armRefresh(ms) {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => this.refresh(), Math.max(1000, ms * 0.9));
  }

  async refresh() {
    const token = await this.c._token(true);
    if (!token) return;
    try {
      const r = await this.call({ cmd: 'refresh', token });
      if (r.expires_in_ms) this.armRefresh(r.expires_in_ms);
    } catch (e) { this.c.emit('error', { type: 'token', error: e }); }
  }

  send(obj) {
    if (this.ws?.readyState === 1) this.ws.send(JSON.stringify(obj));
  }

  call(cmd) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.send({ ...cmd, id });
    });
  }

  get ready() { return this.ws?.readyState === 1; }

  subscribe(sub) {
    if (!this.ready) return;
    const cmd = { cmd: 'subscribe', channel: sub.channel };
    if (sub.datagrams && this.datagrams) cmd.datagrams = true;
    if (!sub.pattern) {
      if (sub._position) cmd.since = formatPosition(sub._position);
      else if (sub.rewind) cmd.rewind = sub.rewind;
      if (sub.subscriptionToken) cmd.token = sub.subscriptionToken;
    }
    this.call(cmd).then((ok) => {
      if (ok.recovered === false) sub._reset({ channel: sub.channel, epoch: ok.epoch, offset: ok.offset, reason: 'position_lost' });
      else if (!sub._position && ok.epoch !== undefined) sub._start(ok.epoch, ok.offset);
      sub.emit('subscribed', ok);
    }, (e) => sub.emit('error', e));
  }

  unsubscribe(sub) { this.call({ cmd: 'unsubscribe', channel: sub.channel }).catch(() => {}); }

  publish(channel, data, opts) {
    const cmd = { cmd: 'publish', channel, data };
    if (opts.volatile !== undefined) cmd.volatile = opts.volatile;
    if (opts.key) cmd.key = opts.key;
    if (opts.meta) cmd.meta = opts.meta;
    return this.call(cmd);
  }

  presence(channel, stats) { return this.call({ cmd: stats ? 'presence_stats' : 'presence', channel }); }

  onMessage(text) {
    this.lastHeard = Date.now();
    const m = typeof text === 'string' ? safeJson(text) : undefined;
    if (!m || typeof m !== 'object') return this.c._protocolError('malformed frame from the server');
    if (m.id !== undefined && m.id !== null) {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.error) p.reject(Object.assign(new Error(m.error.message), { code: m.error.code }));
      else p.resolve(m.ok);
      return;
    }
    if (m.id === null && m.error) return this.c.emit('error', { type: 'server', error: m.error });
    if (m.pub) return this.c._route(m.pub);
    if (m.reset) return this.c.subs.get(m.reset.channel)?._reset(m.reset);
    if (m.join) return this.c._presenceEvent('join', m.join);
    if (m.leave) return this.c._presenceEvent('leave', m.leave);
    if (m.subscribed) return;
    if (m.refresh) return this.refresh();
    if (m.message) return this.c.emit('message:direct', m.message.data, m.message.from);
    if (m.disconnect) { this.advice = m.disconnect; return; }
    if (m.close) { this.closeInfo = m.close; return; } // WebTransport: the code it closes with
    this.c._protocolError('unknown message from the server');
  }

  onClose(code, reason) {
    const a = this.advice;
    if (code === 4102 || (a && a.reconnect === false)) return this.c._lost(reason || 'disconnected by the server', { reconnect: false, gen: this.gen });
    if (code === 4100 || code === 4101) {
      this.c._token(true).then(() => this.c._lost('token expired', { gen: this.gen }));
      return;
    }
    const delayMs = a?.retry_ms !== undefined ? a.retry_ms : undefined;
    this.c._lost(reason || `connection closed (${code})`, { gen: this.gen, delayMs });
  }

  close() {
    clearInterval(this.watchdog);
    clearTimeout(this.refreshTimer);
    for (const p of this.pending.values()) p.reject(new Error('connection closed'));
    this.pending.clear();
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.onmessage = null;
      try { this.ws.close(); } catch { /* already closed */ }
    }
  }
}

// --- WebTransport (HTTP/3) -----------------------------------------------------------

/** The same protocol as WebSocket, one JSON message per line on a bidirectional stream;
 *  volatile publications of `datagrams` subscriptions arrive as datagrams. */
class WebTransportTransport extends WebSocketTransport {
  static available(c) { return Boolean(c.opts.WebTransport ?? globalThis.WebTransport); }

  constructor(client, gen) {
    super(client, gen);
    this.datagrams = true;
    this.encoder = new TextEncoder();
  }

  get ready() { return Boolean(this.writer) && !this.ended; }

  async open() {
    const WT = this.c.opts.WebTransport ?? globalThis.WebTransport;
    const options = { protocols: ['switchboard.v1'] };
    const hashes = await this.c._certHashes();
    if (hashes) options.serverCertificateHashes = hashes;
    this.wt = new WT(this.c.wtUrl, options);
    this.wt.closed.then((i) => this.end(i?.closeCode, i?.reason), () => this.end());
    await withTimeout(this.wt.ready, this.c.opts.webTransportTimeout);
    const stream = await this.wt.createBidirectionalStream();
    this.writer = stream.writable.getWriter();
    this.readLines(stream.readable);
    this.readDatagrams();
    await this.hello();
    this.opened = true;
  }

  send(obj) {
    if (this.ready) this.writer.write(this.encoder.encode(`${JSON.stringify(obj)}\n`)).catch(() => {});
  }

  async readLines(readable) {
    const reader = readable.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          if (line.trim()) this.onMessage(line);
        }
      }
    } catch { /* the session ended */ }
    this.end();
  }

  async readDatagrams() {
    const reader = this.wt.datagrams.readable.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const r = await reader.read().catch(() => ({ done: true }));
      if (r.done) return;
      const m = safeJson(decoder.decode(r.value));
      if (m?.pub) { this.lastHeard = Date.now(); this.c._route({ ...m.pub, datagram: true }); }
    }
  }

  /** The session is over: its code from the last line the server sent (or the close). */
  end(code, reason) {
    if (this.ended) return;
    this.ended = true;
    if (!this.opened) return;
    const said = this.closeInfo ?? (this.advice && { code: this.advice.code, reason: this.advice.reason });
    this.onClose(said?.code ?? code ?? 1006, said?.reason ?? reason ?? 'WebTransport session closed');
  }

  close() {
    this.ended = true;
    clearInterval(this.watchdog);
    clearTimeout(this.refreshTimer);
    for (const p of this.pending.values()) p.reject(new Error('connection closed'));
    this.pending.clear();
    try { this.wt?.close(); } catch { /* already closed */ }
  }
}

// --- Server-Sent Events --------------------------------------------------------------

class SseTransport {
  static available(c) { return Boolean(c.opts.EventSource ?? globalThis.EventSource); }

  constructor(client, gen) { this.c = client; this.gen = gen; }

  async open() {
    const subs = [...this.c.subs.values()];
    await this.c._preflight(subs);
    return this.start(subs);
  }

  start(subs) {
    const ES = this.c.opts.EventSource ?? globalThis.EventSource;
    const exact = subs.filter((s) => !s.pattern);
    const q = new URLSearchParams();
    for (const s of subs) q.append('channel', s.channel);
    // A cursor needs every channel's position (live-only namespaces may have none).
    if (exact.length && exact.every((s) => s._position)) {
      q.set('last_event_id', exact.map((s) => formatPosition(s._position)).join(','));
    }
    for (const s of exact) if (s.subscriptionToken) q.append('sub_token', s.subscriptionToken);
    if (this.c.token) q.set('token', this.c.token);
    // Who this client says it is, for presence (as `connect` does on a WebSocket).
    else if (this.c.opts.client) q.set('client', JSON.stringify(this.c.opts.client));
    if (!subs.length) return Promise.resolve(); // nothing to stream yet
    return new Promise((resolve, reject) => {
      let opened = false;
      const es = new ES(`${this.c.httpBase}/sse?${q}`);
      this.es = es;
      es.addEventListener('subscribed', (ev) => {
        const info = safeJson(ev.data);
        this.clientId = info?.client ?? null;
        this.clientKey = info?.client_key ?? null;
        opened = true;
        resolve();
      });
      es.addEventListener('direct', (ev) => {
        const m = safeJson(ev.data);
        if (m) this.c.emit('message:direct', m.data, m.from);
      });
      es.addEventListener('message', (ev) => {
        const pub = safeJson(ev.data);
        if (!pub || typeof pub !== 'object') return this.c._protocolError('malformed SSE event');
        this.c._route(pub);
      });
      es.addEventListener('reset', (ev) => {
        const r = safeJson(ev.data);
        if (r) this.c.subs.get(r.channel)?._reset(r);
      });
      es.addEventListener('join', (ev) => { const j = safeJson(ev.data); if (j) this.c._presenceEvent('join', j); });
      es.addEventListener('leave', (ev) => { const j = safeJson(ev.data); if (j) this.c._presenceEvent('leave', j); });
      es.addEventListener('disconnect', (ev) => {
        const d = safeJson(ev.data) ?? {};
        this.c._lost(`server: ${d.reason ?? 'disconnect'}`, { reconnect: d.reconnect !== false, delayMs: d.retry_ms, gen: this.gen });
      });
      es.onerror = () => {
        // We own reconnection (backoff, resume, fallback): stop EventSource's own.
        es.close();
        if (!opened) reject(new Error('event stream failed to open'));
        else this.c._lost('event stream lost', { gen: this.gen });
      };
    });
  }

  restart() {
    this.es?.close();
    this.start([...this.c.subs.values()]).catch(() => this.c._lost('event stream lost', { gen: this.gen }));
  }

  async subscribe(sub) {
    try { await this.c._preflight([sub]); } catch (e) { sub.emit('error', e); return; }
    this.restart();
  }

  unsubscribe() { this.restart(); }
  close() { this.es?.close(); }
}

// --- Long polling --------------------------------------------------------------------

class LongPollTransport {
  static available() { return typeof fetch === 'function'; }

  constructor(client, gen) { this.c = client; this.gen = gen; this.stopped = false; }

  async open() {
    const subs = [...this.c.subs.values()];
    if (subs.some((s) => s.pattern)) throw new Error('long polling cannot carry pattern subscriptions');
    await this.c._preflight(subs);
    await this.pollOnce(0); // proves the transport works before declaring it open
    this.loop();
  }

  query(wait) {
    const subs = [...this.c.subs.values()].filter((s) => !s.pattern && s._position);
    const q = new URLSearchParams();
    for (const s of subs) q.append('channel', s.channel);
    q.set('since', subs.map((s) => formatPosition(s._position)).join(','));
    q.set('wait', String(wait));
    for (const s of subs) if (s.subscriptionToken) q.append('sub_token', s.subscriptionToken);
    if (this.c.token) q.set('token', this.c.token);
    // Direct messages wait for this poller in a mailbox on the server between polls.
    if (this.clientKey) q.set('client_key', this.clientKey);
    else if (!this.directOff) q.set('direct', '1');
    return { subs, q };
  }

  async pollOnce(wait) {
    const { subs, q } = this.query(wait);
    // With nothing subscribed, a poll only for direct messages (when the server has them).
    if (!subs.length && this.directOff) {
      await new Promise((r) => setTimeout(r, Math.min(wait, 1) * 1000));
      return;
    }
    this.abort = new AbortController();
    const r = await fetch(`${this.c.httpBase}/poll?${q}`, { signal: this.abort.signal });
    const v = await r.json().catch(() => undefined);
    if (!r.ok) throw httpError(r, v);
    if (!v || !Array.isArray(v.messages)) return this.c._protocolError('malformed poll answer');
    // A new id when the mailbox was closed meanwhile (as after a reconnect).
    if (v.client_key) { this.clientKey = v.client_key; this.clientId = v.client; } else this.directOff = true;
    for (const reset of v.resets ?? []) this.c.subs.get(reset.channel)?._reset(reset);
    for (const m of v.messages) this.c._route(m);
    for (const m of v.direct ?? []) this.c.emit('message:direct', m.data, m.from);
  }

  async loop() {
    while (!this.stopped) {
      try {
        await this.pollOnce(this.c.opts.pollWait);
      } catch (e) {
        if (this.stopped) return;
        if (e?.name === 'AbortError') continue; // the subscription list changed: poll again
        if (e?.auth) await this.c._token(true);
        return this.c._lost('poll failed', { gen: this.gen, delayMs: e?.retryAfterMs });
      }
    }
  }

  subscribe(sub) {
    this.c._preflight([sub]).catch((e) => sub.emit('error', e));
    this.abort?.abort(); // the next poll includes it
  }

  unsubscribe() { this.abort?.abort(); }
  close() { this.stopped = true; this.abort?.abort(); }
}

const TRANSPORTS = {
  webtransport: WebTransportTransport,
  websocket: WebSocketTransport,
  sse: SseTransport,
  longpoll: LongPollTransport,
};

export default Switchboard;
