//! `rpc_lb`, the per-service-instance load balancer (L3 of the mesh): proxies send calls to
//! its front socket, Python worker processes dial its back socket, and each call runs on the
//! least busy worker. It registers itself in ZooKeeper while it has workers, and stops
//! without losing a call.
//!
//! # Layout
//! - [`front`]: proxy connections; calls in, replies out in completion order.
//! - [`dispatch`]: least-loaded dispatch within worker capacity, bounded wait queue.
//! - [`load`]: what the dispatcher reports (a worker's load, why a call was refused).
//! - [`workers`]: worker connections (seqid rewrite, heartbeats, STOP, HELLO, hung calls).
//! - [`watchdog`]: what happens to a hung worker (stack dump, kill, its callers answered).
//! - [`stack`]: reading a Python worker's `faulthandler` stack dump.
//! - [`registration`]: the ZooKeeper node follows the workers (and maintenance).
//! - [`address`]: which address to listen on and register.
//! - [`metrics`]: what is measured (calls, rejections, workers, queue, ZooKeeper).
//! - [`admin`]: the admin routes (`/healthz`, `/metrics`, `/status`, `/drain`, `/resume`,
//!   `/workers/restart`).
//! - [`status`]: the periodic status log line.
//! - [`supervisor`]: the workers the LB starts itself (`worker_command`): restarts with
//!   [`backoff`], recycling, rolling restarts, the watchdog's kills; [`process`] starts one
//!   and logs its output.
//! - [`reload`]: SIGHUP re-reads the configuration (supervision keys applied live).
//!
//! # Maintenance (`POST /drain`, `POST /resume`)
//! The node is wanted while at least one worker takes calls and the LB is not in
//! maintenance. `POST /drain` deletes it as step 1 below does, but the LB keeps serving and
//! stays up; `POST /resume` registers again (when there is a worker).
//!
//! # Shutdown order (SIGTERM/SIGINT, bounded by `drain_grace`)
//! 1. Delete the ZooKeeper node (proxies stop routing here once they see it); `/healthz`
//!    says 503 from here on.
//! 2. Keep serving what proxies still send until the front has been quiet for a moment or
//!    every proxy connection has closed.
//! 3. Stop accepting proxies and workers; send every worker the LB started SIGTERM (it sends
//!    STOP, finishes its calls, exits; none is restarted), and every worker STOP_CONFIRM
//!    (nothing new is coming); queued calls that no worker took get code 6 (marked refused,
//!    below).
//! 4. Wait until every call in flight has its reply delivered and every worker the LB
//!    started has exited; at the end of the grace, SIGKILL the ones left.
//! 5. Close the front connections and the admin endpoint; return.
//!
//! # SIGHUP, `POST /workers/restart`
//! SIGHUP re-reads the configuration file ([`reload`]); when it is valid, the supervision
//! keys are applied and, with `worker_command`, the workers get a rolling restart
//! ([`supervisor`]). `POST /workers/restart` makes the rolling restart alone. Without
//! `worker_command` SIGHUP only re-reads the file.
//!
//! # Workers leaving with calls queued
//! When the last worker taking calls leaves (or sends STOP), the calls still queued for a
//! worker are refused at once (code 6 `Worker FOR <svc>.<method> Not Found`, marked refused)
//! rather than left to time out.
//!
//! # Errors the LB raises itself (CONTRACT section 9)
//! The node data announces `"marks": 1` ([`registration::MARKS`]), and every code-6
//! `TApplicationException` the LB raises itself carries field 3 ([`rpc_frame::Mark`]):
//! - `1` (refused, no handler saw the call): no worker, queue full, stopping, a deadline
//!   spent in the queue ([`dispatch::Call::fail`], [`front::reject`]);
//! - `2` (failed after dispatch): the LB's timeout, a lost worker, a malformed worker reply,
//!   a reply dropped for the front connection's byte budget ([`workers`],
//!   [`dispatch::ReplyTo::reply`]).
//!
//! Unmarked: code-7 protocol errors, the code-6 error for a worker reply over
//! `max_frame_size`, and whatever a worker answers (its exceptions pass through untouched).

