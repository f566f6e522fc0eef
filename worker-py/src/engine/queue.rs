//! The hand-off between the connection and the pool threads ([`Queue`]): the calls read and
//! waiting for a pool thread ([`Job`]s), which thread holds the reader role (an idle pool
//! thread, or the connection thread once every pool thread has been busy for a whole
//! [`TICK`]), and how the connection thread learns that the connection it serves ended.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use rpc_frame::Message;

use super::conn::Conn;
use super::session::{Session, Step};
use super::{TICK, lock};
use crate::protocol::End;

/// A call waiting for a pool thread, with the connection its reply goes to.
pub(super) struct Job {
    /// The CALL or ONEWAY message.
    pub(super) message: Message,
    /// Where the reply goes (a reconnect makes a new one; late replies to an old one are
    /// dropped).
    pub(super) conn: Arc<Conn>,
}

/// The calls waiting for a pool thread, and who reads the connection next. Unbounded on
/// purpose: the reader must never block (pings), and the LB bounds what it sends to the
/// capacity announced in HELLO.
///
/// Wake-ups are the worker's main cost besides Python (a futex call each, and a context
/// switch): a condvar is signalled only when a thread sleeps on it, and never with the lock
/// held on the hot path (the woken thread would block on the mutex at once).
#[derive(Default)]
pub(super) struct Queue {
    /// Everything the condvars guard.
    state: Mutex<QueueState>,
    /// A job arrived, the reader role came free, a connection began, or the queue closed.
    ready: Condvar,
    /// A pool thread finished a job while [`Queue::wait_idle`] waits.
    idle: Condvar,
    /// The connection ended (for the connection thread in [`Queue::watch`]).
    io: Condvar,
}

/// The queue's state, under its lock.
#[derive(Default)]
struct QueueState {
    /// Calls read and waiting for a pool thread.
    jobs: VecDeque<Job>,
    /// Set by [`Queue::close`]: pool threads exit, later jobs are dropped.
    closed: bool,
    /// Jobs taken by pool threads and not finished.
    busy: usize,
    /// Pool threads waiting on `ready`.
    sleeping: usize,
    /// Someone waits on `idle`.
    draining: bool,
    /// The connection being served, while it is.
    session: Option<Arc<Session>>,
    /// Some thread is reading the session (at most one does).
    reading: bool,
    /// Turns taken at reading by pool threads; the connection thread reads only after a
    /// whole [`TICK`] without one.
    turns: u64,
    /// How the session ended, for the connection thread.
    ended: Option<End>,
}

// === impl Queue ===

impl Queue {
    /// Queues a call for the next free pool thread (waking one that sleeps); after
    /// [`Queue::close`], drops it.
    pub(super) fn push(&self, job: Job) {
        let wake = {
            let mut state = lock(&self.state);
            if state.closed {
                drop(state);
                job.conn.release();
                return;
            }
            state.jobs.push_back(job);
            state.sleeping > 0
        };
        if wake {
            self.ready.notify_one();
        }
    }

    /// Starts serving `session`: the idle pool threads compete to read it.
    pub(super) fn attach(&self, session: Arc<Session>) {
        let mut state = lock(&self.state);
        state.session = Some(session);
        state.ended = None;
        state.reading = false;
        drop(state);
        self.ready.notify_all();
    }

    /// Records the end of the session (under the lock).
    fn end_session(&self, state: &mut QueueState, end: End) {
        state.session = None;
        state.ended = Some(end);
        self.io.notify_all();
    }

    /// The next job for a pool thread, blocking; `None` once the queue is closed. `finished`
    /// says the caller just finished the job it took before (one lock for both). With no job
    /// waiting and nobody reading, the caller reads the connection itself.
    pub(super) fn next(&self, finished: bool) -> Option<Job> {
        let mut state = lock(&self.state);
        if finished {
            state.busy -= 1;
            if state.draining {
                self.idle.notify_all();
            }
        }
        loop {
            if state.closed {
                return None;
            }
            if let Some(job) = state.jobs.pop_front() {
                state.busy += 1;
                return Some(job);
            }
            if let (false, Some(session)) = (state.reading, state.session.clone()) {
                state.turns += 1;
                let claimed;
                (state, claimed) = self.read_turn(state, &session, true);
                if let Some(job) = claimed {
                    state.busy += 1;
                    let hand_over = state.sleeping > 0;
                    drop(state);
                    if hand_over {
                        self.ready.notify_one();
                    }
                    return Some(job);
                }
                // Still this thread's turn (unless the session ended): the loop holds the
                // lock, so nobody else saw the role free.
                continue;
            }
            state.sleeping += 1;
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.sleeping -= 1;
        }
    }

