//! The stop request ([`StopSignal`]): set by `stop()` callers (Python, a signal handler, the
//! tests), read by whoever reads the connection (which turns it into STOP) and by the connection
//! thread (which stops reconnecting and bounds the drain by the stop grace).

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::lock;

/// The stop request shared by `stop()` callers and the engine; remembers when it came.
#[derive(Debug, Default)]
pub struct StopSignal {
    /// When stop was first requested.
    at: Mutex<Option<Instant>>,
    /// Wakes backoff sleeps.
    changed: Condvar,
}

impl StopSignal {
    /// No stop requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a graceful stop; idempotent, callable from any thread.
    pub fn stop(&self) {
        let mut at = lock(&self.at);
        if at.is_none() {
            *at = Some(Instant::now());
        }
        self.changed.notify_all();
    }

    /// When stop was first requested, if it was.
    pub fn requested_at(&self) -> Option<Instant> {
        *lock(&self.at)
    }

    /// Whether stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested_at().is_some()
    }

    /// Sleeps up to `timeout`, waking early on a stop request. Returns whether stop was
    /// requested.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut at = lock(&self.at);
        while at.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            at = self
                .changed
                .wait_timeout(at, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn stop_signal_wakes_waiters() {
        let signal = Arc::new(StopSignal::new());
        assert!(!signal.wait(Duration::from_millis(10)));
        let waiter = {
            let signal = Arc::clone(&signal);
            std::thread::spawn(move || signal.wait(Duration::from_secs(10)))
        };
        signal.stop();
        let first = signal.requested_at();
        signal.stop();
        assert_eq!(signal.requested_at(), first, "idempotent");
        assert!(waiter.join().unwrap());
    }
}
