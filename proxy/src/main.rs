//! `rpc_proxy` command line: parse flags, read the configuration, set up logging, bind the
//! client socket, run until SIGTERM/SIGINT, drain, exit. See `lib.rs` for the shutdown order.

use std::process::ExitCode;

use clap::Parser;
use rpc_config::ProxyConfig;
use rpc_runtime::exit;
use rpc_runtime::startup::{self, CommonArgs};

/// Per-host Thrift sidecar: routes `service:method` calls to endpoints found in ZooKeeper.
#[derive(Debug, Parser)]
#[command(name = "rpc_proxy", version, disable_version_flag = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli: Cli = match startup::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (config, warnings) =
        match startup::load_config("rpc_proxy", &cli.common.config, ProxyConfig::from_file) {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
    let _log = match startup::start_logging("rpc_proxy", &cli.common, &config.common, &warnings) {
        Ok(guard) => guard,
        Err(code) => return code,
    };
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
