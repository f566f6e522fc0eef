//! The connection thread ([`Engine::run`]'s thread): dials the LB, sends HELLO, hands the
//! connection to the pool threads as a [`Session`] and watches it until it ends, then
//! reconnects with backoff until the worker is stopped.

use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_frame::Hello;

use super::conn::open_conn;
use super::queue::Queue;
use super::session::Session;
use super::{Engine, Handler, Level};
use crate::protocol::{Backoff, End};
use crate::stream::Stream;

/// A connection that lived at least this long resets the reconnect backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(2);

// === impl Engine: the connection thread ===

impl<H: Handler> Engine<H> {
    /// Connects and serves until stopped, backing off between attempts.
    pub(super) fn connect_loop(&self, queue: &Queue) {
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
        let mut supervised = String::new();
        if let Some(id) = self.config.worker_id {
            supervised.push_str(&format!(", worker id {id}"));
        }
        if let Some(generation) = self.config.generation {
            supervised.push_str(&format!(", generation {generation}"));
        }
        self.log(
            Level::Info,
            format!(
                "connected to the LB at {address} (service {}, pool_size {}, pid {pid}{supervised})",
                self.config.service.as_deref().unwrap_or("-"),
                self.config.pool_size
            ),
        );

        let session = Arc::new(Session::new(
            stream,
            conn,
            &self.config,
            Arc::clone(&self.stop),
            Arc::clone(&self.log),
        ));
        queue.attach(Arc::clone(&session));
        queue.watch(&session)
    }
}
