//! The errors of the public API.

use pgiplock_core::{ConfigError, DbError, NameError};

/// Everything that can go wrong when using a [`Session`](crate::Session) or a
/// [`PgIpLock`](crate::PgIpLock).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A channel, schema or application name that PostgreSQL would truncate or reject.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// Lock options that cannot work together.
    #[error("invalid lock options: {0}")]
    InvalidOptions(#[from] ConfigError),
    /// The first connection to the server failed.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// Creating or checking the lock schema failed (for example for lack of privileges).
    #[error("cannot set up lock schema {schema:?}: {error}")]
    Bootstrap {
        /// The schema.
        schema: String,
        /// What the server said.
        #[source]
        error: DbError,
    },
    /// A database statement failed.
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The session already has a lock on this channel (one session is one holder identity).
    #[error("this session already has a lock on channel {channel:?}")]
    DuplicateLock {
        /// The channel.
        channel: String,
    },
    /// The session was closed or the lock destroyed.
    #[error("the session is closed or the lock was destroyed")]
    Closed,
}

impl Error {
    /// Whether the server refused for lack of privileges (SQLSTATE 42501).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Error::Bootstrap { error, .. } => matches!(error, DbError::PermissionDenied(_)),
            Error::Database(e) | Error::Connect(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
            }
            _ => false,
        }
    }
}
