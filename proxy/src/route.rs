//! The routing table: service name to its endpoints, fed by discovery events and read on
//! every call. Picks an endpoint by power of two choices on load (calls outstanding plus the
//! penalty of recent failures, [`crate::resilience`]), skipping endpoints in reconnect backoff
//! and ejected ones (but for their probe; over all of them when every endpoint is ejected).
//! Sits between discovery (ZooKeeper, or a static source in tests) and the client
//! connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use rpc_config::Address;
use rpc_registry::DiscoveryEvent;
use tokio::sync::Notify;

use crate::metrics::{Metrics, Outcome, ServiceCalls, UNKNOWN};
use crate::resilience::{Admission, ServiceHealth};
use crate::upstream::{Endpoint, SharedSettings, UpstreamSettings};

/// The endpoints of one service at one moment (replaced whole on every change).
#[derive(Debug)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// Endpoints offered to new calls.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Endpoints gone from ZooKeeper that still had a connection open at the last change:
    /// offered to no call, shown as `draining` until their connections close.
    pub draining: Vec<Arc<Endpoint>>,
    /// The service's call metrics (the same handles across table changes).
    pub calls: &'static ServiceCalls,
    /// Its retry budget and ejection count (the same across table changes).
    pub health: Arc<ServiceHealth>,
}

/// The endpoint chosen for a call.
#[derive(Debug)]
pub struct Pick {
    /// Where the call goes.
    pub endpoint: Arc<Endpoint>,
    /// Whether the call probes an ejected endpoint (its verdict readmits or ejects again).
    pub probe: bool,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Not in ZooKeeper.
    Unknown,
    /// Known, with its current endpoints (maybe none).
    Found(Arc<Service>),
}

/// Why no endpoint was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// The service has no endpoint at all.
    Empty,
    /// Every endpoint not yet tried is in reconnect backoff.
    AllBackingOff,
}

/// How one candidate endpoint stands for a call.
enum Candidate {
    /// Tried already or in backoff.
    Unusable,
    /// Ejected, and its probe not due or out.
    Ejected,
    /// Its probe: this call.
    Probe,
    /// Open, with its load.
    Open(usize),
}

// === impl Service ===

impl Service {
    /// Power of two choices on load among endpoints not in `tried`, not in backoff and not
    /// ejected. An ejected endpoint due for its probe is picked for it at once; when every
    /// usable endpoint is ejected, the least loaded of them takes the call (as a probe).
    ///
    /// # Errors
    /// [`NoPick`] when no endpoint qualifies.
    pub fn pick(&self, tried: &[Arc<Endpoint>]) -> Result<Pick, NoPick> {
        let candidate = |e: &Arc<Endpoint>| {
            if e.in_backoff() || tried.iter().any(|t| Arc::ptr_eq(t, e)) {
                return Candidate::Unusable;
            }
            match e.admission() {
                Admission::Open => Candidate::Open(e.load()),
                Admission::Probe => Candidate::Probe,
                Admission::Ejected => Candidate::Ejected,
            }
        };
        let open = |e: &Arc<Endpoint>| Pick {
            endpoint: e.clone(),
            probe: false,
        };
        let probe = |e: &Arc<Endpoint>| Pick {
            endpoint: e.clone(),
            probe: true,
        };
        let n = self.endpoints.len();
        if n == 0 {
            return Err(NoPick::Empty);
        }
        if n > 1 {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let b = (a + rng.random_range(1..n)) % n;
            let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
            match candidate(ea) {
                Candidate::Probe => return Ok(probe(ea)),
                Candidate::Open(load_a) => {
                    return Ok(match candidate(eb) {
                        Candidate::Probe => probe(eb),
                        Candidate::Open(load_b) if load_b < load_a => open(eb),
                        _ => open(ea),
                    });
                }
                Candidate::Unusable | Candidate::Ejected => match candidate(eb) {
                    Candidate::Probe => return Ok(probe(eb)),
                    Candidate::Open(_) => return Ok(open(eb)),
                    Candidate::Unusable | Candidate::Ejected => {}
                },
            }
        }
        // Neither sample (or the only endpoint) qualifies: the least loaded open one, else a
        // probe that is due, else the least loaded usable one, ejected or not.
        let mut best_open: Option<(usize, &Arc<Endpoint>)> = None;
        let mut best_ejected: Option<(usize, &Arc<Endpoint>)> = None;
        for e in &self.endpoints {
            match candidate(e) {
                Candidate::Probe => return Ok(probe(e)),
                Candidate::Open(load) => {
                    if best_open.is_none_or(|(l, _)| load < l) {
                        best_open = Some((load, e));
                    }
                }
                Candidate::Ejected => {
                    let load = e.load();
                    if best_ejected.is_none_or(|(l, _)| load < l) {
                        best_ejected = Some((load, e));
                    }
                }
                Candidate::Unusable => {}
            }
        }
        match (best_open, best_ejected) {
            (Some((_, e)), _) => Ok(open(e)),
            // Every usable endpoint is ejected: balance over them all.
            (None, Some((_, e))) => Ok(probe(e)),
            (None, None) => Err(NoPick::AllBackingOff),
        }
    }
}

