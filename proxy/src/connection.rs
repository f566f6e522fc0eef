//! One client connection: reads pipelined frames, routes each call, and writes replies back
//! in request order. Sits between the listener (which accepts the socket) and the router and
//! upstream endpoints (which carry the call on).
//!
//! Every frame read becomes one entry of an ordered queue of reply futures; the loop writes
//! whatever is ready at the head, batching replies that are ready together. Pings, protocol
//! errors and refusals are entries that are ready at once, so they keep their place in line.
//! ONEWAY calls are entries that yield nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::stream::{FuturesOrdered, StreamExt};
use rpc_frame::{ExceptionCode, FrameError, Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::{CallError, UpstreamFailure};
use crate::metrics::{Outcome, UNKNOWN};
use crate::route::{Lookup, NoPick, Router, Service};
use crate::upstream::{Failure, Outgoing, Refused};

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
    /// Cancelled when the drain grace is over: calls still waiting get code 6 at once.
    pub abort: CancellationToken,
}

/// A reply slot: resolves to the bytes to write, or `None` (ONEWAY).
type ReplyFuture = Pin<Box<dyn Future<Output = Option<BytesMut>> + Send>>;

/// Endpoints tried per call: a call that was never written may go to another endpoint.
const MAX_ATTEMPTS: usize = 3;

/// Read buffer growth step.
const READ_CHUNK: usize = 4096;

/// Serves one client connection until it closes, breaks, idles out, or `shutdown` fires and
/// its calls are answered.
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
    let mut conn = Connection {
        reader,
        writer,
        router,
        settings,
        inflight: FuturesOrdered::new(),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        reading: true,
    };
    conn.run(shutdown).await;
}

