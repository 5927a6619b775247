//! What to simulate: the fleet, its lock timings, the network and server, the publisher and the
//! faults. Readable from TOML; durations are written like `500ms`, `5s`, `15m`, `2h`.

use std::fmt;
use std::time::Duration;

use pgiplock_core::{ConfigError, LockConfig, Protocol};
use serde::{Deserialize, Serialize};

/// A setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The lock timings are refused by the core.
    #[error("invalid lock configuration: {0}")]
    Lock(#[from] ConfigError),
    /// A value out of range.
    #[error("invalid scenario: {0}")]
    Invalid(String),
    /// A duration that does not parse; the message says why (`5` has no unit: write 5s or 5ms).
    #[error("{0}")]
    Duration(String),
    /// A TOML file that does not parse.
    #[error("invalid scenario file: {0}")]
    Toml(String),
}

/// Parses `250us`, `500ms`, `5s`, `1.5s`, `15m`, `2h`, `1d`, `1h 30m` by the rule of every CLI
/// of the project ([`pgiplock_core::parse_duration`]): a unit is required, at most 10000d.
pub fn parse_duration(text: &str) -> Result<Duration, ScenarioError> {
    pgiplock_core::parse_duration(text).map_err(|e| ScenarioError::Duration(e.to_string()))
}

/// Formats a duration in the largest unit that divides it exactly (`90s`, `15m`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    for (unit, per) in [
        ("d", 86_400_000_000u128),
        ("h", 3_600_000_000),
        ("m", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1_000),
    ] {
        if us >= per && us % per == 0 {
            return format!("{}{unit}", us / per);
        }
    }
    if us == 0 {
        return "0s".to_owned();
    }
    format!("{us}us")
}

/// Durations in TOML and JSON as the CLI writes them (`90s`, `250ms`): one value, an optional
/// one, a list.
pub(crate) mod dur {
    use super::{format_duration, parse_duration};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&format_duration(*d)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let text = Option::<String>::deserialize(d)?;
            text.map(|t| parse_duration(&t).map_err(serde::de::Error::custom))
                .transpose()
        }
    }

    pub mod many {
        use super::*;

        pub fn serialize<S: Serializer>(d: &[Duration], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(d.iter().map(|d| format_duration(*d)))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
            let texts = Vec::<String>::deserialize(d)?;
            texts
                .iter()
                .map(|t| parse_duration(t).map_err(serde::de::Error::custom))
                .collect()
        }
    }
}

mod proto {
    use pgiplock_core::Protocol;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGTERM: the process releases and exits; it restarts after `restart_delay`.
    Stop,
    /// The process dies at once; the server sees the connection end shortly after; it restarts
    /// after `restart_delay`.
    Crash,
    /// The process's network silently drops everything both ways for `cut_duration`.
    Cut,
    /// An administrator terminates the process's backend (`pg_terminate_backend`).
    Terminate,
    /// The server restarts: every session ends; it accepts connections again after `server_down`.
    ServerRestart,
    /// The process's next connection handshake hangs: the server accepts and never answers, so
    /// the session's connect timeout must end the attempt (the process's backend is terminated
    /// first, so that it reconnects now).
    ConnectHang,
    /// A blip in the middle of a reconnect: the process's backend is terminated, and right after
    /// its next connection attempt starts its link drops everything for `blip_duration` (the
    /// connect or its answer is lost).
    ConnectBlip,
    /// The reply to one setup statement (the schema bootstrap or a `LISTEN`) of the process's
    /// next connection is lost, so the session's setup timeout must reset it (the process's
    /// backend is terminated first).
    SetupReplyLoss,
    /// An administrator drops the lock schema under the running fleet: lock operations fail with
    /// SQLSTATE 42P01 until a session bootstraps it again, and the tables start empty (fencing
    /// tokens start again from 1).
    SchemaDrop,
    /// The server refuses writes (SQLSTATE 25006) for `read_only_duration`, as a demoted primary
    /// or `default_transaction_read_only` would.
    ReadOnly,
    /// A foreign session (no lock participant, its own backend pid) sends forged markers on the
    /// data channel's lock channel: `draining`, `released`, `acquired` and a `progress` marker
    /// claiming everything acknowledged, each with the current term's token and with a newer
    /// one. Standbys and the holder must ignore them (counted as ignored markers).
    Forge,
}

