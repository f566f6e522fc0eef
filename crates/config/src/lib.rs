//! `config.ini` to a typed, validated configuration (CONTRACT section 4). Read once at start-up
//! by `rpc_proxy` and `rpc_lb`; nothing here runs on the data path.
//!
//! # Layout
//! - [`CommonConfig`]: keys every binary reads (ZooKeeper, product, limits, logging).
//! - [`ProxyConfig`], [`LbConfig`]: the keys of one binary, each holding a [`CommonConfig`].
//! - [`Address`]: a unix path, or `host:port` when the text has a `:`.
//! - [`ConfigError`]: one line naming the key; binaries exit 78 on it.
//!
//! Format: flat `key=value` lines, whole-line comments starting with `#` or `;`, the value is
//! everything after the first `=`, trimmed (so a value may contain `#`). A `[section]` header
//! is tolerated and ignored. Unknown keys are returned as [`ConfigWarning`]s, not errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a socket listens or connects: a unix path, or `host:port` when the text has a `:`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A unix domain socket path.
    Unix(PathBuf),
    /// A TCP `host:port` (host may be a name, an IPv4 or a bracketed IPv6 address).
    Tcp(String),
}

impl Address {
    /// Parses the CONTRACT rule: text containing `:` is TCP, anything else a unix path.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] (with `key`) for an empty value, or a TCP address whose port
    /// is not a number.
    pub fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        todo!()
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Tcp(addr) => f.write_str(addr),
        }
    }
}

/// Log output format (`log_format`, NEW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Keys read by every binary.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonConfig {
    /// `zk` (required): ZooKeeper servers, `host:port,host:port`, kept as given (trimmed).
    pub zk: String,
    /// `product` (`test`): namespace `/zk/product/<product>`.
    pub product: String,
    /// `zk_session_timeout` (`30`, seconds).
    pub zk_session_timeout: Duration,
    /// `verbose` (`0`): `1` turns on debug logs.
    pub verbose: bool,
    /// `max_frame_size` (`16384000`): larger frames are refused.
    pub max_frame_size: usize,
    /// `heartbeat_interval_ms` (`1000`).
    pub heartbeat_interval: Duration,
    /// `heartbeat_timeout_ms` (`6000`): a peer silent this long is dropped.
    pub heartbeat_timeout: Duration,
    /// `log_keep_days` (`3`): rotated log files kept.
    pub log_keep_days: usize,
    /// `log_format` (`text`): `text` or `json` (NEW).
    pub log_format: LogFormat,
    /// `status_interval_ms` (`10000`): period of the status log line; `0` turns it off (NEW).
    pub status_interval: Option<Duration>,
    /// `admin_address` (off): `host:port` of the admin HTTP endpoint.
    pub admin_address: Option<String>,
    /// `socket_mode` (`0660`, octal): permissions of unix sockets created.
    pub socket_mode: u32,
}

/// The `rpc_proxy` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Keys shared with the LB.
    pub common: CommonConfig,
    /// `proxy_address` (required): where clients connect.
    pub proxy_address: Address,
    /// `request_timeout_ms` (`15000`).
    pub request_timeout: Duration,
    /// `drain_grace_ms` (`10000` for the proxy): longest graceful stop.
    pub drain_grace: Duration,
    /// `max_connections` (`20000`, NEW): client connections beyond this are closed at once.
    pub max_connections: usize,
    /// `max_inflight_per_connection` (`1024`, NEW): pipelined calls beyond this on one client
    /// connection get a code-6 error at once.
    pub max_inflight_per_connection: usize,
    /// `max_pending_per_endpoint` (`8192`, NEW): calls queued or in flight on one endpoint
    /// beyond this get a code-6 error at once.
    pub max_pending_per_endpoint: usize,
    /// `upstream_connections` (`1`, NEW): multiplexed connections per endpoint.
    pub upstream_connections: usize,
    /// `upstream_idle_timeout_ms` (`300000`, NEW): an upstream connection with no call for
    /// this long is closed (reopened on the next call).
    pub upstream_idle_timeout: Duration,
    /// `connect_timeout_ms` (`1000`, NEW): how long a call waits for a new upstream connection.
    pub connect_timeout: Duration,
    /// `client_idle_timeout_ms` (`0` = never, NEW): a client connection with nothing in flight
    /// and no frame for this long is closed.
    pub client_idle_timeout: Option<Duration>,
    /// `startup_hold_ms` (`5000`, NEW): right after start, calls wait at most this long for the
    /// first full read of ZooKeeper.
    pub startup_hold: Duration,
}

/// The `rpc_lb` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    /// Keys shared with the proxy.
    pub common: CommonConfig,
    /// `service` (required): the service name registered.
    pub service: String,
    /// `front_host` (`""`).
    pub front_host: Option<String>,
    /// `front_port` (`""`).
    pub front_port: Option<u16>,
    /// `ip_prefix` (`""`): with no `front_host`, the first local IPv4 starting with this.
    pub ip_prefix: Option<String>,
    /// `front_sock` (`""`): unix path; when set it replaces host:port (made absolute).
    pub front_sock: Option<PathBuf>,
    /// `back_address` (required): where workers connect.
    pub back_address: Address,
    /// `worker_pool_size` (`1`): capacity of a worker that announces none.
    pub worker_pool_size: usize,
    /// `request_timeout_ms` (`15000`).
    pub request_timeout: Duration,
    /// `drain_grace_ms` (`25000` for the LB).
    pub drain_grace: Duration,
    /// `max_queue` (`1024`, NEW): calls waiting for a free worker beyond this get code 6 at once.
    pub max_queue: usize,
    /// `max_connections` (`20000`, NEW).
    pub max_connections: usize,
}

/// A configuration that cannot be used. `Display` is one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is neither a comment, a section header nor `key=value`.
    #[error("config line {line}: expected key=value, got {text:?}")]
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// A required key is absent or empty.
    #[error("config key `{key}` is required")]
    Missing {
        /// The key.
        key: &'static str,
    },
    /// A key has a value that cannot be used.
    #[error("config key `{key}`: invalid value {value:?}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// The value found.
        value: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Something in the file that does not stop the binary (an unknown key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The key as written.
    pub key: String,
    /// One line for the log.
    pub message: String,
}

impl ProxyConfig {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key (or the file).
    pub fn from_file(path: &Path) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        todo!()
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key.
    pub fn parse(text: &str) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        todo!()
    }
}

impl LbConfig {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key (or the file).
    pub fn from_file(path: &Path) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        todo!()
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key.
    pub fn parse(text: &str) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        todo!()
    }
}
