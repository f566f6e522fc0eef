//! SIGHUP (CONTRACT section 9, "Zero downtime and reload"): the LB reads its configuration
//! file again (the path it started with) and validates it. A file refused is logged and
//! counted (`rpc_lb_config_reloads_total{result="error"}`) and changes nothing. A good one
//! has its supervision keys applied ([`LIVE_KEYS`], handed to the
//! [`crate::supervisor::Supervisor`], which then restarts its workers); every other key
//! that changed is named in a warning: it needs a restart of the LB, and the LB keeps
//! running with its old value.

use std::path::Path;

use rpc_config::{ConfigError, ConfigWarning, LbConfig};

use crate::metrics::LbMetrics;

/// The keys a reload applies (the worker supervision keys).
///
pub const LIVE_KEYS: [&str; 6] = [
    "worker_timeout_ms",
    "worker_command",
    "worker_processes",
    "worker_max_requests",
    "worker_max_requests_jitter",
    "worker_boot_timeout_ms",
];

/// A reload that was accepted.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration the LB runs with now: the old one with [`LIVE_KEYS`] from the file.
    pub config: LbConfig,
    /// Live keys whose value changed.
    pub applied: Vec<&'static str>,
    /// Other keys whose value changed: not applied until a restart.
    pub need_restart: Vec<&'static str>,
}

/// Reads and validates `path` and merges it into `running` (module docs); logs and counts
/// the outcome.
///
/// # Errors
/// The file could not be read or is invalid: `running` stays as it is.
pub fn reload(
    path: &Path,
    running: &LbConfig,
    metrics: &LbMetrics,
) -> Result<Reloaded, ConfigError> {
    let (file, warnings) = match LbConfig::from_file(path) {
        Ok(read) => read,
        Err(e) => {
            metrics.config_reload(false);
            tracing::error!(
                path = %path.display(),
                error = %e,
                "configuration reload refused: the running configuration is kept"
            );
            return Err(e);
        }
    };
    metrics.config_reload(true);
    log_warnings(&warnings);
    let reloaded = merge(running, file);
    if !reloaded.need_restart.is_empty() {
        tracing::warn!(
            keys = reloaded.need_restart.join(","),
            "configuration reload: these keys changed but apply only when rpc_lb restarts; their old values stay in use"
        );
    }
    tracing::info!(
        path = %path.display(),
        applied = reloaded.applied.join(","),
        "configuration reloaded"
    );
    Ok(reloaded)
}

fn log_warnings(warnings: &[ConfigWarning]) {
    for warning in warnings {
        tracing::warn!(key = warning.key, "{}", warning.message);
    }
}

/// `running` with the live keys of `file`, and which keys changed.
pub fn merge(running: &LbConfig, file: LbConfig) -> Reloaded {
    let (old, new) = (&running.supervision, &file.supervision);
    let live = [
        ("worker_timeout_ms", old.timeout != new.timeout),
        ("worker_command", old.command != new.command),
        ("worker_processes", old.processes != new.processes),
        ("worker_max_requests", old.max_requests != new.max_requests),
        (
            "worker_max_requests_jitter",
            old.max_requests_jitter != new.max_requests_jitter,
        ),
        (
            "worker_boot_timeout_ms",
            old.boot_timeout != new.boot_timeout,
        ),
    ];
    let applied = live
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect();
    let need_restart = changed_keys(running, &file);
    let mut config = running.clone();
    config.supervision = file.supervision;
    Reloaded {
        config,
        applied,
        need_restart,
    }
}

