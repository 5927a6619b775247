//! The lock handle, its options, its subscription, and the process-wide registry of live locks.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use pgiplock_core::{
    ChannelName, ConfigError, FenceToken, LockCall, LockConfig, LockKey, LostReason, Protocol, SchemaName, SignalKind,
    Warning,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::CallWaiter;
use crate::session::{Command, Session};
use crate::term::{LockState, Term};
use crate::Error;

/// Options of one lock. Start from [`LockOptions::new`] and chain the setters.
///
/// ```
/// use pgiplock::{LockOptions, Protocol};
/// use std::time::Duration;
/// let options = LockOptions::new()
///     .protocol(Protocol::Lease)
///     .lease_ttl(Duration::from_secs(5))
///     .acquire_interval(Duration::from_secs(10))
///     .schema("my_locks");
/// # let _ = options;
/// ```
#[derive(Clone, Debug, Default)]
pub struct LockOptions {
    protocol: Protocol,
    acquire_interval: Option<Duration>,
    lease_ttl: Option<Duration>,
    renew_interval: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    schema: Option<String>,
    seed: Option<u64>,
    replay_limit: Option<usize>,
    wake_jitter: Option<Duration>,
    balance: Option<String>,
    crash_watch: Option<bool>,
    crash_watch_refresh: Option<Duration>,
    drain_in_release: Option<bool>,
}

impl LockOptions {
    /// The defaults: [`Protocol::Lease`] and the core's timings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock protocol (`Lease` by default; `Classic` to share locks with `@imqueue/pg-pubsub`).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Longest wait of a standby between attempts (default 30 s).
    pub fn acquire_interval(mut self, interval: Duration) -> Self {
        self.acquire_interval = Some(interval);
        self
    }

    /// Lease length on the database clock (`Lease` only; default 10 s). Setting it also makes
    /// the fence margin a tenth of it, the renew interval a fifth (unless set explicitly) and
    /// caps the request timeout at it.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }

    /// How often the holder renews (`Lease`, default 2 s) or checks its row (`Classic`, 30 s).
    pub fn renew_interval(mut self, interval: Duration) -> Self {
        self.renew_interval = Some(interval);
        self
    }

    /// Bound on the wait of `destroy` (and signal handling) for the release (default 1 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// Schema of the lock table (default `pgip_lock` for Classic, `pgiplock_lease` for Lease).
    pub fn schema(mut self, name: &str) -> Self {
        self.schema = Some(name.to_owned());
        self
    }

    /// Most messages a `Lease` standby keeps to replay if it wins a takeover (default 65 536;
    /// 0 turns replay off, making such a takeover at most once). A standby keeps what followed
    /// the holder's newest acknowledged progress marker, about two renew intervals of traffic;
    /// beyond the limit the oldest go, and a winner that needed them reports
    /// [`LockMessage::Gap`].
    pub fn replay_limit(mut self, messages: usize) -> Self {
        self.replay_limit = Some(messages);
        self
    }

    /// Spread of the standbys woken by a release: each attempts after a uniform delay in
    /// `[0, wake_jitter]` (Lease default 20 ms, so that the first winner's `acquired` marker
    /// spares the others an attempt; Classic 0). Zero hands over fastest, at the cost of one
    /// refused attempt (a read, no write) per woken standby. Under Lease the standby a release
    /// names as its successor (the one that waited longest) attempts at once whatever this is;
    /// the others after `wake_jitter` plus their jitter, in case it cannot.
    pub fn wake_jitter(mut self, jitter: Duration) -> Self {
        self.wake_jitter = Some(jitter);
        self
    }

