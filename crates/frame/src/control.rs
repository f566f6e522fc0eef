//! The mesh's own control frames (CONTRACT section 2): heartbeat pings between every hop, the
//! proxy's answer to a client's ping, and the STOP / STOP_CONFIRM exchange between a worker and
//! its LB. Each is a header with an empty struct body.

use bytes::BytesMut;

use crate::binary::TYPE_STOP;
use crate::{MessageType, encode_message};

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
    use crate::testing::reframe;

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
}