/// The keys outside [`LIVE_KEYS`] whose value differs between `old` and `new`.
fn changed_keys(old: &LbConfig, new: &LbConfig) -> Vec<&'static str> {
    let (a, b) = (&old.common, &new.common);
    let checks = [
        ("zk", a.zk != b.zk),
        ("product", a.product != b.product),
        (
            "zk_session_timeout",
            a.zk_session_timeout != b.zk_session_timeout,
        ),
        ("verbose", a.verbose != b.verbose),
        ("max_frame_size", a.max_frame_size != b.max_frame_size),
        (
            "heartbeat_interval_ms",
            a.heartbeat_interval != b.heartbeat_interval,
        ),
        (
            "heartbeat_timeout_ms",
            a.heartbeat_timeout != b.heartbeat_timeout,
        ),
        ("log_keep_days", a.log_keep_days != b.log_keep_days),
        ("log_format", a.log_format != b.log_format),
        ("status_interval_ms", a.status_interval != b.status_interval),
        ("zk_auth", a.zk_auth != b.zk_auth),
        ("socket_mode", a.socket_mode != b.socket_mode),
        ("worker_threads", a.worker_threads != b.worker_threads),
        ("write_timeout_ms", a.write_timeout != b.write_timeout),
        (
            "max_connection_buffer_bytes",
            a.max_connection_buffer_bytes != b.max_connection_buffer_bytes,
        ),
        (
            "max_process_buffer_bytes",
            a.max_process_buffer_bytes != b.max_process_buffer_bytes,
        ),
        ("service", old.service != new.service),
        ("front_host", old.front_host != new.front_host),
        ("front_port", old.front_port != new.front_port),
        ("ip_prefix", old.ip_prefix != new.ip_prefix),
        ("front_sock", old.front_sock != new.front_sock),
        ("back_address", old.back_address != new.back_address),
        ("lb_admin_address", old.admin_address != new.admin_address),
        (
            "worker_pool_size",
            old.worker_pool_size != new.worker_pool_size,
        ),
        (
            "request_timeout_ms",
            old.request_timeout != new.request_timeout,
        ),
        ("drain_grace_ms", old.drain_grace != new.drain_grace),
        ("max_queue", old.max_queue != new.max_queue),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        (
            "front_idle_timeout_ms",
            old.front_idle_timeout != new.front_idle_timeout,
        ),
    ];
    checks
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BASE: &str = "zk=127.0.0.1:2181\nservice=echo\nfront_host=127.0.0.1\nfront_port=5550\nback_address=/tmp/back.sock\n";

    fn config(extra: &str) -> LbConfig {
        LbConfig::parse(&format!("{BASE}{extra}")).unwrap().0
    }

    #[test]
    fn supervision_keys_apply_and_others_are_named() {
        let running = config("worker_command=python3 old.py\nworker_processes=2\n");
        let file = config(
            "worker_command=python3 new.py\nworker_processes=3\nworker_max_requests=50\n\
             request_timeout_ms=2000\nmax_queue=5\nworker_timeout_ms=1000\n",
        );
        let reloaded = merge(&running, file);
        assert_eq!(
            reloaded.applied,
            [
                "worker_timeout_ms",
                "worker_command",
                "worker_processes",
                "worker_max_requests"
            ]
        );
        assert_eq!(reloaded.need_restart, ["request_timeout_ms", "max_queue"]);
        let s = &reloaded.config.supervision;
        assert_eq!(
            s.command.as_deref(),
            Some(&["python3".to_owned(), "new.py".to_owned()][..])
        );
        assert_eq!((s.processes, s.max_requests), (3, 50));
        assert_eq!(s.timeout, Some(Duration::from_secs(1)));
        assert_eq!(reloaded.config.request_timeout, running.request_timeout);
        assert_eq!(reloaded.config.max_queue, running.max_queue);
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let running = config("worker_command=python3 w.py\n");
        let reloaded = merge(&running, config("worker_command=python3 w.py\n"));
        assert!(reloaded.applied.is_empty() && reloaded.need_restart.is_empty());
        assert_eq!(reloaded.config, running);
    }

    #[test]
    fn a_bad_file_is_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.ini");
        std::fs::write(&path, format!("{BASE}worker_processes=0\n")).unwrap();
        let metrics = LbMetrics::new("echo");
        let running = config("");
        assert!(reload(&path, &running, &metrics).is_err());
        std::fs::write(&path, format!("{BASE}worker_processes=4\n")).unwrap();
        let reloaded = reload(&path, &running, &metrics).unwrap();
        assert_eq!(reloaded.config.supervision.processes, 4);
        let text = String::from_utf8(metrics.render(&Default::default())).unwrap();
        for line in [
            r#"rpc_lb_config_reloads_total{result="error"} 1"#,
            r#"rpc_lb_config_reloads_total{result="ok"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
