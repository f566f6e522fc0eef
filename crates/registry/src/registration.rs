//! The LB's side: [`Registration`] creates the LB's ephemeral endpoint node and keeps it.
//!
//! An ephemeral node lives as long as the session that made it. A background task (the
//! keeper) follows that session: a reconnect within the session needs nothing (the node is
//! still there); after expiry it connects a new session, which makes the node again, until
//! it succeeds or the registration is dropped. `deregister` deletes the node and closes the
//! session; dropping the registration closes the session, which also removes the node.
//!
//! # Guarding the node
//! While its session is connected the keeper holds an exists-watch on the node, and makes
//! the node again whenever it is found gone: deleted by hand, or by a delete that one of
//! this registration's own abandoned sessions sent late (see below). The same loop makes the
//! node on a new session, so every failed create (a refused ACL, say) is retried on the live
//! session with [`Backoff::retry`] (200 ms doubling to 5 s; reset only once the node
//! stands), never by opening new sessions. Once a session has owned the node, a node of
//! another live session found in its place (another LB with the same address, an operator)
//! is left alone: the registration says it is not registered and waits for that node to go.
//!
//! # Late writes of abandoned sessions
//! A request made while a session is disconnected waits in the client and is sent when that
//! session reconnects, even if the client was dropped meanwhile. A session given up while
//! disconnected (a lookout, see below, or a session replaced by one) may so delete the node
//! seconds after a newer session made it. Hence: nodes are only deleted after a check of
//! their owner (a delete is sent right after a reply, on a live connection), lookouts are
//! given up as soon as they are disconnected, and the guard above heals what is left.
//!
//! # Prompt recovery
//! The library's own reconnect backoff grows without bound (see `session`), and it learns
//! that the server expired its session only when it reaches the server again, or at its own
//! deadline (1.4 session timeouts after the loss). So once the session has been
//! disconnected for `session::TAKEOVER_AFTER`, the task also connects a *lookout* session
//! with a capped backoff. Through it, it checks the node: still owned by the old session,
//! the old session is alive on the server and the node stands, so the lookout only watches
//! it (no needless re-creation, which proxies would see as the endpoint leaving and coming
//! back); gone or not ours, the old session is lost, and the node is made again at once
//! with the lookout, which becomes the registration's session. Whichever comes first wins:
//! the old session reconnecting drops the lookout.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use crate::session::{self, Backoff};
use crate::{EndpointInfo, RegistryError, ZkSettings, endpoint_path, service_path};

/// How many times a create that races with another creator of the same node is retried.
const CREATE_ATTEMPTS: usize = 3;

/// An LB's ephemeral endpoint node, kept registered until [`Registration::deregister`].
pub struct Registration {
    /// The endpoint node.
    path: String,
    /// Whether the node is believed to exist: set after each successful create, cleared when
    /// the session that made it expires or the node is found gone.
    registered: Arc<AtomicBool>,
    /// Stops the keeper task.
    cancel: CancellationToken,
    /// The keeper task; it hands back its live client (if any) when cancelled.
    keeper: Option<JoinHandle<Option<zk::Client>>>,
    /// For the final delete: its bound (the session timeout) and, when the keeper's session
    /// is disconnected, a fresh session to delete through.
    settings: ZkSettings,
}

// === impl Registration ===

impl Registration {
    /// Creates the node `/zk/product/<product>/services/<info.service>/<info.service_id>`
    /// (parents persistent and created when missing; a stale node of an earlier session is
    /// deleted first) and keeps it: after a session expiry, or when the node is deleted
    /// under its live session, it registers again by itself.
    ///
    /// # Errors
    /// [`RegistryError`] if the first registration fails.
    pub async fn register(
        settings: ZkSettings,
        product: String,
        info: EndpointInfo,
    ) -> Result<Self, RegistryError> {
        let node = Node {
            path: endpoint_path(&product, &info.service, &info.service_id),
            parent: service_path(&product, &info.service),
            data: serde_json::to_vec(&info)?,
            acls: session::endpoint_acls(&settings),
        };
        let client =
            session::connect(&settings)
                .await
                .map_err(|source| RegistryError::Connect {
                    servers: settings.servers.clone(),
                    source,
                })?;
        node.create(&client, Stale::Replace).await?;
        info!(path = %node.path, session = %client.session_id(), "registered");
        let path = node.path.clone();
        let registered = Arc::new(AtomicBool::new(true));
        let cancel = CancellationToken::new();
        let keeper = Keeper {
            settings: settings.clone(),
            node,
            registered: registered.clone(),
            cancel: cancel.clone(),
        };
        let keeper = tokio::spawn(keeper.run(client));
        Ok(Registration {
            path,
            registered,
            cancel,
            keeper: Some(keeper),
            settings,
        })
    }

