//! The LB's scheduler: which worker runs each call. A call goes to the worker with the fewest
//! calls in flight that is below its capacity; when every worker is full it waits in a
//! bounded queue, and leaves it for the first worker slot that frees up. Sits between the
//! front (calls from proxies) and the worker connections.
//!
//! Invariant: a worker's `inflight` counts calls handed to its connection and not yet
//! finished (answered by the worker, or lost with it). It never exceeds its capacity, and a
//! call that timed out keeps its slot until the worker answers (a hung handler is not given
//! more work).
//!
//! # Calls served and the age of the oldest call (`/status`, recycling, the watchdog)
//! `served` counts the calls a worker finished. The age of its oldest call comes from the
//! calls it holds: each call handed to a worker is booked with its dispatch time, and its
//! [`ReplyTo`] settles the booking when the caller is answered. A reply removes it; an error
//! the LB sent while the worker may still run the call (the LB's timeout) keeps it, as
//! *expired*, for as long as the worker's `inflight` count says it may still hold that many
//! calls (a late reply frees one; which one is not known, so the newest go first and the
//! oldest age is never understated).
//!
//! # Marks (CONTRACT section 9, "LB refusals and LB failures, marked")
//! Every code-6 error the LB raises itself carries field 3, a [`Mark`]: [`Mark::Refused`]
//! when no handler saw the call ([`Call::fail`]: a [`Reject`], a deadline spent in the
//! queue), [`Mark::Failed`] when it failed after dispatch ([`ReplyTo::fail`] from the worker
//! connections: the LB's timeout, a lost worker, a malformed reply; [`ReplyTo::reply`]: a
//! reply dropped for the byte budget). A worker's own reply or exception passes through
//! untouched, and so unmarked; so does the code-6 error for a worker reply over
//! `max_frame_size` (the handler's doing, like its exceptions).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rpc_frame::{ExceptionCode, Mark, Message};
use rpc_mux::{Charge, ConnBudget};
use tokio::sync::mpsc;

use crate::metrics::{Meter, Outcome};

// What the scheduler reports lives in a module of its own, so that `metrics` needs nothing
// of this one.
pub use crate::load::{Reject, WorkerId, WorkerLoad, WorkerState, WorkerStatus};

/// A front connection's reply queue. Every frame queued holds its bytes against the
/// connection's byte budget until written, so the connection stops reading a peer that does
/// not read its replies ([`rpc_mux::ConnBudget`]); a reply that would go past the budget is
/// replaced by a code-6 error marked [`Mark::Failed`] ([`ReplyTo::reply`]).
#[derive(Debug, Clone)]
pub struct FrontTx {
    tx: mpsc::UnboundedSender<(BytesMut, Charge)>,
    budget: Arc<ConnBudget>,
}

impl FrontTx {
    /// A new queue charging `budget`: the sender, and the writer's receiver.
    pub fn channel(budget: Arc<ConnBudget>) -> (Self, mpsc::UnboundedReceiver<(BytesMut, Charge)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (FrontTx { tx, budget }, rx)
    }

    /// Queues a frame the LB made itself (an error, a ping echo), whatever the budget: such
    /// frames are small and answer frames already read (a closed connection drops it).
    pub fn send(&self, frame: BytesMut) {
        let charge = self.budget.charge(frame.len());
        let _ = self.tx.send((frame, charge));
    }

    /// Queues a worker's reply if it fits the budget; otherwise hands it back.
    fn send_within_budget(&self, frame: BytesMut) -> Result<(), BytesMut> {
        match self.budget.try_charge_reply(frame.len()) {
            Some(charge) => {
                let _ = self.tx.send((frame, charge));
                Ok(())
            }
            None => Err(frame),
        }
    }
}

/// Where a call's reply goes: the proxy connection it came from, with the proxy's seqid.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// The front connection's writer.
    pub tx: FrontTx,
    /// The seqid the proxy used.
    pub seqid: i32,
    /// The call's booking on the worker it was handed to (module docs); `None` before.
    held: Option<Held>,
}

/// A call's booking on a worker: settled when its caller is answered.
#[derive(Debug, Clone)]
struct Held {
    book: Weak<Mutex<State>>,
    worker: WorkerId,
    token: u64,
}

