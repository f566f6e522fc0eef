//! The LB's back side: Python worker processes dial in on `back_address`; each connection
//! runs calls handed to it by the dispatcher, with seqids rewritten per connection and
//! restored on the reply, heartbeats both ways, STOP / STOP_CONFIRM, and HELLO (capacity).
//! Sits between the [`Dispatcher`] and the worker sockets.
//!
//! # A connection is a worker only once it proves it
//! A new back connection is pinged at once and gets no call until it has sent a valid HELLO
//! (type 23) or any well-formed heartbeat (type 20: the echo of that ping, which is all an
//! old worker ever sends). Only then is it added to the dispatcher (and counted, logged
//! `worker joined`). Before that, an unframeable byte stream, a bad header or any other
//! message closes it, and so does silence for `heartbeat_timeout`; it never held a call, so
//! no call is lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rpc_frame::{ExceptionCode, Hello, InFlight, Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::dispatch::{Call, Dispatcher, ReplyTo, ToWorker, WorkerId};
use crate::metrics::{LbMetrics, Meter, Outcome};

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
    /// Largest frame accepted from a worker.
    pub max_frame_size: usize,
    /// Where calls and workers are counted.
    pub metrics: Arc<LbMetrics>,
}

/// Worker-side events, for logs and registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A back connection proved to be a worker (HELLO or ping echo) and takes calls.
    Joined(WorkerId),
    /// A worker sent STOP or left.
    Left(WorkerId),
}

/// A call written to the worker, waiting for its reply.
struct Pending {
    /// `None` once the caller has been answered (timeout): the slot stays taken until the
    /// worker answers.
    reply: Option<ReplyTo>,
    method: String,
    /// Taken with `reply`: the call's outcome is recorded once.
    meter: Option<Meter>,
}

struct Shared {
    /// Numbers back connections for the logs, workers or not.
    conn: u64,
    /// Set once the connection proved to be a worker and joined the dispatcher.
    worker: OnceLock<WorkerId>,
    pending: Mutex<InFlight<Pending>>,
    epoch: Instant,
    last_rx_ms: AtomicU64,
}

/// Back connections accepted so far (log numbering only).
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

impl Shared {
    /// The dispatcher's id for this worker; `None` until it proved to be one.
    fn id(&self) -> Option<WorkerId> {
        self.worker.get().copied()
    }
    fn pending(&self) -> std::sync::MutexGuard<'_, InFlight<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// Why a worker connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Closed,
    HeartbeatTimeout,
    BadFrame,
    /// Neither HELLO nor a ping echo within the heartbeat timeout of the accept.
    NoHandshake,
    /// A message no worker sends before it has proved to be one.
    NotAWorker,
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
    let shared = Shared {
        conn: CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1,
        worker: OnceLock::new(),
        pending: Mutex::new(InFlight::new()),
        epoch: Instant::now(),
        last_rx_ms: AtomicU64::new(0),
    };
    tracing::debug!(
        service = settings.service,
        conn = shared.conn,
        "back connection accepted; pinged, no call until HELLO or the ping's echo"
    );
    let ending = tokio::select! {
        ending = write_loop(&shared, &dispatcher, &settings, writer, &mut rx) => ending,
        ending = read_loop(&shared, &dispatcher, &settings, reader, &tx, &events) => ending,
    };
    let Some(id) = shared.id() else {
        // Never in the dispatcher: it held no call and nothing was handed to it.
        tracing::warn!(
            service = settings.service,
            conn = shared.conn,
            ?ending,
            "back connection closed before it proved to be a worker (no HELLO, no ping echo); it got no call"
        );
        return;
    };
    dispatcher.remove(id);
    settings.metrics.workers_left.inc();
    let _ = events.send(WorkerEvent::Left(id));
    let held = shared.pending().take_all();
    let lost = held.iter().filter(|p| p.reply.is_some()).count();
    for pending in held {
        if let Some(reply) = pending.reply {
            let text = format!(
                "Service: {}, Method: {}, Error: worker lost ({ending:?}) while running the call",
                settings.service, pending.method
            );
            reply.fail(&pending.method, ExceptionCode::InternalError, &text);
        }
        if let Some(meter) = pending.meter {
            meter.finish(Outcome::WorkerLost);
        }
    }
    // Calls handed over but never written: another worker can run them.
    rx.close();
    let mut moved = 0;
    while let Ok(item) = rx.try_recv() {
        if let ToWorker::Call(call) = item {
            moved += 1;
            resubmit(&dispatcher, &settings, call);
        }
    }
    tracing::info!(
        service = settings.service,
        worker = id,
        conn = shared.conn,
        ?ending,
        lost,
        moved,
        "worker left"
    );
}