impl FaultKind {
    /// All kinds, in report order.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::Stop,
        FaultKind::Crash,
        FaultKind::Cut,
        FaultKind::Terminate,
        FaultKind::ServerRestart,
        FaultKind::ConnectHang,
        FaultKind::ConnectBlip,
        FaultKind::SetupReplyLoss,
        FaultKind::SchemaDrop,
        FaultKind::ReadOnly,
        FaultKind::Forge,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Stop => "stop",
            FaultKind::Crash => "crash",
            FaultKind::Cut => "cut",
            FaultKind::Terminate => "terminate",
            FaultKind::ServerRestart => "server_restart",
            FaultKind::ConnectHang => "connect_hang",
            FaultKind::ConnectBlip => "connect_blip",
            FaultKind::SetupReplyLoss => "setup_reply_loss",
            FaultKind::SchemaDrop => "schema_drop",
            FaultKind::ReadOnly => "read_only",
            FaultKind::Forge => "forge",
        }
    }

    /// Whether the fault hits the server (every process) rather than one process.
    pub fn server_wide(self) -> bool {
        matches!(
            self,
            FaultKind::ServerRestart | FaultKind::SchemaDrop | FaultKind::ReadOnly | FaultKind::Forge
        )
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FaultKind {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, ScenarioError> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ScenarioError::Invalid(format!("unknown fault kind {s:?}")))
    }
}

/// Which process a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// The process holding the data channel's lock (a random live one when nobody holds).
    #[default]
    Holder,
    /// A random live process.
    Any,
}

/// One fault at a given time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// When, from the start of the run.
    #[serde(with = "dur")]
    pub at: Duration,
    /// What.
    pub kind: FaultKind,
    /// A process index; `None` means the current holder.
    #[serde(default)]
    pub process: Option<usize>,
}

/// A step a test (or a scenario file) schedules on one process: an API call on its locks or a
/// change of its link, at a chosen moment. Unlike a fault it is not counted in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `LockCall::Release` on every lock of the process: a held lock is released gracefully
    /// (drain marker, release, notification) and the process stays a standby.
    Release,
    /// `LockCall::Acquire` on every lock of the process: one attempt now.
    Acquire,
    /// The process's link silently drops everything both ways until a `Heal` (or forever).
    Cut,
    /// Ends a cut of the process's link now (a `Cut` action's or a `Cut` fault's).
    Heal,
    /// Starts the process if it is not running (after a crash or a stop with no
    /// `restart_delay`).
    Start,
    /// `LockCall::StandDown` on every lock of the process: a held lock is released gracefully,
    /// and the process stays connected and listening but makes no attempt until `Compete`.
    StandDown,
    /// `LockCall::Init` on every lock of the process: it competes again after a `StandDown`.
    Compete,
}

impl Action {
    /// All actions.
    pub const ALL: [Action; 7] = [
        Action::Release,
        Action::Acquire,
        Action::Cut,
        Action::Heal,
        Action::Start,
        Action::StandDown,
        Action::Compete,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Release => "release",
            Action::Acquire => "acquire",
            Action::Cut => "cut",
            Action::Heal => "heal",
            Action::Start => "start",
            Action::StandDown => "stand_down",
            Action::Compete => "compete",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, ScenarioError> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| ScenarioError::Invalid(format!("unknown action {s:?}")))
    }
}

/// One action at a given time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// When, from the start of the run.
    #[serde(with = "dur")]
    pub at: Duration,
    /// What.
    pub action: Action,
    /// A process index; `None` means the process holding the data channel's lock then (the
    /// action is skipped when nobody holds).
    #[serde(default)]
    pub process: Option<usize>,
}

/// A deliberately broken variant of the simulated process. It exists only to show that the
/// checkers (and [`crate::check`]) catch what it breaks; no fleet behaves like this. It is
/// never read from a scenario file, and the command line takes it only through a hidden flag
/// (`--mutant skip-fence`) so that a printed replay command reproduces a mutant's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mutant {
    /// A holder ignores its self-fence: when its lock reports `Lost { reason: LeaseExpired }`
    /// the process keeps believing it holds and hands every notification of the channel it
    /// hears afterwards to the application (until that lock acquires again or the process
    /// ends). Expected to fail S2.
    SkipFence,
    /// A standby delivers without confirming: every notification of a data channel that a
    /// process hears while its lock on that channel does not hold is handed to the application
    /// anyway. Expected to fail S3.
    StandbyDelivers,
}

impl Mutant {
    /// Every mutant.
    pub const ALL: [Mutant; 2] = [Mutant::SkipFence, Mutant::StandbyDelivers];

    /// The name the hidden `--mutant` flag takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Mutant::SkipFence => "skip-fence",
            Mutant::StandbyDelivers => "standby-delivers",
        }
    }
}

impl fmt::Display for Mutant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mutant {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, ScenarioError> {
        Mutant::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ScenarioError::Invalid(format!("unknown mutant {s:?}")))
    }
}

