//! The start of both binaries' `main`: the flags they share, parsing them with the CONTRACT's
//! exit codes, reading the configuration, logging set up from flags and configuration, and
//! [`serve`], which runs the service on its runtime with the shutdown token. Every failure is
//! one line on stderr and an exit code.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use rpc_config::{CommonConfig, ConfigError, ConfigWarning, LogFormat};
use tokio_util::sync::CancellationToken;

use crate::{
    LogGuard, LogOptions, build_runtime, exit, init_logging, normalize_args, shutdown_on_signals,
};

/// The flags of `rpc_proxy` and `rpc_lb` alike (CONTRACT section 5); each binary flattens it
/// into its own `clap` parser.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (config.ini).
    #[arg(short = 'c', long = "config", value_name = "CONFIG")]
    pub config: PathBuf,
    /// Log to this file, rotated daily, instead of stderr.
    #[arg(short = 'L', long = "log-file", value_name = "LOGFILE")]
    pub log_file: Option<PathBuf>,
    /// error, warn, info or debug (default info, or debug with verbose=1).
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Accepted for compatibility with the Go original; ignored.
    #[arg(long = "profile-address", value_name = "ADDR", hide = true)]
    pub profile_address: Option<String>,
    /// Print the version and exit.
    #[arg(short = 'V', long = "version", action = clap::ArgAction::Version)]
    pub version: Option<bool>,
}

/// Parses `args` (the Go original's spellings accepted, see [`normalize_args`]).
///
/// # Errors
/// The exit code to leave with, after clap printed why: 0 for `--help` and `--version`, 64
/// for bad usage.
pub fn parse_args<T: clap::Parser>(
    args: impl IntoIterator<Item = OsString>,
) -> Result<T, ExitCode> {
    T::try_parse_from(normalize_args(args)).map_err(|e| {
        let _ = e.print();
        match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                ExitCode::SUCCESS
            }
            _ => ExitCode::from(exit::USAGE),
        }
    })
}

/// Reads the configuration with `read` (e.g. `ProxyConfig::from_file`).
///
/// # Errors
/// Exit code 78 after one line `<binary>: <error>` on stderr.
pub fn load_config<C>(
    binary: &str,
    path: &Path,
    read: impl FnOnce(&Path) -> Result<(C, Vec<ConfigWarning>), ConfigError>,
) -> Result<(C, Vec<ConfigWarning>), ExitCode> {
    read(path).map_err(|e| {
        eprintln!("{binary}: {e}");
        ExitCode::from(exit::CONFIG)
    })
}

/// Sets up logging from the flags and the configuration, then logs the configuration's
/// warnings. Keep the guard until the process ends.
///
/// # Errors
/// Exit code 64 after one line on stderr (e.g. a bad `--log-level` or an unwritable `-L`).
pub fn start_logging(
    binary: &str,
    args: &CommonArgs,
    common: &CommonConfig,
    warnings: &[ConfigWarning],
) -> Result<LogGuard, ExitCode> {
    let level = args
        .log_level
        .clone()
        .or_else(|| common.verbose.then(|| "debug".to_owned()));
    let guard = init_logging(&LogOptions {
        level,
        file: args.log_file.clone(),
        keep_days: common.log_keep_days,
        json: common.log_format == LogFormat::Json,
        level_from_flag: args.log_level.is_some(),
    })
    .map_err(|e| {
        eprintln!("{binary}: {e}");
        ExitCode::from(exit::USAGE)
    })?;
    for warning in warnings {
        tracing::warn!(key = warning.key, "{}", warning.message);
    }
    Ok(guard)
}

/// Runs `body` on a runtime of `worker_threads` (see [`build_runtime`]), handing it the root
/// shutdown token that SIGTERM and SIGINT cancel ([`shutdown_on_signals`]). `body` binds the
/// sockets and serves until it has drained.
///
/// # Errors
/// Returns exit code 1 after one line `<binary>: <error>` on stderr when the runtime or the
/// signal handlers cannot be set up, or `body` fails (a socket that cannot be bound); `0`
/// when `body` returns `Ok`. With `-L` the log file gets the error as well; without it the
/// log is stderr, so the error is not logged a second time.
pub fn serve<F, Fut>(binary: &str, worker_threads: usize, body: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = match build_runtime(worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{binary}: cannot start runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let served = runtime.block_on(async move {
        let shutdown = shutdown_on_signals().context("cannot install signal handlers")?;
        body(shutdown).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_failure(binary, &format!("{e:#}"));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Prints a start-up failure once per destination: always one line on stderr (what a
/// terminal, the control scripts and journald show), and in the log only when the log is a
/// file (`-L`), so the file tells why the process stopped. Without `-L` the log *is* stderr,
/// and logging it too would print the failure twice.
fn report_failure(binary: &str, message: &str) {
    eprintln!("{binary}: {message}");
    if crate::logs_to_file() {
        tracing::error!("{message}");
    }
}
