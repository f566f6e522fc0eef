//! Making ZooKeeper sessions. A `zookeeper_client::Client` is one session: after a terminal
//! state (`Expired`, `Closed`, `AuthFailed`) it is dead for good (its `StateWatcher` blocks
//! forever and its requests fail), so both discovery and registration react to expiry by
//! connecting a new client and rebuilding their state, with [`Backoff`] between attempts.
//!
//! # Reconnecting promptly
//! While a session is disconnected the client library retries on its own, but its backoff
//! (`IterableEndpoints::timeout` in zookeeper-client 0.11) doubles from 100 ms without a cap
//! and with no option to set one: only its session deadline (1.4 session timeouts after
//! the last reply) bounds it, so it retries at about 0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 12.7 and
//! 25.5 s after the loss and finds a returning ZooKeeper up to ~13 s late. So once a session
//! has been disconnected for [`TAKEOVER_AFTER`], discovery and registration also try new
//! sessions themselves ([`take_over`]), with [`Backoff::reconnect`] (capped at 1 s), and
//! whichever comes first (the old session back, or a new one) wins.

use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{debug, warn};
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

/// ACLs of an LB's own ephemeral endpoint node (CONTRACT section 9, "ZooKeeper ACLs"): open
/// to all without a credential; with one, anyone reads (proxies discover without
/// credentials) and only the credential's holders write its data or its ACL.
///
/// ZooKeeper checks a delete against the *parent's* ACL, and the parents are open (see
/// [`DIRECTORY_ACLS`]): anyone may delete the node, and the registration then makes it again
/// on its live session.
pub(crate) fn endpoint_acls(settings: &ZkSettings) -> zk::Acls<'static> {
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

/// ACLs of every persistent parent a registration creates (`/zk`, `/zk/product`, the
/// product, `services` and the service directory): open to all (world:anyone, all
/// permissions), whatever `zk_auth` says. An LB of the same service without a credential (the
/// Go original, during a migration) or with another credential must still be able to create
/// its endpoint node, and another service its directory, whichever LB came first (CONTRACT
/// section 9, "ZooKeeper ACLs").
pub(crate) const DIRECTORY_ACLS: zk::Acls<'static> = zk::Acls::anyone_all();

/// Whether a session in this state can never serve requests again.
pub(crate) fn is_terminal(state: zk::SessionState) -> bool {
    state.is_terminated()
}

/// Resolves once `client`'s session is not connected (disconnected, or over for good).
///
/// A request made while a session is disconnected waits in the client and is sent when the
/// session reconnects, even after the client was dropped (then followed by closing the
/// session): so a session given up while disconnected may still write later. Racing a
/// session's writes against this lets a caller stop issuing them as soon as it is lost.
pub(crate) async fn until_disconnected(client: &zk::Client) {
    let mut state = client.state_watcher();
    while matches!(
        state.state(),
        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
    ) {
        // Never blocks on a terminal state: those end the loop before this wait.
        state.changed().await;
    }
}

/// How long a session may stay disconnected before new sessions are tried besides it. The
/// library's own first retries (up to 1.5 s after the loss) are as quick as ours; after
/// them its gaps grow past our cap.
pub(crate) const TAKEOVER_AFTER: Duration = Duration::from_secs(2);

/// Connects new sessions until one is established, waiting `backoff` between attempts.
/// The first failure of a run is logged as a warning, the others at debug level.
///
/// `backoff` is reset once connected: pass a [`Backoff::reconnect`] used for connecting
/// only, never one that also spaces out retries of failed calls (those would then be
/// retried at the shortest delay after every connect).
pub(crate) async fn connect_retrying(settings: &ZkSettings, backoff: &mut Backoff) -> zk::Client {
    let mut failing = false;
    loop {
        match connect(settings).await {
            Ok(client) => {
                backoff.reset();
                return client;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                if failing {
                    debug!(servers = %settings.servers, %err, ?delay, "zookeeper connect failed again");
                } else {
                    warn!(servers = %settings.servers, %err, ?delay, "cannot connect to zookeeper; retrying");
                    failing = true;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// For a session disconnected since `lost`: waits until it has been so for
/// [`TAKEOVER_AFTER`], then connects new sessions with [`Backoff::reconnect`] until one is
/// established, and returns it. Meant to be raced against the old session's state changes
/// (dropping it mid-way is fine: a session half made then holds no node, and expires).
pub(crate) async fn take_over(settings: &ZkSettings, lost: Instant) -> zk::Client {
    tokio::time::sleep_until((lost + TAKEOVER_AFTER).into()).await;
    debug!(
        after = ?lost.elapsed(),
        "zookeeper session still disconnected; trying new sessions too"
    );
    connect_retrying(settings, &mut Backoff::reconnect()).await
}

/// Jittered exponential backoff between attempts: the delay doubles from `min` up to
/// `max`, and each wait is drawn from `[delay / 2, delay]` so that many proxies losing the
/// same ZooKeeper do not come back in lockstep.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

// === impl Backoff ===

impl Backoff {
    /// Between connection attempts: 100 ms doubling to 1 s, so that a returning ZooKeeper
    /// is found within about a second whatever the outage's length.
    pub(crate) fn reconnect() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Between retries of calls that failed on a live connection (a server-side error that
    /// a quick retry would most likely meet again): 200 ms doubling to 5 s.
    pub(crate) fn retry() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }

    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay to wait now; the following one will be about twice as long.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        rand::rng().random_range(ceiling / 2..=ceiling)
    }

    /// Starts again from the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_grows_jittered_and_caps() {
        let mut backoff = Backoff::retry();
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let second = backoff.next_delay();
        assert!(second >= Duration::from_millis(200) && second <= Duration::from_millis(400));
        for _ in 0..20 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
        assert!(backoff.next_delay() >= Duration::from_millis(2500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(200));
    }

    #[test]
    fn reconnect_backoff_caps_at_one_second() {
        let mut backoff = Backoff::reconnect();
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        // Ceilings 200, 400 and 800 ms, then the 1 s cap: however long the outage, every
        // wait from then on is between 0.5 and 1 s.
        for _ in 0..3 {
            assert!(backoff.next_delay() <= Duration::from_millis(800));
        }
        for _ in 0..1000 {
            let delay = backoff.next_delay();
            assert!(
                delay >= Duration::from_millis(500) && delay <= Duration::from_secs(1),
                "{delay:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
