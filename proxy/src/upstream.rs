//! One endpoint (an LB or a plain Thrift server) as the proxy sees it: a few multiplexed
//! connections opened on first use, seqids rewritten per connection and restored on the
//! reply, heartbeats on quiet connections, request timeouts, reconnect backoff, drain on
//! removal and close when idle. Sits between the router (which picks an [`Endpoint`]) and
//! the endpoint's socket.
//!
//! Each connection is one task running a writer and a reader side by side. A call is an
//! [`Outgoing`]; its answer comes back on a oneshot channel as [`Reply`]. A call that was
//! never written (connect failed, connection gone before the write) comes back as
//! [`Failure::NotSent`] with its message, so the caller can safely try another endpoint.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rand::Rng;
use rpc_config::Address;
use rpc_frame::{InFlight, Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::UpstreamFailure;

/// Tunables of every upstream connection, from the proxy configuration.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// A call unanswered this long fails with [`UpstreamFailure::Timeout`].
    pub request_timeout: Duration,
    /// Longest wait for a new connection.
    pub connect_timeout: Duration,
    /// A connection that has received nothing for this long is pinged.
    pub heartbeat_interval: Duration,
    /// A connection that has received nothing for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// A connection with no call for this long is closed.
    pub idle_timeout: Duration,
    /// Calls queued or in flight on one endpoint beyond this are refused.
    pub max_pending: usize,
    /// Multiplexed connections per endpoint.
    pub connections: usize,
    /// Largest reply frame accepted.
    pub max_frame_size: usize,
    /// Fired when the proxy's drain grace is over: every connection fails the calls it holds
    /// with [`UpstreamFailure::Stopping`] and closes, and new calls are refused.
    pub abort: Arc<Abort>,
}

/// The end of the proxy's drain grace, as the upstream side sees it. Connections wait on
/// the token (once per connection, not per call); [`Endpoint::send`] reads the flag (an
/// atomic, where `CancellationToken::is_cancelled` takes a lock).
#[derive(Debug, Default)]
pub struct Abort {
    token: CancellationToken,
    fired: AtomicBool,
}

impl Abort {
    /// Gives up on every call still waiting for an endpoint.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Whether [`Abort::fire`] was called.
    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }

    /// Resolves once [`Abort::fire`] is called.
    pub async fn fired(&self) {
        self.token.cancelled().await;
    }
}

impl Default for UpstreamSettings {
    /// The CONTRACT defaults (section 4) and the proxy's own.
    fn default() -> Self {
        UpstreamSettings {
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(6),
            idle_timeout: Duration::from_secs(300),
            max_pending: 8192,
            connections: 1,
            max_frame_size: rpc_frame::DEFAULT_MAX_FRAME_SIZE,
            abort: Arc::default(),
        }
    }
}

/// What a caller gets back for a call.
pub type Reply = Result<Message, Failure>;

/// A call that got no reply.
#[derive(Debug)]
pub enum Failure {
    /// Never written to the endpoint: safe to send elsewhere.
    NotSent(Message),
    /// Written (or possibly written) and failed.
    Failed(UpstreamFailure),
}

/// A call on its way to an endpoint.
#[derive(Debug)]
pub struct Outgoing {
    /// The call, `service:` already stripped; its seqid is rewritten when written.
    pub message: Message,
    /// Where the reply goes; `None` for ONEWAY.
    pub reply: Option<oneshot::Sender<Reply>>,
    /// The caller's seqid, restored on the reply.
    pub client_seqid: i32,
}

/// Why [`Endpoint::send`] refused a call at once (the call is handed back).
#[derive(Debug)]
pub enum Refused {
    /// In reconnect backoff: try another endpoint.
    Backoff(Outgoing),
    /// `max_pending` calls already on this endpoint.
    Full(Outgoing),
    /// The proxy's drain grace is over ([`UpstreamSettings::abort`]).
    Stopping(Outgoing),
}

// === impl Endpoint ===

/// One endpoint of one service.
#[derive(Debug)]
pub struct Endpoint {
    address: Address,
    label: String,
    settings: Arc<UpstreamSettings>,
    /// Calls queued or in flight (balancing and the `max_pending` bound).
    outstanding: AtomicUsize,
    /// Removed from ZooKeeper: no new calls are routed here; connections close once empty.
    draining: AtomicBool,
    slots: Mutex<Vec<Option<Arc<Conn>>>>,
    next_slot: AtomicUsize,
    /// When the endpoint was created: the origin of `backoff_until_ms`.
    created: Instant,
    /// End of the reconnect backoff in ms after `created`; 0 = not in backoff. Read on every
    /// call (an atomic, not a lock); written only when a connection fails or succeeds.
    backoff_until_ms: AtomicU64,
    /// Connection failures in a row (sets the next backoff).
    failures: AtomicU32,
}

