//! The LB's front side: proxies (or any framed Thrift client) connect here. Each call is
//! handed to the dispatcher and its reply written back when the worker answers, in
//! completion order (proxies match replies by seqid). Pings are echoed at once. Sits between
//! the proxies' sockets and the [`Dispatcher`].
//!
//! # Deadlines
//! - A frame once started (any byte of its length or body read) must be complete within
//!   [`FrontSettings::frame_timeout`] ([`FRAME_TIMEOUT`], 30 s): a peer dripping bytes is
//!   closed, while a large frame arriving steadily is fine. Time the LB itself spends not
//!   reading (the peer does not read its replies) does not count.
//! - A connection with no call in flight and no frame read or reply written for
//!   [`FrontSettings::idle_timeout`] (`front_idle_timeout_ms`) is closed. Pings count as
//!   frames, so a proxy, which pings idle connections every second, is never cut.
//!
//! Closing stops the reading only: replies still owed are written first.
//!
//! # Bounds (CONTRACT section 9)
//! - Requests read and replies queued are charged to the connection's byte budget
//!   ([`rpc_mux::ConnBudget`]); at its bound or the process's, the peer is not read (that time
//!   is not held against its deadlines) and a reply that would go past it becomes a code-6
//!   error.
//! - A peer that accepts no byte of a pending reply for `write_timeout_ms` is closed, and so
//!   is the whole connection whenever its writer fails, whatever is still queued.
//! - A request over `max_frame_size` is answered with code 7 and skipped without buffering
//!   it; the calls pipelined before and behind it are served.
//!
//! # Errors the front answers itself
//! - A call the dispatcher refuses ([`Reject`]: no worker, queue full, the LB stopping) gets
//!   code 6 marked [`Mark::Refused`] (field 3 = 1, CONTRACT section 9): no handler saw it.
//! - Protocol errors (a bad frame, a bad header, a message that is not a call, a request
//!   over `max_frame_size`) get code 7, unmarked.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use rpc_frame::{ExceptionCode, Mark, Message, MessageType};
use rpc_mux::{Charge, ConnBudget, Decoded, FrameDecoder, Oversized, ProcessBudget};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Call, Dispatcher, FrontTx, Reject, ReplyTo};
use crate::metrics::{LbMetrics, Outcome, UNKNOWN};

/// Tunables of front connections.
#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// The service served.
    pub service: String,
    /// Largest frame accepted.
    pub max_frame_size: usize,
    /// The LB's request timeout (a little less than the proxy's).
    pub request_timeout: Duration,
    /// A frame once started must be complete within this (module docs).
    pub frame_timeout: Duration,
    /// Close a connection with no call in flight and no frame either way this long; `None`:
    /// never.
    pub idle_timeout: Option<Duration>,
    /// Close a peer that accepts no byte of a pending reply this long.
    pub write_timeout: Duration,
    /// Bytes of requests and replies buffered for one connection before it is not read.
    pub max_buffer_bytes: usize,
    /// The process's byte budget, shared by every front connection.
    pub process_budget: Arc<ProcessBudget>,
    /// Where calls are counted.
    pub metrics: Arc<LbMetrics>,
}

impl FrontSettings {
    /// The largest request read: `max_frame_size`, or the connection's byte budget when that
    /// is smaller (a frame the connection may not buffer is refused like an oversized one).
    pub fn frame_limit(&self) -> usize {
        self.max_frame_size.min(self.max_buffer_bytes)
    }
}

/// The default of [`FrontSettings::frame_timeout`]: twice the default request timeout, and
/// enough for a 16 MB frame at 0.5 MB/s. The proxy bounds its clients' frames alike.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Front activity, read by the graceful stop to see when proxies have gone quiet.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_call_ms: AtomicU64,
    connections: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            last_call_ms: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        }
    }
}

impl Activity {
    /// Time since the last call arrived from any proxy.
    pub fn quiet_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_call_ms.load(Ordering::Relaxed)))
    }

    /// Open front connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    fn note_call(&self) {
        self.last_call_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// The CONTRACT text for a call the dispatcher would not take.
pub fn reject_text(service: &str, method: &str, reject: Reject) -> String {
    match reject {
        Reject::NoWorker => format!("Worker FOR {service}.{method} Not Found"),
        Reject::QueueFull => {
            format!(
                "Service: {service}, Method: {method}, Error: every worker is busy and the queue is full"
            )
        }
        Reject::Stopping => format!("Worker FOR {service}.{method} Not Found: the LB is stopping"),
    }
}

