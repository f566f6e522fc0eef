//! The LB's side: [`Registration`] creates the LB's ephemeral endpoint node and keeps it.
//!
//! An ephemeral node lives as long as the session that made it. A background task watches
//! that session: a reconnect within the session needs nothing (the node is still there);
//! after expiry the task connects a new session and registers again, with backoff, until it
//! succeeds or the registration is dropped. `deregister` deletes the node and closes the
//! session; dropping the registration closes the session, which also removes the node.
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
    /// the session that made it expires.
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
    /// deleted first) and keeps it: after a session expiry it registers again by itself.
    ///
    /// # Errors
    /// [`RegistryError`] if the first registration fails.
    pub async fn register(
        settings: ZkSettings,
        product: String,
        info: EndpointInfo,
    ) -> Result<Self, RegistryError> {
        let path = endpoint_path(&product, &info.service, &info.service_id);
        let data = serde_json::to_vec(&info)?;
        let client =
            session::connect(&settings)
                .await
                .map_err(|source| RegistryError::Connect {
                    servers: settings.servers.clone(),
                    source,
                })?;
        create_node(&client, &settings, &product, &info.service, &path, &data).await?;
        info!(%path, session = %client.session_id(), "registered");
        let registered = Arc::new(AtomicBool::new(true));
        let cancel = CancellationToken::new();
        let keeper = Keeper {
            settings: settings.clone(),
            product,
            service: info.service,
            path: path.clone(),
            data,
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
    /// lives as long as its session); `false` from a session expiry (or the node found gone
    /// through a lookout session) until registered again.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// The endpoint node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Deletes the node and closes the session. When the session is disconnected, the delete
    /// goes through a fresh session instead, so that a ZooKeeper that is back is not kept
    /// waiting for the old session's own reconnect (and no delete stays queued in the old
    /// session, where it could remove a later registration's node). Bounded by the session
    /// timeout.
    ///
    /// # Errors
    /// [`RegistryError`] if the delete failed for another reason than the node being gone.
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
        // No live session: the node is gone already, or goes with the old session.
        let Some(client) = client else {
            return Ok(());
        };
        let zk_error = |source| RegistryError::Zk {
            op: "delete",
            path: self.path.clone(),
            source,
        };
        let delete = async {
            if client.state() != zk::SessionState::Disconnected {
                return client.delete(&self.path, None).await;
            }
            let mut backoff = Backoff::reconnect();
            let fresh = session::connect_retrying(&self.settings, &mut backoff).await;
            fresh.delete(&self.path, None).await
        };
        let result = match tokio::time::timeout(self.settings.session_timeout, delete).await {
            Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => Ok(()),
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

/// The background task that keeps the node registered across session expiry.
struct Keeper {
    settings: ZkSettings,
    product: String,
    service: String,
    path: String,
    data: Vec<u8>,
    registered: Arc<AtomicBool>,
    cancel: CancellationToken,
}

/// How a registration's session ended.
enum Lost {
    /// Expired, closed or auth failed (or back while its node is known to be gone): register
    /// again with a new session.
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
    /// The lookout itself failed: make another one.
    Failed,
}

// === impl Keeper ===

impl Keeper {
    /// Runs until cancelled; returns the live client then (`None` while re-registering).
    async fn run(self, mut client: zk::Client) -> Option<zk::Client> {
        loop {
            client = match self.keep(&client).await {
                Lost::Cancelled => return Some(client),
                Lost::Replaced(replacement) => replacement,
                Lost::Over => {
                    self.registered.store(false, Ordering::Release);
                    warn!(path = %self.path, state = %client.state(), "zookeeper session or node lost; registering again");
                    drop(client);
                    let client = tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return None,
                        client = self.register_again() => client,
                    };
                    self.registered.store(true, Ordering::Release);
                    info!(path = %self.path, session = %client.session_id(), "registered again");
                    client
                }
            };
        }
    }

    /// Follows `client`'s session until it is over for good, until a lookout session found
    /// its node gone and registered it again, or until cancelled. Disconnects and reconnects
    /// within the session are only logged: the node survives them.
    async fn keep(&self, client: &zk::Client) -> Lost {
        let mut state = client.state_watcher();
        // When the connection was found lost; `None` while connected.
        let mut lost: Option<Instant> = None;
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
                    // `deregister` clears `registered` after cancelling: read in this order,
                    // a cleared flag with no cancel seen is a lookout's doing.
                    if !self.registered.load(Ordering::Acquire) {
                        if self.cancel.is_cancelled() {
                            return Lost::Cancelled;
                        }
                        // A lookout found the node gone, then this session came back before
                        // the node was made again: make it again (rare; a new session is
                        // simplest).
                        return Lost::Over;
                    }
                    tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return Lost::Cancelled,
                        s = state.changed() => if s == zk::SessionState::Disconnected {
                            info!("registration: zookeeper connection lost");
                        }
                    }
                }
            }
        }
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
                path = %self.path,
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

    /// Watches the node through `lookout` while `old` owns it; once it is gone or not
    /// `old`'s, registers it again with `lookout`.
    async fn look_out(&self, old: &zk::Client, lookout: &zk::Client) -> Lookout {
        let old_session = old.session_id();
        loop {
            let (stat, watch) = match lookout.check_and_watch_stat(&self.path).await {
                Ok(checked) => checked,
                Err(err) => {
                    debug!(path = %self.path, %err, "lookout session failed");
                    return Lookout::Failed;
                }
            };
            match stat {
                Some(stat) if stat.ephemeral_owner == old_session.0 => {
                    // The old session is alive on the server: wait for it (the caller) or
                    // for the node to change (the server expiring the old session).
                    let event = watch.changed().await;
                    if event.event_type == zk::EventType::Session {
                        debug!(path = %self.path, state = %event.session_state, "lookout session ended");
                        return Lookout::Failed;
                    }
                }
                _ => break,
            }
        }
        self.registered.store(false, Ordering::Release);
        warn!(
            path = %self.path,
            old = %old_session,
            new = %lookout.session_id(),
            "zookeeper session lost while disconnected (its node is gone); registering again"
        );
        match create_node(
            lookout,
            &self.settings,
            &self.product,
            &self.service,
            &self.path,
            &self.data,
        )
        .await
        {
            Ok(()) => {
                self.registered.store(true, Ordering::Release);
                info!(path = %self.path, session = %lookout.session_id(), "registered again");
                Lookout::Registered
            }
            Err(err) => {
                debug!(%err, "registering again with the lookout session failed");
                Lookout::Failed
            }
        }
    }

    /// Connects a new session and creates the node, retrying with backoff until it works.
    async fn register_again(&self) -> zk::Client {
        let mut backoff = Backoff::reconnect();
        loop {
            let client = session::connect_retrying(&self.settings, &mut backoff).await;
            match create_node(
                &client,
                &self.settings,
                &self.product,
                &self.service,
                &self.path,
                &self.data,
            )
            .await
            {
                Ok(()) => return client,
                Err(err) => {
                    let delay = backoff.next_delay();
                    debug!(%err, ?delay, "registering again failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Makes the parents (persistent), deletes a stale node, and creates the ephemeral node.
async fn create_node(
    client: &zk::Client,
    settings: &ZkSettings,
    product: &str,
    service: &str,
    path: &str,
    data: &[u8],
) -> Result<(), RegistryError> {
    let parent = service_path(product, service);
    let acls = session::acls(settings);
    let dir = zk::CreateMode::Persistent.with_acls(acls);
    client
        .mkdir(&parent, &dir)
        .await
        .map_err(|source| RegistryError::Zk {
            op: "mkdir",
            path: parent.clone(),
            source,
        })?;
    let node = zk::CreateMode::Ephemeral.with_acls(acls);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.delete(path, None).await {
            Ok(()) => debug!(%path, "deleted stale endpoint node"),
            Err(zk::Error::NoNode) => {}
            Err(source) => {
                return Err(RegistryError::Zk {
                    op: "delete",
                    path: path.to_owned(),
                    source,
                });
            }
        }
        match client.create(path, data, &node).await {
            Ok(_) => return Ok(()),
            // Someone created it between our delete and create: delete theirs, try again.
            Err(zk::Error::NodeExists) if attempt < CREATE_ATTEMPTS => continue,
            Err(source) => {
                return Err(RegistryError::Zk {
                    op: "create",
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}
