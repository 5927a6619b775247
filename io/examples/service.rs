//! A service whose worker is scoped to the term: the worker runs only while this process holds
//! the lock, stamps its work with the term's fence token, and is dropped the moment the term
//! ends (lost, released, superseded, session gone); a status task reads the lock's state as a
//! watch; SIGINT/SIGTERM cancel the service's token, release the lock and close the session,
//! and `main` learns which signal arrived.
//!
//! ```sh
//! cargo run -p pgiplock --example service           # until SIGTERM or Ctrl-C
//! PGIPLOCK_EXAMPLE_RUN_FOR_MS=2000 cargo run -p pgiplock --example service
//! ```
//! Settings as in the `holder` example.

use std::time::Duration;

use pgiplock::{FenceToken, LockOptions, LockState, Session, Shutdown};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The work only the holder may do: here, a request every 100 ms, fenced by the term's token
/// (a downstream store would refuse a token older than the newest it has seen).
async fn serve(token: Option<FenceToken>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for request in 1u64.. {
        tick.tick().await;
        println!("request {request} handled under fence token {token:?}");
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let session = Session::connect(url.parse()?).await?;
    let options = LockOptions::new()
        .schema(&env("PGIPLOCK_EXAMPLE_SCHEMA", "pgiplock_lease"))
        .lease_ttl(Duration::from_secs(5));
    let lock = session.lock(&env("PGIPLOCK_EXAMPLE_CHANNEL", "jobs"), options)?;

    // The service's own token: cancelled on SIGINT/SIGTERM/SIGABRT (or by the service itself).
    let stop = CancellationToken::new();
    let shutdown = tokio::spawn(Shutdown::install(stop.clone())?.wait());
    if let Ok(ms) = env("PGIPLOCK_EXAMPLE_RUN_FOR_MS", "").parse::<u64>() {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            stop.cancel();
        });
    }

    // Any part of the service can read or await the lock's state.
    let mut state = lock.state();
    let status = tokio::spawn(async move {
        loop {
            println!("state: {:?}", *state.borrow_and_update());
            if *state.borrow() == LockState::Stopped || state.changed().await.is_err() {
                return;
            }
        }
    });

    lock.init().await?;
    // Each term runs `serve` until it ends; returns once the shutdown destroyed the lock.
    lock.run_terms(|term| async move {
        println!("holding, fence token {:?}", term.token());
        serve(term.token()).await;
    })
    .await?;
    let signal = shutdown.await?;
    status.await?;
    println!("stopped by {signal:?}");
    Ok(())
}
