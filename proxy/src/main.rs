//! `rpc_proxy` command line: parse flags, read the configuration, set up logging, catch SIGHUP
//! (a reload), bind the client socket, run until SIGTERM/SIGINT, drain, exit. See `lib.rs` for
//! the shutdown order.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rpc_admin::AdminListener;
use rpc_config::ProxyConfig;
use rpc_proxy::listener::Listener;
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
    let config_path = cli.common.config.clone();
    startup::serve(
        "rpc_proxy",
        config.common.worker_threads,
        |shutdown| async move {
            // First: from here on SIGHUP reloads instead of ending the process.
            let requests = rpc_runtime::reload_requests().context("cannot catch SIGHUP")?;
            let reload = rpc_proxy::reload::Reload {
                path: config_path,
                requests,
            };
            let listener = Listener::bind(&config.proxy_address, config.common.socket_mode).await?;
            let admin = match config.admin_address.as_deref() {
                Some(address) => Some(AdminListener::bind(address).await?),
                None => None,
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                product = config.common.product,
                zk = config.common.zk,
                "rpc_proxy starting"
            );
            rpc_proxy::run(config, listener, admin, Some(reload), shutdown).await;
            tracing::info!("rpc_proxy stopped");
            Ok(())
        },
    )
}
