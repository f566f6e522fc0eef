//! What the LB measures, for `GET /metrics` and the status log line: calls by method and
//! outcome with their durations, rejected calls, worker joins and departures, supervised
//! worker restarts and boot failures, configuration reloads, ZooKeeper registration; and,
//! read when scraped, workers by state and busy, worker slots, queue depth and proxy
//! connections. Call metrics are bumped through handles cached per method (see
//! [`rpc_metrics`]).

use std::sync::Mutex;

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Registry};
use rpc_metrics::{self as m, CallMetrics};

use crate::load::{Reject, WorkerLoad, WorkerState};

/// Metric name prefix.
pub const PREFIX: &str = "rpc_lb";

/// The method label of frames that are no usable call.
pub const UNKNOWN: &str = "unknown";

/// The LB's call handles (its one service).
pub type ServiceCalls = rpc_metrics::ServiceCalls<Outcome>;
/// One call being timed, from the front to its answer.
pub type Meter = rpc_metrics::CallGuard<Outcome>;

rpc_metrics::outcomes! {
    /// How a call through the LB ended: the `outcome` label.
    pub enum Outcome {
        /// The worker replied (declared exceptions included).
        Ok => "ok",
        /// The worker answered with a `TApplicationException` (an undeclared exception).
        Exception => "exception",
        /// No worker connected.
        NoWorker => "no_worker",
        /// Every worker busy and the queue full.
        QueueFull => "queue_full",
        /// The LB was stopping.
        Stopping => "stopping",
        /// Waited in the queue past the request timeout.
        QueueTimeout => "queue_timeout",
        /// The worker did not answer within the request timeout.
        Timeout => "timeout",
        /// The worker's connection broke with the call on it.
        WorkerLost => "worker_lost",
        /// Not a usable call.
        Protocol => "protocol",
        /// The proxy connection went away first, or the call was dropped.
        Cancelled => "cancelled",
    }
    ok = Ok;
    dropped = Cancelled;
}

impl From<Reject> for Outcome {
    fn from(reject: Reject) -> Self {
        match reject {
            Reject::NoWorker => Outcome::NoWorker,
            Reject::QueueFull => Outcome::QueueFull,
            Reject::Stopping => Outcome::Stopping,
        }
    }
}

/// The label value of a [`Reject`] in `rpc_lb_rejected_requests_total`.
fn reject_label(reject: Reject) -> &'static str {
    match reject {
        Reject::NoWorker => "no_worker",
        Reject::QueueFull => "queue_full",
        Reject::Stopping => "stopping",
    }
}

/// Why a supervised worker was restarted: the `reason` label of
/// `rpc_lb_worker_restarts_total` (CONTRACT section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// It exited (crashed, was killed, failed to boot).
    Exit,
    /// The watchdog killed it.
    Hung,
    /// Replaced after `worker_max_requests` calls.
    Recycled,
    /// Replaced by a rolling restart (SIGHUP, `POST /workers/restart`).
    Rolling,
}

impl RestartReason {
    /// Every reason, in label order.
    pub const ALL: [RestartReason; 4] = [
        RestartReason::Exit,
        RestartReason::Hung,
        RestartReason::Recycled,
        RestartReason::Rolling,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RestartReason::Exit => "exit",
            RestartReason::Hung => "hung",
            RestartReason::Recycled => "recycled",
            RestartReason::Rolling => "rolling",
        }
    }
}

/// The ZooKeeper registration counters, bumped by the registration task.
#[derive(Debug, Clone)]
pub struct RegistrationMetrics {
    /// Node creations: the first, and each one after a session expiry.
    pub registrations: IntCounter,
    /// Sessions lost (expired) while registered.
    pub expiries: IntCounter,
    /// Registration attempts that failed.
    pub failures: IntCounter,
}

/// What the LB is doing now, read when scraped.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every worker connection's load.
    pub workers: Vec<WorkerLoad>,
    /// Workers the LB started that have not joined yet (no HELLO).
    pub booting: usize,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Proxy connections open.
    pub client_connections: usize,
    /// Whether the ZooKeeper node exists.
    pub registered: bool,
    /// Whether `POST /drain` put the LB in maintenance.
    pub maintenance: bool,
}

// === impl LbMetrics ===

