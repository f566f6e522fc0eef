//! The LB's back side: Python worker processes dial in on `back_address`; each connection
//! runs calls handed to it by the dispatcher, with seqids rewritten per connection and
//! restored on the reply, heartbeats both ways, STOP / STOP_CONFIRM, and HELLO (capacity).
//! Sits between the [`Dispatcher`] and the worker sockets.
//!
//! Each connection runs [`rpc_mux::connection::run`] (writer, reader and clock side by side:
//! a worker that stops reading cannot stop timeouts or heartbeats) under the LB's
//! [`WorkerPolicy`]: a call past its deadline is answered at once but keeps its worker slot
//! until the worker answers (a hung handler gets no more work); a call never written goes to
//! another worker.
//!
//! # A connection is a worker only once it proves it
//! A new back connection is pinged at once and gets no call until it has sent a valid HELLO
//! (type 23) or any well-formed heartbeat (type 20: the echo of that ping, which is all an
//! old worker ever sends). Only then is it added to the dispatcher (and counted, logged
//! `worker joined`). Before that, an unframeable byte stream, a bad header or any other
//! message closes it, and so does silence for `heartbeat_timeout`; it never held a call, so
//! no call is lost.
//!
//! # What the caller of a call written to a worker gets
//! The worker's reply or exception, as it is (a handler's exception carries no field 3).
//! Otherwise a code-6 error of the LB's own, marked [`Mark::Failed`] (CONTRACT section 9: the
//! handler may have run): the LB's timeout, the worker lost while holding the call, a reply
//! whose header cannot be read. The exception is a reply over `max_frame_size`: its code-6
//! error is unmarked, like a handler's exception (the same call fails the same way again).
//! A call handed to a worker connection but never written goes back to the dispatcher, and
//! its refusal there is marked [`Mark::Refused`] ([`resubmit`]).
//!
//! # A hung worker (`worker_timeout_ms`)
//! A worker whose oldest held call has been held longer than `worker_timeout_ms` (counted
//! from the moment it was handed to the worker, not from the front) is hung: its connection
//! leaves the dispatcher (no new call; it no longer keeps the LB registered) and reports
//! [`WorkerEvent::Hung`] once; [`crate::watchdog`] does the rest. The calls of a worker the
//! watchdog kills are answered by the watchdog when the connection ends, with where its
//! handler was stuck. A pid the watchdog banned (a hung worker the LB did not start) cannot
//! join on any connection until its process exits.
//!
//! # Tracing a call to a worker
//! Every call that reached a worker connection logs one `call done` line at debug level when
//! its caller is answered (reply, exception, timeout, worker lost, bad reply): service,
//! method, the proxy's `seqid`, the `worker` id and `pid` (from HELLO; absent for a worker
//! that sent none), the `worker_seqid` the worker saw (the seqid of its reply, so absent when
//! it never answered), `duration_ms` from the front, and the metric `outcome` label. A reply
//! that comes after its caller got the timeout logs `late reply`; a ONEWAY call logs `oneway
//! call handed to a worker`. Nothing per call is logged at info.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rpc_frame::{ExceptionCode, Hello, Mark, Message, MessageType};
use rpc_metrics::Outcome as _;
use rpc_mux::{Ending, Expiry, Failure, Outbound, Start, Tick};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::dispatch::{Call, Dispatcher, ReplyTo, ToWorker, WorkerId};
use crate::metrics::{LbMetrics, Meter, Outcome};
use crate::watchdog::HungWorkers;

