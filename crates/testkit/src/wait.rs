//! Bounded polling waits. A test states the condition it needs and how long it is willing to
//! wait for it; on timeout the wait panics at the caller's location (`#[track_caller]`).

use std::future::Future;
use std::panic::Location;
use std::time::{Duration, Instant};

/// How often a condition is checked again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The default patience of [`eventually!`](crate::eventually): `RPC_TEST_PATIENCE_MS`
/// milliseconds when set, otherwise 10 seconds (generous: CI boxes are noisy).
pub fn patience() -> Duration {
    std::env::var("RPC_TEST_PATIENCE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(10))
}

/// Polls `condition` (every 10 ms, blocking the thread) until it returns `true`.
///
/// Do not call this from inside a single-threaded async runtime whose tasks must make the
/// condition true; use [`wait_until_async`] there.
///
/// # Panics
/// When `condition` is still `false` after `timeout`.
#[track_caller]
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) {
    let caller = Location::caller();
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("condition not met within {timeout:?} (waiting at {caller})");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls the future made by `condition` (every 10 ms, on the tokio timer) until it yields
/// `true`.
///
/// # Panics
/// When the condition is still `false` after `timeout`; the message names the caller.
#[track_caller]
pub fn wait_until_async<F, Fut>(timeout: Duration, mut condition: F) -> impl Future<Output = ()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    // Captured here, synchronously: an `async fn` would lose the caller's location.
    let caller = Location::caller();
    async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition().await {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("condition not met within {timeout:?} (waiting at {caller})");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Blocks until a boolean expression holds: `eventually!(cond)` waits [`patience()`],
/// `eventually!(timeout, cond)` waits `timeout`. Panics (naming the expression) on timeout.
///
/// ```
/// use std::time::Duration;
/// let start = std::time::Instant::now();
/// rpc_testkit::eventually!(Duration::from_secs(5), start.elapsed() >= Duration::from_millis(20));
/// ```
#[macro_export]
macro_rules! eventually {
    ($timeout:expr, $cond:expr $(,)?) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = ::std::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!("`{}` not true within {:?}", stringify!($cond), timeout);
            }
            ::std::thread::sleep(::std::time::Duration::from_millis(10));
        }
    }};
    ($cond:expr $(,)?) => {
        $crate::eventually!($crate::patience(), $cond)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn wait_until_returns_once_true() {
        let calls = AtomicU32::new(0);
        wait_until(Duration::from_secs(5), || {
            calls.fetch_add(1, Ordering::Relaxed) >= 3
        });
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[test]
    #[should_panic(expected = "condition not met within")]
    fn wait_until_panics_on_timeout() {
        wait_until(Duration::from_millis(30), || false);
    }

    #[test]
    #[should_panic(expected = "not true within")]
    fn eventually_panics_with_expression() {
        crate::eventually!(Duration::from_millis(30), 1 + 1 == 3);
    }

    #[tokio::test]
    async fn wait_until_async_polls() {
        let calls = AtomicU32::new(0);
        wait_until_async(Duration::from_secs(5), || async {
            calls.fetch_add(1, Ordering::Relaxed) >= 2
        })
        .await;
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "condition not met within")]
    async fn wait_until_async_panics_on_timeout() {
        wait_until_async(Duration::from_millis(30), || async { false }).await;
    }
}
