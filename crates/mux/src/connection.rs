//! One multiplexed framed connection: many callers' calls written on one socket with seqids
//! the connection gives them, replies matched back by seqid. The proxy's upstream connections
//! (to LBs and plain Thrift servers) and the LB's worker connections are both this; what
//! differs between them is a small [`Policy`] (the proxy fails a call and lets its caller try
//! another endpoint; the LB keeps a worker's slot until the worker answers, and admits a
//! connection only once it proved to be a worker).
//!
//! # Three sides, none can block another
//! [`run`] drives three futures side by side in one task:
//! - the **writer** takes queued [`Outbound`] items, gives each call its seqid, and writes
//!   them in batches; every write has a deadline on progress (`write_timeout`,
//!   [`crate::write`]), so a peer that stops reading ends the connection instead of holding it;
//! - the **reader** cuts frames ([`rpc_frame::FrameDecoder`]): a reply goes to the call holding its
//!   seqid; an oversized or malformed reply fails that one call and the stream goes on; a
//!   type-20 frame never completes a call, whatever its seqid; every other frame goes to the
//!   policy;
//! - the **clock** ticks (every `min(heartbeat_interval, 200 ms)`) to expire calls past their
//!   deadline, end a connection silent past `heartbeat_timeout`, ask the writer for a ping,
//!   and let the policy close an idle or drained connection.
//!
//! A write stuck on a full socket blocks only the writer: calls still expire on time and the
//! heartbeat timeout still fires. When any side ends (or `stop` fires), calls still held are
//! failed through the policy and calls queued but never written are handed back to it.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rpc_frame::{InFlight, Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{Notify, mpsc};

use crate::write::{WriteError, write_all};
use rpc_frame::{Decoded, FrameDecoder};

/// What a connection's queue carries.
#[derive(Debug)]
pub enum Outbound<C> {
    /// A call to write; the policy turns it into a frame.
    Call(C),
    /// A frame the hop wrote itself (STOP_CONFIRM), written as is.
    Control(BytesMut),
}

/// Tunables of one connection.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Ping the peer after this long (module docs).
    pub heartbeat_interval: Duration,
    /// End the connection when nothing arrived for this long.
    pub heartbeat_timeout: Duration,
    /// End the connection when the peer accepts no byte of a pending write for this long.
    pub write_timeout: Duration,
    /// Largest frame read; larger ones fail their call and are skipped.
    pub max_frame_size: usize,
    /// Ping once as soon as the connection runs (the LB: a new back connection proves to be
    /// a worker by the echo).
    pub ping_at_start: bool,
    /// Ping every `heartbeat_interval` whatever arrives (the LB, whose workers watch its
    /// pings), or only when the peer has been quiet that long (the proxy).
    pub ping_always: bool,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<C> {
    /// The peer closed the socket, or it failed.
    Closed,
    /// The peer accepted no byte of a pending write for the write timeout.
    WriteStalled,
    /// Nothing arrived for the heartbeat timeout.
    HeartbeatTimeout,
    /// The peer sent a length that cannot be framed (`<= 0`).
    BadFrame,
    /// Every sender of the queue is gone.
    QueueClosed,
    /// The `stop` future given to [`run`] fired.
    Stopped,
    /// The policy closed it ([`Policy::frame`], [`Policy::tick`]).
    Policy(C),
}

/// Why a call written on the connection gets no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure<C> {
    /// Past its deadline ([`Policy::expired`] said to drop it).
    Timeout,
    /// Its reply was larger than `max_frame_size` (and was skipped).
    ReplyTooLarge {
        /// The reply's announced length.
        len: usize,
    },
    /// Its reply's header could not be read.
    ReplyMalformed,
    /// The connection ended.
    Ended(Ending<C>),
}

/// What the policy makes of a queued call ([`Policy::start`]).
#[derive(Debug)]
pub struct Start<P> {
    /// The frame to write; its seqid is set by the connection.
    pub message: Message,
    /// Kept until the reply, with the call's deadline; `None` for a call without reply
    /// (ONEWAY), done once written.
    pub pending: Option<(Instant, P)>,
}

