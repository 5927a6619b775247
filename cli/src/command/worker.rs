//! `pgiplock worker`: one lock, its events as JSON lines on stdout.
//!
//! The line format is stable (tests and the demo parse it):
//! `{"event":"ready","app":..,"pid":..,"t_us":..}`, then `acquired` (with `token`), `lost`
//! (with `reason`), `released`, `message` (with `payload`, and `replay` when it was replayed at
//! a takeover), `gap` (with `missing`), each with `channel` and `t_us`: the wall clock, in
//! microseconds, when the session published the event (not when it was printed).

use std::io::{Read as _, Write as _};
use std::time::Duration;

use clap::Args;
use pgiplock::{LockMessage, LockOptions, PgIpLock, Session, SessionOptions, Subscription};
use pgiplock_core::{ChannelName, SchemaName};
use serde::Serialize;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{now_us, parse_duration, CliError, DatabaseArgs, ProtocolArg};

/// How long, after `destroy()` returned, we still wait for the subscription's last messages.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Slack on top of the shutdown timeout before we stop waiting for `destroy()`.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(2);

/// Options of `pgiplock worker`.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// The channel whose lock to compete for; its notifications are printed while holding
    /// (required; repeat it to compete for several channels on one session).
    #[arg(long, value_name = "NAME", required = true)]
    channel: Vec<String>,
    /// Longest wait of a standby between two attempts to acquire (a duration)
    /// [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    acquire_interval: Option<Duration>,
    /// Longest wait at shutdown for the release to be confirmed (a duration) [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    shutdown_timeout: Option<Duration>,
    /// Lock protocol.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Lease)]
    protocol: ProtocolArg,
    /// Lease length on the database clock, lease protocol only; the renew interval is a fifth
    /// of it and the fence margin a tenth (a duration) [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    lease_ttl: Option<Duration>,
    /// Schema of the lock table [default: pgiplock_lease for lease, pgip_lock for classic].
    #[arg(long, value_name = "NAME")]
    schema: Option<String>,
    /// Also release and exit when stdin reaches end of file (so a supervisor's death stops it).
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// Most messages a lease standby keeps to replay at a takeover; 0 turns replay off (a count
    /// of messages) [default: 65536].
    #[arg(long, value_name = "MESSAGES")]
    replay_limit: Option<usize>,
    /// Standbys woken by a release attempt after a delay drawn uniformly up to this (a
    /// duration) [default: 20ms under lease, 0s under classic].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wake_jitter: Option<Duration>,
    /// Fair share, lease protocol only: compete in this balance group, so that the workers of
    /// the group hold about an equal share of its channels each (a group name) [default: none,
    /// every lock competes alone].
    #[arg(long, value_name = "GROUP")]
    balance: Option<String>,
    /// Crash failover without polling, lease protocol only: standbys wait on the holder's
    /// session over one more connection per process and take over as soon as it ends; false
    /// (e.g. behind a transaction-mode pooler) waits for the lease's expiry [default: true].
    #[arg(long, value_name = "BOOL")]
    crash_watch: Option<bool>,
    /// After a lease release at shutdown that named a successor, how long the connection stays
    /// open for that successor's `acquired` marker; 0s closes at once (a duration)
    /// [default: 50ms].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    handover_linger: Option<Duration>,
    /// Lease protocol only: a stopping holder's release is its drain point, proven afterwards
    /// by a `drained` marker that its successor waits for; false commits a drain marker of
    /// its own before the release, one round trip more, as earlier versions do
    /// [default: true].
    #[arg(long, value_name = "BOOL")]
    drain_in_release: Option<bool>,
}

impl WorkerArgs {
    /// The session's options: the defaults, with `--handover-linger` if given.
    fn session_options(&self) -> SessionOptions {
        let options = SessionOptions::new();
        match self.handover_linger {
            Some(linger) => options.handover_linger(linger),
            None => options,
        }
    }

