//! Process plumbing shared by `rpc_proxy` and `rpc_lb`: signals to one cancellation token,
//! logging set-up, exit codes, systemd notifications and the Go original's flag spellings.
//! Runs at start-up and shutdown only, never on the data path.
//!
//! # Layout
//! - [`exit`]: the exit codes of CONTRACT section 5.
//! - [`build_runtime`]: the tokio runtime for `worker_threads`.
//! - [`shutdown_on_signals`]: SIGTERM/SIGINT cancel the root [`CancellationToken`].
//! - [`reload_requests`]: SIGHUP as reload requests (`rpc_lb` only; the proxy keeps SIGHUP's
//!   default action until it reloads too).
//! - [`init_logging`]: `tracing` to stderr or a daily-rotated file, text or JSON.
//! - [`notify_ready`], [`notify_stopping`]: systemd `Type=notify`.
//! - [`listener`]: listening sockets (unix or TCP; bound, taken over from a running process or
//!   inherited by socket activation) and connecting.
//! - [`startup`]: the shared flags, config loading and logging set-up of both `main`s.
//! - [`normalize_args`]: accept `-log_level`, `-work_dir`, ... as the Go original spelled them.

pub mod listener;
pub mod startup;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::OnceLock;
use tokio_util::sync::CancellationToken;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Exit codes (CONTRACT section 5; `sysexits.h` numbering).
pub mod exit {
    /// A clean stop, or `--help`/`--version`.
    pub const OK: u8 = 0;
    /// A runtime failure.
    pub const FAILURE: u8 = 1;
    /// Bad usage: an unknown flag, no `-c`.
    pub const USAGE: u8 = 64;
    /// Bad configuration: unreadable file, missing or bad key.
    pub const CONFIG: u8 = 78;
}

/// The tokio runtime for the `worker_threads` key: `1` (the default) a current-thread
/// runtime, `0` one worker thread per CPU, `n` that many worker threads.
///
/// One thread keeps a call's hops (client read, upstream write, reply) on one core: no
/// cross-thread wakeup per call. Measured on 2 cores, that is about 30 % less CPU per call in
/// the proxy and the LB than two threads, at the same calls per second.
///
/// # Errors
/// The runtime could not be built (threads or the I/O driver could not be created).
pub fn build_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build()
}

/// Returns a token cancelled on the first SIGTERM or SIGINT. After that, a SIGINT exits the
/// process at once with code 1 (an operator pressing Ctrl-C twice); further SIGTERMs are
/// logged and ignored, so a supervisor that repeats SIGTERM never cuts a drain short.
///
/// Must be called inside a tokio runtime.
///
/// # Errors
/// The signal handlers could not be installed.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "graceful stop requested");
        cancel.cancel();
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM again: already stopping"),
                _ = int.recv() => {
                    tracing::warn!("second SIGINT: exiting at once");
                    std::process::exit(i32::from(exit::FAILURE));
                }
            }
        }
    });
    Ok(token)
}

/// SIGHUP, caught: each one is a request to re-read the configuration. Once this is called
/// SIGHUP no longer ends the process (its default action), for the rest of its life; a binary
/// that does not call it keeps the default.
#[derive(Debug)]
pub struct ReloadRequests {
    hangup: tokio::signal::unix::Signal,
}

impl ReloadRequests {
    /// Waits for the next SIGHUP (several sent close together may count as one); `None`
    /// once no more can come.
    pub async fn recv(&mut self) -> Option<()> {
        self.hangup.recv().await?;
        tracing::info!(signal = "SIGHUP", "configuration reload requested");
        Some(())
    }
}

/// Catches SIGHUP from now on (see [`ReloadRequests`]). Call it as early as possible: until
/// then a SIGHUP still ends the process.
///
/// Must be called inside a tokio runtime.
///
/// # Errors
/// The signal handler could not be installed.
pub fn reload_requests() -> std::io::Result<ReloadRequests> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(ReloadRequests {
        hangup: signal(SignalKind::hangup())?,
    })
}

/// How to log.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// `error|warn|info|debug|trace`, or a full `EnvFilter` directive. `None`: `info`.
    pub level: Option<String>,
    /// `-L <file>`: write there, rotated daily (`<file>.YYYY-MM-DD`), instead of stderr.
    pub file: Option<PathBuf>,
    /// Rotated files kept.
    pub keep_days: usize,
    /// One JSON object per line.
    pub json: bool,
    /// The level came from the command line (`--log-level`): the configuration's `verbose`
    /// no longer changes it on reload ([`set_verbose`]).
    pub level_from_flag: bool,
}

/// The installed filter, replaceable ([`set_verbose`]).
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Whether `--log-level` set the level (then `verbose` is ignored on reload).
static LEVEL_FROM_FLAG: AtomicBool = AtomicBool::new(false);

