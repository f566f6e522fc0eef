//! SIGHUP (CONTRACT section 9, "Zero downtime and reload"): the proxy reads its configuration
//! file again (the path it started with) and validates it. A file refused is logged and
//! counted (`rpc_proxy_config_reloads_total{result="error"}`) and changes nothing: the proxy
//! keeps running with the configuration it had. A good one has its live keys
//! ([`LIVE_KEYS`]) applied and counted (`result="ok"`); every connection stays open. New calls
//! see the new timeouts, limits and outlier and retry keys at once (the router's upstream
//! settings and each service's resilience state read them per call); new client and upstream
//! connections take the new per-connection settings. Every other key that changed is named in
//! a warning: it needs a restart, and its old value stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rpc_config::ProxyConfig;
use rpc_runtime::ReloadRequests;

use crate::connection::ConnectionSettings;
use crate::route::Router;

/// What the proxy needs to reload: where its configuration came from, and the SIGHUPs.
#[derive(Debug)]
pub struct Reload {
    /// The configuration file given with `-c`.
    pub path: PathBuf,
    /// SIGHUP, caught.
    pub requests: ReloadRequests,
}

/// The keys a reload applies; the others need a restart.
pub const LIVE_KEYS: [&str; 18] = [
    "request_timeout_ms",
    "connect_timeout_ms",
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
    "upstream_idle_timeout_ms",
    "max_pending_per_endpoint",
    "max_inflight_per_connection",
    "client_idle_timeout_ms",
    "startup_hold_ms",
    "write_timeout_ms",
    "max_frame_size",
    "max_connection_buffer_bytes",
    "outlier_consecutive_failures",
    "outlier_base_ejection_ms",
    "outlier_max_ejection_percent",
    "retry_budget_percent",
    "retry_min_per_sec",
    "verbose",
];

/// Applies each SIGHUP's reload, forever (the caller aborts the task at the end of the stop).
/// `config` is the configuration in force; `connections` the settings new client connections
/// take.
pub async fn run(
    mut reload: Reload,
    config: ProxyConfig,
    router: Arc<Router>,
    connections: Arc<ArcSwap<ConnectionSettings>>,
) {
    let mut running = config;
    while reload.requests.recv().await.is_some() {
        if let Some(next) = reload_once(&reload.path, &running, &router, &connections) {
            running = next;
        }
    }
}

/// One reload: returns the configuration in force afterwards, or `None` when the file was
/// refused (nothing changed).
pub fn reload_once(
    path: &Path,
    running: &ProxyConfig,
    router: &Router,
    connections: &ArcSwap<ConnectionSettings>,
) -> Option<ProxyConfig> {
    let metrics = router.metrics();
    let (file, warnings) = match ProxyConfig::from_file(path) {
        Ok(read) => read,
        Err(e) => {
            metrics.config_reload(false);
            tracing::error!(
                path = %path.display(),
                error = %e,
                "configuration reload refused: the running configuration is kept"
            );
            return None;
        }
    };
    for warning in &warnings {
        tracing::warn!(key = warning.key, "{}", warning.message);
    }
    let next = merge(running, file);
    let (applied, need_restart): (Vec<_>, Vec<_>) = running
        .changed_keys(&next.file)
        .into_iter()
        .partition(|key| LIVE_KEYS.contains(key));
    apply(&next.config, router, connections);
    metrics.config_reload(true);
    if !need_restart.is_empty() {
        tracing::warn!(
            keys = need_restart.join(","),
            "configuration reload: these keys changed but apply only when rpc_proxy restarts; their old values stay in use"
        );
    }
    tracing::info!(
        path = %path.display(),
        applied = applied.join(","),
        "configuration reloaded"
    );
    Some(next.config)
}

/// A file read on reload, and what will be in force: the file's live keys, the running
/// configuration's others.
struct Merged {
    file: ProxyConfig,
    config: ProxyConfig,
}