    /// Validates everything before connecting, so bad input fails fast with exit code 2.
    fn options(&self) -> Result<(tokio_postgres::Config, LockOptions), CliError> {
        let config = self.database.config()?;
        for channel in &self.channel {
            ChannelName::new(channel).map_err(|e| CliError::Usage(format!("invalid --channel: {e}")))?;
        }
        let mut options = LockOptions::new().protocol(self.protocol.protocol());
        if let Some(schema) = &self.schema {
            SchemaName::new(schema).map_err(|e| CliError::Usage(format!("invalid --schema: {e}")))?;
            options = options.schema(schema);
        }
        if let Some(interval) = self.acquire_interval {
            options = options.acquire_interval(interval);
        }
        if let Some(timeout) = self.shutdown_timeout {
            options = options.shutdown_timeout(timeout);
        }
        if let Some(ttl) = self.lease_ttl {
            if self.protocol == ProtocolArg::Classic {
                return Err(CliError::Usage("--lease-ttl applies to --protocol lease only".into()));
            }
            options = options.lease_ttl(ttl);
        }
        if let Some(limit) = self.replay_limit {
            options = options.replay_limit(limit);
        }
        if let Some(jitter) = self.wake_jitter {
            options = options.wake_jitter(jitter);
        }
        if let Some(group) = &self.balance {
            options = options.balance(group);
        }
        if let Some(on) = self.crash_watch {
            options = options.crash_watch(on);
        }
        if let Some(on) = self.drain_in_release {
            options = options.drain_in_release(on);
        }
        options
            .to_config()
            .map_err(|e| CliError::Usage(format!("invalid options: {e}")))?;
        Ok((config, options))
    }

    /// The `--acquire-interval` given, for the parser's tests.
    #[cfg(test)]
    pub(crate) fn acquire_interval(&self) -> Option<Duration> {
        self.acquire_interval
    }

    fn shutdown_bound(&self) -> Duration {
        // `close` also waits for a named successor, at most the handover linger.
        let linger = self
            .handover_linger
            .unwrap_or(pgiplock_core::SessionConfig::default().handover_linger);
        self.shutdown_timeout.unwrap_or(Duration::from_secs(1)) + linger + SHUTDOWN_SLACK
    }
}

/// SIGTERM, SIGINT, and optionally the end of stdin: the ways a worker is asked to stop.
struct StopRequests {
    terminate: Signal,
    interrupt: Signal,
    stdin_closed: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl StopRequests {
    fn install(watch_stdin: bool) -> Result<Self, CliError> {
        let terminate = signal(SignalKind::terminate()).map_err(|e| CliError::io("installing a SIGTERM handler", e))?;
        let interrupt = signal(SignalKind::interrupt()).map_err(|e| CliError::io("installing a SIGINT handler", e))?;
        let stdin_closed = watch_stdin.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A plain thread: a blocking read must not hold up the runtime's shutdown.
            std::thread::spawn(move || {
                let mut stdin = std::io::stdin().lock();
                let mut buf = [0u8; 256];
                // Anything written to stdin is ignored; only its end matters.
                while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
                let _ = tx.send(());
            });
            rx
        });
        Ok(StopRequests {
            terminate,
            interrupt,
            stdin_closed,
        })
    }

    /// Completes when a stop is requested.
    async fn requested(&mut self) {
        let stdin_closed = async {
            match self.stdin_closed.as_mut() {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
            _ = stdin_closed => {}
        }
    }
}

/// One line of output. Internally tagged, so `"event"` comes first, as documented.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line<'a> {
    Ready {
        app: String,
        pid: u32,
        t_us: u64,
    },
    Acquired {
        channel: &'a str,
        token: Option<u64>,
        t_us: u64,
    },
    Lost {
        channel: &'a str,
        reason: &'static str,
        t_us: u64,
    },
    Drained {
        channel: &'a str,
        t_us: u64,
    },
    Released {
        channel: &'a str,
        t_us: u64,
    },
    ReleaseFailed {
        channel: &'a str,
        reason: &'static str,
        t_us: u64,
    },
    Message {
        channel: &'a str,
        payload: &'a str,
        /// Only on replayed messages, so live lines stay as they were.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        replay: bool,
        t_us: u64,
    },
    Gap {
        channel: &'a str,
        missing: u64,
        t_us: u64,
    },
    Warning {
        channel: &'a str,
        kind: &'static str,
        detail: String,
        t_us: u64,
    },
}

