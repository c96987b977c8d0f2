//! Connections that wait without a task.
//!
//! A connection with nothing to do polls what it waits on — its socket, its queue, its
//! timers — once with a waker of its own, a [`Parked`], hands its state to it and lets
//! its task end. The first of them to fire takes the state back out and starts a new
//! task that drives the connection on. An idle connection so costs its state, not a
//! task's cell too (tokio's, 384–512 B each, aligned to 128 B).
//!
//! A busy connection keeps its task while it waits: starting a task per wake-up would
//! cost more than the wake-up ([`Rhythm`] tells which).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{Metrics, Transport};

/// A connection's state, which [`drive`] serves and parks.
pub(crate) trait Park: Send + Sized + 'static {
    /// Its transport, for `switchboard_parked_connections`.
    const TRANSPORT: Transport;
    /// How the connection ended.
    type Ended: Send;
    /// The server's metrics.
    fn metrics(&self) -> &Arc<Metrics>;
    /// Serves the connection until it ends (`Some`) or has nothing to do (`None`): then
    /// what it waits on — its socket, its queue, its timers — has been polled with
    /// `park`, which wakes it.
    fn run<'a>(&'a mut self, park: &'a Waker) -> impl Future<Output = Option<Self::Ended>> + Send + 'a;
    /// Says goodbye as `ended` calls for, and lets go of the connection.
    fn finish(self, ended: Self::Ended) -> impl Future<Output = ()> + Send;
}

/// Drives the connection until it ends, or until it has nothing to do: then it is
/// parked and this task ends (the wake-up drives it on in a new one).
pub(crate) async fn drive<T: Park>(mut held: T) {
    loop {
        let parked = Parked::new();
        let waker = Waker::from(parked.clone());
        if let Some(ended) = held.run(&waker).await {
            return held.finish(ended).await;
        }
        // Everything it waits on now wakes `parked`.
        match parked.park(held) {
            Some(h) => {
                held = h;
                // Woken meanwhile: on in this task, once it has yielded — a wake-up from
                // tokio's cooperative budget, spent by this task, comes again at once
                // until the task yields.
                tokio::task::yield_now().await;
            }
            None => return,
        }
    }
}

/// The waker a parked connection waits with, holding its state.
pub(crate) struct Parked<T> {
    held: std::sync::Mutex<Option<T>>,
    /// Set by every wake-up: one that came while the connection was being parked (and so
    /// found nothing to start) is seen by the task parking it.
    woken: AtomicBool,
    runtime: tokio::runtime::Handle,
}

impl<T: Park> Parked<T> {
    /// A waker for one parking, from within the runtime.
    fn new() -> Arc<Self> {
        Arc::new(Parked {
            held: std::sync::Mutex::new(None),
            woken: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Parks `held` — what it waits on has been polled with this waker and nothing was
    /// ready. `Some` gives it back when it was woken meanwhile: go on in this task.
    fn park(&self, held: T) -> Option<T> {
        let metrics = held.metrics().clone();
        let gauge = &metrics.parked[Metrics::idx(T::TRANSPORT)];
        gauge.fetch_add(1, Ordering::Relaxed);
        *crate::lock(&self.held) = Some(held);
        if !self.woken.load(Ordering::SeqCst) {
            return None;
        }
        let taken = crate::lock(&self.held).take();
        if taken.is_some() {
            gauge.fetch_sub(1, Ordering::Relaxed);
        }
        taken
    }
}

impl<T: Park> std::task::Wake for Parked<T> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        let held = crate::lock(&self.held).take();
        if let Some(held) = held {
            let metrics = held.metrics().clone();
            metrics.parked[Metrics::idx(T::TRANSPORT)].fetch_sub(1, Ordering::Relaxed);
            self.runtime.spawn(crate::guarded(metrics, "parked connection", drive(held)));
        }
    }
}

/// How many wake-ups in a row, each less than [`QUIET`] after parking, make a connection
/// busy: it keeps its task while it waits — until a wait of [`QUIET`] or more, or a
/// heartbeat, shows it quiet again.
const BUSY: u8 = 3;
const QUIET: Duration = Duration::from_secs(1);

/// Whether a connection parks at its next wait or keeps its task. (Eight bytes: it is
/// in every connection's state.)
#[derive(Default)]
pub(crate) struct Rhythm {
    /// Wake-ups in a row soon after parking.
    rapid: u8,
    /// When the connection last parked: [`millis`] + 1, or 0 for never.
    parked_at: u32,
}

/// Milliseconds since this process first asked, wrapping (every 49 days: a wake-up
/// then may count as rapid or not once, which only moves when a connection parks).
fn millis() -> u32 {
    static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u32
}

impl Rhythm {
    /// The connection's task (re)starts: woken soon after it parked, or after a while.
    pub(crate) fn started(&mut self) {
        let soon = self.parked_at != 0 && u128::from(millis().wrapping_sub(self.parked_at - 1)) < QUIET.as_millis();
        self.rapid = if soon { self.rapid.saturating_add(1) } else { 0 };
    }

    /// A heartbeat: the connection parks at its next wait.
    pub(crate) fn beat(&mut self) {
        self.rapid = 0;
    }

    /// Whether the next wait parks.
    pub(crate) fn parks(&self) -> bool {
        self.rapid < BUSY
    }

    pub(crate) fn parked(&mut self) {
        self.parked_at = millis().wrapping_add(1).max(1);
    }

    /// A wait in the task, begun at `began`, ended.
    pub(crate) fn waited(&mut self, began: Instant) {
        if began.elapsed() >= QUIET {
            self.rapid = 0;
        }
    }
}
