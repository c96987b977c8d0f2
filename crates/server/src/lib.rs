//! The Switchboard server: configuration, the HTTP surface and the transports, over the
//! core's hub and broker. `main.rs` is only the command line.

pub mod api;
pub mod app;
pub mod config;
pub mod cursor;
pub mod error;
pub mod session;
pub mod transports;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::{Broker, Hub, MemoryBroker};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use app::AppState;
pub use config::Config;

/// A server ready to accept on its listener.
pub struct Server {
    pub state: AppState,
    listener: TcpListener,
    shutdown_tx: watch::Sender<bool>,
}

impl Server {
    /// Builds the broker and hub named by `config` and binds nothing: `listener` is given.
    pub async fn new(config: Config, dev: bool, listener: TcpListener) -> anyhow::Result<Server> {
        let broker: Arc<dyn Broker> = match config.broker.kind {
            config::BrokerKind::Memory => {
                let b = Arc::new(MemoryBroker::new(Duration::from_secs(config.broker.idle_channel_ttl_secs)));
                switchboard_core::memory::spawn_sweeper(&b, Duration::from_secs(60));
                b
            }
        };
        let hub = Hub::start(broker).await?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let state = AppState::new(config, dev, hub, shutdown_rx);
        Ok(Server { state, listener, shutdown_tx })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then tells every streaming client to reconnect,
    /// lets them go (at most `drain` long) and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        drain: Duration,
    ) -> std::io::Result<()> {
        let Server { state, listener, shutdown_tx } = self;
        let app = app::router(state.clone());
        let tx = shutdown_tx.clone();
        let signalled = async move {
            shutdown.await;
            tracing::info!("shutting down: telling clients to reconnect");
            let _ = tx.send(true);
        };
        let mut rx = state.shutdown.clone();
        let serve = axum::serve(listener, app).with_graceful_shutdown(signalled);
        let mut serve = std::pin::pin!(std::future::IntoFuture::into_future(serve));
        tokio::select! {
            r = &mut serve => return r,
            _ = rx.wait_for(|s| *s) => {}
        }
        match tokio::time::timeout(drain, serve).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("drain window of {drain:?} elapsed with connections still open; exiting");
                Ok(())
            }
        }
    }
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
