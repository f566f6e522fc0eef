//! The same-host rule (CONTRACT sections 3 and 9): a unix-path `frontend` names a socket on
//! the host that registered it, so it is routable only from that host. Discovery checks
//! every endpoint node against the proxy's [`LocalHost`] before the endpoint can reach the
//! routing table; dialled from anywhere else, the path would reach whatever local socket
//! happens to have the same name.

use tracing::warn;

use crate::EndpointInfo;

/// The host name that node data written on this very host may carry besides the real one.
const LOCALHOST: &str = "localhost";

/// The host a proxy runs on, as the same-host rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalHost {
    /// gethostname(2), or the name given to [`LocalHost::named`].
    name: String,
}

/// A unix-path `frontend` registered by another host: not routable from this one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unix-path frontend {frontend} registered by host {hostname}, not by this host {local}")]
pub struct ForeignUnixFrontend {
    /// The node's `frontend`.
    pub frontend: String,
    /// The node's `hostname`.
    pub hostname: String,
    /// This host's name.
    pub local: String,
}

// === impl LocalHost ===

impl LocalHost {
    /// This machine's host name, from gethostname(2) (what `hostname` prints, and what an LB
    /// of this host writes into its node). Should it be unreadable, the name is empty and
    /// only unix paths registered with an empty hostname or `localhost` are routable.
    pub fn current() -> Self {
        match nix::unistd::gethostname() {
            Ok(name) => Self::named(name.to_string_lossy()),
            Err(err) => {
                warn!(%err, "cannot read this host's name: only unix-path frontends registered with hostname \"\" or \"localhost\" are routable");
                Self::named("")
            }
        }
    }

    /// A host of the given name, instead of this machine's (tests, or a proxy told which
    /// name its LBs register with).
    pub fn named(name: impl Into<String>) -> Self {
        LocalHost { name: name.into() }
    }

    /// The host name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the endpoint `info` describes can be routed from this host: a TCP `frontend`
    /// always; a unix path only when the node's `hostname` is empty, `localhost` or this
    /// host's name. Host names compare without case (DNS names are case-insensitive) and
    /// without a trailing dot.
    ///
    /// # Errors
    /// [`ForeignUnixFrontend`] for a unix path registered by another host.
    pub fn check(&self, info: &EndpointInfo) -> Result<(), ForeignUnixFrontend> {
        if !is_unix_path(&info.frontend) {
            return Ok(());
        }
        let hostname = normalise(&info.hostname);
        if hostname.is_empty()
            || hostname.eq_ignore_ascii_case(LOCALHOST)
            || hostname.eq_ignore_ascii_case(normalise(&self.name))
        {
            return Ok(());
        }
        Err(ForeignUnixFrontend {
            frontend: info.frontend.trim().to_owned(),
            hostname: info.hostname.clone(),
            local: self.name.clone(),
        })
    }
}

impl std::fmt::Display for LocalHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// The address rule of CONTRACT section 2, as the proxy applies it to a `frontend`: text
/// with a `:` is TCP, any other (non-empty) text a unix path. An empty `frontend` is no
/// address at all; the proxy skips it on its own.
fn is_unix_path(frontend: &str) -> bool {
    let frontend = frontend.trim();
    !frontend.is_empty() && !frontend.contains(':')
}

/// A host name as compared: no surrounding blanks, no trailing dot (`web1.example.com.`).
fn normalise(name: &str) -> &str {
    name.trim().trim_end_matches('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(frontend: &str, hostname: &str) -> EndpointInfo {
        EndpointInfo {
            service: "echo".into(),
            service_id: crate::service_id(frontend),
            frontend: frontend.into(),
            hostname: hostname.into(),
            ..Default::default()
        }
    }

    #[test]
    fn unix_path_of_this_host_is_routable() {
        let web1 = LocalHost::named("web1");
        for hostname in [
            "",
            "  ",
            "localhost",
            "LocalHost",
            "web1",
            "WEB1",
            "web1.",
            " web1 ",
        ] {
            assert_eq!(
                web1.check(&info("/run/rpc/echo.sock", hostname)),
                Ok(()),
                "hostname {hostname:?}"
            );
        }
        let fqdn = LocalHost::named("web1.example.com");
        assert_eq!(
            fqdn.check(&info("/run/rpc/echo.sock", "Web1.Example.Com.")),
            Ok(())
        );
    }

    #[test]
    fn unix_path_of_another_host_is_not_routable() {
        let web1 = LocalHost::named("web1");
        for hostname in [
            "web2",
            "some-other-host.invalid",
            "web1.example.com",
            "web",
            "local",
        ] {
            let err = web1
                .check(&info(" /run/rpc/echo.sock ", hostname))
                .expect_err(hostname);
            assert_eq!(
                err,
                ForeignUnixFrontend {
                    frontend: "/run/rpc/echo.sock".into(),
                    hostname: hostname.into(),
                    local: "web1".into(),
                }
            );
            assert!(err.to_string().contains(hostname), "{err}");
        }
        // A proxy whose own name is unknown routes only what says it is local.
        let unknown = LocalHost::named("");
        assert!(unknown.check(&info("/x.sock", "web1")).is_err());
        assert_eq!(unknown.check(&info("/x.sock", "localhost")), Ok(()));
    }

    #[test]
    fn tcp_frontends_are_routable_from_any_host() {
        let web1 = LocalHost::named("web1");
        for frontend in ["10.4.10.2:5555", "web2:5555", "[::1]:5555"] {
            assert_eq!(web1.check(&info(frontend, "web2")), Ok(()), "{frontend}");
        }
        // Not an address: left to the proxy's own parsing.
        assert_eq!(web1.check(&info("", "web2")), Ok(()));
    }

    #[test]
    fn current_is_this_machines_host_name() {
        let current = LocalHost::current();
        let expected = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .expect("linux host name")
            .trim()
            .to_owned();
        assert_eq!(current.name(), expected);
        assert_eq!(
            current.check(&info("/run/rpc/echo.sock", &expected)),
            Ok(())
        );
    }
}