/// Writes one JSON object as a line and flushes it at once (the reader may be timing it).
fn emit(line: &Line<'_>) -> Result<(), CliError> {
    let text = serde_json::to_string(line).map_err(|e| CliError::Failed(format!("encoding a JSON line: {e}")))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::io("writing to stdout", e))
}

/// The line for a subscription message, stamped now; `None` for `Stopped`.
#[cfg(test)]
fn message_line<'a>(channel: &'a str, message: &'a LockMessage) -> Option<Line<'a>> {
    message_line_at(channel, message, now_us())
}

/// The wall-clock stamp of `at`, an instant of the monotonic clock not long ago: the moment
/// the session's task published a message, which the printing may follow by a while on a busy
/// host (a `drained` printed after the next holder's `acquired` would look like an overlap).
fn wall_us(at: tokio::time::Instant) -> u64 {
    let ago = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
    now_us().saturating_sub(ago)
}

/// The line for a subscription message published at `t_us`; `None` for `Stopped`, which has
/// no line.
fn message_line_at<'a>(channel: &'a str, message: &'a LockMessage, t_us: u64) -> Option<Line<'a>> {
    Some(match message {
        LockMessage::Acquired { token } => Line::Acquired {
            channel,
            token: token.map(|t| t.0),
            t_us,
        },
        LockMessage::Lost { reason } => Line::Lost {
            channel,
            reason: reason.as_str(),
            t_us,
        },
        LockMessage::Drained => Line::Drained { channel, t_us },
        LockMessage::Released => Line::Released { channel, t_us },
        LockMessage::ReleaseFailed { reason } => Line::ReleaseFailed {
            channel,
            reason: reason.as_str(),
            t_us,
        },
        LockMessage::Message { payload, replay } => Line::Message {
            channel,
            payload,
            replay: *replay,
            t_us,
        },
        LockMessage::Gap { missing } => Line::Gap {
            channel,
            missing: *missing,
            t_us,
        },
        LockMessage::Warning(warning) => Line::Warning {
            channel,
            kind: warning.as_str(),
            detail: warning.to_string(),
            t_us,
        },
        LockMessage::Stopped => return None,
        _ => return None,
    })
}

