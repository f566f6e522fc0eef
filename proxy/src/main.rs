//! `rpc_proxy` command line: take the socket of socket activation (if any), parse flags, read
//! the configuration, set up logging, catch SIGHUP (a reload), get the client socket (inherited,
//! taken over with `--takeover`, or bound), run until SIGTERM/SIGINT, drain, exit. See `lib.rs`
//! for the shutdown order.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rpc_admin::AdminListener;
use rpc_config::{Address, ProxyConfig};
use rpc_proxy::AdminEndpoint;
use rpc_proxy::listener::{Inherited, Listener};
use rpc_runtime::exit;
use rpc_runtime::startup::{self, CommonArgs};

/// Per-host Thrift sidecar: routes `service:method` calls to endpoints found in ZooKeeper.
#[derive(Debug, Parser)]
#[command(name = "rpc_proxy", version, disable_version_flag = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    // A handover restart (CONTRACT section 9; `control_proxy.sh restart` runs it): the new
    // socket is bound beside proxy_address and renamed over it (atomic), so new connections
    // reach this process at once; the old process, stopped next, leaves the path alone and
    // serves every connection it accepted or had queued. Ignored under socket activation,
    // whose socket outlives every process anyway.
    /// Take the unix socket proxy_address over from the rpc_proxy serving it (SIGTERM that
    /// one afterwards): a restart that refuses no connection
    #[arg(long = "takeover")]
    takeover: bool,
}

fn main() -> ExitCode {
    // First, while this is the only thread: the socket passed by socket activation, and
    // LISTEN_* unset (CONTRACT section 9). Errors are reported once logging is up.
    let activation = Inherited::from_env();
    let cli: Cli = match startup::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (config, warnings) =
        match startup::load_config("rpc_proxy", &cli.common.config, ProxyConfig::from_file) {
            Ok(loaded) => loaded,
            Err(code) => return code,
        };
    let activated = matches!(&activation, Ok(fds) if fds.socket.is_some());
    if cli.takeover && !activated && matches!(config.proxy_address, Address::Tcp(_)) {
        eprintln!(
            "rpc_proxy: --takeover needs a unix socket proxy_address, not {}",
            config.proxy_address
        );
        return ExitCode::from(exit::USAGE);
    }
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
            let activation = activation.context("socket activation (LISTEN_FDS)")?;
            let takeover = cli.takeover && activation.socket.is_none();
            // Before the client socket: a start that fails here leaves the socket of a
            // running proxy where it is.
            let admin = match config.admin_address.as_deref() {
                Some(address) => match AdminListener::bind(address).await {
                    Ok(admin) => Some(AdminEndpoint::Bound(admin)),
                    Err(e) if takeover && e.kind() == std::io::ErrorKind::AddrInUse => {
                        tracing::info!(
                            address,
                            "admin endpoint in use (by the proxy taken over from?): bound once free"
                        );
                        Some(AdminEndpoint::WhenFree(address.to_owned()))
                    }
                    Err(e) => return Err(e.into()),
                },
                None => None,
            };
            // Last, once nothing else can fail: from here on clients reach this process.
            let listener = match activation.socket {
                Some(socket) => {
                    if !socket.matches(&config.proxy_address) {
                        tracing::warn!(
                            socket = socket.address(),
                            proxy_address = %config.proxy_address,
                            "serving the socket passed by socket activation, not proxy_address"
                        );
                    }
                    if activation.extra > 0 {
                        tracing::warn!(
                            unused = activation.extra,
                            "socket activation passed more than one socket; serving the first"
                        );
                    }
                    if cli.takeover {
                        tracing::info!("--takeover ignored: the socket is socket activation's");
                    }
                    Listener::from_inherited(socket).context("socket activation (LISTEN_FDS)")?
                }
                None if takeover => {
                    Listener::take_over(&config.proxy_address, config.common.socket_mode).await?
                }
                None => Listener::bind(&config.proxy_address, config.common.socket_mode).await?,
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                pid = std::process::id(),
                product = config.common.product,
                zk = config.common.zk,
                socket = if listener.is_inherited() {
                    "inherited"
                } else if takeover {
                    "taken over"
                } else {
                    "bound"
                },
                "rpc_proxy starting"
            );
            rpc_proxy::run(config, listener, admin, Some(reload), shutdown).await;
            tracing::info!("rpc_proxy stopped");
            Ok(())
        },
    )
}
