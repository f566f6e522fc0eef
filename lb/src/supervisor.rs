//! The LB's own workers (`worker_command`, CONTRACT section 9, "LB supervision"): it starts
//! `worker_processes` of them, one per *slot*, watches them, restarts one that ends (with a
//! per-slot [`RestartBackoff`]), recycles one after `worker_max_requests` calls, replaces
//! them all in a rolling restart (SIGHUP, `POST /workers/restart`), kills a hung one for the
//! watchdog ([`Supervisor::kill_hung`]), and stops them with the LB. Without
//! `worker_command` it has no slot and does nothing: workers started by something else dial
//! the back socket as before. How a process is started, and its output logged, is
//! [`crate::process`].
//!
//! # Booting and ready
//! A started worker is *booting* until a back connection whose HELLO carries its pid joins
//! the dispatcher; it is *ready* from then on (the supervisor reads the pids of the
//! dispatcher's workers whenever a worker joins or leaves, and every [`TICK`]). Only ready
//! workers take calls, so the LB registers in ZooKeeper only once one is ready. A worker
//! that sends no HELLO within `worker_boot_timeout_ms` is killed: a boot failure, restarted
//! like any exit.
//!
//! # Replacing a worker without losing capacity
//! Recycling and rolling restarts start the replacement first, in the same slot. Once it is
//! ready, the old worker gets no new call (taken out of the dispatcher) and SIGTERM (it sends
//! STOP, finishes what it holds, exits; SIGKILL if it is still there after the drain grace).
//! A rolling restart does one slot at a time, in slot order, and counts as one *generation*
//! (`RPC_WORKER_GENERATION`); it is aborted when a replacement ends or sends no HELLO within
//! the boot timeout: the slots not replaced yet keep their old workers (and command). A
//! change of `worker_processes` is applied by the rolling restart: new slots are added as
//! it goes, surplus ones retired at its end.
//!
//! # Stop
//! [`Supervisor::stop`] ends restarts and sends every worker SIGTERM; the LB then waits for
//! their replies and exits ([`Supervisor::running`]) and SIGKILLs what is left at the end
//! of its drain grace ([`Supervisor::kill_all`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::Rng;
use rpc_config::SupervisionConfig;
use tokio::sync::Notify;

use crate::backoff::RestartBackoff;
use crate::dispatch::{Dispatcher, WorkerId, WorkerState};
use crate::metrics::{LbMetrics, RestartReason};
use crate::process::{self, Output, WorkerEnv};
use crate::watchdog::HungKiller;

/// How often the supervisor looks at its workers unasked (boot deadlines, restarts due,
/// recycling, readiness).
pub const TICK: Duration = Duration::from_millis(100);

/// A hung worker is killed this long after [`Supervisor::kill_hung`] at the latest (within
/// the CONTRACT's 2 s, with room for the runtime to get there).
const HUNG_KILL_WITHIN: Duration = Duration::from_millis(1800);

/// [`Supervisor::kill_hung`] stops collecting this long after the last stack line.
const DUMP_QUIET: Duration = Duration::from_millis(300);

/// After a worker exits, how long its last stderr lines may take to come out of the pipe.
const STDERR_DRAIN: Duration = Duration::from_millis(300);

/// Why a rolling restart was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RestartRefused {
    /// No `worker_command`: the LB starts no worker.
    #[error("no worker_command: this LB does not start its workers")]
    NotSupervised,
    /// The LB is stopping.
    #[error("the LB is stopping")]
    Stopping,
}

/// What the supervisor is given at start.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// The supervision keys.
    pub config: SupervisionConfig,
    /// `back_address` as configured (`RPC_LB_BACK_ADDRESS`).
    pub back_address: String,
    /// The service (logs).
    pub service: String,
    /// How long a replaced worker may take to finish its calls and exit after SIGTERM before
    /// it is killed (the LB's `drain_grace_ms`).
    pub retire_grace: Duration,
}

/// One supervised worker process, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    /// Its pid.
    pub pid: u32,
    /// Its slot (`RPC_WORKER_ID`).
    pub slot: usize,
    /// Its generation (`RPC_WORKER_GENERATION`).
    pub generation: u64,
    /// Booting, ready, stopping or hung, as far as the supervisor knows.
    pub state: WorkerState,
    /// How long it has run.
    pub up: Duration,
    /// Its connections in the dispatcher.
    pub connections: Vec<WorkerId>,
}

/// The supervisor as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorStatus {
    /// `worker_command` (`None`: not supervised).
    pub command: Option<Vec<String>>,
    /// `worker_processes`.
    pub processes: usize,
    /// Rolling restarts started (the newest workers' generation).
    pub generation: u64,
    /// Whether a rolling restart is under way.
    pub rolling: bool,
    /// Every worker process it started that is still running.
    pub workers: Vec<ProcessStatus>,
    /// Slots waiting to start a worker again (backoff).
    pub restarting: Vec<Restarting>,
}

/// A slot waiting to start a worker again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restarting {
    /// The slot.
    pub slot: usize,
    /// Time left before the start.
    pub wait: Duration,
    /// How its last worker ended (`exit code 1 after 230 ms`, `killed by SIGKILL ...`).
    pub last_exit: String,
}

