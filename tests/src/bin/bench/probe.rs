//! The floor probe: what a graceful handover costs at the database with nothing of ours in the
//! way. Session A commits `DELETE` + `NOTIFY` in one transaction (a release); session B, which
//! `LISTEN`s, receives the notification and commits an `INSERT` (an acquisition). One sample is
//! the time from the start of A's `COMMIT` to the end of B's `INSERT`, on this process's
//! monotonic clock.

use std::time::Duration;

use pgiplock_core::quote_ident;
use pgiplock_tests::{unique_hex, TestSchema};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::BoxError;

/// Bound on one probe trial.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Two sessions and a one-row table in a schema of their own (dropped with the probe).
pub struct Probe {
    a: Client,
    release_sql: String,
    acquired: mpsc::UnboundedReceiver<Result<Instant, String>>,
    b_task: tokio::task::JoinHandle<()>,
    _schema: TestSchema,
}

impl Probe {
    /// Creates the schema and table on `url`, connects A and B, and lets B listen.
    pub async fn setup(url: &str) -> Result<Probe, BoxError> {
        let schema = TestSchema::named(url, &format!("bench_probe_{}", unique_hex()));
        let table = format!("{}.lock", quote_ident(schema.name()));
        let channel = format!("bench_probe_{}", unique_hex());
        let (a, a_conn) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            let _ = a_conn.await;
        });
        a.batch_execute(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {table} (channel text PRIMARY KEY, app text NOT NULL); \
             INSERT INTO {table} VALUES ('probe', 'b')",
            schema = quote_ident(schema.name())
        ))
        .await?;

        let (b, mut b_conn) = tokio_postgres::connect(url, NoTls).await?;
        let (notified_tx, mut notified) = mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| b_conn.poll_message(cx));
            while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
                if let AsyncMessage::Notification(_) = message {
                    if notified_tx.send(()).is_err() {
                        break;
                    }
                }
            }
        });
        b.batch_execute(&format!("LISTEN {}", quote_ident(&channel))).await?;
        let insert = format!("INSERT INTO {table} VALUES ('probe', 'b')");
        let (acquired_tx, acquired) = mpsc::unbounded_channel();
        let b_task = tokio::spawn(async move {
            while notified.recv().await.is_some() {
                let outcome = b.batch_execute(&insert).await.map(|()| Instant::now());
                if acquired_tx.send(outcome.map_err(|e| e.to_string())).is_err() {
                    break;
                }
            }
        });
        Ok(Probe {
            a,
            release_sql: format!(
                "BEGIN; DELETE FROM {table} WHERE channel = 'probe'; NOTIFY {}",
                quote_ident(&channel)
            ),
            acquired,
            b_task,
            _schema: schema,
        })
    }

    /// One trial: A's release to B's acquisition.
    pub async fn trial(&mut self) -> Result<Duration, BoxError> {
        self.a.batch_execute(&self.release_sql).await?;
        let start = Instant::now();
        self.a.batch_execute("COMMIT").await?;
        match tokio::time::timeout(TRIAL_TIMEOUT, self.acquired.recv()).await {
            Ok(Some(Ok(end))) => Ok(end.saturating_duration_since(start)),
            Ok(Some(Err(e))) => Err(format!("probe: B's INSERT failed: {e}").into()),
            Ok(None) => Err("probe: B's session ended".into()),
            Err(_) => Err(format!("probe: no acquisition within {TRIAL_TIMEOUT:?}").into()),
        }
    }

    /// `n` trials, in milliseconds.
    pub async fn trials(&mut self, n: usize) -> Result<Vec<f64>, BoxError> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.trial().await?.as_secs_f64() * 1000.0);
        }
        Ok(out)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // B's client lives in its task: ending the task closes B's session.
        self.b_task.abort();
    }
}
