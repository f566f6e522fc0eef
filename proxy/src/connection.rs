//! One client connection: reads pipelined frames, routes each call, and writes replies back
//! in request order. Sits between the listener (which accepts the socket) and the router and
//! upstream endpoints (which carry the call on).
//!
//! Every frame read becomes one entry of an ordered queue of reply futures; the loop writes
//! whatever is ready at the head, batching replies that are ready together. Pings, protocol
//! errors and refusals are entries that are ready at once, so they keep their place in line.
//! ONEWAY calls are entries that yield nothing.
//!
//! A frame once started (any byte of its length or body read) must be complete within
//! [`FRAME_TIMEOUT`]: a client dripping bytes is closed (after the replies it is owed), while
//! a large frame arriving steadily is fine. This holds whether or not `client_idle_timeout_ms`
//! is set, so a stalled client never holds a connection forever.
//!
//! # Bounds (CONTRACT section 9)
//! - Every request frame read and every reply waiting to be written is charged to the
//!   connection's byte budget ([`rpc_mux::ConnBudget`]) until its call is answered or the
//!   reply written. At the connection's or the process's bound the client is not read; a
//!   reply that would go past it is replaced by a code-6 error.
//! - A client that accepts no byte of a pending reply for `write_timeout_ms` is closed.
//! - A request over `max_frame_size` is answered with code 7 and skipped without buffering
//!   it; the calls pipelined behind it go on.
//! - A call's wait for its reply ends by `request_timeout_ms` plus a clock tick, whatever
//!   the upstream does: its connection's clock runs beside its reader and writer
//!   ([`rpc_mux::connection`]), so no timer per call is needed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::stream::{FuturesOrdered, StreamExt};
use rpc_frame::{ExceptionCode, FrameError, Mark, Message, MessageType};
use rpc_mux::{Charge, ConnBudget, Decoded, FrameDecoder, Oversized, ProcessBudget};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::{CallError, UpstreamFailure};
use crate::metrics::{Outcome, UNKNOWN};
use crate::resilience::{RetryReason, Verdict};
use crate::route::{Lookup, NoPick, Pick, Router, Service};
use crate::upstream::{Endpoint, Failure, Outgoing, Refused};

/// Per-connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// Largest frame accepted from the client.
    pub max_frame_size: usize,
    /// Calls in flight on one connection beyond this get a code-6 error at once.
    pub max_inflight: usize,
    /// Longest wait for the first full routing table.
    pub startup_hold: Duration,
    /// Close a connection with nothing in flight and no frame for this long.
    pub idle_timeout: Option<Duration>,
    /// Close a client that accepts no byte of a pending reply this long.
    pub write_timeout: Duration,
    /// Bytes of requests and replies buffered for one connection before it is not read.
    pub max_buffer_bytes: usize,
    /// The process's byte budget, shared by every client connection.
    pub process_budget: Arc<ProcessBudget>,
}

impl ConnectionSettings {
    /// The largest request read: `max_frame_size`, or the connection's byte budget when that
    /// is smaller (a frame the connection may not buffer is refused like an oversized one).
    pub fn frame_limit(&self) -> usize {
        self.max_frame_size.min(self.max_buffer_bytes)
    }

    /// Settings with the CONTRACT defaults for the keys not given (tests).
    pub fn new(max_frame_size: usize, max_inflight: usize, startup_hold: Duration) -> Self {
        ConnectionSettings {
            max_frame_size,
            max_inflight,
            startup_hold,
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
            max_buffer_bytes: 32 << 20,
            process_budget: ProcessBudget::new(1 << 30),
        }
    }
}

/// Bytes to write to the client with what they hold of the budget.
struct Ready {
    bytes: BytesMut,
    charge: Charge,
}

/// A reply slot: resolves to the bytes to write, or `None` (ONEWAY).
type ReplyFuture = Pin<Box<dyn Future<Output = Option<Ready>> + Send>>;

/// Endpoints tried per call: a call that was never written may go to another endpoint.
const MAX_ATTEMPTS: usize = 3;

