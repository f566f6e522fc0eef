//! Thrift framed transport and strict binary message headers: the bytes every hop of the mesh
//! speaks (CONTRACT section 2). Sits under the proxy, the LB and the Python worker extension, so
//! it depends on `bytes` and `thiserror` only (no tokio, no ZooKeeper).
//!
//! # Layout
//! - [`InFlight`]: calls in flight on one multiplexed connection, by rewritten seqid.
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

use bytes::{Buf, BufMut, BytesMut};

mod inflight;
pub use inflight::InFlight;

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

/// Offset of the message name in a frame: length prefix, version word, name length.
const NAME_AT: usize = LENGTH_PREFIX + 8;

/// Bytes of a header besides the name: version word, name length, seqid.
const HEADER_FIXED: usize = 12;

/// Most spare capacity [`decode_frame`] reserves for a frame still arriving. The length prefix
/// comes from the peer, so it must not decide how much memory is reserved up front; larger
/// frames grow the buffer as their bytes actually arrive.
const RESERVE_CAP: usize = 64 * 1024;

/// Deepest nesting of containers [`parse_application_exception`] skips through before it
/// gives up (bounds its recursion on hostile input).
const MAX_SKIP_DEPTH: u32 = 32;

/// The big-endian `u32` at `at`, or `None` if `bytes` ends first.
fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    word.try_into().ok().map(u32::from_be_bytes)
}

/// Writes a length prefix and a strict header for a payload whose body is `body_len` bytes.
///
/// Lengths are written as `u32`; callers keep names within [`MAX_NAME_LEN`] and bodies within
/// the frame size limit, far below 2 GiB.
fn put_header(
    buf: &mut BytesMut,
    message_type: MessageType,
    name: &str,
    seqid: i32,
    body_len: usize,
) {
    let payload = HEADER_FIXED + name.len() + body_len;
    buf.put_u32(payload as u32);
    buf.put_u32(VERSION_1 | u32::from(message_type.as_u8()));
    buf.put_u32(name.len() as u32);
    buf.put_slice(name.as_bytes());
    buf.put_i32(seqid);
}

/// Cuts one frame out of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (nothing is consumed), and
/// otherwise the whole frame **including its 4-byte length prefix**, split off the front of
/// `buf` without copying. While a frame is incomplete, at most 64 KiB of spare capacity is
/// reserved for it, whatever its announced length.
///
/// # Errors
/// * [`FrameError::NonPositiveLength`] if the length prefix is `<= 0`.
/// * [`FrameError::TooLarge`] if it is above `max_frame_size`.
///
/// Both are reported as soon as the 4 length bytes are in, before the body arrives.
pub fn decode_frame(
    buf: &mut BytesMut,
    max_frame_size: usize,
) -> Result<Option<BytesMut>, FrameError> {
    let Some(word) = read_u32(buf, 0) else {
        return Ok(None);
    };
    let signed = word as i32;
    if signed <= 0 {
        return Err(FrameError::NonPositiveLength { len: signed });
    }
    // `signed` is positive, so this only fails where usize is narrower than 32 bits, and such a
    // length is too large for that target anyway.
    let len = usize::try_from(signed).unwrap_or(usize::MAX);
    if len > max_frame_size {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_size,
        });
    }
    let Some(total) = len.checked_add(LENGTH_PREFIX) else {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_size,
        });
    };
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(RESERVE_CAP));
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// An owned Thrift message: the whole frame (length prefix included) plus its parsed header.
///
/// Invariant: the bytes are always a valid frame with a strict header; every rewrite keeps the
/// length prefix equal to the payload length.
#[derive(Debug, Clone)]
pub struct Message {
    /// The whole frame: length prefix, header, body. The name always starts at [`NAME_AT`]
    /// (also after [`Message::strip_service`], which drops the front of the buffer).
    buf: BytesMut,
    /// Bytes of the name; checked to be UTF-8, and the 4-byte seqid follows it.
    name_len: usize,
    /// From the low byte of the version word.
    message_type: MessageType,
}

// === impl Message ===

impl Message {
    /// Parses the header of a frame returned by [`decode_frame`].
    ///
    /// Neither the frame nor the name is copied. If the length prefix disagrees with the
    /// frame's actual length (a frame put together by hand), it is rewritten to match.
    ///
    /// # Errors
    /// Any [`HeaderError`]; the frame is handed back so the caller can still answer.
    pub fn parse(frame: BytesMut) -> Result<Self, (BytesMut, HeaderError)> {
        match Self::check(&frame) {
            Ok((name_len, message_type)) => {
                let mut message = Self {
                    buf: frame,
                    name_len,
                    message_type,
                };
                message.fix_length_prefix();
                Ok(message)
            }
            Err(err) => Err((frame, err)),
        }
    }

    /// Validates the strict header of `frame`, returning the name length and the type.
    fn check(frame: &[u8]) -> Result<(usize, MessageType), HeaderError> {
        let word = read_u32(frame, LENGTH_PREFIX).ok_or(HeaderError::Truncated)?;
        if word & 0x8000_0000 == 0 {
            return Err(HeaderError::NotStrict);
        }
        if word & VERSION_MASK != VERSION_1 {
            return Err(HeaderError::BadVersion { word });
        }
        let raw_len = read_u32(frame, LENGTH_PREFIX + 4).ok_or(HeaderError::Truncated)? as i32;
        let name_len = match usize::try_from(raw_len) {
            Ok(len) if len <= MAX_NAME_LEN => len,
            _ => return Err(HeaderError::BadNameLength { len: raw_len }),
        };
        let name_end = NAME_AT + name_len;
        let name = frame.get(NAME_AT..name_end).ok_or(HeaderError::Truncated)?;
        if std::str::from_utf8(name).is_err() {
            return Err(HeaderError::InvalidUtf8);
        }
        if frame.len() < name_end + 4 {
            return Err(HeaderError::Truncated);
        }
        // Strict binary leaves bits 8..15 unused; the type is the low byte.
        Ok((name_len, MessageType::from_u8(word as u8)))
    }

