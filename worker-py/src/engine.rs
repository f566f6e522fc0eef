//! The worker runtime between the LB's socket and the handler: dials the LB, sends HELLO,
//! reads frames (echoing pings at once, from whichever thread reads, and pinging an LB that
//! sends no heartbeat), runs calls on
//! `pool_size` pool threads, writes their replies, stops gracefully (STOP, wait for
//! STOP_CONFIRM, finish and flush held calls) and reconnects with backoff when the LB goes
//! away.
//!
//! Pure Rust and generic over a [`Handler`]: the Python extension ([`crate::python`]) plugs in a
//! handler that runs a Thrift processor, the unit tests a Rust one. The decisions themselves
//! live in [`crate::protocol`].
//!
//! # Threads
//! - `pool_size` *pool threads* (`rpc_thrift-worker-<n>`, from 0) run the handler. A pool thread with nothing to run becomes
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
//!   STOP, the close once every held call is answered, the worker's own pings, the heartbeat
//!   timeout.
//! - A call is *held* from the moment it is read until its reply is written to the socket.
//! - Writes (pings, replies, STOP) share one writer under a mutex, one whole frame at a time.
//!
//! # Layout
//! - [`Config`] and [`Engine`] (here): what the engine is given, and [`Engine::run`], which
//!   starts the pool threads, runs the connection thread and waits for the handlers on the way
//!   out.
//! - `connect`: the connection thread: dial, HELLO, serve, reconnect with backoff.
//! - `session`: one connection while it is served: the reader role (read, echo pings, STOP,
//!   close decisions, dispatch calls).
//! - `queue`: the hand-off between the reader and the pool threads, and the reader role itself.
//! - `pool`: the pool threads: take a call, run the handler, write the reply.
//! - `conn`: the write side of a connection, the held-call count, kill and graceful close.
//! - `reply`: [`plan_reply`], from the handler's [`Outcome`] to the frame written back.
//! - `stop`: [`StopSignal`]; `handler`: [`Handler`] and [`Outcome`]; `logging`: [`Level`] and
//!   [`LogSink`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rpc_frame::DEFAULT_MAX_FRAME_SIZE;

use crate::protocol::{Address, Timings};

mod conn;
mod connect;
mod handler;
mod logging;
mod pool;
mod queue;
mod reply;
mod session;
mod stop;
#[cfg(test)]
mod testing;

pub use handler::{Handler, Outcome};
pub use logging::{Level, LogSink};
pub use pool::pool_thread_name;
pub use reply::{ReplyPlan, plan_reply};
pub use stop::StopSignal;

use queue::Queue;

/// How long one blocking read waits before the connection loop looks at the clock and the
/// stop request again.
const TICK: Duration = Duration::from_millis(50);

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
    /// Heartbeat interval and timeout, STOP_CONFIRM wait and stop grace.
    pub timings: Timings,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Longest TCP connect attempt.
    pub connect_timeout: Duration,
    /// The slot of a worker started by its LB (`RPC_WORKER_ID`), for logs.
    pub worker_id: Option<u64>,
    /// The LB's rolling-restart count when it started this worker (`RPC_WORKER_GENERATION`),
    /// for logs.
    pub generation: Option<u64>,
}

impl Config {
    /// Defaults: 16384000-byte frames, 1 s heartbeat interval, 6 s heartbeat timeout, 1.5 s
    /// STOP_CONFIRM wait, 15 s stop grace, reconnects backing off from 100 ms to 5 s.
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
            worker_id: None,
            generation: None,
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// === Engine ===

/// One worker: a connection loop and its pool threads.
pub struct Engine<H: Handler> {
    /// What it was given; fixed.
    config: Config,
    /// Runs the calls; shared with the pool threads.
    handler: Arc<H>,
    /// Where every thread's log lines go.
    log: Arc<dyn LogSink>,
    /// The stop request, shared with `stop()` callers.
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
}

#[cfg(test)]
mod tests {
    use rpc_frame::{
        Hello, MessageType, encode_message, heartbeat, parse_application_exception, stop_confirm,
    };