/// Read buffer growth step.
const READ_CHUNK: usize = 4096;

/// How long a client may take to send one frame, from its first byte to its last: twice the
/// default request timeout, and enough for a 16 MB frame at 0.5 MB/s. The LB bounds the
/// frames of its peers alike.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one client connection until it closes, breaks, idles out, stalls mid-frame for
/// [`FRAME_TIMEOUT`], or `shutdown` fires and its calls are answered.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    router: Arc<Router>,
    settings: Arc<ConnectionSettings>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    serve_with_frame_timeout(reader, writer, router, settings, shutdown, FRAME_TIMEOUT).await;
}

/// [`serve`] with another bound than [`FRAME_TIMEOUT`] on the time one frame may take to
/// arrive (tests use a short one).
pub async fn serve_with_frame_timeout<R, W>(
    reader: R,
    writer: W,
    router: Arc<Router>,
    settings: Arc<ConnectionSettings>,
    shutdown: CancellationToken,
    frame_timeout: Duration,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let budget = ConnBudget::new(&settings.process_budget, settings.max_buffer_bytes);
    let mut conn = Connection {
        reader,
        writer,
        router,
        decoder: FrameDecoder::new(settings.frame_limit()),
        budget,
        partial: Charge::none(),
        settings,
        inflight: FuturesOrdered::new(),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        reading: true,
        frame_started: None,
        frame_timeout,
    };
    conn.run(shutdown).await;
}

