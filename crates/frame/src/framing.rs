//! The framed transport: every message on every hop travels as a 4-byte big-endian length and
//! that many bytes. [`decode_frame`] cuts whole frames out of a connection's read buffer (the
//! first step of every reader in the mesh), refusing lengths `<= 0` and over the maximum before
//! the body arrives.

use bytes::BytesMut;

use crate::binary::read_u32;

/// Largest frame accepted by default (the Go original's `DEFAULT_MAX_LENGTH`).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384_000;

/// Bytes of the big-endian length prefix in front of every frame.
pub const LENGTH_PREFIX: usize = 4;

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

/// Most spare capacity [`decode_frame`] reserves for a frame still arriving. The length prefix
/// comes from the peer, so it must not decide how much memory is reserved up front; larger
/// frames grow the buffer as their bytes actually arrive.
const RESERVE_CAP: usize = 64 * 1024;

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

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;
    use crate::MessageType;
    use crate::testing::{MAX, frame_of, raw_frame};

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
}
