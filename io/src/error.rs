//! The errors of the public API.

use std::time::Duration;

use pgiplock_core::{CallError, ConfigError, DbError, NameError};

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
    /// No connection attempt completed within the connect timeout (TCP, TLS, startup,
    /// authentication and the identity query together).
    #[error("cannot connect to PostgreSQL: no answer within the connect timeout of {timeout:?}")]
    ConnectTimeout {
        /// The connect timeout in force.
        timeout: Duration,
    },
    /// The session is not connected now: the connection attempt in progress failed. The lock
    /// keeps competing in the background and is set up when the connection returns.
    #[error("not connected to PostgreSQL: {cause}")]
    Disconnected {
        /// Why the attempt failed.
        cause: String,
    },
    /// The server refuses writes (a hot standby, or `default_transaction_read_only`).
    #[error("the server is read-only (SQLSTATE 25006): locks need a writable primary")]
    ReadOnly,
    /// The session task ended abnormally; every lock of the session is gone with it.
    #[error("the session ended: {cause}")]
    SessionEnded {
        /// What ended it.
        cause: String,
    },
    /// Session options that cannot work.
    #[error("invalid session options: {name} of {value:?} is below the minimum of {min:?}")]
    InvalidSessionOptions {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: Duration,
        /// The floor.
        min: Duration,
    },
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Bootstrap { schema, error } => Error::Bootstrap { schema, error },
            CallError::ReadOnly => Error::ReadOnly,
            CallError::Disconnected { cause } => Error::Disconnected { cause },
            _ => Error::Closed,
        }
    }
}

/// A driver error in one line: the server's message and SQLSTATE, or the client's words with
/// their cause ("error connecting to server: Connection refused (os error 111)").
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
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
