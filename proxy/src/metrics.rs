//! What the proxy measures, for `GET /metrics` and the status log line: calls by service,
//! method and outcome with their durations, client connections, the endpoints of each
//! service by state, and the ZooKeeper session. Call metrics are bumped on the call path
//! through handles cached per service (see [`rpc_metrics`]); the gauges of the routing table
//! are set when scraped, from a [`Snapshot`] the caller reads from it (so this module needs
//! nothing of the table itself).

use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use rpc_metrics::{self as m, CallMetrics};
use rpc_registry::SessionState;

use crate::error::{CallError, UpstreamFailure};
use crate::resilience::HealthMetrics;

/// Metric name prefix.
pub const PREFIX: &str = "rpc_proxy";

/// The service (and method) label of calls for services not in the routing table, and of
/// frames that name no service: never the name a client sent.
pub const UNKNOWN: &str = "unknown";

/// The endpoint states counted by `rpc_proxy_upstream_endpoints`.
pub const ENDPOINT_STATES: [&str; 5] = ["connected", "idle", "backoff", "ejected", "draining"];

/// Per-service call handles of the proxy.
pub type ServiceCalls = rpc_metrics::ServiceCalls<Outcome>;
/// One call being timed.
pub type CallGuard = rpc_metrics::CallGuard<Outcome>;

rpc_metrics::outcomes! {
    /// How a call through the proxy ended: the `outcome` label.
    pub enum Outcome {
        /// A reply (declared exceptions included: they are normal replies).
        Ok => "ok",
        /// The endpoint answered with a `TApplicationException` (e.g. an undeclared exception).
        Exception => "exception",
        /// The service is not in ZooKeeper.
        UnknownService => "unknown_service",
        /// The service has no endpoint that can take the call.
        NoEndpoint => "no_endpoint",
        /// No reply within `request_timeout_ms`.
        Timeout => "timeout",
        /// The upstream connection broke with the call on it.
        ConnectionLost => "connection_lost",
        /// The endpoint went silent past the heartbeat timeout.
        HeartbeatTimeout => "heartbeat_timeout",
        /// The reply did not match the call.
        BadReply => "bad_reply",
        /// No connection could be made.
        ConnectFailed => "connect_failed",
        /// Still open when the drain grace ran out.
        Stopping => "stopping",
        /// A limit of the proxy was hit.
        Overloaded => "overloaded",
        /// Not a usable call (bad header, no `service:` prefix, not a call type).
        Protocol => "protocol",
        /// The client went away before its reply.
        Cancelled => "cancelled",
    }
    ok = Ok;
    dropped = Cancelled;
}

impl Outcome {
    /// The outcome of a failed call.
    pub fn of(error: &CallError) -> Self {
        match error {
            CallError::UnknownService { .. } => Outcome::UnknownService,
            CallError::NoEndpoint { .. } => Outcome::NoEndpoint,
            CallError::Overloaded { .. } => Outcome::Overloaded,
            CallError::Protocol(_) => Outcome::Protocol,
            CallError::Upstream { cause, .. } => match cause {
                UpstreamFailure::Timeout => Outcome::Timeout,
                UpstreamFailure::ConnectionLost => Outcome::ConnectionLost,
                UpstreamFailure::HeartbeatTimeout => Outcome::HeartbeatTimeout,
                UpstreamFailure::BadReply => Outcome::BadReply,
                UpstreamFailure::ConnectFailed => Outcome::ConnectFailed,
                UpstreamFailure::Stopping => Outcome::Stopping,
                UpstreamFailure::WriteTimeout => Outcome::ConnectionLost,
                UpstreamFailure::ReplyTooLarge => Outcome::BadReply,
            },
        }
    }
}

/// The proxy's view of its ZooKeeper session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZkState {
    /// No session yet (ZooKeeper not reached since start).
    Connecting,
    /// Connected with a live session.
    Connected,
    /// Connection lost; routing goes on with the last table.
    Disconnected,
    /// The session expired; a new one is being made.
    Expired,
}

impl ZkState {
    /// Every state, for the `state` label.
    pub const ALL: [ZkState; 4] = [
        ZkState::Connecting,
        ZkState::Connected,
        ZkState::Disconnected,
        ZkState::Expired,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ZkState::Connecting => "connecting",
            ZkState::Connected => "connected",
            ZkState::Disconnected => "disconnected",
            ZkState::Expired => "expired",
        }
    }
}

/// The routing table as its gauges show it, read when scraped.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every service in the table.
    pub services: Vec<ServiceEndpoints>,
    /// Whether the first full read of ZooKeeper is done.
    pub synced: bool,
}

/// One service of a [`Snapshot`].
#[derive(Debug, Clone, Default)]
pub struct ServiceEndpoints {
    /// The service name.
    pub name: String,
    /// The state of each endpoint, one of [`ENDPOINT_STATES`].
    pub states: Vec<&'static str>,
}

#[derive(Debug)]
struct ZkTracker {
    state: ZkState,
    connected_before: bool,
}

