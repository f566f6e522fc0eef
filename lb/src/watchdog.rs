//! The hung-worker watchdog (CONTRACT section 9, "LB supervision"), second half: a worker
//! connection that holds a call longer than `worker_timeout_ms` takes itself out of rotation
//! and reports [`crate::workers::WorkerEvent::Hung`] ([`crate::workers`], first half); the LB's
//! event loop hands it to [`Watchdog::on_hung`], which
//! - for a worker the LB started: asks the supervisor for a stack dump of every thread and
//!   kills the worker ([`HungKiller::kill_hung`], SIGKILL within 2 s), then answers every call
//!   the worker held with code 6, marked failed after dispatch, naming where its handler was
//!   stuck (`Worker pid <pid> killed after <age> ms: <file>:<line> in <function>`, or `: no
//!   stack`); the supervisor starts a replacement;
//! - for a worker the LB did not start: sends it SIGUSR1 (its stack goes to its own stderr),
//!   keeps it out of rotation, and refuses its pid on any back connection until the process
//!   exits ([`HungWorkers::is_banned`]).
//!
//! The calls of a killed worker come back through its connection's end (the socket closes
//! with the process): each is answered here, at once when the report is ready, or as soon as
//! it is ([`HungWorkers::held_call_lost`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dispatch::WorkerId;
use crate::stack;
use crate::workers::Pending;

/// How long the stack dump of a hung worker is collected (the kill follows within 2 s of the
/// request whatever happens).
pub const DUMP_COLLECT: Duration = Duration::from_millis(1500);

/// How often a banned pid (a hung worker the LB did not start) is checked for its exit.
const BAN_CHECK: Duration = Duration::from_secs(1);

/// Dumps and kills a hung worker the LB started: the supervisor's side of the watchdog.
pub trait HungKiller: Send + Sync {
    /// Whether `pid` is a worker process this LB started.
    fn is_supervised(&self, pid: u32) -> bool;
    /// Sends SIGUSR1, collects the worker's stderr for up to `collect`, kills it (SIGKILL
    /// within 2 s) and returns the lines collected.
    fn kill_hung(
        &self,
        pid: u32,
        collect: Duration,
    ) -> Pin<Box<dyn Future<Output = Vec<String>> + Send + '_>>;
}

/// What the watchdog found out about a killed worker.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// The worker's process.
    pub pid: u32,
    /// `<file>:<line> in <function>` of the frame the handler was stuck in.
    pub blame: Option<String>,
}

/// The calls of one killed worker's connection, and its report once known.
#[derive(Default)]
struct Slot {
    report: Option<Report>,
    waiting: Vec<Pending>,
    closed: bool,
}

// === impl HungWorkers ===

/// The watchdog's state shared with every worker connection.
#[derive(Default)]
pub struct HungWorkers {
    /// Killed workers whose calls are being answered, by connection.
    slots: Mutex<HashMap<WorkerId, Slot>>,
    /// Pids of hung workers the LB did not start, until their processes exit.
    banned: Mutex<HashSet<u32>>,
}

impl std::fmt::Debug for HungWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HungWorkers")
            .field("killing", &self.slots().len())
            .field("banned", &self.banned().len())
            .finish()
    }
}

impl HungWorkers {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn banned(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.banned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `pid` is a hung worker the LB did not start whose process still runs: none of
    /// its connections may join.
    pub fn is_banned(&self, pid: u32) -> bool {
        self.banned().contains(&pid)
    }

    /// Whether the watchdog is killing the worker of connection `id`.
    pub fn is_killing(&self, id: WorkerId) -> bool {
        self.slots().contains_key(&id)
    }

    /// A call the killed worker of connection `id` held, failed as its connection ended:
    /// answered with the watchdog's message now, or once the report is ready. Hands the call
    /// back when the watchdog is not killing that worker.
    pub fn held_call_lost(&self, id: WorkerId, pending: Pending) -> Option<Pending> {
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(&id) else {
            return Some(pending);
        };
        match &slot.report {
            Some(report) => {
                let report = report.clone();
                drop(slots);
                answer(pending, &report);
            }
            None => slot.waiting.push(pending),
        }
        None
    }

    /// The connection `id` is gone: its slot goes once its calls are answered.
    pub fn connection_closed(&self, id: WorkerId) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(&id) {
            slot.closed = true;
            if slot.report.is_some() {
                slots.remove(&id);
            }
        }
    }

