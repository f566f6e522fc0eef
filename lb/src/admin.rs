//! The LB's admin routes (`lb_admin_address`, else `admin_address`): the status page `GET /`
//! ([`page`]), `GET /healthz`, `GET /metrics`, `GET /status`, the maintenance switch
//! `POST /drain` / `POST /resume`, and `POST /workers/restart` (a rolling restart of the
//! workers the LB started). Every `POST` is refused when it carries an `Origin` header or a
//! `Host` that is not the admin address ([`rpc_admin`]).
//!
//! `POST /drain` deletes the ZooKeeper node as SIGTERM does, but the LB stays up: it keeps
//! serving what proxies still send and does not register again when workers come and go,
//! until `POST /resume`. The main loop in `lib.rs` owns the registration; these routes only
//! flip the maintenance flag it watches, then wait (bounded) to see the node follow.

pub mod page;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rpc_admin::{Response, Routes};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, WorkerId, WorkerState};
use crate::front::Activity;
use crate::metrics::{LbMetrics, Snapshot};
use crate::supervisor::{RestartRefused, Supervisor};

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
    /// The workers the LB starts itself (none without `worker_command`).
    pub supervisor: Supervisor,
}

/// One worker as `/status` and the status line show it: a worker connection, or a worker
/// the LB started that has not joined yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// Its connection (`None` while booting).
    pub id: Option<WorkerId>,
    /// Its process, once known.
    pub pid: Option<u32>,
    /// Booting, ready, stopping or hung.
    pub state: WorkerState,
    /// Calls in flight on it.
    pub inflight: usize,
    /// Its capacity (0 while booting).
    pub capacity: usize,
    /// Whether it takes new calls.
    pub active: bool,
    /// Calls it finished.
    pub served: u64,
    /// How long it has held its oldest call.
    pub oldest_call: Option<Duration>,
    /// Its slot and generation, when the LB started it.
    pub slot: Option<usize>,
    /// Its generation (`RPC_WORKER_GENERATION`), when the LB started it.
    pub generation: Option<u64>,
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
            booting: self.supervisor.booting(),
            queued: self.dispatcher.queued(),
            client_connections: self.activity.connections(),
            registered: *self.registered.borrow(),
            maintenance: *self.maintenance.borrow(),
        }
    }

    /// Every worker: each connection (with the slot and generation of the process behind
    /// it when the LB started it), then each started worker not joined yet.
    pub fn workers(&self) -> Vec<WorkerView> {
        let supervised = self.supervisor.status();
        let mut procs: HashMap<u32, _> = supervised.workers.iter().map(|p| (p.pid, p)).collect();
        let mut views: Vec<WorkerView> = self
            .dispatcher
            .workers()
            .into_iter()
            .map(|w| {
                let process = w.pid.and_then(|pid| procs.get(&pid).copied());
                // The supervisor knows about stopping and hung before the connection shows it.
                let state = match process.map(|p| p.state) {
                    Some(s @ (WorkerState::Stopping | WorkerState::Hung)) => s,
                    _ => w.load.state(),
                };
                WorkerView {
                    id: Some(w.load.id),
                    pid: w.pid,
                    state,
                    inflight: w.load.inflight,
                    capacity: w.load.capacity,
                    active: w.load.active,
                    served: w.served,
                    oldest_call: w.oldest_call,
                    slot: process.map(|p| p.slot),
                    generation: process.map(|p| p.generation),
                }
            })
            .collect();
        for view in &views {
            if let Some(pid) = view.pid {
                procs.remove(&pid);
            }
        }
        let mut unjoined: Vec<_> = procs.into_values().collect();
        unjoined.sort_by_key(|p| (p.slot, p.pid));
        views.extend(unjoined.into_iter().map(|p| WorkerView {
            id: None,
            pid: Some(p.pid),
            state: p.state,
            inflight: 0,
            capacity: 0,
            active: false,
            served: 0,
            oldest_call: None,
            slot: Some(p.slot),
            generation: Some(p.generation),
        }));
        views
    }

    /// The `/status` document: health, registration, every worker (its load, pid, state,
    /// calls served, oldest call, and slot and generation when the LB started it) and the
    /// supervision (`null` without `worker_command`).
    pub fn status(&self) -> serde_json::Value {
        let now = self.snapshot();
        let totals = self.metrics.calls.totals();
        let workers: Vec<_> = self
            .workers()
            .iter()
            .map(|w| {
                json!({
                    "id": w.id,
                    "pid": w.pid,
                    "state": w.state.label(),
                    "inflight": w.inflight,
                    "capacity": w.capacity,
                    "active": w.active,
                    "served": w.served,
                    "oldest_call_ms": w.oldest_call.map(|d| d.as_millis() as u64),
                    "slot": w.slot,
                    "generation": w.generation,
                })
            })
            .collect();
        let supervised = self.supervisor.status();
        let supervision = supervised.command.as_ref().map(|command| {
            let restarting: Vec<_> = supervised
                .restarting
                .iter()
                .map(|r| {
                    json!({
                        "slot": r.slot,
                        "restart_in_ms": millis(r.wait),
                        "last_exit": r.last_exit,
                    })
                })
                .collect();
            json!({
                "command": command,
                "processes": supervised.processes,
                "generation": supervised.generation,
                "rolling_restart": supervised.rolling,
                "restarting": restarting,
            })
        });
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
            "supervision": supervision,
        })
    }

    /// `POST /workers/restart`: a rolling restart of the workers the LB started (202 with
    /// the generation they go to; 409 without `worker_command` or while stopping).
    fn restart_workers(&self) -> Response {
        match self.supervisor.rolling_restart("POST /workers/restart") {
            Ok(generation) => Response::json(
                202,
                &json!({"generation": generation, "rolling_restart": true}),
            ),
            Err(refused @ (RestartRefused::NotSupervised | RestartRefused::Stopping)) => {
                Response::json(409, &json!({"error": refused.to_string()}))
            }
        }
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
    let front_page = state.clone();
    let drain = state.clone();
    let resume = state.clone();
    let restart = state;
    Routes::new()
        .get("/", move |_| {
            let body = page::body(&front_page.status());
            rpc_admin::page::html_page("rpc_lb status", &body, page::SCRIPT)
        })
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
        .post("/workers/restart", move |_| restart.restart_workers())
}