/// How long `init` is tried again while the connection keeps failing (a failover between a
/// primary's crash and a replica's promotion takes seconds to tens of seconds).
const INIT_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// `init`, tried again while it fails only because the connection attempt in progress failed
/// (the lock competes in the background meanwhile), for up to [`INIT_RETRY_WINDOW`].
async fn init_through_failover(lock: &PgIpLock) -> Result<(), pgiplock::Error> {
    let deadline = tokio::time::Instant::now() + INIT_RETRY_WINDOW;
    loop {
        match lock.init().await {
            Err(pgiplock::Error::Disconnected { cause }) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(cause = %cause, "not connected while starting; trying again");
                // `init` waits for the next connection attempt, whose backoff paces this loop;
                // the floor keeps it from spinning should an attempt fail at once.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Runs a worker until SIGTERM/SIGINT (or the lock stops), then releases and exits.
pub(crate) async fn run(args: WorkerArgs) -> Result<(), CliError> {
    let (config, options) = args.options()?;
    let mut stop = StopRequests::install(args.exit_on_stdin_eof)?;

    let session = tokio::select! {
        session = Session::connect_with(config, tokio_postgres::NoTls, args.session_options()) => session?,
        () = stop.requested() => return Ok(()),
    };
    let mut locks = Vec::with_capacity(args.channel.len());
    for channel in &args.channel {
        locks.push(session.lock(channel, options.clone())?);
    }
    let mut subscriptions: Vec<Subscription> = locks.iter().map(|l| l.subscribe()).collect();
    let channels = args.channel.join(",");
    tracing::info!(channels = %channels, schema = locks[0].schema_name(), app = %session.app_name(), "worker starting");
    let started = tokio::select! {
        started = init_all(&locks) => started.map(|()| true),
        () = stop.requested() => Ok(false),
    };
    let result = match started {
        Err(e) => {
            let _ = tokio::time::timeout(args.shutdown_bound(), session.close()).await;
            return Err(e.into());
        }
        // Stopped while starting: release whatever init() may already have taken.
        Ok(false) => Ok(()),
        // Printed once the locks compete, so a reader knows this worker can take over from now on.
        Ok(true) => match emit(&Line::Ready {
            app: session.app_name(),
            pid: std::process::id(),
            t_us: now_us(),
        }) {
            Ok(()) => {
                let printing = locks
                    .iter()
                    .zip(subscriptions.iter_mut())
                    .map(|(lock, subscription)| Box::pin(print_messages(lock, subscription)));
                tokio::select! {
                    (printed, _, _) = futures::future::select_all(printing) => printed,
                    () = stop.requested() => Ok(()),
                }
            }
            Err(e) => Err(e),
        },
    };
    tracing::info!(channels = %channels, "worker stopping");
    let bound = args.shutdown_bound();
    let shutdowns = locks
        .iter()
        .zip(subscriptions.iter_mut())
        .map(|(lock, subscription)| shutdown(lock, subscription, bound));
    let shutdown = futures::future::join_all(shutdowns)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, CliError>>()
        .map(|_| ());
    let _ = tokio::time::timeout(args.shutdown_bound(), session.close()).await;
    result.and(shutdown)
}

/// [`init_through_failover`] for every lock, the first error if any.
async fn init_all(locks: &[PgIpLock]) -> Result<(), pgiplock::Error> {
    for result in futures::future::join_all(locks.iter().map(init_through_failover)).await {
        result?;
    }
    Ok(())
}

/// Prints every subscription message; returns only when the lock stops by itself (an error:
/// nobody asked it to) or stdout is gone.
async fn print_messages(lock: &PgIpLock, subscription: &mut Subscription) -> Result<(), CliError> {
    while let Some((message, at)) = subscription.next_timed().await {
        if let Some(line) = message_line_at(lock.channel(), &message, wall_us(at)) {
            emit(&line)?;
        }
        if message == LockMessage::Stopped {
            break;
        }
    }
    Err(CliError::Failed(format!(
        "the lock of channel {} stopped unexpectedly",
        lock.channel()
    )))
}

/// Destroys the lock (release, bounded) while printing what the subscription still delivers:
/// a holder hands over everything that was published before its drain marker, prints
/// `drained`, then `released` once the server confirmed the release (or `release_failed`).
async fn shutdown(lock: &PgIpLock, subscription: &mut Subscription, bound: Duration) -> Result<(), CliError> {
    let held = lock.is_acquired();
    let destroy = tokio::time::timeout(bound, lock.destroy());
    tokio::pin!(destroy);
    let mut destroyed: Option<Result<(), CliError>> = None;
    let mut saw_outcome = false;
    let mut grace_end = tokio::time::Instant::now() + bound + DRAIN_GRACE;
    loop {
        tokio::select! {
            outcome = &mut destroy, if destroyed.is_none() => {
                destroyed = Some(match outcome {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(CliError::Failed(format!("release did not finish within {bound:?}"))),
                });
                grace_end = tokio::time::Instant::now() + DRAIN_GRACE;
            }
            message = subscription.next_timed() => {
                let Some((message, at)) = message else { break };
                saw_outcome |= matches!(message, LockMessage::Released | LockMessage::ReleaseFailed { .. });
                if let Some(line) = message_line_at(lock.channel(), &message, wall_us(at)) {
                    emit(&line)?;
                }
                if message == LockMessage::Stopped {
                    if destroyed.is_some() {
                        break;
                    }
                    // Let destroy() finish; nothing more will be delivered.
                    destroyed = Some(match (&mut destroy).await {
                        Ok(outcome) => outcome.map_err(CliError::from),
                        Err(_) => Err(CliError::Failed(format!("release did not finish within {bound:?}"))),
                    });
                    break;
                }
            }
            () = tokio::time::sleep_until(grace_end) => break,
        }
    }
    let destroyed = destroyed.unwrap_or(Ok(()));
    if held && !saw_outcome {
        // `released` is printed only for a release the server confirmed.
        tracing::warn!(
            channel = lock.channel(),
            "no release outcome was reported before the lock stopped"
        );
    }
    destroyed
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgiplock::FenceToken;
    use pgiplock_core::{LockConfig, Protocol};

    /// The default an option's help states, parsed as a duration.
    fn stated_default(long: &str) -> Duration {
        use clap::CommandFactory;
        let cli = super::super::Cli::command();
        let worker = cli.find_subcommand("worker").expect("worker");
        let arg = worker
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .unwrap_or_else(|| panic!("no --{long}"));
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let shown = help
            .split_once("[default: ")
            .and_then(|(_, rest)| rest.split([' ', ']']).next())
            .unwrap_or_else(|| panic!("--{long} states no default: {help:?}"));
        parse_duration(shown).unwrap_or_else(|e| panic!("--{long}: {e}"))
    }

    #[test]
    fn stated_defaults_are_the_library_defaults() {
        let lease = LockConfig::new(Protocol::Lease);
        assert_eq!(stated_default("acquire-interval"), lease.acquire_interval);
        assert_eq!(stated_default("shutdown-timeout"), lease.shutdown_timeout);
        assert_eq!(stated_default("lease-ttl"), lease.lease_ttl);
        assert_eq!(stated_default("wake-jitter"), lease.wake_jitter);
        assert_eq!(LockConfig::new(Protocol::Classic).wake_jitter, Duration::ZERO);
        let session = pgiplock_core::SessionConfig::default();
        assert_eq!(stated_default("handover-linger"), session.handover_linger);
    }

    #[test]
    fn the_shutdown_bound_covers_the_handover_linger() {
        use clap::Parser;
        let worker = |extra: &[&str]| {
            let mut argv = vec![
                "pgiplock",
                "worker",
                "--database-url",
                "postgres://localhost/db",
                "--channel",
                "jobs",
            ];
            argv.extend_from_slice(extra);
            match super::super::Cli::try_parse_from(argv).expect("parses").command {
                super::super::Command::Worker(args) => args,
                _ => panic!("not the worker"),
            }
        };
        let default = worker(&[]);
        assert_eq!(default.shutdown_bound(), Duration::from_millis(1050) + SHUTDOWN_SLACK);
        let long = worker(&["--handover-linger", "10s", "--shutdown-timeout", "2s"]);
        assert_eq!(long.handover_linger, Some(Duration::from_secs(10)));
        assert_eq!(long.shutdown_bound(), Duration::from_secs(12) + SHUTDOWN_SLACK);
        assert_eq!(
            worker(&["--handover-linger", "0s"]).handover_linger,
            Some(Duration::ZERO)
        );
    }

    fn json(line: Option<Line<'_>>) -> serde_json::Value {
        serde_json::to_value(line.expect("a line")).expect("serializable")
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let token = LockMessage::Acquired {
            token: Some(FenceToken(7)),
        };
        let acquired = json(message_line("jobs", &token));
        assert_eq!(acquired["event"], "acquired");
        assert_eq!(acquired["channel"], "jobs");
        assert_eq!(acquired["token"], 7);
        assert!(acquired["t_us"].as_u64().unwrap() > 0);
        let classic = LockMessage::Acquired { token: None };
        assert!(json(message_line("jobs", &classic))["token"].is_null());
        let message = LockMessage::Message {
            payload: "a \"quoted\"\nline".into(),
            replay: false,
        };
        let text = serde_json::to_string(&message_line("jobs", &message).unwrap()).unwrap();
        assert!(
            text.starts_with(r#"{"event":"message","channel":"jobs","payload":"a \"quoted\"\nline""#),
            "{text}"
        );
        assert!(!text.contains('\n'), "one object per line");
        assert!(!text.contains("replay"), "live lines carry no replay field: {text}");
        let replayed = LockMessage::Message {
            payload: "7".into(),
            replay: true,
        };
        assert_eq!(json(message_line("jobs", &replayed))["replay"], true);
        let gap = json(message_line("jobs", &LockMessage::Gap { missing: 3 }));
        assert_eq!((gap["event"].as_str(), gap["missing"].as_u64()), (Some("gap"), Some(3)));
        let lost = LockMessage::Lost {
            reason: pgiplock::LostReason::LeaseExpired,
        };
        assert_eq!(json(message_line("jobs", &lost))["reason"], "lease_expired");
        assert!(message_line("jobs", &LockMessage::Stopped).is_none());
    }
}