struct Connection<R, W> {
    reader: R,
    writer: W,
    router: Arc<Router>,
    settings: Arc<ConnectionSettings>,
    inflight: FuturesOrdered<ReplyFuture>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// False once the client has closed its side or sent an unframeable byte stream.
    reading: bool,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(&mut self, shutdown: CancellationToken) {
        let mut stopping = false;
        loop {
            if !self.reading && self.inflight.is_empty() {
                break;
            }
            if stopping && self.inflight.is_empty() {
                break;
            }
            let can_read = self.reading && !stopping;
            let idle = self
                .settings
                .idle_timeout
                .filter(|_| self.inflight.is_empty());
            tokio::select! {
                biased;
                Some(first) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if !self.write_ready(first).await {
                        return;
                    }
                }
                read = self.reader.read_buf(&mut self.rbuf), if can_read => {
                    match read {
                        Ok(0) | Err(_) => self.reading = false,
                        Ok(_) => self.take_frames(),
                    }
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 64 * 1024 {
                        // Give back a buffer grown by a large frame.
                        self.rbuf = BytesMut::new();
                    }
                }
                _ = shutdown.cancelled(), if !stopping => stopping = true,
                _ = sleep_opt(idle), if can_read => {
                    tracing::debug!("idle client connection closed");
                    return;
                }
            }
            if self.reading && self.rbuf.capacity() - self.rbuf.len() < 64 {
                self.rbuf.reserve(READ_CHUNK);
            }
        }
        let _ = self.writer.shutdown().await;
    }

    /// Writes the head reply and every reply already ready behind it, in one write.
    async fn write_ready(&mut self, first: Option<BytesMut>) -> bool {
        let mut next = Some(first);
        while let Some(reply) = next {
            if let Some(bytes) = reply {
                if self.wbuf.is_empty() && bytes.len() > 64 * 1024 {
                    if self.writer.write_all(&bytes).await.is_err() {
                        return false;
                    }
                } else {
                    self.wbuf.extend_from_slice(&bytes);
                }
            }
            next = if self.inflight.is_empty() {
                None
            } else {
                self.inflight.next().now_or_never().flatten()
            };
        }
        if !self.wbuf.is_empty() {
            if self.writer.write_all(&self.wbuf).await.is_err() {
                return false;
            }
            self.wbuf.clear();
            if self.wbuf.capacity() > 256 * 1024 {
                self.wbuf = BytesMut::new();
            }
        }
        true
    }

    /// Turns every whole frame in the read buffer into a reply slot.
    fn take_frames(&mut self) {
        loop {
            match rpc_frame::decode_frame(&mut self.rbuf, self.settings.max_frame_size) {
                Ok(Some(frame)) => {
                    let slot = self.dispatch(frame);
                    self.inflight.push_back(slot);
                }
                Ok(None) => return,
                Err(e) => {
                    // The byte stream cannot be framed any more: answer once, then close.
                    self.count_protocol_error();
                    self.inflight.push_back(ready(frame_error_reply(&e)));
                    self.reading = false;
                    self.rbuf = BytesMut::new();
                    return;
                }
            }
        }
    }

    fn dispatch(&mut self, frame: BytesMut) -> ReplyFuture {
        let message = match Message::parse(frame) {
            Ok(m) => m,
            Err((frame, e)) => {
                let (name, seqid) = legacy_name_and_seqid(&frame).unwrap_or_default();
                let text = format!("malformed message header: {e}");
                tracing::debug!(error = %e, "bad client header");
                self.count_protocol_error();
                return ready(Some(rpc_frame::application_exception(
                    &name,
                    seqid,
                    ExceptionCode::ProtocolError,
                    &text,
                )));
            }
        };
        let seqid = message.seqid();
        match message.message_type() {
            MessageType::Call | MessageType::Oneway => {}
            MessageType::Heartbeat => return ready(Some(rpc_frame::ping_reply(seqid))),
            other => {
                let text = format!("message type {} is not a call", other.as_u8());
                self.count_protocol_error();
                return ready(Some(error_frame(
                    message.method(),
                    seqid,
                    &CallError::Protocol(text),
                )));
            }
        }
        let oneway = message.message_type() == MessageType::Oneway;
        if message.service_and_method().is_none() {
            let text = format!(
                "message name {:?} has no `service:` prefix (use TMultiplexedProtocol)",
                message.name()
            );
            self.count_protocol_error();
            return ready(reply_unless_oneway(oneway, || {
                error_frame(message.name(), seqid, &CallError::Protocol(text))
            }));
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
            return ready(reply_unless_oneway(oneway, || {
                error_frame(method, seqid, &error)
            }));
        }
        let started = Instant::now();
        Box::pin(call(
            self.router.clone(),
            message,
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

fn ready(reply: Option<BytesMut>) -> ReplyFuture {
    Box::pin(std::future::ready(reply))
}

fn reply_unless_oneway(oneway: bool, build: impl FnOnce() -> BytesMut) -> Option<BytesMut> {
    if oneway { None } else { Some(build()) }
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The `TApplicationException` frame for a failed call.
fn error_frame(method: &str, seqid: i32, error: &CallError) -> BytesMut {
    rpc_frame::application_exception(method, seqid, error.code(), &error.to_string())
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

/// Best effort for an old-style (non-strict) header `i32 name_len, name, i8 type, i32 seqid`,
/// so the error reply still carries the caller's name and seqid.
fn legacy_name_and_seqid(frame: &[u8]) -> Option<(String, i32)> {
    let payload = frame.get(rpc_frame::LENGTH_PREFIX..)?;
    let len = i32::from_be_bytes(payload.get(0..4)?.try_into().ok()?);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= rpc_frame::MAX_NAME_LEN)?;
    let name = std::str::from_utf8(payload.get(4..4 + len)?).ok()?;
    let seq = payload.get(5 + len..9 + len)?;
    Some((name.to_owned(), i32::from_be_bytes(seq.try_into().ok()?)))
}

/// Routes one call and waits for its reply. Returns the bytes for the client (a reply or a
/// `TApplicationException`), or `None` for ONEWAY. The call is counted and timed from
/// `started` (when its frame was read) to its answer.
async fn call(
    router: Arc<Router>,
    mut message: Message,
    settings: Arc<ConnectionSettings>,
    started: Instant,
) -> Option<BytesMut> {
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
            Some(error_frame(method, client_seqid, &error))
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
    match forward(&entry, method, message, oneway, client_seqid, &settings).await {
        Ok(Some(reply)) => {
            guard.finish(match reply.message_type() {
                MessageType::Exception => Outcome::Exception,
                _ => Outcome::Ok,
            });
            Some(reply.into_wire())
        }
        Ok(None) => {
            guard.finish(Outcome::Ok);
            None
        }
        Err(error) => {
            guard.finish(Outcome::of(&error));
            fail(error)
        }
    }
}

/// Sends a call (`service:` stripped) to an endpoint of `entry`, trying another endpoint when
/// it was never written; returns the reply (`None` for ONEWAY, once queued).
async fn forward(
    entry: &Service,
    method: &str,
    mut message: Message,
    oneway: bool,
    client_seqid: i32,
    settings: &ConnectionSettings,
) -> Result<Option<Message>, CallError> {
    let service = entry.name.as_str();
    let mut tried = Vec::new();
    for _ in 0..MAX_ATTEMPTS {
        let endpoint = match entry.pick(&tried) {
            Ok(e) => e,
            Err(NoPick::Empty) if tried.is_empty() => {
                return Err(no_endpoint(service, method, ""));
            }
            Err(_) => {
                return Err(no_endpoint(
                    service,
                    method,
                    ": every endpoint is unreachable",
                ));
            }
        };
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
        };
        match endpoint.send(out) {
            Ok(()) => {}
            Err(Refused::Backoff(out)) => {
                message = out.message;
                tried.push(endpoint);
                continue;
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
        let upstream = |cause| CallError::Upstream {
            service: service.to_owned(),
            method: method.to_owned(),
            endpoint: endpoint.label().to_owned(),
            cause,
        };
        let answer = tokio::select! {
            biased;
            answer = rx => answer,
            _ = settings.abort.cancelled() => return Err(upstream(UpstreamFailure::Stopping)),
        };
        match answer {
            Ok(Ok(reply)) => return Ok(Some(reply)),
            Ok(Err(Failure::NotSent(back))) => {
                message = back;
                tried.push(endpoint);
            }
            Ok(Err(Failure::Failed(cause))) => return Err(upstream(cause)),
            Err(_) => return Err(upstream(UpstreamFailure::ConnectionLost)),
        }
    }
    Err(no_endpoint(
        service,
        method,
        ": every endpoint is unreachable",
    ))
}

fn no_endpoint(service: &str, method: &str, detail: &str) -> CallError {
    CallError::NoEndpoint {
        service: service.to_owned(),
        method: method.to_owned(),
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_header_fields_are_recovered() {
        let mut frame = vec![0, 0, 0, 0];
        frame.extend_from_slice(&5i32.to_be_bytes());
        frame.extend_from_slice(b"a:bcd");
        frame.push(1);
        frame.extend_from_slice(&42i32.to_be_bytes());
        assert_eq!(
            legacy_name_and_seqid(&frame),
            Some(("a:bcd".to_owned(), 42))
        );
        assert_eq!(legacy_name_and_seqid(&frame[..10]), None);
    }
}
