//! `rpc_proxy` command line: parse flags, read the configuration, set up logging, bind the
//! client socket, run until SIGTERM/SIGINT, drain, exit. See `lib.rs` for the shutdown order.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rpc_config::ProxyConfig;
use rpc_runtime::exit;

/// Per-host Thrift sidecar: routes `service:method` calls to endpoints found in ZooKeeper.
#[derive(Debug, Parser)]
#[command(name = "rpc_proxy", version, disable_version_flag = true)]
struct Cli {
    /// Configuration file (config.ini).
    #[arg(short = 'c', long = "config", value_name = "CONFIG")]
    config: PathBuf,
    /// Log to this file, rotated daily, instead of stderr.
    #[arg(short = 'L', long = "log-file", value_name = "LOGFILE")]
    log_file: Option<PathBuf>,
    /// error, warn, info or debug (default info, or debug with verbose=1).
    #[arg(long = "log-level", value_name = "LEVEL")]
    log_level: Option<String>,
    /// Accepted for compatibility with the Go original; ignored.
    #[arg(long = "profile-address", value_name = "ADDR", hide = true)]
    profile_address: Option<String>,
    /// Print the version and exit.
    #[arg(short = 'V', long = "version", action = clap::ArgAction::Version)]
    version: Option<bool>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(rpc_runtime::normalize_args(std::env::args_os())) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(exit::USAGE),
            };
        }
    };
    let (config, warnings) = match ProxyConfig::from_file(&cli.config) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("rpc_proxy: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let level = cli
        .log_level
        .clone()
        .or_else(|| config.common.verbose.then(|| "debug".to_owned()));
    let _log = match rpc_runtime::init_logging(&rpc_runtime::LogOptions {
        level,
        file: cli.log_file.clone(),
        keep_days: config.common.log_keep_days,
        json: config.common.log_format == rpc_config::LogFormat::Json,
    }) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("rpc_proxy: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    for warning in &warnings {
        tracing::warn!(key = warning.key, "{}", warning.message);
    }
    let runtime = match rpc_runtime::build_runtime(config.common.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rpc_proxy: cannot start runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    runtime.block_on(async move {
        let shutdown = match rpc_runtime::shutdown_on_signals() {
            Ok(token) => token,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return ExitCode::from(exit::FAILURE);
            }
        };
        let listener = match rpc_proxy::listener::Listener::bind(
            &config.proxy_address,
            config.common.socket_mode,
        )
        .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen");
                eprintln!("rpc_proxy: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        let admin = match config.common.admin_address.as_deref() {
            Some(address) => match rpc_admin::AdminListener::bind(address).await {
                Ok(admin) => Some(admin),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen");
                    eprintln!("rpc_proxy: {e}");
                    return ExitCode::from(exit::FAILURE);
                }
            },
            None => None,
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            product = config.common.product,
            zk = config.common.zk,
            "rpc_proxy starting"
        );
        rpc_proxy::run(config, listener, admin, shutdown).await;
        tracing::info!("rpc_proxy stopped");
        ExitCode::SUCCESS
    })
}
