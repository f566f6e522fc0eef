//! The Thrift bytes the harness speaks (CONTRACT section 2): the `echo(1: string s)` call of
//! `idl/echo.thrift`, hand-encoded (framed transport, strict binary protocol), and the few
//! header reads the load generator and the echo backend need. Built on `rpc-frame`.
//!
//! A call is laid out as `head | payload | STOP`, where `head` ends with the string's length
//! and `payload` is the string itself; the load generator shares one payload between all its
//! calls and only rewrites the seqid inside `head`.

use rpc_frame::{LENGTH_PREFIX, MessageType};

/// Thrift type byte of a `string` field.
const T_STRING: u8 = 11;

/// Bytes of a strict header besides the name: version word, name length, seqid.
const HEADER_FIXED: usize = 12;

/// Bytes in front of the string: field type, field id, string length.
const FIELD_HEAD: usize = 7;

/// The fixed parts of an `echo` call whose string argument is `payload_len` bytes long.
#[derive(Debug, Clone)]
pub struct CallHead {
    /// Length prefix, strict header, field header and string length.
    pub bytes: Vec<u8>,
    /// Offset of the seqid in `bytes`.
    pub seqid_at: usize,
}

// === impl CallHead ===

impl CallHead {
    /// The head of a CALL named `name` (`echo:echo` for a multiplexed client, `echo` for a
    /// plain one) carrying a string of `payload_len` bytes; the frame ends with one STOP byte.
    pub fn new(name: &str, payload_len: usize) -> Self {
        let payload = HEADER_FIXED + name.len() + FIELD_HEAD + payload_len + 1;
        let mut bytes = Vec::with_capacity(LENGTH_PREFIX + payload - payload_len - 1);
        bytes.extend_from_slice(&(payload as u32).to_be_bytes());
        bytes.extend_from_slice(
            &(rpc_frame::VERSION_1 | u32::from(MessageType::Call.as_u8())).to_be_bytes(),
        );
        bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        let seqid_at = bytes.len();
        bytes.extend_from_slice(&0i32.to_be_bytes());
        bytes.push(T_STRING);
        bytes.extend_from_slice(&1u16.to_be_bytes());
        bytes.extend_from_slice(&(payload_len as u32).to_be_bytes());
        CallHead { bytes, seqid_at }
    }

    /// Rewrites the seqid.
    pub fn set_seqid(&mut self, seqid: i32) {
        self.bytes[self.seqid_at..self.seqid_at + 4].copy_from_slice(&seqid.to_be_bytes());
    }
}

/// The trailer after the payload: the argument struct's STOP byte.
pub const TRAILER: [u8; 1] = [0];

/// The payload string of a call: printable, so a Python handler decodes it as text.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A whole `echo` call frame (head, payload, trailer), for one-off calls.
pub fn echo_call(name: &str, seqid: i32, payload_len: usize) -> Vec<u8> {
    let mut head = CallHead::new(name, payload_len);
    head.set_seqid(seqid);
    let mut frame = head.bytes;
    frame.extend_from_slice(&payload(payload_len));
    frame.extend_from_slice(&TRAILER);
    frame
}

/// Total bytes of the frame at the front of `buf` (length prefix included), once its length
/// prefix is in. Lengths are not checked here: the peers of the harness are trusted.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let word: [u8; 4] = buf.get(..LENGTH_PREFIX)?.try_into().ok()?;
    Some(LENGTH_PREFIX + u32::from_be_bytes(word) as usize)
}

/// What the harness reads from a frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The message type byte.
    pub message_type: u8,
    /// The sequence id.
    pub seqid: i32,
    /// Offset of the body (the struct after the header) in the frame.
    pub body_at: usize,
}

/// Reads the strict header of a whole frame (length prefix included).
pub fn header(frame: &[u8]) -> Option<Header> {
    let word = u32::from_be_bytes(frame.get(4..8)?.try_into().ok()?);
    if word & rpc_frame::VERSION_MASK != rpc_frame::VERSION_1 {
        return None;
    }
    let name_len = u32::from_be_bytes(frame.get(8..12)?.try_into().ok()?) as usize;
    let seqid_at = 12usize.checked_add(name_len)?;
    let seqid = i32::from_be_bytes(frame.get(seqid_at..seqid_at + 4)?.try_into().ok()?);
    Some(Header {
        message_type: word as u8,
        seqid,
        body_at: seqid_at + 4,
    })
}

/// A one-line description of a frame that is not a normal reply (for error reports): the
/// `TApplicationException` text, or the type.
pub fn describe_failure(frame: &[u8]) -> String {
    match header(frame) {
        Some(h) if h.message_type == MessageType::Exception.as_u8() => {
            match rpc_frame::parse_application_exception(&frame[h.body_at..]) {
                Some((code, text)) => format!("exception code {code}: {text}"),
                None => "undecodable exception".to_owned(),
            }
        }
        Some(h) => format!("unexpected message type {}", h.message_type),
        None => "not a strict binary message".to_owned(),
    }
}

/// Turns a CALL frame into its REPLY in place, the way a Thrift processor answers
/// `echo(s)`: same name and seqid, result struct `{0: string s}` (the argument struct with its
/// field id set to 0). A heartbeat is echoed unchanged. Returns false for frames that get no
/// answer (ONEWAY, anything else).
pub fn echo_in_place(frame: &mut [u8]) -> bool {
    let Some(h) = header(frame) else {
        return false;
    };
    match MessageType::from_u8(h.message_type) {
        MessageType::Call => {
            frame[7] = MessageType::Reply.as_u8();
            if frame.get(h.body_at) == Some(&T_STRING) && frame.len() >= h.body_at + 3 {
                frame[h.body_at + 1] = 0;
                frame[h.body_at + 2] = 0;
            }
            true
        }
        MessageType::Heartbeat => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn call_is_a_valid_frame_with_the_string_argument() {
        let frame = echo_call("echo:echo", 42, 100);
        let mut buf = BytesMut::from(&frame[..]);
        let decoded = rpc_frame::decode_frame(&mut buf, rpc_frame::DEFAULT_MAX_FRAME_SIZE)
            .unwrap()
            .unwrap();
        assert!(buf.is_empty());
        let message = rpc_frame::Message::parse(decoded).unwrap();
        assert_eq!(message.name(), "echo:echo");
        assert_eq!(message.seqid(), 42);
        assert_eq!(message.message_type(), MessageType::Call);
        let body = message.body();
        assert_eq!(&body[..3], &[11, 0, 1]);
        assert_eq!(u32::from_be_bytes(body[3..7].try_into().unwrap()), 100);
        assert_eq!(body.len(), 7 + 100 + 1);
        assert_eq!(frame_len(&frame), Some(frame.len()));
    }

    #[test]
    fn echo_reply_keeps_name_and_seqid_and_answers_field_zero() {
        let mut frame = echo_call("echo", 7, 5);
        assert!(echo_in_place(&mut frame));
        let h = header(&frame).unwrap();
        assert_eq!(h.message_type, 2);
        assert_eq!(h.seqid, 7);
        assert_eq!(&frame[h.body_at..h.body_at + 3], &[11, 0, 0]);
        let mut ping = rpc_frame::heartbeat(0).to_vec();
        let before = ping.clone();
        assert!(echo_in_place(&mut ping));
        assert_eq!(ping, before);
    }

    #[test]
    fn failures_are_described() {
        let e = rpc_frame::application_exception(
            "echo",
            1,
            rpc_frame::ExceptionCode::Unknown,
            "Service: x Not Found",
        );
        assert_eq!(
            describe_failure(&e),
            "exception code 0: Service: x Not Found"
        );
    }
}