    /// Whether the node is believed to exist now. Stays `true` while disconnected (the node
    /// lives as long as its session); `false` from a session expiry, or from the node found
    /// gone or held by another session, until registered again.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// The endpoint node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Deletes the node (if the registration's session owns it) and closes the session.
    /// When the session is disconnected, the delete goes through a fresh session instead, so
    /// that a ZooKeeper that is back is not kept waiting for the old session's own reconnect
    /// (and no delete stays queued in the old session). When the session is over already
    /// (expired, closed), there is nothing to delete: its node went with it. Bounded by the
    /// session timeout.
    ///
    /// # Errors
    /// [`RegistryError`] if the delete failed while the session that owns the node lives.
    pub async fn deregister(mut self) -> Result<(), RegistryError> {
        self.cancel.cancel();
        self.registered.store(false, Ordering::Release);
        let client = match self.keeper.take() {
            Some(keeper) => keeper.await.unwrap_or_else(|err| {
                warn!(%err, "registration keeper task failed");
                None
            }),
            None => None,
        };
        // No live session: the node is gone already, or goes with the old session. A client
        // may come back over (the cancel and its expiry seen together): the same.
        let Some(client) = client.filter(|client| !session::is_terminal(client.state())) else {
            return Ok(());
        };
        let owner = client.session_id();
        let zk_error = |source| RegistryError::Zk {
            op: "delete",
            path: self.path.clone(),
            source,
        };
        let delete = async {
            if client.state() != zk::SessionState::Disconnected {
                return delete_owned(&client, &self.path, owner).await;
            }
            let mut backoff = Backoff::reconnect();
            let fresh = session::connect_retrying(&self.settings, &mut backoff).await;
            delete_owned(&fresh, &self.path, owner).await
        };
        let result = match tokio::time::timeout(self.settings.session_timeout, delete).await {
            Ok(Ok(())) => Ok(()),
            // The session ended meanwhile: its node went with it.
            Ok(Err(_)) | Err(_) if session::is_terminal(client.state()) => Ok(()),
            Ok(Err(err)) => Err(zk_error(err)),
            Err(_) => Err(zk_error(zk::Error::Timeout)),
        };
        if result.is_ok() {
            info!(path = %self.path, "deregistered");
        }
        // Dropping the last clone of the client closes the session (a disconnected one once it
        // reaches a server, or it expires).
        drop(client);
        result
    }
}

impl Drop for Registration {
    /// Stops the keeper task; its client closes the session, which removes the node.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The endpoint node a registration keeps, and how to make it.
struct Node {
    path: String,
    /// The service node (persistent; made with its parents when missing).
    parent: String,
    /// The endpoint JSON.
    data: Vec<u8>,
    /// ACLs of the endpoint node only (protected with `zk_auth`); its parents are open.
    acls: zk::Acls<'static>,
}

/// What [`Node::create`] does with a node of another session in the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stale {
    /// Delete it: a stale node of an earlier session (CONTRACT section 3).
    Replace,
    /// Leave it, and fail with `NodeExists`.
    Keep,
}

// === impl Node ===