impl ReplyTo {
    /// Where to answer the proxy's call `seqid`.
    pub fn new(tx: FrontTx, seqid: i32) -> Self {
        ReplyTo {
            tx,
            seqid,
            held: None,
        }
    }

    /// Sends a worker's reply, as it is, with the proxy's seqid; when the front connection's
    /// byte budget has no room for it, the caller gets a code-6 error marked
    /// [`Mark::Failed`] instead (the handler ran; its answer is lost at the LB).
    pub fn reply(&self, mut message: Message) {
        self.settle(true);
        message.set_seqid(self.seqid);
        let method = message.name().to_owned();
        if self.tx.send_within_budget(message.into_wire()).is_err() {
            self.fail(
                &method,
                ExceptionCode::InternalError,
                "reply dropped: the connection's buffer is full (max_connection_buffer_bytes or max_process_buffer_bytes)",
                Some(Mark::Failed),
            );
        }
    }

    /// Sends a `TApplicationException` for `method`, with field 3 set to `mark` when there is
    /// one (module docs: the LB's own refusals and failures are marked, nothing else).
    pub fn fail(&self, method: &str, code: ExceptionCode, text: &str, mark: Option<Mark>) {
        self.settle(false);
        self.tx.send(rpc_frame::marked_application_exception(
            method, self.seqid, code, text, mark,
        ));
    }
}

// === impl ReplyTo ===

impl ReplyTo {
    /// The caller is being answered: with the worker's reply (`replied`: the worker is done
    /// with the call) or with an error of the LB's (the worker may still run it: module docs).
    fn settle(&self, replied: bool) {
        let Some(held) = &self.held else { return };
        let Some(book) = held.book.upgrade() else {
            return;
        };
        let mut state = lock(&book);
        let Some(worker) = state.workers.iter_mut().find(|w| w.id == held.worker) else {
            return;
        };
        let Some(since) = worker.live.remove(&held.token) else {
            return;
        };
        if !replied {
            worker.expired.insert(held.token, since);
        }
        worker.prune_expired();
    }
}

/// One call from a proxy, `service:` stripped.
#[derive(Debug)]
pub struct Call {
    /// The call; its seqid is rewritten when written to a worker.
    pub message: Message,
    /// `None` for ONEWAY.
    pub reply: Option<ReplyTo>,
    /// After this the caller gets a timeout error.
    pub deadline: Instant,
    /// Times the call from the front to its answer; records the outcome.
    pub meter: Meter,
    /// The request's bytes against its front connection's budget, until it is written to a
    /// worker or failed.
    pub request: Charge,
}

impl Call {
    /// Answers the caller with a code-6 error marked `mark` (no-op for ONEWAY, which is only
    /// logged) and records `outcome`. Its callers fail calls no worker got (a [`Reject`], a
    /// deadline spent in the queue), with [`Mark::Refused`].
    pub fn fail(self, service: &str, outcome: Outcome, text: &str, mark: Mark) {
        let method = self.message.name();
        match self.reply {
            Some(reply) => reply.fail(method, ExceptionCode::InternalError, text, Some(mark)),
            None => tracing::warn!(service, method, error = text, "oneway call failed"),
        }
        self.meter.finish(outcome);
    }
}

/// What a worker connection receives: a call to run, or a control frame to write as is
/// (STOP_CONFIRM).
pub type ToWorker = rpc_mux::Outbound<Call>;

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    tx: mpsc::UnboundedSender<ToWorker>,
    inflight: usize,
    capacity: usize,
    /// Its process id, once a HELLO told it (`/status`).
    pid: Option<u32>,
    /// False after the worker sent STOP or the LB told it to stop.
    active: bool,
    /// Marked hung (the watchdog): out of rotation for good.
    hung: bool,
    /// Calls it finished (answered, or written for ONEWAY).
    served: u64,
    /// Calls handed to it whose caller is still waiting: dispatch time by booking token
    /// (tokens grow with time, so the first is the oldest).
    live: BTreeMap<u64, Instant>,
    /// Calls whose caller got the LB's error while the worker may still run them.
    expired: BTreeMap<u64, Instant>,
}