// === impl Supervisor ===

/// Starts and watches the LB's workers (module docs). Cheap to clone: every clone is the
/// same supervisor.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state();
        f.debug_struct("Supervisor")
            .field("command", &state.config.command)
            .field("processes", &state.procs.len())
            .finish()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Look at the workers now (a worker joined or left, a reload, an exit).
    wake: Notify,
    /// Readiness may have changed (registration follows).
    changed: Notify,
    back_address: String,
    service: String,
    retire_grace: Duration,
    /// `setpriv`, when installed.
    setpriv: Option<PathBuf>,
    /// Whether the LB's environment sets `PYTHONUNBUFFERED` itself.
    python_unbuffered_set: bool,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<LbMetrics>,
}

struct State {
    config: SupervisionConfig,
    /// Rolling restarts started so far.
    generation: u64,
    slots: Vec<Slot>,
    /// The workers started and not yet reaped, by pid.
    procs: HashMap<u32, Proc>,
    rolling: Option<Rolling>,
    stopping: bool,
    setpriv_warned: bool,
}

/// One of the `worker_processes` places a worker runs in.
struct Slot {
    /// What its workers run, and their generation.
    command: Vec<String>,
    generation: u64,
    /// Added by a rolling restart that has not started a worker in it yet.
    fresh: bool,
    /// Its worker (booting or ready).
    current: Option<u32>,
    /// A worker booting to take over (recycling, rolling restart).
    replacement: Option<u32>,
    backoff: RestartBackoff,
    /// With no worker: when to start one.
    restart_at: Option<Instant>,
    /// Recycle `current` after this many calls.
    recycle_after: Option<u64>,
    /// A recycling replacement failed: not before this again.
    recycle_retry_at: Option<Instant>,
    /// How its last worker ended.
    last_exit: Option<String>,
}

/// Why a replacement was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replace {
    Recycled,
    Rolling,
}