/// Whether a call past its deadline stays held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Take it out and fail it with [`Failure::Timeout`].
    Drop,
    /// The policy answered its caller; keep it held until the peer answers (the LB keeps a
    /// hung worker's slot taken).
    Keep,
}

/// Clock readings handed to [`Policy::tick`].
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// Time since the connection started running.
    pub age: Duration,
    /// Time since a call was last queued for writing.
    pub since_last_call: Duration,
    /// Calls written and not answered.
    pub held: usize,
    /// How long the batch being written has taken so far; `None` when the writer is idle.
    /// Calls queued behind a batch the peer does not take wait that long (the policy may
    /// close the connection so they go elsewhere).
    pub writing_for: Option<Duration>,
}

/// What differs between the users of a multiplexed connection (module docs). Called from the
/// connection's task; never while a write is pending on the hook's behalf.
pub trait Policy {
    /// A call as queued.
    type Call: Send;
    /// What is kept per written call until its reply.
    type Pending: Send;
    /// The policy's own reasons to close.
    type Close: Copy + Debug + Send;

    /// Turns a queued call into the frame to write (called as it is written).
    fn start(&self, call: Self::Call, now: Instant) -> Start<Self::Pending>;

    /// A batch went out: `oneway` calls without reply among `calls`.
    fn written(&self, calls: usize, oneway: usize) {
        let _ = (calls, oneway);
    }

    /// The reply (REPLY or EXCEPTION) of a held call arrived, its seqid still the
    /// connection's.
    fn reply(&self, pending: Self::Pending, reply: Message);

    /// A held call passed its deadline.
    fn expired(&self, pending: &mut Self::Pending) -> Expiry;

    /// A held call will get no reply.
    fn failed(&self, pending: Self::Pending, failure: Failure<Self::Close>);

    /// Any other frame from the peer: heartbeats, control frames, replies of no held call.
    ///
    /// # Errors
    /// The reason to close the connection.
    fn frame(&self, message: Message) -> Result<(), Self::Close>;

    /// A frame whose header could not be read and that belongs to no held call.
    ///
    /// # Errors
    /// The reason to close the connection.
    fn malformed(&self, error: &rpc_frame::HeaderError) -> Result<(), Self::Close> {
        tracing::warn!(%error, "malformed frame from peer skipped");
        Ok(())
    }

    /// A frame over `max_frame_size` is arriving (before its call, if any, is failed).
    ///
    /// # Errors
    /// The reason to close the connection (a peer that has not proved what it is).
    fn oversized(&self) -> Result<(), Self::Close> {
        Ok(())
    }

    /// Called on every clock tick.
    ///
    /// # Errors
    /// The reason to close the connection (idle, drained, no handshake).
    fn tick(&self, tick: &Tick) -> Result<(), Self::Close>;

    /// The connection ended; called before held calls are failed and queued calls handed
    /// back.
    fn ended(&self, ending: Ending<Self::Close>) {
        let _ = ending;
    }

    /// A call queued and never written (the connection ended first).
    fn unsent(&self, call: Self::Call, ending: Ending<Self::Close>);
}

/// Largest batch of small frames copied into one write.
const COALESCE_LIMIT: usize = 64 * 1024;

/// A piece of a batch, written in queue order.
enum Segment {
    /// Small frames copied together.
    Copied(BytesMut),
    /// A frame over [`COALESCE_LIMIT`], written from its own buffer.
    Whole(Message),
}

/// State the three sides share (one task: the mutex is never contended).
struct Shared<P> {
    held: Mutex<InFlight<P>>,
    /// Tokio's clock (the same as std's outside tests, where it can be paused).
    epoch: tokio::time::Instant,
    last_rx_ms: AtomicU64,
    last_call_ms: AtomicU64,
    /// When the batch being written began (ms since `epoch`, at least 1); 0 when none is.
    writing_since_ms: AtomicU64,
    ping: Notify,
}