impl Node {
    /// Makes the parents (persistent, open to all: see [`session::DIRECTORY_ACLS`]) and the
    /// ephemeral node (with the registration's ACLs), owned by `client`'s session.
    /// Succeeds at once when that session owns the node already (it only ever writes this
    /// node's data). A node of another session is handled as `stale` says. Its owner is
    /// checked before it is deleted, and the delete is conditional on the version seen, so
    /// that only that very node goes.
    async fn create(&self, client: &zk::Client, stale: Stale) -> Result<(), RegistryError> {
        let dir = zk::CreateMode::Persistent.with_acls(session::DIRECTORY_ACLS);
        client
            .mkdir(&self.parent, &dir)
            .await
            .map_err(|source| RegistryError::Zk {
                op: "mkdir",
                path: self.parent.clone(),
                source,
            })?;
        let own = client.session_id().0;
        let node = zk::CreateMode::Ephemeral.with_acls(self.acls);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let stat = client
                .check_stat(&self.path)
                .await
                .map_err(|source| self.error("exists", source))?;
            match stat {
                None => {}
                Some(stat) if stat.ephemeral_owner == own => return Ok(()),
                Some(_) if stale == Stale::Keep => {
                    return Err(self.error("create", zk::Error::NodeExists));
                }
                Some(stat) => match client.delete(&self.path, Some(stat.version)).await {
                    Ok(()) => {
                        let owner = zk::SessionId(stat.ephemeral_owner);
                        debug!(path = %self.path, %owner, "deleted stale endpoint node");
                    }
                    Err(zk::Error::NoNode) => {}
                    // Rewritten meanwhile: look at it again.
                    Err(zk::Error::BadVersion) if attempt < CREATE_ATTEMPTS => continue,
                    Err(source) => return Err(self.error("delete", source)),
                },
            }
            match client.create(&self.path, &self.data, &node).await {
                Ok(_) => return Ok(()),
                // Someone created it between our check and create: look at it again.
                Err(zk::Error::NodeExists) if attempt < CREATE_ATTEMPTS => continue,
                Err(source) => return Err(self.error("create", source)),
            }
        }
    }

    fn error(&self, op: &'static str, source: zk::Error) -> RegistryError {
        RegistryError::Zk {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

/// Deletes the node at `path` if the session `owner` owns it; a node of another session is
/// left alone (a newer registration's, or another LB's). The delete is sent right after the
/// owner check's reply, so it is not left queued in a disconnected session.
async fn delete_owned(
    client: &zk::Client,
    path: &str,
    owner: zk::SessionId,
) -> Result<(), zk::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(stat) = client.check_stat(path).await? else {
            return Ok(());
        };
        if stat.ephemeral_owner != owner.0 {
            debug!(%path, owner = %zk::SessionId(stat.ephemeral_owner), "endpoint node not ours; left alone");
            return Ok(());
        }
        match client.delete(path, Some(stat.version)).await {
            Ok(()) | Err(zk::Error::NoNode) => return Ok(()),
            Err(zk::Error::BadVersion) if attempt < CREATE_ATTEMPTS => continue,
            Err(err) => return Err(err),
        }
    }
}

/// The background task that keeps the node registered across session expiry.
struct Keeper {
    settings: ZkSettings,
    node: Node,
    registered: Arc<AtomicBool>,
    cancel: CancellationToken,
}

/// How a registration's session ended.
enum Lost {
    /// Expired, closed or auth failed: register again with a new session.
    Over,
    /// Replaced by this new session, which has registered the node already.
    Replaced(zk::Client),
    /// The registration was cancelled.
    Cancelled,
}

/// What the lookout session found.
enum Lookout {
    /// The old session's node is gone (or not ours): the lookout registered it again.
    Registered,
    /// The lookout itself failed (or was disconnected): make another one.
    Failed,
}

/// What the guard of one session remembers across that session's disconnects.
struct Guard {
    /// Whether this session has owned the node. From then on a node of another session in
    /// its place is left alone; before, it is a stale one and is replaced.
    held: bool,
    /// Between failed attempts. Not reset by reconnects: only by the node standing.
    retry: Backoff,
    /// Whether the last attempt failed (the first failure of a run is a warning).
    failing: bool,
}

// === impl Keeper ===

