//! The Switchboard server: configuration, the HTTP surface and the transports, over the
//! core's hub and broker. `main.rs` is only the command line.

pub mod admin;
pub mod api;
pub mod app;
pub mod assets;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod cors;
pub mod cursor;
pub mod doctor;
pub mod error;
pub mod heartbeat;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod origin;
pub mod presence;
pub mod registry;
pub mod session;
pub mod sources;
pub mod tls;
pub mod transports;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::presence::PresenceManager;
use switchboard_core::{Broker, Hub, MemoryBroker};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use app::AppState;
pub use config::Config;

/// A server ready to accept on its listener.
pub struct Server {
    pub state: AppState,
    listener: TcpListener,
    /// `tls.http_listen`: plain HTTP beside the TLS listener.
    http_listener: Option<TcpListener>,
    /// `mqtt.listen`: MQTT 3.1.1 / 5.
    mqtt_listener: Option<TcpListener>,
    /// `mqtt.tls_listen`: MQTT over TLS.
    mqtt_tls_listener: Option<TcpListener>,
    /// `webtransport.listen`: WebTransport over HTTP/3 (UDP).
    webtransport: Option<transports::wt::Listener>,
    shutdown_tx: watch::Sender<bool>,
    drain_notice: Duration,
}

impl Server {
    /// Builds the broker and hub named by `config` and binds nothing: `listener` is given.
    pub async fn new(mut config: Config, dev: bool, listener: TcpListener) -> anyhow::Result<Server> {
        if dev {
            config.use_dev_auth();
        }
        if dev && !config.namespaces.contains_key("demo") {
            // The demo chat's namespace, unless the config says otherwise.
            config.namespaces.insert(
                "demo".into(),
                config::NamespaceOverride {
                    history_size: Some(200),
                    allow_publish: Some(true),
                    presence: Some(true),
                    join_leave: Some(true),
                    ..Default::default()
                },
            );
        }
        let node_id = config.broker.node_id.clone().unwrap_or_else(presence::client_id);
        let idle = Duration::from_secs(config.broker.idle_channel_ttl_secs);
        // The NATS broker, also where MQTT sessions are kept.
        let mut nats = None;
        let (broker, presence): (Arc<dyn Broker>, Arc<dyn PresenceManager>) = match config.broker.kind {
            config::BrokerKind::Memory => {
                let cap = config.broker.max_unused_channels.max(1);
                let b = match &config.broker.data_dir {
                    Some(dir) => {
                        use switchboard_core::journal::Fsync;
                        let fsync = match config.broker.fsync {
                            config::HistoryFsync::Always => Fsync::Always,
                            config::HistoryFsync::Batched => {
                                Fsync::Batched(Duration::from_millis(config.broker.fsync_interval_ms.max(1)))
                            }
                            config::HistoryFsync::Never => Fsync::Never,
                        };
                        let (b, r) = MemoryBroker::durable(dir, fsync, idle, cap)
                            .map_err(|e| anyhow::anyhow!("broker.data_dir {}: {e}", dir.display()))?;
                        tracing::info!(
                            records = r.records,
                            torn_bytes_dropped = r.dropped_bytes,
                            took_ms = r.took.as_millis() as u64,
                            "history recovered from {}",
                            dir.display()
                        );
                        if r.dropped_bytes > 0 {
                            tracing::warn!(
                                "history journal: {} bytes of a torn last write were cut off",
                                r.dropped_bytes
                            );
                        }
                        b
                    }
                    None => Arc::new(MemoryBroker::with_unused_cap(idle, cap)),
                };
                switchboard_core::memory::spawn_sweeper(&b, Duration::from_secs(60));
                let p = Arc::new(switchboard_core::presence::MemoryPresence::default());
                switchboard_core::presence::spawn_sweeper(&p, Duration::from_secs(30));
                (b, p)
            }
            config::BrokerKind::Redis => {
                let cfg = switchboard_redis::RedisConfig {
                    url: config.broker.redis_url.clone(),
                    prefix: config.broker.redis_prefix.clone(),
                    idle_channel_ttl: idle,
                    cluster: config.broker.redis_cluster,
                };
                let b = Arc::new(switchboard_redis::RedisBroker::new(cfg, &node_id)?);
                let p = Arc::new(switchboard_redis::RedisPresence::open(
                    &redis_target(&config),
                    &config.broker.redis_prefix,
                )?);
                (b, p)
            }
            config::BrokerKind::Nats => {
                // The history stream keeps what the most demanding namespace asks for.
                let namespaces = std::iter::once(config.defaults.clone())
                    .chain(config.namespaces.keys().filter_map(|n| config.namespace(n)));
                let (mut size, mut ttl) = (1, idle);
                for ns in namespaces {
                    size = size.max(ns.history_size);
                    ttl = ttl.max(Duration::from_secs(ns.history_ttl_secs));
                }
                let cfg = switchboard_nats::NatsConfig {
                    url: config.broker.nats_url.clone(),
                    prefix: config.broker.nats_prefix.clone(),
                    max_age: ttl,
                    max_history: size,
                    max_idempotency_window: Duration::from_secs(config.limits.idempotency_window_secs),
                    replicas: config.broker.nats_replicas,
                };
                let b = switchboard_nats::NatsBroker::connect(cfg, &node_id).await?;
                let p = Arc::new(switchboard_nats::NatsPresence::new(&b));
                nats = Some(b.clone());
                (Arc::new(b), p)
            }
        };
        let hub = Hub::start(broker).await?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let state =
            AppState::new(config, dev, hub, presence, shutdown_rx, node_id).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(dir) = &state.config.broker.data_dir {
            // Durable history's companions: revocations and MQTT persistent sessions.
            let n = state
                .deny
                .persist(&dir.join("revocations.log"))
                .map_err(|e| anyhow::anyhow!("broker.data_dir {}: revocations: {e}", dir.display()))?;
            if n > 0 {
                tracing::info!(revocations = n, "revocations recovered");
            }
            state
                .mqtt_sessions
                .use_dir(&dir.join("mqtt-sessions"))
                .map_err(|e| anyhow::anyhow!("broker.data_dir {}: MQTT sessions: {e}", dir.display()))?;
        }
        if config_is_redis(&state) {
            // MQTT persistent sessions in Redis: a client may resume on any node.
            let b = &state.config.broker;
            let kv = switchboard_redis::RedisKv::open(&redis_target(&state.config), &b.redis_prefix, "mqtt-session")?;
            state.mqtt_sessions.use_shared(transports::mqtt::sessions::Shared::Redis(kv));
        }
        if let Some(b) = &nats {
            // ... or in NATS, kept as long as the longest session expiry allowed.
            let expiry = Duration::from_secs(state.config.mqtt.session_expiry_secs);
            let kv = switchboard_nats::NatsKv::new(b, "mqtt-session", expiry);
            state.mqtt_sessions.use_shared(transports::mqtt::sessions::Shared::Nats(Box::new(kv)));
        }
        if state.config.broker.kind.is_cluster() {
            // The cluster's revocations are in force before the first connection is
            // taken (bounded: a Redis that is down does not hold the start; the heartbeat
            // reads them again).
            let _ = tokio::time::timeout(Duration::from_secs(5), cluster::adopt_revocations(&state)).await;
        }
        cluster::start(&state, listener.local_addr()?);
        admin::start_sampler(&state);
        transports::mqtt::sys::start(&state);
        transports::mailbox::spawn_sweeper(&state);
        webhooks::start(&state);
        let _ = state.sources.set(sources::start(&state));
        let http_listener = match state.config.tls.http_listen {
            Some(addr) => Some(bind(addr).map_err(|e| anyhow::anyhow!("tls.http_listen {addr}: {e}"))?),
            None => None,
        };
        let mqtt_listener = match state.config.mqtt.listen {
            Some(addr) => Some(bind(addr).map_err(|e| anyhow::anyhow!("mqtt.listen {addr}: {e}"))?),
            None => None,
        };
        let mqtt_tls_listener = match state.config.mqtt.tls_listen {
            Some(_) if state.tls.is_none() => anyhow::bail!("mqtt.tls_listen needs [tls] cert and key"),
            Some(addr) => Some(bind(addr).map_err(|e| anyhow::anyhow!("mqtt.tls_listen {addr}: {e}"))?),
            None => None,
        };
        let webtransport = match state.config.webtransport.listen.filter(|_| state.config.webtransport.enabled) {
            Some(addr) => match transports::wt::Listener::bind(&state, addr) {
                Ok(l) => Some(l),
                // Under --dev WebTransport is a convenience: the server runs without it.
                Err(e) if dev => {
                    tracing::warn!("WebTransport not started: {e}");
                    None
                }
                Err(e) => anyhow::bail!(e),
            },
            None => None,
        };
        Ok(Server {
            state,
            listener,
            http_listener,
            mqtt_listener,
            mqtt_tls_listener,
            webtransport,
            shutdown_tx,
            drain_notice: Duration::ZERO,
        })
    }