// === impl Metrics ===

/// Every metric of one proxy, in its own registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `rpc_proxy_requests_total`, `rpc_proxy_request_duration_seconds`,
    /// `rpc_proxy_inflight_requests`.
    pub calls: CallMetrics<Outcome>,
    unknown: &'static ServiceCalls,
    /// `rpc_proxy_client_connections`.
    pub client_connections: IntGauge,
    /// `rpc_proxy_client_connections_total`.
    pub client_connections_total: IntCounter,
    endpoints: IntGaugeVec,
    services: IntGauge,
    synced: IntGauge,
    zk_state: IntGaugeVec,
    zk_reconnects: IntCounter,
    zk_expiries: IntCounter,
    retries: IntCounterVec,
    budget_exhausted: IntCounterVec,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
    config_reloads: IntCounterVec,
    zk: Mutex<ZkTracker>,
    /// Scrapes one at a time: each rewrites the table-derived gauges.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every proxy metric and the `process_*` ones.
    pub fn new() -> Self {
        let registry = m::registry();
        m::register_build_info(&registry, PREFIX, env!("CARGO_PKG_VERSION"));
        let calls = CallMetrics::register(&registry, PREFIX);
        let unknown = calls.service(UNKNOWN);
        let zk_state = m::gauge_vec(
            &registry,
            "rpc_proxy_zookeeper_session_state",
            "1 for the current ZooKeeper session state, 0 for the others.",
            &["state"],
        );
        let metrics = Metrics {
            calls,
            unknown,
            client_connections: m::gauge(
                &registry,
                "rpc_proxy_client_connections",
                "Client connections open now.",
            ),
            client_connections_total: m::counter(
                &registry,
                "rpc_proxy_client_connections_total",
                "Client connections accepted since start.",
            ),
            endpoints: m::gauge_vec(
                &registry,
                "rpc_proxy_upstream_endpoints",
                "Endpoints routed to, by service and state (connected, idle: no connection open, backoff: reconnect backoff, ejected: outlier ejection, draining: gone from ZooKeeper, connections finishing their calls).",
                &["service", "state"],
            ),
            services: m::gauge(
                &registry,
                "rpc_proxy_services",
                "Services in the routing table.",
            ),
            synced: m::gauge(
                &registry,
                "rpc_proxy_routing_table_synced",
                "1 once the first full read of ZooKeeper is done.",
            ),
            zk_state,
            zk_reconnects: m::counter(
                &registry,
                "rpc_proxy_zookeeper_reconnects_total",
                "Times the ZooKeeper connection came back after a loss or a session expiry.",
            ),
            zk_expiries: m::counter(
                &registry,
                "rpc_proxy_zookeeper_session_expiries_total",
                "ZooKeeper sessions that expired.",
            ),
            retries: m::counter_vec(
                &registry,
                "rpc_proxy_retries_total",
                "Calls sent to another endpoint after one that never reached a handler, by reason (not_sent: never written; refused: an LB refused it before dispatch).",
                &["service", "reason"],
            ),
            budget_exhausted: m::counter_vec(
                &registry,
                "rpc_proxy_retry_budget_exhausted_total",
                "Retries not made because the service's retry budget was spent.",
                &["service"],
            ),
            ejections: m::counter_vec(
                &registry,
                "rpc_proxy_ejections_total",
                "Endpoints ejected from balancing, by reason (consecutive_failures, failed_probe).",
                &["service", "reason"],
            ),
            ejected: m::gauge_vec(
                &registry,
                "rpc_proxy_ejected_endpoints",
                "Endpoints of the service ejected now.",
                &["service"],
            ),
            config_reloads: m::counter_vec(
                &registry,
                "rpc_proxy_config_reloads_total",
                "Configuration reloads (SIGHUP) by result: ok (applied), error (file refused, old configuration kept).",
                &["result"],
            ),
            zk: Mutex::new(ZkTracker {
                state: ZkState::Connecting,
                connected_before: false,
            }),
            scrape: Mutex::new(()),
            registry,
        };
        metrics.show_zk_state(ZkState::Connecting);
        for result in ["ok", "error"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        metrics
    }

    /// The handles for calls whose service is not routable (label `unknown`).
    pub fn unknown(&self) -> &'static ServiceCalls {
        self.unknown
    }

    /// The resilience counters of `service` (created with their zero series, so dashboards
    /// see them before the first retry).
    pub fn health(&self, service: &str) -> HealthMetrics {
        HealthMetrics {
            retries_not_sent: self.retries.with_label_values(&[service, "not_sent"]),
            retries_refused: self.retries.with_label_values(&[service, "refused"]),
            budget_exhausted: self.budget_exhausted.with_label_values(&[service]),
            ejections_consecutive: self
                .ejections
                .with_label_values(&[service, "consecutive_failures"]),
            ejections_failed_probe: self.ejections.with_label_values(&[service, "failed_probe"]),
            ejected: self.ejected.with_label_values(&[service]),
        }
    }

    /// Counts a configuration reload, applied (`ok`) or refused.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Notes a ZooKeeper session change; returns whether it was one.
    pub fn zk_session(&self, state: SessionState) -> bool {
        let state = match state {
            SessionState::Connected => ZkState::Connected,
            SessionState::Disconnected => ZkState::Disconnected,
            SessionState::Expired => ZkState::Expired,
        };
        let mut zk = self.zk.lock().unwrap_or_else(|e| e.into_inner());
        if zk.state == state {
            return false;
        }
        zk.state = state;
        match state {
            ZkState::Connected if zk.connected_before => self.zk_reconnects.inc(),
            ZkState::Connected => zk.connected_before = true,
            ZkState::Expired => self.zk_expiries.inc(),
            _ => {}
        }
        self.show_zk_state(state);
        true
    }

    /// The ZooKeeper session state now.
    pub fn zk_state(&self) -> ZkState {
        self.zk.lock().unwrap_or_else(|e| e.into_inner()).state
    }

    fn show_zk_state(&self, current: ZkState) {
        for state in ZkState::ALL {
            self.zk_state
                .with_label_values(&[state.label()])
                .set(i64::from(state == current));
        }
    }

    /// The Prometheus text of every metric, with the table-derived gauges set from `now`.
    pub fn render(&self, now: &Snapshot) -> Vec<u8> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        // Services gone from the table lose their series.
        self.endpoints.reset();
        for service in &now.services {
            let mut counts = [0i64; ENDPOINT_STATES.len()];
            for state in &service.states {
                if let Some(i) = ENDPOINT_STATES.iter().position(|s| s == state) {
                    counts[i] += 1;
                }
            }
            for (state, count) in ENDPOINT_STATES.iter().zip(counts) {
                self.endpoints
                    .with_label_values(&[service.name.as_str(), state])
                    .set(count);
            }
        }
        self.services.set(now.services.len() as i64);
        self.synced.set(i64::from(now.synced));
        m::render(&self.registry)
    }
}