impl Replace {
    fn reason(self) -> RestartReason {
        match self {
            Replace::Recycled => RestartReason::Recycled,
            Replace::Rolling => RestartReason::Rolling,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Its slot's worker.
    Current,
    /// Booting to replace its slot's worker.
    Replacement(Replace),
    /// Replaced or no longer wanted: finishing and leaving, never restarted.
    Retired,
}

struct Proc {
    slot: usize,
    generation: u64,
    command: Vec<String>,
    role: Role,
    started: Instant,
    boot_deadline: Instant,
    /// Joined the dispatcher at least once.
    joined: bool,
    /// Its connections now (from the dispatcher).
    conns: Vec<WorkerId>,
    /// SIGTERM sent; with `kill_at`, when SIGKILL follows.
    stopping: bool,
    kill_at: Option<Instant>,
    hung: bool,
    /// Killed for sending no HELLO in time.
    boot_killed: bool,
    output: Arc<Output>,
}

struct Rolling {
    generation: u64,
    command: Vec<String>,
    processes: usize,
}

impl Supervisor {
    /// The supervisor of `settings.config`: starts its workers at once when
    /// `worker_command` is set, and its task (which must run inside a tokio runtime).
    pub fn spawn(
        settings: SupervisorSettings,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<LbMetrics>,
    ) -> Self {
        let setpriv = Path::new(process::SETPRIV).is_file();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                config: settings.config,
                generation: 0,
                slots: Vec::new(),
                procs: HashMap::new(),
                rolling: None,
                stopping: false,
                setpriv_warned: false,
            }),
            wake: Notify::new(),
            changed: Notify::new(),
            back_address: settings.back_address,
            service: settings.service,
            retire_grace: settings.retire_grace,
            setpriv: setpriv.then(|| PathBuf::from(process::SETPRIV)),
            python_unbuffered_set: std::env::var_os("PYTHONUNBUFFERED").is_some(),
            dispatcher,
            metrics,
        });
        {
            let mut state = inner.state();
            if state.config.command.is_some() {
                let processes = state.config.processes;
                add_slots(&mut state, processes, Instant::now());
            }
        }
        tokio::spawn(manage(inner.clone()));
        Supervisor { inner }
    }

    /// Whether `pid` is a worker process this LB started and still tracks.
    pub fn is_supervised(&self, pid: u32) -> bool {
        self.inner.state().procs.contains_key(&pid)
    }

    /// A supervised worker is hung: mark it `hung` (state, metrics), send it SIGUSR1
    /// (rpc_thrift registered faulthandler there: every thread's stack on its stderr),
    /// collect the lines it writes to stderr from then on for up to `collect` (returning
    /// early 300 ms after the last line once at least one line came), then SIGKILL it
    /// (within 2 s of the call in any case) and return the collected lines (empty when none
    /// came). Its restart follows as for any exit, counted with reason "hung". Lines still
    /// go to the LB's log as usual.
    pub async fn kill_hung(&self, pid: u32, collect: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut lines = Vec::new();
        let mut watcher = {
            let mut state = self.inner.state();
            let Some(proc) = state.procs.get_mut(&pid) else {
                return lines;
            };
            proc.hung = true;
            for &conn in &proc.conns {
                self.inner.dispatcher.set_hung(conn);
            }
            proc.output.watch()
        };
        self.inner.changed.notify_one();
        if process::signal(pid, Signal::SIGUSR1) {
            let deadline = (start + collect).min(start + HUNG_KILL_WITHIN);
            let mut last: Option<Instant> = None;
            loop {
                let until = match last {
                    Some(at) => (at + DUMP_QUIET).min(deadline),
                    None => deadline,
                };
                let next = tokio::time::timeout_at(until.into(), watcher.recv());
                match next.await {
                    Ok(Some(line)) => {
                        lines.push(line);
                        last = Some(Instant::now());
                    }
                    _ => break,
                }
            }
        }
        process::signal_group(pid, Signal::SIGKILL);
        tracing::info!(
            service = self.inner.service,
            pid,
            lines = lines.len(),
            "hung worker: stack collected, SIGKILL sent"
        );
        lines
    }

    /// The live `worker_timeout_ms` (a reload may change it).
    pub fn worker_timeout(&self) -> Option<Duration> {
        self.inner.state().config.timeout
    }

    /// Whether `worker_command` is set.
    pub fn is_enabled(&self) -> bool {
        self.inner.state().config.command.is_some()
    }

    /// A worker joined or left the dispatcher: look at the workers now.
    pub fn workers_changed(&self) {
        self.inner.wake.notify_one();
    }

    /// Waits until a supervised worker's readiness may have changed beyond what the worker
    /// events tell (a worker marked hung); the registration follows.
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    /// Applies reloaded supervision keys (SIGHUP), then, with a `worker_command`, starts a
    /// rolling restart (the first workers, when the reload is what set the command).
    /// Removing `worker_command` needs a restart of the LB: the old one is kept (warned).
    /// Returns the generation the workers go to; `None` when no worker is supervised.
    pub fn reconfigure(&self, mut config: SupervisionConfig) -> Option<u64> {
        let mut state = self.inner.state();
        if state.stopping {
            return None;
        }
        if state.config.command.is_some() && config.command.is_none() {
            tracing::warn!(
                service = self.inner.service,
                "worker_command removed from the configuration: applied only by a restart of rpc_lb; its workers keep running"
            );
            config.command = state.config.command.clone();
        }
        let had_command = state.config.command.is_some();
        state.config = config;
        for slot in 0..state.slots.len() {
            let after = recycle_threshold(&state.config);
            state.slots[slot].recycle_after = after;
        }
        // Not supervised (nothing to restart).
        state.config.command.as_ref()?;
        let generation = if !had_command && state.slots.is_empty() {
            let processes = state.config.processes;
            tracing::info!(
                service = self.inner.service,
                processes,
                "worker_command set by a reload: starting the workers"
            );
            add_slots(&mut state, processes, Instant::now());
            state.generation
        } else {
            start_rolling(&mut state, &self.inner.service, "SIGHUP")
        };
        drop(state);
        self.inner.wake.notify_one();
        Some(generation)
    }

    /// Starts a rolling restart (`POST /workers/restart`); returns the generation the
    /// workers go to. One already under way is superseded (its replaced workers are
    /// replaced again).
    ///
    /// # Errors
    /// [`RestartRefused`] without `worker_command`, or while the LB stops.
    pub fn rolling_restart(&self, why: &str) -> Result<u64, RestartRefused> {
        let mut state = self.inner.state();
        if state.stopping {
            return Err(RestartRefused::Stopping);
        }
        if state.config.command.is_none() {
            return Err(RestartRefused::NotSupervised);
        }
        let generation = start_rolling(&mut state, &self.inner.service, why);
        drop(state);
        self.inner.wake.notify_one();
        Ok(generation)
    }

    /// Supervised workers started and not ready yet.
    pub fn booting(&self) -> usize {
        let state = self.inner.state();
        state
            .procs
            .values()
            .filter(|p| p.state() == WorkerState::Booting)
            .count()
    }

    /// What `/status` shows.
    pub fn status(&self) -> SupervisorStatus {
        let state = self.inner.state();
        let now = Instant::now();
        let mut workers: Vec<ProcessStatus> = state
            .procs
            .iter()
            .map(|(&pid, p)| ProcessStatus {
                pid,
                slot: p.slot,
                generation: p.generation,
                state: p.state(),
                up: now.saturating_duration_since(p.started),
                connections: p.conns.clone(),
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.generation, w.pid));
        let restarting = state
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let at = slot.restart_at?;
                (slot.current.is_none()).then(|| Restarting {
                    slot: i,
                    wait: at.saturating_duration_since(now),
                    last_exit: slot.last_exit.clone().unwrap_or_default(),
                })
            })
            .collect();
        SupervisorStatus {
            command: state.config.command.clone(),
            processes: state.config.processes,
            generation: state.generation,
            rolling: state.rolling.is_some(),
            workers,
            restarting,
        }
    }

    /// The LB stops: no more restarts, no rolling restart; every worker is taken out of the
    /// dispatcher and sent SIGTERM (it sends STOP, finishes its calls, exits). Returns how
    /// many were told.
    pub fn stop(&self) -> usize {
        let mut state = self.inner.state();
        state.stopping = true;
        state.rolling = None;
        let mut told = 0;
        for (&pid, proc) in &mut state.procs {
            if !proc.stopping {
                proc.stopping = true;
                for &conn in &proc.conns {
                    self.inner.dispatcher.deactivate(conn);
                }
                process::signal(pid, Signal::SIGTERM);
                told += 1;
            }
        }
        if told > 0 {
            tracing::info!(
                service = self.inner.service,
                workers = told,
                "stopping: SIGTERM sent to every supervised worker"
            );
        }
        told
    }

    /// Supervised workers still running (not yet reaped).
    pub fn running(&self) -> usize {
        self.inner.state().procs.len()
    }

    /// Kills every supervised worker still running (and what it started): the end of the
    /// drain grace. Returns how many.
    pub fn kill_all(&self) -> usize {
        let state = self.inner.state();
        for &pid in state.procs.keys() {
            process::signal_group(pid, Signal::SIGKILL);
        }
        state.procs.len()
    }
}