/// Answers a call the dispatcher refused with code 6 marked [`Mark::Refused`] (no worker got
/// it), and counts it.
pub fn reject(call: Call, reject: Reject, service: &str, metrics: &LbMetrics) {
    metrics.rejected(reject);
    let text = reject_text(service, call.message.name(), reject);
    call.fail(service, Outcome::from(reject), &text, Mark::Refused);
}

/// What the reader and the writer of one front connection share, for the idle timeout.
#[derive(Debug)]
struct Flow {
    epoch: tokio::time::Instant,
    /// Frames owed to the peer: replies to calls in flight, echoes and errors, counted from
    /// the frame that asks for them until they are written.
    owed: AtomicUsize,
    /// When the writer last wrote, in ms since `epoch`.
    last_write_ms: AtomicU64,
}

impl Flow {
    fn new() -> Self {
        Flow {
            epoch: tokio::time::Instant::now(),
            owed: AtomicUsize::new(0),
            last_write_ms: AtomicU64::new(0),
        }
    }

    /// One more frame will be queued for the peer.
    fn owe(&self) {
        self.owed.fetch_add(1, Ordering::AcqRel);
    }

    /// The writer wrote `frames` frames.
    fn wrote(&self, frames: usize) {
        self.last_write_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.owed.fetch_sub(frames, Ordering::AcqRel);
    }

    fn last_write(&self) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed))
    }
}

/// Why the reading side of a front connection stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// EOF, an error, a bad frame, or the LB closed it.
    Done,
    /// A frame was started and not finished within the frame timeout.
    FrameTimeout,
    /// Nothing in flight and no frame either way for the idle timeout.
    Idle,
}

/// The read side's clocks: when the incomplete frame in the buffer started, and the last
/// read.
struct Clocks {
    frame_started: Option<tokio::time::Instant>,
    last_read: tokio::time::Instant,
}

