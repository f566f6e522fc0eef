//! Making ZooKeeper sessions. A `zookeeper_client::Client` is one session: after a terminal
//! state (`Expired`, `Closed`, `AuthFailed`) it is dead for good (its `StateWatcher` blocks
//! forever and its requests fail), so both discovery and registration react to expiry by
//! connecting a new client and rebuilding their state, with [`Backoff`] between attempts.

use std::time::Duration;

use rand::Rng;
use zookeeper_client as zk;

use crate::ZkSettings;

/// Connects a new session with the configured timeout.
///
/// Fails fast (`fail_eagerly`) once every server of the list refused, instead of blocking
/// for a whole session timeout: callers retry with [`Backoff`], and a dead ZooKeeper must not
/// hold up their shutdown or their first error.
pub(crate) async fn connect(settings: &ZkSettings) -> Result<zk::Client, zk::Error> {
    let mut connector = zk::Client::connector()
        .with_session_timeout(settings.session_timeout)
        .with_fail_eagerly();
    if let Some(auth) = &settings.auth {
        connector = connector.with_auth("digest", auth.as_bytes());
    }
    connector.connect(&settings.servers).await
}

/// ACLs of nodes a registration creates: open to all without a credential; with one, anyone
/// reads (proxies discover without credentials) and only the credential's holders write,
/// create children and delete.
pub(crate) fn acls(settings: &ZkSettings) -> zk::Acls<'static> {
    static PROTECTED: [zk::Acl; 2] = [
        zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
        zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
    ];
    if settings.auth.is_some() {
        zk::Acls::new(&PROTECTED)
    } else {
        zk::Acls::anyone_all()
    }
}

/// Whether a session in this state can never serve requests again.
pub(crate) fn is_terminal(state: zk::SessionState) -> bool {
    state.is_terminated()
}

/// Jittered exponential backoff between reconnect attempts: the delay grows from 200 ms to
/// 5 s, and each wait is drawn from `[delay / 2, delay]` so that many proxies losing the same
/// ZooKeeper do not come back in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

// === impl Backoff ===

impl Backoff {
    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Backoff { next: Self::MIN }
    }

    /// The delay to wait now; the following one will be about twice as long.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        rand::rng().random_range(ceiling / 2..=ceiling)
    }

    /// Starts again from the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_caps() {
        let mut backoff = Backoff::new();
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let second = backoff.next_delay();
        assert!(second >= Duration::from_millis(200) && second <= Duration::from_millis(400));
        for _ in 0..20 {
            assert!(backoff.next_delay() <= Backoff::MAX);
        }
        assert!(backoff.next_delay() >= Backoff::MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(200));
    }
}