/// Applies the configuration's `verbose` on reload: `debug` when set, else `info`; no-op when
/// `--log-level` chose the level or no subscriber was installed by [`init_logging`].
pub fn set_verbose(verbose: bool) {
    if LEVEL_FROM_FLAG.load(Ordering::Relaxed) {
        return;
    }
    if let Some(handle) = FILTER.get() {
        let level = if verbose { "debug" } else { "info" };
        if handle.reload(EnvFilter::new(level)).is_ok() {
            tracing::info!(level, "log level set from the configuration");
        }
    }
}

/// Whether the global subscriber writes to a log file (`-L`) rather than stderr. Set by
/// [`init_logging`]; global like the subscriber it describes.
static LOGS_TO_FILE: AtomicBool = AtomicBool::new(false);

/// Whether [`init_logging`] installed a subscriber that writes to a file, so a message meant
/// for both stderr and the log must be written to each (to stderr alone it would be printed
/// twice).
pub(crate) fn logs_to_file() -> bool {
    LOGS_TO_FILE.load(Ordering::Relaxed)
}

/// Keeps the non-blocking log writer flushing; drop it last.
pub struct LogGuard {
    _guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global `tracing` subscriber.
///
/// # Errors
/// The level is not a valid filter, or the log file's directory cannot be used.
pub fn init_logging(options: &LogOptions) -> Result<LogGuard, String> {
    let level = options.level.clone().unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&level).map_err(|e| format!("bad log level {level:?}: {e}"))?;
    let (writer, guard) = match &options.file {
        None => (BoxMakeWriter::new(std::io::stderr), None),
        Some(path) => {
            let appender = rolling_file(path, options.keep_days)?;
            let (nb, guard) = tracing_appender::non_blocking(appender);
            (BoxMakeWriter::new(nb), Some(guard))
        }
    };
    let ansi = options.file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let format = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    let format = if options.json {
        format.json().boxed()
    } else {
        format.boxed()
    };
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .try_init()
        .map_err(|e| format!("cannot install logger: {e}"))?;
    let _ = FILTER.set(handle);
    LEVEL_FROM_FLAG.store(options.level_from_flag, Ordering::Relaxed);
    LOGS_TO_FILE.store(options.file.is_some(), Ordering::Relaxed);
    Ok(LogGuard { _guard: guard })
}

fn rolling_file(
    path: &Path,
    keep_days: usize,
) -> Result<tracing_appender::rolling::RollingFileAppender, String> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = path
        .file_name()
        .ok_or_else(|| format!("log file {} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&dir).map_err(|e| format!("log directory {}: {e}", dir.display()))?;
    tracing_appender::rolling::RollingFileAppender::builder()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix(prefix)
        .max_log_files(keep_days.max(1))
        .build(&dir)
        .map_err(|e| format!("log file {}: {e}", path.display()))
}

/// Tells systemd the service is ready (no-op outside systemd).
pub fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Tells systemd the service is stopping (no-op outside systemd).
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Rewrites the Go original's single-dash long flags into this project's spellings, so
/// existing units and scripts run unchanged: `-log_level x` / `-log_level=x` become
/// `--log-level x`, likewise `-work_dir`, `-code_url_version`, `-profile_address`,
/// `-log_keep_days`, and `--work_dir=` style underscores. Other arguments pass through.
pub fn normalize_args<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    const LEGACY: [&str; 5] = [
        "log_level",
        "work_dir",
        "code_url_version",
        "profile_address",
        "log_keep_days",
    ];
    args.into_iter()
        .map(|arg| {
            let Some(text) = arg.to_str() else { return arg };
            let body = text.strip_prefix("--").or_else(|| text.strip_prefix('-'));
            let Some(body) = body else { return arg };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            if LEGACY.contains(&name) {
                let flag = format!("--{}", name.replace('_', "-"));
                match value {
                    Some(v) => OsString::from(format!("{flag}={v}")),
                    None => OsString::from(flag),
                }
            } else {
                arg
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn legacy_flags_are_rewritten() {
        assert_eq!(
            norm(&[
                "rpc_lb",
                "-c",
                "x.ini",
                "-log_level",
                "debug",
                "-work_dir=/a",
                "--code_url_version=v1"
            ]),
            [
                "rpc_lb",
                "-c",
                "x.ini",
                "--log-level",
                "debug",
                "--work-dir=/a",
                "--code-url-version=v1"
            ]
        );
    }

    #[test]
    fn other_flags_pass_through() {
        assert_eq!(
            norm(&["p", "-V", "--log-level", "info", "-L", "f"]),
            ["p", "-V", "--log-level", "info", "-L", "f"]
        );
    }
}