impl Clocks {
    /// The earliest deadline to check, if any; `now` serves when calls are in flight (the
    /// idle clock is looked at again an idle timeout later).
    fn next(
        &self,
        settings: &FrontSettings,
        flow: &Flow,
        now: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        let frame = self.frame_started.map(|at| at + settings.frame_timeout);
        let idle = settings.idle_timeout.map(|idle| {
            if flow.owed.load(Ordering::Acquire) > 0 {
                now + idle
            } else {
                self.last_read.max(flow.last_write()) + idle
            }
        });
        match (frame, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Which deadline has passed at `now`, if any.
    fn expired(
        &self,
        settings: &FrontSettings,
        flow: &Flow,
        now: tokio::time::Instant,
    ) -> Option<Stop> {
        if self
            .frame_started
            .is_some_and(|at| now >= at + settings.frame_timeout)
        {
            return Some(Stop::FrameTimeout);
        }
        let idle = settings.idle_timeout?;
        let quiet_since = self.last_read.max(flow.last_write());
        (flow.owed.load(Ordering::Acquire) == 0 && now >= quiet_since + idle).then_some(Stop::Idle)
    }
}

/// Serves one proxy connection until it closes, breaks a deadline (module docs) or `close`
/// fires (after the drain).
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    dispatcher: Arc<Dispatcher>,
    settings: Arc<FrontSettings>,
    activity: Arc<Activity>,
    close: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    activity.connections.fetch_add(1, Ordering::Relaxed);
    let budget = ConnBudget::new(&settings.process_budget, settings.max_buffer_bytes);
    let (tx, rx) = FrontTx::channel(budget.clone());
    let flow = Arc::new(Flow::new());
    // Cancelled when the writer ends (the peer is gone or stopped reading): the connection is
    // torn down then, whatever is queued.
    let writer_gone = CancellationToken::new();
    let writing = tokio::spawn(write_loop(
        writer,
        rx,
        flow.clone(),
        settings.write_timeout,
        writer_gone.clone(),
    ));
    let mut buf = BytesMut::new();
    let mut decoder = FrameDecoder::new(settings.frame_limit());
    // The bytes of an incomplete frame in `buf`, against the budget.
    let mut partial = Charge::none();
    let mut clocks = Clocks {
        frame_started: None,
        last_read: tokio::time::Instant::now(),
    };
    // One timer, moved only when it fires or an earlier deadline appears.
    let start = clocks.last_read;
    let mut armed = clocks.next(&settings, &flow, start);
    let mut timer = pin!(tokio::time::sleep_until(armed.unwrap_or(start)));
    let stop = loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        // A peer that does not read its replies is not read either (its byte budget is
        // full), nor is anyone while the process budget is full. The frame deadline still
        // runs meanwhile, so partial frames cannot hold the budget; the idle clock restarts.
        if budget.is_full() {
            let frame_deadline = clocks.frame_started.map(|at| at + settings.frame_timeout);
            tokio::select! {
                () = budget.wait_room() => {}
                _ = close.cancelled() => break Stop::Done,
                _ = writer_gone.cancelled() => break Stop::Done,
                () = sleep_until_some(frame_deadline), if frame_deadline.is_some() => {
                    break Stop::FrameTimeout;
                }
            }
            clocks.last_read = tokio::time::Instant::now();
        }
        let read = tokio::select! {
            read = reader.read_buf(&mut buf) => read,
            _ = close.cancelled() => break Stop::Done,
            _ = writer_gone.cancelled() => break Stop::Done,
            () = &mut timer, if armed.is_some() => {
                let now = tokio::time::Instant::now();
                if let Some(stop) = clocks.expired(&settings, &flow, now) {
                    break stop;
                }
                armed = clocks.next(&settings, &flow, now);
                if let Some(at) = armed {
                    timer.as_mut().reset(at);
                }
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => break Stop::Done,
            Ok(_) => {}
        }
        let now = tokio::time::Instant::now();
        clocks.last_read = now;
        let before = buf.len();
        let frames = Frames {
            tx: &tx,
            budget: &budget,
            dispatcher: &dispatcher,
            settings: &settings,
            activity: &activity,
            flow: &flow,
        };
        if !frames.take(&mut decoder, &mut buf) {
            break Stop::Done;
        }
        if decoder.awaiting_head(&buf) {
            // An oversized frame's header is not all in: after one more look at what the
            // socket already holds, answer it without its seqid rather than wait on a peer
            // that may have sent no more (a peer writes a frame at once, so its header comes
            // with its length).
            buf.reserve(1024);
            let eof = matches!(
                reader.read_buf(&mut buf).now_or_never(),
                Some(Ok(0) | Err(_))
            );
            if !frames.take(&mut decoder, &mut buf) {
                break Stop::Done;
            }
            if let Some(Decoded::Oversized(over)) = decoder.give_up_head(&mut buf) {
                frames.oversized(&over);
                if !frames.take(&mut decoder, &mut buf) {
                    break Stop::Done;
                }
            }
            if eof {
                break Stop::Done;
            }
        }
        // The incomplete frame left is charged (the frame deadline bounds how long).
        let pending = buf.len();
        if partial.bytes() != pending {
            partial = Charge::none();
            if pending > 0 {
                partial = budget.charge(pending);
            }
        }
        if !decoder.in_frame(&buf) {
            clocks.frame_started = None;
        } else if clocks.frame_started.is_none() || buf.len() < before {
            // What is left began in this read (a whole frame was taken, or none was pending).
            clocks.frame_started = Some(now);
            let deadline = now + settings.frame_timeout;
            if armed.is_none_or(|at| deadline < at) {
                armed = Some(deadline);
                timer.as_mut().reset(deadline);
            }
        }
        if armed.is_none() {
            armed = clocks.next(&settings, &flow, now);
            if let Some(at) = armed {
                timer.as_mut().reset(at);
            }
        }
    };
    match stop {
        Stop::Done => {}
        Stop::FrameTimeout => tracing::info!(
            service = settings.service,
            bytes = buf.len(),
            timeout_ms = settings.frame_timeout.as_millis() as u64,
            "front connection closed: a frame was not completed within the frame timeout"
        ),
        Stop::Idle => tracing::debug!(
            service = settings.service,
            "idle front connection closed (nothing in flight, no frame)"
        ),
    }
    drop(tx);
    // Replies still owed hold senders (in the dispatcher and worker connections); the writer
    // ends once they are delivered or failed.
    let _ = writing.await;
    activity.connections.fetch_sub(1, Ordering::Relaxed);
}

/// What handling the frames of one front connection needs.
struct Frames<'a> {
    tx: &'a FrontTx,
    budget: &'a Arc<ConnBudget>,
    dispatcher: &'a Dispatcher,
    settings: &'a FrontSettings,
    activity: &'a Activity,
    flow: &'a Flow,
}