#[derive(Debug, Default)]
struct State {
    workers: Vec<Worker>,
    queue: VecDeque<Call>,
    next_id: WorkerId,
    stopping: bool,
    /// Where the next tie-break starts.
    cursor: usize,
    /// The next booking token.
    next_token: u64,
    /// This state itself, for the bookings handed out with calls.
    me: Weak<Mutex<State>>,
}

/// Locks `state`, poisoned or not (no invariant spans a panic: every update is one step).
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Dispatcher ===

/// The scheduler shared by the front and worker connections.
#[derive(Debug)]
pub struct Dispatcher {
    state: Arc<Mutex<State>>,
    max_queue: usize,
}

impl Dispatcher {
    /// An empty dispatcher whose queue holds at most `max_queue` calls.
    pub fn new(max_queue: usize) -> Self {
        let state = Arc::new_cyclic(|me| {
            Mutex::new(State {
                me: me.clone(),
                ..State::default()
            })
        });
        Dispatcher { state, max_queue }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Takes a call: to the least loaded worker with room, else into the queue.
    ///
    /// # Errors
    /// The call comes back with a [`Reject`] when it can be neither sent nor queued.
    // The refused call comes back by value: boxing it would cost an allocation per call on
    // the path that succeeds too.
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, call: Call) -> Result<(), (Call, Reject)> {
        let mut guard = self.state();
        let state = &mut *guard;
        if state.stopping {
            return Err((call, Reject::Stopping));
        }
        let mut call = call;
        // Handed back by a worker that never wrote it: its booking there is void.
        state.unbook(&mut call);
        while let Some(index) = least_loaded(&state.workers, &mut state.cursor) {
            match state.hand_over(index, call) {
                Ok(()) => return Ok(()),
                // The connection is gone and its task will remove it; skip it now.
                Err(back) => call = back,
            }
        }
        if !state.workers.iter().any(|w| w.active) {
            return Err((call, Reject::NoWorker));
        }
        if state.queue.len() >= self.max_queue {
            return Err((call, Reject::QueueFull));
        }
        state.queue.push_back(call);
        Ok(())
    }

    /// Adds a worker connection with `capacity` slots (and its process id when its HELLO
    /// gave one); queued calls start on it at once. After [`Dispatcher::stop_all`] it joins
    /// inactive and is sent STOP_CONFIRM.
    pub fn add_worker(
        &self,
        tx: mpsc::UnboundedSender<ToWorker>,
        capacity: usize,
        pid: Option<u32>,
    ) -> WorkerId {
        let mut state = self.state();
        state.next_id += 1;
        let id = state.next_id;
        let active = !state.stopping;
        if !active {
            // Joined after stop_all: it takes nothing, and hears so at once. Decided under the
            // same lock as stop_all, so it hears it exactly once.
            let _ = tx.send(ToWorker::Control(rpc_frame::stop_confirm()));
        }
        state.workers.push(Worker {
            id,
            tx,
            inflight: 0,
            capacity: capacity.max(1),
            pid,
            active,
            hung: false,
            served: 0,
            live: BTreeMap::new(),
            expired: BTreeMap::new(),
        });
        drain_queue(&mut state);
        id
    }

    /// A HELLO from a worker that already joined: sets its capacity, and its pid when the
    /// HELLO gave one (a HELLO without a usable pid keeps the one known).
    pub fn hello(&self, id: WorkerId, capacity: usize, pid: Option<u32>) {
        let mut state = self.state();
        if let Some(worker) = state.workers.iter_mut().find(|w| w.id == id) {
            worker.capacity = capacity.max(1);
            worker.pid = pid.or(worker.pid);
        }
        drain_queue(&mut state);
    }

    /// One call on worker `id` finished (or was written, for ONEWAY): its slot takes the
    /// next queued call.
    pub fn finished(&self, id: WorkerId) {
        let mut state = self.state();
        if let Some(worker) = state.workers.iter_mut().find(|w| w.id == id) {
            worker.inflight = worker.inflight.saturating_sub(1);
            worker.served += 1;
        }
        drain_queue(&mut state);
    }