/// Tunables of worker connections.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// The service served (error messages).
    pub service: String,
    /// Capacity of a worker that sends no HELLO.
    pub default_capacity: usize,
    /// Largest HELLO capacity believed.
    pub max_capacity: usize,
    /// Ping a worker quiet this long (and every new connection at once).
    pub heartbeat_interval: Duration,
    /// Drop a worker quiet this long, and a new connection that has not proved to be a
    /// worker (HELLO or ping echo) this long after it was accepted.
    pub heartbeat_timeout: Duration,
    /// Drop a worker that accepts no byte of a pending write this long.
    pub write_timeout: Duration,
    /// Largest frame accepted from a worker; a larger reply fails its call only.
    pub max_frame_size: usize,
    /// Where calls and workers are counted.
    pub metrics: Arc<LbMetrics>,
    /// A call held by one worker longer than this makes it hung (`worker_timeout_ms`, live:
    /// a reload sets it).
    pub worker_timeout: Arc<WorkerTimeout>,
    /// The watchdog's state: killed workers' calls, banned pids.
    pub hung: Arc<HungWorkers>,
}

/// `worker_timeout_ms` as every worker connection reads it on each clock tick: a reload
/// (SIGHUP) changes it for the calls already held too.
#[derive(Debug, Default)]
pub struct WorkerTimeout {
    /// Milliseconds; 0 = off.
    ms: AtomicU64,
}

impl WorkerTimeout {
    /// `timeout` (`None` = off).
    pub fn new(timeout: Option<Duration>) -> Self {
        let live = WorkerTimeout::default();
        live.set(timeout);
        live
    }

    /// The value now (`None` = off).
    pub fn get(&self) -> Option<Duration> {
        match self.ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Changes it (`None` = off).
    pub fn set(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| {
            u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.ms.store(ms, Ordering::Relaxed);
    }
}

/// Worker-side events, for logs and registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A back connection proved to be a worker (HELLO or ping echo) and takes calls.
    Joined(WorkerId),
    /// A worker sent STOP or left.
    Left(WorkerId),
    /// A worker held a call past `worker_timeout_ms` and is out of rotation; `pid` from its
    /// HELLO ([`crate::watchdog::Watchdog::on_hung`] takes it from here).
    Hung {
        /// The worker's connection.
        id: WorkerId,
        /// Its process, when its HELLO said.
        pid: Option<u32>,
    },
}

/// A call written to the worker, waiting for its reply.
pub struct Pending {
    /// `None` once the caller has been answered (timeout): the slot stays taken until the
    /// worker answers.
    reply: Option<ReplyTo>,
    method: String,
    /// The proxy's seqid (kept past `reply`, for the late-reply log line).
    seqid: i32,
    /// When the call reached the front (the meter's start), for the log line.
    started: Instant,
    /// Taken with `reply`: the call's outcome is recorded once.
    meter: Option<Meter>,
    /// Its entry in the connection's dispatch times (the watchdog's clock).
    ticket: u64,
}

impl Pending {
    /// How long ago the call reached the front.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Answers the caller of a call whose worker the watchdog killed: code 6, marked failed
    /// after dispatch, with `text` (no-op when the caller already got the LB's timeout).
    pub fn fail_killed(self, text: &str) {
        if let Some(reply) = self.reply {
            reply.fail(
                &self.method,
                ExceptionCode::InternalError,
                text,
                Some(Mark::Failed),
            );
        }
        if let Some(meter) = self.meter {
            meter.finish(Outcome::WorkerLost);
        }
    }
}

/// Why the LB closes a back connection that is not (or no longer) a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotWorker {
    /// Neither HELLO nor a ping echo within the heartbeat timeout of the accept.
    NoHandshake,
    /// A message no worker sends before it has proved to be one.
    NotAWorker,
}

/// Back connections accepted so far (log numbering only).
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

// === impl WorkerPolicy ===

/// What the LB does with the calls of one back connection ([`rpc_mux::Policy`], module docs).
pub struct WorkerPolicy<'a> {
    /// Numbers back connections for the logs, workers or not.
    conn: u64,
    /// Set once the connection proved to be a worker and joined the dispatcher.
    worker: OnceLock<WorkerId>,
    /// The worker's pid from its HELLO; 0 until one told it.
    pid: AtomicU32,
    /// It sent STOP before it joined: it never joins.
    stopped: AtomicBool,
    /// Calls it held when it left, and calls handed back for another worker.
    lost: AtomicUsize,
    moved: AtomicUsize,
    /// Set once its oldest call outlived `worker_timeout_ms`: out of rotation for good.
    hung: AtomicBool,
    /// When each held call was handed to the worker, oldest first, by ticket.
    dispatched: Mutex<VecDeque<(u64, Instant)>>,
    next_ticket: AtomicU64,
    tx: &'a mpsc::UnboundedSender<ToWorker>,
    dispatcher: &'a Arc<Dispatcher>,
    settings: &'a WorkerSettings,
    events: &'a mpsc::UnboundedSender<WorkerEvent>,
}