    /// Makes the length prefix equal to the payload length (a no-op for decoded frames).
    fn fix_length_prefix(&mut self) {
        let payload = self.buf.len() - LENGTH_PREFIX;
        // A payload over 4 GiB cannot come from `decode_frame` (its lengths are positive i32s).
        if let Ok(payload) = u32::try_from(payload) {
            if read_u32(&self.buf, 0) != Some(payload) {
                self.buf[..LENGTH_PREFIX].copy_from_slice(&payload.to_be_bytes());
            }
        }
    }

    /// Offset of the seqid in the frame.
    fn seqid_at(&self) -> usize {
        NAME_AT + self.name_len
    }

    /// The name's bytes (UTF-8, checked by [`Message::parse`]).
    fn name_bytes(&self) -> &[u8] {
        self.buf.get(NAME_AT..self.seqid_at()).unwrap_or_default()
    }

    /// The message type.
    pub fn message_type(&self) -> MessageType {
        self.message_type
    }

    /// The whole name as sent (`service:method` from a multiplexed client).
    pub fn name(&self) -> &str {
        // `parse` checked these bytes are UTF-8 and `strip_service` only drops an ASCII-
        // delimited prefix, so the fallback is never taken.
        std::str::from_utf8(self.name_bytes()).unwrap_or_default()
    }

    /// `(service, method)` split at the first `:`, or `None` if the name has no `:`.
    pub fn service_and_method(&self) -> Option<(&str, &str)> {
        self.name().split_once(':')
    }

    /// The name after the first `:`, or the whole name if it has none.
    pub fn method(&self) -> &str {
        let name = self.name();
        name.split_once(':').map_or(name, |(_, method)| method)
    }

    /// The sequence id.
    pub fn seqid(&self) -> i32 {
        // The header check guarantees the 4 seqid bytes; 0 is never returned in practice.
        read_u32(&self.buf, self.seqid_at()).map_or(0, |word| word as i32)
    }

    /// Overwrites the sequence id in place (4 bytes).
    pub fn set_seqid(&mut self, seqid: i32) {
        let at = self.seqid_at();
        if let Some(dst) = self.buf.get_mut(at..at + 4) {
            dst.copy_from_slice(&seqid.to_be_bytes());
        }
    }

    /// Removes the `service:` prefix from the name, in place and without copying the body:
    /// the new, shorter header is written so that it ends where the old one ended, the front
    /// of the buffer is dropped, and the length prefix is rewritten. No-op without a `:`.
    ///
    /// The version word (type included) and the seqid are kept as they were.
    pub fn strip_service(&mut self) {
        let Some(colon) = self.name_bytes().iter().position(|&b| b == b':') else {
            return;
        };
        // The dropped prefix: `service:`. The method's bytes already sit right before the
        // seqid, so only the 12 bytes in front of them (prefix, version, name length) move.
        let cut = colon + 1;
        let Some(word) = read_u32(&self.buf, LENGTH_PREFIX) else {
            return;
        };
        let name_len = self.name_len - cut;
        let payload = self.buf.len() - LENGTH_PREFIX - cut;
        let mut head = [0u8; NAME_AT];
        head[..4].copy_from_slice(&(payload as u32).to_be_bytes());
        head[4..8].copy_from_slice(&word.to_be_bytes());
        head[8..].copy_from_slice(&(name_len as u32).to_be_bytes());
        // `cut <= name_len`, so the destination lies inside the old header.
        let Some(dst) = self.buf.get_mut(cut..cut + NAME_AT) else {
            return;
        };
        dst.copy_from_slice(&head);
        self.buf.advance(cut);
        self.name_len = name_len;
    }

    /// The bytes after the header (the argument or result struct), untouched.
    pub fn body(&self) -> &[u8] {
        self.buf.get(self.seqid_at() + 4..).unwrap_or_default()
    }

    /// The whole frame as it goes on the wire (length prefix included).
    pub fn as_wire(&self) -> &[u8] {
        &self.buf
    }

    /// Gives back the whole frame as it goes on the wire (length prefix included).
    pub fn into_wire(self) -> BytesMut {
        self.buf
    }
}

/// The name (its method part) and seqid of a frame whose header [`Message::parse`] refused,
/// where they can still be read, so that a code-7 reply reaches the right caller: an
/// old-style (non-strict) header `i32 name_len, name, i8 type, i32 seqid`, or a strict one
/// `i32 version, i32 name_len, name, i32 seqid` whose version word or name bytes are bad.
/// `frame` includes the length prefix. `None` when the name length or the seqid cannot be
/// found (no seqid is invented). The proxy and the LB front answer bad headers by this rule.
pub fn salvage_name_and_seqid(frame: &[u8], error: &HeaderError) -> Option<(String, i32)> {
    let payload = frame.get(LENGTH_PREFIX..)?;
    let (name_at, seqid_gap) = match error {
        HeaderError::NotStrict => (4, 1),
        HeaderError::BadVersion { .. } | HeaderError::InvalidUtf8 => (8, 0),
        _ => return None,
    };
    let len = i32::from_be_bytes(payload.get(name_at - 4..name_at)?.try_into().ok()?);
    let len = usize::try_from(len).ok().filter(|l| *l <= MAX_NAME_LEN)?;
    let name = String::from_utf8_lossy(payload.get(name_at..name_at + len)?);
    let seqid_at = name_at + len + seqid_gap;
    let seqid = i32::from_be_bytes(payload.get(seqid_at..seqid_at + 4)?.try_into().ok()?);
    let method = name.split_once(':').map_or(&*name, |(_, method)| method);
    Some((method.to_owned(), seqid))
}

