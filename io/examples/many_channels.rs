//! Many channels on one session: one connection competes for several channels, each lock with
//! its own term-scoped worker; exits non-zero if a channel is not held within ten seconds.
//!
//! ```sh
//! PGIPLOCK_EXAMPLE_RUN_FOR_MS=2000 cargo run -p pgiplock --example many_channels
//! ```
//! Settings as in the `holder` example; the channels are `<PGIPLOCK_EXAMPLE_CHANNEL>-0` to `-3`.

use std::time::Duration;

use pgiplock::{LockOptions, Session, Shutdown};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let session = Session::connect(url.parse()?).await?;
    let schema = env("PGIPLOCK_EXAMPLE_SCHEMA", "pgiplock_lease");
    let prefix = env("PGIPLOCK_EXAMPLE_CHANNEL", "jobs");
    let stop = CancellationToken::new();
    let shutdown = tokio::spawn(Shutdown::install(stop.clone())?.wait());

    let mut workers = Vec::new();
    let mut locks = Vec::new();
    for i in 0..4 {
        let lock = session.lock(&format!("{prefix}-{i}"), LockOptions::new().schema(&schema))?;
        lock.init().await?;
        let worker = lock.clone();
        workers.push(tokio::spawn(async move {
            worker
                .run_terms(|term| {
                    let channel = worker.channel().to_owned();
                    async move {
                        println!("{channel}: holding, fence token {:?}", term.token());
                        std::future::pending::<()>().await;
                    }
                })
                .await
        }));
        locks.push(lock);
    }
    // Every channel held, on the one connection.
    for lock in &locks {
        let mut state = lock.state();
        let held = tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.is_holding()))
            .await
            .is_ok_and(|r| r.is_ok());
        if !held {
            stop.cancel();
            let _ = shutdown.await;
            return Err(format!("{} was not acquired within 10 s", lock.channel()).into());
        }
    }
    println!(
        "holding {} channels on backend {:?}",
        locks.len(),
        session.backend_pid()
    );

    match env("PGIPLOCK_EXAMPLE_RUN_FOR_MS", "").parse::<u64>() {
        Ok(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            stop.cancel();
        }
        Err(_) => stop.cancelled().await,
    }
    let signal = shutdown.await?;
    for worker in workers {
        worker.await??;
    }
    println!("stopped by {signal:?}; every lock released, the session closed");
    Ok(())
}