    /// The connection thread's part while `session` is served: it reads whenever no pool
    /// thread has for a whole [`TICK`] (all busy in handlers); returns how the session ended.
    pub(super) fn watch(&self, session: &Session) -> End {
        let mut state = lock(&self.state);
        let mut seen_turns = state.turns;
        loop {
            if let Some(end) = state.ended.take() {
                return end;
            }
            if state.reading || state.sleeping > 0 || state.turns != seen_turns {
                if !state.reading && state.sleeping > 0 {
                    // The role is free and a pool thread waits: it should be reading.
                    self.ready.notify_one();
                }
                seen_turns = state.turns;
                state = self
                    .io
                    .wait_timeout(state, TICK)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            // The connection thread never claims a call: it cannot run handlers.
            (state, _) = self.read_turn(state, session, false);
            seen_turns = state.turns;
            if state.sleeping > 0 {
                self.ready.notify_one();
            }
        }
    }

    /// Takes the reader role for one [`Session::turn`] (without the lock held while it reads);
    /// records the end of the session if the turn saw it. Returns the lock again and the call
    /// claimed, if `claim` and one was read.
    fn read_turn<'a>(
        &'a self,
        mut state: MutexGuard<'a, QueueState>,
        session: &Session,
        claim: bool,
    ) -> (MutexGuard<'a, QueueState>, Option<Job>) {
        state.reading = true;
        drop(state);
        let step = session.turn(self, claim);
        let mut state = lock(&self.state);
        state.reading = false;
        match step {
            Step::Idle => (state, None),
            Step::Claimed(job) => (state, Some(job)),
            Step::Ended(end) => {
                self.end_session(&mut state, end);
                (state, None)
            }
        }
    }

    /// Closes the queue (pool threads exit after their current job) and drops waiting jobs.
    pub(super) fn close(&self) {
        let jobs = {
            let mut state = lock(&self.state);
            state.closed = true;
            std::mem::take(&mut state.jobs)
        };
        self.ready.notify_all();
        for job in jobs {
            job.conn.release();
        }
    }

    /// Waits until no job runs or `deadline` passes; returns the jobs still running.
    pub(super) fn wait_idle(&self, deadline: Instant) -> usize {
        let mut state = lock(&self.state);
        state.draining = true;
        while state.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .idle
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.busy
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;

    use rpc_frame::{MessageType, encode_message};

    use super::*;
    use crate::stream::Stream;

    fn job(seqid: i32) -> Job {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let conn = Conn::new(Stream::Unix(ours.try_clone().unwrap()), Stream::Unix(ours));
        conn.hold();
        Job {
            message: Message::parse(encode_message(MessageType::Call, "m", seqid, b"\x00"))
                .unwrap(),
            conn: Arc::new(conn),
        }
    }

    #[test]
    fn queue_hands_jobs_to_sleepers_and_reports_idle() {
        let queue = Arc::new(Queue::default());
        // Queued before anyone sleeps: taken without a wake-up.
        queue.push(job(1));
        assert_eq!(queue.next(false).unwrap().message.seqid(), 1);

        // A thread that finished job 1 sleeps for the next one; a push wakes it.
        let (taken, seen) = mpsc::channel();
        let taker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut finished = true;
                while let Some(job) = queue.next(finished) {
                    taken.send(job.message.seqid()).unwrap();
                    finished = true;
                }
            })
        };
        queue.push(job(2));
        assert_eq!(seen.recv_timeout(Duration::from_secs(10)), Ok(2));

        // wait_idle sees job 2 finish (the taker's next `next`), then close ends the taker.
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(queue.wait_idle(deadline), 0);
        assert!(Instant::now() < deadline);
        queue.close();
        taker.join().unwrap();
        let late = job(3);
        let conn = Arc::clone(&late.conn);
        queue.push(late);
        assert_eq!(conn.held(), 0, "a job pushed after close is released");
    }
}
