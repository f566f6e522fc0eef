//! ZooKeeper side of the mesh (CONTRACT section 3): the proxy's [`run_discovery`] watches
//! `/zk/product/<product>/services` and turns it into [`DiscoveryEvent`]s for its routing
//! table; the LB's [`Registration`] keeps its ephemeral endpoint node alive across session
//! expiry. Sits between ZooKeeper and the routing/registration code of the binaries.
//!
//! # Layout
//! - `paths`: node paths and the `service_id` rule.
//! - `endpoint`: the endpoint node JSON ([`EndpointInfo`]).
//! - `discovery`: [`run_discovery`].
//! - `registration`: [`Registration`].
//! - `session`: connecting with the configured session timeout; expiry means a new client.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to reach ZooKeeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkSettings {
    /// `host:port,host:port` (the `zk` config key).
    pub servers: String,
    /// Requested session timeout (`zk_session_timeout`); the server may clamp it.
    pub session_timeout: Duration,
}

/// The JSON data of an endpoint node. Unknown fields are ignored when reading; missing
/// optional fields read as empty strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndpointInfo {
    /// The service name.
    pub service: String,
    /// The node name (see [`service_id`]).
    pub service_id: String,
    /// `host:port`, or a unix path: where proxies connect.
    pub frontend: String,
    /// `--work-dir` of the LB.
    #[serde(default)]
    pub deploy_path: String,
    /// `--code-url-version` of the LB.
    #[serde(default)]
    pub code_url_version: String,
    /// Host name of the LB.
    #[serde(default)]
    pub hostname: String,
    /// `YYYY-MM-DD HH:MM:SS`.
    #[serde(default)]
    pub start_time: String,
}

/// One endpoint of a service as discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The node name under the service.
    pub node: String,
    /// The node's data.
    pub info: EndpointInfo,
}

/// ZooKeeper session state, as reported to logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Connected with a live session.
    Connected,
    /// Connection lost; the session may still come back.
    Disconnected,
    /// The session expired; a new one is being made.
    Expired,
}

/// What discovery tells the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// The complete current endpoint set of one service (replaces what was known; may be
    /// empty when the service node exists with no endpoint left).
    Endpoints {
        /// The service name.
        service: String,
        /// Every endpoint whose data could be read, sorted by node name.
        endpoints: Vec<Endpoint>,
    },
    /// The service node is gone.
    ServiceRemoved {
        /// The service name.
        service: String,
    },
    /// Every service has been read since the last (re)connect: the table is complete.
    /// Sent after the first full read and after every resync.
    Synced,
    /// The session changed state. While not connected, the last table stays in use.
    Session(SessionState),
}

/// Errors of the registry. Discovery never returns them (it retries); registration does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A ZooKeeper call failed.
    #[error("zookeeper {op} {path}: {source}")]
    Zk {
        /// What was attempted (`create`, `delete`, ...).
        op: &'static str,
        /// The node path.
        path: String,
        /// The client's error.
        source: zookeeper_client::Error,
    },
    /// Could not connect to any server.
    #[error("cannot connect to zookeeper {servers}: {source}")]
    Connect {
        /// The server list.
        servers: String,
        /// The client's error.
        source: zookeeper_client::Error,
    },
    /// Node data could not be encoded.
    #[error("endpoint json: {0}")]
    Json(#[from] serde_json::Error),
}

/// `/zk/product/<product>/services`.
pub fn services_path(product: &str) -> String {
    format!("/zk/product/{product}/services")
}

/// `/zk/product/<product>/services/<service>`.
pub fn service_path(product: &str, service: &str) -> String {
    format!("/zk/product/{product}/services/{service}")
}

/// The node name of an endpoint: `.` and `:` become `_`, `/` is removed, and the last 20
/// characters are kept (`10.4.10.2:5555` gives `10_4_10_2_5555`).
pub fn service_id(frontend: &str) -> String {
    todo!()
}

/// Watches every service of `product` and sends [`DiscoveryEvent`]s until `shutdown` is
/// cancelled. Never fails: when ZooKeeper is unreachable or the session expires it keeps
/// quiet about endpoints (the last table stays valid), reconnects with jittered backoff, and
/// resyncs (sending the full state again, then [`DiscoveryEvent::Synced`]).
pub async fn run_discovery(
    settings: ZkSettings,
    product: String,
    events: tokio::sync::mpsc::Sender<DiscoveryEvent>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    todo!()
}

/// An LB's ephemeral endpoint node, kept registered until [`Registration::deregister`].
pub struct Registration {
    // private
}

impl Registration {
    /// Creates the node `/zk/product/<product>/services/<info.service>/<info.service_id>`
    /// (parents persistent and created when missing; a stale node of an earlier session is
    /// deleted first) and keeps it: after a session expiry it registers again by itself.
    ///
    /// # Errors
    /// [`RegistryError`] if the first registration fails.
    pub async fn register(settings: ZkSettings, product: String, info: EndpointInfo) -> Result<Self, RegistryError> {
        todo!()
    }

    /// Whether the node is believed to exist now.
    pub fn is_registered(&self) -> bool {
        todo!()
    }

    /// Deletes the node and closes the session.
    ///
    /// # Errors
    /// [`RegistryError`] if the delete failed for another reason than the node being gone.
    pub async fn deregister(self) -> Result<(), RegistryError> {
        todo!()
    }
}
