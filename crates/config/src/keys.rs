//! The one list of config keys: what either binary reads, and the original's keys that are
//! accepted silently. The line parser warns about any other key; the tests check that
//! `config.ini.example` documents exactly these keys and that every one of them is read.

/// Keys read by `rpc_proxy` or `rpc_lb` (or both). One file may serve the proxy and the LB of
/// a host, so a key known to either binary is never warned about by the other.
pub const KNOWN_KEYS: &[&str] = &[
    // Every binary.
    "zk",
    "product",
    "zk_session_timeout",
    "verbose",
    "max_frame_size",
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
    "log_keep_days",
    "log_format",
    "status_interval_ms",
    "admin_address",
    "socket_mode",
    "zk_auth",
    "zk_auth_file",
    // Proxy and LB.
    "request_timeout_ms",
    "drain_grace_ms",
    "max_connections",
    "write_timeout_ms",
    "max_connection_buffer_bytes",
    "max_process_buffer_bytes",
    // Proxy only.
    "proxy_address",
    "proxy_admin_address",
    "max_inflight_per_connection",
    "max_pending_per_endpoint",
    "upstream_connections",
    "upstream_idle_timeout_ms",
    "connect_timeout_ms",
    "client_idle_timeout_ms",
    "startup_hold_ms",
    "worker_threads",
    "outlier_consecutive_failures",
    "outlier_base_ejection_ms",
    "outlier_max_ejection_percent",
    "retry_budget_percent",
    "retry_min_per_sec",
    // LB only.
    "service",
    "front_host",
    "front_port",
    "ip_prefix",
    "front_sock",
    "back_address",
    "worker_pool_size",
    "max_queue",
    "front_idle_timeout_ms",
    "lb_admin_address",
    "worker_command",
    "worker_processes",
    "worker_timeout_ms",
    "worker_max_requests",
    "worker_max_requests_jitter",
    "worker_boot_timeout_ms",
];

/// Keys of the Go original that nothing reads any more (`profile`, `falcon_client`,
/// `rpc_timeout`, `stand_alone`). Existing files carry them, so they are ignored without a
/// warning.
pub const LEGACY_KEYS: &[&str] = &["profile", "falcon_client", "rpc_timeout", "stand_alone"];

/// Whether `key` is read by a binary or is a silently ignored legacy key.
pub(crate) fn is_accepted(key: &str) -> bool {
    KNOWN_KEYS.contains(&key) || LEGACY_KEYS.contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn lists_have_no_duplicates_and_do_not_overlap() {
        let known: BTreeSet<_> = KNOWN_KEYS.iter().collect();
        assert_eq!(known.len(), KNOWN_KEYS.len(), "duplicate in KNOWN_KEYS");
        let legacy: BTreeSet<_> = LEGACY_KEYS.iter().collect();
        assert_eq!(legacy.len(), LEGACY_KEYS.len(), "duplicate in LEGACY_KEYS");
        assert!(known.is_disjoint(&legacy));
    }

    #[test]
    fn keys_are_lowercase_identifiers() {
        for key in KNOWN_KEYS.iter().chain(LEGACY_KEYS) {
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{key}"
            );
        }
    }

    #[test]
    fn accepted_keys() {
        assert!(is_accepted("zk"));
        assert!(is_accepted("max_queue"));
        assert!(is_accepted("falcon_client"));
        assert!(!is_accepted("ZK"));
        assert!(!is_accepted("foo"));
    }
}