/// Counts one open client connection while it lives.
#[derive(Debug)]
pub struct ConnectionGauge(IntGauge);

impl ConnectionGauge {
    /// Counts a connection just accepted.
    pub fn open(metrics: &Metrics) -> Self {
        metrics.client_connections_total.inc();
        metrics.client_connections.inc();
        ConnectionGauge(metrics.client_connections.clone())
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zk_reconnects_count_returns_not_the_first_connect() {
        let metrics = Metrics::new();
        assert_eq!(metrics.zk_state(), ZkState::Connecting);
        assert!(metrics.zk_session(SessionState::Connected));
        assert!(!metrics.zk_session(SessionState::Connected));
        assert_eq!(metrics.zk_reconnects.get(), 0);
        metrics.zk_session(SessionState::Disconnected);
        metrics.zk_session(SessionState::Connected);
        metrics.zk_session(SessionState::Expired);
        metrics.zk_session(SessionState::Connected);
        assert_eq!(metrics.zk_reconnects.get(), 2);
        assert_eq!(metrics.zk_expiries.get(), 1);
        let text = String::from_utf8(m::render(&metrics.registry)).unwrap();
        assert!(text.contains(r#"rpc_proxy_zookeeper_session_state{state="connected"} 1"#));
        assert!(text.contains(r#"rpc_proxy_zookeeper_session_state{state="expired"} 0"#));
    }

    #[test]
    fn every_call_error_has_an_outcome_named_like_its_kind() {
        use rpc_metrics::Outcome as _;
        let error = CallError::Upstream {
            service: "s".into(),
            method: "m".into(),
            endpoint: "e".into(),
            cause: UpstreamFailure::HeartbeatTimeout,
        };
        assert_eq!(Outcome::of(&error).label(), error.kind());
        let error = CallError::Protocol("x".into());
        assert_eq!(Outcome::of(&error).label(), error.kind());
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i);
        }
    }

    #[test]
    fn render_sets_the_routing_gauges() {
        let metrics = Metrics::new();
        let echo = ServiceEndpoints {
            name: "echo".into(),
            states: vec!["connected", "idle", "idle"],
        };
        let now = Snapshot {
            services: vec![echo],
            synced: true,
        };
        let text = String::from_utf8(metrics.render(&now)).unwrap();
        for line in [
            r#"rpc_proxy_upstream_endpoints{service="echo",state="connected"} 1"#,
            r#"rpc_proxy_upstream_endpoints{service="echo",state="idle"} 2"#,
            r#"rpc_proxy_upstream_endpoints{service="echo",state="backoff"} 0"#,
            "rpc_proxy_services 1",
            "rpc_proxy_routing_table_synced 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn connection_gauge_follows_connections() {
        let metrics = Metrics::new();
        let a = ConnectionGauge::open(&metrics);
        let b = ConnectionGauge::open(&metrics);
        drop(a);
        assert_eq!(metrics.client_connections.get(), 1);
        drop(b);
        assert_eq!(metrics.client_connections.get(), 0);
        assert_eq!(metrics.client_connections_total.get(), 2);
    }
}