/// Builds a whole frame (length prefix included) from a header and an already encoded body.
///
/// The name should be at most [`MAX_NAME_LEN`] bytes and the frame within the peer's maximum
/// frame size, or the receiving end refuses it.
pub fn encode_message(message_type: MessageType, name: &str, seqid: i32, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(NAME_AT + name.len() + 4 + body.len());
    put_header(&mut buf, message_type, name, seqid, body.len());
    buf.put_slice(body);
    buf
}

/// Builds a `TApplicationException` frame `(name, EXCEPTION, seqid)` whose body is the
/// struct `{1: string message, 2: i32 type}` followed by a stop byte.
///
/// The body is byte for byte what Apache Thrift's `TApplicationException.write` produces.
pub fn application_exception(
    name: &str,
    seqid: i32,
    code: ExceptionCode,
    message: &str,
) -> BytesMut {
    // Field header (3) + length (4) + message, field header (3) + i32 (4), stop (1).
    let body_len = 15 + message.len();
    let mut buf = BytesMut::with_capacity(NAME_AT + name.len() + 4 + body_len);
    put_header(&mut buf, MessageType::Exception, name, seqid, body_len);
    buf.put_u8(TYPE_STRING);
    buf.put_i16(1);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message.as_bytes());
    buf.put_u8(TYPE_I32);
    buf.put_i16(2);
    buf.put_i32(code as i32);
    buf.put_u8(TYPE_STOP);
    buf
}

/// Thrift binary field type: end of struct.
const TYPE_STOP: u8 = 0;
/// Thrift binary field type: i32.
const TYPE_I32: u8 = 8;
/// Thrift binary field type: string / binary.
const TYPE_STRING: u8 = 11;

/// Decodes the body of a `TApplicationException` frame into `(code, message)`; `None` if the
/// body is not such a struct. Used by tests and by the worker's logs.
///
/// As in Apache Thrift, fields may come in any order, unknown fields are skipped, a missing
/// message reads as `""` and a missing code as 0; a message that is not UTF-8 is decoded
/// lossily. Bytes after the struct's stop byte make the body malformed.
pub fn parse_application_exception(body: &[u8]) -> Option<(i32, String)> {
    let mut reader = Reader { rest: body };
    let mut code = 0;
    let mut message = String::new();
    loop {
        let field_type = reader.u8()?;
        if field_type == TYPE_STOP {
            break;
        }
        let id = reader.i16()?;
        match (id, field_type) {
            (1, TYPE_STRING) => {
                let bytes = reader.binary()?;
                message = String::from_utf8_lossy(bytes).into_owned();
            }
            (2, TYPE_I32) => code = reader.i32()?,
            _ => reader.skip(field_type, MAX_SKIP_DEPTH)?,
        }
    }
    reader.rest.is_empty().then_some((code, message))
}

/// The worker's capacity announcement (NEW, CONTRACT section 7): `("hello", 23, 0)` with the
/// struct `{1: i32 pool_size, 2: i32 pid, 3: string service}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// Calls the worker process runs at once.
    pub pool_size: i32,
    /// The worker's process id.
    pub pid: i32,
    /// The service it serves (may be empty).
    pub service: String,
}

impl Hello {
    /// The whole HELLO frame (length prefix included).
    pub fn encode(&self) -> BytesMut {
        let mut body = Vec::with_capacity(32 + self.service.len());
        body.extend_from_slice(&[TYPE_I32, 0, 1]);
        body.extend_from_slice(&self.pool_size.to_be_bytes());
        body.extend_from_slice(&[TYPE_I32, 0, 2]);
        body.extend_from_slice(&self.pid.to_be_bytes());
        body.extend_from_slice(&[TYPE_STRING, 0, 3]);
        body.extend_from_slice(&(self.service.len() as i32).to_be_bytes());
        body.extend_from_slice(self.service.as_bytes());
        body.push(TYPE_STOP);
        encode_message(MessageType::Hello, "hello", 0, &body)
    }

    /// Decodes a HELLO body; unknown fields are skipped, missing ones read as zero/empty.
    /// `None` when the body is not such a struct.
    pub fn decode(body: &[u8]) -> Option<Self> {
        let mut reader = Reader { rest: body };
        let mut hello = Hello::default();
        loop {
            let field_type = reader.u8()?;
            if field_type == TYPE_STOP {
                return Some(hello);
            }
            match (reader.i16()?, field_type) {
                (1, TYPE_I32) => hello.pool_size = reader.i32()?,
                (2, TYPE_I32) => hello.pid = reader.i32()?,
                (3, TYPE_STRING) => {
                    hello.service = String::from_utf8_lossy(reader.binary()?).into_owned()
                }
                _ => reader.skip(field_type, MAX_SKIP_DEPTH)?,
            }
        }
    }
}

