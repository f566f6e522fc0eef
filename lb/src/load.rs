//! What the dispatcher reports: which worker, its load, and why a call was refused. Kept
//! apart from [`crate::dispatch`] so that [`crate::metrics`], which counts refusals and
//! shows loads, does not depend on the scheduler that records calls in it. [`WorkerStatus`]
//! adds what only `/status` shows (the pid, calls served, the oldest call), so the metrics
//! snapshot stays a plain load.

use std::time::Duration;

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

/// A worker's state, as `/status` and `rpc_lb_workers{state}` show it (CONTRACT section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Started by the LB, not joined yet (no HELLO).
    Booting,
    /// Takes calls.
    Ready,
    /// Sent STOP, or told to stop (drain, recycling, rolling restart): no new call.
    Stopping,
    /// Held a call past `worker_timeout_ms`: no new call, killed when the LB started it.
    Hung,
}

impl WorkerState {
    /// Every state, in label order.
    pub const ALL: [WorkerState; 4] = [
        WorkerState::Booting,
        WorkerState::Ready,
        WorkerState::Stopping,
        WorkerState::Hung,
    ];

    /// The word used in `/status`, the status line and the metric label.
    pub fn label(self) -> &'static str {
        match self {
            WorkerState::Booting => "booting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
            WorkerState::Hung => "hung",
        }
    }
}

/// A snapshot of one worker connection, for status output and tests.
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
    /// Marked hung by the watchdog.
    pub hung: bool,
}

impl WorkerLoad {
    /// Its state as far as its connection tells: hung, ready (active) or stopping.
    pub fn state(&self) -> WorkerState {
        if self.hung {
            WorkerState::Hung
        } else if self.active {
            WorkerState::Ready
        } else {
            WorkerState::Stopping
        }
    }
}

/// One worker as `/status` shows it: its load, and the process behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its load, as the metrics see it.
    pub load: WorkerLoad,
    /// Its process id, from its HELLO; `None` while it has sent none (an old worker that
    /// joined by echoing the LB's ping).
    pub pid: Option<u32>,
    /// Calls it finished.
    pub served: u64,
    /// How long it has held its oldest call; `None` when it holds none.
    pub oldest_call: Option<Duration>,
}
