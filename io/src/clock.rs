//! The seam between tokio's monotonic clock and the core's [`Timestamp`].

use std::time::Duration;

use pgiplock_core::Timestamp;
use tokio::time::Instant;

/// Converts between `tokio::time::Instant` and core timestamps, relative to an origin taken when
/// the session starts (so timestamps stay small and never negative).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose origin is now.
    pub(crate) fn start() -> Self {
        Clock { origin: Instant::now() }
    }

    /// The current time as a core timestamp.
    pub(crate) fn now(&self) -> Timestamp {
        self.timestamp(Instant::now())
    }

    /// `instant` as a core timestamp (instants before the origin clamp to zero).
    pub(crate) fn timestamp(&self, instant: Instant) -> Timestamp {
        let since = instant.saturating_duration_since(self.origin);
        Timestamp::from_micros(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
    }

    /// The tokio instant of a core timestamp; far-future deadlines are capped at one year, which
    /// keeps tokio's timer arithmetic away from overflow.
    pub(crate) fn instant(&self, at: Timestamp) -> Instant {
        const FAR: Duration = Duration::from_secs(365 * 24 * 3600);
        let offset = Duration::from_micros(at.as_micros()).min(FAR + self.origin.elapsed());
        self.origin + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() {
        let clock = Clock::start();
        let t = Timestamp::from_millis(1_500);
        assert_eq!(clock.timestamp(clock.instant(t)), t);
        assert!(clock.instant(Timestamp::MAX) > Instant::now());
    }
}
