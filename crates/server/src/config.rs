//! Configuration: one TOML file, every key overridable from the environment.
//!
//! `SWITCHBOARD_LISTEN=0.0.0.0:9000` sets `listen`; nested keys join their path with
//! double underscores: `SWITCHBOARD_LIMITS__MAX_MESSAGE_BYTES=1024`,
//! `SWITCHBOARD_NAMESPACES__CHAT__HISTORY_SIZE=500`, `SWITCHBOARD_API__KEYS=a,b` (a
//! comma-separated value becomes a list where the key expects one). Values are read as
//! TOML scalars when they parse as one (numbers, booleans), else as strings.
//! Unknown keys are errors, reported with their full path.
//!
//! A `SWITCHBOARD_*` variable is configuration only when its first segment names a
//! top-level key ([`TOP_LEVEL_KEYS`]: `listen`, `limits`, `broker`, …). Any other
//! (`SWITCHBOARD_TEST_REDIS`, a variable of the user's own) is left alone, and `serve`
//! logs that it ignored it — so an unrelated variable can never stop a node from
//! starting, while a typo inside a section (`SWITCHBOARD_BROKER__KNID`) still does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use switchboard_core::broker::PublishOptions;
use switchboard_core::channel::ChannelName;

/// The signing key `serve --dev` uses when no `[auth]` is configured. Public by nature:
/// anyone can mint tokens for a development server.
pub const DEV_HMAC_SECRET: &str = "switchboard-development-key-never-use-it-in-production";

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// The top-level keys of [`Config`]; a unit test keeps this list equal to the struct.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "strict_namespaces",
    "defaults",
    "namespaces",
    "limits",
    "sse",
    "poll",
    "ws",
    "api",
    "auth",
    "security",
    "broker",
    "tls",
    "http2",
    "mqtt",
    "webtransport",
    "direct",
    "webhooks",
    "sources",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Reject channels whose namespace is not listed under `[namespaces]`.
    pub strict_namespaces: bool,
    /// Options of every namespace not listed, and the base the listed ones override.
    pub defaults: NamespaceOptions,
    /// Per-namespace overrides. The default namespace (names without `:`) is `""`.
    pub namespaces: BTreeMap<String, NamespaceOverride>,
    pub limits: Limits,
    pub sse: SseConfig,
    pub poll: PollConfig,
    pub ws: WsConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub security: SecurityConfig,
    pub broker: BrokerConfig,
    pub tls: TlsConfig,
    pub http2: Http2Config,
    pub mqtt: MqttConfig,
    pub webtransport: WebTransportConfig,
    pub direct: DirectConfig,
    pub webhooks: WebhooksConfig,
    /// Publication sources: where publications come from besides the API (docs/sources.md).
    pub sources: Vec<SourceConfig>,
    /// `SWITCHBOARD_*` variables that were not configuration (see the module docs).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".parse().expect("literal address"),
            strict_namespaces: false,
            defaults: NamespaceOptions::default(),
            namespaces: BTreeMap::new(),
            limits: Limits::default(),
            sse: SseConfig::default(),
            poll: PollConfig::default(),
            ws: WsConfig::default(),
            api: ApiConfig::default(),
            auth: AuthConfig::default(),
            security: SecurityConfig::default(),
            broker: BrokerConfig::default(),
            tls: TlsConfig::default(),
            http2: Http2Config::default(),
            mqtt: MqttConfig::default(),
            webtransport: WebTransportConfig::default(),
            direct: DirectConfig::default(),
            webhooks: WebhooksConfig::default(),
            sources: Vec::new(),
            ignored_env: Vec::new(),
        }
    }
}

/// What a namespace allows and keeps.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Publications kept per channel for resume; 0 makes the namespace live-only.
    pub history_size: usize,
    /// Seconds a publication stays in history.
    pub history_ttl_secs: u64,
    /// May clients (not only the server API) publish? (WebSocket protocol.)
    pub allow_publish: bool,
    /// Must clients present a connection token to subscribe or publish?
    pub require_token: bool,
    /// `ns:<user>` and `ns:<user>/…` are usable only by the token whose `sub` is `<user>`.
    pub user_limited: bool,
    /// Subscribing needs a subscription token naming the channel (signed by the app).
    pub private: bool,
    /// Bound of each subscriber connection's outgoing queue, in bytes.
    pub queue_max_bytes: usize,
    /// Publications replayed to a new subscriber that gives no position (1: "send the
    /// latest on subscribe", e.g. a ticker's price). At most `history_size`.
    pub rewind_on_subscribe: usize,
    /// Most publications replayed to a client resuming from a position; one further
    /// behind is told it cannot resume (`recovered: false`, an explicit reset) rather than
    /// sent an unbounded replay. 0: no cap beyond `history_size`.
    pub recovery_max: usize,
    /// Compress this namespace's publications for WebSocket clients that negotiated
    /// permessage-deflate (turn off for already-compressed or tiny payloads).
    pub deflate: bool,
    /// Keep presence (who is subscribed) for this namespace's channels.
    pub presence: bool,
    /// Push join/leave events to subscribers (needs `presence`).
    pub join_leave: bool,
    /// Seconds a presence entry lives unless its connection's heartbeat refreshes it.
    pub presence_ttl_secs: u64,
    /// Publications are volatile unless the publish says otherwise.
    pub volatile: bool,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        NamespaceOptions {
            history_size: 100,
            history_ttl_secs: 300,
            allow_publish: false,
            require_token: false,
            user_limited: false,
            private: false,
            queue_max_bytes: switchboard_core::queue::DEFAULT_QUEUE_BYTES,
            rewind_on_subscribe: 0,
            recovery_max: 1000,
            deflate: true,
            presence: false,
            join_leave: false,
            presence_ttl_secs: 60,
            volatile: false,
        }
    }
}

impl NamespaceOptions {
    pub fn publish_options(&self, key: Option<String>, window: Duration) -> PublishOptions {
        PublishOptions {
            history_size: self.history_size,
            history_ttl: Duration::from_secs(self.history_ttl_secs),
            idempotency_key: key,
            idempotency_window: window,
        }
    }

    pub fn keeps_history(&self) -> bool {
        self.history_size > 0 && self.history_ttl_secs > 0
    }
}

