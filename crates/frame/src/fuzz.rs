//! The fuzzing entry point: [`exercise`] runs every decoder of this crate over arbitrary bytes
//! and checks the invariants that hold for any input. It is the body of the `cargo fuzz` target
//! (`fuzz/`) and of the seed-corpus test (`tests/fuzz_corpus.rs`).

use bytes::BytesMut;

use crate::{Hello, Message, decode_frame, parse_application_exception};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::reframe;
    use crate::{LENGTH_PREFIX, MessageType, encode_message};

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
}
