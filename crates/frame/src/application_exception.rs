//! `TApplicationException`, the reply the mesh sends when it fails a call itself (no endpoint,
//! timeout, bad frame, handler error): [`application_exception()`] builds the frame,
//! [`parse_application_exception`] reads one back (the worker's logs, the tests).
//!
//! An LB marks the exceptions it raises itself with field 3 ([`Mark`], CONTRACT section 9 "LB
//! refusals and LB failures, marked"): [`marked_application_exception`] writes it,
//! [`exception_mark`] reads it (the proxy's retry and outlier decisions). Thrift readers skip
//! the unknown field, so old proxies and clients see the same code and message.

use bytes::{BufMut, BytesMut};

use crate::MessageType;
use crate::binary::{MAX_SKIP_DEPTH, Reader, TYPE_I32, TYPE_STOP, TYPE_STRING};
use crate::message::{NAME_AT, put_header};

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

/// Field 3 of a `TApplicationException` an LB raised itself: whether a handler may have seen
/// the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Mark {
    /// 1: refused before dispatch; no handler saw the call (no worker, queue full, draining,
    /// deadline spent). Safe to send elsewhere.
    Refused = 1,
    /// 2: failed after dispatch at the LB (its timeout, a lost worker, a watchdog kill).
    Failed = 2,
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
    marked_application_exception(name, seqid, code, message, None)
}

/// [`application_exception()`] with field 3 set to `mark` when there is one (the LB's own
/// refusals and failures).
pub fn marked_application_exception(
    name: &str,
    seqid: i32,
    code: ExceptionCode,
    message: &str,
    mark: Option<Mark>,
) -> BytesMut {
    // Field header (3) + length (4) + message, field header (3) + i32 (4), stop (1); and
    // field header (3) + i32 (4) for the mark.
    let body_len = 15 + message.len() + if mark.is_some() { 7 } else { 0 };
    let mut buf = BytesMut::with_capacity(NAME_AT + name.len() + 4 + body_len);
    put_header(&mut buf, MessageType::Exception, name, seqid, body_len);
    buf.put_u8(TYPE_STRING);
    buf.put_i16(1);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message.as_bytes());
    buf.put_u8(TYPE_I32);
    buf.put_i16(2);
    buf.put_i32(code as i32);
    if let Some(mark) = mark {
        buf.put_u8(TYPE_I32);
        buf.put_i16(3);
        buf.put_i32(mark as i32);
    }
    buf.put_u8(TYPE_STOP);
    buf
}

/// Decodes the body of a `TApplicationException` frame into `(code, message)`; `None` if the
/// body is not such a struct. Used by tests and by the worker's logs.
///
/// As in Apache Thrift, fields may come in any order, unknown fields are skipped, a missing
/// message reads as `""` and a missing code as 0; a message that is not UTF-8 is decoded
/// lossily. Bytes after the struct's stop byte make the body malformed.
pub fn parse_application_exception(body: &[u8]) -> Option<(i32, String)> {
    read_application_exception(body).map(|(code, message, _)| (code, message))
}

/// The [`Mark`] (field 3, an `i32` of 1 or 2) of a `TApplicationException` body; `None` when
/// the body carries none, another value, or is not such a struct. Only meaningful for
/// exceptions from an LB that announces marks in its node data.
pub fn exception_mark(body: &[u8]) -> Option<Mark> {
    read_application_exception(body).and_then(|(_, _, mark)| mark)
}

/// Reads the whole struct: code, message, and mark (field 3 when it is an `i32` of 1 or 2).
fn read_application_exception(body: &[u8]) -> Option<(i32, String, Option<Mark>)> {
    let mut reader = Reader { rest: body };
    let mut code = 0;
    let mut message = String::new();
    let mut mark = None;
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
            (3, TYPE_I32) => {
                mark = match reader.i32()? {
                    1 => Some(Mark::Refused),
                    2 => Some(Mark::Failed),
                    _ => None,
                }
            }
            _ => reader.skip(field_type, MAX_SKIP_DEPTH)?,
        }
    }
    reader.rest.is_empty().then_some((code, message, mark))
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;
    use crate::testing::reframe;

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
    fn marks_round_trip_and_old_readers_skip_them() {
        for mark in [Mark::Refused, Mark::Failed] {
            let wire = marked_application_exception(
                "m",
                4,
                ExceptionCode::InternalError,
                "Worker FOR s.m Not Found",
                Some(mark),
            );
            let message = reframe(&wire);
            assert_eq!(exception_mark(message.body()), Some(mark));
            assert_eq!(
                parse_application_exception(message.body()),
                Some((6, "Worker FOR s.m Not Found".to_owned())),
                "code and message as without the mark"
            );
        }
        let plain = reframe(&application_exception(
            "m",
            4,
            ExceptionCode::InternalError,
            "x",
        ));
        assert_eq!(exception_mark(plain.body()), None);
        assert_eq!(
            marked_application_exception("m", 4, ExceptionCode::InternalError, "x", None),
            application_exception("m", 4, ExceptionCode::InternalError, "x")
        );
    }

    #[test]
    fn odd_marks_read_as_none() {
        let mut body = BytesMut::new();
        body.put_slice(&[0x08, 0, 3]);
        body.put_i32(7);
        body.put_u8(0);
        assert_eq!(exception_mark(&body), None, "unknown value");
        let mut body = BytesMut::new();
        body.put_slice(&[0x0b, 0, 3, 0, 0, 0, 1, b'1', 0]);
        assert_eq!(exception_mark(&body), None, "field 3 of another type");
        let mut body = BytesMut::new();
        body.put_slice(&[0x08, 0, 3]);
        body.put_i32(1);
        assert_eq!(exception_mark(&body), None, "no stop byte");
        assert_eq!(exception_mark(&[]), None);
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
}
