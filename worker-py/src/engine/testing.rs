//! Test helpers of the engine: a Rust [`Handler`] whose behaviour each call's body picks, a
//! fake LB on a unix socket that reads and writes whole frames, and a started worker connected
//! to it. Used by the engine's tests (the runtime as a whole, seen from the LB's side).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rpc_frame::{
    DEFAULT_MAX_FRAME_SIZE, LENGTH_PREFIX, Message, MessageType, decode_frame, encode_message,
};

use super::{Config, Engine, Handler, Level, LogSink, Outcome, StopSignal, lock};
use crate::protocol::Address;

/// Log lines go to stderr (shown for failing tests).
struct StderrLog;

impl LogSink for StderrLog {
    fn log(&self, level: Level, message: String) {
        eprintln!("{level:?}: {message}");
    }
}

/// Echoes the call body back as a REPLY; a body starting with `s` sleeps 300 ms first,
/// `f` fails, `n` writes nothing, `b` waits (up to 5 s) until two `b` calls run at once
/// and fails if they never do, `h` raises [`HOLDING`] and sleeps 300 ms, `t` replies with
/// the name of the thread that ran it.
struct TestHandler;

/// Set by an `h` call once it runs (only one test sends them).
static HOLDING: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Waits (up to 5 s) until an `h` call runs.
pub(super) fn wait_holding() {
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
            Some(b't') => {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                let frame = encode_message(
                    MessageType::Reply,
                    request.name(),
                    request.seqid(),
                    name.as_bytes(),
                );
                return Outcome::Reply(frame[LENGTH_PREFIX..].to_vec());
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
pub(super) struct FakeLb {
    listener: UnixListener,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl FakeLb {
    /// Listens on `lb.sock` in a fresh temporary directory.
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Self {
            listener,
            _dir: dir,
            path,
        }
    }

    /// The next worker connection (waits up to 5 s), with a 5 s read timeout.
    pub(super) fn accept(&self) -> LbConn {
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
                        worker_pings: Vec::new(),
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

/// The fake LB's side of one worker connection.
pub(super) struct LbConn {
    stream: UnixStream,
    buf: BytesMut,
    /// Seqids of the worker's own pings read so far (skipped by [`LbConn::read`]).
    pub(super) worker_pings: Vec<i32>,
}

impl LbConn {
    /// The next whole message from the worker that is not one of its own pings (a heartbeat
    /// with a negative seqid, counted in `worker_pings`); `None` once it closed.
    pub(super) fn read(&mut self) -> Option<Message> {
        loop {
            let message = self.read_any()?;
            if message.message_type() == MessageType::Heartbeat && message.seqid() < 0 {
                self.worker_pings.push(message.seqid());
            } else {
                return Some(message);
            }
        }
    }

    /// The next whole message from the worker, whatever it is; `None` once it closed.
    pub(super) fn read_any(&mut self) -> Option<Message> {
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

    /// Writes `frame` to the worker.
    pub(super) fn send(&mut self, frame: &[u8]) {
        self.stream.write_all(frame).unwrap();
    }
}

/// Runs an engine with [`TestHandler`] on its own thread; the receiver gets `()` once
/// [`Engine::run`] returned.
pub(super) fn start(config: Config) -> (Arc<StopSignal>, mpsc::Receiver<()>) {
    let stop = Arc::new(StopSignal::new());
    let engine = Engine::new(config, TestHandler, Arc::new(StderrLog), Arc::clone(&stop));
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        engine.run();
        let _ = done_tx.send(());
    });
    (stop, done_rx)
}

/// A config for service `echo` dialling `lb`, with short reconnect delays.
pub(super) fn config(lb: &FakeLb, pool_size: usize) -> Config {
    let mut config = Config::new(Address::Unix(lb.path.clone()), pool_size);
    config.service = Some("echo".to_owned());
    config.backoff_min = Duration::from_millis(10);
    config.backoff_max = Duration::from_millis(50);
    config
}

/// A started worker connected to its fake LB, HELLO read.
pub(super) struct Serving {
    _lb: FakeLb,
    pub(super) conn: LbConn,
    stop: Arc<StopSignal>,
    done: mpsc::Receiver<()>,
}

/// A worker of `pool_size` threads, started and connected to a fresh fake LB.
pub(super) fn serving(pool_size: usize) -> Serving {
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
    pub(super) fn stop_unconfirmed(mut self) {
        self.stop.stop();
        assert_eq!(self.conn.read().unwrap().message_type(), MessageType::Stop);
        assert!(self.conn.read().is_none(), "closed without STOP_CONFIRM");
        self.done.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