pub mod address;
pub mod admin;
pub mod backoff;
pub mod dispatch;
pub mod front;
pub mod load;
pub mod metrics;
pub mod process;
pub mod registration;
pub mod reload;
pub mod stack;
pub mod status;
pub mod supervisor;
pub mod watchdog;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_admin::AdminListener;
use rpc_config::LbConfig;
use rpc_registry::{EndpointInfo, ZkSettings};
use rpc_runtime::ReloadRequests;
use rpc_runtime::listener::{Listener, Stream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::LbState;
use crate::dispatch::{Dispatcher, Reject};
use crate::front::{Activity, FrontSettings};
use crate::metrics::{LbMetrics, Outcome};
use crate::registration::Registrar;
use crate::supervisor::{Supervisor, SupervisorSettings};
use crate::watchdog::{HungKiller, HungWorkers, Watchdog};
use crate::workers::{WorkerEvent, WorkerSettings, WorkerTimeout};

/// How long the front must be quiet (no new call) before the LB stops taking calls.
pub const QUIET_PERIOD: Duration = Duration::from_millis(1500);

/// Largest capacity a worker may announce.
const MAX_WORKER_CAPACITY: usize = 1024;

/// What `rpc_lb` needs besides its configuration.
#[derive(Debug)]
pub struct LbRun {
    /// The validated configuration.
    pub config: LbConfig,
    /// Bound front socket (proxies).
    pub front: Listener,
    /// Bound back socket (workers).
    pub back: Listener,
    /// The node data to register (frontend, deploy path, ...); registered with `marks` set to
    /// [`registration::MARKS`] whatever it says.
    pub info: EndpointInfo,
    /// The bound `admin_address` socket, if configured.
    pub admin: Option<AdminListener>,
    /// The configuration file, read again on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// SIGHUP, caught (`None`: reloads are not asked for, SIGHUP's default stays).
    pub reloads: Option<ReloadRequests>,
}

/// Longest wait for the admin endpoint to close at the end of the stop.
const ADMIN_CLOSE: Duration = Duration::from_secs(1);

/// Runs the LB until `shutdown` is cancelled and the drain is over.
pub async fn run(lb: LbRun, shutdown: CancellationToken) {
    let LbRun {
        mut config,
        front,
        back,
        info,
        admin,
        config_path,
        mut reloads,
    } = lb;
    let zk = ZkSettings {
        servers: config.common.zk.clone(),
        session_timeout: config.common.zk_session_timeout,
        auth: config.common.zk_auth.clone(),
    };
    let metrics = Arc::new(LbMetrics::new(&config.service));
    let registrar = Registrar::spawn(
        zk,
        config.common.product.clone(),
        info,
        metrics.registration.clone(),
    );
    let dispatcher = Arc::new(Dispatcher::new(config.max_queue));
    let activity = Arc::new(Activity::default());
    // The LB answers a little before the proxy gives up, so the caller sees the LB's reason.
    let request_timeout = config.request_timeout.mul_f64(0.95);
    let front_settings = Arc::new(FrontSettings {
        service: config.service.clone(),
        max_frame_size: config.common.max_frame_size,
        request_timeout,
        frame_timeout: front::FRAME_TIMEOUT,
        idle_timeout: config.front_idle_timeout,
        write_timeout: config.common.write_timeout,
        max_buffer_bytes: config.common.max_connection_buffer_bytes,
        process_budget: rpc_mux::ProcessBudget::new(config.common.max_process_buffer_bytes),
        metrics: metrics.clone(),
    });
    let supervisor = Supervisor::spawn(
        SupervisorSettings {
            config: config.supervision.clone(),
            back_address: config.back_address.to_string(),
            service: config.service.clone(),
            retire_grace: config.drain_grace,
        },
        dispatcher.clone(),
        metrics.clone(),
    );
    let hung = Arc::new(HungWorkers::default());
    let killer: Arc<dyn HungKiller> = Arc::new(supervisor.clone());
    let watchdog = Watchdog::new(hung.clone(), Some(killer), &config.service);
    let worker_timeout = Arc::new(WorkerTimeout::new(config.supervision.timeout));
    let worker_settings = Arc::new(WorkerSettings {
        service: config.service.clone(),
        default_capacity: config.worker_pool_size,
        max_capacity: MAX_WORKER_CAPACITY,
        heartbeat_interval: config.common.heartbeat_interval,
        heartbeat_timeout: config.common.heartbeat_timeout,
        write_timeout: config.common.write_timeout,
        max_frame_size: config.common.max_frame_size,
        metrics: metrics.clone(),
        worker_timeout: worker_timeout.clone(),
        hung: hung.clone(),
    });
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let stop_accepting = CancellationToken::new();
    let close_front = CancellationToken::new();
    let front_tracker = TaskTracker::new();
    let worker_tracker = TaskTracker::new();
    let (maintenance_tx, mut maintenance) = watch::channel(false);
    let state = Arc::new(LbState {
        service: config.service.clone(),
        dispatcher: dispatcher.clone(),
        activity: activity.clone(),
        registered: registrar.watch(),
        maintenance: maintenance_tx,
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        supervisor: supervisor.clone(),
    });
    // The admin endpoint outlives the drain (its /healthz says 503 meanwhile).
    let admin_stop = CancellationToken::new();
    let admin = admin.map(|admin| {
        let routes = Arc::new(admin::routes(state.clone()));
        tokio::spawn(rpc_admin::serve(admin, routes, admin_stop.clone()))
    });
    let status = config
        .common
        .status_interval
        .map(|every| tokio::spawn(status::run(state.clone(), every)));

    tracing::info!(
        front = front.describe(),
        back = back.describe(),
        service = config.service,
        "rpc_lb listening"
    );
    rpc_runtime::notify_ready();
    let front_accept = tokio::spawn(accept_front(
        front,
        front_tracker.clone(),
        dispatcher.clone(),
        front_settings,
        activity.clone(),
        stop_accepting.clone(),
        close_front.clone(),
        config.max_connections,
    ));
    let back_accept = tokio::spawn(accept_workers(
        back,
        worker_tracker.clone(),
        dispatcher.clone(),
        worker_settings,
        events_tx,
        stop_accepting.clone(),
    ));
    let expiry = tokio::spawn(expire_queue(dispatcher.clone(), config.service.clone()));

    // Registration follows the workers and the maintenance flag until shutdown.
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = events_rx.recv() => {
                let Some(event) = event else {
                    break;
                };
                for event in std::iter::once(event).chain(std::iter::from_fn(|| events_rx.try_recv().ok())) {
                    worker_event(event, &state, &watchdog);
                }
            }
            _ = supervisor.changed() => {}
            Some(()) = next_reload(&mut reloads) => {
                reload_config(config_path.as_deref(), &mut config, &supervisor, &worker_timeout, &metrics);
            }
            changed = maintenance.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
        let in_maintenance = *maintenance.borrow_and_update();
        registrar.want(dispatcher.active_workers() > 0 && !in_maintenance);
    }

    // 1. Deregister.
    let deadline = Instant::now() + config.drain_grace;
    rpc_runtime::notify_stopping();
    tracing::info!("stopping: deregistering from zookeeper");
    registrar
        .shutdown(Duration::from_secs(5).min(config.drain_grace))
        .await;
    // 2. Serve until the front is quiet.
    tracing::info!(
        connections = activity.connections(),
        "stopping: serving until proxies are quiet"
    );
    wait_until(deadline, || {
        activity.connections() == 0 || activity.quiet_for() >= QUIET_PERIOD
    })
    .await;
    // 3. Stop taking calls and tell the workers.
    stop_accepting.cancel();
    let _ = front_accept.await;
    let _ = back_accept.await;
    supervisor.stop();
    let queued = dispatcher.stop_all();
    for call in queued {
        front::reject(call, Reject::Stopping, &config.service, &metrics);
    }
    // 4. Wait for the replies.
    tracing::info!(
        outstanding = dispatcher.outstanding(),
        "stopping: waiting for calls in flight"
    );
    wait_until(deadline, || {
        dispatcher.outstanding() == 0 && supervisor.running() == 0
    })
    .await;
    if dispatcher.outstanding() > 0 {
        tracing::warn!(
            left = dispatcher.outstanding(),
            "drain grace over with calls in flight"
        );
    }
    if supervisor.running() > 0 {
        tracing::warn!(
            left = supervisor.kill_all(),
            "drain grace over with supervised workers running: SIGKILL"
        );
        wait_until(Instant::now() + Duration::from_secs(2), || {
            supervisor.running() == 0
        })
        .await;
    }
    // 5. Close.
    close_front.cancel();
    front_tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), front_tracker.wait()).await;
    expiry.abort();
    if let Some(status) = status {
        status.abort();
    }
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(ADMIN_CLOSE, admin).await;
    }
    tracing::info!("rpc_lb stopped");
}

