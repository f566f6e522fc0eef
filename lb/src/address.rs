//! Which address the LB listens on for proxies and registers in ZooKeeper: `front_sock`,
//! else `front_host:front_port`, else the first local IPv4 starting with `ip_prefix`.
//! Start-up only.

use std::path::PathBuf;

use rpc_config::{Address, LbConfig};

/// Why no front address could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// No `front_sock` and no `front_port`.
    #[error("config key `front_port` is required when `front_sock` is not set")]
    NoPort,
    /// No local IPv4 address matches `ip_prefix`.
    #[error("config key `ip_prefix`: no local IPv4 address starts with {0:?}")]
    NoMatchingIp(String),
    /// The interfaces could not be listed.
    #[error("cannot list network interfaces: {0}")]
    Interfaces(std::io::Error),
}

/// Where to listen and what to register as `frontend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Front {
    /// The listening address.
    pub listen: Address,
    /// The `frontend` written into ZooKeeper.
    pub frontend: String,
}

/// Chooses the front address from the configuration.
///
/// # Errors
/// [`AddressError`], reported as a configuration error (exit 78).
pub fn front(config: &LbConfig) -> Result<Front, AddressError> {
    if let Some(sock) = &config.front_sock {
        return Ok(Front {
            listen: Address::Unix(sock.clone()),
            frontend: sock.display().to_string(),
        });
    }
    let port = config.front_port.ok_or(AddressError::NoPort)?;
    let host = match (&config.front_host, &config.ip_prefix) {
        (Some(host), _) => host.clone(),
        (None, Some(prefix)) => local_ipv4_with_prefix(prefix)?,
        // Nothing listens beyond loopback unless configured to.
        (None, None) => "127.0.0.1".to_owned(),
    };
    let frontend = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Front {
        listen: Address::Tcp(frontend.clone()),
        frontend,
    })
}

fn local_ipv4_with_prefix(prefix: &str) -> Result<String, AddressError> {
    let interfaces = if_addrs::get_if_addrs().map_err(AddressError::Interfaces)?;
    let mut ips: Vec<String> = interfaces
        .iter()
        .filter_map(|i| match i.ip() {
            std::net::IpAddr::V4(v4) => Some(v4.to_string()),
            std::net::IpAddr::V6(_) => None,
        })
        .filter(|ip| ip.starts_with(prefix))
        .collect();
    ips.sort();
    ips.into_iter()
        .next()
        .ok_or_else(|| AddressError::NoMatchingIp(prefix.to_owned()))
}

/// The host name written into the node (`/proc/sys/kernel/hostname`, or `localhost`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The deploy path: `--work-dir`, or the current directory.
pub fn deploy_path(work_dir: Option<PathBuf>) -> String {
    work_dir
        .or_else(|| std::env::current_dir().ok())
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> LbConfig {
        let text = format!("zk=127.0.0.1:2181\nservice=echo\nback_address=/tmp/b.sock\n{extra}");
        LbConfig::parse(&text).unwrap().0
    }

    #[test]
    fn front_sock_wins() {
        let front = front(&config(
            "front_sock=/tmp/f.sock\nfront_host=10.0.0.1\nfront_port=5\n",
        ))
        .unwrap();
        assert_eq!(front.frontend, "/tmp/f.sock");
        assert!(matches!(front.listen, Address::Unix(_)));
    }

    #[test]
    fn host_and_port() {
        let front = front(&config("front_host=127.0.0.2\nfront_port=5550\n")).unwrap();
        assert_eq!(front.frontend, "127.0.0.2:5550");
        assert_eq!(front.listen, Address::Tcp("127.0.0.2:5550".into()));
    }

    #[test]
    fn ip_prefix_finds_loopback_and_missing_port_is_an_error() {
        let front = front(&config("ip_prefix=127.\nfront_port=5550\n")).unwrap();
        assert!(front.frontend.starts_with("127."), "{}", front.frontend);
        assert!(matches!(
            super::front(&config("ip_prefix=203.0.113.\nfront_port=1\n")),
            Err(AddressError::NoMatchingIp(_))
        ));
        assert!(matches!(
            super::front(&config("")),
            Err(AddressError::NoPort)
        ));
    }
}