/// The watchdog's view of the supervisor ([`crate::watchdog`]).
impl HungKiller for Supervisor {
    fn is_supervised(&self, pid: u32) -> bool {
        Supervisor::is_supervised(self, pid)
    }

    fn kill_hung(
        &self,
        pid: u32,
        collect: Duration,
    ) -> Pin<Box<dyn Future<Output = Vec<String>> + Send + '_>> {
        Box::pin(Supervisor::kill_hung(self, pid, collect))
    }
}

// === impl Inner ===

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the workers where the configuration wants them (module docs): readiness,
    /// boot deadlines, replaced workers' SIGKILL, restarts due, recycling, the rolling
    /// restart's next step.
    fn reconcile(self: &Arc<Self>, state: &mut State, now: Instant) {
        // Stopping, or nothing to supervise (no `worker_command`).
        if state.stopping || (state.slots.is_empty() && state.procs.is_empty()) {
            return;
        }
        let served = self.refresh(state);
        self.deadlines(state, now);
        for index in 0..state.slots.len() {
            let slot = &state.slots[index];
            let due = !slot.fresh
                && slot.current.is_none()
                && slot.replacement.is_none()
                && slot.restart_at.is_none_or(|at| at <= now);
            if due {
                let (command, generation) = (slot.command.clone(), slot.generation);
                self.start(state, index, command, generation, Role::Current, now);
            }
        }
        self.recycle(state, &served, now);
        self.roll(state, now);
    }

    /// Reads the dispatcher's workers: each process's connections, the ones that just
    /// became ready, calls served by pid. A stopping or hung worker that joined again is
    /// taken out at once.
    fn refresh(self: &Arc<Self>, state: &mut State) -> HashMap<u32, u64> {
        let mut conns: HashMap<u32, Vec<WorkerId>> = HashMap::new();
        let mut served: HashMap<u32, u64> = HashMap::new();
        let mut active = Vec::new();
        for worker in self.dispatcher.workers() {
            let Some(pid) = worker.pid else { continue };
            conns.entry(pid).or_default().push(worker.load.id);
            *served.entry(pid).or_default() += worker.served;
            if worker.load.active {
                active.push((pid, worker.load.id));
            }
        }
        let mut ready = Vec::new();
        for (pid, proc) in &mut state.procs {
            proc.conns = conns.remove(pid).unwrap_or_default();
            if !proc.joined && !proc.conns.is_empty() {
                proc.joined = true;
                ready.push(*pid);
            }
        }
        for (pid, id) in active {
            match state.procs.get(&pid) {
                Some(p) if p.hung => {
                    self.dispatcher.set_hung(id);
                }
                Some(p) if p.stopping => {
                    self.dispatcher.deactivate(id);
                }
                _ => {}
            }
        }
        for pid in ready {
            self.ready(state, pid);
        }
        served
    }

    /// Worker `pid` joined for the first time.
    fn ready(self: &Arc<Self>, state: &mut State, pid: u32) {
        let Some(proc) = state.procs.get(&pid) else {
            return;
        };
        let (index, role) = (proc.slot, proc.role);
        tracing::info!(
            service = self.service,
            pid,
            slot = index,
            generation = proc.generation,
            boot_ms = proc.started.elapsed().as_millis() as u64,
            "supervised worker ready"
        );
        let threshold = recycle_threshold(&state.config);
        let Role::Replacement(why) = role else {
            if role == Role::Current {
                state.slots[index].recycle_after = threshold;
            }
            return;
        };
        let (command, generation) = (proc.command.clone(), proc.generation);
        let slot = &mut state.slots[index];
        slot.replacement = None;
        slot.command = command;
        slot.generation = generation;
        slot.fresh = false;
        slot.restart_at = None;
        slot.recycle_after = threshold;
        slot.recycle_retry_at = None;
        let old = slot.current.replace(pid);
        if let Some(proc) = state.procs.get_mut(&pid) {
            proc.role = Role::Current;
        }
        if let Some(old) = old {
            self.metrics.restarted(why.reason());
            tracing::info!(
                service = self.service,
                slot = index,
                old,
                new = pid,
                generation,
                reason = why.reason().label(),
                "worker replaced: the old one gets no new call and SIGTERM"
            );
            self.retire(state, old, Instant::now());
        }
    }

    /// Takes worker `pid` out of rotation for good and sends it SIGTERM; SIGKILL follows
    /// after the drain grace.
    fn retire(&self, state: &mut State, pid: u32, now: Instant) {
        let Some(proc) = state.procs.get_mut(&pid) else {
            return;
        };
        proc.role = Role::Retired;
        if proc.stopping {
            return;
        }
        proc.stopping = true;
        proc.kill_at = Some(now + self.retire_grace);
        for &conn in &proc.conns {
            self.dispatcher.deactivate(conn);
        }
        process::signal(pid, Signal::SIGTERM);
    }

    /// Boot deadlines and the end of replaced workers' grace.
    fn deadlines(&self, state: &mut State, now: Instant) {
        for (&pid, proc) in &mut state.procs {
            if !proc.joined && !proc.boot_killed && !proc.stopping && now >= proc.boot_deadline {
                proc.boot_killed = true;
                tracing::warn!(
                    service = self.service,
                    pid,
                    slot = proc.slot,
                    generation = proc.generation,
                    boot_timeout_ms = state.config.boot_timeout.as_millis() as u64,
                    "supervised worker sent no HELLO within worker_boot_timeout_ms: killing it"
                );
                process::signal_group(pid, Signal::SIGKILL);
            }
            if let Some(at) = proc.kill_at
                && now >= at
            {
                proc.kill_at = None;
                tracing::warn!(
                    service = self.service,
                    pid,
                    "replaced worker still running after the drain grace: SIGKILL"
                );
                process::signal_group(pid, Signal::SIGKILL);
            }
        }
    }

    /// Starts a replacement for each ready worker past its `worker_max_requests`.
    fn recycle(self: &Arc<Self>, state: &mut State, served: &HashMap<u32, u64>, now: Instant) {
        if state.config.max_requests == 0 {
            return;
        }
        for index in 0..state.slots.len() {
            let slot = &state.slots[index];
            let (Some(pid), None, Some(limit)) =
                (slot.current, slot.replacement, slot.recycle_after)
            else {
                continue;
            };
            if slot.recycle_retry_at.is_some_and(|at| at > now) {
                continue;
            }
            let Some(proc) = state.procs.get(&pid) else {
                continue;
            };
            let calls = served.get(&pid).copied().unwrap_or(0);
            if !proc.joined || proc.stopping || proc.hung || calls < limit {
                continue;
            }
            tracing::info!(
                service = self.service,
                pid,
                slot = index,
                calls,
                "recycling worker (worker_max_requests): starting its replacement"
            );
            let (command, generation) = (slot.command.clone(), slot.generation);
            let role = Role::Replacement(Replace::Recycled);
            self.start(state, index, command, generation, role, now);
        }
    }

    /// The rolling restart's next step: replace the first slot not at its generation (one
    /// at a time), or, once all are, retire the surplus slots and finish.
    fn roll(self: &Arc<Self>, state: &mut State, now: Instant) {
        let Some(rolling) = &state.rolling else {
            return;
        };
        let (target, processes, command) = (
            rolling.generation,
            rolling.processes,
            rolling.command.clone(),
        );
        for index in 0..processes {
            if index == state.slots.len() {
                let mut slot = Slot::new(command.clone(), target);
                slot.fresh = true;
                state.slots.push(slot);
            }
            let slot = &state.slots[index];
            if !slot.fresh && slot.generation >= target {
                continue;
            }
            if slot.replacement.is_none() {
                let role = Role::Replacement(Replace::Rolling);
                self.start(state, index, command, target, role, now);
            }
            return;
        }
        while state.slots.len() > processes {
            if let Some(slot) = state.slots.pop() {
                for pid in [slot.current, slot.replacement].into_iter().flatten() {
                    self.retire(state, pid, now);
                }
            }
        }
        state.rolling = None;
        tracing::info!(
            service = self.service,
            generation = target,
            processes,
            "rolling restart done"
        );
    }

    /// Starts a worker in slot `index` as `role`.
    fn start(
        self: &Arc<Self>,
        state: &mut State,
        index: usize,
        command: Vec<String>,
        generation: u64,
        role: Role,
        now: Instant,
    ) {
        if self.setpriv.is_none() && !state.setpriv_warned {
            state.setpriv_warned = true;
            tracing::warn!(
                setpriv = process::SETPRIV,
                "setpriv (util-linux) not found: supervised workers are not killed if rpc_lb dies"
            );
        }
        let env = WorkerEnv {
            back_address: self.back_address.clone(),
            slot: index,
            generation,
        };
        let launch = process::launch(
            &command,
            self.setpriv.as_deref(),
            &env,
            self.python_unbuffered_set,
        );
        let spawned = match process::spawn(&launch, index) {
            Ok(spawned) => spawned,
            Err(e) => {
                self.metrics.boot_failures.inc();
                let what = format!("could not be started: {e}");
                tracing::warn!(
                    service = self.service,
                    slot = index,
                    command = ?command,
                    error = %e,
                    "cannot start a supervised worker"
                );
                match role {
                    Role::Replacement(why) => {
                        self.replacement_failed(state, index, why, &what, &[])
                    }
                    _ => {
                        let slot = &mut state.slots[index];
                        slot.last_exit = Some(what);
                        slot.restart_at = Some(now + slot.backoff.step());
                    }
                }
                return;
            }
        };
        let pid = spawned.pid;
        tracing::info!(
            service = self.service,
            pid,
            slot = index,
            generation,
            role = role.label(),
            "supervised worker started"
        );
        let slot = &mut state.slots[index];
        match role {
            Role::Replacement(_) => slot.replacement = Some(pid),
            _ => {
                slot.current = Some(pid);
                slot.restart_at = None;
            }
        }
        state.procs.insert(
            pid,
            Proc {
                slot: index,
                generation,
                command,
                role,
                started: now,
                boot_deadline: now + state.config.boot_timeout,
                joined: false,
                conns: Vec::new(),
                stopping: false,
                kill_at: None,
                hung: false,
                boot_killed: false,
                output: spawned.output,
            },
        );
        let inner = self.clone();
        let (mut child, stderr_done) = (spawned.child, spawned.stderr_done);
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tokio::time::timeout(STDERR_DRAIN, stderr_done).await;
            inner.exited(pid, status);
        });
    }

    /// A replacement ended or could not start before it was ready: a rolling restart is
    /// aborted (the old workers stay); a recycling is tried again later.
    fn replacement_failed(
        &self,
        state: &mut State,
        index: usize,
        why: Replace,
        what: &str,
        tail: &[String],
    ) {
        let now = Instant::now();
        match why {
            Replace::Rolling => {
                let generation = state.rolling.take().map(|r| r.generation);
                tracing::warn!(
                    service = self.service,
                    slot = index,
                    generation,
                    "rolling restart aborted: the new worker {what}; the old workers stay{}",
                    stderr_text(tail)
                );
                // Slots this restart added and never filled go with it.
                while state
                    .slots
                    .last()
                    .is_some_and(|s| s.fresh && s.current.is_none() && s.replacement.is_none())
                {
                    state.slots.pop();
                }
            }
            Replace::Recycled => {
                let Some(slot) = state.slots.get_mut(index) else {
                    return;
                };
                let delay = slot.backoff.step();
                slot.recycle_retry_at = Some(now + delay);
                tracing::warn!(
                    service = self.service,
                    slot = index,
                    retry_in_ms = delay.as_millis() as u64,
                    "recycling postponed: the replacement {what}; the old worker stays{}",
                    stderr_text(tail)
                );
            }
        }
        if let Some(slot) = state.slots.get_mut(index)
            && !slot.fresh
            && slot.current.is_none()
            && slot.restart_at.is_none()
        {
            slot.restart_at = Some(now + slot.backoff.step());
        }
    }

    /// Worker `pid` ended (reaped): restart, abort or forget, as its role says.
    fn exited(self: &Arc<Self>, pid: u32, status: std::io::Result<std::process::ExitStatus>) {
        let now = Instant::now();
        let mut state = self.state();
        let Some(proc) = state.procs.remove(&pid) else {
            return;
        };
        let up = now.saturating_duration_since(proc.started);
        let how = match &status {
            Ok(status) => describe(*status),
            Err(e) => format!("unknown status ({e})"),
        };
        let boot_failure =
            !proc.joined && !proc.stopping && !state.stopping && proc.role != Role::Retired;
        if boot_failure {
            self.metrics.boot_failures.inc();
        }
        let tail = proc.output.tail();
        match proc.role {
            Role::Retired => tracing::info!(
                service = self.service,
                pid,
                status = how,
                up_ms = up.as_millis() as u64,
                "replaced worker exited"
            ),
            _ if state.stopping => tracing::info!(
                service = self.service,
                pid,
                slot = proc.slot,
                status = how,
                "supervised worker exited (stopping)"
            ),
            Role::Current => {
                let stopping = state.stopping;
                let Some(slot) = state.slots.get_mut(proc.slot) else {
                    return;
                };
                if slot.current == Some(pid) {
                    slot.current = None;
                }
                let reason = if proc.hung {
                    RestartReason::Hung
                } else {
                    RestartReason::Exit
                };
                let delay = slot.backoff.after_exit(up);
                if slot.replacement.is_none() && !stopping {
                    slot.restart_at = Some(now + delay);
                }
                slot.last_exit = Some(format!("{how} after {} ms", up.as_millis()));
                self.metrics.restarted(reason);
                let stderr = if reason == RestartReason::Exit {
                    stderr_text(&tail)
                } else {
                    String::new()
                };
                tracing::warn!(
                    service = self.service,
                    pid,
                    slot = proc.slot,
                    generation = proc.generation,
                    status = how,
                    up_ms = up.as_millis() as u64,
                    boot_failure,
                    reason = reason.label(),
                    restart_in_ms = delay.as_millis() as u64,
                    "supervised worker exited; restarting{stderr}"
                );
            }
            Role::Replacement(why) => {
                if let Some(slot) = state.slots.get_mut(proc.slot)
                    && slot.replacement == Some(pid)
                {
                    slot.replacement = None;
                }
                let what = if proc.boot_killed {
                    format!("(pid {pid}) sent no HELLO within worker_boot_timeout_ms")
                } else {
                    format!("(pid {pid}) exited before its HELLO: {how}")
                };
                self.replacement_failed(&mut state, proc.slot, why, &what, &tail);
            }
        }
        drop(state);
        self.wake.notify_one();
        self.changed.notify_one();
    }
}