/// Faults per hour of virtual time, each drawn as a Poisson process from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FaultRates {
    /// Graceful stops per hour.
    pub stop: f64,
    /// Crashes per hour.
    pub crash: f64,
    /// Silent disconnects per hour.
    pub cut: f64,
    /// Server-side terminations per hour.
    pub terminate: f64,
    /// Server restarts per hour.
    pub server_restart: f64,
    /// Hanging connection handshakes per hour.
    pub connect_hang: f64,
    /// Blips during a reconnect per hour.
    pub connect_blip: f64,
    /// Lost setup replies per hour.
    pub setup_reply_loss: f64,
    /// Schema drops per hour.
    pub schema_drop: f64,
    /// Read-only windows per hour.
    pub read_only: f64,
    /// Bursts of forged lock-channel markers per hour.
    pub forge: f64,
}

impl FaultRates {
    /// The rate of `kind`.
    pub fn of(&self, kind: FaultKind) -> f64 {
        match kind {
            FaultKind::Stop => self.stop,
            FaultKind::Crash => self.crash,
            FaultKind::Cut => self.cut,
            FaultKind::Terminate => self.terminate,
            FaultKind::ServerRestart => self.server_restart,
            FaultKind::ConnectHang => self.connect_hang,
            FaultKind::ConnectBlip => self.connect_blip,
            FaultKind::SetupReplyLoss => self.setup_reply_loss,
            FaultKind::SchemaDrop => self.schema_drop,
            FaultKind::ReadOnly => self.read_only,
            FaultKind::Forge => self.forge,
        }
    }

    /// The rate of `kind`, to set.
    pub fn of_mut(&mut self, kind: FaultKind) -> &mut f64 {
        match kind {
            FaultKind::Stop => &mut self.stop,
            FaultKind::Crash => &mut self.crash,
            FaultKind::Cut => &mut self.cut,
            FaultKind::Terminate => &mut self.terminate,
            FaultKind::ServerRestart => &mut self.server_restart,
            FaultKind::ConnectHang => &mut self.connect_hang,
            FaultKind::ConnectBlip => &mut self.connect_blip,
            FaultKind::SetupReplyLoss => &mut self.setup_reply_loss,
            FaultKind::SchemaDrop => &mut self.schema_drop,
            FaultKind::ReadOnly => &mut self.read_only,
            FaultKind::Forge => &mut self.forge,
        }
    }
}

/// Most channels a scenario may have.
pub const MAX_CHANNELS: usize = 10_000;

/// The balance group of a scenario with [`Scenario::balance`].
pub const BALANCE_GROUP: &str = "sim";

