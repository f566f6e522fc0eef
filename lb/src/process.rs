//! One worker process the LB starts (`worker_command`, CONTRACT section 9): its command line
//! and environment ([`launch`], pure, so tests check it), starting it in a process group of
//! its own and killed if the LB dies ([`spawn`]), its stdout and stderr lines in the LB's log
//! tagged with its pid and slot ([`Output`]: the last stderr lines kept, and a watcher may
//! follow them), and the signals the supervisor sends it ([`signal`], [`signal_group`]).
//! The [`crate::supervisor`] decides when; this module only does.
//!
//! # Killed with the LB
//! No `pre_exec` (unsafe code is forbidden here), so `prctl(PR_SET_PDEATHSIG)` comes from
//! util-linux's `setpriv --pdeathsig KILL --`, put in front of the command when [`SETPRIV`]
//! exists (it execs the command: the pid stays the worker's). The kernel sends the signal
//! when the *thread* that forked the worker ends, so workers are started from runtime
//! threads, which live as long as the LB, never from `spawn_blocking`.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// util-linux's `setpriv`, which sets the parent-death signal and execs the worker.
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// Stderr lines kept per worker, logged again when it ends badly.
pub const STDERR_TAIL: usize = 20;

/// Longest output line logged as one; a longer one is cut into pieces of this size.
const MAX_LINE: usize = 16 * 1024;

/// Environment variables a worker must not inherit from the LB: systemd's notification
/// socket (the LB's readiness is the LB's to tell) and socket activation (CONTRACT section
/// 9: the inherited listeners are not the worker's).
pub const ENV_REMOVED: [&str; 4] = [
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// What a worker learns from its environment (CONTRACT section 9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// `RPC_LB_BACK_ADDRESS`: the LB's `back_address`, as configured.
    pub back_address: String,
    /// `RPC_WORKER_ID`: its slot, 0-based.
    pub slot: usize,
    /// `RPC_WORKER_GENERATION`: the LB's rolling-restart count, 0-based.
    pub generation: u64,
}

/// A worker's command line, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The program run (`setpriv`, or the command's first word).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables set on top of the LB's environment.
    pub env: Vec<(String, String)>,
}

/// The command line of a worker: `command` (already split into words, CONTRACT section 9:
/// no shell), behind `setpriv --pdeathsig KILL --` when `setpriv` is given; the variables of
/// `env`, and `PYTHONUNBUFFERED=1` unless `python_unbuffered_set` (the LB's own
/// environment has it): a worker's stdout is a pipe, and its lines belong in the log when
/// written, not when a buffer fills.
///
/// # Panics
/// When `command` is empty (the configuration refuses such a `worker_command`).
pub fn launch(
    command: &[String],
    setpriv: Option<&Path>,
    env: &WorkerEnv,
    python_unbuffered_set: bool,
) -> Launch {
    assert!(!command.is_empty(), "worker_command names no program");
    let (program, args) = match setpriv {
        Some(setpriv) => {
            let mut args: Vec<String> = ["--pdeathsig", "KILL", "--"].map(String::from).into();
            args.extend(command.iter().cloned());
            (setpriv.display().to_string(), args)
        }
        None => (command[0].clone(), command[1..].to_vec()),
    };
    let mut vars = vec![
        ("RPC_LB_BACK_ADDRESS".to_owned(), env.back_address.clone()),
        ("RPC_WORKER_ID".to_owned(), env.slot.to_string()),
        (
            "RPC_WORKER_GENERATION".to_owned(),
            env.generation.to_string(),
        ),
    ];
    if !python_unbuffered_set {
        vars.push(("PYTHONUNBUFFERED".to_owned(), "1".to_owned()));
    }
    Launch {
        program,
        args,
        env: vars,
    }
}

/// A started worker.
#[derive(Debug)]
pub struct Spawned {
    /// The process (wait on it; it is not killed when dropped).
    pub child: tokio::process::Child,
    /// Its pid, which is also its process group.
    pub pid: u32,
    /// Its output, as the reader tasks see it.
    pub output: Arc<Output>,
    /// Ends once its stderr is closed (so the last lines are in [`Output::tail`]).
    pub stderr_done: JoinHandle<()>,
}

/// Starts `launch` as the worker of `slot`: no stdin, its own process group, stdout and
/// stderr read line by line into the log (module docs).
///
/// # Errors
/// The program could not be started (not found, not executable, ...).
pub fn spawn(launch: &Launch, slot: usize) -> std::io::Result<Spawned> {
    let mut command = tokio::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    for name in ENV_REMOVED {
        command.env_remove(name);
    }
    let mut child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("the worker ended before its pid was known"))?;
    let output = Arc::new(Output::default());
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward(stdout, Stream::Stdout, pid, slot, output.clone()));
    }
    let stderr_done = match child.stderr.take() {
        Some(stderr) => tokio::spawn(forward(stderr, Stream::Stderr, pid, slot, output.clone())),
        None => tokio::spawn(async {}),
    };
    Ok(Spawned {
        child,
        pid,
        output,
        stderr_done,
    })
}

/// Sends `signal` to process `pid`; false when it is gone (or `pid` is no process id: never
/// 0, which would signal the LB's own group).
pub fn signal(pid: u32, signal: Signal) -> bool {
    match process_id(pid) {
        Some(pid) => nix::sys::signal::kill(pid, signal).is_ok(),
        None => false,
    }
}

/// Sends `signal` to the process group of worker `pid` (the worker and whatever it
/// started); false when it is gone.
pub fn signal_group(pid: u32, signal: Signal) -> bool {
    match process_id(pid) {
        Some(pid) => nix::sys::signal::killpg(pid, signal).is_ok(),
        None => false,
    }
}

