//! When a supervised worker that ended is started again (CONTRACT section 9, "LB
//! supervision"): 0.1 s after its first exit, twice as long after each further one, at most
//! 30 s; a worker that had been up 60 s starts over at 0.1 s. One per worker slot, so a
//! crash loop in one slot never slows down the others. Also spaces the retries of a
//! recycling replacement that failed to boot.

use std::time::Duration;

/// The first delay.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest delay.
pub const MAX: Duration = Duration::from_secs(30);
/// A worker up this long before it ended is restarted after [`FIRST`] again.
pub const RESET_AFTER: Duration = Duration::from_secs(60);

/// The restart delays of one worker slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartBackoff {
    next: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff { next: FIRST }
    }
}

// === impl RestartBackoff ===

impl RestartBackoff {
    /// A worker of this slot ended after `uptime`: how long to wait before starting the
    /// next one.
    pub fn after_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= RESET_AFTER {
            self.next = FIRST;
        }
        self.step()
    }

    /// The next delay of a retry (no uptime to consider), doubling the one after.
    pub fn step(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(MAX);
        delay
    }

    /// The delay the next exit or retry would get.
    pub fn peek(&self) -> Duration {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_from_a_tenth_of_a_second_to_thirty_seconds() {
        let mut backoff = RestartBackoff::default();
        let delays: Vec<_> = (0..12).map(|_| backoff.after_exit(ms(50))).collect();
        assert_eq!(
            delays,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(6400),
                ms(12_800),
                ms(25_600),
                ms(30_000),
                ms(30_000),
                ms(30_000),
            ]
        );
    }

    #[test]
    fn a_minute_up_starts_over() {
        let mut backoff = RestartBackoff::default();
        for _ in 0..5 {
            backoff.after_exit(Duration::from_secs(1));
        }
        assert_eq!(backoff.peek(), ms(3200));
        // Just short of a minute is still a crash loop.
        assert_eq!(backoff.after_exit(ms(59_999)), ms(3200));
        assert_eq!(backoff.after_exit(RESET_AFTER), FIRST);
        assert_eq!(backoff.after_exit(ms(10)), ms(200));
    }

    #[test]
    fn retries_double_too() {
        let mut backoff = RestartBackoff::default();
        assert_eq!((backoff.step(), backoff.step()), (ms(100), ms(200)));
        assert_eq!(backoff.peek(), ms(400));
    }
}