/// A namespace's options where they differ from `[defaults]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceOverride {
    pub history_size: Option<usize>,
    pub history_ttl_secs: Option<u64>,
    pub allow_publish: Option<bool>,
    pub require_token: Option<bool>,
    pub user_limited: Option<bool>,
    pub private: Option<bool>,
    pub queue_max_bytes: Option<usize>,
    pub rewind_on_subscribe: Option<usize>,
    pub recovery_max: Option<usize>,
    pub deflate: Option<bool>,
    pub presence: Option<bool>,
    pub join_leave: Option<bool>,
    pub presence_ttl_secs: Option<u64>,
    pub volatile: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest publication payload (`data`, as JSON text), in bytes.
    pub max_message_bytes: usize,
    /// Most channels in one SSE/poll request or broadcast.
    pub max_channels_per_request: usize,
    /// Open client connections on this node — every TCP connection: streaming, long
    /// polls and plain HTTP. 0: derived from the open-files limit (minus room for the
    /// broker, logs and the reserve kept for health checks).
    pub max_connections: usize,
    /// Open connections from one IP address (behind `security.trusted_proxies`: from
    /// one forwarded client address); 0: no cap (the default).
    pub max_connections_per_ip: usize,
    /// New streaming handshakes per second, sustained (token bucket); 0: no limit.
    pub accept_rate_per_sec: u32,
    /// Handshakes allowed in a burst above the rate.
    pub accept_burst: u32,
    /// Seconds a publish idempotency key is remembered.
    pub idempotency_window_secs: u64,
    /// Client `POST /publish` requests per second from one IP address (burst: twice
    /// that); 0: no limit. WebSocket publishes count under `ws.max_commands_per_sec`.
    pub client_publishes_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            max_channels_per_request: 100,
            max_connections: 0,
            max_connections_per_ip: 0,
            accept_rate_per_sec: 10_000,
            accept_burst: 20_000,
            idempotency_window_secs: 300,
            client_publishes_per_sec: 50,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    pub enabled: bool,
    /// Seconds between `:` keepalive comments.
    pub keepalive_secs: u64,
    /// Reconnect delay the browser is told (`retry:`), in milliseconds.
    pub retry_ms: u64,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig { enabled: true, keepalive_secs: 15, retry_ms: 2000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    pub enabled: bool,
    /// Longest `wait` a long poll may ask for, in seconds.
    pub max_wait_secs: u64,
    /// Messages per response when the request gives no `limit`.
    pub default_limit: usize,
    /// Largest `limit` accepted.
    pub max_limit: usize,
    /// A poller's direct-message mailbox (`direct=1`) is closed after this many seconds
    /// without a poll.
    pub mailbox_idle_secs: u64,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig { enabled: true, max_wait_secs: 60, default_limit: 100, max_limit: 1000, mailbox_idle_secs: 30 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    pub enabled: bool,
    /// Seconds between server pings; a client silent for 3 intervals is closed.
    pub ping_interval_secs: u64,
    /// Negotiate permessage-deflate when the client offers it.
    pub deflate: bool,
    /// Sustained commands per second per connection (bursts of twice that pass).
    pub max_commands_per_sec: u32,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// SO_SNDBUF for each WebSocket (0: the kernel's default and autotuning). Smaller
    /// means less kernel memory per connection and earlier slow-consumer detection.
    pub send_buffer_bytes: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            enabled: true,
            ping_interval_secs: 25,
            deflate: true,
            max_commands_per_sec: 100,
            max_subscriptions: 1000,
            send_buffer_bytes: 0,
        }
    }
}

/// HTTPS on `listen`: TLS is on when `cert` and `key` are set (see docs/operations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<std::path::PathBuf>,
    /// PEM CA certificates: the server API (`/api/*`) then requires a client
    /// certificate signed by one of them (mutual TLS), on top of its API key.
    pub client_ca: Option<std::path::PathBuf>,
    /// A plain-HTTP listener beside the TLS one (e.g. `0.0.0.0:80`).
    pub http_listen: Option<SocketAddr>,
    /// What the plain-HTTP listener does: `redirect` (to https, 308) or `serve`.
    pub http_mode: HttpMode,
    /// Seconds between checks of `cert` and `key` for changes (0: only on SIGHUP).
    pub reload_check_secs: u64,
    /// Seconds a client has to complete its TLS handshake.
    pub handshake_timeout_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            client_ca: None,
            http_listen: None,
            http_mode: HttpMode::Redirect,
            reload_check_secs: 10,
            handshake_timeout_secs: 10,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    Redirect,
    Serve,
}

/// A publication source (docs/sources.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Names it in logs and metrics (default: its kind and table).
    pub name: Option<String>,
    /// `postgres://user[:password]@host[:port]/database`, for RabbitMQ
    /// `amqp://user:password@host:port/vhost` (`%2f` for the default vhost), for a Redis
    /// Stream `redis://[:password@]host:port[/db]`, for NATS JetStream
    /// `nats://[user:password@]host:port`.
    pub url: String,
    /// Redis Streams: the Stream read (its entries' fields: `channel`, `data`, `key`?,
    /// `volatile`?). NATS JetStream: the stream consumed (made by the application).
    pub stream: Option<String>,
    /// Redis Streams: the consumer group the nodes read through (created, from the
    /// Stream's start, if missing). NATS JetStream: the durable pull consumer's name
    /// (created if missing, from the stream's start, explicit acks).
    #[serde(default = "default_group")]
    pub group: String,
    /// Redis Streams: an entry another consumer read and left unacknowledged this long
    /// (its node died) is claimed. NATS JetStream: the consumer's ack wait, after which
    /// an unacknowledged message is delivered again.
    #[serde(default = "thirty_thousand")]
    pub claim_idle_ms: u64,
    /// NATS JetStream: poison messages are published here (their body, with a
    /// `Switchboard-Reason` header), then acknowledged.
    pub dead_subject: Option<String>,
    /// Redis Streams: poison entries are added here (their fields and a `reason`), then
    /// acknowledged.
    pub dead_stream: Option<String>,
    /// RabbitMQ: the queue consumed (declared by the application).
    pub queue: Option<String>,
    /// RabbitMQ: unacknowledged messages held at once.
    #[serde(default = "prefetch")]
    pub prefetch: u16,
    /// RabbitMQ: poison messages (not JSON, no valid channel) are published to this
    /// exchange (same routing key and properties), then acknowledged; without it they are
    /// logged, counted and acknowledged — never redelivered forever.
    pub dead_letter_exchange: Option<String>,
    /// RabbitMQ: the channel from the message's headers, e.g. `orders:{user}` (`{name}`:
    /// the header's value); the whole body is then the data. Without it the body is
    /// `{"channel","data"[,"key"][,"volatile"]}`.
    pub channel_template: Option<String>,
    /// The outbox table (`[schema.]name`).
    #[serde(default = "default_outbox_table")]
    pub table: String,
    /// The LISTEN channel the table's trigger notifies (docs/sources.md has the DDL).
    #[serde(default = "default_outbox_table")]
    pub notify: String,
    /// Rows claimed per transaction; Redis Streams: entries per read; NATS JetStream:
    /// messages per pull.
    #[serde(default = "hundred")]
    pub batch: usize,
    /// Without a notification, look anyway this often (a missed NOTIFY, a producer
    /// without the trigger).
    #[serde(default = "thousand")]
    pub poll_ms: u64,
    /// Rows that cannot be published (no such namespace, an invalid channel name) are
    /// moved here (same columns) instead of only being logged and counted.
    pub dead_table: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    PostgresOutbox,
    Rabbitmq,
    RedisStream,
    NatsJetstream,
}