// === impl Router ===

/// The live routing table.
#[derive(Debug)]
pub struct Router {
    services: RwLock<HashMap<String, Arc<Service>>>,
    /// Every service's resilience state, kept when a service leaves the table (its counters
    /// live on in the metrics) and found again when it comes back.
    healths: Mutex<HashMap<String, Arc<ServiceHealth>>>,
    settings: SharedSettings,
    synced: AtomicBool,
    synced_notify: Notify,
    metrics: Arc<Metrics>,
}

impl Router {
    /// An empty table, not yet synced, with metrics of its own.
    pub fn new(settings: Arc<UpstreamSettings>) -> Self {
        Router::with_metrics(settings, Arc::new(Metrics::new()))
    }

    /// An empty table, not yet synced, counting calls in `metrics`.
    pub fn with_metrics(settings: Arc<UpstreamSettings>, metrics: Arc<Metrics>) -> Self {
        let settings = Arc::new(arc_swap::ArcSwap::new(settings));
        Router {
            services: RwLock::new(HashMap::new()),
            healths: Mutex::new(HashMap::new()),
            settings,
            synced: AtomicBool::new(false),
            synced_notify: Notify::new(),
            metrics,
        }
    }

    /// The upstream settings in force (a reload stores new ones here).
    pub fn settings(&self) -> &SharedSettings {
        &self.settings
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The call metrics of `service`, or of `unknown` when it is not in the table.
    pub fn calls_for(&self, service: &str) -> &'static ServiceCalls {
        match self.lookup(service) {
            Lookup::Found(found) => found.calls,
            Lookup::Unknown => self.metrics.unknown(),
        }
    }

    /// Counts a call refused before it was routed: under its service and method, or under
    /// `unknown` for both when the service is not in the table (a client-made name never
    /// becomes a label).
    pub fn count_refused(&self, service: &str, method: &str, outcome: Outcome) {
        match self.lookup(service) {
            Lookup::Found(found) => found.calls.record(method, outcome),
            Lookup::Unknown => self.metrics.unknown().record(UNKNOWN, outcome),
        }
    }

    /// Looks a service up.
    pub fn lookup(&self, service: &str) -> Lookup {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        match services.get(service) {
            Some(found) => Lookup::Found(found.clone()),
            None => Lookup::Unknown,
        }
    }

