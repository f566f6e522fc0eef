//! The LB's side: [`Registration`] creates the LB's ephemeral endpoint node and keeps it.
//!
//! An ephemeral node lives as long as the session that made it. A background task watches
//! that session: a reconnect within the session needs nothing (the node is still there);
//! after expiry the task connects a new session and registers again, with backoff, until it
//! succeeds or the registration is dropped. `deregister` deletes the node and closes the
//! session; dropping the registration closes the session, which also removes the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Bounds the final delete (a disconnected client would queue it until expiry).
    session_timeout: std::time::Duration,
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
            session_timeout: settings.session_timeout,
        })
    }

    /// Whether the node is believed to exist now. Stays `true` while disconnected (the node
    /// lives as long as its session); `false` from a session expiry until registered again.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// The endpoint node's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Deletes the node and closes the session.
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
        let result =
            match tokio::time::timeout(self.session_timeout, client.delete(&self.path, None)).await
            {
                Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => Ok(()),
                Ok(Err(err)) => Err(zk_error(err)),
                Err(_) => Err(zk_error(zk::Error::Timeout)),
            };
        if result.is_ok() {
            info!(path = %self.path, "deregistered");
        }
        // Dropping the last clone of the client closes the session.
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

// === impl Keeper ===

impl Keeper {
    /// Runs until cancelled; returns the live client then (`None` while re-registering).
    async fn run(self, mut client: zk::Client) -> Option<zk::Client> {
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return Some(client),
                () = wait_terminal(&client) => {}
            }
            self.registered.store(false, Ordering::Release);
            warn!(path = %self.path, state = %client.state(), "zookeeper session lost; registering again");
            drop(client);
            client = tokio::select! {
                biased;
                () = self.cancel.cancelled() => return None,
                client = self.register_again() => client,
            };
            self.registered.store(true, Ordering::Release);
            info!(path = %self.path, session = %client.session_id(), "registered again");
        }
    }

    /// Connects a new session and creates the node, retrying with backoff until it works.
    async fn register_again(&self) -> zk::Client {
        let mut backoff = Backoff::new();
        loop {
            let attempt = async {
                let client = session::connect(&self.settings).await.map_err(|source| {
                    RegistryError::Connect {
                        servers: self.settings.servers.clone(),
                        source,
                    }
                })?;
                create_node(
                    &client,
                    &self.settings,
                    &self.product,
                    &self.service,
                    &self.path,
                    &self.data,
                )
                .await?;
                Ok::<_, RegistryError>(client)
            };
            match attempt.await {
                Ok(client) => return client,
                Err(err) => {
                    let delay = backoff.next_delay();
                    debug!(%err, ?delay, "registering again failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Returns once the client's session is over for good (expired, closed, auth failed).
/// Disconnects and reconnects within the session are only logged: the node survives them.
async fn wait_terminal(client: &zk::Client) {
    let mut state = client.state_watcher();
    // `state_watcher()` starts from the current state, which may be terminal already.
    if session::is_terminal(state.peek_state()) {
        return;
    }
    loop {
        match state.changed().await {
            s if session::is_terminal(s) => return,
            zk::SessionState::Disconnected => info!("registration: zookeeper connection lost"),
            s => info!(state = %s, "registration: zookeeper reconnected, same session"),
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