fn default_outbox_table() -> String {
    "switchboard_outbox".into()
}
fn hundred() -> usize {
    100
}
fn prefetch() -> u16 {
    100
}
fn thousand() -> u64 {
    1000
}
fn default_group() -> String {
    "switchboard".into()
}

impl SourceConfig {
    pub fn name(&self) -> String {
        let default = match self.kind {
            SourceKind::PostgresOutbox => format!("postgres_outbox:{}", self.table),
            SourceKind::Rabbitmq => format!("rabbitmq:{}", self.queue.as_deref().unwrap_or("")),
            SourceKind::RedisStream => format!("redis_stream:{}", self.stream.as_deref().unwrap_or("")),
            SourceKind::NatsJetstream => format!("nats_jetstream:{}", self.stream.as_deref().unwrap_or("")),
        };
        self.name.clone().unwrap_or(default)
    }
}

/// `name` or `schema.name`, plain identifiers only (they are put in SQL as they are).
fn sql_identifier(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let mut parts = s.split('.');
    let ok = parts.next().is_some_and(part) && parts.clone().all(part);
    ok && s.split('.').count() <= 2
}

/// Outgoing webhooks (docs/webhooks.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where the embedded queue keeps pending events (with the memory broker; with Redis
    /// they are kept in Redis Streams). Default: `switchboard-data/webhooks`.
    pub dir: Option<std::path::PathBuf>,
    /// `always`: the queue's file is synced after each group of writes (a crash or power
    /// failure loses nothing written); `never`: left to the kernel (a crash of the process
    /// loses nothing, a power failure the last seconds).
    pub fsync: WebhookFsync,
    /// Events waiting across all endpoints; past it new events are dropped and counted
    /// (`switchboard_webhook_events_dropped_total`): a receiver that is down never grows
    /// the server without bound, and publishing never waits for it.
    pub max_pending: usize,
    /// How long an event is retried before it goes to the dead-letter list (72 h).
    pub horizon_secs: u64,
    /// Retries wait a random time from 0 to min(backoff_max_ms, backoff_initial_ms × 2^n)
    /// after the n-th failed attempt (full jitter).
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub endpoints: Vec<WebhookEndpoint>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            dir: None,
            fsync: WebhookFsync::Always,
            max_pending: 100_000,
            horizon_secs: 72 * 3600,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 600_000,
            endpoints: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFsync {
    Always,
    Never,
}

/// One receiver of webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// Names it in metrics, the dead-letter list and the queue (default: the URL). Keep it
    /// when the URL changes, so pending events follow.
    pub name: Option<String>,
    /// `http://` or `https://`.
    pub url: String,
    /// Signing secrets (at least 16 bytes each): every one signs (`v1=` each), so during a
    /// rotation list the new one and the old one, and the receiver accepts either.
    pub secrets: Vec<String>,
    /// Event types sent (default: occupied/vacated and presence join/leave;
    /// `publication` and `connection.*` are opt-in).
    #[serde(default = "default_webhook_events")]
    pub events: Vec<String>,
    /// Channels and patterns (`chat:#`, `chat:room-+`) whose events are sent; empty: all.
    #[serde(default)]
    pub channels: Vec<String>,
    /// `publication` events for clients' publishes only (`client`, the default) or for
    /// the API's too (`all`).
    #[serde(default)]
    pub publications: PublicationSource,
    /// Events per request: up to this many (1: no batching) …
    #[serde(default = "one")]
    pub batch_max: usize,
    /// … or what has waited this long, whichever first.
    #[serde(default)]
    pub batch_ms: u64,
    /// Requests in flight to this endpoint at once.
    #[serde(default = "four")]
    pub concurrency: usize,
    /// A request not answered 2xx within this long counts as failed.
    #[serde(default = "ten_thousand")]
    pub timeout_ms: u64,
    /// After this many failed requests in a row the endpoint rests for `breaker_cooldown_ms`
    /// (no requests), then one request tries it again.
    #[serde(default = "five")]
    pub breaker_failures: u32,
    #[serde(default = "thirty_thousand")]
    pub breaker_cooldown_ms: u64,
}

fn default_webhook_events() -> Vec<String> {
    ["channel.occupied", "channel.vacated", "presence.join", "presence.leave"].map(String::from).to_vec()
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn five() -> u32 {
    5
}
fn ten_thousand() -> u64 {
    10_000
}
fn thirty_thousand() -> u64 {
    30_000
}

/// Which publications make `publication` events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublicationSource {
    /// What clients publish (WebSocket, WebTransport, `POST /publish`, MQTT).
    #[default]
    Client,
    /// Those and the server API's.
    All,
}

/// The event types a webhook endpoint may ask for.
pub const WEBHOOK_EVENTS: [&str; 7] = [
    "channel.occupied",
    "channel.vacated",
    "presence.join",
    "presence.leave",
    "publication",
    "connection.opened",
    "connection.closed",
];

impl WebhookEndpoint {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.url)
    }
}

/// Direct messages between clients (docs/protocol.md, "Direct messages").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectConfig {
    pub enabled: bool,
    /// Who may message whom (default: `authenticated`; under `serve --dev`, `anyone`).
    pub policy: Option<DirectPolicy>,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig { enabled: true, policy: None }
    }
}