/// `pid` as a process id, if it can be one.
fn process_id(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .map(Pid::from_raw)
}

/// Which of a worker's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn label(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

// === impl Output ===

/// A worker's output as the LB keeps it: its last [`STDERR_TAIL`] stderr lines, and who
/// follows its stderr (a hung worker's stack dump, [`crate::supervisor::Supervisor::kill_hung`]).
#[derive(Debug, Default)]
pub struct Output {
    tail: Mutex<VecDeque<String>>,
    watchers: Mutex<Vec<mpsc::UnboundedSender<String>>>,
}

impl Output {
    /// Its last stderr lines, oldest first.
    pub fn tail(&self) -> Vec<String> {
        lock(&self.tail).iter().cloned().collect()
    }

    /// Every stderr line from now on (until the watcher is dropped or stderr closes).
    pub fn watch(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.watchers).push(tx);
        rx
    }

    fn stderr_line(&self, line: &str) {
        {
            let mut tail = lock(&self.tail);
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        }
        lock(&self.watchers).retain(|w| w.send(line.to_owned()).is_ok());
    }
}

/// Locks `m`, poisoned or not (each update is one step).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Logs each line of `pipe`, tagged with the worker's pid and slot, until it closes.
async fn forward(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    pid: u32,
    slot: usize,
    output: Arc<Output>,
) {
    let mut reader = BufReader::with_capacity(MAX_LINE, pipe);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // A line longer than MAX_LINE comes in pieces: fill_buf never returns more.
        let read = read_line(&mut reader, &mut buf).await;
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        let line = String::from_utf8_lossy(&buf);
        tracing::info!(pid, slot, "worker {}: {line}", stream.label());
        if stream == Stream::Stderr {
            output.stderr_line(&line);
        }
    }
}

/// Reads up to and including the next `\n`, at most [`MAX_LINE`] bytes; 0 at the end.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(buf.len());
        }
        let room = MAX_LINE - buf.len();
        let (take, done) = match available.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => {
                let take = available.len().min(room);
                (take, take == room)
            }
        };
        buf.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(buf.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn words(text: &str) -> Vec<String> {
        text.split(' ').map(String::from).collect()
    }

    fn env() -> WorkerEnv {
        WorkerEnv {
            back_address: "/run/rpc_proxy/echo_back.sock".into(),
            slot: 2,
            generation: 5,
        }
    }

    #[test]
    fn setpriv_goes_in_front_and_the_environment_names_slot_generation_and_socket() {
        let setpriv = PathBuf::from(SETPRIV);
        let got = launch(
            &words("/usr/bin/python3 -m app.worker --name x"),
            Some(&setpriv),
            &env(),
            false,
        );
        assert_eq!(got.program, "/usr/bin/setpriv");
        assert_eq!(
            got.args,
            words("--pdeathsig KILL -- /usr/bin/python3 -m app.worker --name x")
        );
        let vars: Vec<(&str, &str)> = got
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            vars,
            [
                ("RPC_LB_BACK_ADDRESS", "/run/rpc_proxy/echo_back.sock"),
                ("RPC_WORKER_ID", "2"),
                ("RPC_WORKER_GENERATION", "5"),
                ("PYTHONUNBUFFERED", "1"),
            ]
        );
    }

    #[test]
    fn without_setpriv_the_command_runs_as_is() {
        let tcp = WorkerEnv {
            back_address: "127.0.0.1:5556".into(),
            slot: 0,
            generation: 0,
        };
        let got = launch(&words("./worker 'a b'"), None, &tcp, true);
        assert_eq!(got.program, "./worker");
        assert_eq!(
            got.args,
            ["'a", "b'"],
            "words are taken as given, not re-split"
        );
        assert_eq!(got.env[0].1, "127.0.0.1:5556");
        assert!(
            !got.env.iter().any(|(k, _)| k == "PYTHONUNBUFFERED"),
            "the LB's own setting is inherited"
        );
    }

    #[test]
    fn no_process_id_is_never_signalled() {
        assert_eq!(process_id(0), None);
        assert_eq!(process_id(u32::MAX), None);
        assert_eq!(process_id(42), Some(Pid::from_raw(42)));
        assert!(!signal(0, Signal::SIGTERM));
        assert!(!signal_group(0, Signal::SIGKILL));
    }

    #[tokio::test]
    async fn output_lines_are_kept_and_followed_and_long_lines_cut() {
        let long = "x".repeat(MAX_LINE + 10);
        let text = format!("one\r\ntwo\n{long}\nlast");
        let output = Arc::new(Output::default());
        let mut watcher = output.watch();
        forward(text.as_bytes(), Stream::Stderr, 7, 0, output.clone()).await;
        let tail = output.tail();
        assert_eq!(
            tail.len(),
            5,
            "{:?}",
            tail.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!((tail[0].as_str(), tail[1].as_str()), ("one", "two"));
        assert_eq!(tail[2].len(), MAX_LINE);
        assert_eq!(tail[3], "x".repeat(10));
        assert_eq!(tail[4], "last");
        assert_eq!(watcher.recv().await.as_deref(), Some("one"));

        let many: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let output = Arc::new(Output::default());
        forward(many.as_bytes(), Stream::Stderr, 7, 0, output.clone()).await;
        let tail = output.tail();
        assert_eq!(tail.len(), STDERR_TAIL);
        assert_eq!(tail[0], "line 10");
        // Stdout is logged, not kept.
        let output = Arc::new(Output::default());
        forward(&b"out\n"[..], Stream::Stdout, 7, 0, output.clone()).await;
        assert!(output.tail().is_empty());
    }
}