impl<'a> WorkerPolicy<'a> {
    /// The policy of back connection number `conn`, not yet a worker.
    fn new(
        conn: u64,
        tx: &'a mpsc::UnboundedSender<ToWorker>,
        dispatcher: &'a Arc<Dispatcher>,
        settings: &'a WorkerSettings,
        events: &'a mpsc::UnboundedSender<WorkerEvent>,
    ) -> Self {
        WorkerPolicy {
            conn,
            worker: OnceLock::new(),
            pid: AtomicU32::new(0),
            stopped: AtomicBool::new(false),
            lost: AtomicUsize::new(0),
            moved: AtomicUsize::new(0),
            hung: AtomicBool::new(false),
            dispatched: Mutex::new(VecDeque::new()),
            next_ticket: AtomicU64::new(0),
            tx,
            dispatcher,
            settings,
            events,
        }
    }
}

/// Serves one back connection until it closes. It joins the dispatcher only once it proved
/// to be a worker (module docs). Calls it held fail at once; calls handed to it but never
/// written go back to the dispatcher for another worker.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    dispatcher: Arc<Dispatcher>,
    settings: Arc<WorkerSettings>,
    events: mpsc::UnboundedSender<WorkerEvent>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let policy = WorkerPolicy::new(
        CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1,
        &tx,
        &dispatcher,
        &settings,
        &events,
    );
    tracing::debug!(
        service = settings.service,
        conn = policy.conn,
        "back connection accepted; pinged, no call until HELLO or the ping's echo"
    );
    let mux = rpc_mux::Settings {
        heartbeat_interval: settings.heartbeat_interval,
        heartbeat_timeout: settings.heartbeat_timeout,
        write_timeout: settings.write_timeout,
        max_frame_size: settings.max_frame_size,
        // A worker that never sends HELLO proves itself by the echo of this first ping.
        ping_at_start: true,
        ping_always: true,
    };
    let never = std::future::pending::<()>();
    let ending = rpc_mux::connection::run(&policy, &mux, reader, writer, &mut rx, never).await;
    if let Some(id) = policy.id() {
        settings.hung.connection_closed(id);
    }
    let Some(id) = policy.id() else {
        // Never in the dispatcher: it held no call and nothing was handed to it.
        tracing::warn!(
            service = settings.service,
            conn = policy.conn,
            ?ending,
            "back connection closed before it proved to be a worker (no HELLO, no ping echo); it got no call"
        );
        return;
    };
    tracing::info!(
        service = settings.service,
        worker = id,
        pid = policy.pid(),
        conn = policy.conn,
        ?ending,
        lost = policy.lost.load(Ordering::Relaxed),
        moved = policy.moved.load(Ordering::Relaxed),
        "worker left"
    );
}

