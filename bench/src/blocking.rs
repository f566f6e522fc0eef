//! The blocking load shape of issue 16: how a per-host proxy is called by many Python
//! processes, each a blocking client with one call outstanding on its own connection.
//!
//! N OS threads, each with its own `std::os::unix::net::UnixStream` (blocking), run a closed
//! loop of one call at a time: write the whole call frame, read until the whole reply is in,
//! check it (a REPLY with the seqid sent), send the next. No runtime, no pipelining, no
//! batching: every call costs the client one `write` and (usually) one `read`, and the path
//! under test sees one small frame per wakeup on every connection.
//!
//! Like [`crate::load`], replies count only inside the window, latencies (write to whole
//! reply) go into an `hdrhistogram` per thread, and the CPU seconds of the watched process
//! groups and of this process are read right before and right after the window.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::load::{CONNECT_TIMEOUT, ConnStats, Outcome, Watched, Window, histogram};
use crate::procs;
use crate::wire;

/// Phase: connected, waiting for the start.
const WAITING: u8 = 0;
/// Phase: calls flow, replies are not counted yet.
const WARMUP: u8 = 1;
/// Phase: replies are counted.
const MEASURE: u8 = 2;
/// Phase: the window is over (or the run was abandoned): threads leave.
const DONE: u8 = 3;

/// Longest wait for one reply: a path that stops answering breaks the connection instead
/// of hanging the run.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Stack of a client thread (it holds one frame and one read buffer).
const STACK: usize = 256 * 1024;

/// What to send, where, and from how many threads.
#[derive(Debug, Clone)]
pub struct BlockingLoad {
    /// The unix socket to call.
    pub socket: PathBuf,
    /// Client threads, each on its own connection with one call outstanding.
    pub threads: usize,
    /// Message name: `echo:ping` through a proxy, `ping` direct.
    pub name: String,
    /// Bytes of the string argument (field 1).
    pub payload: usize,
}

/// The start signal the client threads wait on once connected.
#[derive(Default)]
struct Start {
    phase: AtomicU8,
    lock: Mutex<()>,
    cond: Condvar,
}

// === impl Start ===

impl Start {
    fn set(&self, phase: u8) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.phase.store(phase, Ordering::Relaxed);
        self.cond.notify_all();
    }

    /// Blocks until the phase leaves [`WAITING`]; returns it.
    fn wait(&self) -> u8 {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let phase = self.phase.load(Ordering::Relaxed);
            if phase != WAITING {
                return phase;
            }
            guard = self.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }
}

/// Runs `load` for `window.warmup + window.window` on OS threads and measures the window.
/// Blocks the calling thread (call it from `spawn_blocking` inside a runtime).
///
/// # Errors
/// When no connection at all could be opened, or a client thread cannot be started.
pub fn run(load: &BlockingLoad, window: Window, watched: &[Watched]) -> anyhow::Result<Outcome> {
    // Read the clock tick rate (a `getconf` child) before any client thread blocks.
    let _ = procs::self_cpu();
    let start = Arc::new(Start::default());
    let (ready_tx, ready_rx) = mpsc::channel::<bool>();
    let mut frame = wire::echo_call(&load.name, 0, load.payload);
    let seqid_at = wire::header(&frame)
        .map(|h| h.body_at - 4)
        .unwrap_or_default();
    frame.shrink_to_fit();
    let mut threads = Vec::with_capacity(load.threads);
    for i in 0..load.threads.max(1) {
        let client = Client {
            socket: load.socket.clone(),
            frame: frame.clone(),
            seqid_at,
            start: start.clone(),
        };
        let ready = ready_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("blocking-{i}"))
            .stack_size(STACK)
            .spawn(move || client.run(&ready));
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                start.set(DONE);
                bail!("start client thread: {e}");
            }
        }
    }
    drop(ready_tx);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut connected = 0;
    for _ in 0..threads.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match ready_rx.recv_timeout(left) {
            Ok(true) => connected += 1,
            Ok(false) => {}
            Err(_) => break,
        }
    }
    if connected == 0 {
        start.set(DONE);
        for t in threads {
            let _ = t.join();
        }
        bail!("no connection to {} could be opened", load.socket.display());
    }
    start.set(WARMUP);
    std::thread::sleep(window.warmup);

    let groups: Vec<u32> = watched.iter().map(|w| w.pgid).collect();
    let machine_before = procs::machine_cpu();
    let cpu_before = procs::group_cpu(&groups);
    let client_before = procs::self_cpu();
    start.set(MEASURE);
    let started = Instant::now();
    std::thread::sleep(window.window);
    start.set(DONE);
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = procs::group_cpu(&groups);
    let client_cpu = procs::self_cpu() - client_before;
    let machine = procs::machine_cpu().since(&machine_before);

    let mut outcome = Outcome {
        calls: 0,
        errors: 0,
        first_error: None,
        seconds,
        latency: histogram(),
        per_connection: Vec::with_capacity(threads.len()),
        broken: 0,
        cpu: cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|(a, b)| (a - b).max(0.0))
            .collect(),
        client_cpu,
        machine,
    };
    for t in threads {
        let Ok(stats) = t.join() else {
            bail!("a client thread panicked");
        };
        outcome.absorb(stats);
    }
    Ok(outcome)
}