struct Connection<R, W> {
    reader: R,
    writer: W,
    router: Arc<Router>,
    settings: Arc<ConnectionSettings>,
    decoder: FrameDecoder,
    /// Bytes of this connection's requests and replies held.
    budget: Arc<ConnBudget>,
    /// The bytes of an incomplete frame in `rbuf`, against `budget`.
    partial: Charge,
    inflight: FuturesOrdered<ReplyFuture>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// False once the client has closed its side, sent an unframeable byte stream, or
    /// stalled mid-frame.
    reading: bool,
    /// When the first byte of the incomplete frame in `rbuf` was read.
    frame_started: Option<tokio::time::Instant>,
    /// Longest time from a frame's first byte to its last.
    frame_timeout: Duration,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(&mut self, shutdown: CancellationToken) {
        let mut stopping = false;
        // Made once: a fresh `cancelled()` per pass would register and drop a waiter on the
        // token every time the connection wakes.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            if !self.reading && self.inflight.is_empty() {
                break;
            }
            if stopping && self.inflight.is_empty() {
                break;
            }
            let want_read = self.reading && !stopping;
            // Answers waiting behind a slow call are bounded in number too. While the budget
            // is full the frame deadline still runs, so partial frames cannot hold it.
            let budget_full = want_read && self.budget.is_full();
            let full = budget_full
                || (want_read && self.inflight.len() >= 2 * self.settings.max_inflight.max(1));
            let can_read = want_read && !full;
            let idle = self
                .settings
                .idle_timeout
                .filter(|_| self.inflight.is_empty());
            let frame_deadline = self.frame_started.map(|at| at + self.frame_timeout);
            tokio::select! {
                biased;
                Some(first) = self.inflight.next(), if !self.inflight.is_empty() => {
                    // Time spent writing (a client slow to read) is not held against a frame
                    // it is sending.
                    let writing_since = self.frame_started.map(|_| tokio::time::Instant::now());
                    if !self.write_ready(first).await {
                        return;
                    }
                    if let (Some(since), Some(at)) = (writing_since, self.frame_started.as_mut()) {
                        *at += since.elapsed();
                    }
                }
                read = self.reader.read_buf(&mut self.rbuf), if can_read => {
                    match read {
                        Ok(0) | Err(_) => self.reading = false,
                        Ok(_) => {
                            let before = self.rbuf.len();
                            self.take_frames();
                            if self.reading && self.decoder.awaiting_head(&self.rbuf) {
                                self.finish_head();
                            }
                            self.note_partial_frame(before);
                            self.charge_partial_frame();
                        }
                    }
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 64 * 1024 {
                        // Give back a buffer grown by a large frame.
                        self.rbuf = BytesMut::new();
                    }
                }
                // (Too many answers waiting: the head's progress is what frees them.)
                () = wait_room_if(&self.budget, budget_full), if budget_full => {}
                _ = &mut cancelled, if !stopping => stopping = true,
                _ = sleep_opt(idle), if can_read => {
                    tracing::debug!("idle client connection closed");
                    return;
                }
                _ = sleep_until_opt(frame_deadline), if want_read => {
                    // Stop reading; the replies owed are still written, then it closes.
                    tracing::debug!(
                        bytes = self.rbuf.len(),
                        timeout_ms = self.frame_timeout.as_millis() as u64,
                        "client did not complete a frame within the frame timeout, closing"
                    );
                    self.reading = false;
                    self.rbuf = BytesMut::new();
                    self.partial = Charge::none();
                    self.frame_started = None;
                }
            }
            if self.reading && self.rbuf.capacity() - self.rbuf.len() < 64 {
                self.rbuf.reserve(READ_CHUNK);
            }
        }
        let _ = self.writer.shutdown().await;
    }

    /// Writes the head reply and every reply already ready behind it, in one write; false
    /// when the client is gone or took no byte for the write timeout.
    async fn write_ready(&mut self, first: Option<Ready>) -> bool {
        let mut next = Some(first);
        let mut held = Vec::new();
        while let Some(reply) = next {
            if let Some(Ready { bytes, charge }) = reply {
                if self.wbuf.is_empty() && bytes.len() > 64 * 1024 {
                    if !self.write(&bytes).await {
                        return false;
                    }
                } else {
                    self.wbuf.extend_from_slice(&bytes);
                    held.push(charge);
                }
            }
            next = if self.inflight.is_empty() {
                None
            } else {
                self.inflight.next().now_or_never().flatten()
            };
        }
        if !self.wbuf.is_empty() {
            let wbuf = std::mem::take(&mut self.wbuf);
            let written = self.write(&wbuf).await;
            self.wbuf = wbuf;
            if !written {
                return false;
            }
            drop(held);
            self.wbuf.clear();
            if self.wbuf.capacity() > 256 * 1024 {
                self.wbuf = BytesMut::new();
            }
        }
        true
    }

    /// Writes `bytes` within the write timeout.
    async fn write(&mut self, bytes: &[u8]) -> bool {
        match rpc_mux::write_all(&mut self.writer, bytes, self.settings.write_timeout).await {
            Ok(()) => true,
            Err(e) => {
                if e.is_stall() {
                    tracing::info!(
                        timeout_ms = self.settings.write_timeout.as_millis() as u64,
                        "client accepted no reply byte within the write timeout, closing"
                    );
                }
                false
            }
        }
    }

    /// Starts or stops the frame clock after `take_frames`; `before` is the buffer's length
    /// before it. What is left is an incomplete frame that began in this read if a whole
    /// frame was taken or none was pending.
    fn note_partial_frame(&mut self, before: usize) {
        if !self.decoder.in_frame(&self.rbuf) {
            self.frame_started = None;
        } else if self.frame_started.is_none() || self.rbuf.len() < before {
            self.frame_started = Some(tokio::time::Instant::now());
        }
    }

    /// Charges the incomplete frame left in the read buffer (it counts against the budget like
    /// the call it will become; the frame deadline bounds how long it may hold it).
    fn charge_partial_frame(&mut self) {
        let len = self.rbuf.len();
        if self.partial.bytes() != len {
            self.partial = Charge::none();
            if len > 0 {
                self.partial = self.budget.charge(len);
            }
        }
    }

    /// Answers a request over `max_frame_size` (code 7, its own seqid when its header came
    /// with it); the rest of it is skipped as it arrives.
    fn oversized(&mut self, over: &Oversized) {
        self.count_protocol_error();
        let reply = oversized_reply(over, self.settings.frame_limit());
        self.inflight.push_back(ready(&self.budget, reply));
    }

    /// An oversized frame's header is not all in: after one more look at what the socket
    /// already holds, answer it without its seqid rather than wait on a client that may have
    /// sent no more (a client writes a frame at once, so its header comes with its length).
    fn finish_head(&mut self) {
        self.rbuf.reserve(READ_CHUNK);
        match self.reader.read_buf(&mut self.rbuf).now_or_never() {
            Some(Ok(0) | Err(_)) => self.reading = false,
            Some(Ok(_)) => self.take_frames(),
            None => {}
        }
        if let Some(Decoded::Oversized(over)) = self.decoder.give_up_head(&mut self.rbuf) {
            self.oversized(&over);
            self.take_frames();
        }
    }

    /// Turns every whole frame in the read buffer into a reply slot.
    fn take_frames(&mut self) {
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(Decoded::Frame(frame))) => {
                    let charge = self.budget.charge(frame.len());
                    let slot = self.dispatch(frame, charge);
                    self.inflight.push_back(slot);
                }
                Ok(Some(Decoded::Oversized(over))) => self.oversized(&over),
                Ok(None) => return,
                Err(e) => {
                    // The byte stream cannot be framed any more: answer once, then close.
                    self.count_protocol_error();
                    self.inflight
                        .push_back(ready(&self.budget, frame_error_reply(&e)));
                    self.reading = false;
                    self.rbuf = BytesMut::new();
                    return;
                }
            }
        }
    }

    fn dispatch(&mut self, frame: BytesMut, charge: Charge) -> ReplyFuture {
        let message = match Message::parse(frame) {
            Ok(m) => m,
            Err((frame, e)) => {
                let (name, seqid) =
                    rpc_frame::salvage_name_and_seqid(&frame, &e).unwrap_or_default();
                let text = format!("malformed message header: {e}");
                tracing::debug!(error = %e, "bad client header");
                self.count_protocol_error();
                return ready(
                    &self.budget,
                    Some(rpc_frame::application_exception(
                        &name,
                        seqid,
                        ExceptionCode::ProtocolError,
                        &text,
                    )),
                );
            }
        };
        let seqid = message.seqid();
        match message.message_type() {
            MessageType::Call | MessageType::Oneway => {}
            MessageType::Heartbeat => {
                return ready(&self.budget, Some(rpc_frame::ping_reply(seqid)));
            }
            other => {
                let text = format!("message type {} is not a call", other.as_u8());
                self.count_protocol_error();
                return ready(
                    &self.budget,
                    Some(error_frame(
                        message.method(),
                        seqid,
                        &CallError::Protocol(text),
                    )),
                );
            }
        }
        let oneway = message.message_type() == MessageType::Oneway;
        if message.service_and_method().is_none() {
            let text = format!(
                "message name {:?} has no `service:` prefix (use TMultiplexedProtocol)",
                message.name()
            );
            self.count_protocol_error();
            return ready(
                &self.budget,
                reply_unless_oneway(oneway, || {
                    error_frame(message.name(), seqid, &CallError::Protocol(text))
                }),
            );
        }
        if self.inflight.len() >= self.settings.max_inflight {
            let (service, method) = message.service_and_method().unwrap_or_default();
            self.router
                .count_refused(service, method, Outcome::Overloaded);
            let error = CallError::Overloaded {
                service: service.to_owned(),
                method: method.to_owned(),
                cause: "too many calls in flight on this connection",
            };
            return ready(
                &self.budget,
                reply_unless_oneway(oneway, || error_frame(method, seqid, &error)),
            );
        }
        let started = Instant::now();
        Box::pin(call(
            self.router.clone(),
            message,
            charge,
            self.budget.clone(),
            self.settings.clone(),
            started,
        ))
    }

    /// Counts a frame that was no usable call (service and method `unknown`).
    fn count_protocol_error(&self) {
        self.router
            .metrics()
            .unknown()
            .record(UNKNOWN, Outcome::Protocol);
    }
}