/// The connection proved to be a worker: it joins the dispatcher with `capacity` slots.
fn activate(
    shared: &Shared,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
    tx: &mpsc::UnboundedSender<ToWorker>,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    capacity: usize,
    proof: &'static str,
) -> WorkerId {
    let id = dispatcher.add_worker(tx.clone(), capacity);
    // `serve` owns `shared` and only this function sets it, once: the caller checked `id()`.
    let _ = shared.worker.set(id);
    settings.metrics.workers_joined.inc();
    let _ = events.send(WorkerEvent::Joined(id));
    tracing::info!(
        service = settings.service,
        worker = id,
        conn = shared.conn,
        proof,
        "worker joined"
    );
    id
}

/// A worker's HELLO capacity, within what the LB believes.
fn hello_capacity(hello: &Hello, settings: &WorkerSettings) -> usize {
    usize::try_from(hello.pool_size)
        .unwrap_or(1)
        .clamp(1, settings.max_capacity)
}

/// Gives a call back to the dispatcher; if no worker can take it, fails it.
pub fn resubmit(dispatcher: &Dispatcher, settings: &WorkerSettings, call: Call) {
    if let Err((call, reject)) = dispatcher.submit(call) {
        crate::front::reject(call, reject, &settings.service, &settings.metrics);
    }
}

async fn write_loop<W>(
    shared: &Shared,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
    mut writer: W,
    rx: &mut mpsc::UnboundedReceiver<ToWorker>,
) -> Ending
where
    W: AsyncWrite + Unpin,
{
    let mut tick =
        tokio::time::interval(settings.heartbeat_interval.min(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(64);
    let mut buf = BytesMut::new();
    let interval_ms = settings.heartbeat_interval.as_millis() as u64;
    let timeout_ms = settings.heartbeat_timeout.as_millis() as u64;
    // The first ping goes out at once: a worker that never sends HELLO proves itself by its
    // echo, so it joins within a round trip.
    if writer.write_all(&rpc_frame::heartbeat(0)).await.is_err() {
        return Ending::Closed;
    }
    let mut last_ping_ms = shared.now_ms();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return Ending::Closed;
                }
                let mut oneway_written = 0;
                {
                    let mut pending = shared.pending();
                    for item in batch.drain(..) {
                        match item {
                            ToWorker::Control(frame) => buf.extend_from_slice(&frame),
                            ToWorker::Call(call) => {
                                let mut message = call.message;
                                let seqid = match call.reply {
                                    // The proxy's seqid is kept in ReplyTo; the worker sees ours.
                                    Some(reply) => pending.insert(
                                        call.deadline,
                                        Pending {
                                            reply: Some(reply),
                                            method: message.name().to_owned(),
                                            meter: Some(call.meter),
                                        },
                                    ),
                                    // A ONEWAY call is done once written.
                                    None => {
                                        oneway_written += 1;
                                        call.meter.finish(Outcome::Ok);
                                        pending.next_seqid()
                                    }
                                };
                                message.set_seqid(seqid);
                                buf.extend_from_slice(message.as_wire());
                            }
                        }
                    }
                }
                if writer.write_all(&buf).await.is_err() {
                    return Ending::Closed;
                }
                buf.clear();
                if buf.capacity() > 1 << 20 {
                    buf = BytesMut::new();
                }
                // Calls reach this connection only once it joined, so `id()` is set.
                if let Some(id) = shared.id() {
                    for _ in 0..oneway_written {
                        dispatcher.finished(id);
                    }
                }
            }
            _ = tick.tick() => {
                expire(shared, settings);
                let now_ms = shared.now_ms();
                if shared.id().is_none() && now_ms >= timeout_ms {
                    return Ending::NoHandshake;
                }
                let quiet = now_ms.saturating_sub(shared.last_rx_ms.load(Ordering::Relaxed));
                if quiet >= timeout_ms {
                    return Ending::HeartbeatTimeout;
                }
                if now_ms.saturating_sub(last_ping_ms) >= interval_ms {
                    last_ping_ms = now_ms;
                    if writer.write_all(&rpc_frame::heartbeat(0)).await.is_err() {
                        return Ending::Closed;
                    }
                }
            }
        }
    }
}

/// Answers callers whose deadline passed; their worker slot stays taken until the worker
/// answers.
fn expire(shared: &Shared, settings: &WorkerSettings) {
    let now = Instant::now();
    let mut pending = shared.pending();
    while let Some(seqid) = pending.next_expired(now) {
        if let Some(call) = pending.get_mut(seqid)
            && let Some(reply) = call.reply.take()
        {
            let text = format!(
                "Service: {}, Method: {}, Error: timeout, the worker did not answer within the request timeout",
                settings.service, call.method
            );
            reply.fail(&call.method, ExceptionCode::InternalError, &text);
            if let Some(meter) = call.meter.take() {
                meter.finish(Outcome::Timeout);
            }
        }
    }
}

