//! What the dispatcher reports: which worker, its load, and why a call was refused. Kept
//! apart from [`crate::dispatch`] so that [`crate::metrics`], which counts refusals and
//! shows loads, does not depend on the scheduler that records calls in it. [`WorkerStatus`]
//! adds what only `/status` shows (the pid), so the metrics snapshot stays a plain load.

/// Identifies a worker connection.
pub type WorkerId = u64;

/// Why a call was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No worker is connected (or every one is stopping).
    NoWorker,
    /// Every worker is full and the queue is at its bound.
    QueueFull,
    /// The LB has told its workers to stop.
    Stopping,
}

/// A snapshot of one worker, for status output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLoad {
    /// The worker's id.
    pub id: WorkerId,
    /// Calls in flight on it.
    pub inflight: usize,
    /// Its capacity.
    pub capacity: usize,
    /// Whether it takes new calls.
    pub active: bool,
}

/// One worker as `/status` shows it: its load, and the process behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its load, as the metrics see it.
    pub load: WorkerLoad,
    /// Its process id, from its HELLO; `None` while it has sent none (an old worker that
    /// joined by echoing the LB's ping).
    pub pid: Option<u32>,
}