impl<P> Shared<P> {
    fn held(&self) -> std::sync::MutexGuard<'_, InFlight<P>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Runs one connected socket until it ends (module docs); returns why. Held calls are
/// failed and queued calls handed back before it returns.
pub async fn run<P, R, W, S>(
    policy: &P,
    settings: &Settings,
    reader: R,
    writer: W,
    rx: &mut mpsc::UnboundedReceiver<Outbound<P::Call>>,
    stop: S,
) -> Ending<P::Close>
where
    P: Policy,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: Future<Output = ()>,
{
    let shared = Shared {
        held: Mutex::new(InFlight::new()),
        epoch: tokio::time::Instant::now(),
        last_rx_ms: AtomicU64::new(0),
        last_call_ms: AtomicU64::new(0),
        writing_since_ms: AtomicU64::new(0),
        ping: Notify::new(),
    };
    let ending = tokio::select! {
        biased;
        () = stop => Ending::Stopped,
        ending = clock(policy, settings, &shared) => ending,
        ending = read_side(policy, settings, &shared, reader) => ending,
        ending = write_side(policy, settings, &shared, writer, rx) => ending,
    };
    policy.ended(ending);
    let held = shared.held().take_all();
    for pending in held {
        policy.failed(pending, Failure::Ended(ending));
    }
    close_queue(rx, |call| policy.unsent(call, ending));
    ending
}

/// Closes a connection's queue and hands each call still in it to `unsent` (control frames
/// are dropped). Every later send fails, so no call is left behind.
pub fn close_queue<C>(rx: &mut mpsc::UnboundedReceiver<Outbound<C>>, mut unsent: impl FnMut(C)) {
    rx.close();
    while let Ok(item) = rx.try_recv() {
        if let Outbound::Call(call) = item {
            unsent(call);
        }
    }
}

async fn write_side<P, W>(
    policy: &P,
    settings: &Settings,
    shared: &Shared<P::Pending>,
    mut writer: W,
    rx: &mut mpsc::UnboundedReceiver<Outbound<P::Call>>,
) -> Ending<P::Close>
where
    P: Policy,
    W: AsyncWrite + Unpin,
{
    let timeout = settings.write_timeout;
    let ended = |e: WriteError| {
        if e.is_stall() {
            Ending::WriteStalled
        } else {
            Ending::Closed
        }
    };
    if settings.ping_at_start
        && let Err(e) = write_all(&mut writer, &rpc_frame::heartbeat(0), timeout).await
    {
        return ended(e);
    }
    let mut batch = Vec::with_capacity(64);
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            biased;
            () = shared.ping.notified() => {
                if let Err(e) = write_all(&mut writer, &rpc_frame::heartbeat(0), timeout).await {
                    return ended(e);
                }
            }
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return Ending::QueueClosed;
                }
                let now = tokio::time::Instant::now().into_std();
                shared.last_call_ms.store(shared.now_ms(), Ordering::Relaxed);
                // In queue order: copied runs of small frames, and large frames written as
                // they are (a STOP_CONFIRM never overtakes a call queued before it).
                let mut segments = Vec::new();
                let (mut calls, mut oneway) = (0, 0);
                {
                    let mut held = shared.held();
                    for item in batch.drain(..) {
                        let message = match item {
                            Outbound::Control(frame) => {
                                buf.extend_from_slice(&frame);
                                continue;
                            }
                            Outbound::Call(call) => {
                                let start = policy.start(call, now);
                                calls += 1;
                                let seqid = match start.pending {
                                    Some((deadline, pending)) => held.insert(deadline, pending),
                                    None => {
                                        oneway += 1;
                                        held.next_seqid()
                                    }
                                };
                                let mut message = start.message;
                                message.set_seqid(seqid);
                                message
                            }
                        };
                        if buf.len() + message.as_wire().len() <= COALESCE_LIMIT {
                            buf.extend_from_slice(message.as_wire());
                        } else {
                            if !buf.is_empty() {
                                segments.push(Segment::Copied(buf.split()));
                            }
                            segments.push(Segment::Whole(message));
                        }
                    }
                }
                shared.writing_since_ms.store(shared.now_ms().max(1), Ordering::Relaxed);
                for segment in &segments {
                    let bytes = match segment {
                        Segment::Copied(bytes) => &bytes[..],
                        Segment::Whole(message) => message.as_wire(),
                    };
                    if let Err(e) = write_all(&mut writer, bytes, timeout).await {
                        return ended(e);
                    }
                }
                if !buf.is_empty() {
                    if let Err(e) = write_all(&mut writer, &buf, timeout).await {
                        return ended(e);
                    }
                    buf.clear();
                }
                shared.writing_since_ms.store(0, Ordering::Relaxed);
                if buf.capacity() > 1 << 20 {
                    buf = BytesMut::new();
                }
                policy.written(calls, oneway);
            }
        }
    }
}