    /// The watchdog found worker `id` hung: it gets no new call, for good (its calls stay
    /// booked until it answers or goes). Returns whether it was known.
    pub fn set_hung(&self, id: WorkerId) -> bool {
        let mut state = self.state();
        match state.workers.iter_mut().find(|w| w.id == id) {
            Some(worker) => {
                worker.active = false;
                worker.hung = true;
                true
            }
            None => false,
        }
    }

    /// The process id of worker `id`, when it is known and has told it.
    pub fn pid_of(&self, id: WorkerId) -> Option<u32> {
        let state = self.state();
        state
            .workers
            .iter()
            .find(|w| w.id == id)
            .and_then(|w| w.pid)
    }

    /// Calls worker `id` has finished so far; `None` once it is gone.
    pub fn served(&self, id: WorkerId) -> Option<u64> {
        let state = self.state();
        state.workers.iter().find(|w| w.id == id).map(|w| w.served)
    }

    /// How long worker `id` has held its oldest call (module docs); `None` when it holds
    /// none or is gone.
    pub fn oldest_call(&self, id: WorkerId, now: Instant) -> Option<Duration> {
        let state = self.state();
        let worker = state.workers.iter().find(|w| w.id == id)?;
        worker.oldest_call(now)
    }

    /// The queued calls when no worker is left to take them (the last one sent STOP or
    /// left): they are refused at once rather than left to time out. Empty otherwise, and
    /// once stopping (the stop refuses them itself).
    pub fn orphans(&self) -> Vec<Call> {
        let mut state = self.state();
        if state.stopping || state.queue.is_empty() || state.workers.iter().any(|w| w.active) {
            return Vec::new();
        }
        state.queue.drain(..).collect()
    }

    /// The worker sent STOP: no new calls for it. Returns whether it was known.
    pub fn deactivate(&self, id: WorkerId) -> bool {
        let mut state = self.state();
        match state.workers.iter_mut().find(|w| w.id == id) {
            Some(worker) => {
                worker.active = false;
                true
            }
            None => false,
        }
    }

    /// The worker's connection is gone.
    pub fn remove(&self, id: WorkerId) {
        let mut state = self.state();
        state.workers.retain(|w| w.id != id);
    }

    /// Stops dispatching (LB shutdown): every worker gets STOP_CONFIRM, queued calls come
    /// back to be failed, and later submits are rejected.
    pub fn stop_all(&self) -> Vec<Call> {
        let mut state = self.state();
        state.stopping = true;
        for worker in &mut state.workers {
            worker.active = false;
            let _ = worker.tx.send(ToWorker::Control(rpc_frame::stop_confirm()));
        }
        state.queue.drain(..).collect()
    }

    /// Removes and returns queued calls whose deadline has passed.
    pub fn expire_queue(&self, now: Instant) -> Vec<Call> {
        let mut state = self.state();
        let mut expired = Vec::new();
        let mut kept = VecDeque::with_capacity(state.queue.len());
        for call in state.queue.drain(..) {
            if call.deadline <= now {
                expired.push(call)
            } else {
                kept.push_back(call)
            }
        }
        state.queue = kept;
        expired
    }

    /// Workers taking new calls.
    pub fn active_workers(&self) -> usize {
        self.state().workers.iter().filter(|w| w.active).count()
    }

    /// Calls in flight on workers plus calls queued.
    pub fn outstanding(&self) -> usize {
        let state = self.state();
        state.workers.iter().map(|w| w.inflight).sum::<usize>() + state.queue.len()
    }

    /// Calls waiting in the queue.
    pub fn queued(&self) -> usize {
        self.state().queue.len()
    }

    /// Every worker's load.
    pub fn loads(&self) -> Vec<WorkerLoad> {
        self.state().workers.iter().map(Worker::load).collect()
    }

    /// Every worker's load, pid, calls served and oldest call (`/status`).
    pub fn workers(&self) -> Vec<WorkerStatus> {
        let now = Instant::now();
        self.state()
            .workers
            .iter()
            .map(|w| WorkerStatus {
                load: w.load(),
                pid: w.pid,
                served: w.served,
                oldest_call: w.oldest_call(now),
            })
            .collect()
    }
}

