//! Opt-in signal handling: release every lock on SIGINT, SIGTERM or SIGABRT.

use pgiplock_core::SignalKind;
use tokio::signal::unix::{signal, SignalKind as UnixSignal};
use tokio_util::sync::CancellationToken;

/// SIGABRT (6 on every platform tokio supports).
const SIGABRT: i32 = 6;

/// Waits for SIGINT, SIGTERM, SIGABRT or `cancel`, then destroys every lock of this process
/// (each bounded by its shutdown timeout) and completes; the caller then exits.
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
