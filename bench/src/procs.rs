//! The processes under test: spawning them in their own process group (so a Python server's
//! worker processes are measured and stopped with it), draining their output, stopping them
//! on drop, and reading what the kernel says about them: CPU seconds (`utime + stime` of
//! `/proc/<pid>/stat`, summed over the group), resident memory, CPU affinity.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Lines of output kept per process, for error reports.
const TAIL_LINES: usize = 60;

/// Output seen so far: the last lines, and when each watched marker first appeared.
#[derive(Debug, Default)]
struct Output {
    tail: VecDeque<String>,
    markers: HashMap<String, Instant>,
}

/// A child process in its own process group; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<Output>>,
    /// Substrings whose first appearance in the output is timed.
    watched: Arc<Vec<String>>,
    /// SIGTERM grace before SIGKILL.
    grace: Duration,
}

// === impl Proc ===

impl Proc {
    /// Spawns `cmd` as the leader of a new process group, with stdin closed and stdout and
    /// stderr drained by background threads. The first time a line contains one of `watch`,
    /// the moment is noted (see [`Proc::marker`]).
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn spawn(name: &str, mut cmd: Command, watch: &[&str]) -> anyhow::Result<Proc> {
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {name}: {:?}", cmd.get_program()))?;
        let output = Arc::new(Mutex::new(Output::default()));
        let watched: Arc<Vec<String>> = Arc::new(watch.iter().map(|s| (*s).to_owned()).collect());
        if let Some(out) = child.stdout.take() {
            drain(out, output.clone(), watched.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, output.clone(), watched.clone());
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            output,
            watched,
            grace: Duration::from_secs(5),
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When a watched marker first appeared in the output.
    pub fn marker(&self, needle: &str) -> Option<Instant> {
        debug_assert!(self.watched.iter().any(|w| w == needle));
        self.lock().markers.get(needle).copied()
    }

    /// The last lines of output.
    pub fn tail(&self) -> String {
        self.lock()
            .tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Fails (with the output tail) if the process has exited.
    ///
    /// # Errors
    /// When the process is gone.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited early ({status})\n--- output ---\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }

    /// Stops the process group: SIGTERM, then SIGKILL after the grace period. Returns
    /// whether the leader was still running when asked to stop.
    pub fn stop(&mut self) -> bool {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(self.pgid(), Signal::SIGKILL);
            return false;
        }
        let _ = killpg(self.pgid(), Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // Workers of the group may outlive their leader (multiprocessing daemons).
                let _ = killpg(self.pgid(), Signal::SIGKILL);
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = killpg(self.pgid(), Signal::SIGKILL);
        let _ = self.child.wait();
        true
    }

    fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Output> {
        self.output.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn drain(
    stream: impl Read + Send + 'static,
    output: Arc<Mutex<Output>>,
    watched: Arc<Vec<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let now = Instant::now();
            let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
            for needle in watched.iter() {
                if line.contains(needle.as_str()) && !out.markers.contains_key(needle) {
                    out.markers.insert(needle.clone(), now);
                }
            }
            if out.tail.len() == TAIL_LINES {
                out.tail.pop_front();
            }
            out.tail.push_back(line);
        }
    });
}

// === /proc readings ===

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, usually 100).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `(pid, pgrp, utime + stime in ticks)` of one `/proc/<pid>/stat`.
fn read_stat(pid: &str) -> Option<(u32, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let pgrp = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let pid = text.split_whitespace().next()?.parse().ok()?;
    Some((pid, pgrp, utime + stime))
}

/// CPU seconds used so far by every live process of each process group in `groups` (an id
/// that is not a group leader counts that process alone). Processes are found by scanning
/// `/proc` once.
pub fn group_cpu(groups: &[u32]) -> Vec<f64> {
    let mut ticks = vec![0u64; groups.len()];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // A process counts for a group it leads or belongs to; an id that leads no group
            // (a process started elsewhere) counts for itself.
            if let Some((pid, pgrp, t)) = read_stat(name)
                && let Some(i) = groups.iter().position(|g| *g == pgrp || *g == pid)
            {
                ticks[i] += t;
            }
        }
    }
    ticks.iter().map(|t| *t as f64 / clock_ticks()).collect()
}

/// CPU seconds of the whole machine (all CPUs), from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Busy: user, nice, system, irq, softirq.
    pub busy: f64,
    /// Stolen by the hypervisor (the vCPUs wanted to run and did not).
    pub steal: f64,
}

// === impl MachineCpu ===

impl MachineCpu {
    /// The difference from an earlier reading.
    pub fn since(&self, before: &MachineCpu) -> MachineCpu {
        MachineCpu {
            busy: (self.busy - before.busy).max(0.0),
            steal: (self.steal - before.steal).max(0.0),
        }
    }
}

/// CPU seconds the machine has spent so far (see [`MachineCpu`]).
pub fn machine_cpu() -> MachineCpu {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return MachineCpu::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / clock_ticks();
    MachineCpu {
        // user nice system idle iowait irq softirq steal
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        steal: at(7),
    }
}

/// CPU seconds used so far by this process (all its threads).
pub fn self_cpu() -> f64 {
    read_stat("self").map_or(0.0, |(_, _, t)| t as f64 / clock_ticks())
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Process ids of a process group.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((pid, pgrp, _)) = read_stat(name)
                && pgrp == pgid
            {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The CPUs this process may run on, as `taskset -c` takes them (`0-1`).
pub fn allowed_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .map(|l| l["Cpus_allowed_list:".len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "0-1".to_owned())
}

/// The CPU among `allowed` (a `taskset -c` list such as `0-1` or `0,2`) that was idlest over
/// the last `sample`: on a shared machine, the one where pinned work is least disturbed.
pub fn idlest_cpu(allowed: &str, sample: std::time::Duration) -> u32 {
    let cpus = parse_cpu_list(allowed);
    let before = cpu_idle_ticks();
    std::thread::sleep(sample);
    let after = cpu_idle_ticks();
    cpus.iter()
        .copied()
        .max_by_key(|cpu| {
            let idle = |m: &HashMap<u32, u64>| m.get(cpu).copied().unwrap_or(0);
            idle(&after).saturating_sub(idle(&before))
        })
        .unwrap_or(0)
}

/// `0-2,4` -> `[0, 1, 2, 4]`.
fn parse_cpu_list(list: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let mut ends = part.trim().splitn(2, '-').map(|n| n.trim().parse::<u32>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), Some(Ok(b))) => cpus.extend(a..=b),
            (Some(Ok(a)), None) => cpus.push(a),
            _ => {}
        }
    }
    cpus
}

/// Idle (+ iowait) ticks per CPU from `/proc/stat`.
fn cpu_idle_ticks() -> HashMap<u32, u64> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            let values: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
            Some((cpu, values.get(3)? + values.get(4).copied().unwrap_or(0)))
        })
        .collect()
}

/// Sets the CPU affinity of every thread of `pid` (`taskset -a -p -c cpus pid`).
///
/// # Errors
/// When taskset fails.
pub fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("run taskset")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The soft open-file limit of this process.
pub fn nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// Raises this process's open-file limit (inherited by every process it starts) to `want`,
/// or as high as allowed. Returns the new soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    // As root the hard limit may be raised too (up to fs.nr_open).
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let target = want.min(hard).max(soft);
    if setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0,2-3"), vec![0, 2, 3]);
        assert!(idlest_cpu("0", std::time::Duration::from_millis(1)) == 0);
    }
}