/// Milliseconds of a duration, for log fields.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rpc_admin::Request;
    use tokio::sync::mpsc;

    fn state() -> (Arc<LbState>, watch::Sender<bool>, watch::Receiver<bool>) {
        let (registered_tx, registered) = watch::channel(false);
        let (maintenance, maintenance_rx) = watch::channel(false);
        let dispatcher = Arc::new(Dispatcher::new(10));
        let metrics = Arc::new(LbMetrics::new("echo"));
        let supervisor = Supervisor::spawn(
            crate::supervisor::SupervisorSettings {
                config: rpc_config::SupervisionConfig::default(),
                back_address: "back.sock".into(),
                service: "echo".into(),
                retire_grace: Duration::from_secs(1),
            },
            dispatcher.clone(),
            metrics.clone(),
        );
        let state = Arc::new(LbState {
            service: "echo".into(),
            dispatcher,
            activity: Arc::new(Activity::default()),
            registered,
            maintenance,
            shutdown: CancellationToken::new(),
            metrics,
            supervisor,
        });
        (state, registered_tx, maintenance_rx)
    }

    /// A worker entry of `/status` for a connection the LB did not start.
    fn worker(id: u64, pid: Option<u32>, capacity: usize) -> serde_json::Value {
        json!({
            "id": id, "pid": pid, "state": "ready", "inflight": 0, "capacity": capacity,
            "active": true, "served": 0, "oldest_call_ms": null, "slot": null,
            "generation": null,
        })
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
        assert_eq!(doc["workers"][0], worker(1, None, 2));
        assert_eq!(doc["supervision"], serde_json::Value::Null);
        let (code, text) = call(&routes, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            text.contains(r#"rpc_lb_workers{state="ready"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"rpc_lb_workers{state="booting"} 0"#),
            "{text}"
        );
        // No worker_command: no rolling restart to make.
        let (code, body) = call(&routes, "POST", "/workers/restart").await;
        assert_eq!(code, 409, "{body}");
        assert!(body.contains("no worker_command"), "{body}");
    }

    #[tokio::test]
    async fn page_shows_the_workers() {
        let (state, registered, _m) = state();
        let (tx, _rx) = mpsc::unbounded_channel();
        state.dispatcher.add_worker(tx, 2, Some(4242));
        registered.send_replace(true);
        let routes = routes(state.clone());
        let r = routes.dispatch(&Request::new("GET", "/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "text/html; charset=utf-8");
        let html = String::from_utf8(r.body).unwrap();
        assert!(html.contains(r#"<tr class="service" data-service="echo">"#));
        assert!(html.contains(r#"<tr class="worker" data-state="ready" data-pid="4242">"#));
        assert!(html.contains(r#"data-badge="registered""#));
        assert!(html.contains(r#"poll(["status"], render);"#));
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
            json!([worker(by_hello, Some(4242), 4), worker(by_echo, None, 1)])
        );
        // The old worker sends a HELLO after all.
        state.dispatcher.hello(by_echo, 2, Some(99));
        let (_, body) = call(&routes, "GET", "/status").await;
        assert_eq!(workers(body)[1]["pid"], 99);
        // Hung and stopping workers say so.
        state.dispatcher.set_hung(by_hello);
        state.dispatcher.deactivate(by_echo);
        let (_, body) = call(&routes, "GET", "/status").await;
        let states: Vec<_> = workers(body)
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["state"].clone())
            .collect();
        assert_eq!(states, [json!("hung"), json!("stopping")]);
    }

    #[tokio::test]
    async fn status_counts_calls_served_and_the_oldest_call() {
        use crate::dispatch::ToWorker;
        use crate::dispatch::testing::{call_from, front, message};
        let (state, _registered, _m) = state();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id = state.dispatcher.add_worker(tx, 2, Some(7));
        let (front_tx, _front_rx) = front(1 << 20);
        state
            .dispatcher
            .submit(call_from(&front_tx, "m", 1))
            .unwrap();
        let Ok(ToWorker::Call(held)) = rx.try_recv() else {
            panic!("the call went to the worker")
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let routes = routes(state.clone());
        let doc = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();
        let (_, body) = call(&routes, "GET", "/status").await;
        let w = &doc(body)["workers"][0];
        assert!(w["oldest_call_ms"].as_u64().unwrap() >= 30, "{w}");
        assert_eq!(w["served"], 0);
        // The worker answers.
        state.dispatcher.finished(id);
        let reply = message(rpc_frame::MessageType::Reply, "m", 1, &[0]);
        held.reply.unwrap().reply(reply);
        let (_, body) = call(&routes, "GET", "/status").await;
        let w = &doc(body)["workers"][0];
        assert_eq!(
            (w["served"].clone(), w["oldest_call_ms"].clone()),
            (json!(1), json!(null))
        );
    }
}