impl Endpoint {
    /// A new endpoint; nothing is connected until the first call.
    pub fn new(address: Address, settings: Arc<UpstreamSettings>) -> Arc<Self> {
        let slots = (0..settings.connections.max(1)).map(|_| None).collect();
        Arc::new(Endpoint {
            label: address.to_string(),
            address,
            settings,
            outstanding: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            slots: Mutex::new(slots),
            next_slot: AtomicUsize::new(0),
            created: Instant::now(),
            backoff_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        })
    }

    /// The endpoint's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The address as text, for logs and errors.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Calls queued or in flight now.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Whether a call routed here now would be refused for backoff.
    pub fn in_backoff(&self) -> bool {
        match self.backoff_until_ms.load(Ordering::Relaxed) {
            0 => false,
            until => self.elapsed_ms() < until,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the endpoint has been removed and is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops new calls (the router no longer offers this endpoint); open connections close
    /// once their calls are answered.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// What the endpoint is doing, for status output: `backoff` (reconnect backoff: new calls
    /// go elsewhere), `connected` (a connection is open or being opened), or `idle` (none
    /// open; the next call opens one).
    pub fn state(&self) -> &'static str {
        if self.in_backoff() {
            "backoff"
        } else if self.is_connected() {
            "connected"
        } else {
            "idle"
        }
    }

    /// Whether any connection is open or being opened.
    pub fn is_connected(&self) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .flatten()
            .any(|c| !c.closed.load(Ordering::Relaxed))
    }

    /// Queues a call on one of the endpoint's connections, opening it if needed. The answer
    /// arrives on `out.reply`.
    ///
    /// # Errors
    /// [`Refused`] (with the call) when in backoff or full.
    pub fn send(self: &Arc<Self>, out: Outgoing) -> Result<(), Refused> {
        if self.settings.abort.is_fired() {
            return Err(Refused::Stopping(out));
        }
        if self.in_backoff() {
            return Err(Refused::Backoff(out));
        }
        if self.outstanding.fetch_add(1, Ordering::Relaxed) >= self.settings.max_pending {
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Full(out));
        }
        let slot =
            self.next_slot.fetch_add(1, Ordering::Relaxed) % self.settings.connections.max(1);
        let mut out = out;
        // Two tries: the connection found may close between the lookup and the send.
        for _ in 0..2 {
            let conn = self.connection(slot);
            match conn.tx.send(out) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => out = back,
            }
        }
        self.finish_one();
        Err(Refused::Backoff(out))
    }

    fn connection(self: &Arc<Self>, slot: usize) -> Arc<Conn> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conn) = &slots[slot]
            && !conn.closed.load(Ordering::Relaxed)
        {
            return conn.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            tx,
            closed: AtomicBool::new(false),
        });
        slots[slot] = Some(conn.clone());
        tokio::spawn(run_connection(self.clone(), conn.clone(), slot, rx));
        conn
    }

    fn finish_one(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    fn release_slot(&self, slot: usize, conn: &Arc<Conn>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots[slot].as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            slots[slot] = None;
        }
    }

    fn note_connected(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.backoff_until_ms.store(0, Ordering::Relaxed);
    }

    /// Starts (or extends) reconnect backoff: 100 ms doubling to 5 s, jittered +-50 %.
    fn note_failure(&self) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed);
        let base = Duration::from_millis(100).saturating_mul(1 << failures.min(6));
        let base = base.min(Duration::from_secs(5));
        let jitter = rand::rng().random_range(0.5..1.5);
        let delay = u64::try_from(base.mul_f64(jitter).as_millis()).unwrap_or(u64::MAX);
        // At least 1: 0 means "not in backoff".
        let until = self.elapsed_ms().saturating_add(delay).max(1);
        self.backoff_until_ms.store(until, Ordering::Relaxed);
    }
}

// === impl Conn ===

/// The shared half of one upstream connection: where calls are queued.
#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Set once the connection task stops taking calls.
    closed: AtomicBool,
}

/// A call written and waiting for its reply.
struct Pending {
    reply: oneshot::Sender<Reply>,
    client_seqid: i32,
    method_hash: u64,
}

/// Why a connection task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Failed(UpstreamFailure),
    /// The proxy's drain grace ran out.
    Aborted,
    Idle,
    Drained,
    Dropped,
}