    pub(crate) fn start_killing(&self, id: WorkerId) {
        self.slots().entry(id).or_default();
    }

    /// The report is ready: answers the calls waiting for it.
    pub(crate) fn report(&self, id: WorkerId, report: Report) {
        let waiting = {
            let mut slots = self.slots();
            let Some(slot) = slots.get_mut(&id) else {
                return;
            };
            let waiting = std::mem::take(&mut slot.waiting);
            if slot.closed {
                slots.remove(&id);
            } else {
                slot.report = Some(report.clone());
            }
            waiting
        };
        for pending in waiting {
            answer(pending, &report);
        }
    }
}

/// Answers one call of a killed worker.
fn answer(pending: Pending, report: &Report) {
    let age = pending.age();
    let text = format!(
        "Worker pid {} killed after {} ms: {}",
        report.pid,
        age.as_millis(),
        report.blame.as_deref().unwrap_or("no stack")
    );
    pending.fail_killed(&text);
}

// === impl Watchdog ===

/// Handles hung workers (module docs).
#[derive(Clone)]
pub struct Watchdog {
    hung: Arc<HungWorkers>,
    killer: Option<Arc<dyn HungKiller>>,
    service: String,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("service", &self.service)
            .field("supervised", &self.killer.is_some())
            .finish()
    }
}

impl Watchdog {
    /// A watchdog over `hung` (shared with the worker connections); `killer` is the
    /// supervisor when `worker_command` is set.
    pub fn new(hung: Arc<HungWorkers>, killer: Option<Arc<dyn HungKiller>>, service: &str) -> Self {
        Watchdog {
            hung,
            killer,
            service: service.to_owned(),
        }
    }

    /// The worker of connection `id` (process `pid`, when its HELLO said) holds a call past
    /// `worker_timeout_ms` and is out of rotation: dump and kill it if the LB started it,
    /// else keep it out until its process exits. Returns at once; the work runs in a task.
    pub fn on_hung(&self, id: WorkerId, pid: Option<u32>) {
        let supervised = match (&self.killer, pid) {
            (Some(killer), Some(pid)) => killer.is_supervised(pid),
            _ => false,
        };
        let service = self.service.clone();
        if supervised {
            let (Some(killer), Some(pid)) = (self.killer.clone(), pid) else {
                return;
            };
            self.hung.start_killing(id);
            let hung = self.hung.clone();
            tokio::spawn(async move {
                tracing::warn!(
                    service,
                    worker = id,
                    pid,
                    "worker hung: dumping its stacks, then killing it"
                );
                let lines = killer.kill_hung(pid, DUMP_COLLECT).await;
                let threads = stack::parse(&lines);
                let blame = stack::blame(&threads).map(stack::Frame::describe);
                tracing::warn!(
                    service,
                    worker = id,
                    pid,
                    threads = threads.len(),
                    stuck_at = blame.as_deref().unwrap_or("no stack"),
                    "hung worker killed"
                );
                hung.report(id, Report { pid, blame });
            });
            return;
        }
        let Some(pid) = pid else {
            tracing::warn!(
                service,
                worker = id,
                "worker hung (it sent no HELLO, so its pid is unknown): out of rotation until its connection closes"
            );
            return;
        };
        tracing::warn!(
            service,
            worker = id,
            pid,
            "worker hung (not started by this LB): out of rotation until its process exits; SIGUSR1 sent, its stacks are on its own stderr"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR1,
        );
        if !self.hung.banned().insert(pid) {
            return;
        }
        let hung = self.hung.clone();
        tokio::spawn(async move {
            while process_exists(pid) {
                tokio::time::sleep(BAN_CHECK).await;
            }
            hung.banned().remove(&pid);
            tracing::info!(service, pid, "hung worker process exited");
        });
    }
}

/// Whether a process `pid` exists (signal 0).
fn process_exists(pid: u32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        // EPERM: it exists under another user.
        Err(errno) => errno == nix::errno::Errno::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_exists_and_a_reaped_child_does_not() {
        assert!(process_exists(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid));
    }

    #[test]
    fn bans_are_per_pid() {
        let hung = HungWorkers::default();
        assert!(!hung.is_banned(42));
        hung.banned().insert(42);
        assert!(hung.is_banned(42));
        assert!(!hung.is_killing(1));
    }
}