/// Handles one worker event in the main loop: the supervisor looks at its workers when one
/// joins or leaves; calls queued when the last worker left are refused at once; a hung
/// worker goes to the watchdog.
fn worker_event(event: WorkerEvent, state: &LbState, watchdog: &Watchdog) {
    match event {
        WorkerEvent::Joined(_) => state.supervisor.workers_changed(),
        WorkerEvent::Left(_) => {
            state.supervisor.workers_changed();
            for call in state.dispatcher.orphans() {
                front::reject(call, Reject::NoWorker, &state.service, &state.metrics);
            }
        }
        WorkerEvent::Hung { id, pid } => {
            state.dispatcher.set_hung(id);
            watchdog.on_hung(id, pid);
        }
    }
}

/// The next SIGHUP; never, without reloads.
async fn next_reload(reloads: &mut Option<ReloadRequests>) -> Option<()> {
    match reloads {
        Some(reloads) => reloads.recv().await,
        None => std::future::pending().await,
    }
}

/// SIGHUP: re-reads the configuration file into `config` ([`reload`]) and hands the
/// supervision keys to the supervisor, which restarts the workers when it starts them. A bad
/// file changes nothing.
fn reload_config(
    path: Option<&std::path::Path>,
    config: &mut LbConfig,
    supervisor: &Supervisor,
    worker_timeout: &WorkerTimeout,
    metrics: &LbMetrics,
) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no configuration file to read again");
        return;
    };
    let Ok(reloaded) = reload::reload(path, config, metrics) else {
        return;
    };
    *config = reloaded.config;
    worker_timeout.set(config.supervision.timeout);
    rpc_runtime::set_verbose(config.common.verbose);
    supervisor.reconfigure(config.supervision.clone());
}

