//! Direct database access of the tests: schema guards, publishers, `pg_stat_activity`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgiplock_core::quote_ident;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

/// Connects with tokio-postgres (no TLS) and drives the connection in a task.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} (is PostgreSQL running?)"));
    tokio::spawn(async move {
        // The connection ends when the client is dropped or the server goes away; either is
        // the test's business, not this task's.
        let _ = connection.await;
    });
    client
}

/// Pids of the backends whose `application_name` is `app`.
pub async fn backends_of_app(client: &Client, app: &str) -> Vec<i32> {
    let rows = client
        .query("SELECT pid FROM pg_stat_activity WHERE application_name = $1", &[&app])
        .await
        .unwrap_or_else(|e| panic!("pg_stat_activity query failed: {e}"));
    rows.iter().map(|r| r.get::<_, i32>(0)).collect()
}

/// `pg_terminate_backend` of every backend whose `application_name` is `app`; returns how many
/// were signalled.
pub async fn terminate_app(client: &Client, app: &str) -> usize {
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_terminate_backend failed: {e}"));
    rows.iter().filter(|r| r.get::<_, bool>(0)).count()
}

/// A unique schema for one test, dropped (CASCADE) when the guard is dropped.
pub struct TestSchema {
    name: String,
    url: String,
}

impl TestSchema {
    /// A fresh name `t_<hex>` on [`database_url`](crate::database_url).
    pub fn new() -> Self {
        Self::on(&crate::database_url())
    }

    /// A fresh name `t_<hex>` on `url`.
    pub fn on(url: &str) -> Self {
        Self::named(url, &format!("t_{}", crate::unique_hex()))
    }

    /// A given (unique) name on `url`, e.g. one with quotes or spaces.
    pub fn named(url: &str, name: &str) -> Self {
        TestSchema {
            name: name.to_owned(),
            url: url.to_owned(),
        }
    }

    /// The schema name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Default for TestSchema {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&self.name)
        );
        // Drop runs inside a test's runtime, where blocking on a future is not allowed: do the
        // work on a thread with its own small runtime and wait for it.
        let worker = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return Err(format!("runtime: {e}")),
            };
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, NoTls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let driver = tokio::spawn(connection);
                let result = client.batch_execute(&sql).await.map_err(|e| format!("{sql}: {e}"));
                drop(client);
                let _ = driver.await;
                result
            })
        });
        match worker.join() {
            Ok(Ok(())) => {}
            // A server that is gone (throwaway cluster) takes its schemas with it.
            Ok(Err(e)) => eprintln!("warning: dropping schema {:?} failed: {e}", self.name),
            Err(_) => eprintln!("warning: dropping schema {:?} panicked", self.name),
        }
    }
}

/// Publishes notifications on channels over its own connection.
pub struct Publisher {
    client: Client,
}

impl Publisher {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Publisher {
        Publisher {
            client: connect(url).await,
        }
    }

    /// `pg_notify(channel, payload)` (bound parameters: any channel text works).
    pub async fn publish(&self, channel: &str, payload: &str) {
        self.client
            .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
            .unwrap_or_else(|e| panic!("pg_notify({channel:?}, {payload:?}) failed: {e}"));
    }

    /// Publishes `m<i>` for every `i` in `range`, one transaction each; returns the payloads.
    pub async fn publish_numbered(&self, channel: &str, range: std::ops::Range<u64>) -> Vec<String> {
        let mut payloads = Vec::new();
        for i in range {
            let payload = format!("m{i}");
            self.publish(channel, &payload).await;
            payloads.push(payload);
        }
        payloads
    }

    /// Publishes `m0`, `m1`, ... every `period` until stopped, in a task.
    pub async fn stream(url: &str, channel: &str, period: Duration) -> MessageStream {
        let publisher = Publisher::connect(url).await;
        let stop = CancellationToken::new();
        let published = Arc::new(Mutex::new(Vec::new()));
        let (task_stop, task_published, channel) = (stop.clone(), published.clone(), channel.to_owned());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = task_stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let payload = format!("m{n}");
                n += 1;
                // A publisher on a server being restarted may fail; such a message was never
                // published and is not counted.
                if publisher
                    .client
                    .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                    .await
                    .is_ok()
                {
                    task_published
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((payload, crate::now_us()));
                }
            }
        });
        MessageStream {
            stop,
            published,
            task: Some(task),
        }
    }
}

/// A running stream of numbered messages (see [`Publisher::stream`]).
pub struct MessageStream {
    stop: CancellationToken,
    published: Arc<Mutex<Vec<(String, i64)>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MessageStream {
    /// How many messages were published so far.
    pub fn count(&self) -> usize {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops publishing; returns every published payload with its commit time (`t_us`).
    pub async fn stop(mut self) -> Vec<(String, i64)> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.clone()
    }
}

impl Drop for MessageStream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A session that `LISTEN`s on channels and hands their notifications over: tokio-postgres
/// delivers notifications only through `Connection::poll_message`, so this drives the
/// connection itself.
pub struct Listener {
    client: Client,
    /// `(channel, payload, sender backend pid)`.
    notifications: tokio::sync::mpsc::UnboundedReceiver<(String, String, i32)>,
}

impl Listener {
    /// Connects to `url` and listens on every channel of `channels`.
    pub async fn connect(url: &str, channels: &[&str]) -> Listener {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    if tx
                        .send((n.channel().to_owned(), n.payload().to_owned(), n.process_id()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        for channel in channels {
            client
                .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
                .await
                .unwrap_or_else(|e| panic!("LISTEN {channel:?} failed: {e}"));
        }
        Listener { client, notifications }
    }

    /// The listening session's client (e.g. to send a sentinel notification).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next notification `(channel, payload)`, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, String)> {
        self.next_with_sender(timeout).await.map(|(c, p, _)| (c, p))
    }

    /// The next notification `(channel, payload, sender backend pid)`, waiting at most
    /// `timeout`.
    pub async fn next_with_sender(&mut self, timeout: Duration) -> Option<(String, String, i32)> {
        tokio::time::timeout(timeout, self.notifications.recv())
            .await
            .ok()
            .flatten()
    }

    /// Every notification that arrives before `sentinel` (sent on `channel` by this very
    /// session, so it arrives after anything committed earlier: notifications reach a listener
    /// in commit order). Panics if the sentinel does not arrive within `timeout`.
    pub async fn drain_until_sentinel(&mut self, channel: &str, timeout: Duration) -> Vec<(String, String)> {
        self.drain_until_sentinel_with_senders(channel, timeout)
            .await
            .into_iter()
            .map(|(c, p, _)| (c, p))
            .collect()
    }

    /// As [`drain_until_sentinel`](Listener::drain_until_sentinel), with each notification's
    /// sender backend pid.
    pub async fn drain_until_sentinel_with_senders(
        &mut self,
        channel: &str,
        timeout: Duration,
    ) -> Vec<(String, String, i32)> {
        let sentinel = format!("sentinel-{}", crate::unique_hex());
        self.client
            .execute("SELECT pg_notify($1, $2)", &[&channel, &sentinel])
            .await
            .unwrap_or_else(|e| panic!("sentinel notify failed: {e}"));
        let mut before = Vec::new();
        loop {
            match self.next_with_sender(timeout).await {
                Some((c, p, _)) if c == channel && p == sentinel => return before,
                Some(other) => before.push(other),
                None => panic!("sentinel on {channel:?} did not arrive within {timeout:?}; got {before:?}"),
            }
        }
    }
}