    /// Fair share across the fleet (`Lease` only; off by default): this lock competes in the
    /// balance `group` (1 to 63 bytes of printable ASCII; its scope is the lock table's schema).
    /// The sessions that compete in a group converge to holding about `channels / sessions` of
    /// its channels each (within one), moving channels by the ordinary graceful handover when a
    /// session joins or leaves; a crashed session's channels go to the survivors below their
    /// share. Sizes and membership come from the table (the group's channels recorded there, its
    /// sessions alive in `pg_stat_activity`), never from configuration. Every session of a group
    /// should compete for the same channels. Under `Classic`, [`Session::lock`] refuses it with
    /// [`Error::InvalidOptions`] (`ConfigError::BalanceNeedsLease`): Classic speaks only what
    /// `@imqueue/pg-pubsub` speaks.
    ///
    /// ```
    /// use pgiplock::{LockOptions, Protocol};
    /// let options = LockOptions::new().balance("workers");
    /// assert_eq!(options.to_config().unwrap().balance.as_deref(), Some("workers"));
    /// assert!(LockOptions::new().protocol(Protocol::Classic).balance("workers").to_config().is_err());
    /// ```
    pub fn balance(mut self, group: &str) -> Self {
        self.balance = Some(group.to_owned());
        self
    }

    /// Crash failover without polling (`Lease`; on by default, ignored under `Classic`): a
    /// standby refused by another process's holder waits for that holder's session to end over
    /// a second connection of the session, and attempts at once when it does, instead of at the
    /// lease's expiry; meanwhile it makes no periodic attempt. One wait per session (for the
    /// holder of most of its standbys; the others keep their ordinary retries). Costs one more
    /// connection per session; turn it off behind transaction-mode poolers such as PgBouncer,
    /// where session advisory locks do not work. Where the second connection cannot be opened
    /// (connection limit reached) standbys fall back to lease expiry.
    pub fn crash_watch(mut self, on: bool) -> Self {
        self.crash_watch = Some(on);
        self
    }

    /// The release is the drain point (`Lease`; on by default, ignored under `Classic`): a
    /// stopping holder commits its release at once and delivers up to its own release marker,
    /// then says so with a `drained:<token>` marker, for which the successor waits (at most
    /// 500 ms, then it replays instead) before it reports the term. One round trip less per
    /// graceful handover. Off, the holder first commits a drain marker of its own and
    /// releases once it has seen it, as 0.1.0 does; successors understand both. With
    /// [`replay_limit`](LockOptions::replay_limit) 0 the holder drains first anyway.
    ///
    /// ```
    /// use pgiplock::LockOptions;
    /// let config = LockOptions::new().drain_in_release(false).to_config().unwrap();
    /// assert!(!config.drain_in_release);
    /// assert!(LockOptions::new().to_config().unwrap().drain_in_release);
    /// ```
    pub fn drain_in_release(mut self, on: bool) -> Self {
        self.drain_in_release = Some(on);
        self
    }

    /// The longest single wait of the crash watch before it is issued again (default 60 s, at
    /// least 10 ms): a waiting statement holds back vacuum (its backend's `xmin`) for at most
    /// this long.
    pub fn crash_watch_refresh(mut self, refresh: Duration) -> Self {
        self.crash_watch_refresh = Some(refresh);
        self
    }

    /// Seed of the retry jitter (default random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub(crate) fn protocol_value(&self) -> Protocol {
        self.protocol
    }

    pub(crate) fn schema_name(&self) -> Result<SchemaName, Error> {
        let name = self.schema.as_deref().unwrap_or_else(|| self.protocol.default_schema());
        Ok(SchemaName::new(name)?)
    }

    pub(crate) fn seed_value(&self) -> u64 {
        self.seed.unwrap_or_else(random_u64)
    }

    /// The core configuration these options describe, validated (what [`Session::lock`] uses;
    /// handy for running the same timings in the simulator).
    pub fn to_config(&self) -> Result<LockConfig, ConfigError> {
        let mut config = LockConfig::new(self.protocol);
        if let Some(interval) = self.acquire_interval {
            config.acquire_interval = interval;
        }
        if let (Protocol::Lease, Some(ttl)) = (self.protocol, self.lease_ttl) {
            config = config.with_lease_ttl(ttl);
        }
        if let Some(interval) = self.renew_interval {
            config.renew_interval = interval;
        }
        if let Some(timeout) = self.shutdown_timeout {
            config.shutdown_timeout = timeout;
        }
        if let Some(limit) = self.replay_limit {
            config.replay_limit = limit;
        }
        if let Some(jitter) = self.wake_jitter {
            config.wake_jitter = jitter;
        }
        config.balance = self.balance.clone();
        if let Some(on) = self.crash_watch {
            config.crash_watch = on;
        }
        if let Some(refresh) = self.crash_watch_refresh {
            config.crash_watch_refresh = refresh;
        }
        if let Some(on) = self.drain_in_release {
            config.drain_in_release = on;
        }
        config.validate()?;
        Ok(config)
    }
}

