//! One LB connection while it is served ([`Session`]): the thread holding the reader role
//! reads it, echoes pings at once, pings an LB that has sent no heartbeat for a heartbeat
//! interval, acts on STOP, STOP_CONFIRM and the connection's close
//! decisions ([`crate::protocol::ConnState`]), and turns every CALL or ONEWAY into a
//! [`Job`], keeping the first one for itself and queueing the rest for the pool threads.

use std::io::Read;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use rpc_frame::{Decoded, ExceptionCode, FrameDecoder, Message, MessageType, Oversized};

use super::conn::{Conn, close_gracefully};
use super::queue::{Job, Queue};
use super::{Config, Level, LogSink, StopSignal, lock};
use crate::protocol::{Action, Close, ConnState, End, Phase, Timings};
use crate::stream::{Stream, is_timeout};

/// Bytes read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// Frames of an ignored type logged at warning level per connection; later ones at debug.
const IGNORED_WARNINGS: u32 = 10;

/// What one turn at reading gave.
pub(super) enum Step {
    /// Nothing to run (a timeout tick, pings, or calls queued for others).
    Idle,
    /// A call the reader took for itself.
    Claimed(Job),
    /// The connection is over.
    Ended(End),
}

/// The read side of one connection: whoever holds it reads (one thread at a time: the
/// [`Queue`] hands out the reader role).
struct Reading {
    /// The socket, with a [`TICK`](super::TICK) read timeout.
    stream: Stream,
    /// Bytes read and not yet cut into frames.
    buf: BytesMut,
    /// Cuts them, and skips a call over `max_frame_size` (answered, not buffered).
    decoder: FrameDecoder,
    /// Scratch space for one read.
    chunk: Vec<u8>,
    /// The connection's decisions.
    state: ConnState,
    /// Frames of an ignored type seen so far.
    ignored: u32,
}

/// One connection to the LB while it is served, shared by the connection thread and the pool
/// threads.
pub(super) struct Session {
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

// === impl Session ===

impl Session {
    /// Starts serving `stream`, whose HELLO went out on `conn`: the connection's decisions
    /// start now.
    pub(super) fn new(
        stream: Stream,
        conn: Arc<Conn>,
        config: &Config,
        stop: Arc<StopSignal>,
        log: Arc<dyn LogSink>,
    ) -> Self {
        Self {
            reading: Mutex::new(Reading {
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
                decoder: FrameDecoder::new(config.max_frame_size),
                chunk: vec![0u8; READ_CHUNK],
                state: ConnState::new(Instant::now(), config.timings),
                ignored: 0,
            }),
            conn,
            stop,
            log,
            max_frame_size: config.max_frame_size,
            timings: config.timings,
        }
    }

    fn log(&self, level: Level, message: String) {
        self.log.log(level, message);
    }

    /// [`Session::step`], and a panic in it ends the connection (the worker reconnects)
    /// instead of the reading thread: otherwise the reader role would stay taken and nobody
    /// would read again.
    pub(super) fn turn(&self, queue: &Queue, claim: bool) -> Step {
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
    /// say so, reads once (at most [`TICK`](super::TICK)) and acts on every whole frame. With
    /// `claim`, the first call read is returned to run on this thread; others are queued.
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
        if let Some(seqid) = reading.state.ping_due(now) {
            if reading.state.pings_sent() == 1 {
                self.log(
                    Level::Debug,
                    format!(
                        "no heartbeat from the LB for {} ms: pinging it (and again whenever it stays silent that long)",
                        self.timings.heartbeat_interval.as_millis()
                    ),
                );
            }
            // A failed write marks the connection broken, which the next check sees.
            conn.send(&rpc_frame::heartbeat(seqid));
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
        while let Some(decoded) = reading
            .decoder
            .decode(&mut reading.buf)
            .map_err(|err| format!("the LB sent a bad frame ({err})"))?
        {
            let frame = match decoded {
                Decoded::Frame(frame) => frame,
                Decoded::Oversized(over) => {
                    self.refuse_oversized(&over);
                    continue;
                }
            };
            let message = Message::parse(frame).map_err(|(_, err)| {
                format!("the LB sent a frame that is not a strict binary message ({err})")
            })?;
            match reading
                .state
                .on_frame(message.message_type(), message.seqid(), Instant::now())
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
                Action::PingAnswered => {}
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

    /// A call over `max_frame_size` (an LB with a larger limit than this worker's): answered
    /// with code 7 and skipped without being buffered; the calls around it run.
    fn refuse_oversized(&self, over: &Oversized) {
        let text = format!(
            "the call of {} bytes is over the worker's max_frame_size ({})",
            over.len, self.max_frame_size
        );
        self.log(Level::Warning, text.clone());
        if let Some(head) = &over.head
            && head.message_type == MessageType::Call
        {
            let frame = rpc_frame::application_exception(
                head.method(),
                head.seqid,
                ExceptionCode::ProtocolError,
                &text,
            );
            self.conn.send(&frame);
        }
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
                    "no frame from the LB for {} s after it sent a heartbeat; dropping the connection",
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
