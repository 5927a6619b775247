//! Validated names: channels, application names (holder identities) and schemas.
//!
//! PostgreSQL truncates identifiers longer than 63 bytes in `LISTEN` but refuses them in
//! `pg_notify`, and truncates `application_name` silently. Every such name is checked here, once,
//! at construction, so nothing that Postgres would mangle ever reaches SQL.

use std::fmt;

use crate::Protocol;

/// Longest identifier PostgreSQL keeps intact (`NAMEDATALEN - 1`).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Prefix of the lock channel that carries release (and, under `Lease`, acquisition)
/// notifications. Shared with `@imqueue/pg-pubsub`.
pub const LOCK_CHANNEL_PREFIX: &str = "__PgIpLock__:";

/// Prefix of the drain channel that carries a `Classic` holder's drain marker. Node's
/// `@imqueue/pg-pubsub` reads every notification on the lock channel as a release, so the marker
/// travels where only our sessions listen. As long as [`LOCK_CHANNEL_PREFIX`], so that one channel
/// limit covers both.
pub const DRAIN_CHANNEL_PREFIX: &str = "__PgIpDrain_:";

const _: () = assert!(DRAIN_CHANNEL_PREFIX.len() == LOCK_CHANNEL_PREFIX.len());

/// Longest user channel name: the lock channel `__PgIpLock__:<channel>` (and the drain channel
/// `__PgIpDrain_:<channel>`) must fit in 63 bytes.
pub const MAX_CHANNEL_BYTES: usize = MAX_IDENTIFIER_BYTES - LOCK_CHANNEL_PREFIX.len();

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// Which kind of name.
        kind: &'static str,
    },
    /// The name is longer than PostgreSQL keeps.
    #[error("{kind} name {name:?} is {len} bytes; at most {max} bytes are allowed{hint}")]
    TooLong {
        /// Which kind of name.
        kind: &'static str,
        /// The refused name.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
        /// Extra explanation.
        hint: &'static str,
    },
    /// The name contains a NUL byte, which no PostgreSQL string can hold.
    #[error("{kind} name contains a NUL byte")]
    Nul {
        /// Which kind of name.
        kind: &'static str,
    },
    /// An application name must be printable ASCII.
    #[error("application name {name:?} must be printable ASCII (0x20..=0x7e)")]
    NotPrintableAscii {
        /// The refused name.
        name: String,
    },
    /// The channel already carries the lock-channel or drain-channel prefix.
    #[error("channel name {name:?} starts with the reserved prefix {prefix:?}")]
    ReservedPrefix {
        /// The refused name.
        name: String,
        /// The prefix it starts with.
        prefix: &'static str,
    },
}

fn check_identifier(kind: &'static str, name: &str, max: usize, hint: &'static str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.contains('\0') {
        return Err(NameError::Nul { kind });
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            name: name.to_owned(),
            len: name.len(),
            max,
            hint,
        });
    }
    Ok(())
}

/// A `LISTEN` channel whose lock channel fits PostgreSQL's identifier limit.
///
/// Any UTF-8 text without NUL works (quotes, spaces, upper case): it is always quoted as an
/// identifier or bound as a parameter.
///
/// ```
/// use pgiplock_core::ChannelName;
/// let c = ChannelName::new("Orders \"EU\" ✓").unwrap();
/// assert_eq!(c.lock_channel(), "__PgIpLock__:Orders \"EU\" ✓");
/// assert_eq!(c.drain_channel(), "__PgIpDrain_:Orders \"EU\" ✓");
/// assert!(ChannelName::new("").is_err());
/// assert!(ChannelName::new(&"x".repeat(51)).is_err());
/// ```
#[derive(Clone)]
pub struct ChannelName {
    /// Shared: a session keeps several copies of each of its locks' names (the lock, its
    /// operations' targets, the handles), and a clone costs a reference count. The three
    /// names live in one string, `__PgIpLock__:<name>__PgIpDrain_:<name>`: both prefixes are
    /// [`PREFIX_BYTES`] long, so each name is a slice of it found by arithmetic.
    names: std::sync::Arc<Box<str>>,
}

