//! Opt-in signal handling: on SIGINT, SIGTERM or SIGABRT, tell the service, release every lock
//! and close every session, so that `main` can shut the rest down in order.

use std::time::Duration;

use pgiplock_core::SignalKind;
use tokio::signal::unix::{signal, Signal, SignalKind as UnixSignal};
use tokio_util::sync::CancellationToken;

/// SIGABRT (6 on every platform tokio supports).
const SIGABRT: i32 = 6;

/// Slack on top of the longest shutdown timeout, for a wedged session task.
const SLACK: Duration = Duration::from_secs(1);

/// The signal handlers of a service, installed up front so that a signal arriving while the
/// service starts is not lost (and does not kill the process).
///
/// [`wait`](Shutdown::wait) waits for SIGINT, SIGTERM or SIGABRT, or for the service's own
/// `cancel` token; then it cancels `cancel` (the rest of the service learns it), destroys every
/// lock of this process (each release bounded by its shutdown timeout), closes every session,
/// and returns the signal that arrived (`None` when the service cancelled the token itself).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let stop = tokio_util::sync::CancellationToken::new();
/// let shutdown = pgiplock::Shutdown::install(stop.clone())?;
/// // ... start the service; its parts stop when `stop` is cancelled ...
/// let signal = shutdown.wait().await; // every lock released, every session closed
/// println!("stopped by {signal:?}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Shutdown {
    cancel: CancellationToken,
    signals: [Signal; 3],
}

impl Shutdown {
    /// Installs the handlers of SIGINT, SIGTERM and SIGABRT (from now on they no longer end the
    /// process by themselves). Fails when the handlers cannot be installed. Needs a tokio
    /// runtime with I/O enabled.
    pub fn install(cancel: CancellationToken) -> std::io::Result<Shutdown> {
        let signals = [
            signal(UnixSignal::interrupt())?,
            signal(UnixSignal::terminate())?,
            signal(UnixSignal::from_raw(SIGABRT))?,
        ];
        Ok(Shutdown { cancel, signals })
    }

    /// The token cancelled at shutdown.
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Waits for a signal or the token, then shuts down (see [`Shutdown`]); returns the signal.
    /// The shutdown itself is bounded by the longest shutdown timeout of the locks, plus a
    /// second.
    pub async fn wait(self) -> Option<SignalKind> {
        let [mut int, mut term, mut abrt] = self.signals;
        let kind = tokio::select! {
            _ = int.recv() => Some(SignalKind::Interrupt),
            _ = term.recv() => Some(SignalKind::Terminate),
            _ = abrt.recv() => Some(SignalKind::Abort),
            () = self.cancel.cancelled() => None,
        };
        match kind {
            Some(kind) => {
                tracing::info!(signal = ?kind, "signal received; releasing every lock and closing every session")
            }
            None => tracing::info!("shutdown requested; releasing every lock and closing every session"),
        }
        self.cancel.cancel();
        shutdown(kind).await;
        kind
    }
}

/// Installs the signal handlers and [waits](Shutdown::wait): cancels `cancel` on SIGINT,
/// SIGTERM or SIGABRT, releases every lock, closes every session and returns the signal. When
/// the handlers cannot be installed it waits for `cancel` alone (and logs an error).
pub async fn shutdown_on_signal(cancel: CancellationToken) -> Option<SignalKind> {
    match Shutdown::install(cancel.clone()) {
        Ok(shutdown) => shutdown.wait().await,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers; waiting for cancellation only");
            cancel.cancelled().await;
            shutdown(None).await;
            None
        }
    }
}

/// Destroys every lock, then closes every session of the process, bounded.
async fn shutdown(kind: Option<SignalKind>) {
    let bound = crate::lock::longest_shutdown_timeout() + SLACK;
    crate::lock::destroy_all_with(kind).await;
    let sessions = crate::session::live_sessions();
    let closes = sessions.iter().map(|s| async move {
        if tokio::time::timeout(bound, s.close()).await.is_err() {
            tracing::warn!("closing a session timed out");
        }
    });
    futures::future::join_all(closes).await;
}

/// Waits for SIGINT, SIGTERM, SIGABRT or `cancel`, then destroys every lock of this process
/// (each bounded by its shutdown timeout) and completes; the caller then exits.
///
/// It neither cancels `cancel` on a signal nor closes the sessions: prefer [`Shutdown`] (or
/// [`shutdown_on_signal`]), which tells the rest of the service and returns the signal.
///
/// A library should not take over a process's lifecycle unless asked: nothing happens on
/// signals unless this is spawned.
pub fn spawn_signal_handler(cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let kind = wait(&cancel).await;
        match kind {
            Some(kind) => tracing::info!(signal = ?kind, "signal received; releasing every lock"),
            None => tracing::info!("shutdown requested; releasing every lock"),
        }
        crate::lock::destroy_all_with(kind).await;
    })
}

async fn wait(cancel: &CancellationToken) -> Option<SignalKind> {
    let streams = (
        signal(UnixSignal::interrupt()),
        signal(UnixSignal::terminate()),
        signal(UnixSignal::from_raw(SIGABRT)),
    );
    let (mut int, mut term, mut abrt) = match streams {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            tracing::error!("cannot install signal handlers; waiting for cancellation only");
            cancel.cancelled().await;
            return None;
        }
    };
    tokio::select! {
        _ = int.recv() => Some(SignalKind::Interrupt),
        _ = term.recv() => Some(SignalKind::Terminate),
        _ = abrt.recv() => Some(SignalKind::Abort),
        () = cancel.cancelled() => None,
    }
}