    use super::testing::{FakeLb, config, serving, start, wait_holding};
    use super::*;

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
    fn pings_a_silent_lb_and_never_echoes_its_echoes() {
        let lb = FakeLb::new();
        let mut config = config(&lb, 1);
        config.timings.heartbeat_interval = Duration::from_millis(100);
        config.timings.heartbeat_timeout = Duration::from_millis(600);
        let (stop, done) = start(config);
        let mut conn = lb.accept();
        assert_eq!(conn.read().unwrap().message_type(), MessageType::Hello);
        // Silent like the Go original LB: pinged anyway, seqids -1, -2, ...
        let mut last = 0;
        for expected in [-1, -2] {
            let ping = conn.read_any().unwrap();
            assert_eq!(ping.as_wire(), &heartbeat(expected)[..]);
            last = expected;
        }
        // Now the LB echoes: the echoes arm the timeout and keep the connection for longer
        // than it (12 x 100 ms > 600 ms), and none is echoed back (seqids keep counting).
        for _ in 0..12 {
            let ping = conn.read_any().unwrap();
            assert_eq!(ping.message_type(), MessageType::Heartbeat);
            assert_eq!(
                ping.seqid(),
                last - 1,
                "a fresh ping, not an echo of the echo"
            );
            last = ping.seqid();
            conn.send(ping.as_wire());
        }
        conn.send(&encode_message(MessageType::Call, "echo", 7, b"e\x00"));
        let reply = conn.read().unwrap();
        assert_eq!(
            (reply.message_type(), reply.seqid()),
            (MessageType::Reply, 7)
        );
        stop.stop();
        assert_eq!(conn.read().unwrap().message_type(), MessageType::Stop);
        conn.send(&stop_confirm());
        assert!(conn.read().is_none());
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
    fn pool_threads_are_named_rpc_thrift_worker_n() {
        let mut worker = serving(2);
        let mut both = encode_message(MessageType::Call, "name", 1, b"t");
        both.extend_from_slice(&encode_message(MessageType::Call, "name", 2, b"t"));
        worker.conn.send(&both);
        let names: std::collections::BTreeSet<_> = (0..2)
            .map(|_| String::from_utf8(worker.conn.read().unwrap().body().to_vec()).unwrap())
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("rpc_thrift-worker-")),
            "{names:?}"
        );
        assert!(
            names.is_subset(&[pool_thread_name(0), pool_thread_name(1)].into()),
            "{names:?}"
        );
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
    fn a_call_over_max_frame_size_fails_alone() {
        let lb = FakeLb::new();
        let mut config = config(&lb, 1);
        config.max_frame_size = 1024;
        let (stop, done) = start(config);
        let mut conn = lb.accept();
        assert_eq!(conn.read().unwrap().message_type(), MessageType::Hello);
        let mut three = encode_message(MessageType::Call, "echo", 1, b"e\x00");
        three.extend_from_slice(&encode_message(MessageType::Call, "big", 2, &[b'e'; 4096]));
        three.extend_from_slice(&encode_message(MessageType::Call, "echo", 3, b"e\x00"));
        conn.send(&three);
        let mut answers: Vec<_> = (0..3).map(|_| conn.read().unwrap()).collect();
        answers.sort_by_key(|m| m.seqid());
        let kinds: Vec<_> = answers
            .iter()
            .map(|m| (m.seqid(), m.message_type()))
            .collect();
        assert_eq!(
            kinds,
            [
                (1, MessageType::Reply),
                (2, MessageType::Exception),
                (3, MessageType::Reply)
            ]
        );
        let (code, text) = parse_application_exception(answers[1].body()).unwrap();
        assert_eq!(code, 7, "{text}");
        assert_eq!(answers[1].name(), "big");
        stop.stop();
        assert_eq!(conn.read().unwrap().message_type(), MessageType::Stop);
        assert!(conn.read().is_none());
        done.recv_timeout(Duration::from_secs(5)).unwrap();
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
}