impl Keeper {
    /// Runs until cancelled; returns the live client then (`None` while reconnecting).
    async fn run(self, mut client: zk::Client) -> Option<zk::Client> {
        loop {
            client = match self.keep(&client).await {
                Lost::Cancelled => return Some(client),
                Lost::Replaced(replacement) => replacement,
                Lost::Over => {
                    self.registered.store(false, Ordering::Release);
                    warn!(path = %self.node.path, state = %client.state(), "zookeeper session lost; registering again");
                    drop(client);
                    // Only connects: the new session's guard makes the node (`keep`).
                    let mut backoff = Backoff::reconnect();
                    tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return None,
                        client = session::connect_retrying(&self.settings, &mut backoff) => client,
                    }
                }
            };
        }
    }

    /// Follows `client`'s session until it is over for good, until a lookout session found
    /// its node gone and registered it again, or until cancelled. While connected, guards
    /// the node (see [`Keeper::guard`]); disconnects and reconnects within the session are
    /// only logged: the node survives them.
    async fn keep(&self, client: &zk::Client) -> Lost {
        let mut state = client.state_watcher();
        // When the connection was found lost; `None` while connected.
        let mut lost: Option<Instant> = None;
        let mut guard = Guard {
            held: false,
            retry: Backoff::retry(),
            failing: false,
        };
        loop {
            // `state()` starts from the current state, which may be terminal already.
            match state.state() {
                s if session::is_terminal(s) => return Lost::Over,
                zk::SessionState::Disconnected => {
                    let since = *lost.get_or_insert_with(Instant::now);
                    tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return Lost::Cancelled,
                        replacement = self.take_over(client, since) => {
                            return Lost::Replaced(replacement);
                        }
                        s = state.changed() => {
                            if !session::is_terminal(s) && s != zk::SessionState::Disconnected {
                                info!(state = %s, "registration: zookeeper reconnected, same session");
                            }
                        }
                    }
                }
                _ => {
                    lost = None;
                    tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return Lost::Cancelled,
                        s = state.changed() => if s == zk::SessionState::Disconnected {
                            info!("registration: zookeeper connection lost");
                        },
                        never = self.guard(client, &mut guard) => match never {},
                    }
                }
            }
        }
    }

    /// Through `client`'s connected session: watches the node while the session owns it,
    /// and makes it whenever it is missing (or, before this session held it, stale), with
    /// [`Guard::retry`] between failed attempts. Never returns: the caller drops it when the
    /// session's state changes, or on cancel.
    async fn guard(&self, client: &zk::Client, guard: &mut Guard) -> Infallible {
        let own = client.session_id();
        let path = &self.node.path;
        loop {
            let (stat, watch) = match client.check_and_watch_stat(path).await {
                Ok(checked) => checked,
                Err(err) => {
                    self.failed(client, guard, &self.node.error("exists", err))
                        .await;
                    continue;
                }
            };
            let event = match stat {
                Some(stat) if stat.ephemeral_owner == own.0 => {
                    guard.held = true;
                    guard.failing = false;
                    guard.retry.reset();
                    if !self.registered.swap(true, Ordering::AcqRel) {
                        info!(%path, session = %own, "registered again");
                    }
                    watch.changed().await
                }
                Some(stat) if guard.held => {
                    if self.registered.swap(false, Ordering::AcqRel) {
                        warn!(
                            %path,
                            owner = %zk::SessionId(stat.ephemeral_owner),
                            "endpoint node replaced by another session's; leaving it alone until it goes"
                        );
                    }
                    watch.changed().await
                }
                _ => {
                    // Missing, or (this session never held it) a stale node of an earlier one.
                    if stat.is_none() && self.registered.swap(false, Ordering::AcqRel) {
                        warn!(%path, session = %own, "endpoint node gone while its session lives; making it again");
                    }
                    drop(watch);
                    let stale = if guard.held {
                        Stale::Keep
                    } else {
                        Stale::Replace
                    };
                    match self.node.create(client, stale).await {
                        // The next check finds it ours, or another session's that appeared
                        // meanwhile.
                        Ok(())
                        | Err(RegistryError::Zk {
                            source: zk::Error::NodeExists,
                            ..
                        }) => {}
                        Err(err) => self.failed(client, guard, &err).await,
                    }
                    continue;
                }
            };
            if event.event_type == zk::EventType::Session {
                // Only terminal session states reach a oneshot watch; the caller sees them
                // through the state watcher, and drops this.
                std::future::pending::<()>().await;
            }
            // Deleted, rewritten, or created by another session: look again.
        }
    }

    /// Logs a failed attempt of [`Keeper::guard`] and waits before the next.
    async fn failed(&self, client: &zk::Client, guard: &mut Guard, err: &RegistryError) {
        let delay = guard.retry.next_delay();
        let connected = matches!(
            client.state(),
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
        );
        if guard.failing || !connected {
            debug!(%err, ?delay, "registering failed again; retrying");
        } else {
            warn!(%err, ?delay, "registering failed; retrying on the same session");
        }
        guard.failing = true;
        tokio::time::sleep(delay).await;
    }

    /// For `old` disconnected since `lost`: after the grace, makes lookout sessions (capped
    /// backoff) until one finds the node gone and registers it again; returns that one.
    /// Never returns while the old session's node stands: the caller drops this future when
    /// the old session reconnects or ends, or the registration is cancelled.
    async fn take_over(&self, old: &zk::Client, lost: Instant) -> zk::Client {
        let mut backoff = Backoff::reconnect();
        loop {
            let lookout = session::take_over(&self.settings, lost).await;
            debug!(
                path = %self.node.path,
                old = %old.session_id(),
                lookout = %lookout.session_id(),
                "zookeeper reachable while the registration's session is not; checking its node"
            );
            match self.look_out(old, &lookout).await {
                Lookout::Registered => return lookout,
                // Dropping the lookout closes its session; the next one waits a little.
                Lookout::Failed => tokio::time::sleep(backoff.next_delay()).await,
            }
        }
    }

    /// [`Keeper::check_through`] `lookout`, given up as soon as the lookout is disconnected
    /// itself: its writes must not wait in it for a reconnect, when they could undo a newer
    /// session's registration (a request made since is lost with it, or sent late: the
    /// guard of the session that keeps the node heals that).
    async fn look_out(&self, old: &zk::Client, lookout: &zk::Client) -> Lookout {
        tokio::select! {
            biased;
            () = session::until_disconnected(lookout) => {
                debug!(path = %self.node.path, lookout = %lookout.session_id(), "lookout session disconnected; giving it up");
                Lookout::Failed
            }
            found = self.check_through(old, lookout) => found,
        }
    }

    /// Watches the node through `lookout` while `old` owns it; once it is gone or not
    /// `old`'s, registers it again with `lookout`.
    async fn check_through(&self, old: &zk::Client, lookout: &zk::Client) -> Lookout {
        let path = &self.node.path;
        let old_session = old.session_id();
        loop {
            let (stat, watch) = match lookout.check_and_watch_stat(path).await {
                Ok(checked) => checked,
                Err(err) => {
                    debug!(%path, %err, "lookout session failed");
                    return Lookout::Failed;
                }
            };
            match stat {
                Some(stat) if stat.ephemeral_owner == old_session.0 => {
                    // The old session is alive on the server: wait for it (the caller) or
                    // for the node to change (the server expiring the old session).
                    let event = watch.changed().await;
                    if event.event_type == zk::EventType::Session {
                        debug!(%path, state = %event.session_state, "lookout session ended");
                        return Lookout::Failed;
                    }
                }
                _ => break,
            }
        }
        self.registered.store(false, Ordering::Release);
        warn!(
            %path,
            old = %old_session,
            new = %lookout.session_id(),
            "zookeeper session lost while disconnected (its node is gone); registering again"
        );
        match self.node.create(lookout, Stale::Replace).await {
            Ok(()) => {
                self.registered.store(true, Ordering::Release);
                info!(%path, session = %lookout.session_id(), "registered again");
                Lookout::Registered
            }
            Err(err) => {
                debug!(%err, "registering again with the lookout session failed");
                Lookout::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rpc_testkit::{ZkServer, wait_until_async};

    use super::*;

    /// The keeper may hand back a client whose session is over (its cancel and the expiry
    /// seen together): there is nothing to delete then, and no error to report.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deregister_with_an_expired_session_is_ok() {
        let mut zk = ZkServer::start();
        let settings = ZkSettings {
            servers: zk.connect_string(),
            session_timeout: Duration::from_secs(1),
            auth: None,
        };
        let client = session::connect(&settings).await.expect("connects");
        // The client declares its session expired by itself 1.4 session timeouts after it
        // last heard from the server.
        tokio::task::block_in_place(|| zk.stop());
        wait_until_async(Duration::from_secs(20), || async {
            client.state() == zk::SessionState::Expired
        })
        .await;
        let cancel = CancellationToken::new();
        let registration = Registration {
            path: endpoint_path("t", "s", "x"),
            registered: Arc::new(AtomicBool::new(true)),
            cancel: cancel.clone(),
            keeper: Some(tokio::spawn(async move {
                cancel.cancelled().await;
                Some(client)
            })),
            settings,
        };
        let result = tokio::time::timeout(Duration::from_secs(10), registration.deregister())
            .await
            .expect("deregister returns at once");
        assert!(result.is_ok(), "{result:?}");
    }
}