/// A whole simulation setting. `Scenario::default()` is the default sweep's base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Lock protocol of every process.
    #[serde(with = "proto")]
    pub protocol: Protocol,
    /// Number of processes competing for the lock.
    pub processes: usize,
    /// Channels (locks) per process; the publisher and the metrics use the first.
    pub channels: usize,
    /// Fair share (Lease only): every lock of every process competes in one balance group, so
    /// that the fleet converges to about `channels / processes` channels each.
    pub balance: bool,
    /// The crash watch (Lease only, `LockConfig::crash_watch`): a process whose standbys another
    /// process's holder refused waits on that holder's session on a second connection, and its
    /// standbys attempt as soon as the holder's session ends. Defaults to the library's default.
    pub crash_watch: bool,
    /// The release is the holder's drain point (Lease only, `LockConfig::drain_in_release`):
    /// one statement less per graceful handover; false commits a drain marker first. Defaults
    /// to the library's default.
    pub drain_in_release: bool,
    /// Virtual time simulated.
    #[serde(with = "dur")]
    pub duration: Duration,
    /// Metrics count from here on (the first acquisition is not a failover).
    #[serde(with = "dur")]
    pub warmup: Duration,
    /// Standby retry bound.
    #[serde(with = "dur")]
    pub acquire_interval: Duration,
    /// Retry jitter fraction (see `LockConfig::retry_jitter`).
    pub retry_jitter: f64,
    /// Lease length (Lease).
    #[serde(with = "dur")]
    pub lease_ttl: Duration,
    /// Renew / ownership-check interval; default: ttl / 5 (Lease), 30 s (Classic).
    #[serde(with = "dur::opt")]
    pub renew_interval: Option<Duration>,
    /// Self-fencing margin; default ttl / 10.
    #[serde(with = "dur::opt")]
    pub fence_margin: Option<Duration>,
    /// A request unanswered for this long resets the session.
    #[serde(with = "dur")]
    pub request_timeout: Duration,
    /// Notifications per second on the data channel (0 = none).
    pub publish_rate: f64,
    /// Most messages a Lease standby keeps for replay (`LockConfig::replay_limit`; `None`: the
    /// core's default; 0 turns replay off).
    pub replay_limit: Option<usize>,
    /// One-way network delay between any process and the server (constant, so each link is FIFO).
    #[serde(with = "dur")]
    pub net_delay: Duration,
    /// Shortest statement execution time at the server.
    #[serde(with = "dur")]
    pub query_min: Duration,
    /// Mean statement execution time (shifted exponential, cut at `query_max`).
    #[serde(with = "dur")]
    pub query_mean: Duration,
    /// Longest statement execution time.
    #[serde(with = "dur")]
    pub query_max: Duration,
    /// Server: time to drop an idle client that vanished (keepalive: 7200 s + 9 × 75 s on Linux).
    #[serde(with = "dur")]
    pub server_keepalive_detect: Duration,
    /// Server: time to drop a client that vanished while the server was sending to it
    /// (tcp_retries2 = 15 on Linux: about 15 min).
    #[serde(with = "dur")]
    pub server_retransmit_detect: Duration,
    /// Client `tcp_user_timeout`: a request unacknowledged this long fails the connection.
    #[serde(with = "dur")]
    pub client_user_timeout: Duration,
    /// Bounds one whole connection attempt (the core session's `connect_timeout`).
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    /// Bounds each setup statement of a connection (the core session's `setup_timeout`).
    #[serde(with = "dur")]
    pub setup_timeout: Duration,
    /// After a crash, time until the server sees the connection end (the OS closes the socket).
    #[serde(with = "dur")]
    pub crash_close_delay: Duration,
    /// Client CPU time to handle one notification: from its arrival to the statement it causes
    /// leaving (0: instant). Every notification a process hears costs it this, on one of the
    /// `host_cores`.
    #[serde(with = "dur")]
    pub client_notify_cost: Duration,
    /// Client CPU time to handle one reply (and to send the statement before it), from its
    /// arrival to the next statement leaving or the event it reports, on one of the
    /// `host_cores` (0: instant).
    #[serde(with = "dur")]
    pub client_reply_cost: Duration,
    /// Time from SIGTERM to the process's first statement of its release: the wake-up and the
    /// shutdown path, the process's own (it holds none of the `host_cores`) (0: instant).
    #[serde(with = "dur")]
    pub client_signal_cost: Duration,
    /// Server backend CPU time per statement, on one of the `host_cores` when the server shares
    /// the fleet's host, before the statement's execution latency (0: none).
    #[serde(with = "dur")]
    pub server_statement_cost: Duration,
    /// Cores the fleet's processes share for the client costs above: k processes woken at once
    /// take ceil(k / cores) rounds (0: a core per process, no contention).
    pub host_cores: usize,
    /// Clock rate drift bound: every process's clock runs at a rate drawn in `1 ± drift`.
    pub drift: f64,
    /// Whether lock sessions may `pg_terminate_backend` each other.
    pub terminate_permitted: bool,
    /// The server's connection limit for the fleet's sessions (its `max_connections` less the
    /// reserved ones): a connection beyond it is refused as PostgreSQL refuses it, "too many
    /// clients already" (SQLSTATE 53300). `None`: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Faults per hour, drawn from the seed.
    pub fault_rates: FaultRates,
    /// Whom rate-drawn faults hit.
    pub fault_target: FaultTarget,
    /// Faults at given times, in addition to the drawn ones.
    pub faults: Vec<FaultSpec>,
    /// Actions at given times (releases, attempts, cuts and heals, starts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionSpec>,
    /// A stopped or crashed process starts again after this long (`None`: never).
    #[serde(with = "dur::opt")]
    pub restart_delay: Option<Duration>,
    /// How long a silent disconnect lasts.
    #[serde(with = "dur")]
    pub cut_duration: Duration,
    /// How long a restarting server refuses connections.
    #[serde(with = "dur")]
    pub server_down: Duration,
    /// How long the link of a connect blip drops everything.
    #[serde(with = "dur")]
    pub blip_duration: Duration,
    /// How long a read-only window lasts.
    #[serde(with = "dur")]
    pub read_only_duration: Duration,
    /// Extra time the liveness checker allows over the design's bound.
    #[serde(with = "dur")]
    pub liveness_slack: Duration,
    /// Most events one run may process.
    pub max_steps: u64,
    /// Also fail S2 when the extra believer's session was already ended by the server without
    /// it knowing (a partitioned holder whose backend was terminated or dropped as a dead peer):
    /// the design lets a standby take over at once then, so only self-fencing bounds it.
    pub strict_s2: bool,
    /// Also fail D1 when a term begun on a row made after a schema drop delivers, unflagged, a
    /// message of an older generation that someone delivered already.
    pub strict_d1: bool,
    /// Also run the checks of the property-testing API ([`crate::check`]): S2 and D1 under
    /// Lease whatever the drift (a fence margin too small for the declared drift then fails S2
    /// instead of going unchecked), no lost message that a holder heard or that the next
    /// holder heard before winning, no duplicate when the only faults are graceful stops, every
    /// failover within [`Scenario::liveness_bound`], the load within [`crate::check::load_bound`].
    pub property_checks: bool,
    /// Testing the checkers only: a deliberately broken process ([`Mutant`]). Never read from
    /// or written to TOML.
    #[serde(skip)]
    pub mutant: Option<Mutant>,
    /// A replica of the server and its failovers ([`crate::replication`]; default: none, a
    /// lone server).
    #[serde(skip_serializing_if = "crate::replication::Replication::is_none")]
    pub replication: crate::replication::Replication,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            protocol: Protocol::Lease,
            processes: 10,
            channels: 1,
            balance: false,
            crash_watch: LockConfig::new(Protocol::Lease).crash_watch,
            drain_in_release: LockConfig::new(Protocol::Lease).drain_in_release,
            duration: Duration::from_secs(12 * 3600),
            warmup: Duration::from_secs(60),
            acquire_interval: Duration::from_secs(30),
            retry_jitter: 0.2,
            lease_ttl: Duration::from_secs(10),
            renew_interval: None,
            fence_margin: None,
            request_timeout: Duration::from_secs(5),
            publish_rate: 1.0,
            replay_limit: None,
            net_delay: Duration::from_micros(250),
            query_min: Duration::from_micros(200),
            query_mean: Duration::from_millis(1),
            query_max: Duration::from_millis(100),
            server_keepalive_detect: Duration::from_secs(7200 + 9 * 75),
            server_retransmit_detect: Duration::from_secs(924),
            client_user_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            setup_timeout: Duration::from_secs(5),
            crash_close_delay: Duration::from_millis(1),
            client_notify_cost: Duration::ZERO,
            client_reply_cost: Duration::ZERO,
            client_signal_cost: Duration::ZERO,
            server_statement_cost: Duration::ZERO,
            host_cores: 0,
            drift: 0.0001,
            terminate_permitted: true,
            max_connections: None,
            fault_rates: FaultRates {
                stop: 1.0,
                crash: 1.0,
                cut: 0.5,
                terminate: 0.5,
                ..FaultRates::default()
            },
            fault_target: FaultTarget::Holder,
            faults: Vec::new(),
            actions: Vec::new(),
            restart_delay: Some(Duration::from_secs(10)),
            cut_duration: Duration::from_secs(30 * 60),
            server_down: Duration::from_secs(5),
            blip_duration: Duration::from_secs(2),
            read_only_duration: Duration::from_secs(20),
            liveness_slack: Duration::from_secs(10),
            max_steps: 2_000_000_000,
            strict_s2: false,
            strict_d1: false,
            property_checks: false,
            mutant: None,
            replication: crate::replication::Replication::default(),
        }
    }
}

