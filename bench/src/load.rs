//! The load generator: a closed loop over N unix-socket connections, each keeping `depth`
//! `echo` calls in flight (pipelining), with a fixed warm-up and measuring window.
//!
//! Each connection owns `depth` slots; a slot holds one outstanding call, whose seqid names
//! the slot, so replies may come back in any order (the LB's front answers in completion
//! order). When a reply arrives its slot sends the next call at once. Writes are vectored
//! (`head | shared payload | STOP` per call, no copy of the payload) and run concurrently
//! with reads, so large bodies cannot deadlock the pipe.
//!
//! Latencies (send to reply) go into an `hdrhistogram` per connection, merged at the end;
//! only replies that arrive inside the window count. The CPU seconds of every watched
//! process group are read right before and right after the window.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::procs;
use crate::wire::{self, CallHead};

/// Phase: replies are not counted yet.
const WARMUP: u8 = 0;
/// Phase: replies are counted.
const MEASURE: u8 = 1;
/// Phase: the window is over.
const DONE: u8 = 2;

/// Seqids cycle through this many generations per slot (keeps them positive).
const GENERATIONS: i64 = 1 << 20;

/// Longest wait for all connections to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to send, where, and how hard.
#[derive(Debug, Clone)]
pub struct Load {
    /// The unix socket to call.
    pub socket: PathBuf,
    /// Client connections.
    pub connections: usize,
    /// Calls in flight per connection.
    pub depth: usize,
    /// Message name: `echo:echo` (multiplexed) or `echo`.
    pub name: String,
    /// Bytes of the string argument.
    pub payload: usize,
}

/// How long to warm up and measure.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Load before counting starts.
    pub warmup: Duration,
    /// The measuring window.
    pub window: Duration,
}

/// A process group whose CPU time is measured over the window.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Label in the results (`proxy`, `haproxy`, ...).
    pub label: String,
    /// Process group id (the leader's pid).
    pub pgid: u32,
}

/// What one run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Replies (not errors) received in the window.
    pub calls: u64,
    /// Error replies (exceptions, unexpected types) received in the window.
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Window length, seconds.
    pub seconds: f64,
    /// Latency of the counted calls, nanoseconds.
    pub latency: Histogram<u64>,
    /// Replies per connection in the window (0: that client was starved).
    pub per_connection: Vec<u64>,
    /// Connections that could not be opened or broke.
    pub broken: usize,
    /// CPU seconds per watched group in the window, in the order given.
    pub cpu: Vec<f64>,
    /// CPU seconds of this process (the client) in the window.
    pub client_cpu: f64,
    /// CPU seconds the whole machine spent busy, and stolen by the hypervisor, in the window.
    pub machine: procs::MachineCpu,
}

// === impl Outcome ===

impl Outcome {
    /// Adds one connection's results.
    pub(crate) fn absorb(&mut self, stats: ConnStats) {
        self.calls += stats.calls;
        self.errors += stats.errors;
        self.per_connection.push(stats.calls);
        self.broken += usize::from(stats.broken);
        if self.first_error.is_none() {
            self.first_error = stats.first_error;
        }
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&stats.latency);
    }

    /// Calls per second.
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    /// A latency percentile in microseconds.
    pub fn percentile_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Connections with at least one reply in the window.
    pub fn served(&self) -> usize {
        self.per_connection.iter().filter(|c| **c > 0).count()
    }
}

/// Per-connection results (of an async connection here, of a blocking client thread in
/// [`crate::blocking`]).
pub(crate) struct ConnStats {
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) latency: Histogram<u64>,
    pub(crate) broken: bool,
}

/// An empty latency histogram (nanoseconds).
pub fn histogram() -> Histogram<u64> {
    // 1 us .. 100 s at 2 significant digits: small enough for hundreds of connections.
    Histogram::new_with_bounds(1_000, 100_000_000_000, 2).expect("static histogram bounds")
}

/// Runs `load` for `window.warmup + window.window` and measures the window.
///
/// # Errors
/// When no connection at all could be opened.
pub async fn run(load: &Load, window: Window, watched: &[Watched]) -> anyhow::Result<Outcome> {
    run_until(load, window, watched, CancellationToken::new()).await
}