// === impl State ===

impl State {
    /// Hands `call` to worker `index` and books it there; gives it back when the
    /// connection is gone (the worker is then marked inactive).
    // The call comes back by value, as from `submit`.
    #[allow(clippy::result_large_err)]
    fn hand_over(&mut self, index: usize, mut call: Call) -> Result<(), Call> {
        let token = self.next_token;
        self.next_token += 1;
        let book = self.me.clone();
        let worker = &mut self.workers[index];
        let booked = match call.reply.as_mut() {
            Some(reply) => {
                reply.held = Some(Held {
                    book,
                    worker: worker.id,
                    token,
                });
                true
            }
            None => false,
        };
        match worker.tx.send(ToWorker::Call(call)) {
            Ok(()) => {
                worker.inflight += 1;
                // Under the lock, so the call cannot be settled before it is booked.
                if booked {
                    worker.live.insert(token, Instant::now());
                }
                Ok(())
            }
            Err(mpsc::error::SendError(ToWorker::Call(mut back))) => {
                worker.active = false;
                if let Some(reply) = back.reply.as_mut() {
                    reply.held = None;
                }
                Err(back)
            }
            Err(mpsc::error::SendError(ToWorker::Control(_))) => unreachable!("a call was sent"),
        }
    }

    /// Voids the booking of a call handed back unwritten.
    fn unbook(&mut self, call: &mut Call) {
        let Some(held) = call.reply.as_mut().and_then(|r| r.held.take()) else {
            return;
        };
        if let Some(worker) = self.workers.iter_mut().find(|w| w.id == held.worker) {
            worker.live.remove(&held.token);
        }
    }
}

// === impl Worker ===

impl Worker {
    fn load(&self) -> WorkerLoad {
        WorkerLoad {
            id: self.id,
            inflight: self.inflight,
            capacity: self.capacity,
            active: self.active,
            hung: self.hung,
        }
    }

    /// Expired calls it may still hold: `inflight` minus the calls whose callers wait.
    fn expired_held(&self) -> usize {
        self.inflight.saturating_sub(self.live.len())
    }

    /// Forgets expired calls beyond what it may still hold, newest first (module docs).
    fn prune_expired(&mut self) {
        while self.expired.len() > self.expired_held() {
            self.expired.pop_last();
        }
    }

    /// How long it has held its oldest call.
    fn oldest_call(&self, now: Instant) -> Option<Duration> {
        let live = self.live.values().next();
        let expired = (self.expired_held() > 0)
            .then(|| self.expired.values().next())
            .flatten();
        let since = match (live, expired) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(now.saturating_duration_since(*since))
    }
}

/// The active worker with room and the lowest load (calls in flight over capacity). Ties go
/// round-robin from `cursor`, so sequential calls on idle workers spread over all of them.
fn least_loaded(workers: &[Worker], cursor: &mut usize) -> Option<usize> {
    let n = workers.len();
    let start = *cursor % n.max(1);
    let best = (0..n)
        .map(|k| (start + k) % n)
        .filter(|&i| workers[i].active && workers[i].inflight < workers[i].capacity)
        .min_by_key(|&i| {
            (
                workers[i].inflight * 1024 / workers[i].capacity,
                workers[i].inflight,
            )
        })?;
    *cursor = best + 1;
    Some(best)
}

/// Moves queued calls onto workers with room.
fn drain_queue(state: &mut State) {
    while !state.queue.is_empty() {
        let Some(index) = least_loaded(&state.workers, &mut state.cursor) else {
            return;
        };
        let Some(call) = state.queue.pop_front() else {
            return;
        };
        if let Err(back) = state.hand_over(index, call) {
            state.queue.push_front(back);
        }
    }
}

