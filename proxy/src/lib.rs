//! `rpc_proxy`, the per-host Thrift sidecar (L2 of the mesh): clients call it on a unix
//! socket with `service:method` names; it routes each call to an endpoint of that service
//! found in ZooKeeper, over shared multiplexed connections, and answers every failure with a
//! `TApplicationException`.
//!
//! # Layout
//! - [`connection`]: one client connection; pipelined calls, replies in request order.
//! - [`route`]: the routing table fed by discovery; endpoint choice.
//! - [`resilience`]: outlier ejection per endpoint and the retry budget per service.
//! - [`upstream`]: an endpoint's multiplexed connections (seqid rewrite, heartbeats,
//!   timeouts, backoff, drain).
//! - [`error`]: call failures and the exception each becomes.
//! - [`metrics`]: what is measured (calls, connections, endpoints, ZooKeeper).
//! - [`admin`]: the admin routes (`/healthz`, `/metrics`, `/status`).
//! - [`status`]: the periodic status log line.
//! - [`reload`]: SIGHUP re-reads the configuration and applies what can change live.
//!
//! # Shutdown order
//! On the shutdown token: `/healthz` turns 503; stop accepting; remove the socket file (unless
//! it is no longer this process's, after a `--takeover`, or it was inherited from socket
//! activation); accept the connections already queued on the socket (an inherited socket
//! keeps them for the next process); every connection stops reading new calls (one accepted
//! less than a second ago once it is a second old, so a client that connected has its call
//! read) and finishes the ones in flight; wait for them at most `drain_grace`, then answer the
//! calls still open with code 6; close the admin endpoint; stop discovery; return.

pub mod admin;
pub mod connection;
pub mod error;
pub mod metrics;
pub mod reload;
pub mod resilience;
pub mod route;
pub mod status;
pub mod upstream;

/// The client socket (shared with `rpc_lb`; re-exported for tests and the binary).
pub use rpc_runtime::listener;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rpc_admin::AdminListener;
use rpc_config::ProxyConfig;
use rpc_registry::{DiscoveryEvent, ZkSettings};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::ConnectionSettings;
use crate::metrics::{ConnectionGauge, Metrics};
use crate::route::Router;
use crate::upstream::UpstreamSettings;
use rpc_runtime::listener::{Listener, Stream};

/// Bound of the discovery event queue (events are small; a full queue only slows discovery).
const DISCOVERY_QUEUE: usize = 4096;

/// Builds the upstream settings from the configuration.
pub fn upstream_settings(config: &ProxyConfig) -> UpstreamSettings {
    UpstreamSettings {
        request_timeout: config.request_timeout,
        connect_timeout: config.connect_timeout,
        heartbeat_interval: config.common.heartbeat_interval,
        heartbeat_timeout: config.common.heartbeat_timeout,
        idle_timeout: config.upstream_idle_timeout,
        max_pending: config.max_pending_per_endpoint,
        connections: config.upstream_connections,
        max_frame_size: config.common.max_frame_size,
        write_timeout: config.common.write_timeout,
        max_queued_bytes: config.common.max_connection_buffer_bytes,
        resilience: config.resilience,
        abort: Arc::default(),
    }
}

/// Builds a client connection's settings from the configuration, within the process's byte
/// budget `process_budget` (one for the life of the process).
pub fn connection_settings(
    config: &ProxyConfig,
    process_budget: Arc<rpc_mux::ProcessBudget>,
) -> ConnectionSettings {
    ConnectionSettings {
        max_frame_size: config.common.max_frame_size,
        max_inflight: config.max_inflight_per_connection,
        startup_hold: config.startup_hold,
        idle_timeout: config.client_idle_timeout,
        write_timeout: config.common.write_timeout,
        max_buffer_bytes: config.common.max_connection_buffer_bytes,
        process_budget,
    }
}

