//! ZooKeeper side of the mesh (CONTRACT section 3): the proxy's [`run_discovery`] watches
//! `/zk/product/<product>/services` and turns it into [`DiscoveryEvent`]s for its routing
//! table; the LB's [`Registration`] keeps its ephemeral endpoint node alive across session
//! expiry. Sits between ZooKeeper and the routing/registration code of the binaries.
//!
//! # Layout
//! - `paths`: node paths and the `service_id` rule.
//! - `endpoint`: the endpoint node JSON ([`EndpointInfo`]).
//! - `host`: the same-host rule for unix-path frontends ([`LocalHost`]).
//! - `discovery`: [`run_discovery`].
//! - `registration`: [`Registration`].
//! - `session`: connecting with the configured session timeout; expiry means a new client,
//!   and so may a long disconnection (the library's own reconnect backoff has no cap).

mod discovery;
mod endpoint;
mod host;
mod paths;
mod registration;
mod session;

use std::time::Duration;

pub use discovery::{run_discovery, run_discovery_as};
pub use endpoint::{Endpoint, EndpointInfo, now_start_time};
pub use host::{ForeignUnixFrontend, LocalHost};
pub use paths::{endpoint_path, service_id, service_path, services_path};
pub use registration::Registration;

/// How to reach ZooKeeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkSettings {
    /// `host:port,host:port` (the `zk` config key).
    pub servers: String,
    /// Requested session timeout (`zk_session_timeout`); the server may clamp it.
    pub session_timeout: Duration,
    /// Digest credential `user:password` (`zk_auth`). When set, the session authenticates
    /// and a [`Registration`]'s own endpoint node is readable by anyone and writable only by
    /// sessions holding the same credential. The parents it creates (the service directory
    /// included) stay open to all, so that LBs without this credential can still register;
    /// as ZooKeeper checks deletes against the parent, a deleted node is made again.
    pub auth: Option<String>,
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
        /// Every endpoint whose data could be read and that is routable from this host (a
        /// unix-path frontend only when registered by this host: see [`LocalHost`]), sorted
        /// by node name.
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