pub(crate) fn random_u64() -> u64 {
    let bits = uuid::Uuid::new_v4().as_u128();
    (bits as u64) ^ ((bits >> 64) as u64)
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockMessage {
    /// This process now holds the lock; messages follow.
    Acquired {
        /// The term's fencing token (`Lease`).
        token: Option<FenceToken>,
    },
    /// This process stopped holding involuntarily.
    Lost {
        /// Why.
        reason: LostReason,
    },
    /// A voluntary release reached its drain marker: this term's messages are all delivered,
    /// no more follow, and the lock no longer counts as held. `Released` or `ReleaseFailed`
    /// follows.
    Drained,
    /// The server confirmed the release (after `Drained`).
    Released,
    /// The release (after `Drained`) was not confirmed: the row was no longer this term's
    /// (`Superseded`), the session ended, or the statement failed or did not finish within the
    /// shutdown timeout (`ReleaseUnconfirmed`); under `Lease` the lease then ends at its expiry.
    ReleaseFailed {
        /// Why.
        reason: LostReason,
    },
    /// A notification of the channel, delivered only while this process holds the lock.
    Message {
        /// Its payload.
        payload: String,
        /// Replayed at the start of a term that began with a takeover (the previous holder
        /// crashed, was cut off or fenced itself): that holder may have delivered it already.
        /// `false` for every live message and for what a graceful handover passes on, which
        /// is exactly once. Deduplicate replays on an id the message carries if it matters.
        replay: bool,
    },
    /// This term began with a takeover whose replay is incomplete: the replay buffer
    /// (`LockOptions::replay_limit`) overflowed, so up to `missing` messages of the previous
    /// term may never have been delivered. Comes right after `Acquired`, before the replay.
    Gap {
        /// How many messages were dropped.
        missing: u64,
    },
    /// The lock was destroyed; the stream ends after this.
    Stopped,
    /// Something worth knowing that changes nothing by itself: a request failed (the lock
    /// carries on), the server is read-only, a stale backend could not be terminated, the
    /// handover buffer overflowed.
    Warning(Warning),
}

pub(crate) type ReleaseHandler = Arc<dyn Fn(&str) + Send + Sync>;

/// State shared between a lock's handles and the session task that drives it.
pub(crate) struct LockShared {
    pub(crate) key: LockKey,
    pub(crate) channel: ChannelName,
    pub(crate) schema: SchemaName,
    pub(crate) protocol: Protocol,
    pub(crate) shutdown_timeout: Duration,
    acquired: AtomicBool,
    /// The current token, 0 when none (tokens start at 1).
    token: AtomicU64,
    /// Each message with the instant the session's task published it.
    subscribers: Mutex<Vec<mpsc::UnboundedSender<(LockMessage, tokio::time::Instant)>>>,
    /// Set (under the subscribers' mutex) once the lock is gone.
    stopped: AtomicBool,
    release_handlers: Mutex<Vec<ReleaseHandler>>,
    /// Why the session task ended abnormally, once it did.
    ended: Mutex<Option<String>>,
    /// The current term, while holding; set before `state` says so.
    term: Mutex<Option<(Term, tokio::time::Instant)>>,
    state: Mutex<StateCell>,
    /// `stand_down` came and no `init`/`compete` since: a standby is reported as stood down.
    stood_down: AtomicBool,
}

/// A lock's state, and the watch that publishes it while anyone may be watching: made by the
/// first [`PgIpLock::state`] call, dropped at a change that finds no receiver left (a watch
/// costs about 350 bytes, and a session may have ten thousand locks nobody watches).
struct StateCell {
    current: LockState,
    watch: Option<watch::Sender<LockState>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking user callback must not wedge the lock: the data stays consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LockShared {
    pub(crate) fn new(
        key: LockKey,
        channel: ChannelName,
        schema: SchemaName,
        protocol: Protocol,
        shutdown_timeout: Duration,
    ) -> Self {
        LockShared {
            key,
            channel,
            schema,
            protocol,
            shutdown_timeout,
            acquired: AtomicBool::new(false),
            token: AtomicU64::new(0),
            subscribers: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
            release_handlers: Mutex::new(Vec::new()),
            ended: Mutex::new(None),
            term: Mutex::new(None),
            state: Mutex::new(StateCell {
                current: LockState::Standby,
                watch: None,
            }),
            stood_down: AtomicBool::new(false),
        }
    }

    /// Records the lock's new state: a term starts on `Holding` (a new one if the token
    /// changed) and ends, its token cancelled, on any other state; `why` names the end for the
    /// metrics.
    pub(crate) fn set_state(&self, state: LockState, why: &'static str) {
        let state = match state {
            LockState::Standby | LockState::StoodDown if self.stood_down.load(Ordering::SeqCst) => LockState::StoodDown,
            LockState::StoodDown => LockState::Standby,
            other => other,
        };
        let token = match state {
            LockState::Holding { token } => token,
            _ => None,
        };
        {
            let mut term = guard(&self.term);
            let same_term =
                matches!((&*term, state), (Some((t, _)), LockState::Holding { token }) if t.token() == token);
            if !same_term {
                if let Some((old, since)) = term.take() {
                    old.end();
                    crate::metrics::term_ended(self.channel.as_str(), why, since.elapsed());
                }
                if state.is_holding() {
                    *term = Some((Term::new(token), tokio::time::Instant::now()));
                    crate::metrics::term_started(self.channel.as_str());
                }
            }
        }
        self.token.store(token.map_or(0, |t| t.0), Ordering::SeqCst);
        self.acquired.store(state.is_holding(), Ordering::SeqCst);
        // Once stopped, the state stays stopped.
        let mut cell = guard(&self.state);
        if cell.current == state || cell.current == LockState::Stopped {
            return;
        }
        cell.current = state;
        if let Some(watch) = &cell.watch {
            if watch.receiver_count() == 0 {
                // Nobody watches: the next `state()` makes a new watch with the state then.
                cell.watch = None;
            } else {
                watch.send_replace(state);
            }
        }
    }

    /// A receiver of the lock's state, the current one marked seen.
    pub(crate) fn watch_state(&self) -> watch::Receiver<LockState> {
        let mut cell = guard(&self.state);
        let current = cell.current;
        cell.watch
            .get_or_insert_with(|| watch::Sender::new(current))
            .subscribe()
    }

    fn current_state(&self) -> LockState {
        guard(&self.state).current
    }

    /// Records a `stand_down` (`true`) or `init`/`compete` (`false`) as the session's task
    /// takes the call, and the standby's state with it.
    pub(crate) fn set_stood_down(&self, stood_down: bool) {
        self.stood_down.store(stood_down, Ordering::SeqCst);
        let current = self.current_state();
        if matches!(current, LockState::Standby | LockState::StoodDown) {
            self.set_state(current, "stood_down");
        }
    }

    pub(crate) fn end_term(&self) {
        if let Some((term, since)) = guard(&self.term).take() {
            term.end();
            crate::metrics::term_ended(self.channel.as_str(), "session_ended", since.elapsed());
        }
    }

    pub(crate) fn broadcast(&self, message: LockMessage) {
        let at = tokio::time::Instant::now();
        guard(&self.subscribers).retain(|tx| tx.send((message.clone(), at)).is_ok());
    }

    /// The lock is gone: end every subscription, now and later.
    pub(crate) fn mark_stopped(&self) {
        self.set_state(LockState::Stopped, "stopped");
        let mut subscribers = guard(&self.subscribers);
        self.stopped.store(true, Ordering::SeqCst);
        subscribers.clear();
    }

    pub(crate) fn release_handlers(&self) -> Vec<ReleaseHandler> {
        guard(&self.release_handlers).clone()
    }

    /// The session task ended abnormally: the lock is gone. A holder's subscribers see `Lost`,
    /// every subscriber then `Stopped`, and every later call the cause.
    pub(crate) fn end(&self, cause: &str) {
        *guard(&self.ended) = Some(cause.to_owned());
        self.end_term();
        let was_holding = self.acquired.swap(false, Ordering::SeqCst);
        self.token.store(0, Ordering::SeqCst);
        if was_holding {
            self.broadcast(LockMessage::Lost {
                reason: LostReason::SessionLost,
            });
        }
        self.broadcast(LockMessage::Stopped);
        self.mark_stopped();
    }

    fn ended(&self) -> Option<String> {
        guard(&self.ended).clone()
    }
}

/// The handles of one lock: when the last one goes, the lock is stopped in the background.
pub(crate) struct LockHandle {
    pub(crate) shared: Arc<LockShared>,
    pub(crate) session: Session,
}

impl Drop for LockHandle {
    fn drop(&mut self) {
        if !self.shared.stopped.load(Ordering::SeqCst) {
            let _ = self.session.send(Command::Abandon { key: self.shared.key });
        }
    }
}

/// A lock on one `LISTEN` channel. Cheap to clone; all clones are the same lock.
///
/// Created by [`Session::lock`]; lives until [`destroy`](PgIpLock::destroy) (or
/// [`destroy_all`], or [`Session::close`]), or until its last clone is dropped: then it is
/// stopped in the background (a held lock is released, bounded by its shutdown timeout).
///
/// If the session task ends abnormally, every handle reports it: [`is_acquired`] turns false,
/// every subscription ends with `Lost` (if it held) and `Stopped`, and every call fails with
/// [`Error::SessionEnded`] naming the cause.
///
/// [`is_acquired`]: PgIpLock::is_acquired
#[derive(Clone)]
pub struct PgIpLock {
    handle: Arc<LockHandle>,
}

impl std::fmt::Debug for PgIpLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgIpLock")
            .field("channel", &self.shared().channel)
            .field("schema", &self.shared().schema)
            .field("protocol", &self.shared().protocol)
            .field("acquired", &self.is_acquired())
            .finish()
    }
}

