//! The errors of the public API.

use std::fmt;
use std::time::Duration;

use pgiplock_core::CallError;
pub use pgiplock_core::{ConfigError, DbError, NameError};

/// Everything that can go wrong when using a [`Session`](crate::Session) or a
/// [`PgIpLock`](crate::PgIpLock).
///
/// The message of a driver error says why, as [`PgError`] renders it (the server's message and
/// SQLSTATE, or the driver's cause); [`Error::postgres`] gives the driver's error itself.
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
    // No `#[source]`: the message already holds the driver's error and its cause, and a chain
    // printer would only repeat them ("db error", "FATAL: ...").
    #[error("cannot connect to PostgreSQL: {}", Why(.0))]
    Connect(tokio_postgres::Error),
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
    // No `#[source]`, as for `Connect`.
    #[error("database error: {}", Why(.0))]
    Database(tokio_postgres::Error),
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
    /// A release reached its drain marker (nothing more was delivered) but the server did not
    /// confirm it; see [`LockMessage::ReleaseFailed`](crate::LockMessage::ReleaseFailed).
    #[error("the release was not confirmed: {}", reason.as_str())]
    ReleaseFailed {
        /// Why.
        reason: pgiplock_core::LostReason,
    },
    /// The server refuses writes (a hot standby, or `default_transaction_read_only`).
    #[error("the server is read-only (SQLSTATE 25006): locks need a writable primary")]
    ReadOnly,
    /// Every server the first connection reached was a standby in recovery or refused writes,
    /// for as long as [`SessionOptions::wait_for_writable`](crate::SessionOptions::wait_for_writable)
    /// allowed.
    #[error("no writable server: {cause}")]
    NotWritable {
        /// The last attempt's finding, naming the host.
        cause: String,
    },
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
            CallError::ReleaseFailed { reason } => Error::ReleaseFailed { reason },
            _ => Error::Closed,
        }
    }
}

/// A driver error in one line, as [`PgError`] renders it.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    Why(error).to_string()
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Database(e)
    }
}

impl Error {
    /// Whether the server refused for lack of privileges (SQLSTATE 42501).
    pub fn is_permission_denied(&self) -> bool {
        self.sqlstate() == Some("42501")
    }

    /// The SQLSTATE the server sent, if the server refused (for example `28P01` for a wrong
    /// password, `3D000` for a missing database, `42501` for a missing privilege).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Bootstrap { error, .. } => error.sqlstate(),
            Error::Connect(e) | Error::Database(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// The driver's error behind [`Error::Connect`] and [`Error::Database`].
    pub fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Error::Connect(e) | Error::Database(e) => Some(e),
            _ => None,
        }
    }
}

/// A tokio-postgres error whose message says why.
///
/// tokio-postgres prints a server's refusal as the bare `db error` and a failed connection as
/// `error connecting to server`, leaving the reason to the source chain. `PgError` prints the
/// server's message with its SQLSTATE (and its detail and hint), or the driver's message with
/// its cause, on one line:
///
/// - `password authentication failed for user "x" (SQLSTATE 28P01)`
/// - `error connecting to server: Connection refused (os error 111)`
///
/// Its [`source`](std::error::Error::source) skips what the message already shows, so a chain
/// printer states each fact once.
///
/// ```no_run
/// # async fn run() {
/// let config: tokio_postgres::Config = "postgres://postgres@127.0.0.1:5432/test".parse().unwrap();
/// if let Err(e) = config.connect(tokio_postgres::NoTls).await {
///     let e = pgiplock::PgError::from(e);
///     eprintln!("cannot connect: {e}"); // not "cannot connect: db error"
///     if e.code() == Some("28P01") {
///         eprintln!("check the password");
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct PgError(tokio_postgres::Error);

impl PgError {
    /// The SQLSTATE, when the server refused.
    pub fn code(&self) -> Option<&str> {
        self.0.code().map(|c| c.code())
    }

    /// The server's error, when the server refused.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.0.as_db_error()
    }

    /// The driver's error.
    pub fn get_ref(&self) -> &tokio_postgres::Error {
        &self.0
    }

    /// The driver's error, by value.
    pub fn into_inner(self) -> tokio_postgres::Error {
        self.0
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgError(e)
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Why(&self.0).fmt(f)
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The message shows the driver's error and its cause; what follows is the cause's cause.
        std::error::Error::source(&self.0).and_then(|cause| cause.source())
    }
}

/// Renders a driver error as [`PgError`] does, without taking it.
pub(crate) struct Why<'a>(pub(crate) &'a tokio_postgres::Error);

impl fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            // Without the severity ("FATAL", "ERROR"): the SQLSTATE classifies it better.
            write!(f, "{} (SQLSTATE {})", db.message(), db.code().code())?;
            if let Some(detail) = db.detail() {
                write!(f, "; detail: {detail}")?;
            }
            if let Some(hint) = db.hint() {
                write!(f, "; hint: {hint}")?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        if let Some(cause) = std::error::Error::source(self.0) {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}
