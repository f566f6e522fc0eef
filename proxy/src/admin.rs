//! The proxy's admin routes (`admin_address`): `GET /healthz`, `GET /metrics`,
//! `GET /status`, and the status page `GET /` with the last minute of each service behind it
//! (`GET /status/history`, sampled by [`history`]; drawn by [`page`]). They read the routing
//! table and the metrics; nothing here is on the call path.

pub mod history;
pub mod page;

use std::sync::Arc;

use rpc_admin::{Response, Routes};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::history::History;
use crate::metrics::{ServiceEndpoints, Snapshot};
use crate::route::{Router, Service};
use crate::upstream::Endpoint;

/// Whether the proxy takes calls, as `/healthz` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Before the first full read of ZooKeeper: calls are held (503).
    Starting,
    /// Routing calls (200).
    Serving,
    /// Draining after SIGTERM (503).
    Stopping,
}

impl Health {
    /// The health of a proxy whose stop starts with `shutdown`.
    pub fn of(router: &Router, shutdown: &CancellationToken) -> Self {
        if shutdown.is_cancelled() {
            Health::Stopping
        } else if router.is_synced() {
            Health::Serving
        } else {
            Health::Starting
        }
    }

    /// The word used in `/healthz` and `/status`.
    pub fn label(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Serving => "serving",
            Health::Stopping => "stopping",
        }
    }

    /// The `/healthz` answer.
    pub fn response(self) -> Response {
        let status = if self == Health::Serving { 200 } else { 503 };
        Response::text(status, self.label())
    }
}

/// The admin routes of a proxy whose stop starts with `shutdown`. Starts the sampler of the
/// page's charts on the current tokio runtime (none outside one); it ends once the routes
/// are dropped.
pub fn routes(router: Arc<Router>, shutdown: CancellationToken) -> Routes {
    let history = Arc::new(History::new());
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(history::run(Arc::downgrade(&history), router.clone()));
    }
    let (health_router, health_stop) = (router.clone(), shutdown.clone());
    let metrics_router = router.clone();
    let (status_router, status_stop) = (router.clone(), shutdown.clone());
    let past = history.clone();
    Routes::new()
        .get("/", move |_| {
            let body = page::body(&status(&router, &shutdown), &history.to_json());
            rpc_admin::page::html_page("rpc_proxy status", &body, page::SCRIPT)
        })
        .get("/healthz", move |_| {
            Health::of(&health_router, &health_stop).response()
        })
        .get("/metrics", move |_| {
            let now = snapshot(&metrics_router);
            Response::prometheus(metrics_router.metrics().render(&now))
        })
        .get("/status", move |_| {
            Response::json(200, &status(&status_router, &status_stop))
        })
        .get("/status/history", move |_| {
            Response::json(200, &past.to_json())
        })
}

/// What the routing-table gauges show: each service with its endpoints' states, and
/// whether the table is synced.
pub fn snapshot(router: &Router) -> Snapshot {
    Snapshot {
        services: router
            .snapshot()
            .iter()
            .map(|service| ServiceEndpoints {
                name: service.name.clone(),
                states: shown_endpoints(service).map(|e| e.state()).collect(),
            })
            .collect(),
        synced: router.is_synced(),
    }
}

/// The endpoints status output shows for `service`: those offered to calls, then those still
/// draining (gone from ZooKeeper, a connection still open).
fn shown_endpoints(service: &Service) -> impl Iterator<Item = &Arc<Endpoint>> {
    service
        .endpoints
        .iter()
        .chain(service.draining.iter().filter(|e| e.is_connected()))
}