impl PgIpLock {
    pub(crate) fn new(shared: Arc<LockShared>, session: Session) -> Self {
        PgIpLock {
            handle: Arc::new(LockHandle { shared, session }),
        }
    }

    fn shared(&self) -> &Arc<LockShared> {
        &self.handle.shared
    }

    fn session(&self) -> &Session {
        &self.handle.session
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        self.shared().channel.as_str()
    }

    /// The schema of the lock table.
    pub fn schema_name(&self) -> &str {
        self.shared().schema.as_str()
    }

    /// The protocol.
    pub fn protocol(&self) -> Protocol {
        self.shared().protocol
    }

    async fn call<T>(
        &self,
        request: LockCall,
        waiter: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> CallWaiter,
    ) -> Result<T, Error> {
        if let Some(cause) = self.shared().ended() {
            return Err(Error::SessionEnded { cause });
        }
        let (tx, rx) = oneshot::channel();
        let key = self.shared().key;
        self.session().send(Command::Call {
            key,
            request,
            waiter: waiter(tx),
        })?;
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(self.session().ended_error_after_task().await),
        }
    }

    /// Creates the schema if needed and starts competing for the lock (retrying on its own).
    /// Resolves once the schema is in place and the channels are listened to on the current
    /// connection (while the server is unreachable it waits for the next one: bound it with a
    /// timeout if needed); a bootstrap failure (for example missing privileges) is returned as
    /// [`Error::Bootstrap`]. Calling it again is harmless.
    pub async fn init(&self) -> Result<(), Error> {
        self.call(LockCall::Init, CallWaiter::Unit).await
    }

    /// Makes one attempt now; `true` when the lock is held afterwards. Without [`init`]
    /// the lock only ever competes through such calls; the first one sets
    /// the schema up like `init` does. `false` at once while the session is disconnected.
    ///
    /// [`init`]: PgIpLock::init
    pub async fn acquire(&self) -> Result<bool, Error> {
        self.call(LockCall::Acquire, CallWaiter::Bool).await
    }

    /// Gives the lock up (after delivering everything up to the release marker) and stays a
    /// standby. Returns once the server confirmed the release ([`LockMessage::Released`]), or
    /// at once when not holding; fails with [`Error::ReleaseFailed`] when the release was not
    /// confirmed (nothing is delivered after the drain marker either way).
    pub async fn release(&self) -> Result<(), Error> {
        if !self.is_acquired() {
            return Ok(());
        }
        self.call(LockCall::Release, CallWaiter::Unit).await
    }

    /// Stops competing without leaving: releases if holding (as [`release`](PgIpLock::release)
    /// does, and returns as it does), then stays connected and listening as a standby that makes
    /// no attempt of its own, whoever releases or crashes, until [`compete`](PgIpLock::compete).
    /// [`state`](PgIpLock::state) reports [`LockState::StoodDown`]. An explicit
    /// [`acquire`](PgIpLock::acquire) still attempts; a term won by an attempt that was already
    /// in flight is released at once.
    pub async fn stand_down(&self) -> Result<(), Error> {
        self.call(LockCall::StandDown, CallWaiter::Unit).await
    }

    /// Competes again after [`stand_down`](PgIpLock::stand_down) (an attempt at once), or
    /// starts competing as [`init`](PgIpLock::init) does: it is the same call.
    pub async fn compete(&self) -> Result<(), Error> {
        self.init().await
    }

    /// Releases if held and stops for good, bounded by the shutdown timeout.
    pub async fn destroy(&self) -> Result<(), Error> {
        self.destroy_with(None).await
    }

    pub(crate) async fn destroy_with(&self, signal: Option<SignalKind>) -> Result<(), Error> {
        let result = self.call(LockCall::Destroy { signal }, CallWaiter::Unit).await;
        unregister(self);
        match result {
            // The session task is gone: the lock is gone with it.
            Err(Error::Closed | Error::SessionEnded { .. }) => Ok(()),
            other => other,
        }
    }

    /// Whether this process holds the lock now.
    pub fn is_acquired(&self) -> bool {
        self.shared().acquired.load(Ordering::SeqCst)
    }

    /// The current term's fencing token, while holding (`Lease`).
    pub fn token(&self) -> Option<FenceToken> {
        match self.shared().token.load(Ordering::SeqCst) {
            0 => None,
            t => Some(FenceToken(t)),
        }
    }

    /// The lock's state as a watch: the receiver starts from the current state (read it with
    /// `borrow()`, await a state with `wait_for`), and every change follows. It ends with
    /// [`LockState::Stopped`].
    ///
    /// ```no_run
    /// # async fn run(lock: pgiplock::PgIpLock) {
    /// let mut state = lock.state();
    /// let holding = state.wait_for(|s| s.is_holding()).await;
    /// # let _ = holding;
    /// # }
    /// ```
    pub fn state(&self) -> watch::Receiver<LockState> {
        self.shared().watch_state()
    }

    /// The current term, while holding.
    pub fn term(&self) -> Option<Term> {
        guard(&self.shared().term).as_ref().map(|(term, _)| term.clone())
    }

    /// The current term if holding, else the next one once the lock is acquired. Fails with
    /// [`Error::Closed`] once the lock is stopped (or [`Error::SessionEnded`] if its session
    /// ended abnormally). Waits as long as it takes: bound it with a timeout if needed.
    pub async fn next_term(&self) -> Result<Term, Error> {
        let mut state = self.state();
        loop {
            // Mark the state seen before looking at the term: a term that starts after the
            // look is a change that `changed` reports.
            let stopped = *state.borrow_and_update() == LockState::Stopped;
            if let Some(term) = self.term() {
                return Ok(term);
            }
            if stopped || state.changed().await.is_err() {
                return Err(match self.shared().ended() {
                    Some(cause) => Error::SessionEnded { cause },
                    None => Error::Closed,
                });
            }
        }
    }

    /// Runs `work` for one term: waits for the current or next term, runs `work(term)` while
    /// it lasts, and returns `Ok(Some(output))` when `work` completed (the lock is then
    /// released, as client-go's `ReleaseOnCancel` does, and stays a standby), or `Ok(None)`
    /// when the term ended first: `work` is then dropped at once, so none of it runs after the
    /// term is over. Errors as [`next_term`](PgIpLock::next_term) does, or with the release's
    /// error.
    ///
    /// ```no_run
    /// # async fn run(lock: pgiplock::PgIpLock) -> Result<(), pgiplock::Error> {
    /// let done = lock
    ///     .run_while_holding(|term| async move {
    ///         println!("holding with token {:?}", term.token());
    ///         // ... the work only the holder may do ...
    ///     })
    ///     .await?;
    /// println!("completed: {}", done.is_some());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run_while_holding<F, Fut>(&self, work: F) -> Result<Option<Fut::Output>, Error>
    where
        F: FnOnce(Term) -> Fut,
        Fut: std::future::Future,
    {
        let term = self.next_term().await?;
        let ended = term.cancellation().clone();
        let token = term.token();
        let output = tokio::select! {
            biased;
            () = ended.cancelled() => return Ok(None),
            output = work(term) => output,
        };
        // Release this term only: a term that ended meanwhile is not ours to release.
        if self.term().is_some_and(|t| t.token() == token && !t.is_over()) {
            self.release().await?;
        }
        Ok(Some(output))
    }

    /// Runs `work` for every term until the lock stops: each time the lock is acquired,
    /// `work(term)` runs until the term ends (then it is dropped) or until it completes (then
    /// the lock is released and competes again, so the next term may be this process's
    /// again). Returns `Ok(())` once the lock is destroyed, [`Error::SessionEnded`] if its
    /// session ended abnormally. A release that fails is logged and the loop goes on (the
    /// lease then ends at its expiry).
    pub async fn run_terms<F, Fut>(&self, mut work: F) -> Result<(), Error>
    where
        F: FnMut(Term) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            match self.run_while_holding(&mut work).await {
                Ok(_) => {}
                Err(Error::Closed) => return Ok(()),
                Err(Error::ReleaseFailed { reason }) => {
                    tracing::warn!(
                        channel = self.channel(),
                        reason = reason.as_str(),
                        "release after the term's work was not confirmed"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Calls `handler` with the channel whenever another holder releases the lock. Runs on the
    /// session's task: keep it short and non-blocking.
    pub fn on_release(&self, handler: impl Fn(&str) + Send + Sync + 'static) {
        guard(&self.shared().release_handlers).push(Arc::new(handler));
    }

    /// A stream of this lock's state changes and of the channel's notifications, which are
    /// delivered only while this process holds the lock. Every subscription sees every message;
    /// nothing is dropped for a slow subscriber (the queue is unbounded).
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut subscribers = guard(&self.shared().subscribers);
        if !self.shared().stopped.load(Ordering::SeqCst) {
            subscribers.push(tx);
        }
        Subscription { rx }
    }
}

/// A lock's stream of [`LockMessage`]s; ends after [`LockMessage::Stopped`].
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<(LockMessage, tokio::time::Instant)>,
}

