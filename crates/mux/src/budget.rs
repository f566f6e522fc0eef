//! Byte budgets (CONTRACT section 9, `max_connection_buffer_bytes` and
//! `max_process_buffer_bytes`): every frame a hop holds in memory (a partial frame being
//! read, a request in flight, a reply waiting to be written) is a [`Charge`] against its
//! connection's budget and the process's.
//!
//! - A connection at either bound stops reading its peer ([`ConnBudget::wait_room`]) until
//!   calls finish or replies are written.
//! - Replies are bounded on their own ([`ConnBudget::try_charge_reply`]): a reply is refused
//!   (its caller gets code 6 instead) only when the replies waiting to be written would pass
//!   the bound, so requests in flight never crowd out the replies of a peer that reads them.
//!
//! So one connection holds at most twice its bound plus one frame, and the process twice
//! its own. Charges are released when dropped, whatever path a frame takes (written, failed,
//! connection torn down).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// One bound: bytes charged, and of them replies waiting to be written.
#[derive(Debug)]
struct Counter {
    used: AtomicUsize,
    replies: AtomicUsize,
    limit: usize,
}

impl Counter {
    fn new(limit: usize) -> Self {
        Counter {
            used: AtomicUsize::new(0),
            replies: AtomicUsize::new(0),
            limit: limit.max(1),
        }
    }

    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn is_full(&self) -> bool {
        self.used() >= self.limit
    }

    fn reply_fits(&self, bytes: usize) -> bool {
        self.replies
            .load(Ordering::Relaxed)
            .checked_add(bytes)
            .is_some_and(|queued| queued <= self.limit)
    }

    fn add(&self, bytes: usize, reply: bool) {
        if reply {
            self.replies.fetch_add(bytes, Ordering::AcqRel);
        }
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Releases `bytes`; true when that took `used` below the bound.
    fn release(&self, bytes: usize, reply: bool) -> bool {
        if reply {
            self.replies.fetch_sub(bytes, Ordering::AcqRel);
        }
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        before >= self.limit && before - bytes < self.limit
    }
}

/// The bytes buffered by the whole process.
#[derive(Debug)]
pub struct ProcessBudget {
    counter: Counter,
    /// Woken when the process, or any of its connections, drops below its bound. One waker
    /// list for all keeps a connection's budget small (10,000 idle connections each hold
    /// one); waiters re-check their own bounds, and only connections at a bound wait.
    room: Notify,
}

impl ProcessBudget {
    /// A budget of `limit` bytes (at least 1).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ProcessBudget {
            counter: Counter::new(limit),
            room: Notify::new(),
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.counter.used()
    }
}

/// The bytes buffered for one connection, also counted against its [`ProcessBudget`].
#[derive(Debug)]
pub struct ConnBudget {
    process: Arc<ProcessBudget>,
    counter: Counter,
}

impl ConnBudget {
    /// A connection budget of `limit` bytes (at least 1) within `process`.
    pub fn new(process: &Arc<ProcessBudget>, limit: usize) -> Arc<Self> {
        Arc::new(ConnBudget {
            process: process.clone(),
            counter: Counter::new(limit),
        })
    }

    /// Bytes charged to this connection now.
    pub fn used(&self) -> usize {
        self.counter.used()
    }

    /// Whether the connection or the process is at its bound: read nothing more from the
    /// peer until [`ConnBudget::wait_room`] returns.
    pub fn is_full(&self) -> bool {
        self.counter.is_full() || self.process.counter.is_full()
    }

    /// Charges `bytes` whatever the bounds (bytes already read: the caller checked
    /// [`ConnBudget::is_full`] before reading them; small frames the hop makes itself).
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        self.add(bytes, false)
    }

    /// Charges a reply of `bytes` if the replies waiting to be written on this connection,
    /// and in the process, stay within their bounds with it.
    pub fn try_charge_reply(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        (self.counter.reply_fits(bytes) && self.process.counter.reply_fits(bytes))
            .then(|| self.add(bytes, true))
    }

    fn add(self: &Arc<Self>, bytes: usize, reply: bool) -> Charge {
        self.counter.add(bytes, reply);
        self.process.counter.add(bytes, reply);
        Charge {
            budget: Some(self.clone()),
            bytes,
            reply,
        }
    }

    /// Resolves once neither this connection nor the process is at its bound.
    pub async fn wait_room(&self) {
        loop {
            let room = self.process.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a release in between is not missed.
            room.as_mut().enable();
            if !self.is_full() {
                return;
            }
            room.await;
        }
    }

    fn release(&self, bytes: usize, reply: bool) {
        let mine = self.counter.release(bytes, reply);
        let theirs = self.process.counter.release(bytes, reply);
        if mine || theirs {
            self.process.room.notify_waiters();
        }
    }
}

/// Bytes held against a [`ConnBudget`] until dropped.
#[derive(Debug, Default)]
pub struct Charge {
    budget: Option<Arc<ConnBudget>>,
    bytes: usize,
    /// Counted as a reply waiting to be written too.
    reply: bool,
}

impl Charge {
    /// A charge of nothing (frames the hop makes itself, tests).
    pub fn none() -> Self {
        Charge::default()
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.release(self.bytes, self.reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn charges_count_against_connection_and_process_until_dropped() {
        let process = ProcessBudget::new(100);
        let a = ConnBudget::new(&process, 60);
        let b = ConnBudget::new(&process, 60);
        let one = a.charge(50);
        assert!(!a.is_full());
        let two = b.charge(50);
        assert!(a.is_full() && b.is_full(), "the process is full");
        drop(one);
        assert_eq!((a.used(), process.used()), (0, 50));
        assert!(!a.is_full());
        drop(two);
        assert_eq!(process.used(), 0);
    }

    #[test]
    fn replies_are_bounded_by_replies_waiting_not_by_requests_in_flight() {
        let process = ProcessBudget::new(100);
        let a = ConnBudget::new(&process, 60);
        let b = ConnBudget::new(&process, 60);
        let requests = a.charge(60);
        assert!(a.is_full(), "no more reading");
        let reply = a
            .try_charge_reply(40)
            .expect("requests do not crowd out replies");
        assert!(
            a.try_charge_reply(30).is_none(),
            "past the connection's reply bound"
        );
        let other = b
            .try_charge_reply(60)
            .expect("within b's bound and the process's");
        assert!(
            b.try_charge_reply(1).is_none(),
            "past the process's reply bound"
        );
        drop((requests, reply, other));
        assert_eq!((a.used(), b.used(), process.used()), (0, 0, 0));
        assert!(a.try_charge_reply(60).is_some());
    }

    #[tokio::test]
    async fn wait_room_wakes_when_a_charge_is_dropped() {
        let process = ProcessBudget::new(1 << 20);
        let conn = ConnBudget::new(&process, 10);
        let held = conn.charge(10);
        let waiter = tokio::spawn({
            let conn = conn.clone();
            async move { conn.wait_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }

    #[tokio::test]
    async fn wait_room_wakes_when_the_process_frees_room() {
        let process = ProcessBudget::new(10);
        let full = ConnBudget::new(&process, 100);
        let other = ConnBudget::new(&process, 100);
        let held = full.charge(10);
        let waiter = tokio::spawn({
            let other = other.clone();
            async move { other.wait_room().await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the process bound stops every connection"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