async fn read_side<P, R>(
    policy: &P,
    settings: &Settings,
    shared: &Shared<P::Pending>,
    mut reader: R,
) -> Ending<P::Close>
where
    P: Policy,
    R: AsyncRead + Unpin,
{
    let mut decoder = FrameDecoder::new(settings.max_frame_size);
    let mut buf = BytesMut::with_capacity(16 * 1024);
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
            let frame = match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(Decoded::Frame(frame))) => frame,
                Ok(Some(Decoded::Oversized(over))) => {
                    if let Err(close) = policy.oversized() {
                        return Ending::Policy(close);
                    }
                    tracing::warn!(
                        len = over.len,
                        max = settings.max_frame_size,
                        "frame over max_frame_size from peer skipped"
                    );
                    let call = over
                        .head
                        .filter(|h| is_reply(h.message_type))
                        .and_then(|h| shared.held().remove(h.seqid));
                    if let Some(pending) = call {
                        policy.failed(pending, Failure::ReplyTooLarge { len: over.len });
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unframeable bytes from peer");
                    return Ending::BadFrame;
                }
            };
            let message = match Message::parse(frame) {
                Ok(message) => message,
                Err((frame, e)) => {
                    let call = rpc_frame::salvage_name_and_seqid(&frame, &e)
                        .and_then(|(_, seqid)| shared.held().remove(seqid));
                    match call {
                        Some(pending) => policy.failed(pending, Failure::ReplyMalformed),
                        None => {
                            if let Err(close) = policy.malformed(&e) {
                                return Ending::Policy(close);
                            }
                        }
                    }
                    continue;
                }
            };
            let call = if is_reply(message.message_type()) {
                shared.held().remove(message.seqid())
            } else {
                None
            };
            match call {
                Some(pending) => policy.reply(pending, message),
                None => {
                    if let Err(close) = policy.frame(message) {
                        return Ending::Policy(close);
                    }
                }
            }
        }
        if decoder.awaiting_head(&buf)
            && let Err(close) = policy.oversized()
        {
            return Ending::Policy(close);
        }
        if buf.is_empty() && buf.capacity() > 1 << 20 {
            // Give back a buffer grown by a large frame.
            buf = BytesMut::new();
        }
    }
}

fn is_reply(message_type: MessageType) -> bool {
    matches!(message_type, MessageType::Reply | MessageType::Exception)
}