    /// On shutdown, first report not-ready (and refuse new streaming connections) for
    /// this long while still accepting, so load balancers take the node out of rotation
    /// before it stops listening.
    pub fn with_drain_notice(mut self, notice: Duration) -> Self {
        self.drain_notice = notice;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves MQTT on `listener` (when `mqtt.listen` is not set: `serve --dev`'s 1883).
    pub fn with_mqtt_listener(mut self, listener: TcpListener) -> Self {
        if self.mqtt_listener.is_none() {
            self.mqtt_listener = Some(listener);
        }
        self
    }

    /// The MQTT-over-TLS listener's address (`mqtt.tls_listen`).
    pub fn mqtt_tls_local_addr(&self) -> Option<std::net::SocketAddr> {
        self.mqtt_tls_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The WebTransport listener's UDP address (`webtransport.listen`).
    pub fn webtransport_local_addr(&self) -> Option<std::net::SocketAddr> {
        self.webtransport.as_ref().and_then(|l| l.local_addr())
    }

    /// The MQTT listener's address (`mqtt.listen`).
    pub fn mqtt_local_addr(&self) -> Option<std::net::SocketAddr> {
        self.mqtt_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The plain-HTTP listener's address beside a TLS one (`tls.http_listen`).
    pub fn http_local_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops accepting, tells every streaming
    /// client to reconnect, lets them go (at most `drain` long) and returns.
    ///
    /// The accept loop is our own rather than `axum::serve`: an upgraded WebSocket gets
    /// its plain `TcpStream` back, SSE streams on fresh connections are served outside
    /// hyper, TLS and HTTP/2 are chosen per connection, and every connection is counted
    /// for the drain (see [`listener`]).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        drain: Duration,
    ) -> std::io::Result<()> {
        let Server {
            state,
            listener,
            http_listener,
            mqtt_listener,
            mqtt_tls_listener,
            webtransport,
            shutdown_tx,
            drain_notice,
        } = self;
        if let Some(wt) = webtransport {
            tokio::spawn(wt.run(state.clone()));
        }
        let connections = Arc::new(app::ConnTracker::default());
        let draining_state = state.clone();
        let mut shutdown = std::pin::pin!(async move {
            shutdown.await;
            draining_state.draining.store(true, std::sync::atomic::Ordering::SeqCst);
            if !drain_notice.is_zero() {
                tracing::info!("draining: not ready; still accepting for {drain_notice:?}");
                tokio::time::sleep(drain_notice).await;
            }
        });
        if let Some(tls) = &state.tls {
            tls.spawn_reloader(state.shutdown.clone());
        }
        let conns = listener::Conns {
            state: state.clone(),
            app: app::router(state.clone()),
            reserve_app: app::reserve_router(state.clone()),
            connections: connections.clone(),
            https_port: listener.local_addr()?.port(),
        };
        let plain_mode = listener::Listener::Plain(state.config.tls.http_mode);
        let mut failed_accepts = 0u32;
        loop {
            let ((tcp, peer), which) = tokio::select! {
                r = accept(Some(&listener)) => match r {
                    Ok(x) => (x, listener::Listener::Main),
                    Err(e) => { backoff(&mut failed_accepts, e).await; continue; }
                },
                r = accept(http_listener.as_ref()) => match r {
                    Ok(x) => (x, plain_mode),
                    Err(e) => { backoff(&mut failed_accepts, e).await; continue; }
                },
                r = accept(mqtt_listener.as_ref()) => match r {
                    Ok(x) => (x, listener::Listener::Mqtt { tls: false }),
                    Err(e) => { backoff(&mut failed_accepts, e).await; continue; }
                },
                r = accept(mqtt_tls_listener.as_ref()) => match r {
                    Ok(x) => (x, listener::Listener::Mqtt { tls: true }),
                    Err(e) => { backoff(&mut failed_accepts, e).await; continue; }
                },
                _ = &mut shutdown => break,
            };
            if failed_accepts > 0 {
                tracing::info!("accepting again after {failed_accepts} failed accepts");
                failed_accepts = 0;
            }
            let _ = tcp.set_nodelay(true);
            let (slot, reserve) = match state.limits.admit_tcp(peer.ip()) {
                limits::Admission::Full(slot) => (slot, false),
                limits::Admission::Reserve(slot) => (slot, true),
                limits::Admission::Refused(e) => {
                    let counter = match e.code {
                        error::Code::TooManyConnectionsFromIp => &state.metrics.refused_ip_cap,
                        _ => &state.metrics.refused_total_cap,
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::spawn(limits::refuse(tcp, e));
                    continue;
                }
            };
            if let listener::Listener::Mqtt { tls } = which {
                if reserve {
                    // The reserved places are for health probes; MQTT has none.
                    state.metrics.refused_total_cap.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let serve = transports::mqtt::connection::serve_accepted(tcp, tls, state.clone(), peer, slot);
                tokio::spawn(guarded(state.metrics.clone(), "mqtt connection", serve));
                continue;
            }
            conns.spawn(tcp, peer, slot, reserve, which);
        }
        drop(http_listener);
        drop(mqtt_listener);
        drop(mqtt_tls_listener);
        drop(listener);
        tracing::info!("shutting down: telling clients to reconnect");
        let _ = shutdown_tx.send(true);
        let all_gone = async {
            connections.wait_idle().await;
            state.upgraded.wait_idle().await;
        };
        if tokio::time::timeout(drain, all_gone).await.is_err() {
            tracing::warn!(
                http = connections.count(),
                upgraded = state.upgraded.count(),
                "drain window of {drain:?} elapsed with connections still open; exiting"
            );
        }
        Ok(())
    }
}

/// Where the Redis broker's Redis is (a single one or a cluster's seed nodes).
pub(crate) fn redis_target(config: &Config) -> switchboard_redis::Target {
    switchboard_redis::Target { url: config.broker.redis_url.clone(), cluster: config.broker.redis_cluster }
}

fn config_is_redis(state: &AppState) -> bool {
    matches!(state.config.broker.kind, config::BrokerKind::Redis)
}

/// Accepts on `listener`, or never when there is none.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Out of file descriptors and the like: back off (up to a second) instead of spinning,
/// and say so once per streak.
async fn backoff(failed_accepts: &mut u32, e: std::io::Error) {
    *failed_accepts += 1;
    if *failed_accepts == 1 {
        tracing::warn!("accept failed: {e}; backing off until accepts succeed again");
    }
    tokio::time::sleep(Duration::from_millis((10u64 << (*failed_accepts).min(7)).min(1000))).await;
}

/// Locks `m`, taking over a lock a panicking holder left poisoned (what it guards stays
/// usable: every holder leaves it consistent between statements).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a task that serves one connection so that a panic in it cannot leak anything:
/// whatever the task owns — its socket first — is dropped as it unwinds, and the panic
/// is counted (`switchboard_task_panics_total`). The panic itself is logged once, by the
/// panic hook (`serve` routes it to the log with its location).
///
/// A combinator, not an `async fn`: an async fn would keep its `task` argument beside the
/// future it wraps, and every idle connection would pay for its future twice.
pub(crate) fn guarded<F: Future<Output = ()>>(
    metrics: Arc<metrics::Metrics>,
    what: &'static str,
    task: F,
) -> impl Future<Output = ()> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(task).catch_unwind().map(move |r| {
        if r.is_err() {
            metrics.task_panics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(task = what, "a connection task panicked; its connection is closed");
        }
    })
}

/// Listen backlog: deep enough that a reconnect storm queues instead of having SYNs
/// dropped (which costs clients a 1 s retransmit); the kernel caps it at somaxconn.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (a restarted node can
/// bind while old connections linger in TIME_WAIT).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