/// [`run`], ending the window early when `cancel` fires.
///
/// # Errors
/// When no connection at all could be opened.
pub async fn run_until(
    load: &Load,
    window: Window,
    watched: &[Watched],
    cancel: CancellationToken,
) -> anyhow::Result<Outcome> {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let stop = CancellationToken::new();
    let go = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(load.connections.max(1));
    let payload: Arc<[u8]> = wire::payload(load.payload).into();
    let mut tasks = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        let conn = Conn {
            socket: load.socket.clone(),
            depth: load.depth.max(1),
            head: CallHead::new(&load.name, load.payload),
            payload: payload.clone(),
            phase: phase.clone(),
        };
        tasks.push(tokio::spawn(conn.run(
            ready_tx.clone(),
            go.clone(),
            stop.clone(),
        )));
    }
    drop(ready_tx);
    let mut connected = 0;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    for _ in 0..load.connections {
        if let Ok(Some(true)) = tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            connected += 1;
        }
    }
    if connected == 0 {
        stop.cancel();
        bail!("no connection to {} could be opened", load.socket.display());
    }
    go.cancel();
    tokio::time::sleep(window.warmup).await;

    let groups: Vec<u32> = watched.iter().map(|w| w.pgid).collect();
    let machine_before = procs::machine_cpu();
    let cpu_before = procs::group_cpu(&groups);
    let client_before = procs::self_cpu();
    phase.store(MEASURE, Ordering::Relaxed);
    let started = Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(window.window) => {}
        _ = cancel.cancelled() => {}
    }
    phase.store(DONE, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = procs::group_cpu(&groups);
    let client_cpu = procs::self_cpu() - client_before;
    let machine = procs::machine_cpu().since(&machine_before);
    stop.cancel();

    let mut outcome = Outcome {
        calls: 0,
        errors: 0,
        first_error: None,
        seconds,
        latency: histogram(),
        per_connection: Vec::with_capacity(load.connections),
        broken: 0,
        cpu: cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|(a, b)| (a - b).max(0.0))
            .collect(),
        client_cpu,
        machine,
    };
    for task in tasks {
        let stats = match task.await {
            Ok(stats) => stats,
            Err(e) => bail!("load task failed: {e}"),
        };
        outcome.absorb(stats);
    }
    Ok(outcome)
}

// === impl Conn ===

/// One client connection of the load generator.
struct Conn {
    socket: PathBuf,
    depth: usize,
    head: CallHead,
    payload: Arc<[u8]>,
    phase: Arc<AtomicU8>,
}

/// A call (or the rest of one) waiting to be written: its slot and how much is written.
#[derive(Clone, Copy)]
struct Queued {
    slot: usize,
    written: usize,
}

impl Conn {
    async fn run(
        self,
        ready: mpsc::Sender<bool>,
        go: CancellationToken,
        stop: CancellationToken,
    ) -> ConnStats {
        let mut stats = ConnStats {
            calls: 0,
            errors: 0,
            first_error: None,
            latency: histogram(),
            broken: false,
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => None,
            s = UnixStream::connect(&self.socket) => s.ok(),
        };
        let _ = ready.send(stream.is_some()).await;
        drop(ready);
        let Some(stream) = stream else {
            stats.broken = true;
            return stats;
        };
        tokio::select! {
            _ = stop.cancelled() => return stats,
            _ = go.cancelled() => {}
        }
        let (reader, writer) = stream.into_split();
        if !self.drive(reader, writer, &stop, &mut stats).await {
            stats.broken = !stop.is_cancelled();
        }
        stats
    }