fn merge(running: &ProxyConfig, file: ProxyConfig) -> Merged {
    let mut config = file.clone();
    // Keys that need a restart keep their running values.
    let (old, new) = (&running.common, &mut config.common);
    new.zk.clone_from(&old.zk);
    new.product.clone_from(&old.product);
    new.zk_session_timeout = old.zk_session_timeout;
    new.log_keep_days = old.log_keep_days;
    new.log_format = old.log_format;
    new.status_interval = old.status_interval;
    new.zk_auth.clone_from(&old.zk_auth);
    new.socket_mode = old.socket_mode;
    new.worker_threads = old.worker_threads;
    new.max_process_buffer_bytes = old.max_process_buffer_bytes;
    config.proxy_address = running.proxy_address.clone();
    config.admin_address.clone_from(&running.admin_address);
    config.drain_grace = running.drain_grace;
    config.max_connections = running.max_connections;
    config.upstream_connections = running.upstream_connections;
    Merged { file, config }
}

/// Puts `config`'s live keys in force.
fn apply(config: &ProxyConfig, router: &Router, connections: &ArcSwap<ConnectionSettings>) {
    let upstream = router.settings();
    let mut settings = crate::upstream_settings(config);
    // The drain's end is the same event for old and new settings.
    settings.abort = upstream.load().abort.clone();
    upstream.store(Arc::new(settings));
    let budget = connections.load().process_budget.clone();
    connections.store(Arc::new(crate::connection_settings(config, budget)));
    rpc_runtime::set_verbose(config.common.verbose);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::upstream::UpstreamSettings;

    const BASE: &str = "zk=127.0.0.1:2181\nproxy_address=/tmp/p.sock\n";

    fn config(extra: &str) -> ProxyConfig {
        ProxyConfig::parse(&format!("{BASE}{extra}")).unwrap().0
    }

    fn connections(config: &ProxyConfig) -> ArcSwap<ConnectionSettings> {
        ArcSwap::from_pointee(crate::connection_settings(
            config,
            rpc_mux::ProcessBudget::new(1 << 20),
        ))
    }

    #[test]
    fn live_keys_apply_others_keep_their_running_values() {
        let running = config("request_timeout_ms=15000\nmax_connections=10\n");
        let router = Router::new(Arc::new(crate::upstream_settings(&running)));
        let abort = router.settings().load().abort.clone();
        let conns = connections(&running);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ini");
        std::fs::write(
            &path,
            format!(
                "{BASE}request_timeout_ms=800\nmax_connections=99\nretry_budget_percent=50\n\
                 max_inflight_per_connection=7\nzk=other:2181\n"
            ),
        )
        .unwrap();
        let next = reload_once(&path, &running, &router, &conns).expect("applied");
        let upstream = router.settings().load();
        assert_eq!(upstream.request_timeout, Duration::from_millis(800));
        assert_eq!(upstream.resilience.retry_budget_percent, 50);
        assert!(
            Arc::ptr_eq(&upstream.abort, &abort),
            "one abort for the drain"
        );
        assert_eq!(conns.load().max_inflight, 7);
        assert_eq!(next.max_connections, 10, "needs a restart");
        assert_eq!(next.common.zk, "127.0.0.1:2181", "needs a restart");
        assert_eq!(next.request_timeout, Duration::from_millis(800));
        let text = String::from_utf8(router.metrics().render(&Default::default())).unwrap();
        assert!(
            text.contains(r#"rpc_proxy_config_reloads_total{result="ok"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_bad_file_changes_nothing_and_is_counted() {
        let running = config("");
        let router = Router::new(Arc::new(UpstreamSettings::default()));
        let conns = connections(&running);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ini");
        std::fs::write(&path, format!("{BASE}request_timeout_ms=soon\n")).unwrap();
        assert!(reload_once(&path, &running, &router, &conns).is_none());
        assert!(reload_once(&dir.path().join("missing.ini"), &running, &router, &conns).is_none());
        assert_eq!(
            router.settings().load().request_timeout,
            Duration::from_secs(15)
        );
        let text = String::from_utf8(router.metrics().render(&Default::default())).unwrap();
        assert!(
            text.contains(r#"rpc_proxy_config_reloads_total{result="error"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn every_key_is_live_or_named() {
        for key in LIVE_KEYS {
            assert!(rpc_config::KNOWN_KEYS.contains(&key), "{key}");
        }
    }
}