impl Subscription {
    /// The next message, or `None` once the lock is destroyed.
    pub async fn next(&mut self) -> Option<LockMessage> {
        self.rx.recv().await.map(|(message, _)| message)
    }

    /// The next message with the instant the session's task published it, or `None` once the
    /// lock is destroyed. A consumer that runs late can still tell when a state change
    /// happened: a `Drained` is published before the release statement is sent, so its
    /// instant precedes any other process's acquisition, whenever the consumer gets to it.
    pub async fn next_timed(&mut self) -> Option<(LockMessage, tokio::time::Instant)> {
        self.rx.recv().await
    }

    /// The next message if one is queued.
    pub fn try_next(&mut self) -> Option<LockMessage> {
        self.rx.try_recv().ok().map(|(message, _)| message)
    }
}

impl futures::Stream for Subscription {
    type Item = LockMessage;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LockMessage>> {
        self.rx.poll_recv(cx).map(|m| m.map(|(message, _)| message))
    }
}

/// Every lock this process created and has not destroyed: weak, so that dropping a lock's last
/// handle still stops it.
static REGISTRY: Mutex<Vec<std::sync::Weak<LockHandle>>> = Mutex::new(Vec::new());

pub(crate) fn register(lock: &PgIpLock) {
    let mut registry = guard(&REGISTRY);
    if registry.len() == registry.capacity() {
        // Only before the list would grow: amortised, creating n locks costs O(n), not O(n²).
        registry.retain(|l| l.strong_count() > 0);
    }
    registry.push(Arc::downgrade(&lock.handle));
}