impl Scenario {
    /// Parses a TOML scenario; missing fields take their defaults.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Toml(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// The scenario as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// The core configuration every lock of this scenario uses.
    pub fn lock_config(&self) -> LockConfig {
        let mut c = LockConfig::new(self.protocol);
        c.acquire_interval = self.acquire_interval;
        c.retry_jitter = self.retry_jitter;
        c.lease_ttl = self.lease_ttl;
        c.request_timeout = self.request_timeout;
        if let Some(limit) = self.replay_limit {
            c.replay_limit = limit;
        }
        if self.balance {
            c.balance = Some(BALANCE_GROUP.to_owned());
        }
        c.crash_watch = self.crash_watch;
        c.drain_in_release = self.drain_in_release;
        match self.protocol {
            Protocol::Lease => {
                // The derivations of the library's options (renew, margin, request timeout).
                c = c.with_lease_ttl(self.lease_ttl);
                if let Some(renew) = self.renew_interval {
                    c.renew_interval = renew;
                }
                if let Some(margin) = self.fence_margin {
                    c.fence_margin = margin;
                }
            }
            Protocol::Classic => {
                if let Some(renew) = self.renew_interval {
                    c.renew_interval = renew;
                }
                if let Some(margin) = self.fence_margin {
                    c.fence_margin = margin;
                }
            }
        }
        c
    }

