//! One endpoint (an LB or a plain Thrift server) as the proxy sees it: a few multiplexed
//! connections opened on first use, seqids rewritten per connection and restored on the
//! reply, heartbeats on quiet connections, request timeouts, reconnect backoff, drain on
//! removal and close when idle. Sits between the router (which picks an [`Endpoint`]) and
//! the endpoint's socket.
//!
//! Each connection is one task running [`rpc_mux::connection::run`] (writer, reader and clock
//! side by side, so a peer that stops reading cannot stop timeouts) under the proxy's
//! upstream policy: fail a call and let its caller try another endpoint. A call is an
//! [`Outgoing`]; its answer comes back on a oneshot channel as [`Reply`]. A call that was
//! never written (connect failed, connection gone before the write) comes back as
//! [`Failure::NotSent`] with its message, so the caller can safely try another endpoint.
//!
//! Each endpoint also carries its outlier state ([`Outlier`]) and the shared state of its
//! service ([`ServiceHealth`]): the router reads them to skip ejected endpoints, and the
//! caller reports each attempt's verdict through [`Endpoint::record`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use rpc_config::{Address, ResilienceConfig};
use rpc_frame::{Message, MessageType};
use rpc_mux::{Ending, Expiry, Outbound, Start, Tick};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::UpstreamFailure;
use crate::resilience::{Admission, HealthMetrics, Outlier, ServiceHealth, Verdict};

/// The upstream settings in force, shared by the router, every endpoint and every service's
/// resilience state; a reload (SIGHUP) stores new ones, read by new calls and new connections.
pub type SharedSettings = Arc<ArcSwap<UpstreamSettings>>;

/// `settings` made shareable and replaceable.
pub fn shared(settings: UpstreamSettings) -> SharedSettings {
    Arc::new(ArcSwap::from_pointee(settings))
}

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
    /// Largest reply frame accepted; a larger one fails its call only.
    pub max_frame_size: usize,
    /// A connection whose endpoint accepts no byte of a pending write this long is closed.
    pub write_timeout: Duration,
    /// Bytes of calls queued and not yet written on one connection beyond which new calls
    /// are refused (`max_connection_buffer_bytes`).
    pub max_queued_bytes: usize,
    /// Outlier ejection and the retry budget.
    pub resilience: ResilienceConfig,
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
            write_timeout: Duration::from_secs(30),
            max_queued_bytes: 32 << 20,
            resilience: ResilienceConfig::default(),
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
    NotSent {
        /// The call, as it was handed over.
        message: Message,
        /// Whether the endpoint failed (connect failure, reset, heartbeat loss, a stalled
        /// write): a counted failure. False when the proxy closed the connection itself
        /// (idle, drained).
        endpoint_failed: bool,
    },
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
    /// When the call fails with [`UpstreamFailure::Timeout`]: its arrival plus
    /// `request_timeout_ms`, the same on every endpoint tried.
    pub deadline: Instant,
}

/// Why [`Endpoint::send`] refused a call at once (the call is handed back).
#[derive(Debug)]
pub enum Refused {
    /// In reconnect backoff, or `max_queued_bytes` wait to be written on its connection
    /// (the endpoint does not read): try another endpoint.
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
    settings: SharedSettings,
    /// Its connection slots (`upstream_connections` when it was made).
    connections: usize,
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
    /// Whether its node announces marks (`"marks": 1`): field 3 of its exceptions is trusted.
    marks: AtomicBool,
    /// Its outlier ejection state.
    outlier: Outlier,
    /// Its service's shared ejection count and retry budget.
    health: Arc<ServiceHealth>,
}

impl Endpoint {
    /// A new endpoint of the service whose state is `health`; nothing is connected until the
    /// first call.
    pub fn new(
        address: Address,
        settings: SharedSettings,
        health: Arc<ServiceHealth>,
    ) -> Arc<Self> {
        let connections = settings.load().connections.max(1);
        let slots = (0..connections).map(|_| None).collect();
        Arc::new(Endpoint {
            label: address.to_string(),
            address,
            settings,
            connections,
            outstanding: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            slots: Mutex::new(slots),
            next_slot: AtomicUsize::new(0),
            created: Instant::now(),
            backoff_until_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            marks: AtomicBool::new(false),
            outlier: Outlier::default(),
            health,
        })
    }

