//! SIGHUP (CONTRACT section 9, "Zero downtime and reload"): the LB reads its configuration
//! file again (the path it started with) and validates it. A file refused is logged and
//! counted (`rpc_lb_config_reloads_total{result="error"}`) and changes nothing. A good one
//! has its supervision keys and `verbose` (the log level) applied ([`LIVE_KEYS`], handed to the
//! [`crate::supervisor::Supervisor`], which then restarts its workers); every other key
//! that changed is named in a warning: it needs a restart of the LB, and the LB keeps
//! running with its old value.

use std::path::Path;

use rpc_config::{ConfigError, ConfigWarning, LbConfig};

use crate::metrics::LbMetrics;

/// The keys a reload applies (the worker supervision keys).
///
pub const LIVE_KEYS: [&str; 7] = [
    "verbose",
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
    let (applied, need_restart): (Vec<_>, Vec<_>) = running
        .changed_keys(&file)
        .into_iter()
        .partition(|key| LIVE_KEYS.contains(key));
    let mut config = running.clone();
    config.common.verbose = file.common.verbose;
    config.supervision = file.supervision;
    Reloaded {
        config,
        applied,
        need_restart,
    }
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