/// The admin endpoint [`run`] serves.
#[derive(Debug)]
pub enum AdminEndpoint {
    /// Bound already.
    Bound(AdminListener),
    /// Bound as soon as this address is free. After `--takeover` the process taken over from
    /// holds it until its drain is over; the client socket cannot wait for that.
    WhenFree(String),
}

/// How often a busy admin address is tried again.
const ADMIN_RETRY: Duration = Duration::from_millis(200);

impl AdminEndpoint {
    /// The bound listener, or `None` when `stop` comes first or the bind fails otherwise than
    /// "in use" (logged: the proxy serves on without its admin endpoint).
    async fn listener(self, stop: &CancellationToken) -> Option<AdminListener> {
        let address = match self {
            AdminEndpoint::Bound(listener) => return Some(listener),
            AdminEndpoint::WhenFree(address) => address,
        };
        loop {
            match AdminListener::bind(&address).await {
                Ok(listener) => return Some(listener),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
                Err(e) => {
                    tracing::error!(error = %e, "admin endpoint off");
                    return None;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(ADMIN_RETRY) => {}
            }
        }
    }
}

/// Longest wait for the admin endpoint to close at the end of the stop.
const ADMIN_CLOSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the proxy with ZooKeeper discovery until `shutdown` is cancelled and the drain is
/// over. `admin` is the `admin_address` endpoint, if configured; `reload`, when given,
/// re-reads the configuration file on SIGHUP.
pub async fn run(
    config: ProxyConfig,
    listener: Listener,
    admin: Option<AdminEndpoint>,
    reload: Option<reload::Reload>,
    shutdown: CancellationToken,
) {
    let (events_tx, events_rx) = mpsc::channel(DISCOVERY_QUEUE);
    let settings = ZkSettings {
        servers: config.common.zk.clone(),
        session_timeout: config.common.zk_session_timeout,
        auth: config.common.zk_auth.clone(),
    };
    let discovery_stop = CancellationToken::new();
    let discovery = tokio::spawn(rpc_registry::run_discovery(
        settings,
        config.common.product.clone(),
        events_tx,
        discovery_stop.clone(),
    ));
    serve(config, listener, admin, events_rx, reload, shutdown).await;
    discovery_stop.cancel();
    let _ = discovery.await;
}

/// Runs the proxy fed by any source of discovery events (ZooKeeper in production, a static
/// list in tests) until `shutdown` is cancelled and the drain is over. The admin endpoint,
/// when `proxy_admin_address` (else `admin_address`) is set, is bound here (a failure is
/// logged, not fatal).
pub async fn run_with_discovery(
    config: ProxyConfig,
    listener: Listener,
    events: mpsc::Receiver<DiscoveryEvent>,
    shutdown: CancellationToken,
) {
    let admin = match config.admin_address.as_deref() {
        Some(address) => match AdminListener::bind(address).await {
            Ok(admin) => Some(admin),
            Err(e) => {
                tracing::error!(error = %e, "admin endpoint off");
                None
            }
        },
        None => None,
    };
    let admin = admin.map(AdminEndpoint::Bound);
    serve(config, listener, admin, events, None, shutdown).await;
}

async fn serve(
    config: ProxyConfig,
    listener: Listener,
    admin: Option<AdminEndpoint>,
    mut events: mpsc::Receiver<DiscoveryEvent>,
    reload: Option<reload::Reload>,
    shutdown: CancellationToken,
) {
    let metrics = Arc::new(Metrics::new());
    let upstream = upstream_settings(&config);
    let abort = upstream.abort.clone();
    let router = Arc::new(Router::with_metrics(Arc::new(upstream), metrics));
    let applier = {
        let router = router.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                router.apply(event);
            }
        })
    };
    // Each new connection takes the settings of the moment (a reload replaces them).
    let settings = Arc::new(ArcSwap::from_pointee(connection_settings(
        &config,
        rpc_mux::ProcessBudget::new(config.common.max_process_buffer_bytes),
    )));
    // The admin endpoint outlives the drain (its /healthz says 503 meanwhile).
    let admin_stop = CancellationToken::new();
    let admin = admin.map(|admin| {
        let routes = Arc::new(admin::routes(router.clone(), shutdown.clone()));
        let stop = admin_stop.clone();
        tokio::spawn(async move {
            if let Some(admin) = admin.listener(&stop).await {
                rpc_admin::serve(admin, routes, stop).await;
            }
        })
    });
    let status = config
        .common
        .status_interval
        .map(|every| tokio::spawn(status::run(router.clone(), every)));
    let reloader = reload.map(|reload| {
        tokio::spawn(reload::run(
            reload,
            config.clone(),
            router.clone(),
            settings.clone(),
        ))
    });
    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    tracing::info!(
        address = listener.describe(),
        "accepting client connections"
    );
    rpc_runtime::notify_ready();
    accept_loop(listener, &tracker, &limit, &router, &settings, &shutdown).await;
    // The listener (and its socket file, if still ours) is gone once accept_loop returns.
    rpc_runtime::notify_stopping();
    tracker.close();
    tracing::info!(connections = tracker.len(), "draining client connections");
    if tokio::time::timeout(config.drain_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tracker.len(),
            "drain grace period over, failing the calls still open with code 6"
        );
        abort.fire();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), tracker.wait()).await;
    }
    if let Some(status) = status {
        status.abort();
    }
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(ADMIN_CLOSE, admin).await;
    }
    applier.abort();
}

