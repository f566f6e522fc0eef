//! `rpc_lb` command line: parse flags, read the configuration, set up logging, catch SIGHUP
//! (a reload), bind the front and back sockets, run until SIGTERM/SIGINT, drain, exit. See
//! `lib.rs` for the shutdown order.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rpc_admin::AdminListener;
use rpc_config::LbConfig;
use rpc_registry::EndpointInfo;
use rpc_runtime::exit;
use rpc_runtime::listener::Listener;
use rpc_runtime::startup::{self, CommonArgs};

/// Per-service-instance load balancer: proxies call in, Python workers dial in.
#[derive(Debug, Parser)]
#[command(name = "rpc_lb", version, disable_version_flag = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Deploy directory written into the ZooKeeper node (default: the current directory).
    #[arg(long = "work-dir", value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Code version written into the ZooKeeper node.
    #[arg(long = "code-url-version", value_name = "VERSION", default_value = "")]
    code_url_version: String,
}

fn main() -> ExitCode {
    let cli: Cli = match startup::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (config, warnings) =
        match startup::load_config("rpc_lb", &cli.common.config, LbConfig::from_file) {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
    let front = match rpc_lb::address::front(&config) {
        Ok(front) => front,
        Err(e) => {
            eprintln!("rpc_lb: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let _log = match startup::start_logging("rpc_lb", &cli.common, &config.common, &warnings) {
        Ok(guard) => guard,
        Err(code) => return code,
    };
    let info = EndpointInfo {
        service: config.service.clone(),
        service_id: rpc_registry::service_id(&front.frontend),
        frontend: front.frontend.clone(),
        deploy_path: rpc_lb::address::deploy_path(cli.work_dir.clone()),
        code_url_version: cli.code_url_version.clone(),
        hostname: rpc_lb::address::hostname(),
        start_time: rpc_registry::now_start_time(),
        marks: rpc_lb::registration::MARKS,
    };
    let config_path = cli.common.config.clone();
    startup::serve(
        "rpc_lb",
        config.common.worker_threads,
        |shutdown| async move {
            // First: from here on SIGHUP reloads instead of ending the process.
            let reloads = rpc_runtime::reload_requests().context("cannot catch SIGHUP")?;
            let mode = config.common.socket_mode;
            let front = Listener::bind(&front.listen, mode).await.context("front")?;
            let back = Listener::bind(&config.back_address, mode)
                .await
                .context("back")?;
            let admin = match config.admin_address.as_deref() {
                Some(address) => Some(AdminListener::bind(address).await?),
                None => None,
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                service = config.service,
                product = config.common.product,
                "rpc_lb starting"
            );
            let run = rpc_lb::LbRun {
                config,
                front,
                back,
                info,
                admin,
                config_path: Some(config_path),
                reloads: Some(reloads),
            };
            rpc_lb::run(run, shutdown).await;
            Ok(())
        },
    )
}
