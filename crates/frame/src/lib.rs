//! Thrift framed transport and strict binary message headers: the bytes every hop of the mesh
//! speaks (CONTRACT section 2). Sits under the proxy, the LB and the Python worker extension, so
//! it depends on `bytes` and `thiserror` only (no tokio, no ZooKeeper).
//!
//! # Layout
//! - [`decode_frame`]: cut one length-prefixed frame out of a read buffer, refusing lengths
//!   `<= 0` and over the maximum.
//! - [`Message`]: an owned frame (length prefix included) whose strict binary header
//!   (type, name, seqid) was parsed once; the seqid and the `service:` prefix are rewritten in
//!   place, the body is never decoded or copied.
//! - [`encode_message`], [`application_exception`], [`heartbeat`], [`ping_reply`], [`stop`],
//!   [`stop_confirm`]: build the small frames the mesh originates itself.
//!
//! Wire reference: <https://github.com/apache/thrift/blob/master/doc/specs/thrift-binary-protocol.md>
//! and <https://github.com/apache/thrift/blob/master/doc/specs/thrift-rpc.md>.

use bytes::{BufMut, BytesMut};

/// Largest frame accepted by default (the Go original's `DEFAULT_MAX_LENGTH`).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384_000;

/// Bytes of the big-endian length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;

/// The strict binary protocol version word, OR-ed with the message type.
pub const VERSION_1: u32 = 0x8001_0000;

/// Mask selecting the version bits of the first header word.
pub const VERSION_MASK: u32 = 0xffff_0000;

/// Longest message name accepted in a header (names are `service:method`; anything longer
/// is garbage, not a name).
pub const MAX_NAME_LEN: usize = 4096;

/// A Thrift message type, including the mesh's own control types (CONTRACT section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// 1: a call expecting a reply.
    Call,
    /// 2: a normal reply (declared exceptions travel here too).
    Reply,
    /// 3: a `TApplicationException`.
    Exception,
    /// 4: a call without a reply.
    Oneway,
    /// 20: heartbeat ping, echoed by LBs and workers; answered by the proxy itself.
    Heartbeat,
    /// 21: worker to LB, take me out of rotation.
    Stop,
    /// 22: LB to worker, confirms STOP (or: nothing new is coming).
    StopConfirm,
    /// 23: worker to LB, announces capacity (NEW).
    Hello,
    /// Any other type byte; answered with a code-7 reply where it arrives.
    Other(u8),
}

impl MessageType {
    /// Maps the low byte of the header's first word to a type.
    pub fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Call,
            2 => Self::Reply,
            3 => Self::Exception,
            4 => Self::Oneway,
            20 => Self::Heartbeat,
            21 => Self::Stop,
            22 => Self::StopConfirm,
            23 => Self::Hello,
            other => Self::Other(other),
        }
    }

    /// The type byte written on the wire.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Call => 1,
            Self::Reply => 2,
            Self::Exception => 3,
            Self::Oneway => 4,
            Self::Heartbeat => 20,
            Self::Stop => 21,
            Self::StopConfirm => 22,
            Self::Hello => 23,
            Self::Other(other) => other,
        }
    }
}

/// `TApplicationException` type codes used by the mesh (Apache Thrift's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ExceptionCode {
    /// 0: service unknown.
    Unknown = 0,
    /// 1: method unknown to the processor.
    UnknownMethod = 1,
    /// 2: invalid message type.
    InvalidMessageType = 2,
    /// 3: wrong method name.
    WrongMethodName = 3,
    /// 4: bad sequence id.
    BadSequenceId = 4,
    /// 5: missing result.
    MissingResult = 5,
    /// 6: no endpoint, timeout, connection lost, handler error.
    InternalError = 6,
    /// 7: malformed frame or header.
    ProtocolError = 7,
}

/// A frame length that cannot be a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is zero or negative.
    #[error("frame length {len} is not positive")]
    NonPositiveLength {
        /// The length read, as a signed 32-bit integer.
        len: i32,
    },
    /// The length prefix is above the configured maximum.
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The length read.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// A frame whose payload is not a strict binary message header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The payload ends before the header does.
    #[error("message header truncated")]
    Truncated,
    /// The first word has no version bits: an old-style (non-strict) header.
    #[error("non-strict (old-style) binary header; use the strict binary protocol")]
    NotStrict,
    /// The version bits are not `0x8001`.
    #[error("bad protocol version word 0x{word:08x}")]
    BadVersion {
        /// The first header word.
        word: u32,
    },
    /// The name length is negative or above [`MAX_NAME_LEN`].
    #[error("bad message name length {len}")]
    BadNameLength {
        /// The name length read.
        len: i32,
    },
    /// The name is not UTF-8.
    #[error("message name is not valid UTF-8")]
    InvalidUtf8,
}

