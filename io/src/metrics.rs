//! Metrics through the `metrics` facade: nothing is recorded unless the application installs a
//! recorder (an exporter of its choice). The names are listed in the README's "Metrics".

use std::time::Duration;

/// Terms begun (`channel`).
pub(crate) const TERMS_STARTED: &str = "pgiplock_terms_started_total";
/// Terms ended (`channel`, `reason`: `released`, `stopped`, `session_ended` or a lost reason
/// such as `lease_expired`, `superseded`, `session_lost`, `request_timeout`).
pub(crate) const TERMS_ENDED: &str = "pgiplock_terms_ended_total";
/// How long terms lasted, in seconds (`channel`).
pub(crate) const TERM_SECONDS: &str = "pgiplock_term_seconds";
/// From a peer's release notification to this process's acquisition, in seconds (`channel`).
pub(crate) const HANDOVER_SECONDS: &str = "pgiplock_handover_seconds";
/// From the moment this process knew the previous holder gone to its acquisition, in seconds
/// (`channel`): a release notification it heard, or for a takeover the lease's end as the
/// server last reported it (the winning attempt's sending when that came first).
pub(crate) const FAILOVER_SECONDS: &str = "pgiplock_failover_seconds";
/// Messages handed to the application (`channel`, `replay`: `true` for takeover replays).
pub(crate) const MESSAGES: &str = "pgiplock_messages_delivered_total";
/// Messages a takeover could not replay: the replay buffer had overflowed (`channel`).
pub(crate) const GAP_MESSAGES: &str = "pgiplock_replay_gap_messages_total";
/// Lock-channel markers ignored because their sender was not the term's holder (`channel`).
pub(crate) const IGNORED_MARKERS: &str = "pgiplock_ignored_markers_total";
/// Connections established (the first one and every reconnection).
pub(crate) const CONNECTIONS: &str = "pgiplock_connections_total";
/// Reconnections: connections established after the first one of a session.
pub(crate) const RECONNECTS: &str = "pgiplock_reconnects_total";
/// Connections lost (`reason`).
pub(crate) const SESSIONS_LOST: &str = "pgiplock_sessions_lost_total";
/// Database request latency, in seconds (`op`: `acquire`, `renew`, `release`, `bootstrap`, …).
pub(crate) const REQUEST_SECONDS: &str = "pgiplock_request_seconds";

pub(crate) fn term_started(channel: &str) {
    metrics::counter!(TERMS_STARTED, "channel" => channel.to_owned()).increment(1);
}

pub(crate) fn term_ended(channel: &str, reason: &'static str, lasted: Duration) {
    metrics::counter!(TERMS_ENDED, "channel" => channel.to_owned(), "reason" => reason).increment(1);
    metrics::histogram!(TERM_SECONDS, "channel" => channel.to_owned()).record(lasted.as_secs_f64());
}
