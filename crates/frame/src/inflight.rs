//! Calls written on one multiplexed connection and waiting for their replies, keyed by the
//! seqid the connection gave each of them. The proxy's upstream connections and the LB's
//! worker connections both rewrite seqids this way: callers on many connections share one
//! connection, so their own seqids could collide; the reply's seqid finds the call again.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

/// The calls in flight on one connection, with their deadlines.
///
/// Seqids run `1..=i32::MAX` and wrap; `0` is left to heartbeats and control frames. A seqid
/// still in use is skipped, so a call that never got its reply is never confused with a
/// later one. A call answered leaves nothing behind: memory is proportional to the calls
/// held, not to the calls made within a request timeout.
#[derive(Debug)]
pub struct InFlight<P> {
    /// Each call with its deadline (still in `order`) or `None` (already expired once).
    calls: HashMap<i32, (Option<Instant>, P)>,
    /// Deadlines of calls not yet expired, earliest first.
    order: BTreeSet<(Instant, i32)>,
    last_seqid: i32,
}

impl<P> Default for InFlight<P> {
    fn default() -> Self {
        InFlight {
            calls: HashMap::new(),
            order: BTreeSet::new(),
            last_seqid: 0,
        }
    }
}

impl<P> InFlight<P> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The seqid for a call that expects no reply (ONEWAY): drawn like the others, not held.
    pub fn next_seqid(&mut self) -> i32 {
        loop {
            self.last_seqid = if self.last_seqid == i32::MAX {
                1
            } else {
                self.last_seqid + 1
            };
            if !self.calls.contains_key(&self.last_seqid) {
                return self.last_seqid;
            }
        }
    }

    /// Holds `call` until its reply or `deadline`; returns the seqid to write it with.
    pub fn insert(&mut self, deadline: Instant, call: P) -> i32 {
        let seqid = self.next_seqid();
        self.calls.insert(seqid, (Some(deadline), call));
        self.order.insert((deadline, seqid));
        seqid
    }

    /// The call written with `seqid`, taken out (its reply arrived).
    pub fn remove(&mut self, seqid: i32) -> Option<P> {
        let (deadline, call) = self.calls.remove(&seqid)?;
        if let Some(deadline) = deadline {
            self.order.remove(&(deadline, seqid));
        }
        Some(call)
    }

    /// The call written with `seqid`, left in place.
    pub fn get_mut(&mut self, seqid: i32) -> Option<&mut P> {
        self.calls.get_mut(&seqid).map(|(_, call)| call)
    }

    /// The next call whose deadline is at or before `now`, earliest first, each once; it
    /// stays held (look it up with [`InFlight::remove`] or [`InFlight::get_mut`]).
    pub fn next_expired(&mut self, now: Instant) -> Option<i32> {
        let &(deadline, seqid) = self.order.first()?;
        if deadline > now {
            return None;
        }
        self.order.pop_first();
        if let Some((deadline, _)) = self.calls.get_mut(&seqid) {
            *deadline = None;
        }
        Some(seqid)
    }

    /// Whether no call is held.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Calls held.
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Takes every call out (the connection is gone).
    pub fn take_all(&mut self) -> Vec<P> {
        self.order.clear();
        self.calls.drain().map(|(_, (_, call))| call).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seqids_skip_zero_wrap_and_skip_seqids_in_use() {
        let now = Instant::now();
        let mut map = InFlight::new();
        assert_eq!(map.insert(now, "a"), 1);
        map.last_seqid = i32::MAX - 1;
        assert_eq!(map.next_seqid(), i32::MAX);
        // 1 is still held: skipped.
        assert_eq!(map.next_seqid(), 2);
        assert_eq!(map.remove(1), Some("a"));
        assert!(map.is_empty());
    }

    #[test]
    fn expiry_is_in_deadline_order_and_once() {
        let now = Instant::now();
        let mut map = InFlight::new();
        let early = map.insert(now, 1);
        let late = map.insert(now + Duration::from_secs(60), 2);
        assert_eq!(map.next_expired(now), Some(early));
        assert_eq!(map.next_expired(now), None);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get_mut(late), Some(&mut 2));
        assert_eq!(map.take_all().len(), 2);
        assert_eq!(map.next_expired(now + Duration::from_secs(61)), None);
    }

    #[test]
    fn an_answered_call_leaves_no_entry() {
        let now = Instant::now();
        let mut map = InFlight::new();
        for _ in 0..1000 {
            let seqid = map.insert(now + Duration::from_secs(60), ());
            assert_eq!(map.remove(seqid), Some(()));
        }
        assert!(map.is_empty());
        assert!(map.order.is_empty(), "no deadline kept for answered calls");
        // An expired call that is kept (the LB holds its worker slot) is expired only once.
        let kept = map.insert(now, ());
        assert_eq!(map.next_expired(now), Some(kept));
        assert_eq!(map.next_expired(now), None);
        assert_eq!(map.remove(kept), Some(()));
        assert!(map.order.is_empty());
    }
}
