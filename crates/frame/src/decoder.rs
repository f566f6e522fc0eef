//! Cuts frames out of a connection's read buffer, and gets past a frame over the size limit
//! without buffering it: its head is kept (so the call it belongs to can be answered) and the
//! rest of its announced length is read and dropped, after which the stream is in step again
//! (CONTRACT section 9: one bad or oversized frame fails the one call it belongs to). Used by
//! every reader of the mesh: the multiplexed connections of `rpc-mux`, the proxy's client
//! connections, the LB's front, and the Python worker's connection to its LB.
//!
//! A length that cannot be trusted (`<= 0`), or an oversized frame whose first bytes are no
//! strict header (an HTTP request, random bytes), leaves the stream unframeable: that is an
//! error, and the connection is closed as before.

use bytes::{Buf, BytesMut};

use crate::{FrameError, LENGTH_PREFIX, MAX_NAME_LEN, MessageType, VERSION_1, VERSION_MASK};

/// Bytes of a strict header at most: version, name length, name, seqid.
const HEAD_MAX: usize = 4 + 4 + MAX_NAME_LEN + 4;

/// The header of a frame that was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Its message type.
    pub message_type: MessageType,
    /// Its name as sent (`service:method` from a client).
    pub name: String,
    /// Its seqid.
    pub seqid: i32,
}

impl Head {
    /// The method part of the name (after `service:`).
    pub fn method(&self) -> &str {
        self.name.split_once(':').map_or(&self.name, |(_, m)| m)
    }
}

/// A frame over the size limit, dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Its announced length.
    pub len: usize,
    /// Its header; `None` when the reader gave up waiting for it
    /// ([`FrameDecoder::give_up_head`]).
    pub head: Option<Head>,
}

/// What [`FrameDecoder::decode`] found.
#[derive(Debug)]
pub enum Decoded {
    /// A whole frame, length prefix included.
    Frame(BytesMut),
    /// A frame over the limit: skipped (its rest is dropped as it arrives).
    Oversized(Oversized),
}

/// Frame cutting state of one connection (module docs).
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_size: usize,
    /// Bytes of an oversized frame still to drop.
    skip: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames over `max_frame_size`.
    pub fn new(max_frame_size: usize) -> Self {
        FrameDecoder {
            max_frame_size,
            skip: 0,
        }
    }

    /// Whether a frame has begun and not ended: bytes of one are in `buf`, or an oversized
    /// one is being dropped. (Frame deadlines run while this holds.)
    pub fn in_frame(&self, buf: &BytesMut) -> bool {
        self.skip > 0 || !buf.is_empty()
    }

    /// Whether `buf` starts with an oversized frame whose header is not all in yet:
    /// [`FrameDecoder::decode`] waits for it (to answer the right call). A reader that must
    /// not wait (a client that may have sent only this much) calls
    /// [`FrameDecoder::give_up_head`].
    pub fn awaiting_head(&self, buf: &BytesMut) -> bool {
        self.skip == 0 && self.oversized_len(buf).is_some()
    }

    /// Skips the oversized frame at the start of `buf` without its header (see
    /// [`FrameDecoder::awaiting_head`]); `None` if there is none.
    pub fn give_up_head(&mut self, buf: &mut BytesMut) -> Option<Decoded> {
        if self.skip > 0 {
            return None;
        }
        let len = self.oversized_len(buf)?;
        Some(self.skip_frame(buf, len, None))
    }

    fn oversized_len(&self, buf: &BytesMut) -> Option<usize> {
        let word = buf.get(..LENGTH_PREFIX)?;
        let len = i32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        usize::try_from(len)
            .ok()
            .filter(|len| *len > self.max_frame_size)
    }

    fn skip_frame(&mut self, buf: &mut BytesMut, len: usize, head: Option<Head>) -> Decoded {
        self.skip = len.saturating_add(LENGTH_PREFIX);
        let n = self.skip.min(buf.len());
        buf.advance(n);
        self.skip -= n;
        Decoded::Oversized(Oversized { len, head })
    }

    /// The next frame in `buf`; `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    /// [`FrameError::NonPositiveLength`], or [`FrameError::TooLarge`] for an oversized frame
    /// that does not start with a strict header: the stream cannot be framed any more.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            buf.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        match crate::decode_frame(buf, self.max_frame_size) {
            Ok(Some(frame)) => Ok(Some(Decoded::Frame(frame))),
            Ok(None) => Ok(None),
            Err(FrameError::TooLarge { len, max }) => {
                let payload = &buf[LENGTH_PREFIX..];
                let head = match peek_head(payload) {
                    Peek::Head(head) => head,
                    Peek::NeedMore if payload.len() < len.min(HEAD_MAX) => return Ok(None),
                    Peek::NeedMore | Peek::Invalid => {
                        return Err(FrameError::TooLarge { len, max });
                    }
                };
                Ok(Some(self.skip_frame(buf, len, Some(head))))
            }
            Err(e) => Err(e),
        }
    }
}