/// Every metric of one LB, in its own registry.
#[derive(Debug)]
pub struct LbMetrics {
    registry: Registry,
    /// The call handles of the LB's service.
    pub calls: &'static ServiceCalls,
    rejected: [IntCounter; 3],
    /// `rpc_lb_workers_joined_total`.
    pub workers_joined: IntCounter,
    /// `rpc_lb_workers_left_total`.
    pub workers_left: IntCounter,
    /// The registration counters.
    pub registration: RegistrationMetrics,
    restarts: [IntCounter; 4],
    /// `rpc_lb_worker_boot_failures_total`.
    pub boot_failures: IntCounter,
    reloads: [IntCounter; 2],
    workers: IntGaugeVec,
    workers_busy: IntGauge,
    slots: IntGauge,
    slots_busy: IntGauge,
    queue_depth: IntGauge,
    client_connections: IntGauge,
    registered: IntGauge,
    maintenance: IntGauge,
    /// Scrapes one at a time: each rewrites the snapshot gauges.
    scrape: Mutex<()>,
}

impl LbMetrics {
    /// A fresh registry with every LB metric (service label `service`) and the `process_*`
    /// ones.
    pub fn new(service: &str) -> Self {
        let registry = m::registry();
        m::register_build_info(&registry, PREFIX, env!("CARGO_PKG_VERSION"));
        let calls = CallMetrics::<Outcome>::register(&registry, PREFIX).service(service);
        let rejected = m::counter_vec(
            &registry,
            "rpc_lb_rejected_requests_total",
            "Calls refused at once, by reason (no_worker, queue_full, stopping).",
            &["service", "reason"],
        );
        let reject = |r| rejected.with_label_values(&[service, reject_label(r)]);
        let restarts = m::counter_vec(
            &registry,
            "rpc_lb_worker_restarts_total",
            "Supervised workers started again, by reason (exit, hung, recycled, rolling).",
            &["reason"],
        );
        let restart = |r: RestartReason| restarts.with_label_values(&[r.label()]);
        let reloads = m::counter_vec(
            &registry,
            "rpc_lb_config_reloads_total",
            "Configuration reloads (SIGHUP), by result (ok, error: the file was refused and the old configuration kept).",
            &["result"],
        );
        LbMetrics {
            calls,
            rejected: [
                reject(Reject::NoWorker),
                reject(Reject::QueueFull),
                reject(Reject::Stopping),
            ],
            workers_joined: m::counter(
                &registry,
                "rpc_lb_workers_joined_total",
                "Back connections that proved to be workers (HELLO or a ping echo).",
            ),
            workers_left: m::counter(
                &registry,
                "rpc_lb_workers_left_total",
                "Worker connections closed.",
            ),
            restarts: RestartReason::ALL.map(restart),
            boot_failures: m::counter(
                &registry,
                "rpc_lb_worker_boot_failures_total",
                "Supervised workers that ended, or were killed, before sending HELLO (worker_boot_timeout_ms).",
            ),
            reloads: [
                reloads.with_label_values(&["ok"]),
                reloads.with_label_values(&["error"]),
            ],
            registration: RegistrationMetrics {
                registrations: m::counter(
                    &registry,
                    "rpc_lb_zookeeper_registrations_total",
                    "Times the LB's ZooKeeper node was created (the first time and after each session expiry).",
                ),
                expiries: m::counter(
                    &registry,
                    "rpc_lb_zookeeper_session_expiries_total",
                    "ZooKeeper sessions lost while registered (the node is gone until registered again).",
                ),
                failures: m::counter(
                    &registry,
                    "rpc_lb_zookeeper_registration_failures_total",
                    "Registration attempts that failed (ZooKeeper unreachable, ...).",
                ),
            },
            workers: m::gauge_vec(
                &registry,
                "rpc_lb_workers",
                "Workers, by state (booting: started by the LB, no HELLO yet; ready: takes calls; stopping: sent STOP or told to stop; hung: held a call past worker_timeout_ms).",
                &["state"],
            ),
            workers_busy: m::gauge(
                &registry,
                "rpc_lb_workers_busy",
                "Workers running at least one call.",
            ),
            slots: m::gauge(
                &registry,
                "rpc_lb_worker_slots",
                "Calls the active workers can run at once (their capacity).",
            ),
            slots_busy: m::gauge(
                &registry,
                "rpc_lb_worker_slots_busy",
                "Calls running on workers now.",
            ),
            queue_depth: m::gauge(
                &registry,
                "rpc_lb_queue_depth",
                "Calls waiting for a free worker slot.",
            ),
            client_connections: m::gauge(
                &registry,
                "rpc_lb_client_connections",
                "Proxy (front) connections open now.",
            ),
            registered: m::gauge(
                &registry,
                "rpc_lb_zookeeper_registered",
                "1 while the LB's ZooKeeper node exists.",
            ),
            maintenance: m::gauge(
                &registry,
                "rpc_lb_maintenance",
                "1 while drained by POST /drain (node deleted, calls still served).",
            ),
            scrape: Mutex::new(()),
            registry,
        }
    }