impl Config {
    fn validate_webhooks(&self) -> Result<(), (String, String)> {
        let w = &self.webhooks;
        let mut names = std::collections::HashSet::new();
        for (i, e) in w.endpoints.iter().enumerate() {
            let key = |k: &str| format!("webhooks.endpoints[{i}].{k}");
            let scheme_ok = ["http://", "https://"].iter().any(|s| e.url.len() > s.len() && e.url.starts_with(s));
            if !scheme_ok || e.url.contains(char::is_whitespace) {
                return Err((key("url"), format!("{:?}: expected an http:// or https:// URL", e.url)));
            }
            if e.secrets.is_empty() || e.secrets.iter().any(|s| s.len() < 16) {
                return Err((key("secrets"), "give at least one secret, each at least 16 bytes".into()));
            }
            if let Some(bad) = e.events.iter().find(|t| !WEBHOOK_EVENTS.contains(&t.as_str())) {
                return Err((key("events"), format!("unknown event {bad:?}; known: {}", WEBHOOK_EVENTS.join(", "))));
            }
            if e.events.is_empty() {
                return Err((key("events"), "name at least one event type".into()));
            }
            for c in &e.channels {
                let ok = if switchboard_core::pattern::is_pattern(c) {
                    switchboard_core::pattern::Pattern::parse(c).is_ok()
                } else {
                    ChannelName::parse(c).is_ok()
                };
                if !ok {
                    return Err((key("channels"), format!("{c:?} is not a channel name or pattern")));
                }
            }
            if e.batch_max == 0 || e.concurrency == 0 || e.timeout_ms == 0 || e.breaker_failures == 0 {
                return Err((
                    key("batch_max"),
                    "batch_max, concurrency, timeout_ms and breaker_failures must be at least 1".into(),
                ));
            }
            if !names.insert(e.name()) {
                return Err((key("name"), format!("two endpoints are named {:?}", e.name())));
            }
        }
        if w.backoff_initial_ms == 0 || w.backoff_max_ms < w.backoff_initial_ms {
            return Err(("webhooks.backoff_initial_ms".into(), "at least 1, and at most backoff_max_ms".into()));
        }
        if w.max_pending == 0 {
            return Err(("webhooks.max_pending".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

impl DirectConfig {
    /// The policy in force: the configured one, else by mode.
    pub fn policy(&self, dev: bool) -> DirectPolicy {
        self.policy.unwrap_or(if dev { DirectPolicy::Anyone } else { DirectPolicy::Authenticated })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectPolicy {
    /// Any connection, anonymous ones too, may message any client or user.
    Anyone,
    /// A connection with a verified token may message any client or user.
    Authenticated,
    /// A connection with a token may message only its own user's connections (another
    /// tab, another device).
    SameUser,
    /// A connection may message those in the presence of a channel it is subscribed to
    /// (a room's members).
    Presence,
    /// A connection whose token has the claim `"direct": true` may message anyone.
    Claim,
}

/// WebTransport over HTTP/3 (docs/protocol.md, "WebTransport").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebTransportConfig {
    /// `false`: no WebTransport, even under `serve --dev`.
    pub enabled: bool,
    /// The UDP address of the HTTP/3 listener (e.g. `0.0.0.0:8000`: the HTTP port's number
    /// over UDP); none unless set (`serve --dev` uses the HTTP listener's address).
    pub listen: Option<SocketAddr>,
    /// Seconds without a packet from the client before a session is closed (QUIC keeps
    /// it alive meanwhile).
    pub idle_timeout_secs: u64,
}

impl Default for WebTransportConfig {
    fn default() -> Self {
        WebTransportConfig { enabled: true, listen: None, idle_timeout_secs: 30 }
    }
}

/// MQTT 3.1.1 and 5 (docs/mqtt.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The MQTT listener (e.g. `0.0.0.0:1883`); none unless set (`serve --dev` tries
    /// `127.0.0.1:1883`).
    pub listen: Option<SocketAddr>,
    /// MQTT over TLS (e.g. `0.0.0.0:8883`), with the `[tls]` certificate.
    pub tls_listen: Option<SocketAddr>,
    /// Largest packet a client may send, in bytes (announced in MQTT 5's CONNACK).
    pub max_packet_bytes: usize,
    /// How long a persistent session is kept after its connection ends: 3.1.1's clean
    /// session 0 gets this, MQTT 5 at most this (seconds).
    pub session_expiry_secs: u64,
    /// Who may subscribe to `$SYS/broker/…` (the node's statistics).
    pub sys_topics: SysTopics,
    /// Seconds between two `$SYS` updates to its subscribers.
    pub sys_interval_secs: u64,
    /// Devices that connect with a user name and password instead of a token.
    pub users: Vec<MqttUser>,
}

/// A device that connects with a user name and password (`[[mqtt.users]]`); it is then
/// the user `name`, allowed what a token with these claims would be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttUser {
    /// The MQTT user name, and the user id (a token's `sub`).
    pub name: String,
    /// SHA-256 of the password, in hex (`printf %s "$PASSWORD" | sha256sum`). Give each
    /// device a long random password: a fast hash is no defence for a guessable one.
    pub password_sha256: String,
    /// Channels the device may use, as a token's `channels` claim (exact names, or
    /// prefixes ending in `*`); absent: whatever the namespaces allow.
    pub channels: Option<Vec<String>>,
    /// Public user info, shown to others in presence (a token's `info`).
    pub info: Option<serde_json::Value>,
}

impl MqttUser {
    /// Whether `password` is this user's (compared in constant time).
    pub fn password_matches(&self, password: &[u8]) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, password);
        let got = crate::auth::hex(digest.as_ref());
        crate::app::constant_time_eq(got.as_bytes(), self.password_sha256.to_ascii_lowercase().as_bytes())
    }
}

/// Who may subscribe to the `$SYS` topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SysTopics {
    /// Clients that connected with a token.
    Authenticated,
    /// Any client.
    All,
    /// No one.
    Off,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: None,
            tls_listen: None,
            max_packet_bytes: 256 * 1024,
            session_expiry_secs: 86_400,
            sys_topics: SysTopics::Authenticated,
            sys_interval_secs: 10,
            users: Vec::new(),
        }
    }
}

/// HTTP/2 (negotiated by ALPN over TLS): limits sized for many long-lived streams.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    pub enabled: bool,
    /// Streams one connection may have open at once (each SSE stream, poll, WebSocket).
    pub max_concurrent_streams: u32,
    /// Flow-control window of one stream for what clients send (bytes).
    pub stream_window_bytes: u32,
    /// Flow-control window of a whole connection for what clients send (bytes).
    pub connection_window_bytes: u32,
    /// Bytes buffered per stream for a client that is not reading, past which the
    /// stream waits (and its queue fills: a slow consumer).
    pub max_send_buffer_bytes: usize,
    /// Largest header list a client may send (bytes).
    pub max_header_list_bytes: u32,
    /// Seconds between HTTP/2 pings on an idle connection; one unanswered for as long
    /// closes it (0: none).
    pub keepalive_secs: u64,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            enabled: true,
            max_concurrent_streams: 256,
            stream_window_bytes: 256 * 1024,
            connection_window_bytes: 1024 * 1024,
            max_send_buffer_bytes: 256 * 1024,
            max_header_list_bytes: 32 * 1024,
            keepalive_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Accepted server API keys (`Authorization: Bearer <key>` on `/api/*`).
    pub keys: Vec<String>,
}