enum Peek {
    Head(Head),
    NeedMore,
    Invalid,
}

/// Reads a strict header from the start of a frame's payload.
fn peek_head(payload: &[u8]) -> Peek {
    let word = |at: usize| {
        payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let Some(version) = word(0) else {
        return Peek::NeedMore;
    };
    if version & VERSION_MASK != VERSION_1 {
        return Peek::Invalid;
    }
    let Some(name_len) = word(4) else {
        return Peek::NeedMore;
    };
    let name_len = name_len as usize;
    if name_len > MAX_NAME_LEN {
        return Peek::Invalid;
    }
    let Some(seqid) = word(8 + name_len) else {
        return Peek::NeedMore;
    };
    let Ok(name) = std::str::from_utf8(&payload[8..8 + name_len]) else {
        return Peek::Invalid;
    };
    Peek::Head(Head {
        message_type: MessageType::from_u8(version as u8),
        name: name.to_owned(),
        seqid: seqid as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, seqid: i32, body_len: usize) -> BytesMut {
        crate::encode_message(MessageType::Reply, name, seqid, &vec![7u8; body_len])
    }

    #[test]
    fn an_oversized_frame_is_skipped_and_the_next_one_decoded() {
        let mut dec = FrameDecoder::new(1000);
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&frame("big", 5, 5000));
        wire.extend_from_slice(&frame("small", 6, 10));
        // Byte-sized pieces first, then the rest: the big frame is never held whole.
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        for chunk in wire.chunks(97) {
            buf.extend_from_slice(chunk);
            while let Some(d) = dec.decode(&mut buf).unwrap() {
                seen.push(d);
            }
            assert!(buf.len() < 1200, "nothing of the big frame piles up");
        }
        assert_eq!(seen.len(), 2);
        match &seen[0] {
            Decoded::Oversized(o) => {
                assert_eq!(o.len, 5000 + 4 + 4 + 3 + 4);
                let head = o.head.as_ref().unwrap();
                assert_eq!((head.name.as_str(), head.seqid), ("big", 5));
            }
            other => panic!("{other:?}"),
        }
        match &seen[1] {
            Decoded::Frame(f) => {
                assert_eq!(crate::Message::parse(f.clone()).unwrap().seqid(), 6)
            }
            other => panic!("{other:?}"),
        }
        assert!(!dec.in_frame(&buf));
    }

    #[test]
    fn an_oversized_frame_without_a_strict_header_is_unframeable() {
        let mut dec = FrameDecoder::new(10);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_reader_may_give_up_waiting_for_the_head() {
        let mut dec = FrameDecoder::new(20);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&100u32.to_be_bytes());
        buf.extend_from_slice(&0x8001_0001u32.to_be_bytes());
        assert!(
            dec.decode(&mut buf).unwrap().is_none(),
            "waits for the seqid"
        );
        assert!(dec.awaiting_head(&buf));
        match dec.give_up_head(&mut buf) {
            Some(Decoded::Oversized(o)) => assert_eq!((o.len, o.head), (100, None)),
            other => panic!("{other:?}"),
        }
        assert!(
            buf.is_empty() && dec.in_frame(&buf),
            "the rest is skipped as it comes"
        );
        buf.extend_from_slice(&[0u8; 96]);
        buf.extend_from_slice(&frame("x", 1, 0));
        assert!(matches!(dec.decode(&mut buf), Ok(Some(Decoded::Frame(_)))));
        assert!(!dec.in_frame(&buf));
    }

    #[test]
    fn a_non_positive_length_is_an_error() {
        let mut dec = FrameDecoder::new(10);
        let mut buf = BytesMut::from(&0i32.to_be_bytes()[..]);
        assert!(dec.decode(&mut buf).is_err());
    }
}