    /// An endpoint of a service of its own, with metrics registered nowhere (tests).
    pub fn detached(address: Address, settings: UpstreamSettings) -> Arc<Self> {
        let settings = shared(settings);
        let health = ServiceHealth::new("detached", settings.clone(), HealthMetrics::detached());
        Endpoint::new(address, settings, Arc::new(health))
    }

    /// Whether the endpoint's node announces marks (field 3 of its exceptions is trusted).
    pub fn marks(&self) -> bool {
        self.marks.load(Ordering::Relaxed)
    }

    /// Notes whether the endpoint's node announces marks (set at every table update: an LB
    /// replaced on the same address by one of another kind is believed from then on).
    pub fn set_marks(&self, marks: bool) {
        self.marks.store(marks, Ordering::Relaxed);
    }

    /// Its outlier state.
    pub fn outlier(&self) -> &Outlier {
        &self.outlier
    }

    /// Whether it may take a call now (hands out its probe when one is due).
    pub fn admission(&self) -> Admission {
        self.health.admission(&self.outlier)
    }

    /// Records the verdict of an attempt on this endpoint; `probe` when the call was picked
    /// as its probe.
    pub fn record(&self, verdict: Verdict, probe: bool) {
        self.health.record(
            &self.outlier,
            verdict,
            probe,
            &self.label,
            self.outstanding(),
        );
    }

    /// Calls outstanding plus the balancing penalty of recent counted failures: what the
    /// router compares.
    pub fn load(&self) -> usize {
        self.outstanding() + self.outlier.penalty()
    }

    /// How long a call routed here may take (`request_timeout_ms`).
    pub fn request_timeout(&self) -> Duration {
        self.settings.load().request_timeout
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
    /// once their calls are answered. An ejected endpoint stops counting against its
    /// service's ejection cap.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.health.release(&self.outlier);
    }

    /// What the endpoint is doing, for status output: `draining` (gone from ZooKeeper, its
    /// connections finishing their calls), `ejected` (outlier ejection: new calls go elsewhere
    /// but for its probe), `backoff` (reconnect backoff: new calls go elsewhere), `connected`
    /// (a connection is open or being opened), or `idle` (none open; the next call opens one).
    pub fn state(&self) -> &'static str {
        if self.is_draining() {
            "draining"
        } else if self.outlier.is_ejected() {
            "ejected"
        } else if self.in_backoff() {
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
        let settings = self.settings.load();
        if settings.abort.is_fired() {
            return Err(Refused::Stopping(out));
        }
        if self.in_backoff() {
            return Err(Refused::Backoff(out));
        }
        if self.outstanding.fetch_add(1, Ordering::Relaxed) >= settings.max_pending {
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Full(out));
        }
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.connections;
        let mut out = out;
        // Two tries: the connection found may close between the lookup and the send.
        for _ in 0..2 {
            let conn = self.connection(slot);
            let bytes = out.message.as_wire().len();
            if conn.queued_bytes.load(Ordering::Relaxed) >= settings.max_queued_bytes {
                // The endpoint does not read what it was sent: like backoff, the call may
                // go to another endpoint.
                self.finish_one();
                return Err(Refused::Backoff(out));
            }
            conn.queued_calls.fetch_add(1, Ordering::Relaxed);
            conn.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            match conn.tx.send(Outbound::Call(out)) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => {
                    conn.dequeued(bytes);
                    let Outbound::Call(back) = back else {
                        unreachable!("a call was sent")
                    };
                    out = back;
                }
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
            queued_calls: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
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
    tx: mpsc::UnboundedSender<Outbound<Outgoing>>,
    /// Set once the connection task stops taking calls.
    closed: AtomicBool,
    /// Calls queued and not yet written (the idle and drain checks).
    queued_calls: AtomicUsize,
    /// Their bytes (the `max_queued_bytes` bound).
    queued_bytes: AtomicUsize,
}

impl Conn {
    /// A queued call of `bytes` was taken off the queue.
    fn dequeued(&self, bytes: usize) {
        self.queued_calls.fetch_sub(1, Ordering::Relaxed);
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A call written and waiting for its reply.
struct Pending {
    reply: oneshot::Sender<Reply>,
    client_seqid: i32,
    method_hash: u64,
}

/// Why the proxy closes a healthy upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// No call for `idle_timeout`.
    Idle,
    /// The endpoint left ZooKeeper and its last call was answered.
    Drained,
    /// A write the endpoint has not taken for a request timeout holds calls queued behind it.
    Clogged,
}

/// FNV-1a of a method name: the reply check compares hashes, so no name is stored per call.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

// === impl UpstreamPolicy ===

/// What the proxy does with the calls of one upstream connection ([`rpc_mux::Policy`]): a
/// call past its deadline or on a broken connection fails at once; a call never written goes
/// back to its caller to try another endpoint.
struct UpstreamPolicy<'a> {
    endpoint: &'a Arc<Endpoint>,
    conn: &'a Conn,
}

impl UpstreamPolicy<'_> {
    fn answer(&self, pending: Pending, reply: Reply) {
        self.endpoint.finish_one();
        let _ = pending.reply.send(reply);
    }
}

