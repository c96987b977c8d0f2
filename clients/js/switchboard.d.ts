// Type declarations for the Switchboard JavaScript client (switchboard.js).

export type TransportName = 'webtransport' | 'websocket' | 'sse' | 'longpoll';

export interface Publication<T = unknown> {
  channel: string;
  /** Absent for volatile publications. */
  offset?: number;
  epoch?: string;
  time: number;
  data: T;
  volatile?: boolean;
  /** It arrived as a WebTransport datagram (a `datagrams` subscription). */
  datagram?: boolean;
}

export interface PresenceMember {
  client: string;
  user: string;
  info: unknown;
}

export interface ResetInfo {
  channel: string;
  epoch: string;
  offset: number;
  reason: 'position_lost' | 'stream_reset';
}

export interface StateEvent {
  state: 'connecting' | 'connected' | 'disconnected' | 'closed';
  transport: TransportName | null;
  attempt: number;
  reason?: string;
  willReconnect?: boolean;
  /** Epoch milliseconds of the next attempt, when one is scheduled. */
  nextRetryAt?: number;
  delayMs?: number;
}

export interface SwitchboardOptions {
  /** Connection token (JWT). */
  token?: string;
  /** Called for a token before connecting, before expiry and after auth errors. */
  getToken?: () => string | Promise<string>;
  /** Transports to try, in order, on every (re)connect (default: webtransport,
   *  websocket, sse, longpoll — those the runtime has). */
  transports?: TransportName[];
  /** WebTransport session URL (default: `https://<host>/wt?protocol=switchboard.v1`, the
   *  HTTP port's number over UDP). */
  webTransportUrl?: string;
  /** Certificates WebTransport trusts by hash; by default the server's development
   *  certificate from `/wt/cert-hash`, when it has one. */
  serverCertificateHashes?: { algorithm: 'sha-256'; value: BufferSource }[];
  /** Milliseconds a WebTransport session has to open before the next transport is
   *  tried (default 3000). */
  webTransportTimeout?: number;
  /** WebTransport implementation, where there is no global one. */
  WebTransport?: unknown;
  /** Full-jitter backoff: delay = random(0, min(cap, base * 2^attempt)) ms. */
  backoff?: { base?: number; cap?: number };
  /** Seconds a long poll is held. */
  pollWait?: number;
  /** Milliseconds a transport has to open before the next one is tried. */
  openTimeout?: number;
  /** Public info about this client (anonymous presence shows it as unverified). */
  client?: unknown;
  /** WebSocket implementation (Node: `import WebSocket from 'ws'`). */
  WebSocket?: unknown;
  /** EventSource implementation, where there is no global one. */
  EventSource?: unknown;
  /** Connect at once (default) or on `connect()`. */
  autoConnect?: boolean;
}

/** Who sent a direct message: a connection (with its user, if it has a token) or the
 *  application through the server API. */
export type DirectSender = { client: string; user: string | null } | { server: true };

export interface SubscribeOptions {
  /** Resume after this `epoch:offset` position. */
  since?: string | { epoch: string; offset: number };
  /** Without `since`: first replay the newest N retained publications. */
  rewind?: number;
  /** Subscription token for a private channel. */
  token?: string;
  /** Over WebTransport, volatile publications as datagrams: unreliable and unordered,
   *  never late behind a lost packet (cursors, game state). Stored ones always come on
   *  the stream. Ignored by the other transports. */
  datagrams?: boolean;
}

export interface PublishOptions {
  volatile?: boolean;
  /** Idempotency key: a retried publish with the same key is stored once. */
  key?: string;
}

declare class Emitter<Events extends Record<string, (...args: any[]) => void>> {
  on<E extends keyof Events>(event: E, fn: Events[E]): this;
  off<E extends keyof Events>(event: E, fn: Events[E]): this;
}

export declare class Subscription extends Emitter<{
  message: (data: any, pub: Publication) => void;
  join: (member: PresenceMember & { channel: string }) => void;
  leave: (member: PresenceMember & { channel: string }) => void;
  reset: (info: ResetInfo) => void;
  subscribed: (info: unknown) => void;
  error: (error: Error) => void;
}> {
  readonly channel: string;
  readonly pattern: boolean;
  /** `epoch:offset` of the last publication delivered. */
  readonly position: string | null;
  publish(data: unknown, opts?: PublishOptions): Promise<{ epoch: string; offset: number } | { volatile: true }>;
  presence(): Promise<{ clients: PresenceMember[] }>;
  presenceStats(): Promise<{ clients: number; users: number }>;
  unsubscribe(): void;
}

export declare class Switchboard extends Emitter<{
  state: (ev: StateEvent) => void;
  error: (ev: { type: 'protocol' | 'transport' | 'token' | 'server'; [k: string]: unknown }) => void;
  /** A direct message to this connection or its user. */
  'message:direct': (data: unknown, from: DirectSender) => void;
}> {
  constructor(url: string, opts?: SwitchboardOptions);
  readonly state: StateEvent['state'] | 'idle';
  readonly transport: TransportName | null;
  /** This connection's client id (what others `send` to), once connected. */
  readonly clientId: string | null;
  subscribe(channel: string, opts?: SubscribeOptions): Subscription;
  /** A direct message, on any transport (SSE and polling send it as `POST /send`); not
   *  stored. `opts.channel`: over SSE and polling, the channel both are present in, for
   *  `[direct] policy = "presence"`. Rejects with `target_not_connected`,
   *  `permission_denied`, `token_required`, `rate_limited`. */
  send(
    to: { client: string } | { user: string },
    data: unknown,
    opts?: { channel?: string },
  ): Promise<{ delivered: number; unanswered_nodes?: number }>;
  connect(): void;
  close(): void;
}

export declare function backoffDelay(attempt: number, base?: number, cap?: number, random?: () => number): number;
export declare function patternMatches(pattern: string, channel: string): boolean;
export default Switchboard;
