//! The strict binary message header every frame starts with (type, name, seqid), as
//! [`Message`]: parsed once right after [`crate::decode_frame`], read by routing (the
//! `service:method` name), rewritten in place on the way through (seqid, `service:` prefix),
//! and written by [`encode_message`] for the frames the mesh originates itself.

use bytes::{Buf, BufMut, BytesMut};

use crate::LENGTH_PREFIX;
use crate::binary::read_u32;

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
pub(crate) const NAME_AT: usize = LENGTH_PREFIX + 8;

/// Bytes of a header besides the name: version word, name length, seqid.
const HEADER_FIXED: usize = 12;

/// Writes a length prefix and a strict header for a payload whose body is `body_len` bytes.
///
/// Lengths are written as `u32`; callers keep names within [`MAX_NAME_LEN`] and bodies within
/// the frame size limit, far below 2 GiB.
pub(crate) fn put_header(
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
    /// Parses the header of a frame returned by [`decode_frame`](crate::decode_frame).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{frame_of, parse_ok, raw_frame, reframe};

    fn parse_err(frame: &[u8]) -> HeaderError {
        match Message::parse(BytesMut::from(frame)) {
            Ok(message) => panic!("parsed {message:?}"),
            Err((back, err)) => {
                assert_eq!(&back[..], frame, "the frame is handed back unchanged");
                err
            }
        }
    }

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
}
