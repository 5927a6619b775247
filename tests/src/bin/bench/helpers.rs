//! The bench binary's own processes, started by the measurements as children of the bench:
//!
//! - `raw-listen`: a plain tokio-postgres session that `LISTEN`s on one channel and prints each
//!   notification as the worker's `message` line (the floor of the throughput and memory
//!   figures: the same output path without the lock);
//! - `hold-many`: one `pgiplock` session with a lock on each of many channels (the CLI worker
//!   takes one channel).
//!
//! Both print a `ready` line in the worker's format when set up, and exit when stdin closes.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use pgiplock::{LockOptions, Session};
use pgiplock_core::quote_ident;
use pgiplock_tests::{now_us, EventKind, Fleet, Protocol};
use serde_json::json;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::BoxError;

fn emit(line: &serde_json::Value) -> Result<(), BoxError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// The plain-text lines (`held ...`, `heap ...`) worker `index` of `fleet` printed on stdout,
/// one per line: complete once its `ready` was seen, since they come before it on the same pipe.
pub fn report(fleet: &Fleet, index: usize) -> String {
    let mut out = String::new();
    for event in fleet.events() {
        if let EventKind::Unparsed { line } = &event.kind {
            if event.worker == index {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Completes when stdin reaches its end (the bench closed it or died).
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    rx
}

/// `raw-listen`: prints every notification of `channel` until stdin closes.
pub async fn raw_listen(url: &str, channel: &str) -> Result<(), BoxError> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    let (tx, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
            if let AsyncMessage::Notification(n) = message {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
        .await?;
    emit(&json!({"event": "ready", "app": "raw-listen", "pid": std::process::id(), "t_us": now_us()}))?;
    let mut closed = stdin_closed();
    loop {
        tokio::select! {
            n = notifications.recv() => {
                let Some(n) = n else { return Err("the listening session ended".into()) };
                emit(&json!({"event": "message", "channel": n.channel(), "payload": n.payload(), "t_us": now_us()}))?;
            }
            _ = &mut closed => return Ok(()),
        }
    }
}

/// `hold-many`: one session with a lock on each of `prefix0 .. prefix{n-1}` in `schema`.
/// With `expect_all`, `ready` waits until every lock is held (at most [`HOLD_ALL_WAIT`]);
/// otherwise it follows `init()`. Prints, on stdout before `ready` (see [`report`]):
/// `held <k> of <n> in <ms> ms`, the time from
/// the start of this function (before the connection) until every lock was held, or
/// `held <k> of <n>, not all, after <ms> ms` when the wait ended first (`init` calls that
/// failed are counted on the same line); `ready` follows either way, so that the load of a
/// session that cannot hold everything can be measured too; then `heap <kB> kB`.
pub async fn hold_many(
    url: &str,
    schema: &str,
    prefix: &str,
    channels: usize,
    protocol: Protocol,
    expect_all: bool,
) -> Result<(), BoxError> {
    let start = tokio::time::Instant::now();
    let session = Session::connect(url.parse()?).await?;
    let options = LockOptions::new().protocol(protocol).schema(schema);
    let mut locks = Vec::with_capacity(channels);
    for i in 0..channels {
        locks.push(session.lock(&format!("{prefix}{i}"), options.clone())?);
    }
    let failed_inits = futures::future::join_all(locks.iter().map(|l| l.init()))
        .await
        .into_iter()
        .filter(Result::is_err)
        .count();
    let held = || locks.iter().filter(|l| l.is_acquired()).count();
    let mut all = !expect_all;
    if expect_all {
        let every = futures::future::join_all(locks.iter().map(|l| async move {
            let mut state = l.state();
            let _ = state.wait_for(|s| s.is_holding()).await;
        }));
        all = tokio::time::timeout(HOLD_ALL_WAIT, every).await.is_ok();
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let failed = if failed_inits > 0 {
        format!(" ({failed_inits} init calls failed)")
    } else {
        String::new()
    };
    // On stdout, before `ready`: whoever sees `ready` has these lines too (one pipe, in order).
    if all {
        println!("held {} of {channels} in {ms:.1} ms{failed}", held());
    } else {
        println!("held {} of {channels}, not all, after {ms:.1} ms{failed}", held());
    }
    println!("heap {} kB", crate::memory::live_bytes() / 1024);
    emit(&json!({"event": "ready", "app": session.app_name(), "pid": std::process::id(), "t_us": now_us()}))?;
    let _ = stdin_closed().await;
    session.close().await;
    Ok(())
}

/// Longest wait of `hold-many --expect-all` for every lock to be held.
pub const HOLD_ALL_WAIT: Duration = Duration::from_secs(120);