/// The length of both lock-channel prefixes.
const PREFIX_BYTES: usize = LOCK_CHANNEL_PREFIX.len();
const _: () = assert!(LOCK_CHANNEL_PREFIX.len() == DRAIN_CHANNEL_PREFIX.len());

impl ChannelName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        check_identifier(
            "channel",
            name,
            MAX_CHANNEL_BYTES,
            " (the lock channel \"__PgIpLock__:<channel>\" must fit in 63 bytes)",
        )?;
        if let Some(prefix) = [LOCK_CHANNEL_PREFIX, DRAIN_CHANNEL_PREFIX]
            .into_iter()
            .find(|prefix| name.starts_with(prefix))
        {
            return Err(NameError::ReservedPrefix {
                name: name.to_owned(),
                prefix,
            });
        }
        let names = format!("{LOCK_CHANNEL_PREFIX}{name}{DRAIN_CHANNEL_PREFIX}{name}");
        Ok(ChannelName {
            names: std::sync::Arc::new(names.into_boxed_str()),
        })
    }

    /// The byte length of the user's channel name.
    fn name_len(&self) -> usize {
        self.names.len() / 2 - PREFIX_BYTES
    }

    /// The user's channel, as given.
    pub fn as_str(&self) -> &str {
        &self.names[PREFIX_BYTES..PREFIX_BYTES + self.name_len()]
    }

    /// The channel that carries this lock's release notifications (and, under `Lease`, its
    /// acquisition and drain markers).
    pub fn lock_channel(&self) -> &str {
        &self.names[..PREFIX_BYTES + self.name_len()]
    }

    /// The channel that carries a `Classic` holder's drain marker (Node does not listen to it).
    pub fn drain_channel(&self) -> &str {
        &self.names[PREFIX_BYTES + self.name_len()..]
    }

    /// The channels a session of `protocol` listens to for this lock: the channel itself, its
    /// lock channel and, under `Classic`, its drain channel.
    ///
    /// ```
    /// use pgiplock_core::{ChannelName, Protocol};
    /// let c = ChannelName::new("jobs").unwrap();
    /// assert_eq!(c.listened(Protocol::Lease).count(), 2);
    /// assert_eq!(
    ///     c.listened(Protocol::Classic).collect::<Vec<_>>(),
    ///     ["jobs", "__PgIpLock__:jobs", "__PgIpDrain_:jobs"]
    /// );
    /// ```
    pub fn listened(&self, protocol: Protocol) -> impl Iterator<Item = &str> {
        let drain = (protocol == Protocol::Classic).then_some(self.drain_channel());
        [Some(self.as_str()), Some(self.lock_channel()), drain]
            .into_iter()
            .flatten()
    }
}

/// Compared as its name (the other two are derived from it).
impl PartialEq for ChannelName {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names
    }
}

impl Eq for ChannelName {}

/// Ordered as its name, consistently with `Borrow<str>`, so maps keyed by channel can be
/// searched by name.
impl Ord for ChannelName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for ChannelName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Hashed as its name, consistently with `Borrow<str>`.
impl std::hash::Hash for ChannelName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

/// Ordered and hashed as its name (the other two are derived from it), so maps keyed by
/// channel can be searched by name.
impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session's `application_name`: the identity a holder writes into the lock table.
///
/// ```
/// use pgiplock_core::AppName;
/// assert!(AppName::new("worker-1").is_ok());
/// assert!(AppName::new("wörker").is_err());
/// assert!(AppName::new(&"a".repeat(64)).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppName(String);

