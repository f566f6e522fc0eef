//! The LB's front side: proxies (or any framed Thrift client) connect here. Each call is
//! handed to the dispatcher and its reply written back when the worker answers, in
//! completion order (proxies match replies by seqid). Pings are echoed at once. Sits between
//! the proxies' sockets and the [`Dispatcher`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rpc_frame::{ExceptionCode, Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Backlog, Call, Dispatcher, FrontTx, Reject, ReplyTo};
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
    /// Where calls are counted.
    pub metrics: Arc<LbMetrics>,
}

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

/// Answers a call the dispatcher refused, and counts it.
pub fn reject(call: Call, reject: Reject, service: &str, metrics: &LbMetrics) {
    metrics.rejected(reject);
    let text = reject_text(service, call.message.name(), reject);
    call.fail(service, Outcome::from(reject), &text);
}

/// Serves one proxy connection until it closes or `close` fires (after the drain).
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
    let (tx, rx, backlog) = FrontTx::channel();
    let writing = tokio::spawn(write_loop(writer, rx, backlog.clone()));
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        // A peer that does not read its replies is not read either.
        let read = tokio::select! {
            read = async {
                backlog.wait_room().await;
                reader.read_buf(&mut buf).await
            } => read,
            _ = close.cancelled() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !take_frames(&mut buf, &tx, &dispatcher, &settings, &activity) {
            break;
        }
    }
    drop(tx);
    // Replies still owed hold senders (in the dispatcher and worker connections); the writer
    // ends once they are delivered or failed.
    let _ = writing.await;
    activity.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Handles every whole frame in `buf`; false when the stream cannot be framed any more.
fn take_frames(
    buf: &mut BytesMut,
    tx: &FrontTx,
    dispatcher: &Dispatcher,
    settings: &FrontSettings,
    activity: &Activity,
) -> bool {
    loop {
        let frame = match rpc_frame::decode_frame(buf, settings.max_frame_size) {
            Ok(Some(frame)) => frame,
            Ok(None) => return true,
            Err(e) => {
                settings.metrics.calls.record(UNKNOWN, Outcome::Protocol);
                let text = format!("bad frame: {e}");
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
            Err((_, e)) => {
                settings.metrics.calls.record(UNKNOWN, Outcome::Protocol);
                let text = format!("malformed message header: {e}");
                tx.send(rpc_frame::application_exception(
                    "",
                    0,
                    ExceptionCode::ProtocolError,
                    &text,
                ));
                continue;
            }
        };
        let seqid = message.seqid();
        match message.message_type() {
            MessageType::Heartbeat => {
                tx.send(message.into_wire());
                continue;
            }
            MessageType::Call | MessageType::Oneway => {}
            other => {
                settings.metrics.calls.record(UNKNOWN, Outcome::Protocol);
                let text = format!("message type {} is not a call", other.as_u8());
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
        let reply = (message.message_type() == MessageType::Call).then(|| ReplyTo {
            tx: tx.clone(),
            seqid,
        });
        let now = Instant::now();
        let call = Call {
            meter: settings.metrics.calls.start_at(message.name(), now),
            message,
            reply,
            deadline: now + settings.request_timeout,
        };
        if let Err((call, refused)) = dispatcher.submit(call) {
            reject(call, refused, &settings.service, &settings.metrics);
        }
    }
}

async fn write_loop<W>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<BytesMut>,
    backlog: Arc<Backlog>,
) where
    W: AsyncWrite + Unpin,
{
    let mut batch = Vec::with_capacity(64);
    let mut buf = BytesMut::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        for frame in batch.drain(..) {
            if buf.is_empty() && frame.len() > 64 * 1024 {
                if writer.write_all(&frame).await.is_err() {
                    return;
                }
                backlog.written(frame.len());
            } else {
                buf.extend_from_slice(&frame);
            }
        }
        if !buf.is_empty() {
            if writer.write_all(&buf).await.is_err() {
                return;
            }
            backlog.written(buf.len());
            buf.clear();
        }
    }
    let _ = writer.shutdown().await;
}