pub(crate) fn unregister(lock: &PgIpLock) {
    guard(&REGISTRY).retain(|l| l.strong_count() > 0 && !std::ptr::eq(l.as_ptr(), Arc::as_ptr(&lock.handle)));
}

pub(crate) fn unregister_session(session: &Session) {
    guard(&REGISTRY).retain(|l| l.upgrade().is_some_and(|h| !h.session.same(session)));
}

fn live_locks() -> Vec<PgIpLock> {
    guard(&REGISTRY)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter(|h| !h.shared.stopped.load(Ordering::SeqCst))
        .map(|handle| PgIpLock { handle })
        .collect()
}

/// The longest shutdown timeout of the live locks (zero when there are none).
pub(crate) fn longest_shutdown_timeout() -> Duration {
    live_locks()
        .iter()
        .map(|l| l.shared().shutdown_timeout)
        .max()
        .unwrap_or(Duration::ZERO)
}

/// Whether any lock created by this process is still alive.
pub fn has_instances() -> bool {
    !live_locks().is_empty()
}

/// Destroys every lock this process created (concurrently, each bounded by its shutdown
/// timeout).
pub async fn destroy_all() {
    destroy_all_with(None).await;
}

pub(crate) async fn destroy_all_with(signal: Option<SignalKind>) {
    let locks = live_locks();
    let destroys = locks.into_iter().map(|lock| async move {
        // The core bounds the stop by the shutdown timeout; the slack covers a wedged task.
        let bound = lock.shared().shutdown_timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, lock.destroy_with(signal)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(channel = lock.channel(), error = %e, "destroying lock failed"),
            Err(_) => {
                unregister(&lock);
                tracing::warn!(channel = lock.channel(), "destroying lock timed out");
            }
        }
    });
    futures::future::join_all(destroys).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_derive_lease_timings() {
        let config = LockOptions::new().to_config().unwrap();
        assert_eq!(config, LockConfig::new(Protocol::Lease));
        let config = LockOptions::new()
            .lease_ttl(Duration::from_secs(3))
            .to_config()
            .unwrap();
        assert_eq!(config.lease_ttl, Duration::from_secs(3));
        assert_eq!(config.renew_interval, Duration::from_millis(600));
        assert_eq!(config.fence_margin, Duration::from_millis(300));
        assert_eq!(config.request_timeout, Duration::from_secs(3));
        let config = LockOptions::new()
            .lease_ttl(Duration::from_secs(3))
            .renew_interval(Duration::from_secs(1))
            .to_config()
            .unwrap();
        assert_eq!(config.renew_interval, Duration::from_secs(1));
        // Classic ignores the lease settings.
        let classic = LockOptions::new()
            .protocol(Protocol::Classic)
            .lease_ttl(Duration::from_millis(1))
            .to_config()
            .unwrap();
        assert_eq!(classic.renew_interval, Duration::from_secs(30));
        assert!(LockOptions::new()
            .lease_ttl(Duration::from_millis(5))
            .to_config()
            .is_err());
    }

    fn shared() -> LockShared {
        LockShared::new(
            LockKey(1),
            ChannelName::new("jobs").unwrap(),
            SchemaName::new("pgip_lock").unwrap(),
            Protocol::Lease,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn the_state_watch_is_made_on_demand_and_dropped_when_nobody_watches() {
        let lock = shared();
        assert!(guard(&lock.state).watch.is_none(), "no watch before anyone asks");
        let mut rx = lock.watch_state();
        assert_eq!(*rx.borrow_and_update(), LockState::Standby);
        lock.set_state(LockState::Holding { token: None }, "test");
        assert!(rx.has_changed().unwrap(), "a watcher sees the change");
        assert_eq!(*rx.borrow_and_update(), LockState::Holding { token: None });
        drop(rx);
        lock.set_state(LockState::Releasing, "test");
        assert!(
            guard(&lock.state).watch.is_none(),
            "a change nobody watches drops the watch"
        );
        // A new watcher starts from the state of the moment, and sees what follows.
        let mut rx = lock.watch_state();
        assert_eq!(*rx.borrow_and_update(), LockState::Releasing);
        lock.mark_stopped();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow(), LockState::Stopped);
        lock.set_state(LockState::Standby, "test");
        assert_eq!(
            *lock.watch_state().borrow(),
            LockState::Stopped,
            "stopped stays stopped"
        );
    }
}
