//! The worker runtime between the LB's socket and the handler: dials the LB, sends HELLO,
//! reads frames (echoing pings at once, from whichever thread reads), runs calls on
//! `pool_size` pool threads, writes their replies, stops gracefully (STOP, wait for
//! STOP_CONFIRM, finish and flush held calls) and reconnects with backoff when the LB goes
//! away.
//!
//! Pure Rust and generic over a [`Handler`]: the Python extension ([`crate::python`]) plugs in a
//! handler that runs a Thrift processor, the unit tests a Rust one. The decisions themselves
//! live in [`crate::protocol`].
//!
//! # Threads
//! - `pool_size` *pool threads* run the handler. A pool thread with nothing to run becomes
//!   the connection's *reader* (leader/follower): it reads frames, echoes pings, and takes the
//!   first call it reads for itself, so a call costs no hand-off between threads (no futex
//!   wake-up, no context switch). Further calls read in the same batch are queued for the other
//!   pool threads, and the next idle one takes over reading.
//! - The *connection thread* ([`Engine::run`]'s thread) dials, sends HELLO and reconnects.
//!   While a connection is served it reads only when no pool thread has for a whole [`TICK`]
//!   (every one is busy in a handler), so pings are still echoed (within about two ticks,
//!   100 ms) and the end of the connection is still seen when every handler hangs (and, in
//!   Python, without the GIL).
//! - Whoever reads also runs the connection's decisions ([`crate::protocol::ConnState`]):
//!   STOP, the close once every held call is answered, the heartbeat timeout.
//! - A call is *held* from the moment it is read until its reply is written to the socket.
//! - Writes (pings, replies, STOP) share one writer under a mutex, one whole frame at a time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rpc_frame::{
    DEFAULT_MAX_FRAME_SIZE, ExceptionCode, Hello, LENGTH_PREFIX, Message, MessageType,
    application_exception, decode_frame,
};

use crate::protocol::{Action, Address, Backoff, Close, ConnState, End, Phase, Timings};
use crate::stream::{Stream, is_timeout};

/// How long one blocking read waits before the connection loop looks at the clock and the
/// stop request again.
const TICK: Duration = Duration::from_millis(50);

/// A write that makes no progress for this long means the LB stopped reading: the connection
/// is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// After shutting down its write side, the worker reads (and discards) until the LB closes,
/// at most this long, so that nothing it wrote is cut off by a reset.
const LINGER: Duration = Duration::from_millis(500);

/// A connection that lived at least this long resets the reconnect backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(2);

/// Bytes read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// Frames of an ignored type logged at warning level per connection; later ones at debug.
const IGNORED_WARNINGS: u32 = 10;

/// Everything the engine needs to know; [`Config::new`] gives the defaults of CONTRACT
/// section 4.
#[derive(Debug, Clone)]
pub struct Config {
    /// The LB's `back_address`.
    pub address: Address,
    /// Calls run at once (pool threads).
    pub pool_size: usize,
    /// The service served (logs and HELLO).
    pub service: Option<String>,
    /// Largest frame read from or written to the LB.
    pub max_frame_size: usize,
    /// Heartbeat timeout, STOP_CONFIRM wait and stop grace.
    pub timings: Timings,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Longest TCP connect attempt.
    pub connect_timeout: Duration,
}