impl rpc_mux::Policy for UpstreamPolicy<'_> {
    type Call = Outgoing;
    type Pending = Pending;
    type Close = Close;

    fn start(&self, out: Outgoing, now: Instant) -> Start<Pending> {
        self.conn.dequeued(out.message.as_wire().len());
        let pending = match out.reply {
            Some(reply) => Some((
                out.deadline.max(now),
                Pending {
                    reply,
                    client_seqid: out.client_seqid,
                    method_hash: name_hash(out.message.name()),
                },
            )),
            // A ONEWAY call is done once handed to the writer.
            None => {
                self.endpoint.finish_one();
                None
            }
        };
        Start {
            message: out.message,
            pending,
        }
    }

    fn reply(&self, pending: Pending, mut reply: Message) {
        if name_hash(reply.name()) == pending.method_hash {
            reply.set_seqid(pending.client_seqid);
            self.answer(pending, Ok(reply));
        } else {
            tracing::warn!(
                endpoint = self.endpoint.label(),
                name = reply.name(),
                "reply does not match its call"
            );
            self.answer(pending, Err(Failure::Failed(UpstreamFailure::BadReply)));
        }
    }

    fn expired(&self, _: &mut Pending) -> Expiry {
        Expiry::Drop
    }

    fn failed(&self, pending: Pending, failure: rpc_mux::Failure<Close>) {
        let cause = match failure {
            rpc_mux::Failure::Timeout => UpstreamFailure::Timeout,
            rpc_mux::Failure::ReplyTooLarge { .. } => UpstreamFailure::ReplyTooLarge,
            rpc_mux::Failure::ReplyMalformed => UpstreamFailure::BadReply,
            rpc_mux::Failure::Ended(ending) => ended_failure(ending),
        };
        self.answer(pending, Err(Failure::Failed(cause)));
    }

    fn frame(&self, message: Message) -> Result<(), Close> {
        // A heartbeat or its echo (any seqid), or the late reply of a call that timed out.
        if !matches!(message.message_type(), MessageType::Heartbeat) && message.seqid() != 0 {
            tracing::debug!(
                endpoint = self.endpoint.label(),
                seqid = message.seqid(),
                "reply for no pending call"
            );
        }
        Ok(())
    }

    fn tick(&self, tick: &Tick) -> Result<(), Close> {
        let queued = self.conn.queued_calls.load(Ordering::Relaxed) > 0;
        if queued
            && tick
                .writing_for
                .is_some_and(|w| w >= self.endpoint.request_timeout())
        {
            // Calls queued behind a write the endpoint has not taken for a request timeout
            // would outlive their deadline: close, so they come back for another endpoint.
            return Err(Close::Clogged);
        }
        if tick.held > 0 || queued {
            return Ok(());
        }
        if self.endpoint.is_draining() {
            return Err(Close::Drained);
        }
        if tick.since_last_call >= self.endpoint.settings.load().idle_timeout {
            return Err(Close::Idle);
        }
        Ok(())
    }

    fn ended(&self, _: Ending<Close>) {
        // No new call may join a connection that is failing the ones it holds.
        self.conn.closed.store(true, Ordering::Relaxed);
    }

    fn unsent(&self, out: Outgoing, ending: Ending<Close>) {
        self.conn.dequeued(out.message.as_wire().len());
        self.endpoint.finish_one();
        if let Some(reply) = out.reply {
            let _ = reply.send(Err(if ending == Ending::Stopped {
                Failure::Failed(UpstreamFailure::Stopping)
            } else {
                Failure::NotSent {
                    message: out.message,
                    endpoint_failed: endpoint_failed(ending),
                }
            }));
        }
    }
}