/// Polls `done` every 20 ms until it holds or `deadline` passes.
async fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn expire_queue(dispatcher: Arc<Dispatcher>, service: String) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        for call in dispatcher.expire_queue(Instant::now()) {
            queue_timeout(call, &service);
        }
    }
}

/// Fails a call whose deadline passed while it waited in the queue: no worker got it, so
/// it is a refusal ([`rpc_frame::Mark::Refused`]).
fn queue_timeout(call: dispatch::Call, service: &str) {
    let text = format!(
        "Service: {service}, Method: {}, Error: timeout, no worker was free within the request timeout",
        call.message.name()
    );
    call.fail(
        service,
        Outcome::QueueTimeout,
        &text,
        rpc_frame::Mark::Refused,
    );
}

// One task's whole wiring, passed once at start-up; a struct would only rename it.
#[allow(clippy::too_many_arguments)]
async fn accept_front(
    listener: Listener,
    tracker: TaskTracker,
    dispatcher: Arc<Dispatcher>,
    settings: Arc<FrontSettings>,
    activity: Arc<Activity>,
    stop: CancellationToken,
    close: CancellationToken,
    max_connections: usize,
) {
    // Proxies beyond `max_connections` are closed at once (logged once per episode).
    let limit = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut warned = false;
    loop {
        let Some(stream) = listener.accept_until(&stop, "front").await else {
            return;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if !warned {
                tracing::warn!(
                    max_connections,
                    "max_connections reached, refusing front connections"
                );
                warned = true;
            }
            drop(stream);
            continue;
        };
        warned = false;
        let (dispatcher, settings, activity, close) = (
            dispatcher.clone(),
            settings.clone(),
            activity.clone(),
            close.clone(),
        );
        tracker.spawn(async move {
            let _permit = permit;
            match stream {
                Stream::Unix(s) => {
                    let (r, w) = s.into_split();
                    front::serve(r, w, dispatcher, settings, activity, close).await;
                }
                Stream::Tcp(s) => {
                    let (r, w) = s.into_split();
                    front::serve(r, w, dispatcher, settings, activity, close).await;
                }
            }
        });
    }
}

async fn accept_workers(
    listener: Listener,
    tracker: TaskTracker,
    dispatcher: Arc<Dispatcher>,
    settings: Arc<WorkerSettings>,
    events: mpsc::UnboundedSender<WorkerEvent>,
    stop: CancellationToken,
) {
    loop {
        let Some(stream) = listener.accept_until(&stop, "back").await else {
            return;
        };
        let (dispatcher, settings, events) = (dispatcher.clone(), settings.clone(), events.clone());
        tracker.spawn(async move {
            match stream {
                Stream::Unix(mut s) => {
                    let (r, w) = s.split();
                    workers::serve(r, w, dispatcher, settings, events).await;
                }
                Stream::Tcp(mut s) => {
                    let (r, w) = s.split();
                    workers::serve(r, w, dispatcher, settings, events).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::testing::{answer, assert_error, call_from, front};

    #[test]
    fn a_deadline_spent_in_the_queue_is_a_marked_refusal() {
        let (tx, mut rx) = front(1 << 20);
        let dispatcher = Dispatcher::new(10);
        let (worker_tx, _worker_rx) = mpsc::unbounded_channel();
        dispatcher.add_worker(worker_tx, 1, None);
        dispatcher.submit(call_from(&tx, "m", 1)).unwrap();
        let mut queued = call_from(&tx, "m", 2);
        queued.deadline = Instant::now();
        dispatcher.submit(queued).unwrap();
        let expired = dispatcher.expire_queue(Instant::now() + Duration::from_millis(1));
        assert_eq!(expired.len(), 1);
        for call in expired {
            queue_timeout(call, "svc");
        }
        assert_error(
            &answer(&mut rx),
            2,
            "Service: svc, Method: m, Error: timeout, no worker was free within the request timeout",
            Some(rpc_frame::Mark::Refused),
        );
    }
}