/// Connection and subscription tokens (JWT). No `algorithm`: token auth is off and
/// every client is anonymous.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `HS256`, `RS256` or `ES256`. Tokens signed any other way are refused.
    pub algorithm: Option<String>,
    /// HS256 shared secret (at least 32 bytes).
    pub hmac_secret: Option<String>,
    /// RS256/ES256 public key, PEM text...
    pub public_key_pem: Option<String>,
    /// ...or a PEM file.
    pub public_key_file: Option<String>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_secs: u64,
    /// After a WebSocket's token expires, seconds it has to send `refresh` before it is
    /// closed (4101).
    pub refresh_grace_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithm: None,
            hmac_secret: None,
            public_key_pem: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 5,
            refresh_grace_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Origins allowed to open `/ws` and `/sse` from a browser. Empty: any.
    pub allowed_origins: Vec<String>,
    /// Proxies (addresses or CIDRs, `10.0.0.0/8`) whose `X-Forwarded-For` / `Forwarded`
    /// headers name the client, for per-IP limits and logs. Nobody else's are believed.
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `memory` (embedded default, one node), `redis` or `nats` (many nodes).
    pub kind: BrokerKind,
    /// Seconds an idle channel with no history keeps its epoch and offset.
    pub idle_channel_ttl_secs: u64,
    /// Memory broker: channels nobody published to or subscribes to (made by reads
    /// alone) that are remembered; past it the oldest are forgotten (a new epoch if used
    /// again). Bounds what anonymous readers can make the server hold.
    pub max_unused_channels: usize,
    /// Redis URL (`kind = "redis"`).
    pub redis_url: String,
    /// Key prefix in Redis; clusters sharing one Redis use different prefixes.
    pub redis_prefix: String,
    /// `redis_url` names the seed nodes of a Redis Cluster (≥ 7, comma-separated):
    /// sharded Pub/Sub, keys routed by slot.
    pub redis_cluster: bool,
    /// NATS URL (`kind = "nats"`; JetStream enabled), several comma-separated for a NATS
    /// cluster.
    pub nats_url: String,
    /// Subject prefix in NATS (streams are named after it, upper-cased); clusters sharing
    /// one NATS use different prefixes.
    pub nats_prefix: String,
    /// JetStream replicas of each stream: 1 for one NATS server, 3 for a NATS cluster.
    pub nats_replicas: usize,
    /// This node's id in the cluster (default: random at start).
    pub node_id: Option<String>,
    /// Memory broker: keep history durably in this directory (`serve --data-dir`): a
    /// restart keeps every channel's epoch, offsets, history and idempotency keys.
    pub data_dir: Option<std::path::PathBuf>,
    /// With `data_dir`: `always` (a publish is answered once its record is synced;
    /// nothing acknowledged is lost on power failure), `batched` (synced every
    /// `fsync_interval_ms`: a power failure loses at most that much), `never` (left to the
    /// kernel). A killed process loses nothing under any of them.
    pub fsync: HistoryFsync,
    pub fsync_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryFsync {
    Always,
    Batched,
    Never,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
            idle_channel_ttl_secs: 3600,
            max_unused_channels: switchboard_core::memory::DEFAULT_UNUSED_CHANNEL_CAP,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "sb".into(),
            redis_cluster: false,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_prefix: "sb".into(),
            nats_replicas: 1,
            node_id: None,
            data_dir: None,
            fsync: HistoryFsync::Always,
            fsync_interval_ms: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Memory,
    Redis,
    Nats,
}

impl BrokerKind {
    /// Does this broker join nodes into one cluster?
    pub fn is_cluster(self) -> bool {
        self != BrokerKind::Memory
    }
}

/// A configuration error, with the key path it is about when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Key { origin: String, key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