/// An answer the proxy made itself (a pong, an error), ready at once, its bytes charged to
/// `budget` until written.
fn ready(budget: &Arc<ConnBudget>, reply: Option<BytesMut>) -> ReplyFuture {
    Box::pin(std::future::ready(reply.map(|bytes| Ready {
        charge: budget.charge(bytes.len()),
        bytes,
    })))
}

fn reply_unless_oneway(oneway: bool, build: impl FnOnce() -> BytesMut) -> Option<BytesMut> {
    if oneway { None } else { Some(build()) }
}

/// Waits for room in `budget` when `full`. The wait is boxed, and only once polled: this
/// branch is built on every pass of the connection loop, and an idle connection's task should
/// not carry a budget waiter in its size.
async fn wait_room_if(budget: &ConnBudget, full: bool) {
    if full {
        Box::pin(budget.wait_room()).await;
    }
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The `TApplicationException` frame for a failed call.
fn error_frame(method: &str, seqid: i32, error: &CallError) -> BytesMut {
    rpc_frame::application_exception(method, seqid, error.code(), &error.to_string())
}

/// The code-7 answer to a request over `max_frame_size` (none for ONEWAY); it reaches the
/// caller by the seqid its header gave, when it had a readable one.
fn oversized_reply(over: &Oversized, max: usize) -> Option<BytesMut> {
    let text = format!("frame of {} bytes is over max_frame_size ({max})", over.len);
    tracing::debug!(len = over.len, max, "oversized client frame skipped");
    match &over.head {
        Some(head) if head.message_type == MessageType::Oneway => None,
        Some(head) => Some(rpc_frame::application_exception(
            head.method(),
            head.seqid,
            ExceptionCode::ProtocolError,
            &text,
        )),
        None => Some(rpc_frame::application_exception(
            "",
            0,
            ExceptionCode::ProtocolError,
            &text,
        )),
    }
}

fn frame_error_reply(error: &FrameError) -> Option<BytesMut> {
    tracing::debug!(%error, "unframeable client input, closing");
    Some(rpc_frame::application_exception(
        "",
        0,
        ExceptionCode::ProtocolError,
        &format!("bad frame: {error}"),
    ))
}

/// Routes one call and waits for its reply. Returns the bytes for the client (a reply or a
/// `TApplicationException`), or `None` for ONEWAY. The call is counted and timed from
/// `started` (when its frame was read) to its answer.
async fn call(
    router: Arc<Router>,
    mut message: Message,
    request: Charge,
    budget: Arc<ConnBudget>,
    settings: Arc<ConnectionSettings>,
    started: Instant,
) -> Option<Ready> {
    let oneway = message.message_type() == MessageType::Oneway;
    let client_seqid = message.seqid();
    let name = message.name().to_owned();
    let (service, method) = name.split_once(':').unwrap_or(("", name.as_str()));
    let fail = |error: CallError| {
        if oneway {
            tracing::warn!(service, method, error = %error, "oneway call failed");
            None
        } else {
            tracing::debug!(service, method, error = %error, "call failed");
            Some(Ready {
                bytes: error_frame(method, client_seqid, &error),
                charge: Charge::none(),
            })
        }
    };
    if !router.is_synced() {
        router.wait_synced(settings.startup_hold).await;
    }
    let entry = match router.lookup(service) {
        Lookup::Found(entry) => entry,
        Lookup::Unknown => {
            let unknown = router.metrics().unknown();
            unknown
                .start_at(UNKNOWN, started)
                .finish(Outcome::UnknownService);
            return fail(CallError::UnknownService {
                service: service.to_owned(),
            });
        }
    };
    // Dropped unfinished (the client went away) it counts as `cancelled`.
    let guard = entry.calls.start_at(method, started);
    message.strip_service();
    let forwarded = forward(
        &entry,
        method,
        message,
        oneway,
        client_seqid,
        started,
        &budget,
    )
    .await;
    drop(request);
    match forwarded {
        Ok(Some(reply)) => {
            let Some(charge) = budget.try_charge_reply(reply.as_wire().len()) else {
                guard.finish(Outcome::Overloaded);
                return fail(CallError::Overloaded {
                    service: service.to_owned(),
                    method: method.to_owned(),
                    cause: "reply dropped: the client's connection buffer is full (max_connection_buffer_bytes or max_process_buffer_bytes)",
                });
            };
            guard.finish(match reply.message_type() {
                MessageType::Exception => Outcome::Exception,
                _ => Outcome::Ok,
            });
            Some(Ready {
                bytes: reply.into_wire(),
                charge,
            })
        }
        Ok(None) => {
            // Written, not answered: a ONEWAY name earns no metric label of its own.
            guard.finish_unanswered(Outcome::Ok);
            None
        }
        Err(error) => {
            guard.finish(Outcome::of(&error));
            fail(error)
        }
    }
}

/// Sends a call (`service:` stripped) to an endpoint of `entry` and waits for its answer
/// (`None` for ONEWAY, once queued).
///
/// A call that provably never reached a handler goes to another endpoint: one never written,
/// and one an LB that announces marks refused before dispatch (field 3 = 1). Such a retry is
/// made at most once per endpoint, never past the call's deadline, and only within the
/// service's retry budget; otherwise the caller gets the last answer (the LB's refusal as it
/// sent it). Every attempt's verdict feeds the endpoint's outlier state.
async fn forward(
    entry: &Service,
    method: &str,
    message: Message,
    oneway: bool,
    client_seqid: i32,
    started: Instant,
    budget: &Arc<ConnBudget>,
) -> Result<Option<Message>, CallError> {
    let service = entry.name.as_str();
    let health = &entry.health;
    health.deposit(started);
    let mut message = message;
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    // Why the next attempt is a retry, and what the caller gets if it is not made.
    let mut retry: Option<(RetryReason, Result<Option<Message>, CallError>)> = None;
    loop {
        if let Some((reason, answer)) = retry.take() {
            let timeout = tried
                .first()
                .map_or(Duration::ZERO, |e| e.request_timeout());
            if started.elapsed() >= timeout {
                // Its time is spent (it waited behind a clogged connection, or for a refusal):
                // no other endpoint gets it.
                return match answer {
                    Ok(refusal) => Ok(refusal),
                    Err(_) => Err(upstream_error(
                        entry,
                        method,
                        &tried,
                        UpstreamFailure::Timeout,
                    )),
                };
            }
            if tried.len() >= MAX_ATTEMPTS.min(entry.endpoints.len()) || !health.try_retry(reason) {
                return answer;
            }
        }
        let Pick { endpoint, probe } = match entry.pick(&tried) {
            Ok(pick) => pick,
            Err(NoPick::Empty) if tried.is_empty() => {
                return Err(no_endpoint(service, method, ""));
            }
            Err(_) => return Err(unreachable(service, method)),
        };
        // Kept to send again if the endpoint refuses it, when a retry is possible at all.
        let copy = (!oneway
            && endpoint.marks()
            && health.may_retry()
            && tried.len() + 1 < MAX_ATTEMPTS.min(entry.endpoints.len()))
        .then(|| copy_request(&message, budget))
        .flatten();
        let (tx, rx) = if oneway {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let out = Outgoing {
            message,
            reply: tx,
            client_seqid,
            deadline: started + endpoint.request_timeout(),
        };
        match endpoint.send(out) {
            Ok(()) => {}
            Err(Refused::Backoff(out)) => {
                message = out.message;
                tried.push(endpoint);
                retry = Some((RetryReason::NotSent, Err(unreachable(service, method))));
                continue;
            }
            Err(Refused::Stopping(_)) => {
                return Err(CallError::Upstream {
                    service: service.to_owned(),
                    method: method.to_owned(),
                    endpoint: endpoint.label().to_owned(),
                    cause: UpstreamFailure::Stopping,
                });
            }
            Err(Refused::Full(_)) => {
                return Err(CallError::Overloaded {
                    service: service.to_owned(),
                    method: method.to_owned(),
                    cause: "too many calls pending on the endpoint",
                });
            }
        }
        let Some(rx) = rx else {
            return Ok(None);
        };
        // This wait has a deadline without a timer of its own: the upstream connection's
        // clock, which no blocked read or write can stop, fails the call at its deadline
        // (`request_timeout_ms` from its arrival, within a tick); a call still queued there
        // comes back unsent when the connection cannot connect (connect timeout) or has been
        // stuck writing for a request timeout (`Close::Clogged`); when the drain grace is over
        // the connection fails it with `Stopping` (UpstreamSettings::abort).
        let answer = rx.await;
        let upstream = |cause| CallError::Upstream {
            service: service.to_owned(),
            method: method.to_owned(),
            endpoint: endpoint.label().to_owned(),
            cause,
        };
        match answer {
            Ok(Ok(reply)) => {
                let mark = mark_of(&endpoint, &reply);
                let verdict = if mark.is_some() {
                    Verdict::Failed
                } else {
                    Verdict::Answered
                };
                endpoint.record(verdict, probe);
                match (mark, copy) {
                    (Some(Mark::Refused), Some((request, _charge))) => {
                        message = request;
                        tried.push(endpoint);
                        retry = Some((RetryReason::Refused, Ok(Some(reply))));
                    }
                    _ => return Ok(Some(reply)),
                }
            }
            Ok(Err(Failure::NotSent {
                message: back,
                endpoint_failed,
            })) => {
                if endpoint_failed {
                    endpoint.record(Verdict::Failed, probe);
                }
                message = back;
                tried.push(endpoint);
                retry = Some((RetryReason::NotSent, Err(unreachable(service, method))));
            }
            Ok(Err(Failure::Failed(cause))) => {
                if let Some(verdict) = cause.verdict() {
                    endpoint.record(verdict, probe);
                }
                return Err(upstream(cause));
            }
            Err(_) => {
                endpoint.record(Verdict::Failed, probe);
                return Err(upstream(UpstreamFailure::ConnectionLost));
            }
        }
    }
}

/// Frames above this size are copied for a retry only when the connection's byte budget has
/// room, and the copy is charged to it.
const UNCHARGED_COPY: usize = 64 * 1024;

/// A copy of a request, to send again if an LB refuses it before dispatch, with the bytes it
/// holds of the connection's budget; `None` when a large copy would not fit.
fn copy_request(message: &Message, budget: &Arc<ConnBudget>) -> Option<(Message, Charge)> {
    let len = message.as_wire().len();
    if len <= UNCHARGED_COPY {
        return Some((message.clone(), Charge::none()));
    }
    if budget.is_full() {
        return None;
    }
    Some((message.clone(), budget.charge(len)))
}

/// The mark of an exception an LB raised itself; `None` for replies, unmarked exceptions,
/// and every exception of an endpoint that does not announce marks (a Go LB, a plain server).
fn mark_of(endpoint: &Endpoint, reply: &Message) -> Option<Mark> {
    if reply.message_type() != MessageType::Exception || !endpoint.marks() {
        return None;
    }
    rpc_frame::exception_mark(reply.body())
}

/// The error of a call whose time ran out between attempts, naming the last endpoint tried.
fn upstream_error(
    entry: &Service,
    method: &str,
    tried: &[Arc<Endpoint>],
    cause: UpstreamFailure,
) -> CallError {
    CallError::Upstream {
        service: entry.name.clone(),
        method: method.to_owned(),
        endpoint: tried
            .last()
            .map(|e| e.label().to_owned())
            .unwrap_or_default(),
        cause,
    }
}

fn unreachable(service: &str, method: &str) -> CallError {
    no_endpoint(service, method, ": every endpoint is unreachable")
}

fn no_endpoint(service: &str, method: &str, detail: &str) -> CallError {
    CallError::NoEndpoint {
        service: service.to_owned(),
        method: method.to_owned(),
        detail: detail.to_owned(),
    }
}