/// Cuts one frame out of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed), and
/// otherwise the whole frame **including its 4-byte length prefix**, split off the front of
/// `buf` without copying.
///
/// # Errors
/// * [`FrameError::NonPositiveLength`] if the length prefix is `<= 0`.
/// * [`FrameError::TooLarge`] if it is above `max_frame_size`.
///
/// Both are reported as soon as the 4 length bytes are in, before the body arrives.
pub fn decode_frame(buf: &mut BytesMut, max_frame_size: usize) -> Result<Option<BytesMut>, FrameError> {
    todo!()
}

/// An owned Thrift message: the whole frame (length prefix included) plus its parsed header.
///
/// Invariant: the bytes are always a valid frame with a strict header; every rewrite keeps the
/// length prefix equal to the payload length.
#[derive(Debug, Clone)]
pub struct Message {
    // private fields chosen by the implementation
}

impl Message {
    /// Parses the header of a frame returned by [`decode_frame`].
    ///
    /// # Errors
    /// Any [`HeaderError`]; the frame is handed back so the caller can still answer.
    pub fn parse(frame: BytesMut) -> Result<Self, (BytesMut, HeaderError)> {
        todo!()
    }

    /// The message type.
    pub fn message_type(&self) -> MessageType {
        todo!()
    }

    /// The whole name as sent (`service:method` from a multiplexed client).
    pub fn name(&self) -> &str {
        todo!()
    }

    /// `(service, method)` split at the first `:`, or `None` if the name has no `:`.
    pub fn service_and_method(&self) -> Option<(&str, &str)> {
        todo!()
    }

    /// The name after the first `:`, or the whole name if it has none.
    pub fn method(&self) -> &str {
        todo!()
    }

    /// The sequence id.
    pub fn seqid(&self) -> i32 {
        todo!()
    }

    /// Overwrites the sequence id in place (4 bytes).
    pub fn set_seqid(&mut self, seqid: i32) {
        todo!()
    }

    /// Removes the `service:` prefix from the name, in place and without copying the body:
    /// the new, shorter header is written so that it ends where the old one ended, the front
    /// of the buffer is dropped, and the length prefix is rewritten. No-op without a `:`.
    pub fn strip_service(&mut self) {
        todo!()
    }

    /// The bytes after the header (the argument or result struct), untouched.
    pub fn body(&self) -> &[u8] {
        todo!()
    }

    /// The whole frame as it goes on the wire (length prefix included).
    pub fn as_wire(&self) -> &[u8] {
        todo!()
    }

    /// Gives back the whole frame as it goes on the wire (length prefix included).
    pub fn into_wire(self) -> BytesMut {
        todo!()
    }
}

/// Builds a whole frame (length prefix included) from a header and an already encoded body.
pub fn encode_message(message_type: MessageType, name: &str, seqid: i32, body: &[u8]) -> BytesMut {
    todo!()
}

/// Builds a `TApplicationException` frame `(name, EXCEPTION, seqid)` whose body is the
/// struct `{1: string message, 2: i32 type}` followed by a stop byte.
pub fn application_exception(name: &str, seqid: i32, code: ExceptionCode, message: &str) -> BytesMut {
    todo!()
}

/// Decodes the body of a `TApplicationException` frame into `(code, message)`; `None` if the
/// body is not such a struct. Used by tests and by the worker's logs.
pub fn parse_application_exception(body: &[u8]) -> Option<(i32, String)> {
    todo!()
}

/// `("ping", HEARTBEAT, seqid)` with an empty struct body (one `0x00` byte).
pub fn heartbeat(seqid: i32) -> BytesMut {
    todo!()
}

/// The proxy's answer to a client's type-20 ping: `("ping", REPLY, seqid)`, empty struct body.
pub fn ping_reply(seqid: i32) -> BytesMut {
    todo!()
}

/// `("stop", STOP, 0)` with an empty struct body.
pub fn stop() -> BytesMut {
    todo!()
}

/// `("stop_confirm", STOP_CONFIRM, 0)` with an empty struct body.
pub fn stop_confirm() -> BytesMut {
    todo!()
}

#[allow(unused)]
fn _keep(b: &mut BytesMut) {
    b.put_u8(0);
}
