//! The write side of one LB connection ([`Conn`]), shared by whoever reads it and by the pool
//! threads writing replies: whole frames under one lock, the count of held calls, and the two
//! ways a connection is given up (killed at once, or closed gracefully once every held call is
//! answered).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{TICK, lock};
use crate::stream::{Stream, is_timeout};

/// A write that makes no progress for this long means the LB stopped reading: the connection
/// is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// After shutting down its write side, the worker reads (and discards) until the LB closes,
/// at most this long, so that nothing it wrote is cut off by a reset.
const LINGER: Duration = Duration::from_millis(500);

/// The write side of one LB connection, shared by the connection loop and the pool threads.
#[derive(Debug)]
pub(super) struct Conn {
    /// Whole frames are written under this lock.
    writer: Mutex<Stream>,
    /// Shuts the socket down without the writer lock (a writer may be blocked in `write`).
    control: Stream,
    /// Set once a write failed or the connection was given up: later writes are skipped.
    broken: AtomicBool,
    /// Calls read and not yet answered (reply written, or found to need none).
    held: AtomicUsize,
}

// === impl Conn ===

impl Conn {
    /// The write side over `writer`; `control` is a clone of the same socket, for shutdowns.
    pub(super) fn new(writer: Stream, control: Stream) -> Self {
        Self {
            writer: Mutex::new(writer),
            control,
            broken: AtomicBool::new(false),
            held: AtomicUsize::new(0),
        }
    }

    /// Writes one whole frame; `false` if the connection is (or just became) broken.
    pub(super) fn send(&self, frame: &[u8]) -> bool {
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
    pub(super) fn kill(&self) {
        self.broken.store(true, Ordering::SeqCst);
        self.control.shutdown(Shutdown::Both);
    }

    /// Whether the connection was given up (a write failed, or it was killed or closed).
    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Counts one more held call (read, not yet answered).
    pub(super) fn hold(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
    }

    /// A held call was answered (or dropped unanswered).
    pub(super) fn release(&self) {
        self.held.fetch_sub(1, Ordering::SeqCst);
    }

    /// Calls held now.
    pub(super) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

/// Splits a fresh connection into the reader (`stream` itself, with a read tick) and the
/// shared write side.
pub(super) fn open_conn(stream: &Stream) -> std::io::Result<Conn> {
    stream.set_read_timeout(Some(TICK))?;
    let writer = stream.try_clone()?;
    writer.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let control = stream.try_clone()?;
    Ok(Conn::new(writer, control))
}

/// Closes a connection whose calls are all answered: no more writes, shut down the write
/// side, read until the LB closes (or [`LINGER`]) so nothing written is lost to a reset.
pub(super) fn close_gracefully(reader: &mut Stream, conn: &Conn) {
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