async fn read_loop<R>(
    shared: &Shared,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
    mut reader: R,
    tx: &mpsc::UnboundedSender<ToWorker>,
    events: &mpsc::UnboundedSender<WorkerEvent>,
) -> Ending
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // A connection that sent STOP before it joined never joins.
    let mut stopped = false;
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Ending::Closed,
            Ok(_) => {}
        }
        shared.last_rx_ms.store(shared.now_ms(), Ordering::Relaxed);
        loop {
            let frame = match rpc_frame::decode_frame(&mut buf, settings.max_frame_size) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(
                        worker = shared.id(),
                        conn = shared.conn,
                        error = %e,
                        "bad frame from worker"
                    );
                    return Ending::BadFrame;
                }
            };
            let message = match Message::parse(frame) {
                Ok(m) => m,
                Err((_, e)) => {
                    tracing::warn!(
                        worker = shared.id(),
                        conn = shared.conn,
                        error = %e,
                        "bad header from worker"
                    );
                    return Ending::BadFrame;
                }
            };
            if shared.id().is_none() {
                match handshake(shared, dispatcher, settings, tx, events, &message, stopped) {
                    Handshake::Wait => {}
                    Handshake::Stopped => stopped = true,
                    Handshake::Refuse => return Ending::NotAWorker,
                }
                continue;
            }
            worker_frame(shared, dispatcher, settings, tx, events, message);
        }
    }
}

/// What a frame from a connection that has not proved to be a worker leads to.
enum Handshake {
    /// Joined, or nothing proved yet (a malformed HELLO): keep reading.
    Wait,
    /// It sent STOP (confirmed): it never joins.
    Stopped,
    /// Not a worker: close.
    Refuse,
}

/// Handles a frame that came before the connection proved to be a worker: a valid HELLO or
/// any heartbeat makes it join; STOP is confirmed; anything else means it is not a worker.
fn handshake(
    shared: &Shared,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
    tx: &mpsc::UnboundedSender<ToWorker>,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    message: &Message,
    stopped: bool,
) -> Handshake {
    match message.message_type() {
        MessageType::Hello => match Hello::decode(message.body()) {
            Some(hello) if !stopped => {
                let capacity = hello_capacity(&hello, settings);
                let id = activate(shared, dispatcher, settings, tx, events, capacity, "hello");
                log_hello(id, &hello, capacity, settings);
                Handshake::Wait
            }
            Some(_) => Handshake::Wait,
            None => {
                tracing::warn!(
                    conn = shared.conn,
                    "malformed HELLO ignored (not joined yet)"
                );
                Handshake::Wait
            }
        },
        MessageType::Heartbeat if !stopped => {
            activate(
                shared,
                dispatcher,
                settings,
                tx,
                events,
                settings.default_capacity,
                "ping echo",
            );
            Handshake::Wait
        }
        MessageType::Heartbeat => Handshake::Wait,
        MessageType::Stop => {
            tracing::info!(
                service = settings.service,
                conn = shared.conn,
                "back connection sent STOP before it joined; it gets no call"
            );
            let _ = tx.send(ToWorker::Control(rpc_frame::stop_confirm()));
            Handshake::Stopped
        }
        other => {
            tracing::warn!(
                service = settings.service,
                conn = shared.conn,
                kind = other.as_u8(),
                name = message.name(),
                "not a worker: this message came before HELLO or a ping echo; closing"
            );
            Handshake::Refuse
        }
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

/// Handles a frame from a connection that joined as a worker.
fn worker_frame(
    shared: &Shared,
    dispatcher: &Dispatcher,
    settings: &WorkerSettings,
    tx: &mpsc::UnboundedSender<ToWorker>,
    events: &mpsc::UnboundedSender<WorkerEvent>,
    mut message: Message,
) {
    let Some(id) = shared.id() else {
        return;
    };
    match message.message_type() {
        MessageType::Reply | MessageType::Exception => {
            let call = shared.pending().remove(message.seqid());
            let Some(call) = call else {
                tracing::debug!(
                    worker = id,
                    seqid = message.seqid(),
                    "reply for no pending call"
                );
                return;
            };
            dispatcher.finished(id);
            if let Some(meter) = call.meter {
                meter.finish(match message.message_type() {
                    MessageType::Exception => Outcome::Exception,
                    _ => Outcome::Ok,
                });
            }
            if let Some(reply) = call.reply {
                message.set_seqid(reply.seqid);
                reply.send(message.into_wire());
            }
        }
        // The echo of our ping; any frame already counted as life.
        MessageType::Heartbeat => {}
        MessageType::Stop => {
            tracing::info!(
                service = settings.service,
                worker = id,
                "worker stopping (STOP)"
            );
            dispatcher.deactivate(id);
            let _ = events.send(WorkerEvent::Left(id));
            let _ = tx.send(ToWorker::Control(rpc_frame::stop_confirm()));
        }
        MessageType::Hello => match Hello::decode(message.body()) {
            Some(hello) => {
                let capacity = hello_capacity(&hello, settings);
                log_hello(id, &hello, capacity, settings);
                dispatcher.set_capacity(id, capacity);
            }
            None => tracing::warn!(worker = id, "malformed HELLO ignored"),
        },
        other => {
            tracing::debug!(
                worker = id,
                kind = other.as_u8(),
                "unexpected frame from worker ignored"
            );
        }
    }
}