    /// Counts a call refused at once.
    pub fn rejected(&self, reject: Reject) {
        self.rejected[match reject {
            Reject::NoWorker => 0,
            Reject::QueueFull => 1,
            Reject::Stopping => 2,
        }]
        .inc();
    }

    /// Counts a supervised worker started again.
    pub fn restarted(&self, reason: RestartReason) {
        self.restarts[reason as usize].inc();
    }

    /// Counts a configuration reload: `ok`, or refused (`error`).
    pub fn config_reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
    }

    /// The Prometheus text of every metric, with the gauges set from `now`.
    pub fn render(&self, now: &Snapshot) -> Vec<u8> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let active = now.workers.iter().filter(|w| w.active);
        for state in WorkerState::ALL {
            let count = match state {
                WorkerState::Booting => now.booting,
                _ => now.workers.iter().filter(|w| w.state() == state).count(),
            };
            self.workers
                .with_label_values(&[state.label()])
                .set(count as i64);
        }
        self.workers_busy
            .set(now.workers.iter().filter(|w| w.inflight > 0).count() as i64);
        self.slots
            .set(active.map(|w| w.capacity).sum::<usize>() as i64);
        self.slots_busy
            .set(now.workers.iter().map(|w| w.inflight).sum::<usize>() as i64);
        self.queue_depth.set(now.queued as i64);
        self.client_connections.set(now.client_connections as i64);
        self.registered.set(i64::from(now.registered));
        self.maintenance.set(i64::from(now.maintenance));
        m::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sets_the_snapshot_gauges() {
        let metrics = LbMetrics::new("echo");
        metrics.rejected(Reject::QueueFull);
        metrics.calls.start("echo").finish(Outcome::Ok);
        metrics.restarted(RestartReason::Recycled);
        metrics.boot_failures.inc();
        metrics.config_reload(false);
        let load = |id, inflight, capacity, active| WorkerLoad {
            id,
            inflight,
            capacity,
            active,
            hung: false,
        };
        let text = String::from_utf8(metrics.render(&Snapshot {
            workers: vec![
                load(1, 2, 2, true),
                load(2, 0, 4, true),
                load(3, 1, 1, false),
                WorkerLoad {
                    hung: true,
                    ..load(4, 1, 1, false)
                },
            ],
            booting: 3,
            queued: 5,
            client_connections: 2,
            registered: true,
            maintenance: false,
        }))
        .unwrap();
        for line in [
            r#"rpc_lb_workers{state="ready"} 2"#,
            r#"rpc_lb_workers{state="stopping"} 1"#,
            r#"rpc_lb_workers{state="hung"} 1"#,
            r#"rpc_lb_workers{state="booting"} 3"#,
            "rpc_lb_workers_busy 3",
            "rpc_lb_worker_slots 6",
            "rpc_lb_worker_slots_busy 4",
            r#"rpc_lb_worker_restarts_total{reason="recycled"} 1"#,
            r#"rpc_lb_worker_restarts_total{reason="exit"} 0"#,
            "rpc_lb_worker_boot_failures_total 1",
            r#"rpc_lb_config_reloads_total{result="error"} 1"#,
            r#"rpc_lb_config_reloads_total{result="ok"} 0"#,
            "rpc_lb_queue_depth 5",
            "rpc_lb_client_connections 2",
            "rpc_lb_zookeeper_registered 1",
            "rpc_lb_maintenance 0",
            r#"rpc_lb_rejected_requests_total{reason="queue_full",service="echo"} 1"#,
            r#"rpc_lb_rejected_requests_total{reason="no_worker",service="echo"} 0"#,
            r#"rpc_lb_requests_total{method="echo",outcome="ok",service="echo"} 1"#,
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn outcome_indexes_match_their_place() {
        use rpc_metrics::Outcome as _;
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i);
        }
        assert_eq!(Outcome::from(Reject::Stopping).label(), "stopping");
    }
}