impl AppName {
    /// Validates `name`: 1 to 63 bytes of printable ASCII.
    pub fn new(name: &str) -> Result<Self, NameError> {
        check_identifier(
            "application",
            name,
            MAX_IDENTIFIER_BYTES,
            " (PostgreSQL truncates longer application names)",
        )?;
        if !name.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(NameError::NotPrintableAscii { name: name.to_owned() });
        }
        Ok(AppName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A schema name for the lock tables.
///
/// ```
/// use pgiplock_core::SchemaName;
/// assert_eq!(SchemaName::new("pgip_lock").unwrap().as_str(), "pgip_lock");
/// assert!(SchemaName::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchemaName(std::sync::Arc<str>);

impl SchemaName {
    /// Validates `name`: 1 to 63 bytes, no NUL.
    pub fn new(name: &str) -> Result<Self, NameError> {
        check_identifier("schema", name, MAX_IDENTIFIER_BYTES, "")?;
        // Shared by the copies a session keeps of it (a clone costs a reference count).
        Ok(SchemaName(std::sync::Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quotes `ident` as a PostgreSQL identifier (`"a""b"`), for names already validated.
///
/// ```
/// assert_eq!(pgiplock_core::quote_ident("a\"b"), "\"a\"\"b\"");
/// ```
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for ch in ident.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_names_come_back_whole_and_order_follows_the_name() {
        for name in [
            "a",
            "jobs",
            "Orders \"EU\" ✓",
            "__PgIpLock",
            "x_PgIpDrain_:y",
            &"é".repeat(25),
        ] {
            let c = ChannelName::new(name).unwrap();
            assert_eq!(c.as_str(), name);
            assert_eq!(c.lock_channel(), format!("{LOCK_CHANNEL_PREFIX}{name}"));
            assert_eq!(c.drain_channel(), format!("{DRAIN_CHANNEL_PREFIX}{name}"));
            assert_eq!(c.to_string(), name);
            assert_eq!(format!("{c:?}"), format!("{name:?}"));
        }
        // Ordered as the names are, whatever follows a name inside the shared string.
        let names = ["ab", "abA", "ab_", "ab\u{7f}", "b", "A", "a"];
        let mut channels: Vec<ChannelName> = names.iter().map(|n| ChannelName::new(n).unwrap()).collect();
        channels.sort();
        let mut sorted = names.to_vec();
        sorted.sort();
        assert_eq!(channels.iter().map(ChannelName::as_str).collect::<Vec<_>>(), sorted);
        let map: std::collections::BTreeMap<ChannelName, usize> = channels.into_iter().zip(0..).collect();
        for name in names {
            assert!(map.contains_key(name), "{name} is found by its name");
        }
        assert_eq!(ChannelName::new("ab").unwrap(), ChannelName::new("ab").unwrap());
        assert_ne!(ChannelName::new("ab").unwrap(), ChannelName::new("abA").unwrap());
    }

    #[test]
    fn channel_limits() {
        assert!(ChannelName::new(&"x".repeat(MAX_CHANNEL_BYTES)).is_ok());
        assert!(matches!(
            ChannelName::new(&"x".repeat(MAX_CHANNEL_BYTES + 1)),
            Err(NameError::TooLong { .. })
        ));
        // 17 three-byte characters are 51 bytes although only 17 chars.
        assert!(ChannelName::new(&"✓".repeat(17)).is_err());
        assert!(matches!(ChannelName::new("a\0b"), Err(NameError::Nul { .. })));
        assert!(matches!(
            ChannelName::new("__PgIpLock__:x"),
            Err(NameError::ReservedPrefix { .. })
        ));
        assert!(matches!(
            ChannelName::new("__PgIpDrain_:x"),
            Err(NameError::ReservedPrefix { .. })
        ));
        let longest = ChannelName::new(&"x".repeat(MAX_CHANNEL_BYTES)).unwrap();
        assert_eq!(longest.drain_channel().len(), MAX_IDENTIFIER_BYTES);
        assert_eq!(MAX_CHANNEL_BYTES, 50);
    }

    #[test]
    fn app_limits() {
        assert!(AppName::new(&"a".repeat(63)).is_ok());
        assert!(AppName::new("tab\there").is_err());
        assert!(AppName::new("").is_err());
    }
}
