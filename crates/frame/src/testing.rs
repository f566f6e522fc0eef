//! Helpers shared by the unit tests of this crate's modules: building frames by hand and
//! parsing them back.

use bytes::{BufMut, BytesMut};

use crate::{DEFAULT_MAX_FRAME_SIZE, Message, MessageType, decode_frame, encode_message};

/// The frame size limit the tests decode with.
pub(crate) const MAX: usize = DEFAULT_MAX_FRAME_SIZE;

/// A whole frame, as [`encode_message`] builds it.
pub(crate) fn frame_of(message_type: MessageType, name: &str, seqid: i32, body: &[u8]) -> BytesMut {
    encode_message(message_type, name, seqid, body)
}

/// The parsed message; panics if the header is refused.
pub(crate) fn parse_ok(frame: BytesMut) -> Message {
    match Message::parse(frame) {
        Ok(message) => message,
        Err((_, err)) => panic!("parse failed: {err}"),
    }
}

/// A frame whose payload is exactly `payload`.
pub(crate) fn raw_frame(payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf
}

/// Frames `payload` and decodes it back, checking it travels intact.
pub(crate) fn reframe(wire: &[u8]) -> Message {
    let mut buf = BytesMut::from(wire);
    let frame = decode_frame(&mut buf, MAX).unwrap().expect("a whole frame");
    assert!(buf.is_empty());
    parse_ok(frame)
}