    /// Checks the scenario and its lock configuration.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        self.lock_config().validate()?;
        let invalid = |m: &str| Err(ScenarioError::Invalid(m.to_owned()));
        self.replication.validate().map_err(ScenarioError::Invalid)?;
        if self.processes == 0 || self.processes > 100_000 {
            return invalid("processes must be within 1..=100000");
        }
        if self.channels == 0 || self.channels > MAX_CHANNELS {
            return invalid("channels must be within 1..=10000");
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(366 * 86_400) {
            return invalid("duration must be within (0, 366 d]");
        }
        if !(0.0..=0.5).contains(&self.drift) {
            return invalid("drift must be within 0.0..=0.5");
        }
        if !(0.0..=10_000.0).contains(&self.publish_rate) {
            return invalid("publish_rate must be within 0..=10000 per second");
        }
        for kind in FaultKind::ALL {
            if !(0.0..=3600.0).contains(&self.fault_rates.of(kind)) {
                return invalid("fault rates must be within 0..=3600 per hour");
            }
        }
        if self.query_min > self.query_mean || self.query_mean > self.query_max {
            return invalid("query latencies must satisfy query_min <= query_mean <= query_max");
        }
        if self
            .faults
            .iter()
            .any(|f| f.process.is_some_and(|p| p >= self.processes))
        {
            return invalid("a fault names a process index beyond the fleet");
        }
        if self
            .actions
            .iter()
            .any(|a| a.process.is_some_and(|p| p >= self.processes))
        {
            return invalid("an action names a process index beyond the fleet");
        }
        let second = Duration::from_secs(1);
        let costs = [
            self.client_notify_cost,
            self.client_reply_cost,
            self.client_signal_cost,
            self.server_statement_cost,
        ];
        if costs.iter().any(|c| *c > second) {
            return invalid("client and statement costs must be at most 1s each");
        }
        if self.host_cores > 100_000 {
            return invalid("host_cores must be within 0..=100000");
        }
        if self.max_steps == 0 {
            return invalid("max_steps must be positive");
        }
        let ms = Duration::from_millis(1);
        if self.connect_timeout < ms || self.setup_timeout < ms {
            return invalid("connect_timeout and setup_timeout must be at least 1ms");
        }
        Ok(())
    }

    /// The clock-rate drift the Lease fence margin covers: `fence_margin / lease_ttl`. S2 is
    /// checked only when `drift` stays below it.
    pub fn drift_bound(&self) -> f64 {
        let c = self.lock_config();
        c.fence_margin.as_secs_f64() / c.lease_ttl.as_secs_f64()
    }

    /// The retry bound of a standby: `acquire_interval`, or under Lease the lease expiry if that
    /// comes first, plus jitter.
    pub fn retry_bound(&self) -> Duration {
        let c = self.lock_config();
        let base = match self.protocol {
            Protocol::Lease => c.acquire_interval.min(c.lease_ttl),
            Protocol::Classic => c.acquire_interval,
        };
        base + c.wake_jitter
    }

    /// How long after the last fault event a live process must hold the lock again (the design's
    /// bound plus reconnection and the configured slack).
    pub fn liveness_bound(&self) -> Duration {
        let c = self.lock_config();
        let reconnect = self.client_user_timeout
            + self.connect_timeout
            + self.setup_timeout
            + Duration::from_secs(10)
            + self.server_down.max(self.blip_duration);
        let detect = match self.protocol {
            // A silently vanished holder's lease runs out; its zombie session does not matter.
            Protocol::Lease => c.lease_ttl,
            // The zombie session keeps the row until the server's dead-peer detection.
            Protocol::Classic => self.server_keepalive_detect.max(self.server_retransmit_detect) + c.renew_interval,
        };
        detect + self.retry_bound() + c.request_timeout * 2 + c.shutdown_timeout + reconnect + self.liveness_slack
    }