/// Test helpers: calls whose answers are read back from their front connection's queue.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use rpc_frame::MessageType;
    use std::time::Duration;

    /// A message as read off the wire.
    pub(crate) fn message(kind: MessageType, name: &str, seqid: i32, body: &[u8]) -> Message {
        let mut wire = rpc_frame::encode_message(kind, name, seqid, body);
        let frame = rpc_frame::decode_frame(&mut wire, 1 << 20)
            .unwrap()
            .unwrap();
        Message::parse(frame).unwrap()
    }

    /// A front connection's reply queue holding at most `limit` bytes of replies, and what
    /// reads it.
    pub(crate) fn front(limit: usize) -> (FrontTx, mpsc::UnboundedReceiver<(BytesMut, Charge)>) {
        let process = rpc_mux::ProcessBudget::new(1 << 30);
        FrontTx::channel(ConnBudget::new(&process, limit))
    }

    /// A CALL of `name` from the proxy's `seqid`, answered on `tx`.
    pub(crate) fn call_from(tx: &FrontTx, name: &str, seqid: i32) -> Call {
        Call {
            message: message(MessageType::Call, name, seqid, &[0]),
            reply: Some(ReplyTo::new(tx.clone(), seqid)),
            deadline: Instant::now() + Duration::from_secs(60),
            meter: Meter::detached(),
            request: Charge::none(),
        }
    }

    /// The one frame queued for the proxy.
    pub(crate) fn answer(rx: &mut mpsc::UnboundedReceiver<(BytesMut, Charge)>) -> Message {
        let (mut wire, _) = rx.try_recv().expect("an answer is queued");
        let frame = rpc_frame::decode_frame(&mut wire, 1 << 20)
            .unwrap()
            .unwrap();
        assert!(rx.try_recv().is_err(), "one answer only");
        Message::parse(frame).unwrap()
    }

    /// Asserts `m` is the LB's code-6 error with `text` and `mark`, for the proxy's `seqid`.
    #[track_caller]
    pub(crate) fn assert_error(m: &Message, seqid: i32, text: &str, mark: Option<Mark>) {
        assert_eq!(m.message_type(), MessageType::Exception);
        assert_eq!(m.seqid(), seqid);
        assert_eq!(
            rpc_frame::parse_application_exception(m.body()),
            Some((ExceptionCode::InternalError as i32, text.to_owned()))
        );
        assert_eq!(rpc_frame::exception_mark(m.body()), mark, "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{answer, assert_error, call_from, front, message};
    use super::*;
    use rpc_frame::MessageType;
    use std::time::Duration;

    #[test]
    fn call_fail_answers_with_its_mark() {
        let (tx, mut rx) = front(1 << 20);
        call_from(&tx, "echo", 7).fail("svc", Outcome::NoWorker, "refused", Mark::Refused);
        assert_error(&answer(&mut rx), 7, "refused", Some(Mark::Refused));
        call_from(&tx, "echo", 8).fail("svc", Outcome::Timeout, "failed", Mark::Failed);
        assert_error(&answer(&mut rx), 8, "failed", Some(Mark::Failed));
    }

    #[test]
    fn reply_fail_is_unmarked_only_when_told() {
        let (tx, mut rx) = front(1 << 20);
        let to = ReplyTo::new(tx, 3);
        to.fail("echo", ExceptionCode::InternalError, "plain", None);
        assert_error(&answer(&mut rx), 3, "plain", None);
    }

    #[test]
    fn reply_dropped_for_the_byte_budget_is_marked_failed() {
        let (tx, mut rx) = front(64);
        let to = ReplyTo::new(tx, 5);
        // The worker's seqid is replaced by the proxy's.
        to.reply(message(MessageType::Reply, "echo", 900, &[7; 100]));
        assert_error(
            &answer(&mut rx),
            5,
            "reply dropped: the connection's buffer is full (max_connection_buffer_bytes or max_process_buffer_bytes)",
            Some(Mark::Failed),
        );
        // A reply that fits passes as the worker sent it.
        to.reply(message(MessageType::Reply, "echo", 901, &[7; 4]));
        let m = answer(&mut rx);
        assert_eq!(
            (m.message_type(), m.seqid(), m.body()),
            (MessageType::Reply, 5, &[7; 4][..])
        );
    }

    fn call(deadline: Instant) -> Call {
        let mut wire = rpc_frame::encode_message(MessageType::Call, "echo", 1, &[0]);
        let frame = rpc_frame::decode_frame(&mut wire, 1 << 20)
            .unwrap()
            .unwrap();
        Call {
            message: Message::parse(frame).unwrap(),
            reply: None,
            deadline,
            meter: Meter::detached(),
            request: Charge::none(),
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn calls_on(rx: &mut mpsc::UnboundedReceiver<ToWorker>) -> usize {
        let mut n = 0;
        while let Ok(ToWorker::Call(_)) = rx.try_recv() {
            n += 1;
        }
        n
    }

    #[test]
    fn no_worker_rejects_at_once() {
        let d = Dispatcher::new(10);
        assert_eq!(d.submit(call(later())).unwrap_err().1, Reject::NoWorker);
    }

    #[test]
    fn least_loaded_within_capacity_then_queue_then_reject() {
        let d = Dispatcher::new(2);
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let w1 = d.add_worker(tx1, 2, None);
        let _w2 = d.add_worker(tx2, 2, None);
        for _ in 0..4 {
            d.submit(call(later())).unwrap();
        }
        assert_eq!(
            (calls_on(&mut rx1), calls_on(&mut rx2)),
            (2, 2),
            "spread evenly, capped by capacity"
        );
        d.submit(call(later())).unwrap();
        d.submit(call(later())).unwrap();
        assert_eq!(d.queued(), 2);
        assert_eq!(d.submit(call(later())).unwrap_err().1, Reject::QueueFull);
        d.finished(w1);
        assert_eq!(
            calls_on(&mut rx1),
            1,
            "a freed slot takes the next queued call"
        );
        assert_eq!(d.queued(), 1);
        assert_eq!(d.outstanding(), 5);
    }

    #[test]
    fn sequential_calls_rotate_over_idle_workers() {
        let d = Dispatcher::new(10);
        let mut rxs = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = mpsc::unbounded_channel();
            ids.push(d.add_worker(tx, 2, None));
            rxs.push(rx);
        }
        for round in 0..6 {
            d.submit(call(later())).unwrap();
            let busy = rxs.iter_mut().position(|rx| calls_on(rx) == 1).unwrap();
            assert_eq!(busy, round % 3, "round {round}");
            d.finished(ids[busy]);
        }
    }

    #[test]
    fn stopped_worker_gets_nothing_new_and_dead_worker_is_skipped() {
        let d = Dispatcher::new(10);
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, rx2) = mpsc::unbounded_channel();
        let w1 = d.add_worker(tx1, 4, None);
        let _w2 = d.add_worker(tx2, 4, None);
        drop(rx2);
        assert!(d.deactivate(w1));
        assert_eq!(d.submit(call(later())).unwrap_err().1, Reject::NoWorker);
        assert_eq!(calls_on(&mut rx1), 0);
    }

    #[test]
    fn capacity_from_hello_and_queue_expiry() {
        let d = Dispatcher::new(10);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = d.add_worker(tx, 1, None);
        d.submit(call(later())).unwrap();
        d.submit(call(Instant::now())).unwrap();
        d.submit(call(later())).unwrap();
        assert_eq!(calls_on(&mut rx), 1);
        assert_eq!(
            d.expire_queue(Instant::now() + Duration::from_millis(1))
                .len(),
            1
        );
        d.hello(w, 3, None);
        assert_eq!(
            calls_on(&mut rx),
            1,
            "the live queued call starts when capacity grows"
        );
        assert_eq!(d.queued(), 0);
    }

    #[test]
    fn stop_all_confirms_to_workers_and_rejects_after() {
        let d = Dispatcher::new(10);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = d.add_worker(tx, 1, None);
        d.submit(call(later())).unwrap();
        d.submit(call(later())).unwrap();
        let _ = w;
        let queued = d.stop_all();
        assert_eq!(queued.len(), 1);
        assert!(matches!(rx.try_recv(), Ok(ToWorker::Call(_))));
        assert!(matches!(rx.try_recv(), Ok(ToWorker::Control(_))));
        assert_eq!(d.submit(call(later())).unwrap_err().1, Reject::Stopping);
    }

    /// The call handed to the worker whose channel is `rx`.
    fn handed(rx: &mut mpsc::UnboundedReceiver<ToWorker>) -> Call {
        match rx.try_recv() {
            Ok(ToWorker::Call(call)) => call,
            _ => panic!("a call was handed over"),
        }
    }

    fn booked(d: &Dispatcher) -> (usize, usize) {
        let state = d.state();
        (state.workers[0].live.len(), state.workers[0].expired.len())
    }

    #[test]
    fn a_call_the_lb_timed_out_stays_booked_until_the_worker_may_no_longer_hold_it() {
        let d = Dispatcher::new(10);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let id = d.add_worker(tx, 4, None);
        let (front_tx, _front_rx) = testing::front(1 << 20);
        for seqid in 1..=3 {
            d.submit(call_from(&front_tx, "m", seqid)).unwrap();
        }
        let (a, b, c) = (handed(&mut rx), handed(&mut rx), handed(&mut rx));
        assert_eq!(booked(&d), (3, 0));
        let later = Instant::now() + Duration::from_secs(10);
        assert!(d.oldest_call(id, later).unwrap() >= Duration::from_secs(10));
        // The LB's timeout answers A; the worker still runs it.
        let fail = |call: &Call| {
            let reply = call.reply.as_ref().unwrap();
            reply.fail(
                "m",
                ExceptionCode::InternalError,
                "timeout",
                Some(Mark::Failed),
            );
        };
        fail(&a);
        assert_eq!(booked(&d), (2, 1));
        // B's reply: A is still held.
        let reply = |call: Call| {
            d.finished(id);
            let seqid = call.reply.as_ref().unwrap().seqid;
            call.reply
                .unwrap()
                .reply(message(MessageType::Reply, "m", seqid, &[0]));
        };
        reply(b);
        assert_eq!(booked(&d), (1, 1));
        assert!(d.oldest_call(id, later).is_some());
        // A's late reply (no caller left): C is the only call held.
        d.finished(id);
        assert_eq!(d.state().workers[0].expired_held(), 0);
        reply(c);
        assert_eq!(booked(&d), (0, 0), "A is forgotten at the next settlement");
        assert_eq!(d.oldest_call(id, later), None);
        assert_eq!(d.served(id), Some(3));
    }

    #[test]
    fn queued_calls_are_orphans_once_no_worker_is_left() {
        let d = Dispatcher::new(10);
        let (tx, _rx) = mpsc::unbounded_channel();
        let w = d.add_worker(tx, 1, None);
        d.submit(call(later())).unwrap();
        d.submit(call(later())).unwrap();
        assert!(d.orphans().is_empty(), "a worker may still take it");
        assert!(d.deactivate(w));
        assert_eq!(d.orphans().len(), 1);
        assert_eq!(d.queued(), 0);
    }

    #[test]
    fn a_hung_worker_takes_nothing_new() {
        let d = Dispatcher::new(10);
        let (tx, _rx) = mpsc::unbounded_channel();
        let w = d.add_worker(tx, 1, Some(5));
        assert!(d.set_hung(w));
        assert_eq!(d.loads()[0].state(), WorkerState::Hung);
        assert_eq!(d.submit(call(later())).unwrap_err().1, Reject::NoWorker);
        assert_eq!(d.pid_of(w), Some(5));
    }

    #[test]
    fn pid_from_the_first_hello_or_a_later_one() {
        let d = Dispatcher::new(10);
        let (tx1, _rx1) = mpsc::unbounded_channel();
        let (tx2, _rx2) = mpsc::unbounded_channel();
        let by_hello = d.add_worker(tx1, 2, Some(4242));
        let by_echo = d.add_worker(tx2, 1, None);
        let pids = |d: &Dispatcher| -> Vec<_> { d.workers().iter().map(|w| w.pid).collect() };
        assert_eq!(pids(&d), [Some(4242), None]);
        d.hello(by_echo, 3, Some(77));
        // A HELLO without a usable pid keeps the one known.
        d.hello(by_hello, 4, None);
        assert_eq!(pids(&d), [Some(4242), Some(77)]);
        let statuses = d.workers();
        assert_eq!(statuses[1].load, d.loads()[1]);
        assert_eq!(statuses[1].load.capacity, 3);
    }
}
