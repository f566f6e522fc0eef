//! The LB's admin routes (`lb_admin_address`, else `admin_address`): `GET /healthz`,
//! `GET /metrics`, `GET /status`, and the maintenance switch `POST /drain` / `POST /resume`.
//!
//! `POST /drain` deletes the ZooKeeper node as SIGTERM does, but the LB stays up: it keeps
//! serving what proxies still send and does not register again when workers come and go,
//! until `POST /resume`. The main loop in `lib.rs` owns the registration; these routes only
//! flip the maintenance flag it watches, then wait (bounded) to see the node follow.

use std::sync::Arc;
use std::time::Duration;

use rpc_admin::{Response, Routes};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::front::Activity;
use crate::metrics::{LbMetrics, Snapshot};

/// Longest wait of `/drain` and `/resume` for the node to follow.
pub const SWITCH_WAIT: Duration = Duration::from_secs(10);

/// What the admin routes and the status line read.
#[derive(Debug)]
pub struct LbState {
    /// The service served.
    pub service: String,
    /// The scheduler (workers, queue).
    pub dispatcher: Arc<Dispatcher>,
    /// Proxy connections.
    pub activity: Arc<Activity>,
    /// Whether the ZooKeeper node exists.
    pub registered: watch::Receiver<bool>,
    /// The maintenance flag (`POST /drain` sets it, `POST /resume` clears it).
    pub maintenance: watch::Sender<bool>,
    /// Cancelled when the graceful stop starts.
    pub shutdown: CancellationToken,
    /// The LB's metrics.
    pub metrics: Arc<LbMetrics>,
}

/// Whether the LB takes traffic, as `/healthz` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The node exists: proxies route here (200).
    Serving,
    /// No node: no worker yet, or ZooKeeper not reached (503).
    Unregistered,
    /// Drained by `POST /drain` (503).
    Maintenance,
    /// Draining after SIGTERM (503).
    Stopping,
}

impl Health {
    /// The word used in `/healthz` and `/status`.
    pub fn label(self) -> &'static str {
        match self {
            Health::Serving => "serving",
            Health::Unregistered => "unregistered",
            Health::Maintenance => "maintenance",
            Health::Stopping => "stopping",
        }
    }
}

// === impl LbState ===

impl LbState {
    /// The health now.
    pub fn health(&self) -> Health {
        if self.shutdown.is_cancelled() {
            Health::Stopping
        } else if *self.maintenance.borrow() {
            Health::Maintenance
        } else if *self.registered.borrow() {
            Health::Serving
        } else {
            Health::Unregistered
        }
    }

    /// What the gauges show.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            workers: self.dispatcher.loads(),
            queued: self.dispatcher.queued(),
            client_connections: self.activity.connections(),
            registered: *self.registered.borrow(),
            maintenance: *self.maintenance.borrow(),
        }
    }

    /// The `/status` document: health, registration, and every worker with its load and
    /// its pid (`null` until a HELLO tells it).
    pub fn status(&self) -> serde_json::Value {
        let now = self.snapshot();
        let totals = self.metrics.calls.totals();
        let workers: Vec<_> = self
            .dispatcher
            .workers()
            .iter()
            .map(|w| {
                json!({
                    "id": w.load.id,
                    "pid": w.pid,
                    "inflight": w.load.inflight,
                    "capacity": w.load.capacity,
                    "active": w.load.active,
                })
            })
            .collect();
        json!({
            "binary": "rpc_lb",
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "service": self.service,
            "state": self.health().label(),
            "registered": now.registered,
            "maintenance": now.maintenance,
            "client_connections": now.client_connections,
            "queue_depth": now.queued,
            "inflight": self.metrics.calls.inflight(),
            "calls": totals.calls,
            "errors": totals.errors,
            "workers": workers,
        })
    }

    /// `POST /drain` and `POST /resume`: sets maintenance to `on`, then waits (at most
    /// [`SWITCH_WAIT`]) for the node to be gone, or back when there is a worker.
    async fn switch(self: Arc<Self>, on: bool) -> Response {
        if self.shutdown.is_cancelled() {
            return Response::json(409, &json!({"error": "the LB is stopping"}));
        }
        if self.maintenance.send_replace(on) != on {
            if on {
                tracing::info!("maintenance (POST /drain): deregistering, still serving");
            } else {
                tracing::info!("maintenance over (POST /resume)");
            }
        }
        let expect_registered = !on && self.dispatcher.active_workers() > 0;
        let mut registered = self.registered.clone();
        let settled = tokio::time::timeout(
            SWITCH_WAIT,
            registered.wait_for(|r| *r == expect_registered),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let status = if settled || (!on && !expect_registered) {
            200
        } else {
            202
        };
        Response::json(
            status,
            &json!({
                "maintenance": *self.maintenance.borrow(),
                "registered": *self.registered.borrow(),
                "workers": self.dispatcher.active_workers(),
            }),
        )
    }
}