async fn clock<P: Policy>(
    policy: &P,
    settings: &Settings,
    shared: &Shared<P::Pending>,
) -> Ending<P::Close> {
    let mut tick =
        tokio::time::interval(settings.heartbeat_interval.min(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval_ms = u64::try_from(settings.heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
    let timeout_ms = u64::try_from(settings.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
    // The first ping (if any) is the writer's own; count from the start.
    let mut last_ping_ms = 0;
    loop {
        tick.tick().await;
        expire(policy, shared);
        let now_ms = shared.now_ms();
        let quiet = now_ms.saturating_sub(shared.last_rx_ms.load(Ordering::Relaxed));
        if quiet >= timeout_ms {
            return Ending::HeartbeatTimeout;
        }
        let held = shared.held().len();
        let since_call = now_ms.saturating_sub(shared.last_call_ms.load(Ordering::Relaxed));
        let writing_since = shared.writing_since_ms.load(Ordering::Relaxed);
        let reading = Tick {
            age: Duration::from_millis(now_ms),
            since_last_call: Duration::from_millis(since_call),
            held,
            writing_for: (writing_since > 0)
                .then(|| Duration::from_millis(now_ms.saturating_sub(writing_since))),
        };
        if let Err(close) = policy.tick(&reading) {
            return Ending::Policy(close);
        }
        if (settings.ping_always || quiet >= interval_ms)
            && now_ms.saturating_sub(last_ping_ms) >= interval_ms
        {
            last_ping_ms = now_ms;
            shared.ping.notify_one();
        }
    }
}

/// Deals with the held calls past their deadline.
fn expire<P: Policy>(policy: &P, shared: &Shared<P::Pending>) {
    let now = tokio::time::Instant::now().into_std();
    let mut dropped = Vec::new();
    {
        let mut held = shared.held();
        while let Some(seqid) = held.next_expired(now) {
            let Some(pending) = held.get_mut(seqid) else {
                continue;
            };
            if policy.expired(pending) == Expiry::Drop
                && let Some(pending) = held.remove(seqid)
            {
                dropped.push(pending);
            }
        }
    }
    let count = dropped.len();
    for pending in dropped {
        policy.failed(pending, Failure::Timeout);
    }
    if count > 0 {
        tracing::warn!(expired = count, "calls timed out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    /// Records what happened to each call, by the caller's id.
    #[derive(Default)]
    struct Recorder {
        outcomes: Mutex<Vec<(u32, String)>>,
    }

    impl Recorder {
        fn outcomes(&self) -> Vec<(u32, String)> {
            self.outcomes.lock().unwrap().clone()
        }
        fn note(&self, id: u32, what: String) {
            self.outcomes.lock().unwrap().push((id, what));
        }
    }

    struct TestCall {
        id: u32,
        message: Message,
        deadline: Instant,
    }

    impl Policy for Recorder {
        type Call = TestCall;
        type Pending = u32;
        type Close = ();

        fn start(&self, call: TestCall, _: Instant) -> Start<u32> {
            Start {
                message: call.message,
                pending: Some((call.deadline, call.id)),
            }
        }
        fn reply(&self, id: u32, reply: Message) {
            self.note(id, format!("reply {}", reply.name()));
        }
        fn expired(&self, _: &mut u32) -> Expiry {
            Expiry::Drop
        }
        fn failed(&self, id: u32, failure: Failure<()>) {
            self.note(id, format!("{failure:?}"));
        }
        fn frame(&self, _: Message) -> Result<(), ()> {
            Ok(())
        }
        fn tick(&self, _: &Tick) -> Result<(), ()> {
            Ok(())
        }
        fn unsent(&self, call: TestCall, _: Ending<()>) {
            self.note(call.id, "unsent".into());
        }
    }

    fn settings() -> Settings {
        Settings {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(1500),
            write_timeout: Duration::from_secs(30),
            max_frame_size: 64 * 1024,
            ping_at_start: false,
            ping_always: false,
        }
    }

    fn message(name: &str, body_len: usize) -> Message {
        let mut wire = rpc_frame::encode_message(MessageType::Call, name, 0, &vec![0u8; body_len]);
        let frame = rpc_frame::decode_frame(&mut wire, usize::MAX)
            .unwrap()
            .unwrap();
        Message::parse(frame).unwrap()
    }

    /// Reads the next frame the connection wrote, skipping heartbeats.
    async fn next_call(peer: &mut DuplexStream, buf: &mut BytesMut) -> Message {
        loop {
            if let Some(frame) = rpc_frame::decode_frame(buf, usize::MAX).unwrap() {
                let message = Message::parse(frame).unwrap();
                if message.message_type() != MessageType::Heartbeat {
                    return message;
                }
                continue;
            }
            assert!(peer.read_buf(buf).await.unwrap() > 0, "connection closed");
        }
    }

    fn reply_to(call: &Message, body_len: usize) -> BytesMut {
        rpc_frame::encode_message(
            MessageType::Reply,
            call.name(),
            call.seqid(),
            &vec![1u8; body_len],
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_reads_cannot_hold_calls_past_their_deadline() {
        let (ours, _peer) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = tokio::time::Instant::now().into_std();
        for id in 0..20 {
            tx.send(Outbound::Call(TestCall {
                id,
                message: message("echo", 256 * 1024),
                deadline: start + Duration::from_millis(500),
            }))
            .unwrap();
        }
        let policy = Arc::new(Recorder::default());
        let task = tokio::spawn({
            let policy = policy.clone();
            async move {
                let ending =
                    run(&*policy, &settings(), r, w, &mut rx, std::future::pending()).await;
                (ending, tokio::time::Instant::now().into_std() - start)
            }
        });
        let (ending, took) = task.await.unwrap();
        // The writer is stuck on the first call the whole time: the clock still expires
        // every held call at its deadline and ends the silent connection.
        assert_eq!(ending, Ending::HeartbeatTimeout);
        assert!(took <= Duration::from_millis(1800), "{took:?}");
        let outcomes = policy.outcomes();
        assert_eq!(outcomes.len(), 20, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|(_, what)| what == "Timeout" || what == "unsent"),
            "{outcomes:?}"
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_pings_but_never_reads_is_closed_at_the_write_timeout() {
        let (ours, mut peer) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(Outbound::Call(TestCall {
            id: 1,
            message: message("echo", 64 * 1024),
            deadline: Instant::now() + Duration::from_secs(3600),
        }))
        .unwrap();
        let pinger = tokio::spawn(async move {
            loop {
                peer.write_all(&rpc_frame::heartbeat(0)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut settings = settings();
        settings.write_timeout = Duration::from_secs(2);
        let policy = Recorder::default();
        let start = tokio::time::Instant::now();
        let ending = run(&policy, &settings, r, w, &mut rx, std::future::pending()).await;
        assert_eq!(ending, Ending::WriteStalled);
        assert!(start.elapsed() < Duration::from_secs(3));
        assert_eq!(
            policy.outcomes(),
            vec![(1, "Ended(WriteStalled)".to_string())]
        );
        pinger.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn one_oversized_reply_fails_one_call_of_fifty_and_a_ping_completes_none() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(ours);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let deadline = Instant::now() + Duration::from_secs(3600);
        for id in 0..50 {
            tx.send(Outbound::Call(TestCall {
                id,
                message: message(&format!("m{id}"), 10),
                deadline,
            }))
            .unwrap();
        }
        let peer_side = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut calls = Vec::new();
            for _ in 0..50 {
                calls.push(next_call(&mut peer, &mut buf).await);
            }
            for (i, call) in calls.iter().enumerate() {
                if i == 7 {
                    // A ping carrying a held call's seqid first: it must not answer the call.
                    let ping = rpc_frame::encode_message(
                        MessageType::Heartbeat,
                        call.name(),
                        call.seqid(),
                        &[0],
                    );
                    peer.write_all(&ping).await.unwrap();
                }
                let size = if i == 20 { 200 * 1024 } else { 100 };
                peer.write_all(&reply_to(call, size)).await.unwrap();
            }
            peer
        });
        let policy = Arc::new(Recorder::default());
        let runner = tokio::spawn({
            let policy = policy.clone();
            async move { run(&*policy, &settings(), r, w, &mut rx, std::future::pending()).await }
        });
        let _peer = peer_side.await.unwrap();
        let wait = async {
            while policy.outcomes().len() < 50 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("every call answered");
        let outcomes = policy.outcomes();
        let failed: Vec<_> = outcomes
            .iter()
            .filter(|(_, what)| !what.starts_with("reply"))
            .collect();
        assert_eq!(failed.len(), 1, "{outcomes:?}");
        assert_eq!(failed[0].0, 20);
        assert!(failed[0].1.starts_with("ReplyTooLarge"), "{failed:?}");
        for (id, what) in &outcomes {
            if *id != 20 {
                assert_eq!(what, &format!("reply m{id}"));
            }
        }
        assert!(!runner.is_finished(), "the connection goes on");
        drop(tx);
        runner.abort();
    }
}