/// The `/status` document: health, ZooKeeper, and the routing table with each endpoint's
/// state, calls outstanding and outlier counts, and each service's retries and ejections.
pub fn status(router: &Router, shutdown: &CancellationToken) -> serde_json::Value {
    let metrics = router.metrics();
    let services: Vec<_> = router
        .snapshot()
        .iter()
        .map(|service| {
            let totals = service.calls.totals();
            let endpoints: Vec<_> = shown_endpoints(service)
                .map(|e| {
                    json!({
                        "address": e.label(),
                        "state": e.state(),
                        "outstanding": e.outstanding(),
                        "marks": e.marks(),
                        "consecutive_failures": e.outlier().consecutive_failures(),
                        "ejections": e.outlier().ejections(),
                    })
                })
                .collect();
            let health = service.health.metrics();
            json!({
                "name": service.name,
                "endpoints": endpoints,
                "inflight": service.calls.inflight(),
                "calls": totals.calls,
                "errors": totals.errors,
                "ejected": service.health.ejected(),
                "ejections": health.ejections_consecutive.get() + health.ejections_failed_probe.get(),
                "retries": {
                    "not_sent": health.retries_not_sent.get(),
                    "refused": health.retries_refused.get(),
                },
                "retry_budget_exhausted": health.budget_exhausted.get(),
            })
        })
        .collect();
    let unknown = metrics.unknown().totals();
    json!({
        "binary": "rpc_proxy",
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "state": Health::of(router, shutdown).label(),
        "synced": router.is_synced(),
        "zookeeper": metrics.zk_state().label(),
        "client_connections": metrics.client_connections.get(),
        "unknown_service_calls": unknown.calls,
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_admin::Request;
    use rpc_registry::{DiscoveryEvent, Endpoint, EndpointInfo};

    use crate::upstream::UpstreamSettings;

    fn router() -> Arc<Router> {
        Arc::new(Router::new(Arc::new(UpstreamSettings {
            max_pending: 100,
            ..UpstreamSettings::default()
        })))
    }

    fn endpoints(service: &str, frontend: &str) -> DiscoveryEvent {
        DiscoveryEvent::Endpoints {
            service: service.into(),
            endpoints: vec![Endpoint {
                node: "n".into(),
                info: EndpointInfo {
                    service: service.into(),
                    frontend: frontend.into(),
                    ..Default::default()
                },
            }],
        }
    }

    async fn get(routes: &Routes, path: &str) -> (u16, String) {
        let r = routes.dispatch(&Request::new("GET", path)).await;
        (r.status, String::from_utf8(r.body).unwrap())
    }

    #[tokio::test]
    async fn healthz_follows_sync_and_stop() {
        let router = router();
        let stop = CancellationToken::new();
        let routes = routes(router.clone(), stop.clone());
        assert_eq!(get(&routes, "/healthz").await, (503, "starting\n".into()));
        router.apply(DiscoveryEvent::Synced);
        assert_eq!(get(&routes, "/healthz").await, (200, "serving\n".into()));
        stop.cancel();
        assert_eq!(get(&routes, "/healthz").await, (503, "stopping\n".into()));
    }

    #[tokio::test]
    async fn status_and_metrics_show_the_routing_table() {
        let router = router();
        router.apply(endpoints("echo", "127.0.0.1:1"));
        router.apply(DiscoveryEvent::Synced);
        router
            .calls_for("echo")
            .start("echo")
            .finish(crate::metrics::Outcome::Ok);
        let routes = routes(router.clone(), CancellationToken::new());
        let (code, body) = get(&routes, "/status").await;
        assert_eq!(code, 200);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["state"], "serving");
        assert_eq!(doc["zookeeper"], "connecting");
        assert_eq!(doc["services"][0]["name"], "echo");
        assert_eq!(doc["services"][0]["calls"], 1);
        assert_eq!(
            doc["services"][0]["endpoints"][0],
            json!({"address": "127.0.0.1:1", "state": "idle", "outstanding": 0,
                "marks": false, "consecutive_failures": 0, "ejections": 0})
        );
        assert_eq!(doc["services"][0]["ejected"], 0);
        assert_eq!(
            doc["services"][0]["retries"],
            json!({"not_sent": 0, "refused": 0})
        );
        let (code, text) = get(&routes, "/metrics").await;
        assert_eq!(code, 200);
        for line in [
            r#"rpc_proxy_upstream_endpoints{service="echo",state="idle"} 1"#,
            r#"rpc_proxy_upstream_endpoints{service="echo",state="connected"} 0"#,
            r#"rpc_proxy_requests_total{method="echo",outcome="ok",service="echo"} 1"#,
            "rpc_proxy_services 1",
            "rpc_proxy_routing_table_synced 1",
            r#"rpc_proxy_retries_total{reason="refused",service="echo"} 0"#,
            r#"rpc_proxy_retry_budget_exhausted_total{service="echo"} 0"#,
            r#"rpc_proxy_ejections_total{reason="consecutive_failures",service="echo"} 0"#,
            r#"rpc_proxy_ejected_endpoints{service="echo"} 0"#,
            "process_open_fds",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // A service that leaves the table leaves the endpoint gauges too.
        router.apply(DiscoveryEvent::ServiceRemoved {
            service: "echo".into(),
        });
        let (_, text) = get(&routes, "/metrics").await;
        assert!(!text.contains("rpc_proxy_upstream_endpoints{"), "{text}");
    }

    #[tokio::test]
    async fn page_shows_the_table_with_names_escaped() {
        const HOSTILE: &str = r#"<script>alert(1)</script>"'&"#;
        const ESCAPED: &str = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;";
        let router = router();
        router.apply(endpoints(HOSTILE, "127.0.0.1:1"));
        router.apply(endpoints("echo", "127.0.0.1:2"));
        router.apply(DiscoveryEvent::Synced);
        let routes = routes(router.clone(), CancellationToken::new());
        router
            .calls_for("echo")
            .start("echo")
            .finish(crate::metrics::Outcome::Ok);
        let r = routes.dispatch(&Request::new("GET", "/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "text/html; charset=utf-8");
        assert!(
            r.headers
                .iter()
                .any(|(name, value)| name == "Content-Security-Policy"
                    && value.starts_with("default-src 'none'")),
            "{:?}",
            r.headers
        );
        let html = String::from_utf8(r.body).unwrap();
        assert_eq!(html.matches("<script").count(), 1, "only the page's own");
        assert!(!html.contains("alert(1)</script>"), "{html}");
        assert!(html.contains(&format!(r#"<tr class="service" data-service="{ESCAPED}">"#)));
        assert!(html.contains(&format!(r#"<th scope="row">{ESCAPED}</th>"#)));
        assert!(html.contains(r#"<tr class="service" data-service="echo">"#));
        assert_eq!(
            html.matches(r#"<tr class="endpoint" data-state="idle""#)
                .count(),
            2
        );

        // The history route has every routed service from the sampler's first reading on
        // (taken as soon as it runs).
        let names = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let (code, body) = get(&routes, "/status/history").await;
                assert_eq!(code, 200);
                let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(doc["window"], history::WINDOW);
                let names: Vec<String> = doc["services"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["name"].as_str().unwrap().to_owned())
                    .collect();
                if !names.is_empty() {
                    return names;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the sampler reads the table");
        assert_eq!(names, [HOSTILE, "echo"]);
        // The page's script fetches these two routes, relative to the page.
        assert!(html.contains(r#"poll(["status", "status/history"], render);"#));
    }
}