/// The admin routes of an LB.
pub fn routes(state: Arc<LbState>) -> Routes {
    let health = state.clone();
    let metrics = state.clone();
    let status = state.clone();
    let drain = state.clone();
    let resume = state;
    Routes::new()
        .get("/healthz", move |_| {
            let now = health.health();
            let code = if now == Health::Serving { 200 } else { 503 };
            Response::text(code, now.label())
        })
        .get("/metrics", move |_| {
            Response::prometheus(metrics.metrics.render(&metrics.snapshot()))
        })
        .get("/status", move |_| Response::json(200, &status.status()))
        .route_async("POST", "/drain", move |_| drain.clone().switch(true))
        .route_async("POST", "/resume", move |_| resume.clone().switch(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_admin::Request;
    use tokio::sync::mpsc;

    fn state() -> (Arc<LbState>, watch::Sender<bool>, watch::Receiver<bool>) {
        let (registered_tx, registered) = watch::channel(false);
        let (maintenance, maintenance_rx) = watch::channel(false);
        let state = Arc::new(LbState {
            service: "echo".into(),
            dispatcher: Arc::new(Dispatcher::new(10)),
            activity: Arc::new(Activity::default()),
            registered,
            maintenance,
            shutdown: CancellationToken::new(),
            metrics: Arc::new(LbMetrics::new("echo")),
        });
        (state, registered_tx, maintenance_rx)
    }

    async fn call(routes: &Routes, method: &str, path: &str) -> (u16, String) {
        let r = routes.dispatch(&Request::new(method, path)).await;
        (r.status, String::from_utf8(r.body).unwrap())
    }

    #[tokio::test]
    async fn healthz_is_200_only_while_registered_and_not_drained() {
        let (state, registered, _m) = state();
        let routes = routes(state.clone());
        assert_eq!(
            call(&routes, "GET", "/healthz").await,
            (503, "unregistered\n".into())
        );
        registered.send_replace(true);
        assert_eq!(
            call(&routes, "GET", "/healthz").await,
            (200, "serving\n".into())
        );
        state.maintenance.send_replace(true);
        assert_eq!(call(&routes, "GET", "/healthz").await.0, 503);
        state.maintenance.send_replace(false);
        state.shutdown.cancel();
        assert_eq!(
            call(&routes, "GET", "/healthz").await,
            (503, "stopping\n".into())
        );
        assert_eq!(call(&routes, "POST", "/resume").await.0, 409);
    }

    #[tokio::test]
    async fn drain_sets_maintenance_and_waits_for_the_node() {
        let (state, registered, mut maintenance) = state();
        let (tx, _rx) = mpsc::unbounded_channel();
        state.dispatcher.add_worker(tx, 2, None);
        registered.send_replace(true);
        let routes = Arc::new(routes(state.clone()));
        let r = routes.clone();
        let drain = tokio::spawn(async move { call(&r, "POST", "/drain").await });
        // The main loop's part: see maintenance, delete the node.
        maintenance.wait_for(|m| *m).await.unwrap();
        registered.send_replace(false);
        let (code, body) = drain.await.unwrap();
        assert_eq!(code, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["maintenance"], true);
        assert_eq!(doc["registered"], false);
        let r = routes.clone();
        let resume = tokio::spawn(async move { call(&r, "POST", "/resume").await });
        maintenance.wait_for(|m| !*m).await.unwrap();
        registered.send_replace(true);
        assert_eq!(resume.await.unwrap().0, 200);
        let (_, status) = call(&routes, "GET", "/status").await;
        let doc: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(doc["state"], "serving");
        assert_eq!(
            doc["workers"][0],
            json!({"id": 1, "pid": null, "inflight": 0, "capacity": 2, "active": true})
        );
        let (code, text) = call(&routes, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            text.contains(r#"rpc_lb_workers{state="active"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn status_shows_each_workers_pid_once_known() {
        let (state, _registered, _m) = state();
        let (tx1, _rx1) = mpsc::unbounded_channel();
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let by_hello = state.dispatcher.add_worker(tx1, 4, Some(4242));
        let by_echo = state.dispatcher.add_worker(tx2, 1, None);
        let routes = routes(state.clone());
        let workers = |body: String| {
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
            doc["workers"].clone()
        };
        let (code, body) = call(&routes, "GET", "/status").await;
        assert_eq!(code, 200);
        assert_eq!(
            workers(body),
            json!([
                {"id": by_hello, "pid": 4242, "inflight": 0, "capacity": 4, "active": true},
                {"id": by_echo, "pid": null, "inflight": 0, "capacity": 1, "active": true},
            ])
        );
        // The old worker sends a HELLO after all.
        state.dispatcher.hello(by_echo, 2, Some(99));
        let (_, body) = call(&routes, "GET", "/status").await;
        assert_eq!(workers(body)[1]["pid"], 99);
    }
}