/// Whether a connection's end was the endpoint's failure (a counted failure for the calls it
/// could not write), not the proxy's own close.
fn endpoint_failed(ending: Ending<Close>) -> bool {
    match ending {
        Ending::Closed
        | Ending::HeartbeatTimeout
        | Ending::WriteStalled
        | Ending::BadFrame
        | Ending::Policy(Close::Clogged) => true,
        Ending::Stopped
        | Ending::QueueClosed
        | Ending::Policy(Close::Idle)
        | Ending::Policy(Close::Drained) => false,
    }
}

/// What the calls held by a connection that ended fail with.
fn ended_failure(ending: Ending<Close>) -> UpstreamFailure {
    match ending {
        Ending::HeartbeatTimeout => UpstreamFailure::HeartbeatTimeout,
        Ending::WriteStalled | Ending::Policy(Close::Clogged) => UpstreamFailure::WriteTimeout,
        Ending::BadFrame => UpstreamFailure::BadReply,
        Ending::Stopped => UpstreamFailure::Stopping,
        Ending::Closed | Ending::QueueClosed | Ending::Policy(_) => UpstreamFailure::ConnectionLost,
    }
}

async fn run_connection(
    endpoint: Arc<Endpoint>,
    conn: Arc<Conn>,
    slot: usize,
    mut rx: mpsc::UnboundedReceiver<Outbound<Outgoing>>,
) {
    // The settings of the moment, for this connection's life.
    let settings = endpoint.settings.load_full();
    let connect = tokio::time::timeout(
        settings.connect_timeout,
        rpc_runtime::listener::connect(&endpoint.address),
    );
    let connected = tokio::select! {
        biased;
        _ = settings.abort.fired() => None,
        connected = connect => Some(connected),
    };
    let policy = UpstreamPolicy {
        endpoint: &endpoint,
        conn: &conn,
    };
    let mux = rpc_mux::Settings {
        heartbeat_interval: settings.heartbeat_interval,
        heartbeat_timeout: settings.heartbeat_timeout,
        write_timeout: settings.write_timeout,
        max_frame_size: settings.max_frame_size,
        ping_at_start: false,
        ping_always: false,
    };
    let never_connected = !matches!(&connected, Some(Ok(Ok(_))));
    // Abort first: a connection opened after it must not write the calls queued on it.
    let stop = settings.abort.fired();
    let ending = match connected {
        None => Ending::Stopped,
        Some(Ok(Ok(rpc_runtime::listener::Stream::Unix(mut s)))) => {
            endpoint.note_connected();
            let (r, w) = s.split();
            rpc_mux::connection::run(&policy, &mux, r, w, &mut rx, stop).await
        }
        Some(Ok(Ok(rpc_runtime::listener::Stream::Tcp(mut s)))) => {
            endpoint.note_connected();
            let (r, w) = s.split();
            rpc_mux::connection::run(&policy, &mux, r, w, &mut rx, stop).await
        }
        Some(Ok(Err(e))) => {
            tracing::warn!(endpoint = endpoint.label(), error = %e, "cannot connect to endpoint");
            Ending::Closed
        }
        Some(Err(_)) => {
            tracing::warn!(endpoint = endpoint.label(), "connect to endpoint timed out");
            Ending::Closed
        }
    };
    conn.closed.store(true, Ordering::Relaxed);
    endpoint.release_slot(slot, &conn);
    // Calls still queued were never written: back to their callers for another endpoint
    // (none when the proxy is giving up).
    rpc_mux::connection::close_queue(&mut rx, |out| rpc_mux::Policy::unsent(&policy, out, ending));
    match ending {
        Ending::Stopped => tracing::debug!(
            endpoint = endpoint.label(),
            "upstream connection closed at the end of the drain"
        ),
        Ending::Policy(Close::Idle) => tracing::debug!(
            endpoint = endpoint.label(),
            "idle upstream connection closed"
        ),
        Ending::Policy(Close::Drained) => tracing::info!(
            endpoint = endpoint.label(),
            "drained endpoint connection closed"
        ),
        Ending::QueueClosed => {}
        _ if never_connected => endpoint.note_failure(),
        failed => {
            endpoint.note_failure();
            tracing::warn!(
                endpoint = endpoint.label(),
                cause = %ended_failure(failed),
                "upstream connection closed"
            );
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
