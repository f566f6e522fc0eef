//! The pool threads: `pool_size` threads that each take a call from the [`Queue`] (reading the
//! connection themselves when nobody does), run it through the [`Handler`], and write its reply
//! to the connection it came from. They are named `rpc_thrift-worker-<n>`
//! ([`pool_thread_name`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::BytesMut;

use super::queue::{Job, Queue};
use super::{Engine, Handler, Level, LogSink, Outcome, plan_reply};

// === impl Engine: the pool threads ===

impl<H: Handler> Engine<H> {
    /// Starts the pool threads (as many as can be started; each failure is logged).
    pub(super) fn spawn_pool(&self, queue: &Arc<Queue>) -> Vec<JoinHandle<()>> {
        let mut threads = Vec::with_capacity(self.config.pool_size);
        for index in 0..self.config.pool_size {
            let handler = Arc::clone(&self.handler);
            let queue = Arc::clone(queue);
            let log = Arc::clone(&self.log);
            let max_frame_size = self.config.max_frame_size;
            let spawned = std::thread::Builder::new()
                .name(pool_thread_name(index))
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
}

/// The name of pool thread `index` (0-based), as the OS and [`std::thread::current`] see it;
/// the Python handler gives Python's `threading` the same name. The kernel keeps only its
/// first 15 bytes (`rpc_thrift-work`).
pub fn pool_thread_name(index: usize) -> String {
    format!("rpc_thrift-worker-{index}")
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
