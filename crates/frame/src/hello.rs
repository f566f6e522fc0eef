//! HELLO, the first frame a worker sends its LB (CONTRACT section 7): [`Hello`] encodes the
//! worker's capacity announcement and decodes it on the LB's side.

use bytes::BytesMut;

use crate::binary::{MAX_SKIP_DEPTH, Reader, TYPE_I32, TYPE_STOP, TYPE_STRING};
use crate::{MessageType, encode_message};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_MAX_FRAME_SIZE, Message, decode_frame};

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
}
