//! Thrift binary protocol primitives under the decoders of this crate: big-endian words, the
//! field type codes the mesh writes, and a bounded [`Reader`] over struct bodies (used for
//! `TApplicationException` and HELLO; call bodies themselves are never decoded).

/// Deepest nesting of containers [`crate::parse_application_exception`] and
/// [`crate::Hello::decode`] skip through before they give up (bounds their recursion on hostile
/// input).
pub(crate) const MAX_SKIP_DEPTH: u32 = 32;

/// The big-endian `u32` at `at`, or `None` if `bytes` ends first.
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    word.try_into().ok().map(u32::from_be_bytes)
}

/// Thrift binary field type: end of struct.
pub(crate) const TYPE_STOP: u8 = 0;
/// Thrift binary field type: i32.
pub(crate) const TYPE_I32: u8 = 8;
/// Thrift binary field type: string / binary.
pub(crate) const TYPE_STRING: u8 = 11;

/// A cursor over Thrift binary-encoded bytes; every read returns `None` past the end.
pub(crate) struct Reader<'a> {
    /// The bytes not read yet.
    pub(crate) rest: &'a [u8],
}

// === impl Reader ===

impl<'a> Reader<'a> {
    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    /// The next byte.
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    /// The next big-endian `i16`.
    pub(crate) fn i16(&mut self) -> Option<i16> {
        self.take(2)?.try_into().ok().map(i16::from_be_bytes)
    }

    /// The next big-endian `i32`.
    pub(crate) fn i32(&mut self) -> Option<i32> {
        self.take(4)?.try_into().ok().map(i32::from_be_bytes)
    }

    /// A length-prefixed string or binary; a negative length is malformed.
    pub(crate) fn binary(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.i32()?).ok()?;
        self.take(len)
    }

    /// A container's element count; a negative count is malformed.
    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.i32()?).ok()
    }

    /// Skips one value of `field_type`, nesting at most `depth` containers deep.
    ///
    /// Every value takes at least one byte, so a hostile element count fails as soon as the
    /// bytes run out: the work is bounded by the input length.
    pub(crate) fn skip(&mut self, field_type: u8, depth: u32) -> Option<()> {
        match field_type {
            2 | 3 => self.take(1).map(drop),    // bool, byte
            6 => self.take(2).map(drop),        // i16
            TYPE_I32 => self.take(4).map(drop), // i32
            4 | 10 => self.take(8).map(drop),   // double, i64
            16 => self.take(16).map(drop),      // uuid
            TYPE_STRING => self.binary().map(drop),
            12 => {
                let depth = depth.checked_sub(1)?;
                loop {
                    let inner = self.u8()?;
                    if inner == TYPE_STOP {
                        return Some(());
                    }
                    self.take(2)?;
                    self.skip(inner, depth)?;
                }
            }
            13 => {
                let depth = depth.checked_sub(1)?;
                let key = self.u8()?;
                let value = self.u8()?;
                for _ in 0..self.count()? {
                    self.skip(key, depth)?;
                    self.skip(value, depth)?;
                }
                Some(())
            }
            14 | 15 => {
                let depth = depth.checked_sub(1)?;
                let element = self.u8()?;
                for _ in 0..self.count()? {
                    self.skip(element, depth)?;
                }
                Some(())
            }
            _ => None,
        }
    }
}