impl Frames<'_> {
    /// Answers a request over `max_frame_size` with code 7 (its own seqid when its header
    /// came with it); the rest of it is skipped as it arrives.
    fn oversized(&self, over: &Oversized) {
        self.settings
            .metrics
            .calls
            .record(UNKNOWN, Outcome::Protocol);
        let text = format!(
            "frame of {} bytes is over max_frame_size ({})",
            over.len,
            self.settings.frame_limit()
        );
        tracing::debug!(len = over.len, "oversized front frame skipped");
        let (method, seqid) = match &over.head {
            Some(head) if head.message_type == MessageType::Oneway => return,
            Some(head) => (head.method(), head.seqid),
            None => ("", 0),
        };
        self.flow.owe();
        self.tx.send(rpc_frame::application_exception(
            method,
            seqid,
            ExceptionCode::ProtocolError,
            &text,
        ));
    }

    /// Handles every whole frame in `buf`; false when the stream cannot be framed any more.
    fn take(&self, decoder: &mut FrameDecoder, buf: &mut BytesMut) -> bool {
        let Frames {
            tx,
            budget,
            dispatcher,
            settings,
            activity,
            flow,
        } = *self;
        loop {
            let frame = match decoder.decode(buf) {
                Ok(Some(Decoded::Frame(frame))) => frame,
                Ok(Some(Decoded::Oversized(over))) => {
                    self.oversized(&over);
                    continue;
                }
                Ok(None) => return true,
                Err(e) => {
                    settings.metrics.calls.record(UNKNOWN, Outcome::Protocol);
                    let text = format!("bad frame: {e}");
                    flow.owe();
                    tx.send(rpc_frame::application_exception(
                        "",
                        0,
                        ExceptionCode::ProtocolError,
                        &text,
                    ));
                    return false;
                }
            };
            let mut message = match Message::parse(frame) {
                Ok(m) => m,
                Err((frame, e)) => {
                    settings.metrics.calls.record(UNKNOWN, Outcome::Protocol);
                    // The caller's seqid where it can still be read, as the proxy does.
                    let (name, seqid) =
                        rpc_frame::salvage_name_and_seqid(&frame, &e).unwrap_or_default();
                    let text = format!("malformed message header: {e}");
                    flow.owe();
                    tx.send(rpc_frame::application_exception(
                        &name,
                        seqid,
                        ExceptionCode::ProtocolError,
                        &text,
                    ));
                    continue;
                }
            };
            let seqid = message.seqid();
            match message.message_type() {
                MessageType::Heartbeat => {
                    flow.owe();
                    tx.send(message.into_wire());
                    continue;
                }
                MessageType::Call | MessageType::Oneway => {}
                other => {
                    settings.metrics.calls.record(UNKNOWN, Outcome::Protocol);
                    let text = format!("message type {} is not a call", other.as_u8());
                    flow.owe();
                    tx.send(rpc_frame::application_exception(
                        message.method(),
                        seqid,
                        ExceptionCode::ProtocolError,
                        &text,
                    ));
                    continue;
                }
            }
            activity.note_call();
            message.strip_service();
            let reply = (message.message_type() == MessageType::Call).then(|| {
                // Exactly one frame answers a call: its reply or an error.
                flow.owe();
                ReplyTo::new(tx.clone(), seqid)
            });
            let now = Instant::now();
            let call = Call {
                meter: settings.metrics.calls.start_at(message.name(), now),
                request: budget.charge(message.as_wire().len()),
                message,
                reply,
                deadline: now + settings.request_timeout,
            };
            if let Err((call, refused)) = dispatcher.submit(call) {
                reject(call, refused, &settings.service, &settings.metrics);
            }
        }
    }
}

async fn write_loop<W>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<(BytesMut, Charge)>,
    flow: Arc<Flow>,
    timeout: Duration,
    gone: CancellationToken,
) where
    W: AsyncWrite + Unpin,
{
    let _gone = gone.drop_guard();
    let mut batch = Vec::with_capacity(64);
    let mut buf = BytesMut::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let frames = batch.len();
        let mut held = Vec::with_capacity(frames);
        for (frame, charge) in batch.drain(..) {
            if buf.is_empty() && frame.len() > 64 * 1024 {
                if let Err(e) = rpc_mux::write_all(&mut writer, &frame, timeout).await {
                    return log_write_error(&e);
                }
            } else {
                buf.extend_from_slice(&frame);
                held.push(charge);
            }
        }
        if !buf.is_empty() {
            if let Err(e) = rpc_mux::write_all(&mut writer, &buf, timeout).await {
                return log_write_error(&e);
            }
            buf.clear();
            if buf.capacity() > 256 * 1024 {
                buf = BytesMut::new();
            }
        }
        drop(held);
        flow.wrote(frames);
    }
    let _ = writer.shutdown().await;
}