/// One blocking client: a thread, a connection, one call at a time.
struct Client {
    socket: PathBuf,
    /// The whole call frame; only its seqid changes.
    frame: Vec<u8>,
    seqid_at: usize,
    start: Arc<Start>,
}

// === impl Client ===

impl Client {
    fn run(mut self, ready: &mpsc::Sender<bool>) -> ConnStats {
        let mut stats = ConnStats {
            calls: 0,
            errors: 0,
            first_error: None,
            latency: histogram(),
            broken: false,
        };
        let stream = UnixStream::connect(&self.socket).and_then(|s| {
            s.set_read_timeout(Some(REPLY_TIMEOUT))?;
            s.set_write_timeout(Some(REPLY_TIMEOUT))?;
            Ok(s)
        });
        let _ = ready.send(stream.is_ok());
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                stats.first_error = Some(format!("connect: {e}"));
                stats.broken = true;
                return stats;
            }
        };
        if self.start.wait() == DONE {
            return stats;
        }
        if let Err(e) = self.drive(&mut stream, &mut stats) {
            stats.broken = true;
            stats
                .first_error
                .get_or_insert_with(|| format!("connection broke: {e}"));
        }
        stats
    }

    /// The closed loop, until the window is over.
    fn drive(&mut self, stream: &mut UnixStream, stats: &mut ConnStats) -> std::io::Result<()> {
        let mut buf = vec![0u8; 4096];
        // Bytes in `buf` not consumed yet (a reply is expected alone, but do not rely on it).
        let mut have = 0usize;
        let mut seqid: i32 = 0;
        loop {
            seqid = if seqid == i32::MAX { 1 } else { seqid + 1 };
            self.frame[self.seqid_at..self.seqid_at + 4].copy_from_slice(&seqid.to_be_bytes());
            let sent = Instant::now();
            stream.write_all(&self.frame)?;
            let (len, ok) = loop {
                let total = match wire::frame_len(&buf[..have]) {
                    Some(total) if have >= total => total,
                    Some(total) => {
                        if total > buf.len() {
                            buf.resize(total, 0);
                        }
                        read_more(stream, &mut buf, &mut have)?;
                        continue;
                    }
                    None => {
                        read_more(stream, &mut buf, &mut have)?;
                        continue;
                    }
                };
                let frame = &buf[..total];
                match wire::header(frame) {
                    Some(h) if h.message_type == rpc_frame::MessageType::Heartbeat.as_u8() => {
                        consume(&mut buf, &mut have, total);
                    }
                    Some(h)
                        if h.message_type == rpc_frame::MessageType::Reply.as_u8()
                            && h.seqid == seqid =>
                    {
                        break (total, true);
                    }
                    Some(h) if h.message_type == rpc_frame::MessageType::Reply.as_u8() => {
                        stats.first_error.get_or_insert_with(|| {
                            format!("reply with seqid {} to call {seqid}", h.seqid)
                        });
                        break (total, false);
                    }
                    _ => {
                        stats
                            .first_error
                            .get_or_insert_with(|| wire::describe_failure(frame));
                        break (total, false);
                    }
                }
            };
            let now = Instant::now();
            consume(&mut buf, &mut have, len);
            match self.start.phase() {
                MEASURE if ok => {
                    stats.calls += 1;
                    stats
                        .latency
                        .saturating_record(now.duration_since(sent).as_nanos() as u64);
                }
                MEASURE => stats.errors += 1,
                DONE => return Ok(()),
                _ => {}
            }
        }
    }
}

/// One `read` into the free part of `buf`. A signal interrupts a read with a timeout
/// (`SO_RCVTIMEO` reads are not restarted, e.g. on the SIGCHLD of a helper the harness ran):
/// read again.
fn read_more(stream: &mut UnixStream, buf: &mut [u8], have: &mut usize) -> std::io::Result<()> {
    loop {
        match stream.read(&mut buf[*have..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                *have += n;
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Drops the first `len` bytes of `buf[..have]`.
fn consume(buf: &mut [u8], have: &mut usize, len: usize) {
    buf.copy_within(len..*have, 0);
    *have -= len;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_call_frame_of_issue_16() {
        // `echo:ping` with a 70-byte string as field 1: the length prefix, a strict header
        // (version, name, seqid), the field and the STOP byte.
        let frame = wire::echo_call("echo:ping", 0, 70);
        assert_eq!(frame.len(), 4 + 4 + 4 + 9 + 4 + 7 + 70 + 1);
        let h = wire::header(&frame).unwrap();
        assert_eq!(h.body_at - 4, 21);
    }
}