    /// The scenario as command-line flags of `pgiplock-sim run` (only what differs from the
    /// default); explicit fault schedules are not expressible and are listed as `--fault` flags.
    pub fn to_cli_args(&self) -> String {
        let d = Scenario::default();
        let mut out = Vec::new();
        let mut flag = |name: &str, value: String, default: String| {
            if value != default {
                out.push(format!("--{name} {value}"));
            }
        };
        flag("protocol", self.protocol.to_string(), d.protocol.to_string());
        flag("processes", self.processes.to_string(), d.processes.to_string());
        flag("channels", self.channels.to_string(), d.channels.to_string());
        flag("balance", self.balance.to_string(), d.balance.to_string());
        flag("crash-watch", self.crash_watch.to_string(), d.crash_watch.to_string());
        flag(
            "drain-in-release",
            self.drain_in_release.to_string(),
            d.drain_in_release.to_string(),
        );
        let fd = |x: Duration| format_duration(x);
        let fo = |x: Option<Duration>| x.map_or_else(|| "none".to_owned(), format_duration);
        flag("duration", fd(self.duration), fd(d.duration));
        flag("warmup", fd(self.warmup), fd(d.warmup));
        flag("acquire-interval", fd(self.acquire_interval), fd(d.acquire_interval));
        flag(
            "retry-jitter",
            self.retry_jitter.to_string(),
            d.retry_jitter.to_string(),
        );
        flag("lease-ttl", fd(self.lease_ttl), fd(d.lease_ttl));
        flag("renew-interval", fo(self.renew_interval), fo(d.renew_interval));
        flag("fence-margin", fo(self.fence_margin), fo(d.fence_margin));
        flag("request-timeout", fd(self.request_timeout), fd(d.request_timeout));
        flag(
            "publish-rate",
            self.publish_rate.to_string(),
            d.publish_rate.to_string(),
        );
        let limit = |x: Option<usize>| x.map_or_else(|| "none".to_owned(), |n| n.to_string());
        flag("replay-limit", limit(self.replay_limit), limit(d.replay_limit));
        flag("net-delay", fd(self.net_delay), fd(d.net_delay));
        flag("query-min", fd(self.query_min), fd(d.query_min));
        flag("query-mean", fd(self.query_mean), fd(d.query_mean));
        flag("query-max", fd(self.query_max), fd(d.query_max));
        flag(
            "server-keepalive-detect",
            fd(self.server_keepalive_detect),
            fd(d.server_keepalive_detect),
        );
        flag(
            "server-retransmit-detect",
            fd(self.server_retransmit_detect),
            fd(d.server_retransmit_detect),
        );
        flag(
            "client-user-timeout",
            fd(self.client_user_timeout),
            fd(d.client_user_timeout),
        );
        flag("connect-timeout", fd(self.connect_timeout), fd(d.connect_timeout));
        flag("setup-timeout", fd(self.setup_timeout), fd(d.setup_timeout));
        flag("crash-close-delay", fd(self.crash_close_delay), fd(d.crash_close_delay));
        flag(
            "client-notify-cost",
            fd(self.client_notify_cost),
            fd(d.client_notify_cost),
        );
        flag("client-reply-cost", fd(self.client_reply_cost), fd(d.client_reply_cost));
        flag(
            "client-signal-cost",
            fd(self.client_signal_cost),
            fd(d.client_signal_cost),
        );
        flag(
            "server-statement-cost",
            fd(self.server_statement_cost),
            fd(d.server_statement_cost),
        );
        flag("host-cores", self.host_cores.to_string(), d.host_cores.to_string());
        flag("drift", self.drift.to_string(), d.drift.to_string());
        flag(
            "terminate-permitted",
            self.terminate_permitted.to_string(),
            d.terminate_permitted.to_string(),
        );
        let limit = |m: Option<usize>| m.map_or_else(|| "none".to_owned(), |m| m.to_string());
        flag("max-connections", limit(self.max_connections), limit(d.max_connections));
        for kind in FaultKind::ALL {
            let name = format!("{}-rate", kind.as_str().replace('_', "-"));
            flag(
                &name,
                self.fault_rates.of(kind).to_string(),
                d.fault_rates.of(kind).to_string(),
            );
        }
        let target = |t: FaultTarget| match t {
            FaultTarget::Holder => "holder".to_owned(),
            FaultTarget::Any => "any".to_owned(),
        };
        flag("fault-target", target(self.fault_target), target(d.fault_target));
        flag("restart-delay", fo(self.restart_delay), fo(d.restart_delay));
        flag("cut-duration", fd(self.cut_duration), fd(d.cut_duration));
        flag("server-down", fd(self.server_down), fd(d.server_down));
        flag("blip-duration", fd(self.blip_duration), fd(d.blip_duration));
        flag(
            "read-only-duration",
            fd(self.read_only_duration),
            fd(d.read_only_duration),
        );
        flag("liveness-slack", fd(self.liveness_slack), fd(d.liveness_slack));
        flag("max-steps", self.max_steps.to_string(), d.max_steps.to_string());
        flag("strict-s2", self.strict_s2.to_string(), d.strict_s2.to_string());
        flag("strict-d1", self.strict_d1.to_string(), d.strict_d1.to_string());
        flag(
            "property-checks",
            self.property_checks.to_string(),
            d.property_checks.to_string(),
        );
        let r = (&self.replication, &d.replication);
        flag("replication", r.0.mode.to_string(), r.1.mode.to_string());
        flag("replication-lag", fd(r.0.lag), fd(r.1.lag));
        flag("sync-commit-wait", fd(r.0.sync_commit_wait), fd(r.1.sync_commit_wait));
        flag("promote-after", fd(r.0.promote_after), fd(r.1.promote_after));
        flag("clock-skew", fd(r.0.clock_skew), fd(r.1.clock_skew));
        flag("old-primary-up", fo(r.0.old_primary_up), fo(r.1.old_primary_up));
        if !r.0.failovers.is_empty() {
            let times: Vec<String> = r.0.failovers.iter().map(|t| fd(*t)).collect();
            out.push(format!("--failover-at {}", times.join(",")));
        }
        if let Some(mutant) = self.mutant {
            out.push(format!("--mutant {mutant}"));
        }
        for f in &self.faults {
            let target = f.process.map_or_else(|| "holder".to_owned(), |p| p.to_string());
            out.push(format!("--fault {}@{}@{}", f.kind, fd(f.at), target));
        }
        for a in &self.actions {
            let target = a.process.map_or_else(|| "holder".to_owned(), |p| p.to_string());
            out.push(format!("--action {}@{}@{}", a.action, fd(a.at), target));
        }
        out.join(" ")
    }