/// Sleeps until `deadline`; never without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn log_write_error(error: &rpc_mux::WriteError) {
    if error.is_stall() {
        tracing::info!(%error, "front connection closed: the peer stopped reading its replies");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::testing::{answer, assert_error, call_from, front};

    #[test]
    fn every_refusal_is_marked_refused() {
        let metrics = LbMetrics::new("svc");
        let (tx, mut rx) = front(1 << 20);
        // Each refusal as the dispatcher makes it (no queue at all).
        let dispatcher = Dispatcher::new(0);
        let no_worker = dispatcher.submit(call_from(&tx, "m", 1)).unwrap_err();
        let (worker_tx, _worker_rx) = mpsc::unbounded_channel();
        dispatcher.add_worker(worker_tx, 1, None);
        dispatcher.submit(call_from(&tx, "m", 2)).unwrap();
        let queue_full = dispatcher.submit(call_from(&tx, "m", 3)).unwrap_err();
        let _ = dispatcher.stop_all();
        let stopping = dispatcher.submit(call_from(&tx, "m", 4)).unwrap_err();
        for (seqid, (call, refused), text) in [
            (1, no_worker, "Worker FOR svc.m Not Found"),
            (
                3,
                queue_full,
                "Service: svc, Method: m, Error: every worker is busy and the queue is full",
            ),
            (
                4,
                stopping,
                "Worker FOR svc.m Not Found: the LB is stopping",
            ),
        ] {
            reject(call, refused, "svc", &metrics);
            assert_error(&answer(&mut rx), seqid, text, Some(Mark::Refused));
        }
    }

    #[test]
    fn protocol_errors_are_code_7_unmarked_beside_a_marked_refusal() {
        let settings = FrontSettings {
            service: "svc".into(),
            max_frame_size: 1024,
            request_timeout: Duration::from_secs(5),
            frame_timeout: FRAME_TIMEOUT,
            idle_timeout: None,
            write_timeout: Duration::from_secs(5),
            max_buffer_bytes: 1 << 20,
            process_budget: ProcessBudget::new(1 << 30),
            metrics: Arc::new(LbMetrics::new("svc")),
        };
        let budget = ConnBudget::new(&settings.process_budget, settings.max_buffer_bytes);
        let (tx, mut rx) = FrontTx::channel(budget.clone());
        let dispatcher = Dispatcher::new(10);
        let frames = Frames {
            tx: &tx,
            budget: &budget,
            dispatcher: &dispatcher,
            settings: &settings,
            activity: &Activity::default(),
            flow: &Flow::new(),
        };
        let mut buf = BytesMut::new();
        // Not a call; a frame over max_frame_size; a call no worker can take; a bad version.
        buf.extend_from_slice(&rpc_frame::encode_message(
            MessageType::Reply,
            "svc:m",
            1,
            &[0],
        ));
        buf.extend_from_slice(&rpc_frame::encode_message(
            MessageType::Call,
            "svc:m",
            2,
            &[0; 2000],
        ));
        buf.extend_from_slice(&rpc_frame::encode_message(
            MessageType::Call,
            "svc:m",
            3,
            &[0],
        ));
        let mut bad_version = rpc_frame::encode_message(MessageType::Call, "svc:m", 4, &[0]);
        bad_version[4..8].copy_from_slice(&0x8002_0001u32.to_be_bytes());
        buf.extend_from_slice(&bad_version);
        let mut decoder = FrameDecoder::new(settings.frame_limit());
        assert!(frames.take(&mut decoder, &mut buf));
        let mut answers = Vec::new();
        while let Ok((mut wire, _)) = rx.try_recv() {
            let frame = rpc_frame::decode_frame(&mut wire, 1 << 20)
                .unwrap()
                .unwrap();
            answers.push(Message::parse(frame).unwrap());
        }
        let seen: Vec<_> = answers
            .iter()
            .map(|m| {
                let (code, _) = rpc_frame::parse_application_exception(m.body()).unwrap();
                (m.seqid(), code, rpc_frame::exception_mark(m.body()))
            })
            .collect();
        assert_eq!(
            seen,
            [
                (1, ExceptionCode::ProtocolError as i32, None),
                (2, ExceptionCode::ProtocolError as i32, None),
                (3, ExceptionCode::InternalError as i32, Some(Mark::Refused)),
                (4, ExceptionCode::ProtocolError as i32, None),
            ]
        );
    }
}
