//! Thrift framed transport and strict binary message headers: the bytes every hop of the mesh
//! speaks (CONTRACT section 2). Sits under the proxy, the LB and the Python worker extension, so
//! it depends on `bytes` and `thiserror` only (no tokio, no ZooKeeper).
//!
//! # Layout
//! Every item is re-exported here, at the crate root; the modules themselves are private.
//! - `framing`: [`decode_frame`] cuts one length-prefixed frame out of a read buffer, refusing
//!   lengths `<= 0` and over the maximum ([`FrameError`], [`DEFAULT_MAX_FRAME_SIZE`]).
//! - `message`: [`Message`], an owned frame (length prefix included) whose strict binary header
//!   (type, name, seqid) was parsed once; the seqid and the `service:` prefix are rewritten in
//!   place, the body is never decoded or copied. [`MessageType`], [`HeaderError`], and
//!   [`encode_message`] for the frames the mesh builds itself.
//! - `decoder`: [`FrameDecoder`], [`decode_frame`] with a memory: a frame over the maximum
//!   is skipped without being buffered (its head kept, [`Oversized`]), so the one call it
//!   belongs to fails and the stream stays in step.
//! - `salvage`: [`salvage_name_and_seqid`], the name and seqid of a frame whose header was
//!   refused, so its code-7 reply reaches the right caller.
//! - `application_exception`: [`application_exception()`] and [`parse_application_exception`],
//!   the `TApplicationException` the mesh answers failed calls with ([`ExceptionCode`]);
//!   [`marked_application_exception`] and [`exception_mark`] for the LB's field 3 ([`Mark`]).
//! - `hello`: [`Hello`], the worker's capacity announcement to its LB.
//! - `control`: [`heartbeat`], [`ping_reply`], [`stop`], [`stop_confirm`], the mesh's own
//!   control frames.
//! - `inflight`: [`InFlight`], calls in flight on one multiplexed connection, by rewritten seqid.
//! - `binary`: the Thrift binary protocol primitives the decoders above share (private).
//! - `fuzz`: `exercise`, the body of the `cargo fuzz` target and of the seed-corpus test.
//!
//! Wire reference: <https://github.com/apache/thrift/blob/master/doc/specs/thrift-binary-protocol.md>
//! and <https://github.com/apache/thrift/blob/master/doc/specs/thrift-rpc.md>.

mod application_exception;
mod binary;
mod control;
mod decoder;
mod framing;
mod fuzz;
mod hello;
mod inflight;
mod message;
mod salvage;
#[cfg(test)]
mod testing;

pub use application_exception::{
    ExceptionCode, Mark, application_exception, exception_mark, marked_application_exception,
    parse_application_exception,
};
pub use control::{heartbeat, ping_reply, stop, stop_confirm};
pub use decoder::{Decoded, FrameDecoder, Head, Oversized};
pub use framing::{DEFAULT_MAX_FRAME_SIZE, FrameError, LENGTH_PREFIX, decode_frame};
#[doc(hidden)]
pub use fuzz::exercise;
pub use hello::Hello;
pub use inflight::InFlight;
pub use message::{
    HeaderError, MAX_NAME_LEN, Message, MessageType, VERSION_1, VERSION_MASK, encode_message,
};
pub use salvage::salvage_name_and_seqid;
