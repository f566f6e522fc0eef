//! `rpc_thrift._worker`: the compiled core of the Python worker runtime (L4). Python workers
//! dial their LB (L3), which forwards calls from the proxies (L2); this crate owns the socket,
//! framing, heartbeats, reconnects and the graceful stop, and runs each call's Thrift
//! processor on a pool thread through Python.
//!
//! # Layout
//! - [`protocol`]: pure decisions of the LB <-> worker protocol (HELLO, frame handling per
//!   phase, heartbeat and stop deadlines, backoff); unit-tested without sockets.
//! - [`stream`]: the unix/TCP socket to the LB.
//! - [`engine`]: the runtime itself, generic over a [`engine::Handler`]: connection loop, pool
//!   threads, reply writing, stop and reconnect.
//! - [`python`]: the `Worker` class exported to Python; [`errors`]: Rust <-> Python error
//!   conversions.
//!
//! The Python package around it (`python/rpc_thrift/`) adds the `RpcWorker` wrapper (signal
//! handling, the Thrift dispatcher) and the client helpers of `rpc_thrift.utils`.

pub mod engine;
pub mod errors;
pub mod protocol;
pub mod python;
pub mod stream;

use pyo3::prelude::*;

/// The private compiled module `rpc_thrift._worker`; its API is documented in `_worker.pyi`.
#[pymodule(name = "_worker")]
mod worker_module {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::python::Worker;

    /// The largest frame accepted by default (CONTRACT section 2).
    #[pymodule_export]
    const DEFAULT_MAX_FRAME_SIZE: usize = rpc_frame::DEFAULT_MAX_FRAME_SIZE;

    #[pymodule_init]
    fn init(module: &Bound<'_, PyModule>) -> PyResult<()> {
        module.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