/// The supervisor's task: looks at the workers on every wake-up and every [`TICK`], until
/// the LB stopped and every worker is gone.
async fn manage(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        let mut state = inner.state();
        if state.stopping && state.procs.is_empty() {
            return;
        }
        inner.reconcile(&mut state, Instant::now());
    }
}

/// Adds `n` slots of the configured command at the current generation, to start now.
fn add_slots(state: &mut State, n: usize, now: Instant) {
    let Some(command) = state.config.command.clone() else {
        return;
    };
    for _ in 0..n {
        let mut slot = Slot::new(command.clone(), state.generation);
        slot.restart_at = Some(now);
        state.slots.push(slot);
    }
}

/// Starts a rolling restart to the next generation with the configured command and
/// process count; returns that generation.
fn start_rolling(state: &mut State, service: &str, why: &str) -> u64 {
    state.generation += 1;
    let generation = state.generation;
    let (Some(command), processes) = (state.config.command.clone(), state.config.processes) else {
        return generation;
    };
    if state.rolling.is_some() {
        tracing::info!(
            service,
            generation,
            "a rolling restart is under way: superseded by a new one"
        );
    }
    tracing::info!(
        service,
        generation,
        processes,
        why,
        "rolling restart: each worker is replaced once its replacement is ready"
    );
    state.rolling = Some(Rolling {
        generation,
        command,
        processes,
    });
    generation
}

