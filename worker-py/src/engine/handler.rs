//! The [`Handler`] that runs calls on the pool threads, and the [`Outcome`] it hands back, which
//! [`super::plan_reply`] turns into the frame written to the LB. The Python extension plugs in a
//! Thrift processor, the unit tests a Rust handler.

use rpc_frame::Message;

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
    /// state (`threading.local`, e.g. a database connection) lives across calls, and gives
    /// the thread the name it has in Rust ([`super::pool_thread_name`]) in Python too.
    fn pool_thread(&self, body: &mut dyn FnMut()) {
        body();
    }

    /// Wraps a pool thread's blocking work between calls (writing a reply, waiting for a call,
    /// reading the socket when it is the reader). The Python handler releases the GIL here.
    fn blocking<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        f()
    }
}