/// Connection-local state shared by the writer and the reader (one task, so the mutex is
/// never contended; it only makes the two futures `Send`).
struct Shared {
    pending: Mutex<InFlight<Pending>>,
    epoch: Instant,
    last_rx_ms: AtomicU64,
    last_call_ms: AtomicU64,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn pending(&self) -> std::sync::MutexGuard<'_, InFlight<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// FNV-1a of a method name: the reply check compares hashes, so no name is stored per call.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn run_connection(
    endpoint: Arc<Endpoint>,
    conn: Arc<Conn>,
    slot: usize,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let settings = endpoint.settings.clone();
    let connect = tokio::time::timeout(
        settings.connect_timeout,
        rpc_runtime::listener::connect(&endpoint.address),
    );
    let connected = tokio::select! {
        biased;
        _ = settings.abort.fired() => None,
        connected = connect => Some(connected),
    };
    let ending = match connected {
        None => Ending::Aborted,
        Some(Ok(Ok(rpc_runtime::listener::Stream::Unix(mut s)))) => {
            endpoint.note_connected();
            let (r, w) = s.split();
            serve(&endpoint, r, w, &mut rx).await
        }
        Some(Ok(Ok(rpc_runtime::listener::Stream::Tcp(mut s)))) => {
            endpoint.note_connected();
            let (r, w) = s.split();
            serve(&endpoint, r, w, &mut rx).await
        }
        Some(Ok(Err(e))) => {
            tracing::warn!(endpoint = endpoint.label(), error = %e, "cannot connect to endpoint");
            Ending::Failed(UpstreamFailure::ConnectFailed)
        }
        Some(Err(_)) => {
            tracing::warn!(endpoint = endpoint.label(), "connect to endpoint timed out");
            Ending::Failed(UpstreamFailure::ConnectFailed)
        }
    };
    conn.closed.store(true, Ordering::Relaxed);
    endpoint.release_slot(slot, &conn);
    // Calls still queued were never written: hand them back for another endpoint (none when
    // the proxy is giving up). Closing first makes every later send fail, so none is left
    // behind.
    rx.close();
    let aborted = ending == Ending::Aborted;
    while let Ok(out) = rx.try_recv() {
        endpoint.finish_one();
        if let Some(reply) = out.reply {
            let _ = reply.send(Err(if aborted {
                Failure::Failed(UpstreamFailure::Stopping)
            } else {
                Failure::NotSent(out.message)
            }));
        }
    }
    match ending {
        Ending::Failed(failure) => {
            endpoint.note_failure();
            if failure != UpstreamFailure::ConnectFailed {
                tracing::warn!(endpoint = endpoint.label(), cause = %failure, "upstream connection closed");
            }
        }
        Ending::Aborted => tracing::debug!(
            endpoint = endpoint.label(),
            "upstream connection closed at the end of the drain"
        ),
        Ending::Idle => tracing::debug!(
            endpoint = endpoint.label(),
            "idle upstream connection closed"
        ),
        Ending::Drained => tracing::info!(
            endpoint = endpoint.label(),
            "drained endpoint connection closed"
        ),
        Ending::Dropped => {}
    }
}

/// Runs one connected socket until it fails, goes idle, or drains. Fails every call still
/// pending on it before returning.
async fn serve<R, W>(
    endpoint: &Arc<Endpoint>,
    reader: R,
    writer: W,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let shared = Shared {
        pending: Mutex::new(InFlight::new()),
        epoch: Instant::now(),
        last_rx_ms: AtomicU64::new(0),
        last_call_ms: AtomicU64::new(0),
    };
    // Abort first: a connection opened after it must not write the calls queued on it.
    let ending = tokio::select! {
        biased;
        _ = endpoint.settings.abort.fired() => Ending::Aborted,
        ending = write_loop(endpoint, &shared, writer, rx) => ending,
        ending = read_loop(endpoint, &shared, reader) => ending,
    };
    let failure = match ending {
        Ending::Failed(f) => f,
        Ending::Aborted => UpstreamFailure::Stopping,
        _ => UpstreamFailure::ConnectionLost,
    };
    let calls = shared.pending().take_all();
    for pending in calls {
        endpoint.finish_one();
        let _ = pending.reply.send(Err(Failure::Failed(failure)));
    }
    ending
}

/// Largest batch of small frames copied into one write.
const COALESCE_LIMIT: usize = 64 * 1024;