    /// Whether the first full read of discovery has arrived.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Waits until the first full read, at most `bound`.
    pub async fn wait_synced(&self, bound: Duration) {
        if self.is_synced() {
            return;
        }
        let _ = tokio::time::timeout(bound, async {
            loop {
                let notified = self.synced_notify.notified();
                if self.is_synced() {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    /// A copy of the table for status output: service to endpoints.
    pub fn snapshot(&self) -> Vec<Arc<Service>> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = services.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The resilience state of `service`, made on first use.
    fn health(&self, service: &str) -> Arc<ServiceHealth> {
        let mut healths = self.healths.lock().unwrap_or_else(|e| e.into_inner());
        healths
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(ServiceHealth::new(
                    service,
                    self.settings.clone(),
                    self.metrics.health(service),
                ))
            })
            .clone()
    }

    /// Applies one discovery event. Endpoints that disappear are drained, not cut.
    pub fn apply(&self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Endpoints { service, endpoints } => {
                let (old, was_draining) = match self.lookup(&service) {
                    Lookup::Found(s) => (s.endpoints.clone(), s.draining.clone()),
                    Lookup::Unknown => (Vec::new(), Vec::new()),
                };
                let health = self.health(&service);
                let mut fresh = Vec::with_capacity(endpoints.len());
                for endpoint in &endpoints {
                    let address = match Address::parse("frontend", endpoint.info.frontend.trim()) {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(service, node = endpoint.node, error = %e, "endpoint skipped");
                            continue;
                        }
                    };
                    if fresh
                        .iter()
                        .any(|e: &Arc<Endpoint>| e.address() == &address)
                    {
                        continue;
                    }
                    let reused = old
                        .iter()
                        .find(|e| e.address() == &address && !e.is_draining());
                    let kept = match reused {
                        Some(e) => e.clone(),
                        None => {
                            tracing::info!(service, endpoint = %address, "endpoint added");
                            Endpoint::new(address, self.settings.clone(), health.clone())
                        }
                    };
                    kept.set_marks(endpoint.info.marks == 1);
                    fresh.push(kept);
                }
                for gone in old
                    .iter()
                    .filter(|o| !fresh.iter().any(|f| Arc::ptr_eq(f, o)))
                {
                    tracing::info!(
                        service,
                        endpoint = gone.label(),
                        "endpoint removed, draining"
                    );
                    gone.drain();
                }
                let draining = was_draining
                    .iter()
                    .chain(
                        old.iter()
                            .filter(|o| !fresh.iter().any(|f| Arc::ptr_eq(f, o))),
                    )
                    .filter(|e| e.is_connected())
                    .cloned()
                    .collect();
                health.set_endpoints(fresh.len());
                let entry = Arc::new(Service {
                    calls: self.metrics.calls.service(&service),
                    name: service.clone(),
                    endpoints: fresh,
                    draining,
                    health,
                });
                let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
                services.insert(service, entry);
            }
            DiscoveryEvent::ServiceRemoved { service } => {
                let removed = {
                    let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
                    services.remove(&service)
                };
                if let Some(removed) = removed {
                    tracing::info!(service, "service removed");
                    removed.health.set_endpoints(0);
                    removed.endpoints.iter().for_each(|e| e.drain());
                }
            }
            DiscoveryEvent::Synced => {
                if !self.synced.swap(true, Ordering::AcqRel) {
                    let count = self
                        .services
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .len();
                    tracing::info!(services = count, "routing table complete");
                }
                self.synced_notify.notify_waiters();
            }
            DiscoveryEvent::Session(state) => {
                // Discovery logs each change at info already.
                if self.metrics.zk_session(state) {
                    tracing::debug!(?state, "zookeeper session");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_registry::{Endpoint as Discovered, EndpointInfo};

    fn settings() -> Arc<UpstreamSettings> {
        Arc::new(UpstreamSettings {
            max_pending: 100,
            ..UpstreamSettings::default()
        })
    }

    fn endpoints(service: &str, frontends: &[&str]) -> DiscoveryEvent {
        DiscoveryEvent::Endpoints {
            service: service.to_owned(),
            endpoints: frontends
                .iter()
                .map(|f| Discovered {
                    node: rpc_registry::service_id(f),
                    info: EndpointInfo {
                        service: service.to_owned(),
                        frontend: (*f).to_owned(),
                        ..Default::default()
                    },
                })
                .collect(),
        }
    }

    fn found(router: &Router, service: &str) -> Arc<Service> {
        match router.lookup(service) {
            Lookup::Found(s) => s,
            Lookup::Unknown => panic!("{service} unknown"),
        }
    }

    #[test]
    fn endpoints_are_kept_across_updates_and_removed_ones_drain() {
        let router = Router::new(settings());
        router.apply(endpoints("echo", &["127.0.0.1:1", "127.0.0.1:2"]));
        let first = found(&router, "echo");
        router.apply(endpoints("echo", &["127.0.0.1:2", "127.0.0.1:3"]));
        let second = found(&router, "echo");
        assert_eq!(second.endpoints.len(), 2);
        assert!(
            Arc::ptr_eq(&first.endpoints[1], &second.endpoints[0]),
            "unchanged endpoint reused"
        );
        assert!(first.endpoints[0].is_draining(), "removed endpoint drains");
        assert_eq!(first.endpoints[0].state(), "draining");
        assert!(
            second.draining.is_empty(),
            "never connected: nothing to finish, not shown"
        );
        assert!(!second.endpoints[0].is_draining());
    }

    #[test]
    fn unknown_until_listed_and_after_removal() {
        let router = Router::new(settings());
        assert!(matches!(router.lookup("echo"), Lookup::Unknown));
        router.apply(endpoints("echo", &[]));
        assert_eq!(found(&router, "echo").pick(&[]).unwrap_err(), NoPick::Empty);
        router.apply(endpoints("echo", &["/tmp/x.sock"]));
        let service = found(&router, "echo");
        assert!(matches!(service.endpoints[0].address(), Address::Unix(_)));
        router.apply(DiscoveryEvent::ServiceRemoved {
            service: "echo".into(),
        });
        assert!(matches!(router.lookup("echo"), Lookup::Unknown));
        assert!(service.endpoints[0].is_draining());
    }

    #[test]
    fn pick_skips_ejected_endpoints_unless_all_are() {
        let router = Router::new(settings());
        router.apply(endpoints("echo", &["127.0.0.1:1", "127.0.0.1:2"]));
        let service = found(&router, "echo");
        let sick = &service.endpoints[0];
        for _ in 0..5 {
            sick.record(crate::resilience::Verdict::Failed, false);
        }
        assert_eq!(sick.state(), "ejected");
        for _ in 0..100 {
            let pick = service.pick(&[]).unwrap();
            assert!(Arc::ptr_eq(&pick.endpoint, &service.endpoints[1]));
            assert!(!pick.probe);
        }
        // The healthy one tried already: the ejected one is all there is, as a probe.
        let tried = vec![service.endpoints[1].clone()];
        let pick = service.pick(&tried).unwrap();
        assert!(Arc::ptr_eq(&pick.endpoint, sick) && pick.probe);
        // Removed from the table, it no longer counts as ejected.
        router.apply(endpoints("echo", &["127.0.0.1:2"]));
        assert_eq!(found(&router, "echo").health.ejected(), 0);
    }

    #[test]
    fn recent_failures_weigh_on_the_choice() {
        let router = Router::new(settings());
        router.apply(endpoints("echo", &["127.0.0.1:1", "127.0.0.1:2"]));
        let service = found(&router, "echo");
        service.endpoints[0].record(crate::resilience::Verdict::Failed, false);
        for _ in 0..100 {
            let pick = service.pick(&[]).unwrap();
            assert!(
                Arc::ptr_eq(&pick.endpoint, &service.endpoints[1]),
                "a failure a moment ago weighs a call"
            );
        }
    }

    #[test]
    fn pick_spreads_and_respects_tried() {
        let router = Router::new(settings());
        router.apply(endpoints(
            "echo",
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        ));
        let service = found(&router, "echo");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(service.pick(&[]).unwrap().endpoint.label().to_owned());
        }
        assert_eq!(seen.len(), 3, "every idle endpoint gets picked");
        let tried = vec![service.endpoints[0].clone(), service.endpoints[1].clone()];
        for _ in 0..50 {
            assert!(Arc::ptr_eq(
                &service.pick(&tried).unwrap().endpoint,
                &service.endpoints[2]
            ));
        }
        let all = service.endpoints.clone();
        assert_eq!(service.pick(&all).unwrap_err(), NoPick::AllBackingOff);
    }

    #[test]
    fn refusals_of_unknown_services_count_under_unknown() {
        let router = Router::new(settings());
        router.count_refused("nosuch", "garbage", Outcome::Overloaded);
        router.apply(endpoints("echo", &[]));
        router.count_refused("echo", "echo", Outcome::Overloaded);
        let unknown = router.metrics().unknown();
        assert_eq!(unknown.method(UNKNOWN).count(Outcome::Overloaded), 1);
        assert_eq!(unknown.totals().calls, 1, "no `garbage` method");
        let echo = router.calls_for("echo");
        assert_eq!(echo.method("echo").count(Outcome::Overloaded), 1);
        assert!(std::ptr::eq(echo, found(&router, "echo").calls));
    }

    #[tokio::test]
    async fn wait_synced_returns_on_sync_or_bound() {
        let router = Arc::new(Router::new(settings()));
        let start = std::time::Instant::now();
        router.wait_synced(Duration::from_millis(50)).await;
        assert!(start.elapsed() >= Duration::from_millis(50));
        let r = router.clone();
        let waiter = tokio::spawn(async move { r.wait_synced(Duration::from_secs(30)).await });
        router.apply(DiscoveryEvent::Synced);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(router.is_synced());
    }
}
