//! A minimal holder: competes for one channel and prints its notifications while it holds the
//! lock; SIGINT/SIGTERM release the lock and end it.
//!
//! ```sh
//! cargo run -p pgiplock --example holder            # until Ctrl-C
//! PGIPLOCK_EXAMPLE_RUN_FOR_MS=2000 cargo run -p pgiplock --example holder
//! ```
//! The server is `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`), the
//! channel `PGIPLOCK_EXAMPLE_CHANNEL` (default `jobs`), the schema `PGIPLOCK_EXAMPLE_SCHEMA`
//! (default `pgiplock_lease`).

use std::time::Duration;

use pgiplock::{LockMessage, LockOptions, Session, Shutdown};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let session = Session::connect(url.parse()?).await?;
    let options = LockOptions::new().schema(&env("PGIPLOCK_EXAMPLE_SCHEMA", "pgiplock_lease"));
    let lock = session.lock(&env("PGIPLOCK_EXAMPLE_CHANNEL", "jobs"), options)?;
    let stop = CancellationToken::new();
    let shutdown = tokio::spawn(Shutdown::install(stop.clone())?.wait());
    if let Ok(ms) = env("PGIPLOCK_EXAMPLE_RUN_FOR_MS", "").parse::<u64>() {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            stop.cancel();
        });
    }

    let mut messages = lock.subscribe();
    lock.init().await?;
    while let Some(message) = messages.next().await {
        match message {
            LockMessage::Acquired { token } => println!("holding, fence token {token:?}"),
            LockMessage::Message { payload, replay } => println!("message {payload} (replay: {replay})"),
            LockMessage::Lost { reason } => println!("lost: {}", reason.as_str()),
            LockMessage::Released => println!("released"),
            LockMessage::Stopped => break,
            _ => {}
        }
    }
    println!("stopped by {:?}", shutdown.await?);
    Ok(())
}