/// A connection accepted less than this before the stop is still read until it is this old:
/// its client may have connected without having written its first call yet (a Python client
/// between `connect()` and its first write while other threads hold the GIL), and closing it
/// unread would fail a call that did connect. Older connections stop reading at once.
const FIRST_CALL_GRACE: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: Listener,
    tracker: &TaskTracker,
    limit: &Arc<Semaphore>,
    router: &Arc<Router>,
    settings: &Arc<ArcSwap<ConnectionSettings>>,
    shutdown: &CancellationToken,
) {
    let mut warned_full = false;
    let mut spawn = |stream: Stream| {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if !warned_full {
                tracing::warn!("max_connections reached, refusing new client connections");
                warned_full = true;
            }
            drop(stream);
            return;
        };
        warned_full = false;
        let router = router.clone();
        let settings = settings.load_full();
        let shutdown = shutdown.clone();
        let open = ConnectionGauge::open(router.metrics());
        let accepted = tokio::time::Instant::now();
        tracker.spawn(async move {
            let _open = open;
            let stop = CancellationToken::new();
            let serve = async {
                match stream {
                    Stream::Unix(mut s) => {
                        let (r, w) = s.split();
                        connection::serve(r, w, router, settings, stop.clone()).await;
                    }
                    Stream::Tcp(mut s) => {
                        let (r, w) = s.split();
                        connection::serve(r, w, router, settings, stop.clone()).await;
                    }
                }
            };
            tokio::select! {
                biased;
                () = serve => {}
                () = stop_when_due(&shutdown, accepted, &stop) => {}
            }
            drop(permit);
        });
    };
    while let Some(stream) = listener.accept_until(shutdown, "client").await {
        spawn(stream);
    }
    // The socket file goes (while it is still this process's: after a takeover it is not),
    // then what had queued on the socket is served like the rest, none of it refused. An
    // inherited socket keeps its queue for the next process.
    let queued = listener.close();
    if !queued.is_empty() {
        tracing::info!(
            connections = queued.len(),
            "serving the connections queued at the stop"
        );
    }
    for stream in queued {
        spawn(stream);
    }
}

/// Cancels a connection's `stop` once `shutdown` is cancelled and the connection, accepted
/// at `accepted`, is [`FIRST_CALL_GRACE`] old; then waits forever (the connection's end ends
/// its task).
async fn stop_when_due(
    shutdown: &CancellationToken,
    accepted: tokio::time::Instant,
    stop: &CancellationToken,
) {
    shutdown.cancelled().await;
    tokio::time::sleep_until(accepted + FIRST_CALL_GRACE).await;
    stop.cancel();
    std::future::pending::<()>().await;
}