impl Config {
    /// Loads `path` (if given), applies `SWITCHBOARD_*` overrides from `env`, validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                Self::parse(&text, &p.display().to_string(), env)
            }
            None => Self::from_table(toml::Table::new(), "built-in defaults".to_string(), env),
        }
    }

    /// [`Config::load`] on the text of a file (`origin` names it in errors).
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax { path: origin.to_string(), message: e.to_string() })?;
        Self::from_table(table, origin.to_string(), env)
    }

    fn from_table(
        mut table: toml::Table,
        origin: String,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut overridden = false;
        let mut ignored = Vec::new();
        // Each variable set, with the readings of its text still to try if the one chosen
        // does not fit its key (`REDIS_PREFIX=123` is a string, `HISTORY_SIZE=5` a number).
        let mut from_env: Vec<(Vec<String>, String, Vec<toml::Value>)> = Vec::new();
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if !TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
                ignored.push(var);
                continue;
            }
            if path.iter().any(|s| s.is_empty()) {
                return Err(ConfigError::Env { var, message: "empty key segment".into() });
            }
            let mut readings = env_readings(&value);
            let first = readings.remove(0);
            set_path(&mut table, &path, first).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
            from_env.push((path, var, readings));
            overridden = true;
        }
        let origin = if overridden { format!("{origin} + environment") } else { origin };
        let mut config: Config = loop {
            match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(c) => break c,
                Err(e) => {
                    let key = e.path().to_string();
                    // A key set from the environment whose text can be read another way
                    // (as a string, say): try that before calling it an error.
                    let next = from_env
                        .iter_mut()
                        .find(|(path, _, readings)| path.join(".") == key && !readings.is_empty())
                        .map(|(path, _, readings)| (path.clone(), readings.remove(0)));
                    match next {
                        Some((path, reading)) => {
                            set_path(&mut table, &path, reading)
                                .map_err(|message| ConfigError::Env { var: key.clone(), message })?;
                        }
                        None => {
                            let var = from_env.iter().find(|(path, _, _)| path.join(".") == key).map(|(_, v, _)| v);
                            let message = match var {
                                Some(v) => format!("{} (from {v})", e.inner()),
                                None => e.inner().to_string(),
                            };
                            return Err(ConfigError::Key { origin: origin.clone(), key, message });
                        }
                    }
                }
            }
        };
        config.validate().map_err(|(key, message)| ConfigError::Key { origin, key, message })?;
        ignored.sort();
        config.ignored_env = ignored;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_webhooks()?;
        for (i, s) in self.sources.iter().enumerate() {
            let key = |k: &str| format!("sources[{i}].{k}");
            if matches!(s.kind, SourceKind::RedisStream | SourceKind::NatsJetstream) {
                let (scheme, shape) = match s.kind {
                    SourceKind::NatsJetstream => ("nats://", "nats://host:port"),
                    _ => ("redis://", "redis://host:port"),
                };
                if !s.url.starts_with(scheme) {
                    return Err((key("url"), format!("{:?}: expected {shape}", s.url)));
                }
                if s.stream.as_deref().is_none_or(str::is_empty) {
                    return Err((key("stream"), "name the stream to read".into()));
                }
                if s.group.is_empty() || s.batch == 0 || s.claim_idle_ms == 0 {
                    return Err((key("group"), "group, batch and claim_idle_ms must not be empty or 0".into()));
                }
                continue;
            }
            if s.kind == SourceKind::Rabbitmq {
                if !s.url.starts_with("amqp://") {
                    return Err((key("url"), format!("{:?}: expected amqp://user:password@host:port/vhost", s.url)));
                }
                if s.queue.as_deref().is_none_or(str::is_empty) {
                    return Err((key("queue"), "name the queue to consume".into()));
                }
                if s.prefetch == 0 {
                    return Err((key("prefetch"), "must be at least 1".into()));
                }
                continue;
            }
            if !s.url.starts_with("postgres://") && !s.url.starts_with("postgresql://") {
                return Err((key("url"), format!("{:?}: expected postgres://user@host:port/database", s.url)));
            }
            for (k, v) in [("table", &s.table), ("notify", &s.notify)] {
                if !sql_identifier(v) {
                    return Err((key(k), format!("{v:?}: lower-case letters, digits and _ ([schema.]name)")));
                }
            }
            if let Some(d) = s.dead_table.as_deref().filter(|d| !sql_identifier(d)) {
                return Err((key("dead_table"), format!("{d:?}: lower-case letters, digits and _ ([schema.]name)")));
            }
            if s.batch == 0 || s.poll_ms == 0 {
                return Err((key("batch"), "batch and poll_ms must be at least 1".into()));
            }
        }
        if self.broker.data_dir.is_some() && self.broker.kind != BrokerKind::Memory {
            let why = "durable history is the memory broker's; with Redis or NATS, history is kept there";
            return Err(("broker.data_dir".into(), why.into()));
        }
        if self.broker.kind == BrokerKind::Nats {
            if !self.webhooks.endpoints.is_empty() {
                let why = "webhooks need a broker whose queue all nodes share: memory (one node) or redis";
                return Err(("webhooks".into(), why.into()));
            }
            if !(1..=5).contains(&self.broker.nats_replicas) {
                return Err(("broker.nats_replicas".into(), "must be 1 to 5".into()));
            }
        }
        for name in self.namespaces.keys() {
            if !name.is_empty() && ChannelName::parse(name).is_err() || name.contains(':') {
                return Err((format!("namespaces.{name}"), "not a valid namespace name".into()));
            }
        }
        if self.limits.max_message_bytes == 0 {
            return Err(("limits.max_message_bytes".into(), "must be at least 1".into()));
        }
        if self.limits.max_channels_per_request == 0 {
            return Err(("limits.max_channels_per_request".into(), "must be at least 1".into()));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            let missing = if self.tls.cert.is_none() { "tls.cert" } else { "tls.key" };
            return Err((missing.into(), "TLS needs both tls.cert and tls.key".into()));
        }
        for (i, u) in self.mqtt.users.iter().enumerate() {
            let key = |k: &str| format!("mqtt.users[{i}].{k}");
            if u.name.is_empty() || self.mqtt.users[..i].iter().any(|o| o.name == u.name) {
                return Err((key("name"), format!("{:?}: a user name, once", u.name)));
            }
            if u.password_sha256.len() != 64 || !u.password_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((key("password_sha256"), "64 hex digits: `printf %s \"$PASSWORD\" | sha256sum`".into()));
            }
        }
        if self.mqtt.sys_interval_secs == 0 {
            return Err((
                "mqtt.sys_interval_secs".into(),
                "must be at least 1 (sys_topics = \"off\" turns $SYS off)".into(),
            ));
        }
        if self.mqtt.max_packet_bytes < 1024 || self.mqtt.max_packet_bytes > 268_435_455 {
            return Err(("mqtt.max_packet_bytes".into(), "must be 1024 to 268435455 (MQTT's limit)".into()));
        }
        if self.tls.handshake_timeout_secs == 0 {
            return Err(("tls.handshake_timeout_secs".into(), "must be at least 1".into()));
        }
        if self.http2.max_concurrent_streams == 0 {
            return Err(("http2.max_concurrent_streams".into(), "must be at least 1".into()));
        }
        if self.ws.ping_interval_secs == 0 {
            return Err(("ws.ping_interval_secs".into(), "must be at least 1".into()));
        }
        if self.ws.max_commands_per_sec == 0 {
            return Err(("ws.max_commands_per_sec".into(), "must be at least 1".into()));
        }
        if self.sse.keepalive_secs == 0 {
            return Err(("sse.keepalive_secs".into(), "must be at least 1".into()));
        }
        if self.poll.max_limit == 0 || self.poll.default_limit == 0 || self.poll.default_limit > self.poll.max_limit {
            return Err(("poll.default_limit".into(), "must be between 1 and poll.max_limit".into()));
        }
        for (name, ns) in &self.namespaces {
            if ns.queue_max_bytes == Some(0) {
                return Err((format!("namespaces.{name}.queue_max_bytes"), "must be at least 1".into()));
            }
        }
        for name in std::iter::once("").chain(self.namespaces.keys().map(String::as_str)) {
            if let Some(ns) = self.namespace(name) {
                let heartbeat = self.ws.ping_interval_secs.max(self.sse.keepalive_secs);
                if ns.presence && ns.presence_ttl_secs <= heartbeat {
                    let key = if name.is_empty() { "defaults".to_string() } else { format!("namespaces.{name}") };
                    return Err((
                        format!("{key}.presence_ttl_secs"),
                        format!(
                            "must exceed the heartbeat ({heartbeat} s: ws.ping_interval_secs / sse.keepalive_secs)"
                        ),
                    ));
                }
                if ns.join_leave && !ns.presence {
                    let key = if name.is_empty() { "defaults".to_string() } else { format!("namespaces.{name}") };
                    return Err((format!("{key}.join_leave"), "needs presence = true".into()));
                }
                if ns.rewind_on_subscribe > ns.history_size {
                    let key = if name.is_empty() && !self.namespaces.contains_key("") {
                        "defaults.rewind_on_subscribe".to_string()
                    } else {
                        format!("namespaces.{name}.rewind_on_subscribe")
                    };
                    return Err((key, "cannot exceed history_size".into()));
                }
            }
        }
        for (i, p) in self.security.trusted_proxies.iter().enumerate() {
            crate::limits::Cidr::parse(p).map_err(|e| (format!("security.trusted_proxies[{i}]"), e))?;
        }
        if self.defaults.queue_max_bytes == 0 {
            return Err(("defaults.queue_max_bytes".into(), "must be at least 1".into()));
        }
        if let Err(e) = crate::auth::Verifier::from_config(&self.auth, Default::default()) {
            return Err(("auth".into(), e));
        }
        for (i, k) in self.api.keys.iter().enumerate() {
            if k.len() < 16 {
                return Err((format!("api.keys[{i}]"), "API keys must be at least 16 characters".into()));
            }
        }
        Ok(())
    }

    /// `--dev` without an `[auth]` section: HS256 with [`DEV_HMAC_SECRET`], so that
    /// `switchboard token --dev` mints tokens the development server accepts. A
    /// configured `[auth]` is left as it is.
    pub fn use_dev_auth(&mut self) {
        if self.auth.algorithm.is_none() {
            self.auth.algorithm = Some("HS256".into());
            self.auth.hmac_secret = Some(DEV_HMAC_SECRET.into());
        }
    }

    /// The options of `namespace`, or `None` when strict namespaces reject it.
    pub fn namespace(&self, namespace: &str) -> Option<NamespaceOptions> {
        match self.namespaces.get(namespace) {
            Some(o) => {
                let d = &self.defaults;
                Some(NamespaceOptions {
                    history_size: o.history_size.unwrap_or(d.history_size),
                    history_ttl_secs: o.history_ttl_secs.unwrap_or(d.history_ttl_secs),
                    allow_publish: o.allow_publish.unwrap_or(d.allow_publish),
                    require_token: o.require_token.unwrap_or(d.require_token),
                    user_limited: o.user_limited.unwrap_or(d.user_limited),
                    private: o.private.unwrap_or(d.private),
                    queue_max_bytes: o.queue_max_bytes.unwrap_or(d.queue_max_bytes),
                    rewind_on_subscribe: o.rewind_on_subscribe.unwrap_or(d.rewind_on_subscribe),
                    recovery_max: o.recovery_max.unwrap_or(d.recovery_max),
                    deflate: o.deflate.unwrap_or(d.deflate),
                    presence: o.presence.unwrap_or(d.presence),
                    join_leave: o.join_leave.unwrap_or(d.join_leave),
                    presence_ttl_secs: o.presence_ttl_secs.unwrap_or(d.presence_ttl_secs),
                    volatile: o.volatile.unwrap_or(d.volatile),
                })
            }
            None if self.strict_namespaces => None,
            None => Some(self.defaults.clone()),
        }
    }
}