    /// The closed loop. Returns false when the connection broke.
    async fn drive(
        &self,
        mut reader: OwnedReadHalf,
        mut writer: OwnedWriteHalf,
        stop: &CancellationToken,
        stats: &mut ConnStats,
    ) -> bool {
        let depth = self.depth;
        let mut heads: Vec<CallHead> = vec![self.head.clone(); depth];
        let mut generation = vec![0i64; depth];
        let mut sent_at = vec![Instant::now(); depth];
        let mut queue: VecDeque<Queued> = VecDeque::with_capacity(depth);
        let call_len = self.head.bytes.len() + self.payload.len() + wire::TRAILER.len();
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        let now = Instant::now();
        for slot in 0..depth {
            heads[slot].set_seqid(slot as i32);
            sent_at[slot] = now;
            queue.push_back(Queued { slot, written: 0 });
        }
        loop {
            let writing = !queue.is_empty();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return true,
                read = reader.read_buf(&mut rbuf) => {
                    match read {
                        Ok(0) | Err(_) => return false,
                        Ok(_) => {}
                    }
                    let now = Instant::now();
                    let measuring = self.phase.load(Ordering::Relaxed);
                    while let Some(total) = wire::frame_len(&rbuf) {
                        if rbuf.len() < total {
                            rbuf.reserve(total - rbuf.len());
                            break;
                        }
                        let frame = rbuf.split_to(total);
                        let Some(h) = wire::header(&frame) else {
                            stats.first_error.get_or_insert_with(|| wire::describe_failure(&frame));
                            return false;
                        };
                        if h.message_type == rpc_frame::MessageType::Heartbeat.as_u8() {
                            continue;
                        }
                        let slot = (h.seqid.max(0) as usize) % depth;
                        let ok = h.message_type == rpc_frame::MessageType::Reply.as_u8();
                        if measuring == MEASURE {
                            if ok {
                                stats.calls += 1;
                                let ns = now.duration_since(sent_at[slot]).as_nanos() as u64;
                                stats.latency.saturating_record(ns);
                            } else {
                                stats.errors += 1;
                            }
                        }
                        if !ok && stats.first_error.is_none() {
                            stats.first_error = Some(wire::describe_failure(&frame));
                        }
                        if measuring == DONE {
                            continue;
                        }
                        generation[slot] = (generation[slot] + 1) % GENERATIONS;
                        let seqid = generation[slot] * depth as i64 + slot as i64;
                        heads[slot].set_seqid(seqid as i32);
                        sent_at[slot] = now;
                        queue.push_back(Queued { slot, written: 0 });
                    }
                    if rbuf.capacity() - rbuf.len() < 1024 {
                        rbuf.reserve(64 * 1024);
                    }
                }
                wrote = write_some(&mut writer, &queue, &heads, &self.payload), if writing => {
                    let Ok(mut n) = wrote else { return false };
                    while n > 0 {
                        let Some(front) = queue.front_mut() else { break };
                        let left = call_len - front.written;
                        if n >= left {
                            n -= left;
                            queue.pop_front();
                        } else {
                            front.written += n;
                            n = 0;
                        }
                    }
                }
            }
        }
    }
}

/// Most slices handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Writes as much of the queued calls as the socket takes in one vectored write.
async fn write_some(
    writer: &mut OwnedWriteHalf,
    queue: &VecDeque<Queued>,
    heads: &[CallHead],
    payload: &[u8],
) -> std::io::Result<usize> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_SLICES);
    for q in queue {
        if slices.len() + 3 > MAX_SLICES {
            break;
        }
        let head = &heads[q.slot].bytes;
        let mut skip = q.written;
        for part in [head.as_slice(), payload, &wire::TRAILER] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices.push(IoSlice::new(&part[skip..]));
            skip = 0;
        }
    }
    let n = writer.write_vectored(&slices).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

/// Sends one `echo` call on a fresh connection and reads its answer: `Ok(())` for a
/// REPLY, or the failure described; all within `timeout`.
///
/// # Errors
/// When the socket cannot be reached, breaks, or times out.
pub async fn call_once(
    socket: &std::path::Path,
    name: &str,
    payload: usize,
    timeout: Duration,
) -> anyhow::Result<Result<(), String>> {
    let attempt = async {
        let mut stream = UnixStream::connect(socket).await?;
        let mut frames = FrameReader::default();
        call_on(&mut stream, &mut frames, name, 1, payload).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("no reply within {timeout:?}"),
    }
}

/// Sends one `echo` call on `stream` and reads its answer: `Ok(())` for a REPLY, or the
/// failure described.
///
/// # Errors
/// When the stream breaks.
pub async fn call_on(
    stream: &mut UnixStream,
    frames: &mut FrameReader,
    name: &str,
    seqid: i32,
    payload: usize,
) -> std::io::Result<Result<(), String>> {
    stream
        .write_all(&wire::echo_call(name, seqid, payload))
        .await?;
    let frame = frames.next(stream).await?;
    Ok(reply_or_failure(&frame))
}

/// `Ok(())` for a REPLY frame, or the failure described.
pub fn reply_or_failure(frame: &[u8]) -> Result<(), String> {
    match wire::header(frame) {
        Some(h) if h.message_type == rpc_frame::MessageType::Reply.as_u8() => Ok(()),
        _ => Err(wire::describe_failure(frame)),
    }
}

/// Cuts whole frames out of a stream, keeping what was read past the last one.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    /// Reads the next whole frame.
    ///
    /// # Errors
    /// On EOF or a read error.
    pub async fn next(&mut self, stream: &mut UnixStream) -> std::io::Result<BytesMut> {
        loop {
            if let Some(total) = wire::frame_len(&self.buf)
                && self.buf.len() >= total
            {
                return Ok(self.buf.split_to(total));
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}