impl WorkerPolicy<'_> {
    /// The dispatcher's id for this worker; `None` until it proved to be one.
    fn id(&self) -> Option<WorkerId> {
        self.worker.get().copied()
    }

    /// The worker's pid, once a HELLO told it.
    fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&pid| pid != 0)
    }

    /// Keeps the pid of a HELLO (one without a usable pid keeps the one known); returns the
    /// pid now known.
    fn learn_pid(&self, hello: &Hello) -> Option<u32> {
        if let Some(pid) = hello_pid(hello) {
            self.pid.store(pid, Ordering::Relaxed);
        }
        self.pid()
    }

    /// Notes when a held call was handed to the worker; returns its ticket.
    fn dispatched(&self, now: Instant) -> u64 {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.dispatch_times().push_back((ticket, now));
        ticket
    }

    /// A held call left the worker (answered, or lost with it).
    fn undispatched(&self, ticket: u64) {
        let mut times = self.dispatch_times();
        // Calls mostly finish in order: the front is the usual place.
        if let Some(at) = times.iter().position(|&(t, _)| t == ticket) {
            times.remove(at);
        }
    }

    fn dispatch_times(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Instant)>> {
        self.dispatched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the oldest call the worker holds has been held.
    fn oldest_held(&self) -> Option<Duration> {
        self.dispatch_times().front().map(|&(_, at)| at.elapsed())
    }

    /// Takes a worker whose oldest call outlived `worker_timeout_ms` out of rotation and
    /// reports it, once.
    fn check_hung(&self, id: WorkerId) {
        let Some(limit) = self.settings.worker_timeout.get() else {
            return;
        };
        let Some(oldest) = self.oldest_held() else {
            return;
        };
        if oldest < limit || self.hung.swap(true, Ordering::Relaxed) {
            return;
        }
        self.dispatcher.deactivate(id);
        tracing::warn!(
            service = self.settings.service,
            worker = id,
            pid = self.pid(),
            held_ms = oldest.as_millis() as u64,
            timeout_ms = limit.as_millis() as u64,
            "worker hung: a call held longer than worker_timeout_ms; out of rotation"
        );
        let _ = self.events.send(WorkerEvent::Hung {
            id,
            pid: self.pid(),
        });
    }

    /// The connection proved to be a worker: it joins the dispatcher with `capacity` slots.
    fn activate(&self, capacity: usize, proof: &'static str) -> WorkerId {
        let id = self
            .dispatcher
            .add_worker(self.tx.clone(), capacity, self.pid());
        // Only this function sets it, once: the callers checked `id()`.
        let _ = self.worker.set(id);
        self.settings.metrics.workers_joined.inc();
        let _ = self.events.send(WorkerEvent::Joined(id));
        tracing::info!(
            service = self.settings.service,
            worker = id,
            pid = self.pid(),
            conn = self.conn,
            proof,
            "worker joined"
        );
        id
    }

    /// Handles a frame that came before the connection proved to be a worker: a valid HELLO
    /// or any heartbeat makes it join; STOP is confirmed; anything else means it is not a
    /// worker.
    fn handshake(&self, message: &Message) -> Result<(), NotWorker> {
        let stopped = self.stopped.load(Ordering::Relaxed);
        match message.message_type() {
            MessageType::Hello => match Hello::decode(message.body()) {
                Some(hello) if !stopped => {
                    let capacity = hello_capacity(&hello, self.settings);
                    if let Some(pid) = self.learn_pid(&hello)
                        && self.settings.hung.is_banned(pid)
                    {
                        tracing::warn!(
                            service = self.settings.service,
                            conn = self.conn,
                            pid,
                            "a hung worker's process may not join again until it exits; closing"
                        );
                        return Err(NotWorker::NotAWorker);
                    }
                    let id = self.activate(capacity, "hello");
                    log_hello(id, &hello, capacity, self.settings);
                }
                Some(_) => {}
                None => {
                    tracing::warn!(conn = self.conn, "malformed HELLO ignored (not joined yet)")
                }
            },
            MessageType::Heartbeat if !stopped => {
                self.activate(self.settings.default_capacity, "ping echo");
            }
            MessageType::Heartbeat => {}
            MessageType::Stop => {
                tracing::info!(
                    service = self.settings.service,
                    conn = self.conn,
                    "back connection sent STOP before it joined; it gets no call"
                );
                let _ = self.tx.send(Outbound::Control(rpc_frame::stop_confirm()));
                self.stopped.store(true, Ordering::Relaxed);
            }
            other => {
                tracing::warn!(
                    service = self.settings.service,
                    conn = self.conn,
                    kind = other.as_u8(),
                    name = message.name(),
                    "not a worker: this message came before HELLO or a ping echo; closing"
                );
                return Err(NotWorker::NotAWorker);
            }
        }
        Ok(())
    }

    /// Handles a frame (not the reply of a held call) from a connection that joined.
    fn worker_frame(&self, id: WorkerId, message: &Message) {
        match message.message_type() {
            MessageType::Reply | MessageType::Exception => tracing::debug!(
                worker = id,
                seqid = message.seqid(),
                "reply for no pending call"
            ),
            // The echo of our ping; any frame already counted as life.
            MessageType::Heartbeat => {}
            MessageType::Stop => {
                tracing::info!(
                    service = self.settings.service,
                    worker = id,
                    "worker stopping (STOP)"
                );
                self.dispatcher.deactivate(id);
                let _ = self.events.send(WorkerEvent::Left(id));
                let _ = self.tx.send(Outbound::Control(rpc_frame::stop_confirm()));
            }
            MessageType::Hello => match Hello::decode(message.body()) {
                Some(hello) => {
                    let capacity = hello_capacity(&hello, self.settings);
                    log_hello(id, &hello, capacity, self.settings);
                    let pid = self.learn_pid(&hello);
                    self.dispatcher.hello(id, capacity, pid);
                }
                None => tracing::warn!(worker = id, "malformed HELLO ignored"),
            },
            other => tracing::debug!(
                worker = id,
                kind = other.as_u8(),
                "unexpected frame from worker ignored"
            ),
        }
    }

    /// Logs (debug) how a call this worker held ended for its caller; `worker_seqid` is the
    /// seqid of the worker's answer, when there is one.
    fn log_call(&self, pending: &Pending, outcome: Outcome, worker_seqid: Option<i32>) {
        tracing::debug!(
            service = self.settings.service,
            method = pending.method,
            seqid = pending.seqid,
            worker = self.id(),
            pid = self.pid(),
            worker_seqid,
            duration_ms = millis(pending.started),
            outcome = outcome.label(),
            "call done"
        );
    }

    /// Answers the caller of a held call with code 6, field 3 set to `mark` when there is
    /// one (module docs), and records `outcome` (both only if the caller was not answered
    /// yet: a timed-out call was).
    fn fail(&self, pending: Pending, error: &str, outcome: Outcome, mark: Option<Mark>) {
        if pending.reply.is_some() {
            self.log_call(&pending, outcome, None);
        }
        if let Some(reply) = pending.reply {
            let text = format!(
                "Service: {}, Method: {}, Error: {error}",
                self.settings.service, pending.method
            );
            reply.fail(&pending.method, ExceptionCode::InternalError, &text, mark);
        }
        if let Some(meter) = pending.meter {
            meter.finish(outcome);
        }
    }
}