/// The ways an environment variable's text can be read, most specific first: a number
/// or a boolean if it looks like one, and always, last, the string itself. The loader
/// tries them in turn against the key's type.
fn env_readings(s: &str) -> Vec<toml::Value> {
    let mut out = Vec::new();
    if let Ok(v) = s.parse::<i64>() {
        out.push(toml::Value::Integer(v));
    }
    if let Ok(v) = s.parse::<f64>() {
        if v.is_finite() {
            out.push(toml::Value::Float(v));
        }
    }
    match s {
        "true" => out.push(toml::Value::Boolean(true)),
        "false" => out.push(toml::Value::Boolean(false)),
        _ => {}
    }
    out.push(toml::Value::String(s.to_string()));
    out
}

/// Keys whose value is a list; an env override of one splits on commas.
const LIST_KEYS: &[&str] = &["keys", "allowed_origins", "trusted_proxies"];

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    let value = match value {
        toml::Value::String(s) if LIST_KEYS.contains(&last.as_str()) => toml::Value::Array(
            s.split(',').filter(|x| !x.is_empty()).map(|x| toml::Value::String(x.to_string())).collect(),
        ),
        v => v,
    };
    t.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_history_is_the_memory_brokers() {
        let e = load_str("[broker]\nkind = \"redis\"\ndata_dir = \"/tmp/x\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("broker.data_dir") && e.contains("memory broker"), "{e}");
        let c = load_str("[broker]\ndata_dir = \"/tmp/x\"\nfsync = \"batched\"\n", &[]).unwrap();
        assert_eq!(c.broker.fsync, HistoryFsync::Batched);
    }

    #[test]
    fn mqtt_users_need_a_name_once_and_a_sha256_and_match_their_password() {
        let user =
            |name: &str, hash: &str| format!("[[mqtt.users]]\nname = \"{name}\"\npassword_sha256 = \"{hash}\"\n");
        // SHA-256 of "pw".
        let hash = "30c952fab122c3f9759f02a6d95c3758b246b4fee239957b2d4fee46e26170c4";
        let c = load_str(&user("dev", &hash.to_uppercase()), &[]).unwrap();
        assert!(c.mqtt.users[0].password_matches(b"pw") && !c.mqtt.users[0].password_matches(b"pw2"));
        let e = load_str(&user("dev", "abc"), &[]).unwrap_err().to_string();
        assert!(e.contains("mqtt.users[0].password_sha256"), "{e}");
        let e = load_str(&(user("dev", hash) + &user("dev", hash)), &[]).unwrap_err().to_string();
        assert!(e.contains("mqtt.users[1].name"), "{e}");
    }

    #[test]
    fn the_nats_broker_is_configured_and_refuses_what_it_cannot_share() {
        let env = [("SWITCHBOARD_BROKER__KIND", "nats"), ("SWITCHBOARD_BROKER__NATS_URL", "nats://10.0.0.5:4222")];
        let c = load_str("", &env).unwrap();
        assert_eq!(c.broker.kind, BrokerKind::Nats);
        assert!(c.broker.kind.is_cluster());
        assert_eq!(c.broker.nats_url, "nats://10.0.0.5:4222");
        assert_eq!((c.broker.nats_prefix.as_str(), c.broker.nats_replicas), ("sb", 1));
        let hooks = "[broker]\nkind = \"nats\"\n[[webhooks.endpoints]]\nurl = \"http://127.0.0.1:9/h\"\nsecrets = [\"0123456789abcdef\"]\n";
        let e = load_str(hooks, &[]).unwrap_err().to_string();
        assert!(e.contains("webhooks") && e.contains("redis"), "{e}");
        let e = load_str("[broker]\nkind = \"nats\"\nnats_replicas = 7\n", &[]).unwrap_err().to_string();
        assert!(e.contains("broker.nats_replicas"), "{e}");
        assert!(!BrokerKind::Memory.is_cluster());
    }

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("sbcfg-{}-{}", std::process::id(), fastrand_u64()));
        std::fs::write(&dir, toml).unwrap();
        let r = Config::load(Some(&dir), env.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        let _ = std::fs::remove_file(&dir);
        r
    }

    fn fastrand_u64() -> u64 {
        use std::time::SystemTime;
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64
    }

    #[test]
    fn namespaces_override_defaults_field_by_field() {
        let c = load_str("[defaults]\nhistory_size = 7\n[namespaces.chat]\nallow_publish = true\n", &[]).unwrap();
        let chat = c.namespace("chat").unwrap();
        assert_eq!(chat.history_size, 7);
        assert!(chat.allow_publish);
        assert_eq!(c.namespace("other").unwrap().history_size, 7);
    }

    #[test]
    fn env_overrides_nested_keys_and_lists() {
        let c = load_str(
            "",
            &[
                ("SWITCHBOARD_LISTEN", "127.0.0.1:9999"),
                ("SWITCHBOARD_NAMESPACES__CHAT__HISTORY_SIZE", "5"),
                ("SWITCHBOARD_API__KEYS", "0123456789abcdef,fedcba9876543210"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.namespace("chat").unwrap().history_size, 5);
        assert_eq!(c.api.keys.len(), 2);
    }

    #[test]
    fn env_values_are_read_as_their_key_expects() {
        let c = load_str(
            "",
            &[
                ("SWITCHBOARD_BROKER__REDIS_PREFIX", "12345"), // a string that looks like a number
                ("SWITCHBOARD_BROKER__NODE_ID", "7"),          // an optional string
                ("SWITCHBOARD_NAMESPACES__CHAT__HISTORY_SIZE", "42"), // a number, nested
                ("SWITCHBOARD_NAMESPACES__CHAT__PRESENCE", "true"), // a boolean
                ("SWITCHBOARD_AUTH__AUDIENCE", "false"),       // a string that looks like a boolean
                ("SWITCHBOARD_API__KEYS", "1234567890123456,abcdefghijklmnop"), // a list
            ],
        )
        .unwrap();
        assert_eq!(c.broker.redis_prefix, "12345");
        assert_eq!(c.broker.node_id.as_deref(), Some("7"));
        assert_eq!(c.namespace("chat").unwrap().history_size, 42);
        assert!(c.namespace("chat").unwrap().presence);
        assert_eq!(c.auth.audience.as_deref(), Some("false"));
        assert_eq!(c.api.keys, vec!["1234567890123456".to_string(), "abcdefghijklmnop".to_string()]);
        // A value no reading fits is still an error that names the key and the variable.
        let e = load_str("", &[("SWITCHBOARD_NAMESPACES__CHAT__HISTORY_SIZE", "lots")]).unwrap_err().to_string();
        assert!(
            e.contains("namespaces.chat.history_size") && e.contains("SWITCHBOARD_NAMESPACES__CHAT__HISTORY_SIZE"),
            "{e}"
        );
    }

    #[test]
    fn env_variables_outside_the_config_keys_are_ignored_not_fatal() {
        let c = load_str(
            "",
            &[("SWITCHBOARD_TEST_REDIS", "redis://127.0.0.1:1"), ("SWITCHBOARD_LIMITS__MAX_CONNECTIONS", "7")],
        )
        .unwrap();
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(c.ignored_env, vec!["SWITCHBOARD_TEST_REDIS".to_string()]);
        // A typo inside a real section is still an error, with the variable named.
        let e = load_str("", &[("SWITCHBOARD_BROKER__KNID", "redis")]).unwrap_err().to_string();
        assert!(e.contains("knid"), "{e}");
    }

    #[test]
    fn top_level_keys_list_every_field_of_the_config() {
        // serde names the expected fields when it meets an unknown one.
        let e = toml::from_str::<Config>("zz_not_a_key = 1").unwrap_err().to_string();
        let expected = e.split("expected one of").nth(1).unwrap_or_else(|| panic!("{e}"));
        let mut fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let mut listed = TOP_LEVEL_KEYS.to_vec();
        fields.sort();
        listed.sort();
        assert_eq!(fields, listed);
    }

    #[test]
    fn unknown_keys_are_reported_with_their_path() {
        let e = load_str("[namespaces.chat]\nhistroy_size = 5\n", &[]).unwrap_err().to_string();
        assert!(e.contains("namespaces.chat"), "{e}");
        assert!(e.contains("histroy_size"), "{e}");
        let e = load_str("[limits]\nmax_message_bytes = \"big\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("limits.max_message_bytes"), "{e}");
    }

    #[test]
    fn strict_namespaces_reject_unlisted_ones() {
        let c = load_str("strict_namespaces = true\n[namespaces.chat]\n", &[]).unwrap();
        assert!(c.namespace("chat").is_some());
        assert!(c.namespace("news").is_none());
    }

    #[test]
    fn invalid_values_are_explained() {
        let e = load_str("[poll]\ndefault_limit = 0\n", &[]).unwrap_err().to_string();
        assert!(e.contains("poll.default_limit"), "{e}");
        let e = load_str("[api]\nkeys = [\"short\"]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("api.keys[0]"), "{e}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    #[test]
    fn the_example_config_is_valid_and_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../switchboard.example.toml");
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.defaults, d.defaults);
        assert_eq!(c.limits.max_message_bytes, d.limits.max_message_bytes);
        assert_eq!(c.limits.max_channels_per_request, d.limits.max_channels_per_request);
        assert_eq!((c.sse.keepalive_secs, c.sse.retry_ms), (d.sse.keepalive_secs, d.sse.retry_ms));
        assert_eq!((c.poll.max_wait_secs, c.poll.default_limit, c.poll.max_limit), (60, 100, 1000));
        assert_eq!(c.broker.idle_channel_ttl_secs, d.broker.idle_channel_ttl_secs);
        assert_eq!(c.broker.max_unused_channels, d.broker.max_unused_channels);
    }
}