/// Runs every decoder of this crate over arbitrary bytes and checks the invariants that must
/// hold for any input (the body of the `cargo fuzz` target in `fuzz/`, and of the corpus test
/// that keeps it honest on stable Rust). Panics only when an invariant breaks.
#[doc(hidden)]
pub fn exercise(data: &[u8]) {
    const MAX: usize = 1 << 16;
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        let frame = match decode_frame(&mut buf, MAX) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumes nothing");
                return;
            }
            Err(_) => return,
        };
        assert_eq!(
            frame.len(),
            before - buf.len(),
            "the frame is cut off the front"
        );
        let Ok(mut message) = Message::parse(frame) else {
            continue;
        };
        let (kind, seqid, body) = (
            message.message_type(),
            message.seqid(),
            message.body().to_vec(),
        );
        let method = message.method().to_owned();
        let _ = parse_application_exception(message.body());
        let _ = Hello::decode(message.body());
        message.strip_service();
        message.set_seqid(seqid.wrapping_add(1));
        let mut wire = BytesMut::from(message.as_wire());
        let again = decode_frame(&mut wire, usize::MAX)
            .ok()
            .flatten()
            .and_then(|f| Message::parse(f).ok())
            .expect("a rewritten message is a valid frame");
        assert!(wire.is_empty());
        assert_eq!(again.message_type(), kind);
        assert_eq!(again.name(), method);
        assert_eq!(again.seqid(), seqid.wrapping_add(1));
        assert_eq!(again.body(), &body[..]);
    }
}

/// A cursor over Thrift binary-encoded bytes; every read returns `None` past the end.
struct Reader<'a> {
    /// The bytes not read yet.
    rest: &'a [u8],
}

// === impl Reader ===

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn i16(&mut self) -> Option<i16> {
        self.take(2)?.try_into().ok().map(i16::from_be_bytes)
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4)?.try_into().ok().map(i32::from_be_bytes)
    }

    /// A length-prefixed string or binary; a negative length is malformed.
    fn binary(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.i32()?).ok()?;
        self.take(len)
    }

    /// A container's element count; a negative count is malformed.
    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.i32()?).ok()
    }

    /// Skips one value of `field_type`, nesting at most `depth` containers deep.
    ///
    /// Every value takes at least one byte, so a hostile element count fails as soon as the
    /// bytes run out: the work is bounded by the input length.
    fn skip(&mut self, field_type: u8, depth: u32) -> Option<()> {
        match field_type {
            2 | 3 => self.take(1).map(drop),    // bool, byte
            6 => self.take(2).map(drop),        // i16
            TYPE_I32 => self.take(4).map(drop), // i32
            4 | 10 => self.take(8).map(drop),   // double, i64
            16 => self.take(16).map(drop),      // uuid
            TYPE_STRING => self.binary().map(drop),
            12 => {
                let depth = depth.checked_sub(1)?;
                loop {
                    let inner = self.u8()?;
                    if inner == TYPE_STOP {
                        return Some(());
                    }
                    self.take(2)?;
                    self.skip(inner, depth)?;
                }
            }
            13 => {
                let depth = depth.checked_sub(1)?;
                let key = self.u8()?;
                let value = self.u8()?;
                for _ in 0..self.count()? {
                    self.skip(key, depth)?;
                    self.skip(value, depth)?;
                }
                Some(())
            }
            14 | 15 => {
                let depth = depth.checked_sub(1)?;
                let element = self.u8()?;
                for _ in 0..self.count()? {
                    self.skip(element, depth)?;
                }
                Some(())
            }
            _ => None,
        }
    }
}

/// The body of every control message: an empty struct (its stop byte).
const EMPTY_STRUCT: &[u8] = &[TYPE_STOP];

/// `("ping", HEARTBEAT, seqid)` with an empty struct body (one `0x00` byte).
pub fn heartbeat(seqid: i32) -> BytesMut {
    encode_message(MessageType::Heartbeat, "ping", seqid, EMPTY_STRUCT)
}

/// The proxy's answer to a client's type-20 ping: `("ping", REPLY, seqid)`, empty struct body.
pub fn ping_reply(seqid: i32) -> BytesMut {
    encode_message(MessageType::Reply, "ping", seqid, EMPTY_STRUCT)
}

/// `("stop", STOP, 0)` with an empty struct body.
pub fn stop() -> BytesMut {
    encode_message(MessageType::Stop, "stop", 0, EMPTY_STRUCT)
}

