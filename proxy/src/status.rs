//! The periodic status log line (`status_interval_ms`, default 10 s, off when 0): one
//! `status` line for the whole proxy, then one `service status` line for each service that
//! had calls since the last line or has calls in flight. Counts are for the interval, so
//! a quiet proxy logs one line per period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rpc_metrics::Totals;

use crate::route::Router;

/// Logs a status line every `every`, forever (the caller aborts the task).
pub async fn run(router: Arc<Router>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = HashMap::new();
    loop {
        tick.tick().await;
        log_once(&router, &mut last);
    }
}

/// What one status line says about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    service: String,
    endpoints: usize,
    connected: usize,
    calls: u64,
    errors: u64,
    inflight: u64,
}

/// Computes the lines since `last` (which it updates): per-service lines, and the totals.
fn lines(router: &Router, last: &mut HashMap<String, Totals>) -> (Vec<Line>, Line) {
    let mut per_service = Vec::new();
    let mut all = Line {
        service: String::new(),
        endpoints: 0,
        connected: 0,
        calls: 0,
        errors: 0,
        inflight: 0,
    };
    let unknown = router.metrics().unknown();
    let table = router.snapshot();
    let services = table
        .iter()
        .map(|s| (s.calls, s.endpoints.as_slice()))
        .chain(std::iter::once((unknown, &[][..])));
    for (calls, endpoints) in services {
        let now = calls.totals();
        let before = last
            .insert(calls.name().to_owned(), now)
            .unwrap_or_default();
        let line = Line {
            service: calls.name().to_owned(),
            endpoints: endpoints.len(),
            connected: endpoints
                .iter()
                .filter(|e| e.state() == "connected")
                .count(),
            calls: now.calls.saturating_sub(before.calls),
            errors: now.errors.saturating_sub(before.errors),
            inflight: calls.inflight(),
        };
        all.endpoints += line.endpoints;
        all.connected += line.connected;
        all.calls += line.calls;
        all.errors += line.errors;
        all.inflight += line.inflight;
        if line.calls > 0 || line.inflight > 0 {
            per_service.push(line);
        }
    }
    (per_service, all)
}

fn log_once(router: &Router, last: &mut HashMap<String, Totals>) {
    let (per_service, all) = lines(router, last);
    let metrics = router.metrics();
    tracing::info!(
        services = router.snapshot().len(),
        endpoints = all.endpoints,
        connected = all.connected,
        connections = metrics.client_connections.get(),
        calls = all.calls,
        errors = all.errors,
        inflight = all.inflight,
        zookeeper = metrics.zk_state().label(),
        "status"
    );
    for line in per_service {
        tracing::info!(
            service = line.service,
            endpoints = line.endpoints,
            connected = line.connected,
            calls = line.calls,
            errors = line.errors,
            inflight = line.inflight,
            "service status"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Outcome;
    use crate::upstream::UpstreamSettings;
    use rpc_registry::{DiscoveryEvent, Endpoint, EndpointInfo};

    #[test]
    fn lines_count_the_interval_and_skip_idle_services() {
        let router = Router::new(Arc::new(UpstreamSettings {
            max_pending: 100,
            ..UpstreamSettings::default()
        }));
        for service in ["a", "b"] {
            router.apply(DiscoveryEvent::Endpoints {
                service: service.into(),
                endpoints: vec![Endpoint {
                    node: "n".into(),
                    info: EndpointInfo {
                        frontend: "127.0.0.1:1".into(),
                        ..Default::default()
                    },
                }],
            });
        }
        let a = router.calls_for("a");
        a.start("m").finish(Outcome::Ok);
        a.start("m").finish(Outcome::Timeout);
        let held = a.start("m");
        let mut last = HashMap::new();
        let (per_service, all) = lines(&router, &mut last);
        assert_eq!(per_service.len(), 1, "b is idle: {per_service:?}");
        assert_eq!(
            per_service[0],
            Line {
                service: "a".into(),
                endpoints: 1,
                connected: 0,
                calls: 2,
                errors: 1,
                inflight: 1
            }
        );
        assert_eq!((all.endpoints, all.calls, all.inflight), (2, 2, 1));
        held.finish(Outcome::Ok);
        let (per_service, all) = lines(&router, &mut last);
        assert_eq!((per_service[0].calls, per_service[0].errors), (1, 0));
        assert_eq!(all.calls, 1, "only the interval's calls");
        let (per_service, _) = lines(&router, &mut last);
        assert!(per_service.is_empty());
    }
}