impl rpc_mux::Policy for WorkerPolicy<'_> {
    type Call = Call;
    type Pending = Pending;
    type Close = NotWorker;

    fn start(&self, call: Call, now: Instant) -> Start<Pending> {
        let pending = match call.reply {
            // The proxy's seqid is kept in ReplyTo; the worker sees ours.
            Some(reply) => Some((
                call.deadline,
                Pending {
                    seqid: reply.seqid,
                    reply: Some(reply),
                    method: call.message.name().to_owned(),
                    started: call.meter.started(),
                    meter: Some(call.meter),
                    ticket: self.dispatched(now),
                },
            )),
            // A ONEWAY call is done once written.
            None => {
                tracing::debug!(
                    service = self.settings.service,
                    method = call.message.name(),
                    seqid = call.message.seqid(),
                    worker = self.id(),
                    pid = self.pid(),
                    duration_ms = millis(call.meter.started()),
                    "oneway call handed to a worker"
                );
                // Written, not answered: a ONEWAY name earns no metric label of its own.
                call.meter.finish_unanswered(Outcome::Ok);
                None
            }
        };
        Start {
            message: call.message,
            pending,
        }
    }

    fn written(&self, _: usize, oneway: usize) {
        // Calls reach this connection only once it joined, so `id()` is set.
        if let Some(id) = self.id() {
            for _ in 0..oneway {
                self.dispatcher.finished(id);
            }
        }
    }

    fn reply(&self, pending: Pending, message: Message) {
        self.undispatched(pending.ticket);
        if let Some(id) = self.id() {
            self.dispatcher.finished(id);
        }
        if pending.reply.is_none() {
            tracing::debug!(
                service = self.settings.service,
                method = pending.method,
                seqid = pending.seqid,
                worker = self.id(),
                pid = self.pid(),
                worker_seqid = message.seqid(),
                duration_ms = millis(pending.started),
                "late reply: the caller already got the timeout; dropped"
            );
            return;
        }
        let outcome = match message.message_type() {
            MessageType::Exception => Outcome::Exception,
            _ => Outcome::Ok,
        };
        // Before `reply` puts the proxy's seqid in place of the worker's.
        self.log_call(&pending, outcome, Some(message.seqid()));
        if let Some(meter) = pending.meter {
            meter.finish(outcome);
        }
        if let Some(reply) = pending.reply {
            reply.reply(message);
        }
    }

    fn expired(&self, pending: &mut Pending) -> Expiry {
        if pending.reply.is_some() {
            self.log_call(pending, Outcome::Timeout, None);
        }
        if let Some(reply) = pending.reply.take() {
            let text = format!(
                "Service: {}, Method: {}, Error: timeout, the worker did not answer within the request timeout",
                self.settings.service, pending.method
            );
            reply.fail(
                &pending.method,
                ExceptionCode::InternalError,
                &text,
                Some(Mark::Failed),
            );
            if let Some(meter) = pending.meter.take() {
                meter.finish(Outcome::Timeout);
            }
        }
        Expiry::Keep
    }

    fn failed(&self, pending: Pending, failure: Failure<NotWorker>) {
        self.undispatched(pending.ticket);
        match failure {
            Failure::Ended(ending) => {
                if pending.reply.is_some() {
                    self.lost.fetch_add(1, Ordering::Relaxed);
                }
                // A worker the watchdog killed: its calls get the watchdog's message.
                let pending = match self.id() {
                    Some(id) if self.hung.load(Ordering::Relaxed) => {
                        match self.settings.hung.held_call_lost(id, pending) {
                            Some(pending) => pending,
                            None => return,
                        }
                    }
                    _ => pending,
                };
                let error = format!("worker lost ({ending:?}) while running the call");
                self.fail(pending, &error, Outcome::WorkerLost, Some(Mark::Failed));
            }
            Failure::ReplyTooLarge { len } => {
                // The worker answered: its slot is free again.
                if let Some(id) = self.id() {
                    self.dispatcher.finished(id);
                }
                let error = format!(
                    "the worker's reply of {len} bytes is over max_frame_size ({})",
                    self.settings.max_frame_size
                );
                // Unmarked: the handler answered, too large, as it will every time (like its
                // own exception, not a fault of this worker or LB).
                self.fail(pending, &error, Outcome::Protocol, None);
            }
            Failure::ReplyMalformed => {
                if let Some(id) = self.id() {
                    self.dispatcher.finished(id);
                }
                self.fail(
                    pending,
                    "malformed reply from the worker",
                    Outcome::Protocol,
                    Some(Mark::Failed),
                );
            }
            // Never dropped at expiry (`Expiry::Keep`).
            Failure::Timeout => self.fail(pending, "timeout", Outcome::Timeout, Some(Mark::Failed)),
        }
    }

    fn frame(&self, message: Message) -> Result<(), NotWorker> {
        match self.id() {
            Some(id) => {
                self.worker_frame(id, &message);
                Ok(())
            }
            None => self.handshake(&message),
        }
    }

    fn malformed(&self, error: &rpc_frame::HeaderError) -> Result<(), NotWorker> {
        tracing::warn!(worker = self.id(), conn = self.conn, %error, "bad header from worker");
        match self.id() {
            Some(_) => Ok(()),
            None => Err(NotWorker::NotAWorker),
        }
    }

    fn oversized(&self) -> Result<(), NotWorker> {
        if self.id().is_none() {
            tracing::warn!(
                service = self.settings.service,
                conn = self.conn,
                "not a worker: a frame over max_frame_size came before HELLO or a ping echo; closing"
            );
            return Err(NotWorker::NotAWorker);
        }
        Ok(())
    }

    fn tick(&self, tick: &Tick) -> Result<(), NotWorker> {
        match self.id() {
            None if tick.age >= self.settings.heartbeat_timeout => Err(NotWorker::NoHandshake),
            None => Ok(()),
            Some(id) => {
                if tick.held > 0 {
                    self.check_hung(id);
                }
                Ok(())
            }
        }
    }

    fn ended(&self, _: Ending<NotWorker>) {
        if let Some(id) = self.id() {
            self.dispatcher.remove(id);
            self.settings.metrics.workers_left.inc();
            let _ = self.events.send(WorkerEvent::Left(id));
        }
    }

    fn unsent(&self, call: Call, _: Ending<NotWorker>) {
        // Handed over but never written: another worker can run it.
        self.moved.fetch_add(1, Ordering::Relaxed);
        resubmit(self.dispatcher, self.settings, call);
    }
}

