//! The mesh's connections under load and under gray failure: one multiplexed framed
//! connection module for the proxy's upstream connections and the LB's worker connections,
//! and the pieces every tokio hop shares to bound time and memory whatever a peer does
//! (CONTRACT section 9, "Time limits nothing can block"). Sits between `rpc-frame` (bytes and
//! headers) and the two binaries.
//!
//! # Layout
//! - [`connection`]: [`connection::run`] drives one multiplexed connection (writer, reader
//!   and clock side by side) under a [`connection::Policy`].
//! - [`write`]: [`write::write_all`] with a deadline on progress (`write_timeout_ms`).
//! - [`budget`]: byte budgets per connection and per process
//!   (`max_connection_buffer_bytes`, `max_process_buffer_bytes`).

pub mod budget;
pub mod connection;
pub mod write;

pub use budget::{Charge, ConnBudget, ProcessBudget};
pub use connection::{Ending, Expiry, Failure, Outbound, Policy, Settings, Start, Tick};
pub use rpc_frame::{Decoded, FrameDecoder, Head, Oversized};
pub use write::{WriteError, write_all};