async fn write_loop<W>(
    endpoint: &Arc<Endpoint>,
    shared: &Shared,
    mut writer: W,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> Ending
where
    W: AsyncWrite + Unpin,
{
    let settings = &endpoint.settings;
    let tick_every = settings.heartbeat_interval.min(Duration::from_millis(200));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Outgoing> = Vec::with_capacity(64);
    let mut buf = BytesMut::new();
    let mut last_ping_ms = 0u64;
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return Ending::Dropped;
                }
                let now = Instant::now();
                shared.last_call_ms.store(shared.now_ms(), Ordering::Relaxed);
                let mut large = Vec::new();
                {
                    let mut pending = shared.pending();
                    for out in batch.drain(..) {
                        let mut message = out.message;
                        let seqid = match out.reply {
                            Some(reply) => pending.insert(
                                now + settings.request_timeout,
                                Pending {
                                    reply,
                                    client_seqid: out.client_seqid,
                                    method_hash: name_hash(message.name()),
                                },
                            ),
                            // A ONEWAY call is done once written.
                            None => {
                                endpoint.finish_one();
                                pending.next_seqid()
                            }
                        };
                        message.set_seqid(seqid);
                        if buf.len() + message.as_wire().len() <= COALESCE_LIMIT {
                            buf.extend_from_slice(message.as_wire());
                        } else {
                            large.push(message);
                        }
                    }
                }
                if !buf.is_empty() && writer.write_all(&buf).await.is_err() {
                    return Ending::Failed(UpstreamFailure::ConnectionLost);
                }
                buf.clear();
                for message in large {
                    if writer.write_all(message.as_wire()).await.is_err() {
                        return Ending::Failed(UpstreamFailure::ConnectionLost);
                    }
                }
            }
            _ = tick.tick() => {
                let now_ms = shared.now_ms();
                let expired = expire(endpoint, shared);
                if expired > 0 {
                    tracing::warn!(endpoint = endpoint.label(), expired, "calls timed out");
                }
                let quiet = now_ms.saturating_sub(shared.last_rx_ms.load(Ordering::Relaxed));
                if quiet >= settings.heartbeat_timeout.as_millis() as u64 {
                    return Ending::Failed(UpstreamFailure::HeartbeatTimeout);
                }
                let empty = shared.pending().is_empty();
                if empty && rx.is_empty() {
                    if endpoint.is_draining() {
                        return Ending::Drained;
                    }
                    let idle = now_ms.saturating_sub(shared.last_call_ms.load(Ordering::Relaxed));
                    if idle >= settings.idle_timeout.as_millis() as u64 {
                        return Ending::Idle;
                    }
                }
                let interval = settings.heartbeat_interval.as_millis() as u64;
                if quiet >= interval && now_ms.saturating_sub(last_ping_ms) >= interval {
                    last_ping_ms = now_ms;
                    if writer.write_all(&rpc_frame::heartbeat(0)).await.is_err() {
                        return Ending::Failed(UpstreamFailure::ConnectionLost);
                    }
                }
            }
        }
    }
}

/// Fails the calls past their deadline; returns how many.
fn expire(endpoint: &Endpoint, shared: &Shared) -> usize {
    let now = Instant::now();
    let mut expired = Vec::new();
    {
        let mut pending = shared.pending();
        while let Some(seqid) = pending.next_expired(now) {
            if let Some(call) = pending.remove(seqid) {
                expired.push(call);
            }
        }
    }
    let count = expired.len();
    for call in expired {
        endpoint.finish_one();
        let _ = call
            .reply
            .send(Err(Failure::Failed(UpstreamFailure::Timeout)));
    }
    count
}

async fn read_loop<R>(endpoint: &Arc<Endpoint>, shared: &Shared, mut reader: R) -> Ending
where
    R: AsyncRead + Unpin,
{
    let max = endpoint.settings.max_frame_size;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Ending::Failed(UpstreamFailure::ConnectionLost),
            Ok(_) => {}
        }
        shared.last_rx_ms.store(shared.now_ms(), Ordering::Relaxed);
        loop {
            let frame = match rpc_frame::decode_frame(&mut buf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(endpoint = endpoint.label(), error = %e, "bad frame from endpoint");
                    return Ending::Failed(UpstreamFailure::BadReply);
                }
            };
            let mut reply = match Message::parse(frame) {
                Ok(reply) => reply,
                Err((_, e)) => {
                    tracing::warn!(endpoint = endpoint.label(), error = %e, "bad reply header from endpoint");
                    return Ending::Failed(UpstreamFailure::BadReply);
                }
            };
            let call = shared.pending().remove(reply.seqid());
            let Some(call) = call else {
                // A heartbeat echo (seqid 0), or the late reply of a call that timed out.
                if !matches!(reply.message_type(), MessageType::Heartbeat) && reply.seqid() != 0 {
                    tracing::debug!(
                        endpoint = endpoint.label(),
                        seqid = reply.seqid(),
                        "reply for no pending call"
                    );
                }
                continue;
            };
            endpoint.finish_one();
            let answer = if name_hash(reply.name()) == call.method_hash
                && matches!(
                    reply.message_type(),
                    MessageType::Reply | MessageType::Exception
                ) {
                reply.set_seqid(call.client_seqid);
                Ok(reply)
            } else {
                tracing::warn!(
                    endpoint = endpoint.label(),
                    name = reply.name(),
                    "reply does not match its call"
                );
                Err(Failure::Failed(UpstreamFailure::BadReply))
            };
            let _ = call.reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_hash_differs_for_different_names() {
        assert_ne!(name_hash("echo"), name_hash("echp"));
        assert_eq!(name_hash("echo"), name_hash("echo"));
    }
}