/// A worker's HELLO capacity, within what the LB believes.
fn hello_capacity(hello: &Hello, settings: &WorkerSettings) -> usize {
    usize::try_from(hello.pool_size)
        .unwrap_or(1)
        .clamp(1, settings.max_capacity)
}

/// A HELLO's pid, if it is one (a process id is positive).
fn hello_pid(hello: &Hello) -> Option<u32> {
    u32::try_from(hello.pid).ok().filter(|&pid| pid > 0)
}

/// Milliseconds since `started`, to the microsecond (log lines).
fn millis(started: Instant) -> f64 {
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    micros as f64 / 1000.0
}

/// Gives a call back to the dispatcher; if no worker can take it, fails it (a refusal,
/// marked [`Mark::Refused`]: no worker got it).
pub fn resubmit(dispatcher: &Dispatcher, settings: &WorkerSettings, call: Call) {
    if let Err((call, reject)) = dispatcher.submit(call) {
        crate::front::reject(call, reject, &settings.service, &settings.metrics);
    }
}

fn log_hello(id: WorkerId, hello: &Hello, capacity: usize, settings: &WorkerSettings) {
    tracing::info!(
        worker = id,
        pid = hello.pid,
        capacity,
        service = hello.service,
        "worker hello"
    );
    if !hello.service.is_empty() && hello.service != settings.service {
        tracing::warn!(
            worker = id,
            theirs = hello.service,
            ours = settings.service,
            "worker serves another service name"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::FrontTx;
    use crate::dispatch::testing::{answer, assert_error, call_from, front};
    use rpc_mux::Policy as _;

    fn settings() -> WorkerSettings {
        WorkerSettings {
            service: "svc".into(),
            default_capacity: 1,
            max_capacity: 8,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_frame_size: 1000,
            metrics: Arc::new(LbMetrics::new("svc")),
            worker_timeout: Arc::default(),
            hung: Arc::default(),
        }
    }

    /// Runs `check` with a policy of a connection that joined as a worker.
    fn with_policy(check: impl FnOnce(&WorkerPolicy<'_>)) {
        let (tx, _rx) = mpsc::unbounded_channel();
        let (events, _events_rx) = mpsc::unbounded_channel();
        let dispatcher = Arc::new(Dispatcher::new(10));
        let settings = settings();
        let policy = WorkerPolicy::new(1, &tx, &dispatcher, &settings, &events);
        policy.activate(1, "test");
        check(&policy);
    }

    /// A call from the proxy's `seqid` as written to the worker: what the policy keeps.
    fn pending(policy: &WorkerPolicy<'_>, tx: &FrontTx, seqid: i32) -> Pending {
        let start = policy.start(call_from(tx, "m", seqid), Instant::now());
        start.pending.expect("a call with a reply is held").1
    }

    #[test]
    fn failures_after_dispatch_are_marked_failed() {
        with_policy(|policy| {
            let (tx, mut rx) = front(1 << 20);
            let mut timed_out = pending(policy, &tx, 1);
            assert_eq!(policy.expired(&mut timed_out), Expiry::Keep);
            assert_error(
                &answer(&mut rx),
                1,
                "Service: svc, Method: m, Error: timeout, the worker did not answer within the request timeout",
                Some(Mark::Failed),
            );
            // The late end of a call already answered adds nothing.
            policy.failed(timed_out, Failure::Ended(Ending::Closed));
            assert!(rx.try_recv().is_err());

            let cases = [
                (
                    Failure::Ended(Ending::HeartbeatTimeout),
                    "Service: svc, Method: m, Error: worker lost (HeartbeatTimeout) while running the call",
                ),
                (Failure::Timeout, "Service: svc, Method: m, Error: timeout"),
                (
                    Failure::ReplyMalformed,
                    "Service: svc, Method: m, Error: malformed reply from the worker",
                ),
            ];
            for (seqid, (failure, text)) in (2..).zip(cases) {
                policy.failed(pending(policy, &tx, seqid), failure);
                assert_error(&answer(&mut rx), seqid, text, Some(Mark::Failed));
            }
        });
    }

    #[test]
    fn a_reply_over_max_frame_size_and_a_handlers_exception_are_unmarked() {
        with_policy(|policy| {
            let (tx, mut rx) = front(1 << 20);
            policy.failed(
                pending(policy, &tx, 1),
                Failure::ReplyTooLarge { len: 5000 },
            );
            assert_error(
                &answer(&mut rx),
                1,
                "Service: svc, Method: m, Error: the worker's reply of 5000 bytes is over max_frame_size (1000)",
                None,
            );

            // The handler's own exception passes as it is, but for the proxy's seqid.
            let mut wire = rpc_frame::application_exception(
                "m",
                77,
                ExceptionCode::InternalError,
                "KeyError: 'x'",
            );
            let frame = rpc_frame::decode_frame(&mut wire, 1 << 20)
                .unwrap()
                .unwrap();
            let raised = Message::parse(frame).unwrap();
            let body = raised.body().to_vec();
            policy.reply(pending(policy, &tx, 2), raised);
            let passed = answer(&mut rx);
            assert_eq!(passed.body(), &body[..], "untouched");
            assert_error(&passed, 2, "KeyError: 'x'", None);
        });
    }

    #[test]
    fn calls_of_a_killed_worker_get_where_its_handler_was_stuck() {
        with_policy(|policy| {
            let id = policy.id().unwrap();
            let (tx, mut rx) = front(1 << 20);
            policy.hung.store(true, Ordering::Relaxed);
            policy.settings.hung.start_killing(id);
            // The connection ends (SIGKILL) before the report is ready: the call waits.
            policy.failed(pending(policy, &tx, 1), Failure::Ended(Ending::Closed));
            assert!(rx.try_recv().is_err(), "answered before the report");
            policy.settings.hung.report(
                id,
                crate::watchdog::Report {
                    pid: 77,
                    blame: Some("/srv/h.py:3 in spin".into()),
                },
            );
            let killed = answer(&mut rx);
            let (_, text) = rpc_frame::parse_application_exception(killed.body()).unwrap();
            assert!(
                text.starts_with("Worker pid 77 killed after ")
                    && text.ends_with(" ms: /srv/h.py:3 in spin"),
                "{text}"
            );
            assert_eq!(rpc_frame::exception_mark(killed.body()), Some(Mark::Failed));
            // A call that ends after the report is answered at once; then the slot goes.
            policy.failed(pending(policy, &tx, 2), Failure::Ended(Ending::Closed));
            assert_eq!(answer(&mut rx).seqid(), 2);
            policy.settings.hung.connection_closed(id);
            assert!(!policy.settings.hung.is_killing(id));
        });
    }
}