impl Config {
    /// Defaults: 16384000-byte frames, 6 s heartbeat timeout, 1.5 s STOP_CONFIRM wait, 15 s
    /// stop grace, reconnects backing off from 100 ms to 5 s.
    pub fn new(address: Address, pool_size: usize) -> Self {
        Self {
            address,
            pool_size,
            service: None,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            timings: Timings::default(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Severity of a log line (maps onto Python's `logging` levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Per-event detail.
    Debug,
    /// State changes: connected, stopping, stopped.
    Info,
    /// Something went wrong and was handled (reconnecting, a bad frame).
    Warning,
    /// Something could not be handled.
    Error,
}

impl Level {
    /// The numeric level of Python's `logging` module.
    pub fn python_level(self) -> i32 {
        match self {
            Self::Debug => 10,
            Self::Info => 20,
            Self::Warning => 30,
            Self::Error => 40,
        }
    }
}

/// Where the engine's log lines go. Called from the engine's threads; the reader may hold the
/// uncontended lock of the connection's read side.
pub trait LogSink: Send + Sync {
    /// Records one line.
    fn log(&self, level: Level, message: String);
}

/// What the handler made of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The reply message as the processor wrote it, **without** the length prefix.
    Reply(Vec<u8>),
    /// Nothing was written (a ONEWAY call).
    NoReply,
    /// The handler machinery failed; the text (e.g. `ValueError: boom`) becomes a code-6
    /// `TApplicationException` for a CALL.
    Failed(String),
}

/// Runs calls. Implemented by the Python extension (a Thrift processor) and by tests.
pub trait Handler: Send + Sync + 'static {
    /// Runs one CALL or ONEWAY message (whole frame, header parsed) on a pool thread.
    fn handle(&self, request: &Message) -> Outcome;

    /// Wraps the whole life of a pool thread; `body` returns when the engine winds down.
    /// The Python handler attaches to the interpreter once here, so a handler's thread-local
    /// state (`threading.local`, e.g. a database connection) lives across calls.
    fn pool_thread(&self, body: &mut dyn FnMut()) {
        body();
    }

    /// Wraps a pool thread's blocking work between calls (writing a reply, waiting for a call,
    /// reading the socket when it is the reader). The Python handler releases the GIL here.
    fn blocking<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        f()
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// === StopSignal ===

/// The stop request shared by `stop()` callers and the engine; remembers when it came.
#[derive(Debug, Default)]
pub struct StopSignal {
    /// When stop was first requested.
    at: Mutex<Option<Instant>>,
    /// Wakes backoff sleeps.
    changed: Condvar,
}

impl StopSignal {
    /// No stop requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests a graceful stop; idempotent, callable from any thread.
    pub fn stop(&self) {
        let mut at = lock(&self.at);
        if at.is_none() {
            *at = Some(Instant::now());
        }
        self.changed.notify_all();
    }

    /// When stop was first requested, if it was.
    pub fn requested_at(&self) -> Option<Instant> {
        *lock(&self.at)
    }

    /// Whether stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested_at().is_some()
    }

    /// Sleeps up to `timeout`, waking early on a stop request. Returns whether stop was
    /// requested.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut at = lock(&self.at);
        while at.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            at = self
                .changed
                .wait_timeout(at, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

// === Conn ===

/// The write side of one LB connection, shared by the connection loop and the pool threads.
#[derive(Debug)]
struct Conn {
    /// Whole frames are written under this lock.
    writer: Mutex<Stream>,
    /// Shuts the socket down without the writer lock (a writer may be blocked in `write`).
    control: Stream,
    /// Set once a write failed or the connection was given up: later writes are skipped.
    broken: AtomicBool,
    /// Calls read and not yet answered (reply written, or found to need none).
    held: AtomicUsize,
}

impl Conn {
    fn new(writer: Stream, control: Stream) -> Self {
        Self {
            writer: Mutex::new(writer),
            control,
            broken: AtomicBool::new(false),
            held: AtomicUsize::new(0),
        }
    }

    /// Writes one whole frame; `false` if the connection is (or just became) broken.
    fn send(&self, frame: &[u8]) -> bool {
        if self.is_broken() {
            return false;
        }
        let mut writer = lock(&self.writer);
        match writer.write_all(frame).and_then(|()| writer.flush()) {
            Ok(()) => true,
            Err(_) => {
                drop(writer);
                self.kill();
                false
            }
        }
    }

    /// Gives the connection up: no more writes, and blocked readers and writers wake.
    fn kill(&self) {
        self.broken.store(true, Ordering::SeqCst);
        self.control.shutdown(Shutdown::Both);
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn hold(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
    }

    fn release(&self) {
        self.held.fetch_sub(1, Ordering::SeqCst);
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

// === Queue ===

/// A call waiting for a pool thread, with the connection its reply goes to.
struct Job {
    /// The CALL or ONEWAY message.
    message: Message,
    /// Where the reply goes (a reconnect makes a new one; late replies to an old one are
    /// dropped).
    conn: Arc<Conn>,
}

/// The calls waiting for a pool thread, and who reads the connection next. Unbounded on
/// purpose: the reader must never block (pings), and the LB bounds what it sends to the
/// capacity announced in HELLO.
///
/// Wake-ups are the worker's main cost besides Python (a futex call each, and a context
/// switch): a condvar is signalled only when a thread sleeps on it, and never with the lock
/// held on the hot path (the woken thread would block on the mutex at once).
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// A job arrived, the reader role came free, a connection began, or the queue closed.
    ready: Condvar,
    /// A pool thread finished a job while [`Queue::wait_idle`] waits.
    idle: Condvar,
    /// The connection ended (for the connection thread in [`Queue::watch`]).
    io: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Jobs taken by pool threads and not finished.
    busy: usize,
    /// Pool threads waiting on `ready`.
    sleeping: usize,
    /// Someone waits on `idle`.
    draining: bool,
    /// The connection being served, while it is.
    session: Option<Arc<Session>>,
    /// Some thread is reading the session (at most one does).
    reading: bool,
    /// Turns taken at reading by pool threads; the connection thread reads only after a
    /// whole [`TICK`] without one.
    turns: u64,
    /// How the session ended, for the connection thread.
    ended: Option<End>,
}

/// What one turn at reading gave.
enum Step {
    /// Nothing to run (a timeout tick, pings, or calls queued for others).
    Idle,
    /// A call the reader took for itself.
    Claimed(Job),
    /// The connection is over.
    Ended(End),
}

impl Queue {
    fn push(&self, job: Job) {
        let wake = {
            let mut state = lock(&self.state);
            if state.closed {
                drop(state);
                job.conn.release();
                return;
            }
            state.jobs.push_back(job);
            state.sleeping > 0
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// Starts serving `session`: the idle pool threads compete to read it.
    fn attach(&self, session: Arc<Session>) {
        let mut state = lock(&self.state);
        state.session = Some(session);
        state.ended = None;
        state.reading = false;
        drop(state);
        self.ready.notify_all();
    }

    /// Records the end of the session (under the lock).
    fn end_session(&self, state: &mut QueueState, end: End) {
        state.session = None;
        state.ended = Some(end);
        self.io.notify_all();
    }

    /// The next job for a pool thread, blocking; `None` once the queue is closed. `finished`
    /// says the caller just finished the job it took before (one lock for both). With no job
    /// waiting and nobody reading, the caller reads the connection itself.
    fn next(&self, finished: bool) -> Option<Job> {
        let mut state = lock(&self.state);
        if finished {
            state.busy -= 1;
            if state.draining {
                self.idle.notify_all();
            }
        }
        loop {
            if state.closed {
                return None;
            }
            if let Some(job) = state.jobs.pop_front() {
                state.busy += 1;
                return Some(job);
            }
            if let (false, Some(session)) = (state.reading, state.session.clone()) {
                state.turns += 1;
                let claimed;
                (state, claimed) = self.read_turn(state, &session, true);
                if let Some(job) = claimed {
                    state.busy += 1;
                    let hand_over = state.sleeping > 0;
                    drop(state);
                    if hand_over {
                        self.ready.notify_one();
                    }
                    return Some(job);
                }
                // Still this thread's turn (unless the session ended): the loop holds the
                // lock, so nobody else saw the role free.
                continue;
            }
            state.sleeping += 1;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.sleeping -= 1;
        }
    }

    /// The connection thread's part while `session` is served: it reads whenever no pool
    /// thread has for a whole [`TICK`] (all busy in handlers); returns how the session ended.
    fn watch(&self, session: &Session) -> End {
        let mut state = lock(&self.state);
        let mut seen_turns = state.turns;
        loop {
            if let Some(end) = state.ended.take() {
                return end;
            }
            if state.reading || state.sleeping > 0 || state.turns != seen_turns {
                if !state.reading && state.sleeping > 0 {
                    // The role is free and a pool thread waits: it should be reading.
                    self.ready.notify_one();
                }
                seen_turns = state.turns;
                state = self
                    .io
                    .wait_timeout(state, TICK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            // The connection thread never claims a call: it cannot run handlers.
            (state, _) = self.read_turn(state, session, false);
            seen_turns = state.turns;
            if state.sleeping > 0 {
                self.ready.notify_one();
            }
        }
    }

    /// Takes the reader role for one [`Session::turn`] (without the lock held while it reads);
    /// records the end of the session if the turn saw it. Returns the lock again and the call
    /// claimed, if `claim` and one was read.
    fn read_turn<'a>(
        &'a self,
        mut state: MutexGuard<'a, QueueState>,
        session: &Session,
        claim: bool,
    ) -> (MutexGuard<'a, QueueState>, Option<Job>) {
        state.reading = true;
        drop(state);
        let step = session.turn(self, claim);
        let mut state = lock(&self.state);
        state.reading = false;
        match step {
            Step::Idle => (state, None),
            Step::Claimed(job) => (state, Some(job)),
            Step::Ended(end) => {
                self.end_session(&mut state, end);
                (state, None)
            }
        }
    }

    /// Closes the queue (pool threads exit after their current job) and drops waiting jobs.
    fn close(&self) {
        let jobs = {
            let mut state = lock(&self.state);
            state.closed = true;
            std::mem::take(&mut state.jobs)
        };
        self.ready.notify_all();
        for job in jobs {
            job.conn.release();
        }
    }

    /// Waits until no job runs or `deadline` passes; returns the jobs still running.
    fn wait_idle(&self, deadline: Instant) -> usize {
        let mut state = lock(&self.state);
        state.draining = true;
        while state.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .idle
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.busy
    }
}

// === replies ===

/// What to write for a finished call, and what to log about it.
#[derive(Debug, Default)]
pub struct ReplyPlan {
    /// The whole frame to write (length prefix included), if any.
    pub frame: Option<BytesMut>,
    /// A line worth logging.
    pub note: Option<(Level, String)>,
}

/// Decides what goes back to the LB for `request` given the handler's `outcome`.
///
/// - CALL: the processor's reply with a length prefix; a code-6 `TApplicationException` with
///   the request's name and seqid if the handler failed, wrote nothing, or wrote more than
///   `max_frame_size` (the LB would drop the connection, and every call on it, over one
///   oversized frame).
/// - ONEWAY: nothing, ever (an answer would be read as the reply to another call).
pub fn plan_reply(request: &Message, outcome: Outcome, max_frame_size: usize) -> ReplyPlan {
    let name = request.name();
    let seqid = request.seqid();
    let failure =
        |text: String| application_exception(name, seqid, ExceptionCode::InternalError, &text);
    if request.message_type() == MessageType::Oneway {
        let note = match outcome {
            Outcome::Failed(text) => {
                Some((Level::Warning, format!("oneway {name} failed: {text}")))
            }
            Outcome::Reply(_) => Some((
                Level::Debug,
                format!("oneway {name}: the processor wrote a reply; not sent"),
            )),
            Outcome::NoReply => None,
        };
        return ReplyPlan { frame: None, note };
    }
    match outcome {
        Outcome::Reply(payload) if payload.len() > max_frame_size => {
            let text = format!(
                "the reply to {name} is {} bytes, over the maximum frame size of {max_frame_size}",
                payload.len()
            );
            ReplyPlan {
                frame: Some(failure(text.clone())),
                note: Some((Level::Error, text)),
            }
        }
        Outcome::Reply(payload) => {
            let mut frame = BytesMut::with_capacity(LENGTH_PREFIX + payload.len());
            // Bounded by max_frame_size above, which is far below 4 GiB.
            frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            frame.put_slice(&payload);
            ReplyPlan {
                frame: Some(frame),
                note: None,
            }
        }
        Outcome::NoReply => {
            let text = format!("the processor wrote no reply to {name}");
            ReplyPlan {
                frame: Some(failure(text.clone())),
                note: Some((Level::Error, text)),
            }
        }
        Outcome::Failed(text) => ReplyPlan {
            frame: Some(failure(text)),
            note: None,
        },
    }
}

// === Engine ===

/// One worker: a connection loop and its pool threads.
pub struct Engine<H: Handler> {
    config: Config,
    handler: Arc<H>,
    log: Arc<dyn LogSink>,
    stop: Arc<StopSignal>,
}

impl<H: Handler> Engine<H> {
    /// An engine that stops when `stop` is signalled.
    pub fn new(config: Config, handler: H, log: Arc<dyn LogSink>, stop: Arc<StopSignal>) -> Self {
        Self {
            config,
            handler: Arc::new(handler),
            log,
            stop,
        }
    }

    fn log(&self, level: Level, message: String) {
        self.log.log(level, message);
    }

    /// Serves until stopped: connects, serves, reconnects with backoff; after a stop, waits
    /// (within the stop grace) for running handlers, then returns.
    pub fn run(&self) {
        let queue = Arc::new(Queue::default());
        let threads = self.spawn_pool(&queue);
        if threads.is_empty() {
            self.log(Level::Error, "no pool thread could be started".to_owned());
        } else {
            self.connect_loop(&queue);
        }
        queue.close();
        let started = self.stop.requested_at().unwrap_or_else(Instant::now);
        let busy = queue.wait_idle(started + self.config.timings.stop_grace);
        if busy > 0 {
            self.log(
                Level::Warning,
                format!("{busy} handler(s) still running after the stop grace; returning anyway"),
            );
        } else {
            for thread in threads {
                let _ = thread.join();
            }
        }
        self.log(Level::Info, "worker stopped".to_owned());
    }

    fn spawn_pool(&self, queue: &Arc<Queue>) -> Vec<JoinHandle<()>> {
        let mut threads = Vec::with_capacity(self.config.pool_size);
        for index in 0..self.config.pool_size {
            let handler = Arc::clone(&self.handler);
            let queue = Arc::clone(queue);
            let log = Arc::clone(&self.log);
            let max_frame_size = self.config.max_frame_size;
            let spawned = std::thread::Builder::new()
                .name(format!("rpc-worker-{index}"))
                .spawn(move || {
                    handler
                        .pool_thread(&mut || pool_loop(&*handler, &queue, &*log, max_frame_size));
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(err) => self.log(
                    Level::Error,
                    format!("cannot start pool thread {index}: {err}"),
                ),
            }
        }
        threads
    }

    /// Connects and serves until stopped, backing off between attempts.
    fn connect_loop(&self, queue: &Queue) {
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max, seed);
        let address = &self.config.address;
        let mut failures = 0u32;
        while !self.stop.is_requested() {
            match Stream::connect(address, self.config.connect_timeout) {
                Err(err) => {
                    failures += 1;
                    let level = if failures == 1 {
                        Level::Warning
                    } else {
                        Level::Debug
                    };
                    self.log(
                        level,
                        format!(
                            "cannot connect to the LB at {address}: {err}; retrying with backoff"
                        ),
                    );
                }
                Ok(stream) => {
                    if failures > 1 {
                        self.log(
                            Level::Info,
                            format!(
                                "the LB at {address} is reachable again after {failures} attempts"
                            ),
                        );
                    }
                    failures = 0;
                    let opened = Instant::now();
                    if self.serve(stream, queue) == End::Stopped {
                        return;
                    }
                    if opened.elapsed() >= BACKOFF_RESET_AFTER {
                        backoff.reset();
                    }
                }
            }
            let delay = backoff.next_delay();
            if failures == 0 {
                self.log(
                    Level::Info,
                    format!(
                        "reconnecting to the LB at {address} in {} ms",
                        delay.as_millis()
                    ),
                );
            }
            if self.stop.wait(delay) {
                return;
            }
        }
    }

    /// Serves one connection until it ends.
    fn serve(&self, stream: Stream, queue: &Queue) -> End {
        let address = &self.config.address;
        let conn = match open_conn(&stream) {
            Ok(conn) => Arc::new(conn),
            Err(err) => {
                self.log(
                    Level::Warning,
                    format!("cannot set up the connection to {address}: {err}"),
                );
                stream.shutdown(Shutdown::Both);
                return End::Reconnect;
            }
        };
        let pid = std::process::id();
        let hello = Hello {
            pool_size: i32::try_from(self.config.pool_size).unwrap_or(i32::MAX),
            pid: i32::try_from(pid).unwrap_or(0),
            service: self.config.service.clone().unwrap_or_default(),
        };
        if !conn.send(&hello.encode()) {
            self.log(
                Level::Warning,
                format!("the LB at {address} closed the connection before HELLO"),
            );
            return End::Reconnect;
        }
        self.log(
            Level::Info,
            format!(
                "connected to the LB at {address} (service {}, pool_size {}, pid {pid})",
                self.config.service.as_deref().unwrap_or("-"),
                self.config.pool_size
            ),
        );

        let session = Arc::new(Session {
            reading: Mutex::new(Reading {
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
                chunk: vec![0u8; READ_CHUNK],
                state: ConnState::new(Instant::now(), self.config.timings),
                ignored: 0,
            }),
            conn,
            stop: Arc::clone(&self.stop),
            log: Arc::clone(&self.log),
            max_frame_size: self.config.max_frame_size,
            timings: self.config.timings,
        });
        queue.attach(Arc::clone(&session));
        queue.watch(&session)
    }
}

// === Session ===

/// The read side of one connection: whoever holds it reads (one thread at a time, by
/// [`QueueState::reading`]).
struct Reading {
    /// The socket, with a [`TICK`] read timeout.
    stream: Stream,
    /// Bytes read and not yet cut into frames.
    buf: BytesMut,
    /// Scratch space for one read.
    chunk: Vec<u8>,
    /// The connection's decisions.
    state: ConnState,
    /// Frames of an ignored type seen so far.
    ignored: u32,
}

/// One connection to the LB while it is served, shared by the connection thread and the pool
/// threads.
struct Session {
    /// The write side, and the count of held calls.
    conn: Arc<Conn>,
    /// The read side; locked only by the thread whose turn it is.
    reading: Mutex<Reading>,
    /// The worker's stop request (turned into STOP by the reader).
    stop: Arc<StopSignal>,
    /// Where log lines go.
    log: Arc<dyn LogSink>,
    /// Largest frame accepted from the LB.
    max_frame_size: usize,
    /// For log lines about closes.
    timings: Timings,
}

impl Session {
    fn log(&self, level: Level, message: String) {
        self.log.log(level, message);
    }

    /// [`Session::step`], and a panic in it ends the connection (the worker reconnects)
    /// instead of the reading thread: otherwise the reader role would stay taken and nobody
    /// would read again.
    fn turn(&self, queue: &Queue, claim: bool) -> Step {
        catch_unwind(AssertUnwindSafe(|| self.step(queue, claim))).unwrap_or_else(|_| {
            self.conn.kill();
            self.log(
                Level::Error,
                "the worker runtime panicked while reading; reconnecting".to_owned(),
            );
            Step::Ended(End::Reconnect)
        })
    }

    /// One turn at reading: acts on a stop request, closes when the connection's decisions
    /// say so, reads once (at most [`TICK`]) and acts on every whole frame. With `claim`, the
    /// first call read is returned to run on this thread; others are queued.
    fn step(&self, queue: &Queue, claim: bool) -> Step {
        let conn = &self.conn;
        let mut reading = lock(&self.reading);
        let reading = &mut *reading;
        let now = Instant::now();
        // The stop grace counts from the request, not from this turn.
        let requested = self.stop.requested_at();
        if requested.is_some_and(|at| reading.state.begin_stop(at.min(now))) {
            self.log(
                Level::Info,
                format!(
                    "stopping: sent STOP to the LB; {} call(s) held",
                    conn.held()
                ),
            );
            if !conn.send(&rpc_frame::stop()) {
                self.log(
                    Level::Warning,
                    "could not send STOP: the connection to the LB is lost".to_owned(),
                );
                return Step::Ended(End::Stopped);
            }
        }
        if let Some(close) = reading.state.poll(now, conn.held()) {
            self.log_close(close, &reading.state);
            if close.is_graceful() {
                close_gracefully(&mut reading.stream, conn);
            } else {
                conn.kill();
            }
            return Step::Ended(close.end());
        }
        if conn.is_broken() {
            self.log_lost("writing to the LB failed", conn.held());
            return Step::Ended(reading.state.on_lost());
        }
        match reading.stream.read(&mut reading.chunk) {
            Ok(0) => {
                conn.kill();
                self.log_lost("the LB closed the connection", conn.held());
                Step::Ended(reading.state.on_lost())
            }
            Ok(read) => {
                reading.buf.extend_from_slice(&reading.chunk[..read]);
                match self.take_frames(reading, queue, claim) {
                    Ok(Some(job)) => Step::Claimed(job),
                    Ok(None) => Step::Idle,
                    Err(reason) => {
                        conn.kill();
                        self.log(
                            Level::Warning,
                            format!("{reason}; dropping the connection to the LB"),
                        );
                        Step::Ended(reading.state.on_lost())
                    }
                }
            }
            Err(err) if is_timeout(&err) => Step::Idle,
            Err(err) => {
                conn.kill();
                self.log_lost(&format!("reading from the LB failed ({err})"), conn.held());
                Step::Ended(reading.state.on_lost())
            }
        }
    }

    /// Acts on every whole frame read; with `claim`, the first call is returned instead of
    /// queued. `Err` names a frame that cannot be a message.
    fn take_frames(
        &self,
        reading: &mut Reading,
        queue: &Queue,
        claim: bool,
    ) -> Result<Option<Job>, String> {
        let mut claimed = None;
        match self.take_frames_into(reading, queue, claim, &mut claimed) {
            Ok(()) => Ok(claimed),
            Err(reason) => {
                // The connection is dropped; the call taken before the bad frame is not run.
                if let Some(job) = claimed {
                    job.conn.release();
                }
                Err(reason)
            }
        }
    }

    fn take_frames_into(
        &self,
        reading: &mut Reading,
        queue: &Queue,
        claim: bool,
        claimed: &mut Option<Job>,
    ) -> Result<(), String> {
        let conn = &self.conn;
        while let Some(frame) = decode_frame(&mut reading.buf, self.max_frame_size)
            .map_err(|err| format!("the LB sent a bad frame ({err})"))?
        {
            let message = Message::parse(frame).map_err(|(_, err)| {
                format!("the LB sent a frame that is not a strict binary message ({err})")
            })?;
            match reading
                .state
                .on_frame(message.message_type(), Instant::now())
            {
                Action::Dispatch => {
                    conn.hold();
                    let job = Job {
                        message,
                        conn: Arc::clone(conn),
                    };
                    if claim && claimed.is_none() {
                        *claimed = Some(job);
                    } else {
                        queue.push(job);
                    }
                }
                // Unchanged, by the reader: no handler runs on this thread now.
                Action::Echo => {
                    conn.send(message.as_wire());
                }
                Action::StopConfirmed => {
                    self.log(
                        Level::Info,
                        format!("the LB confirmed STOP; {} call(s) held", conn.held()),
                    );
                }
                Action::LbShuttingDown => {
                    self.log(
                        Level::Info,
                        format!(
                            "the LB is shutting down (STOP_CONFIRM): finishing {} held call(s), then reconnecting",
                            conn.held()
                        ),
                    );
                }
                Action::Ignore => {
                    reading.ignored += 1;
                    let level = if reading.ignored <= IGNORED_WARNINGS {
                        Level::Warning
                    } else {
                        Level::Debug
                    };
                    self.log(
                        level,
                        format!(
                            "ignoring a frame of type {} ({:?}) named {:?} from the LB",
                            message.message_type().as_u8(),
                            message.message_type(),
                            message.name()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn log_close(&self, close: Close, state: &ConnState) {
        let grace = self.timings.stop_grace.as_secs_f64();
        let (level, text) = match close {
            Close::Stopped => {
                let confirmed = matches!(
                    state.phase(),
                    Phase::Stopping {
                        confirmed: true,
                        ..
                    }
                );
                let how = if confirmed {
                    "STOP confirmed"
                } else {
                    "no STOP_CONFIRM (an older LB?)"
                };
                (
                    Level::Info,
                    format!("{how}; every held call answered: closing the connection"),
                )
            }
            Close::Drained => (
                Level::Info,
                "every held call answered after the LB's STOP_CONFIRM: closing the connection"
                    .to_owned(),
            ),
            Close::GraceOverrun { held, .. } => (
                Level::Warning,
                format!(
                    "{held} call(s) still held after {grace} s; closing the connection anyway (their replies are lost)"
                ),
            ),
            Close::HeartbeatTimeout { .. } => (
                Level::Warning,
                format!(
                    "no frame from the LB for {} s after it pinged; dropping the connection",
                    self.timings.heartbeat_timeout.as_secs_f64()
                ),
            ),
        };
        self.log(level, text);
    }

    fn log_lost(&self, reason: &str, held: usize) {
        if held > 0 {
            self.log(
                Level::Warning,
                format!("{reason}; the replies of {held} held call(s) are lost"),
            );
        } else {
            self.log(Level::Info, reason.to_owned());
        }
    }
}

/// Splits a fresh connection into the reader (`stream` itself, with a read tick) and the
/// shared write side.
fn open_conn(stream: &Stream) -> std::io::Result<Conn> {
    stream.set_read_timeout(Some(TICK))?;
    let writer = stream.try_clone()?;
    writer.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let control = stream.try_clone()?;
    Ok(Conn::new(writer, control))
}

/// Closes a connection whose calls are all answered: no more writes, shut down the write
/// side, read until the LB closes (or [`LINGER`]) so nothing written is lost to a reset.
fn close_gracefully(reader: &mut Stream, conn: &Conn) {
    conn.broken.store(true, Ordering::SeqCst);
    conn.control.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    while Instant::now() < deadline {
        match reader.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) if is_timeout(&err) => {}
            Err(_) => break,
        }
    }
    conn.control.shutdown(Shutdown::Both);
}

/// A pool thread: takes calls until the queue closes. Writing a reply and taking the next
/// call happen in one section without the GIL (one release and one re-acquire per call).
fn pool_loop<H: Handler>(handler: &H, queue: &Queue, log: &dyn LogSink, max_frame_size: usize) {
    let mut finished: Option<(Job, Option<BytesMut>)> = None;
    loop {
        let next = handler.blocking(|| {
            let done = finished.take().map(|(job, frame)| {
                if let Some(frame) = frame {
                    job.conn.send(&frame);
                }
                job.conn.release();
            });
            queue.next(done.is_some())
        });
        let Some(job) = next else {
            return;
        };
        // The connection is gone: the LB already failed this call, don't run it for nothing.
        let frame = if job.conn.is_broken() {
            None
        } else {
            let outcome = catch_unwind(AssertUnwindSafe(|| handler.handle(&job.message)))
                .unwrap_or_else(|_| Outcome::Failed("the worker runtime panicked".to_owned()));
            let plan = plan_reply(&job.message, outcome, max_frame_size);
            if let Some((level, text)) = plan.note {
                log.log(level, text);
            }
            plan.frame
        };
        finished = Some((job, frame));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::mpsc;

    use rpc_frame::{encode_message, heartbeat, parse_application_exception, stop_confirm};

    /// Log lines go to stderr (shown for failing tests).
    struct StderrLog;

    impl LogSink for StderrLog {
        fn log(&self, level: Level, message: String) {
            eprintln!("{level:?}: {message}");
        }
    }

    /// Echoes the call body back as a REPLY; a body starting with `s` sleeps 300 ms first,
    /// `f` fails, `n` writes nothing, `b` waits (up to 5 s) until two `b` calls run at once
    /// and fails if they never do, `h` raises [`HOLDING`] and sleeps 300 ms.
    struct TestHandler;

    /// Set by an `h` call once it runs (only one test sends them).
    static HOLDING: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

    /// Waits (up to 5 s) until an `h` call runs.
    fn wait_holding() {
        let (holding, changed) = &HOLDING;
        let (holding, timeout) = changed
            .wait_timeout_while(lock(holding), Duration::from_secs(5), |holding| !*holding)
            .unwrap();
        assert!(*holding && !timeout.timed_out(), "the `h` call never ran");
    }

    /// `b` calls running now (only one test sends them).
    static RENDEZVOUS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

    /// Whether a second `b` call joined this one within 5 s.
    fn rendezvous() -> bool {
        let (count, changed) = &RENDEZVOUS;
        let mut count = lock(count);
        *count += 1;
        changed.notify_all();
        let (count, timeout) = changed
            .wait_timeout_while(count, Duration::from_secs(5), |count| *count < 2)
            .unwrap();
        drop(count);
        !timeout.timed_out()
    }

    impl Handler for TestHandler {
        fn handle(&self, request: &Message) -> Outcome {
            match request.body().first() {
                Some(b's') => std::thread::sleep(Duration::from_millis(300)),
                Some(b'f') => return Outcome::Failed("ValueError: boom".to_owned()),
                Some(b'n') => return Outcome::NoReply,
                Some(b'h') => {
                    *lock(&HOLDING.0) = true;
                    HOLDING.1.notify_all();
                    std::thread::sleep(Duration::from_millis(300));
                }
                Some(b'b') if !rendezvous() => {
                    return Outcome::Failed("alone".to_owned());
                }
                _ => {}
            }
            let frame = encode_message(
                MessageType::Reply,
                request.name(),
                request.seqid(),
                request.body(),
            );
            Outcome::Reply(frame[LENGTH_PREFIX..].to_vec())
        }
    }

    /// A fake LB: one listener, frames read with a timeout.
    struct FakeLb {
        listener: UnixListener,
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    impl FakeLb {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("lb.sock");
            let listener = UnixListener::bind(&path).unwrap();
            Self {
                listener,
                _dir: dir,
                path,
            }
        }

        fn accept(&self) -> LbConn {
            self.listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        return LbConn {
                            stream,
                            buf: BytesMut::new(),
                        };
                    }
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(err) => panic!("no worker connected: {err}"),
                }
            }
        }
    }

    struct LbConn {
        stream: UnixStream,
        buf: BytesMut,
    }

    impl LbConn {
        fn read(&mut self) -> Option<Message> {
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(frame) = decode_frame(&mut self.buf, DEFAULT_MAX_FRAME_SIZE).unwrap() {
                    return Some(Message::parse(frame).unwrap());
                }
                match self.stream.read(&mut chunk) {
                    Ok(0) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(err) => panic!("read from the worker: {err}"),
                }
            }
        }

        fn send(&mut self, frame: &[u8]) {
            self.stream.write_all(frame).unwrap();
        }
    }

    fn start(config: Config) -> (Arc<StopSignal>, mpsc::Receiver<()>) {
        let stop = Arc::new(StopSignal::new());
        let engine = Engine::new(config, TestHandler, Arc::new(StderrLog), Arc::clone(&stop));
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            engine.run();
            let _ = done_tx.send(());
        });
        (stop, done_rx)
    }

    fn config(lb: &FakeLb, pool_size: usize) -> Config {
        let mut config = Config::new(Address::Unix(lb.path.clone()), pool_size);
        config.service = Some("echo".to_owned());
        config.backoff_min = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(50);
        config
    }

    /// A started worker connected to its fake LB, HELLO read.
    struct Serving {
        _lb: FakeLb,
        conn: LbConn,
        stop: Arc<StopSignal>,
        done: mpsc::Receiver<()>,
    }

    fn serving(pool_size: usize) -> Serving {
        let lb = FakeLb::new();
        let (stop, done) = start(config(&lb, pool_size));
        let mut conn = lb.accept();
        assert_eq!(conn.read().unwrap().message_type(), MessageType::Hello);
        Serving {
            _lb: lb,
            conn,
            stop,
            done,
        }
    }

    impl Serving {
        /// Stops the worker without confirming: it sends STOP, still closes after its short
        /// wait for STOP_CONFIRM, and its engine returns.
        fn stop_unconfirmed(mut self) {
            self.stop.stop();
            assert_eq!(self.conn.read().unwrap().message_type(), MessageType::Stop);
            assert!(self.conn.read().is_none(), "closed without STOP_CONFIRM");
            self.done.recv_timeout(Duration::from_secs(5)).unwrap();
        }
    }

    #[test]
    fn hello_call_ping_and_stop() {
        let lb = FakeLb::new();
        let (stop, done) = start(config(&lb, 2));
        let mut conn = lb.accept();
        let hello = conn.read().unwrap();
        assert_eq!(hello.message_type(), MessageType::Hello);
        let hello = Hello::decode(hello.body()).unwrap();
        assert_eq!(hello.pool_size, 2);
        assert_eq!(hello.service, "echo");
        assert_eq!(hello.pid, std::process::id() as i32);

        conn.send(&encode_message(MessageType::Call, "echo", 7, b"x\x00"));
        let reply = conn.read().unwrap();
        assert_eq!(
            (reply.message_type(), reply.name(), reply.seqid()),
            (MessageType::Reply, "echo", 7)
        );
        assert_eq!(reply.body(), b"x\x00");

        // A slow call is held; the ping overtakes it.
        conn.send(&encode_message(MessageType::Call, "slow", 8, b"s\x00"));
        conn.send(&heartbeat(99));
        let ping = conn.read().unwrap();
        assert_eq!(ping.as_wire(), &heartbeat(99)[..]);

        stop.stop();
        let stop_frame = conn.read().unwrap();
        assert_eq!(stop_frame.message_type(), MessageType::Stop);
        conn.send(&stop_confirm());
        let slow = conn.read().unwrap();
        assert_eq!(slow.seqid(), 8);
        assert!(conn.read().is_none(), "closed after the last reply");
        done.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn calls_read_together_run_at_once_and_pings_pass_busy_threads() {
        // Two calls in one write: the reader runs one, queues the other for the idle thread.
        let mut worker = serving(2);
        let mut both = encode_message(MessageType::Call, "meet", 1, b"b\x00");
        both.extend_from_slice(&encode_message(MessageType::Call, "meet", 2, b"b\x00"));
        worker.conn.send(&both);
        for _ in 0..2 {
            let reply = worker.conn.read().unwrap();
            assert_eq!(reply.message_type(), MessageType::Reply, "both ran at once");
        }
        worker.stop_unconfirmed();

        // The only pool thread is in a handler: the connection thread reads and echoes the
        // ping before the handler is done.
        let mut worker = serving(1);
        let conn = &mut worker.conn;
        conn.send(&encode_message(MessageType::Call, "hold", 3, b"h\x00"));
        wait_holding();
        conn.send(&heartbeat(42));
        assert_eq!(conn.read().unwrap().as_wire(), &heartbeat(42)[..]);
        assert_eq!(conn.read().unwrap().seqid(), 3);
        worker.stop_unconfirmed();
    }

    #[test]
    fn failures_become_code_6_and_oneway_is_silent() {
        let mut worker = serving(1);
        let conn = &mut worker.conn;
        conn.send(&encode_message(MessageType::Oneway, "notify", 1, b"f\x00"));
        conn.send(&encode_message(MessageType::Call, "fail", 2, b"f\x00"));
        conn.send(&encode_message(MessageType::Call, "none", 3, b"n\x00"));
        conn.send(&encode_message(MessageType::Reply, "stray", 4, b"\x00"));
        conn.send(&encode_message(MessageType::Call, "echo", 5, b"e\x00"));
        let fail = conn.read().unwrap();
        assert_eq!(
            (fail.message_type(), fail.name(), fail.seqid()),
            (MessageType::Exception, "fail", 2)
        );
        assert_eq!(
            parse_application_exception(fail.body()),
            Some((6, "ValueError: boom".to_owned()))
        );
        let none = conn.read().unwrap();
        assert_eq!(
            (none.message_type(), none.seqid()),
            (MessageType::Exception, 3)
        );
        let echo = conn.read().unwrap();
        assert_eq!((echo.message_type(), echo.seqid()), (MessageType::Reply, 5));
        worker.stop_unconfirmed();
    }

    #[test]
    fn reconnects_after_eof_bad_frames_and_lb_shutdown() {
        let lb = FakeLb::new();
        let (stop, done) = start(config(&lb, 1));
        let mut first = lb.accept();
        first.read().unwrap();
        drop(first);

        let mut second = lb.accept();
        assert_eq!(second.read().unwrap().message_type(), MessageType::Hello);
        second.send(&[0xff, 0xff, 0xff, 0xff]);
        assert!(
            second.read().is_none(),
            "a negative length drops the connection"
        );

        let mut third = lb.accept();
        third.read().unwrap();
        // Frames are handled in order: the call is held before the STOP_CONFIRM is seen.
        third.send(&encode_message(MessageType::Call, "slow", 1, b"s\x00"));
        third.send(&stop_confirm());
        let reply = third.read().unwrap();
        assert_eq!(reply.seqid(), 1, "the held call is answered before closing");
        assert!(third.read().is_none());

        let mut fourth = lb.accept();
        assert_eq!(fourth.read().unwrap().message_type(), MessageType::Hello);
        stop.stop();
        assert_eq!(fourth.read().unwrap().message_type(), MessageType::Stop);
        fourth.send(&stop_confirm());
        assert!(fourth.read().is_none());
        done.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn stop_while_the_lb_is_away() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::new(Address::Unix(dir.path().join("nobody.sock")), 1);
        let (stop, done) = start(config);
        std::thread::sleep(Duration::from_millis(100));
        stop.stop();
        done.recv_timeout(Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn plan_reply_cases() {
        let call = Message::parse(encode_message(MessageType::Call, "m", 3, b"\x00")).unwrap();
        let oneway = Message::parse(encode_message(MessageType::Oneway, "m", 3, b"\x00")).unwrap();
        let plan = plan_reply(&call, Outcome::Reply(vec![1, 2, 3]), 10);
        assert_eq!(&plan.frame.unwrap()[..], &[0, 0, 0, 3, 1, 2, 3]);
        let plan = plan_reply(&call, Outcome::Reply(vec![0; 11]), 10);
        let frame = Message::parse(plan.frame.unwrap()).unwrap();
        assert_eq!(
            (frame.message_type(), frame.seqid()),
            (MessageType::Exception, 3)
        );
        assert_eq!(plan.note.unwrap().0, Level::Error);
        for outcome in [
            Outcome::Reply(vec![1]),
            Outcome::NoReply,
            Outcome::Failed("x".into()),
        ] {
            assert!(plan_reply(&oneway, outcome, 10).frame.is_none());
        }
    }

    #[test]
    fn stop_signal_wakes_waiters() {
        let signal = Arc::new(StopSignal::new());
        assert!(!signal.wait(Duration::from_millis(10)));
        let waiter = {
            let signal = Arc::clone(&signal);
            std::thread::spawn(move || signal.wait(Duration::from_secs(10)))
        };
        signal.stop();
        let first = signal.requested_at();
        signal.stop();
        assert_eq!(signal.requested_at(), first, "idempotent");
        assert!(waiter.join().unwrap());
    }

    fn job(seqid: i32) -> Job {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let conn = Conn::new(Stream::Unix(ours.try_clone().unwrap()), Stream::Unix(ours));
        conn.hold();
        Job {
            message: Message::parse(encode_message(MessageType::Call, "m", seqid, b"\x00"))
                .unwrap(),
            conn: Arc::new(conn),
        }
    }

    #[test]
    fn queue_hands_jobs_to_sleepers_and_reports_idle() {
        let queue = Arc::new(Queue::default());
        // Queued before anyone sleeps: taken without a wake-up.
        queue.push(job(1));
        assert_eq!(queue.next(false).unwrap().message.seqid(), 1);

        // A thread that finished job 1 sleeps for the next one; a push wakes it.
        let (taken, seen) = mpsc::channel();
        let taker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut finished = true;
                while let Some(job) = queue.next(finished) {
                    taken.send(job.message.seqid()).unwrap();
                    finished = true;
                }
            })
        };
        queue.push(job(2));
        assert_eq!(seen.recv_timeout(Duration::from_secs(10)), Ok(2));

        // wait_idle sees job 2 finish (the taker's next `next`), then close ends the taker.
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(queue.wait_idle(deadline), 0);
        assert!(Instant::now() < deadline);
        queue.close();
        taker.join().unwrap();
        let late = job(3);
        let conn = Arc::clone(&late.conn);
        queue.push(late);
        assert_eq!(conn.held(), 0, "a job pushed after close is released");
    }
}