/// `("stop_confirm", STOP_CONFIRM, 0)` with an empty struct body.
pub fn stop_confirm() -> BytesMut {
    encode_message(MessageType::StopConfirm, "stop_confirm", 0, EMPTY_STRUCT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = DEFAULT_MAX_FRAME_SIZE;

    fn frame_of(message_type: MessageType, name: &str, seqid: i32, body: &[u8]) -> BytesMut {
        encode_message(message_type, name, seqid, body)
    }

    fn parse_ok(frame: BytesMut) -> Message {
        match Message::parse(frame) {
            Ok(message) => message,
            Err((_, err)) => panic!("parse failed: {err}"),
        }
    }

    fn parse_err(frame: &[u8]) -> HeaderError {
        match Message::parse(BytesMut::from(frame)) {
            Ok(message) => panic!("parsed {message:?}"),
            Err((back, err)) => {
                assert_eq!(&back[..], frame, "the frame is handed back unchanged");
                err
            }
        }
    }

    /// A frame whose payload is exactly `payload`.
    fn raw_frame(payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.put_slice(payload);
        buf
    }

    /// Frames `payload` and decodes it back, checking it travels intact.
    fn reframe(wire: &[u8]) -> Message {
        let mut buf = BytesMut::from(wire);
        let frame = decode_frame(&mut buf, MAX).unwrap().expect("a whole frame");
        assert!(buf.is_empty());
        parse_ok(frame)
    }

    // --- decode_frame ---

    #[test]
    fn byte_at_a_time_two_frames() {
        let first = frame_of(
            MessageType::Call,
            "svc:first",
            7,
            b"\x08\x00\x01\x00\x00\x00\x2a\x00",
        );
        let second = frame_of(MessageType::Oneway, "svc:second", -3, &[0u8; 300]);
        let mut wire = first.to_vec();
        wire.extend_from_slice(&second);

        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for (i, byte) in wire.iter().enumerate() {
            buf.put_u8(*byte);
            let before = buf.len();
            match decode_frame(&mut buf, MAX).unwrap() {
                Some(frame) => frames.push((i, frame)),
                None => assert_eq!(buf.len(), before, "nothing consumed"),
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, first.len() - 1);
        assert_eq!(frames[0].1, first);
        assert_eq!(frames[1].0, wire.len() - 1);
        assert_eq!(frames[1].1, second);
        assert!(buf.is_empty());
        assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
    }

    #[test]
    fn short_prefix_is_incomplete() {
        for n in 0..4 {
            let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..n]);
            assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
            assert_eq!(buf.len(), n);
        }
    }

    #[test]
    fn bad_lengths_rejected_from_the_prefix_alone() {
        let cases: [(u32, FrameError); 5] = [
            (0, FrameError::NonPositiveLength { len: 0 }),
            (0xffff_ffff, FrameError::NonPositiveLength { len: -1 }),
            (0x8000_0000, FrameError::NonPositiveLength { len: i32::MIN }),
            (
                MAX as u32 + 1,
                FrameError::TooLarge {
                    len: MAX + 1,
                    max: MAX,
                },
            ),
            (
                0x7fff_ffff,
                FrameError::TooLarge {
                    len: 0x7fff_ffff,
                    max: MAX,
                },
            ),
        ];
        for (word, expected) in cases {
            let mut buf = BytesMut::from(&word.to_be_bytes()[..]);
            assert_eq!(decode_frame(&mut buf, MAX), Err(expected));
        }
    }

    #[test]
    fn hostile_length_reserves_little() {
        let mut buf = BytesMut::from(&(MAX as u32).to_be_bytes()[..]);
        assert_eq!(decode_frame(&mut buf, MAX), Ok(None));
        assert!(buf.capacity() <= LENGTH_PREFIX + 2 * RESERVE_CAP);
    }

    #[test]
    fn frame_exactly_at_max_accepted() {
        let max = 100;
        let mut buf = raw_frame(&[0xabu8; 100]);
        buf.put_slice(&[1, 2]);
        let frame = decode_frame(&mut buf, max).unwrap().expect("whole frame");
        assert_eq!(frame.len(), LENGTH_PREFIX + max);
        assert_eq!(&buf[..], &[1, 2]);

        let mut over = raw_frame(&[0xabu8; 101]);
        assert_eq!(
            decode_frame(&mut over, max),
            Err(FrameError::TooLarge { len: 101, max })
        );
    }

    #[test]
    fn smallest_frame_accepted() {
        let mut buf = raw_frame(&[0x42]);
        let frame = decode_frame(&mut buf, MAX).unwrap().expect("whole frame");
        assert_eq!(&frame[..], &[0, 0, 0, 1, 0x42]);
    }

    // --- header parsing ---

    #[test]
    fn non_strict_header_rejected() {
        // Old style: i32 name length, name, i8 type, i32 seqid.
        let mut payload = Vec::new();
        payload.extend_from_slice(&4i32.to_be_bytes());
        payload.extend_from_slice(b"ping");
        payload.push(1);
        payload.extend_from_slice(&9i32.to_be_bytes());
        payload.push(0);
        assert_eq!(parse_err(&raw_frame(&payload)), HeaderError::NotStrict);
        // An empty old-style name: the first word is 0.
        assert_eq!(
            parse_err(&raw_frame(&[0, 0, 0, 0, 1, 0, 0, 0, 0])),
            HeaderError::NotStrict
        );
    }

    #[test]
    fn bad_version_rejected() {
        for word in [0x8002_0001u32, 0x8000_0001, 0xffff_0001, 0x8101_0001] {
            let mut frame = frame_of(MessageType::Call, "a:b", 1, &[0]);
            frame[4..8].copy_from_slice(&word.to_be_bytes());
            assert_eq!(parse_err(&frame), HeaderError::BadVersion { word });
        }
    }

    #[test]
    fn unused_version_bits_ignored() {
        let mut frame = frame_of(MessageType::Call, "a:b", 1, &[0]);
        frame[4..8].copy_from_slice(&0x8001_7f04u32.to_be_bytes());
        let message = parse_ok(frame);
        assert_eq!(message.message_type(), MessageType::Oneway);
    }

    #[test]
    fn bad_name_length_rejected() {
        for len in [-1i32, i32::MIN, MAX_NAME_LEN as i32 + 1, i32::MAX] {
            let mut payload = VERSION_1.to_be_bytes().to_vec();
            payload[3] = 1;
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&[b'x'; 32]);
            assert_eq!(
                parse_err(&raw_frame(&payload)),
                HeaderError::BadNameLength { len }
            );
        }
    }

    #[test]
    fn longest_name_accepted() {
        let name = "n".repeat(MAX_NAME_LEN);
        let message = parse_ok(frame_of(MessageType::Call, &name, 5, &[0]));
        assert_eq!(message.name(), name);
        assert_eq!(message.seqid(), 5);
    }

    #[test]
    fn truncated_at_every_cut() {
        let whole = frame_of(MessageType::Call, "svc:method", 0x0102_0304, &[]);
        assert!(Message::parse(whole.clone()).is_ok());
        for cut in 0..whole.len() {
            // As cut, and with the length prefix matching the cut.
            assert_eq!(
                parse_err(&whole[..cut]),
                HeaderError::Truncated,
                "cut {cut}"
            );
            if cut >= LENGTH_PREFIX {
                let framed = raw_frame(&whole[LENGTH_PREFIX..cut]);
                assert_eq!(
                    parse_err(&framed),
                    HeaderError::Truncated,
                    "framed cut {cut}"
                );
            }
        }
    }

    #[test]
    fn invalid_utf8_name_rejected() {
        let mut frame = frame_of(MessageType::Call, "svc:meth", 1, &[0]);
        frame[NAME_AT + 5] = 0xff;
        assert_eq!(parse_err(&frame), HeaderError::InvalidUtf8);
    }

    #[test]
    fn utf8_names_are_kept() {
        let message = parse_ok(frame_of(MessageType::Call, "sérvice:méthode", 2, &[0]));
        assert_eq!(message.service_and_method(), Some(("sérvice", "méthode")));
        let mut message = message;
        message.strip_service();
        assert_eq!(message.name(), "méthode");
    }

    #[test]
    fn names_without_colon() {
        let frame = frame_of(MessageType::Call, "method", 11, b"\x00");
        let mut message = parse_ok(frame.clone());
        assert_eq!(message.service_and_method(), None);
        assert_eq!(message.method(), "method");
        message.strip_service();
        assert_eq!(message.as_wire(), &frame[..]);
        assert_eq!(message.name(), "method");

        let mut empty = parse_ok(frame_of(MessageType::Call, "", 12, b"\x00"));
        assert_eq!(empty.name(), "");
        assert_eq!(empty.method(), "");
        empty.strip_service();
        assert_eq!(empty.seqid(), 12);
    }

    #[test]
    fn split_at_first_colon() {
        let message = parse_ok(frame_of(MessageType::Call, "a:b:c", 1, &[0]));
        assert_eq!(message.service_and_method(), Some(("a", "b:c")));
        assert_eq!(message.method(), "b:c");
    }

    #[test]
    fn hand_built_prefix_is_fixed() {
        let mut frame = frame_of(MessageType::Call, "a:b", 1, &[0]);
        frame[..4].copy_from_slice(&1000u32.to_be_bytes());
        let message = parse_ok(frame);
        assert_eq!(reframe(message.as_wire()).name(), "a:b");
    }

    // --- round trips ---

    #[test]
    fn encode_decode_parse_round_trip() {
        let bodies: [&[u8]; 3] = [&[], &[0], &[7u8; 1000]];
        for message_type in (0..=255).map(MessageType::from_u8) {
            for name in ["", "m", "svc:method", "echo:echo_long_name_here"] {
                for seqid in [0, 1, -1, i32::MIN, i32::MAX] {
                    for body in bodies {
                        let wire = encode_message(message_type, name, seqid, body);
                        let message = reframe(&wire);
                        assert_eq!(message.message_type(), message_type);
                        assert_eq!(message.name(), name);
                        assert_eq!(message.seqid(), seqid);
                        assert_eq!(message.body(), body);
                        assert_eq!(message.as_wire(), &wire[..]);
                        assert_eq!(message.into_wire(), wire);
                    }
                }
            }
        }
    }

    #[test]
    fn encode_writes_the_exact_header() {
        let wire = encode_message(MessageType::Call, "a:b", 0x0a0b_0c0d, &[0]);
        assert_eq!(
            &wire[..],
            &[
                0, 0, 0, 16, 0x80, 0x01, 0, 1, 0, 0, 0, 3, b'a', b':', b'b', 0x0a, 0x0b, 0x0c,
                0x0d, 0
            ]
        );
    }

    #[test]
    fn strip_service_round_trip() {
        let body: Vec<u8> = (0..=255).collect();
        for service in [
            "a",
            "ab",
            "abcdefg",
            "echo",
            "a_much_longer_service_name",
            "",
        ] {
            for method in ["", "m", "echo", "b:c"] {
                let name = format!("{service}:{method}");
                let wire = encode_message(MessageType::Call, &name, -77, &body);
                let mut message = reframe(&wire);
                let body_ptr = message.body().as_ptr();
                message.strip_service();
                assert_eq!(message.body().as_ptr(), body_ptr, "the body did not move");
                assert_eq!(message.name(), method);
                assert_eq!(message.seqid(), -77);
                assert_eq!(message.body(), &body[..]);
                assert_eq!(message.message_type(), MessageType::Call);
                let expected = encode_message(MessageType::Call, method, -77, &body);
                assert_eq!(message.as_wire(), &expected[..], "name {name:?}");

                let again = reframe(message.as_wire());
                assert_eq!(again.name(), method);
                assert_eq!(again.seqid(), -77);
                assert_eq!(again.body(), &body[..]);
            }
        }
    }

    #[test]
    fn strip_service_twice() {
        let mut message = parse_ok(frame_of(MessageType::Call, "a:b:c", 3, &[0]));
        message.strip_service();
        assert_eq!(message.name(), "b:c");
        message.strip_service();
        assert_eq!(message.name(), "c");
        message.strip_service();
        assert_eq!(message.name(), "c");
        assert_eq!(
            message.as_wire(),
            &frame_of(MessageType::Call, "c", 3, &[0])[..]
        );
    }

    #[test]
    fn set_seqid_round_trip() {
        let mut message = parse_ok(frame_of(MessageType::Reply, "svc:m", 1, b"\x0b\x00"));
        for seqid in [0, 1, -1, 42, -42, i32::MIN, i32::MAX] {
            message.set_seqid(seqid);
            assert_eq!(message.seqid(), seqid);
            assert_eq!(message.name(), "svc:m");
            assert_eq!(message.body(), b"\x0b\x00");
            let again = reframe(message.as_wire());
            assert_eq!(again.seqid(), seqid);
        }
        message.strip_service();
        message.set_seqid(-5);
        assert_eq!(
            message.as_wire(),
            &frame_of(MessageType::Reply, "m", -5, b"\x0b\x00")[..]
        );
    }

    // --- TApplicationException ---

    #[test]
    fn application_exception_bytes() {
        let wire = application_exception("m", 9, ExceptionCode::ProtocolError, "bad");
        let message = reframe(&wire);
        assert_eq!(message.message_type(), MessageType::Exception);
        assert_eq!(message.name(), "m");
        assert_eq!(message.seqid(), 9);
        assert_eq!(
            message.body(),
            &[
                0x0b, 0, 1, 0, 0, 0, 3, b'b', b'a', b'd', 0x08, 0, 2, 0, 0, 0, 7, 0
            ]
        );
    }

    #[test]
    fn application_exception_round_trip() {
        let codes = [
            ExceptionCode::Unknown,
            ExceptionCode::UnknownMethod,
            ExceptionCode::InvalidMessageType,
            ExceptionCode::WrongMethodName,
            ExceptionCode::BadSequenceId,
            ExceptionCode::MissingResult,
            ExceptionCode::InternalError,
            ExceptionCode::ProtocolError,
        ];
        for (i, code) in codes.into_iter().enumerate() {
            let text = format!("Worker FOR svc.method Not Found ({i}) ünïcode");
            let wire = application_exception("method", -(i as i32), code, &text);
            let message = reframe(&wire);
            assert_eq!(message.seqid(), -(i as i32));
            assert_eq!(
                parse_application_exception(message.body()),
                Some((code as i32, text))
            );
        }
        let empty = reframe(&application_exception("", 0, ExceptionCode::Unknown, ""));
        assert_eq!(
            parse_application_exception(empty.body()),
            Some((0, String::new()))
        );
    }

    #[test]
    fn application_exception_any_order_and_unknown_fields() {
        let mut body = BytesMut::new();
        body.put_slice(&[0x08, 0, 2]);
        body.put_i32(6);
        // Unknown fields of every simple kind, a nested struct, a list and a map.
        body.put_slice(&[0x02, 0, 3, 1]);
        body.put_slice(&[0x03, 0, 4, 9]);
        body.put_slice(&[0x04, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0]);
        body.put_slice(&[0x06, 0, 6, 0, 1]);
        body.put_slice(&[0x0a, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1]);
        body.put_slice(&[0x0c, 0, 8, 0x08, 0, 1, 0, 0, 0, 1, 0]);
        body.put_slice(&[0x0f, 0, 9, 0x0b, 0, 0, 0, 2, 0, 0, 0, 1, b'x', 0, 0, 0, 0]);
        body.put_slice(&[0x0d, 0, 10, 0x08, 0x02, 0, 0, 0, 1, 0, 0, 0, 5, 1]);
        body.put_slice(&[0x0e, 0, 11, 0x03, 0, 0, 0, 0]);
        body.put_slice(&[0x10, 0, 12]);
        body.put_slice(&[0u8; 16]);
        // Field 1 with the wrong type is skipped, as Apache Thrift does.
        body.put_slice(&[0x08, 0, 1, 0, 0, 0, 0]);
        body.put_slice(&[0x0b, 0, 1, 0, 0, 0, 2, b'h', b'i']);
        body.put_u8(0);
        assert_eq!(
            parse_application_exception(&body),
            Some((6, "hi".to_owned()))
        );
    }

    #[test]
    fn application_exception_garbage_is_none() {
        let cases: [&[u8]; 14] = [
            &[],
            &[0x0b],
            &[0x0b, 0],
            &[0x0b, 0, 1],
            &[0x0b, 0, 1, 0xff, 0xff, 0xff, 0xff, 0],
            &[0x0b, 0, 1, 0x7f, 0xff, 0xff, 0xff, b'a', 0],
            &[0x0b, 0, 1, 0, 0, 0, 1, b'a'],
            &[0x08, 0, 2, 0, 0, 0],
            &[0x08, 0, 2, 0, 0, 0, 1],
            &[0x08, 0, 2, 0, 0, 0, 1, 0, 0],
            &[0x01, 0, 3, 0],
            &[0x0f, 0, 3, 0x00, 0, 0, 0, 1, 0],
            &[0x0f, 0, 3, 0x03, 0x7f, 0xff, 0xff, 0xff, 1, 2, 0],
            &[0x0d, 0, 3, 0x0b, 0x0b, 0xff, 0xff, 0xff, 0xfe, 0],
        ];
        for body in cases {
            assert_eq!(parse_application_exception(body), None, "{body:?}");
        }
        // Nested deeper than the limit.
        let mut deep = vec![0x0c, 0, 1];
        for _ in 0..10_000 {
            deep.extend_from_slice(&[0x0c, 0, 1]);
        }
        assert_eq!(parse_application_exception(&deep), None);
        let mut lists = vec![0x0f, 0, 1];
        for _ in 0..10_000 {
            lists.extend_from_slice(&[0x0f, 0, 0, 0, 1]);
        }
        assert_eq!(parse_application_exception(&lists), None);
    }

    // --- control messages ---

    #[test]
    fn control_messages() {
        let cases = [
            (heartbeat(-8), MessageType::Heartbeat, "ping", -8),
            (ping_reply(31), MessageType::Reply, "ping", 31),
            (stop(), MessageType::Stop, "stop", 0),
            (stop_confirm(), MessageType::StopConfirm, "stop_confirm", 0),
        ];
        for (wire, message_type, name, seqid) in cases {
            let message = reframe(&wire);
            assert_eq!(message.message_type(), message_type);
            assert_eq!(message.name(), name);
            assert_eq!(message.seqid(), seqid);
            assert_eq!(message.body(), &[0]);
        }
        assert_eq!(
            &heartbeat(1)[..],
            &[
                0, 0, 0, 17, 0x80, 1, 0, 20, 0, 0, 0, 4, b'p', b'i', b'n', b'g', 0, 0, 0, 1, 0
            ]
        );
    }

    #[test]
    fn message_type_round_trip() {
        for byte in 0..=255u8 {
            let message_type = MessageType::from_u8(byte);
            assert_eq!(message_type.as_u8(), byte);
            let named = matches!(byte, 1..=4 | 20..=23);
            assert_eq!(
                !named,
                matches!(message_type, MessageType::Other(_)),
                "{byte}"
            );
        }
        assert_eq!(MessageType::from_u8(1), MessageType::Call);
        assert_eq!(MessageType::from_u8(23), MessageType::Hello);
    }

    // --- robustness ---

    /// A small deterministic generator (xorshift64*), to avoid a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seed = encode_message(
            MessageType::Call,
            "svc:method",
            5,
            b"\x0b\x00\x01\x00\x00\x00\x01a\x00",
        );
        for round in 0..20_000 {
            // Mutate a valid frame half the time, otherwise pure noise.
            let mut bytes = if round % 2 == 0 {
                seed.to_vec()
            } else {
                (0..rng.below(48)).map(|_| rng.next() as u8).collect()
            };
            for _ in 0..rng.below(4) {
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.next() as u8;
                }
            }
            if round % 5 == 0 && !bytes.is_empty() {
                bytes.truncate(rng.below(bytes.len()));
            }

            let _ = parse_application_exception(&bytes);
            let _ = parse_application_exception(bytes.get(LENGTH_PREFIX..).unwrap_or_default());
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_frame(&mut buf, 64);
            if let Ok(mut message) = Message::parse(BytesMut::from(&bytes[..])) {
                let (name, seqid, body) = (
                    message.method().to_owned(),
                    message.seqid(),
                    message.body().to_vec(),
                );
                message.strip_service();
                message.set_seqid(seqid.wrapping_add(1));
                let again = reframe(message.as_wire());
                assert_eq!(again.name(), name);
                assert_eq!(again.seqid(), seqid.wrapping_add(1));
                assert_eq!(again.body(), &body[..]);
            }
        }
    }

    #[test]
    fn hello_round_trip_and_garbage() {
        let hello = Hello {
            pool_size: 4,
            pid: 1234,
            service: "echo".into(),
        };
        let mut wire = hello.encode();
        let frame = decode_frame(&mut wire, DEFAULT_MAX_FRAME_SIZE)
            .unwrap()
            .unwrap();
        let message = Message::parse(frame).unwrap();
        assert_eq!(message.message_type(), MessageType::Hello);
        assert_eq!((message.name(), message.seqid()), ("hello", 0));
        assert_eq!(Hello::decode(message.body()), Some(hello));
        assert_eq!(Hello::decode(&[0x08, 0x00]), None);
        assert_eq!(Hello::decode(&[0x00]), Some(Hello::default()));
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn legacy_header_fields_are_recovered() {
        let mut payload = 5i32.to_be_bytes().to_vec();
        payload.extend_from_slice(b"a:bcd");
        payload.push(1);
        payload.extend_from_slice(&42i32.to_be_bytes());
        let frame = frame(&payload);
        assert_eq!(
            Message::parse(frame.as_slice().into()).unwrap_err().1,
            HeaderError::NotStrict
        );
        assert_eq!(
            salvage_name_and_seqid(&frame, &HeaderError::NotStrict),
            Some(("bcd".to_owned(), 42))
        );
        assert_eq!(
            salvage_name_and_seqid(&frame[..10], &HeaderError::NotStrict),
            None
        );
    }

    #[test]
    fn strict_header_with_a_bad_name_or_version_keeps_its_seqid() {
        let mut payload = (VERSION_1 | 1).to_be_bytes().to_vec();
        payload.extend_from_slice(&7i32.to_be_bytes());
        payload.extend_from_slice(b"echo:\xff\xfe");
        payload.extend_from_slice(&31i32.to_be_bytes());
        payload.push(0);
        let bad_name = frame(&payload);
        let e = Message::parse(bad_name.as_slice().into()).unwrap_err().1;
        assert_eq!(e, HeaderError::InvalidUtf8);
        let (name, seqid) = salvage_name_and_seqid(&bad_name, &e).unwrap();
        assert_eq!((name.as_str(), seqid), ("\u{fffd}\u{fffd}", 31));

        payload[1] = 0x02;
        let bad_version = frame(&payload);
        let e = Message::parse(bad_version.as_slice().into()).unwrap_err().1;
        assert!(matches!(e, HeaderError::BadVersion { .. }), "{e:?}");
        assert_eq!(
            salvage_name_and_seqid(&bad_version, &e).map(|(_, s)| s),
            Some(31)
        );

        // No seqid to be found: none invented.
        let truncated = &bad_name[..bad_name.len() - 3];
        let seqid_cut = frame(&truncated[4..]);
        assert_eq!(
            salvage_name_and_seqid(&seqid_cut, &HeaderError::InvalidUtf8),
            None
        );
        assert_eq!(
            salvage_name_and_seqid(&bad_name, &HeaderError::Truncated),
            None
        );
        assert_eq!(
            salvage_name_and_seqid(&bad_name, &HeaderError::BadNameLength { len: -1 }),
            None
        );
    }
}