    /// A one-line summary for the first line of output.
    pub fn summary(&self) -> String {
        let c = self.lock_config();
        let mut s = format!(
            "protocol={} processes={} channels={} duration={} acquire_interval={}",
            self.protocol,
            self.processes,
            self.channels,
            format_duration(self.duration),
            format_duration(self.acquire_interval),
        );
        if self.protocol == Protocol::Lease {
            s.push_str(&format!(
                " lease_ttl={} renew={} margin={}",
                format_duration(c.lease_ttl),
                format_duration(c.renew_interval),
                format_duration(c.fence_margin)
            ));
        }
        let r = &self.fault_rates;
        s.push_str(&format!(
            " publish_rate={}/s faults/h=stop:{} crash:{} cut:{} terminate:{} server_restart:{} scheduled={} drift={}",
            self.publish_rate,
            r.stop,
            r.crash,
            r.cut,
            r.terminate,
            r.server_restart,
            self.faults.len(),
            self.drift
        ));
        // The connection faults only when they are on, so that the usual line stays short.
        for kind in &FaultKind::ALL[5..] {
            let rate = r.of(*kind);
            if rate > 0.0 {
                s.push_str(&format!(" {kind}:{rate}/h"));
            }
        }
        if let Some(limit) = self.replay_limit {
            s.push_str(&format!(" replay_limit={limit}"));
        }
        // Only when on, so that a lone server's line is as it always was.
        let r = &self.replication;
        if !r.is_none() {
            s.push_str(&format!(" replication={}", r.mode));
            match r.mode {
                crate::replication::ReplicationMode::Async => s.push_str(&format!(" lag={}", format_duration(r.lag))),
                _ => s.push_str(&format!(" sync_commit_wait={}", format_duration(r.sync_commit_wait))),
            }
            s.push_str(&format!(
                " failovers={} promote_after={}",
                r.failovers.len(),
                format_duration(r.promote_after)
            ));
        }
        if let Some(mutant) = self.mutant {
            s.push_str(&format!(" MUTANT={mutant}"));
        }
        s
    }
}

/// Parses `kind@time@target` (target: `holder` or a process index), as in `--fault cut@2h@holder`.
pub fn parse_fault(text: &str) -> Result<FaultSpec, ScenarioError> {
    let (kind, at, process) = parse_scheduled(text)?;
    Ok(FaultSpec {
        at,
        kind: kind.parse()?,
        process,
    })
}

/// Parses `action@time@target` (target: `holder` or a process index), as in
/// `--action release@90s@holder`.
pub fn parse_action(text: &str) -> Result<ActionSpec, ScenarioError> {
    let (action, at, process) = parse_scheduled(text)?;
    Ok(ActionSpec {
        at,
        action: action.parse()?,
        process,
    })
}

/// `what@time@target`, split and parsed except for `what`.
fn parse_scheduled(text: &str) -> Result<(&str, Duration, Option<usize>), ScenarioError> {
    let mut parts = text.split('@');
    let what = parts.next().unwrap_or_default();
    let at = parse_duration(parts.next().unwrap_or_default())?;
    let process = match parts.next() {
        None | Some("holder") => None,
        Some(p) => Some(
            p.parse::<usize>()
                .map_err(|_| ScenarioError::Invalid(format!("bad target {p:?}")))?,
        ),
    };
    Ok((what, at, process))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_the_cli_writes_them() {
        let ok = |t: &str| parse_duration(t).unwrap();
        assert_eq!(ok("250us"), Duration::from_micros(250));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok(" 15m "), Duration::from_secs(900));
        assert_eq!(ok("2h"), Duration::from_secs(7200));
        assert_eq!(ok("1d"), Duration::from_secs(86_400));
        assert_eq!(ok("1h 30m"), Duration::from_secs(5400));
        for bad in ["", "5", "5x", "ms", "-1s", "100y"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn actions_parse_as_the_cli_writes_them() {
        let a = parse_action("release@90s@holder").unwrap();
        assert_eq!(
            (a.action, a.at, a.process),
            (Action::Release, Duration::from_secs(90), None)
        );
        let a = parse_action("cut@1500ms@2").unwrap();
        assert_eq!((a.action, a.process), (Action::Cut, Some(2)));
        assert!(parse_action("jump@1s").is_err());
        let mut s = Scenario::default();
        s.actions.push(a);
        assert!(s.to_cli_args().ends_with("--action cut@1500ms@2"));
        // A scenario without actions writes no `actions` key.
        assert!(!Scenario::default().to_toml().contains("actions"));
        let back = Scenario::from_toml(&s.to_toml()).unwrap();
        assert_eq!(back.actions, s.actions);
    }

    #[test]
    fn formatted_durations_parse_back() {
        for d in [0, 1, 250, 1_000, 1_500_000, 90_000_000, 900_000_000, 86_400_000_000] {
            let d = Duration::from_micros(d);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
