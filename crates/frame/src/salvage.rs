//! What can still be read from a frame whose header [`crate::Message::parse`] refused: the
//! name and seqid, so that the proxy and the LB front can send the code-7 reply to the right
//! caller instead of dropping the connection.

use crate::{HeaderError, LENGTH_PREFIX, MAX_NAME_LEN};

/// The name (its method part) and seqid of a frame whose header
/// [`Message::parse`](crate::Message::parse) refused, where they can still be read, so that a
/// code-7 reply reaches the right caller: an old-style (non-strict) header
/// `i32 name_len, name, i8 type, i32 seqid`, or a strict one
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Message, VERSION_1};

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