/// After how many calls a worker is recycled: `worker_max_requests` plus a random
/// 0..=`worker_max_requests_jitter` (gunicorn's rule); `None` when it never is.
fn recycle_threshold(config: &SupervisionConfig) -> Option<u64> {
    if config.max_requests == 0 {
        return None;
    }
    let jitter = match config.max_requests_jitter {
        0 => 0,
        n => rand::rng().random_range(0..=n),
    };
    Some(u64::from(config.max_requests) + u64::from(jitter))
}

/// An exit status in words.
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(name) => format!("killed by {name}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        _ => status.to_string(),
    }
}

/// The last stderr lines, for a log line (empty when there are none).
fn stderr_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    format!("; its last stderr lines:\n  {}", tail.join("\n  "))
}

// === impl Slot ===

impl Slot {
    fn new(command: Vec<String>, generation: u64) -> Self {
        Slot {
            command,
            generation,
            fresh: false,
            current: None,
            replacement: None,
            backoff: RestartBackoff::default(),
            restart_at: None,
            recycle_after: None,
            recycle_retry_at: None,
            last_exit: None,
        }
    }
}

// === impl Proc ===

impl Proc {
    fn state(&self) -> WorkerState {
        if self.hung {
            WorkerState::Hung
        } else if self.stopping {
            WorkerState::Stopping
        } else if self.conns.is_empty() {
            WorkerState::Booting
        } else {
            WorkerState::Ready
        }
    }
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Current => "worker",
            Role::Replacement(Replace::Recycled) => "recycling replacement",
            Role::Replacement(Replace::Rolling) => "rolling restart replacement",
            Role::Retired => "retired",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    fn supervisor(script: &str, processes: usize, boot_timeout: Duration) -> Supervisor {
        let config = SupervisionConfig {
            command: Some(sh(script)),
            processes,
            boot_timeout,
            ..SupervisionConfig::default()
        };
        let settings = SupervisorSettings {
            config,
            back_address: "/tmp/nowhere/back.sock".into(),
            service: "svc".into(),
            retire_grace: Duration::from_secs(5),
        };
        Supervisor::spawn(
            settings,
            Arc::new(Dispatcher::new(10)),
            Arc::new(LbMetrics::new("svc")),
        )
    }

