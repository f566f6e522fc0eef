//! Node paths of the ZooKeeper layout (CONTRACT section 3) and the `service_id` rule:
//! `/zk/product/<product>/services/<service>/<service_id>`.

/// `/zk/product/<product>/services`.
pub fn services_path(product: &str) -> String {
    format!("/zk/product/{product}/services")
}

/// `/zk/product/<product>/services/<service>`.
pub fn service_path(product: &str, service: &str) -> String {
    format!("/zk/product/{product}/services/{service}")
}

/// `/zk/product/<product>/services/<service>/<service_id>`: an LB's ephemeral endpoint node.
pub fn endpoint_path(product: &str, service: &str, service_id: &str) -> String {
    format!("/zk/product/{product}/services/{service}/{service_id}")
}

/// How many trailing characters of the mangled address make the node name.
const SERVICE_ID_LEN: usize = 20;

/// The node name of an endpoint: `.` and `:` become `_`, `/` is removed, and the last 20
/// characters are kept (`10.4.10.2:5555` gives `10_4_10_2_5555`).
pub fn service_id(frontend: &str) -> String {
    let mangled: Vec<char> = frontend
        .chars()
        .filter(|&c| c != '/')
        .map(|c| if c == '.' || c == ':' { '_' } else { c })
        .collect();
    let skip = mangled.len().saturating_sub(SERVICE_ID_LEN);
    mangled[skip..].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_id_of_tcp_address() {
        assert_eq!(service_id("10.4.10.2:5555"), "10_4_10_2_5555");
        assert_eq!(service_id("127.0.0.1:80"), "127_0_0_1_80");
    }

    #[test]
    fn service_id_keeps_the_last_20_characters() {
        // 192_168_100_200_65535 is 21 characters: the first is dropped.
        assert_eq!(service_id("192.168.100.200:65535"), "92_168_100_200_65535");
        assert_eq!(service_id("192.168.100.200:65535").len(), 20);
    }

    #[test]
    fn service_id_of_unix_path() {
        assert_eq!(service_id("/tmp/typo.sock"), "tmptypo_sock");
        assert_eq!(
            service_id("/var/run/rpc/typo-service.sock"),
            "rpctypo-service_sock"
        );
    }

    #[test]
    fn service_id_counts_characters_not_bytes() {
        assert_eq!(
            service_id("/tmp/ééééééééééééééééééééé"),
            "éééééééééééééééééééé"
        );
        assert_eq!(service_id(""), "");
    }

    #[test]
    fn paths() {
        assert_eq!(services_path("p"), "/zk/product/p/services");
        assert_eq!(service_path("p", "s"), "/zk/product/p/services/s");
        assert_eq!(endpoint_path("p", "s", "id"), "/zk/product/p/services/s/id");
    }
}