    /// Polls `done` every 20 ms for at most 10 s.
    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pids(s: &Supervisor) -> Vec<u32> {
        s.status().workers.iter().map(|w| w.pid).collect()
    }

    /// The value of the metric sample `name` (with its labels, as rendered).
    fn counter(s: &Supervisor, name: &str) -> u64 {
        let text = String::from_utf8(s.inner.metrics.render(&Default::default())).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    const EXITS: &str = r#"rpc_lb_worker_restarts_total{reason="exit"}"#;

    #[tokio::test]
    async fn workers_get_their_slot_generation_and_back_address() {
        let s = supervisor(
            r#"echo "env $RPC_LB_BACK_ADDRESS $RPC_WORKER_ID $RPC_WORKER_GENERATION" >&2; exec sleep 30"#,
            2,
            Duration::from_secs(30),
        );
        wait_for("two workers", || pids(&s).len() == 2).await;
        let outputs: Vec<_> = {
            let state = s.inner.state();
            let mut procs: Vec<_> = state.procs.values().collect();
            procs.sort_by_key(|p| p.slot);
            procs.iter().map(|p| p.output.clone()).collect()
        };
        for (slot, output) in outputs.iter().enumerate() {
            wait_for("the env line", || !output.tail().is_empty()).await;
            assert_eq!(
                output.tail(),
                [format!("env /tmp/nowhere/back.sock {slot} 0")]
            );
        }
        let status = s.status();
        assert!(
            status
                .workers
                .iter()
                .all(|w| w.state == WorkerState::Booting)
        );
        assert_eq!(s.booting(), 2);
        let pid = status.workers[0].pid;
        assert!(s.is_supervised(pid) && !s.is_supervised(std::process::id()));
        assert_eq!(s.stop(), 2);
        wait_for("every worker reaped", || s.running() == 0).await;
        assert!(!s.is_supervised(pid));
    }

    #[tokio::test]
    async fn a_worker_without_hello_is_killed_at_the_boot_timeout_and_restarted() {
        let s = supervisor("exec sleep 30", 1, Duration::from_millis(300));
        wait_for("a worker", || pids(&s).len() == 1).await;
        let first = pids(&s)[0];
        wait_for("its replacement", || {
            pids(&s).first().is_some_and(|&p| p != first)
        })
        .await;
        assert!(counter(&s, "rpc_lb_worker_boot_failures_total") >= 1);
        assert!(counter(&s, EXITS) >= 1);
        s.stop();
        wait_for("every worker reaped", || s.running() == 0).await;
    }

    #[tokio::test]
    async fn a_crash_loop_backs_off() {
        let s = supervisor("exit 3", 1, Duration::from_secs(30));
        let started = Instant::now();
        wait_for("four exits", || counter(&s, EXITS) >= 4).await;
        // 0.1 + 0.2 + 0.4 s of backoff at least between the first exit and the fourth.
        assert!(started.elapsed() >= Duration::from_millis(700));
        assert_eq!(
            counter(&s, "rpc_lb_worker_boot_failures_total"),
            counter(&s, EXITS),
            "none of them ever joined"
        );
        // Between two starts the slot waits, and says why.
        wait_for("a restart pending", || !s.status().restarting.is_empty()).await;
        let restarting = s.status().restarting;
        let last = &restarting[0].last_exit;
        assert_eq!(last.split(" after").next(), Some("exit code 3"), "{last}");
        assert!(restarting[0].wait <= crate::backoff::MAX);
        s.stop();
    }

    #[tokio::test]
    async fn kill_hung_collects_the_dump_then_kills_and_the_slot_restarts() {
        let s = supervisor(
            r#"trap 'echo "Thread 0x1 (most recent call first):" >&2; echo "  File \"x.py\", line 3 in f" >&2' USR1
               while :; do sleep 0.05; done"#,
            1,
            Duration::from_secs(30),
        );
        wait_for("a worker", || pids(&s).len() == 1).await;
        let pid = pids(&s)[0];
        // Let the shell install its trap.
        wait_for("the shell running", || {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("while"))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let lines = s.kill_hung(pid, Duration::from_secs(1)).await;
        let took = start.elapsed();
        assert_eq!(
            lines,
            [
                "Thread 0x1 (most recent call first):",
                r#"  File "x.py", line 3 in f"#
            ]
        );
        assert!(took < Duration::from_millis(900), "returns early: {took:?}");
        wait_for("its replacement", || {
            pids(&s).first().is_some_and(|&p| p != pid)
        })
        .await;
        assert_eq!(
            counter(&s, r#"rpc_lb_worker_restarts_total{reason="hung"}"#),
            1
        );
        // An unknown pid: nothing collected, nothing killed.
        assert!(
            s.kill_hung(std::process::id(), Duration::from_secs(1))
                .await
                .is_empty()
        );
        s.stop();
    }

    #[tokio::test]
    async fn kill_hung_without_a_dump_kills_within_two_seconds() {
        let s = supervisor("trap '' USR1; exec sleep 30", 1, Duration::from_secs(30));
        wait_for("a worker", || pids(&s).len() == 1).await;
        let pid = pids(&s)[0];
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let lines = s.kill_hung(pid, Duration::from_secs(10)).await;
        assert!(lines.is_empty());
        assert!(start.elapsed() < Duration::from_secs(2));
        wait_for("it is gone", || !s.is_supervised(pid)).await;
        s.stop();
    }

    #[tokio::test]
    async fn without_worker_command_nothing_is_supervised() {
        let settings = SupervisorSettings {
            config: SupervisionConfig::default(),
            back_address: "x".into(),
            service: "svc".into(),
            retire_grace: Duration::from_secs(1),
        };
        let s = Supervisor::spawn(
            settings,
            Arc::new(Dispatcher::new(10)),
            Arc::new(LbMetrics::new("svc")),
        );
        assert!(!s.is_enabled());
        assert_eq!(
            s.rolling_restart("test"),
            Err(RestartRefused::NotSupervised)
        );
        assert_eq!(s.reconfigure(SupervisionConfig::default()), None);
        tokio::time::sleep(TICK * 2).await;
        assert_eq!(s.running(), 0);
        assert_eq!(s.stop(), 0);
        assert_eq!(s.rolling_restart("test"), Err(RestartRefused::Stopping));
    }

    #[test]
    fn recycle_thresholds_add_the_jitter() {
        let mut config = SupervisionConfig::default();
        assert_eq!(recycle_threshold(&config), None);
        config.max_requests = 50;
        assert_eq!(recycle_threshold(&config), Some(50));
        config.max_requests_jitter = 5;
        for _ in 0..50 {
            let n = recycle_threshold(&config).unwrap();
            assert!((50..=55).contains(&n), "{n}");
        }
    }
}
