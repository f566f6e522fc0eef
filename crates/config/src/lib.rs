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
//!
//! Private modules: `keys` (the one list of known keys, re-exported as [`KNOWN_KEYS`] and
//! [`LEGACY_KEYS`]), `parse` (lines to raw values) and `value` (typed lookups and checks).

use std::path::{Path, PathBuf};
use std::time::Duration;

mod keys;
mod parse;
mod value;

pub use keys::{KNOWN_KEYS, LEGACY_KEYS};

use parse::Values;
use value::{MAX_COUNT, check_host_port, check_name, check_unix_path, invalid};

// Defaults (CONTRACT section 4 plus the NEW keys), in the units of their keys.
const DEFAULT_PRODUCT: &str = "test";
const DEFAULT_ZK_SESSION_TIMEOUT_S: u64 = 30;
const DEFAULT_MAX_FRAME_SIZE: usize = 16_384_000;
const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 6_000;
const DEFAULT_LOG_KEEP_DAYS: usize = 3;
const DEFAULT_STATUS_INTERVAL_MS: u64 = 10_000;
const DEFAULT_SOCKET_MODE: u32 = 0o660;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 15_000;
const DEFAULT_WRITE_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_MAX_CONNECTION_BUFFER_BYTES: usize = 32 << 20;
const DEFAULT_MAX_PROCESS_BUFFER_BYTES: usize = 1 << 30;
const DEFAULT_PROXY_DRAIN_GRACE_MS: u64 = 10_000;
const DEFAULT_LB_DRAIN_GRACE_MS: u64 = 25_000;
const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
const DEFAULT_MAX_INFLIGHT_PER_CONNECTION: usize = 1_024;
const DEFAULT_MAX_PENDING_PER_ENDPOINT: usize = 8_192;
const DEFAULT_UPSTREAM_CONNECTIONS: usize = 1;
const DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS: u64 = 300_000;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Off: Thrift clients (Python connection pools included) keep idle connections open and do
/// not retry, so closing one would fail the caller's next call on it. Stalled clients are
/// bounded anyway: a frame once started must be finished within the proxy's frame deadline.
const DEFAULT_CLIENT_IDLE_TIMEOUT_MS: u64 = 0;
const DEFAULT_STARTUP_HOLD_MS: u64 = 5_000;
const DEFAULT_OUTLIER_CONSECUTIVE_FAILURES: u32 = 5;
const DEFAULT_OUTLIER_BASE_EJECTION_MS: u64 = 30_000;
const DEFAULT_OUTLIER_MAX_EJECTION_PERCENT: u32 = 50;
const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
const DEFAULT_RETRY_MIN_PER_SEC: u32 = 10;
/// Largest `retry_budget_percent`: ten retries per call (Finagle's bound).
const MAX_RETRY_BUDGET_PERCENT: u32 = 1_000;
/// Largest `retry_min_per_sec`.
const MAX_RETRY_MIN_PER_SEC: u32 = 1_000_000;
const DEFAULT_WORKER_POOL_SIZE: usize = 1;
const DEFAULT_MAX_QUEUE: usize = 1_024;
/// Five minutes, like `upstream_idle_timeout_ms`: proxies ping idle connections every
/// `heartbeat_interval_ms` (1 s), and a ping counts as activity, so a live proxy is never cut.
const DEFAULT_FRONT_IDLE_TIMEOUT_MS: u64 = 300_000;
const DEFAULT_WORKER_PROCESSES: usize = 1;
const DEFAULT_WORKER_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_WORKER_BOOT_TIMEOUT_MS: u64 = 60_000;

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
        let text = text.trim();
        if text.is_empty() {
            return Err(invalid(key, text, "the address is empty"));
        }
        if text.contains(':') {
            check_host_port(key, text)?;
            Ok(Address::Tcp(text.to_owned()))
        } else {
            let path = PathBuf::from(text);
            check_unix_path(key, text, &path)?;
            Ok(Address::Unix(path))
        }
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
    /// `zk_auth` (`user:password`) or the first line of the file `zk_auth_file` (NEW, off):
    /// ZooKeeper digest credential. The LB then creates its nodes readable by anyone and
    /// writable only by holders of the credential.
    pub zk_auth: Option<String>,
    /// `socket_mode` (`0660`, octal): permissions of unix sockets created.
    pub socket_mode: u32,
    /// `worker_threads` (`1`, NEW): runtime threads; `0` = one per CPU. One thread keeps
    /// each call on one core (no cross-thread wakeups): the cheapest per call for a sidecar
    /// and for an LB whose workers need the other cores.
    pub worker_threads: usize,
    /// `write_timeout_ms` (`30000`, NEW, proxy and LB): a peer that accepts no byte of a
    /// pending write this long is closed (its calls get code 6).
    pub write_timeout: Duration,
    /// `max_connection_buffer_bytes` (`33554432`, NEW, proxy and LB): request and reply bytes
    /// buffered for one connection; at the bound the peer is not read (or a reply gets code 6).
    pub max_connection_buffer_bytes: usize,
    /// `max_process_buffer_bytes` (`1073741824`, NEW, proxy and LB): all buffered bytes of the
    /// process, the same way.
    pub max_process_buffer_bytes: usize,
}

/// The `rpc_proxy` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Keys shared with the LB.
    pub common: CommonConfig,
    /// `proxy_address` (required): where clients connect.
    pub proxy_address: Address,
    /// `proxy_admin_address`, else `admin_address` (off): `host:port` of the proxy's admin
    /// HTTP endpoint. Its own key lets one file serve the proxy and the LB of a host, each
    /// with its endpoint on (both binding `admin_address` would clash).
    pub admin_address: Option<String>,
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
    /// Outlier ejection and the retry budget (CONTRACT section 9, "Proxy resilience").
    pub resilience: ResilienceConfig,
}

/// The proxy's outlier ejection and retry budget keys (CONTRACT section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResilienceConfig {
    /// `outlier_consecutive_failures` (`5`, `0` = off): counted failures in a row that eject an
    /// endpoint.
    pub consecutive_failures: u32,
    /// `outlier_base_ejection_ms` (`30000`): the first ejection; the n-th lasts n times this,
    /// at most 10 times, jittered +-10 %.
    pub base_ejection: Duration,
    /// `outlier_max_ejection_percent` (`50`): at most this share of a service's endpoints
    /// ejected at once (at least one may be).
    pub max_ejection_percent: u32,
    /// `retry_budget_percent` (`20`): retries of a service in the last 10 s may reach this
    /// percentage of its calls in those 10 s ...
    pub retry_budget_percent: u32,
    /// `retry_min_per_sec` (`10`): ... plus this many per second (x 10).
    pub retry_min_per_sec: u32,
}

impl Default for ResilienceConfig {
    /// The CONTRACT defaults.
    fn default() -> Self {
        ResilienceConfig {
            consecutive_failures: DEFAULT_OUTLIER_CONSECUTIVE_FAILURES,
            base_ejection: Duration::from_millis(DEFAULT_OUTLIER_BASE_EJECTION_MS),
            max_ejection_percent: DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            retry_min_per_sec: DEFAULT_RETRY_MIN_PER_SEC,
        }
    }
}

// === impl ResilienceConfig ===

impl ResilienceConfig {
    /// The outlier and retry keys.
    fn from_values(values: &Values) -> Result<Self, ConfigError> {
        Ok(ResilienceConfig {
            consecutive_failures: values.number(
                "outlier_consecutive_failures",
                DEFAULT_OUTLIER_CONSECUTIVE_FAILURES,
                MAX_COUNT as u32,
            )?,
            base_ejection: values.millis(
                "outlier_base_ejection_ms",
                DEFAULT_OUTLIER_BASE_EJECTION_MS,
                false,
            )?,
            max_ejection_percent: values.number(
                "outlier_max_ejection_percent",
                DEFAULT_OUTLIER_MAX_EJECTION_PERCENT,
                100,
            )?,
            retry_budget_percent: values.number(
                "retry_budget_percent",
                DEFAULT_RETRY_BUDGET_PERCENT,
                MAX_RETRY_BUDGET_PERCENT,
            )?,
            retry_min_per_sec: values.number(
                "retry_min_per_sec",
                DEFAULT_RETRY_MIN_PER_SEC,
                MAX_RETRY_MIN_PER_SEC,
            )?,
        })
    }
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
    /// `lb_admin_address`, else `admin_address` (off): `host:port` of the LB's admin HTTP
    /// endpoint (its own key: see [`ProxyConfig::admin_address`]).
    pub admin_address: Option<String>,
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
    /// `front_idle_timeout_ms` (`300000`, `0` = never, NEW): a front connection with no call
    /// in flight and no frame (a ping counts) for this long is closed.
    pub front_idle_timeout: Option<Duration>,
    /// Worker supervision (CONTRACT section 9, "LB supervision").
    pub supervision: SupervisionConfig,
}

/// The LB's worker supervision keys (CONTRACT section 9, "LB supervision").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisionConfig {
    /// `worker_command` (unset): the command line of one worker, split like a shell does (no
    /// shell runs it). When set, the LB starts, watches and restarts the workers itself.
    pub command: Option<Vec<String>>,
    /// `worker_processes` (`1`): supervised workers kept running.
    pub processes: usize,
    /// `worker_timeout_ms` (`30000`, `0` = off): a call held by one worker longer than this
    /// marks the worker hung.
    pub timeout: Option<Duration>,
    /// `worker_max_requests` (`0` = never): recycle a worker after this many calls ...
    pub max_requests: u32,
    /// `worker_max_requests_jitter` (`0`): ... plus a random 0..this.
    pub max_requests_jitter: u32,
    /// `worker_boot_timeout_ms` (`60000`): a started worker must send HELLO within this.
    pub boot_timeout: Duration,
}

impl Default for SupervisionConfig {
    /// The CONTRACT defaults: no `worker_command`.
    fn default() -> Self {
        SupervisionConfig {
            command: None,
            processes: DEFAULT_WORKER_PROCESSES,
            timeout: Some(Duration::from_millis(DEFAULT_WORKER_TIMEOUT_MS)),
            max_requests: 0,
            max_requests_jitter: 0,
            boot_timeout: Duration::from_millis(DEFAULT_WORKER_BOOT_TIMEOUT_MS),
        }
    }
}

// === impl SupervisionConfig ===

impl SupervisionConfig {
    /// The worker supervision keys.
    fn from_values(values: &Values) -> Result<Self, ConfigError> {
        let command = match values.get("worker_command") {
            None => None,
            Some(text) => Some(split_command(text)?),
        };
        Ok(SupervisionConfig {
            command,
            processes: values.count("worker_processes", DEFAULT_WORKER_PROCESSES)?,
            timeout: values.optional_millis("worker_timeout_ms", DEFAULT_WORKER_TIMEOUT_MS)?,
            max_requests: values.number("worker_max_requests", 0, u32::MAX)?,
            max_requests_jitter: values.number("worker_max_requests_jitter", 0, u32::MAX)?,
            boot_timeout: values.millis(
                "worker_boot_timeout_ms",
                DEFAULT_WORKER_BOOT_TIMEOUT_MS,
                false,
            )?,
        })
    }
}

/// `worker_command` split into words as a POSIX shell would (quotes, backslashes), without
/// running a shell: no variables, globs, pipes or redirections.
fn split_command(text: &str) -> Result<Vec<String>, ConfigError> {
    match shlex::split(text) {
        Some(words) if words.first().is_some_and(|w| !w.is_empty()) => Ok(words),
        Some(_) => Err(invalid("worker_command", text, "names no program")),
        None => Err(invalid(
            "worker_command",
            text,
            "unbalanced quotes or a trailing backslash",
        )),
    }
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

/// Reads `path` as UTF-8 text.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The keys among `$key => $field` whose values differ between `$old` and `$new`, in order.
macro_rules! changed_keys {
    ($old:expr, $new:expr; $($key:literal => $($field:ident).+),* $(,)?) => {{
        let mut keys: Vec<&'static str> = Vec::new();
        $(
            if $old.$($field).+ != $new.$($field).+ {
                keys.push($key);
            }
        )*
        keys
    }};
}

// === impl CommonConfig ===

impl CommonConfig {
    /// The keys whose values differ between `self` and `other` (a reload names them).
    pub fn changed_keys(&self, other: &Self) -> Vec<&'static str> {
        changed_keys!(self, other;
            "zk" => zk,
            "product" => product,
            "zk_session_timeout" => zk_session_timeout,
            "verbose" => verbose,
            "max_frame_size" => max_frame_size,
            "heartbeat_interval_ms" => heartbeat_interval,
            "heartbeat_timeout_ms" => heartbeat_timeout,
            "log_keep_days" => log_keep_days,
            "log_format" => log_format,
            "status_interval_ms" => status_interval,
            "zk_auth" => zk_auth,
            "socket_mode" => socket_mode,
            "worker_threads" => worker_threads,
            "write_timeout_ms" => write_timeout,
            "max_connection_buffer_bytes" => max_connection_buffer_bytes,
            "max_process_buffer_bytes" => max_process_buffer_bytes,
        )
    }

    /// The keys every binary reads.
    fn from_values(values: &Values) -> Result<Self, ConfigError> {
        let zk = values.required("zk")?;
        if zk.split(',').any(|server| server.trim().is_empty()) {
            return Err(invalid(
                "zk",
                zk,
                "expected host:port[,host:port...] with no empty entry",
            ));
        }
        let product = values.get("product").unwrap_or(DEFAULT_PRODUCT);
        check_name("product", product, &[])?;
        let heartbeat_interval = values.millis(
            "heartbeat_interval_ms",
            DEFAULT_HEARTBEAT_INTERVAL_MS,
            false,
        )?;
        let heartbeat_timeout =
            values.millis("heartbeat_timeout_ms", DEFAULT_HEARTBEAT_TIMEOUT_MS, false)?;
        if heartbeat_timeout <= heartbeat_interval {
            return Err(invalid(
                "heartbeat_timeout_ms",
                &heartbeat_timeout.as_millis().to_string(),
                format!(
                    "must be greater than heartbeat_interval_ms ({})",
                    heartbeat_interval.as_millis()
                ),
            ));
        }
        Ok(Self {
            zk: zk.to_owned(),
            product: product.to_owned(),
            zk_session_timeout: values
                .seconds("zk_session_timeout", DEFAULT_ZK_SESSION_TIMEOUT_S)?,
            verbose: values.switch("verbose", false)?,
            max_frame_size: values.frame_size("max_frame_size", DEFAULT_MAX_FRAME_SIZE)?,
            heartbeat_interval,
            heartbeat_timeout,
            log_keep_days: values.count("log_keep_days", DEFAULT_LOG_KEEP_DAYS)?,
            log_format: values.log_format("log_format")?,
            status_interval: values
                .optional_millis("status_interval_ms", DEFAULT_STATUS_INTERVAL_MS)?,
            zk_auth: zk_auth(values)?,
            socket_mode: values.octal_mode("socket_mode", DEFAULT_SOCKET_MODE)?,
            worker_threads: worker_threads(values)?,
            write_timeout: values.millis("write_timeout_ms", DEFAULT_WRITE_TIMEOUT_MS, false)?,
            max_connection_buffer_bytes: values.buffer_bytes(
                "max_connection_buffer_bytes",
                DEFAULT_MAX_CONNECTION_BUFFER_BYTES,
            )?,
            max_process_buffer_bytes: values
                .buffer_bytes("max_process_buffer_bytes", DEFAULT_MAX_PROCESS_BUFFER_BYTES)?,
        })
    }
}

/// `zk_auth`, else the first non-empty line of the file named by `zk_auth_file`; either
/// must read `user:password` with a non-empty user.
fn zk_auth(values: &Values) -> Result<Option<String>, ConfigError> {
    let (key, text) = match (values.text("zk_auth"), values.text("zk_auth_file")) {
        (Some(text), _) => ("zk_auth", text),
        (None, Some(path)) => {
            let content = std::fs::read_to_string(&path)
                .map_err(|e| invalid("zk_auth_file", &path, format!("cannot read it: {e}")))?;
            let line = content
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("");
            ("zk_auth_file", line.to_owned())
        }
        (None, None) => return Ok(None),
    };
    match text.split_once(':') {
        Some((user, _)) if !user.is_empty() => Ok(Some(text)),
        // The credential itself is never echoed into logs or errors.
        _ => Err(invalid(key, "<hidden>", "expected user:password")),
    }
}

/// `worker_threads`: `0` (one per CPU) to 1024, default 1.
fn worker_threads(values: &Values) -> Result<usize, ConfigError> {
    match values.text("worker_threads") {
        None => Ok(1),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= 1024)
            .ok_or_else(|| invalid("worker_threads", &text, "expected 0 (one per CPU) to 1024")),
    }
}

/// The admin endpoint of one binary: its own key (`proxy_admin_address` or
/// `lb_admin_address`) when set, else the shared `admin_address`. Both keys are checked as
/// `host:port` even when the own key wins: a bad value in the file is reported, not hidden.
fn admin_address(values: &Values, own_key: &'static str) -> Result<Option<String>, ConfigError> {
    let own = values.host_port(own_key)?;
    let shared = values.host_port("admin_address")?;
    Ok(own.or(shared))
}

/// Parses `text` and builds a configuration from its values with `build`; returns it with the
/// warnings collected on the way.
fn parse_with<C>(
    text: &str,
    build: fn(&Values) -> Result<C, ConfigError>,
) -> Result<(C, Vec<ConfigWarning>), ConfigError> {
    let values = Values::parse(text)?;
    let config = build(&values)?;
    Ok((config, values.into_warnings()))
}

// === impl ProxyConfig ===

impl ProxyConfig {
    /// The keys whose values differ between `self` and `other`, shared keys first.
    pub fn changed_keys(&self, other: &Self) -> Vec<&'static str> {
        let mut keys = self.common.changed_keys(&other.common);
        keys.extend(changed_keys!(self, other;
            "proxy_address" => proxy_address,
            "proxy_admin_address" => admin_address,
            "request_timeout_ms" => request_timeout,
            "drain_grace_ms" => drain_grace,
            "max_connections" => max_connections,
            "max_inflight_per_connection" => max_inflight_per_connection,
            "max_pending_per_endpoint" => max_pending_per_endpoint,
            "upstream_connections" => upstream_connections,
            "upstream_idle_timeout_ms" => upstream_idle_timeout,
            "connect_timeout_ms" => connect_timeout,
            "client_idle_timeout_ms" => client_idle_timeout,
            "startup_hold_ms" => startup_hold,
            "outlier_consecutive_failures" => resilience.consecutive_failures,
            "outlier_base_ejection_ms" => resilience.base_ejection,
            "outlier_max_ejection_percent" => resilience.max_ejection_percent,
            "retry_budget_percent" => resilience.retry_budget_percent,
            "retry_min_per_sec" => resilience.retry_min_per_sec,
        ));
        keys
    }

    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key (or the file).
    pub fn from_file(path: &Path) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::parse(&read_file(path)?)
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key.
    pub fn parse(text: &str) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        parse_with(text, Self::from_values)
    }

    /// The proxy's keys.
    fn from_values(values: &Values) -> Result<Self, ConfigError> {
        let proxy_address = values.address("proxy_address")?;
        let common = CommonConfig::from_values(values)?;
        Ok(Self {
            common,
            proxy_address,
            admin_address: admin_address(values, "proxy_admin_address")?,
            request_timeout: values.millis(
                "request_timeout_ms",
                DEFAULT_REQUEST_TIMEOUT_MS,
                false,
            )?,
            drain_grace: values.millis("drain_grace_ms", DEFAULT_PROXY_DRAIN_GRACE_MS, true)?,
            max_connections: values.count("max_connections", DEFAULT_MAX_CONNECTIONS)?,
            max_inflight_per_connection: values.count(
                "max_inflight_per_connection",
                DEFAULT_MAX_INFLIGHT_PER_CONNECTION,
            )?,
            max_pending_per_endpoint: values
                .count("max_pending_per_endpoint", DEFAULT_MAX_PENDING_PER_ENDPOINT)?,
            upstream_connections: values
                .count("upstream_connections", DEFAULT_UPSTREAM_CONNECTIONS)?,
            upstream_idle_timeout: values.millis(
                "upstream_idle_timeout_ms",
                DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS,
                false,
            )?,
            connect_timeout: values.millis(
                "connect_timeout_ms",
                DEFAULT_CONNECT_TIMEOUT_MS,
                false,
            )?,
            client_idle_timeout: values
                .optional_millis("client_idle_timeout_ms", DEFAULT_CLIENT_IDLE_TIMEOUT_MS)?,
            startup_hold: values.millis("startup_hold_ms", DEFAULT_STARTUP_HOLD_MS, true)?,
            resilience: ResilienceConfig::from_values(values)?,
        })
    }
}

// === impl LbConfig ===

impl LbConfig {
    /// The keys whose values differ between `self` and `other`, shared keys first.
    pub fn changed_keys(&self, other: &Self) -> Vec<&'static str> {
        let mut keys = self.common.changed_keys(&other.common);
        keys.extend(changed_keys!(self, other;
            "service" => service,
            "front_host" => front_host,
            "front_port" => front_port,
            "ip_prefix" => ip_prefix,
            "front_sock" => front_sock,
            "back_address" => back_address,
            "lb_admin_address" => admin_address,
            "worker_pool_size" => worker_pool_size,
            "request_timeout_ms" => request_timeout,
            "drain_grace_ms" => drain_grace,
            "max_queue" => max_queue,
            "max_connections" => max_connections,
            "front_idle_timeout_ms" => front_idle_timeout,
            "worker_timeout_ms" => supervision.timeout,
            "worker_command" => supervision.command,
            "worker_processes" => supervision.processes,
            "worker_max_requests" => supervision.max_requests,
            "worker_max_requests_jitter" => supervision.max_requests_jitter,
            "worker_boot_timeout_ms" => supervision.boot_timeout,
        ));
        keys
    }

    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key (or the file).
    pub fn from_file(path: &Path) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        Self::parse(&read_file(path)?)
    }

    /// Parses and validates config text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key.
    pub fn parse(text: &str) -> Result<(Self, Vec<ConfigWarning>), ConfigError> {
        parse_with(text, Self::from_values)
    }

    /// The LB's keys.
    fn from_values(values: &Values) -> Result<Self, ConfigError> {
        let service = values.required("service")?;
        // `:` separates the service from the method in a call's name (CONTRACT section 2).
        check_name("service", service, &[':'])?;
        let back_address = values.address("back_address")?;
        let common = CommonConfig::from_values(values)?;
        Ok(Self {
            common,
            service: service.to_owned(),
            front_host: values.text("front_host"),
            front_port: values.port("front_port")?,
            ip_prefix: values.text("ip_prefix"),
            front_sock: values.absolute_path("front_sock")?,
            back_address,
            admin_address: admin_address(values, "lb_admin_address")?,
            worker_pool_size: values.count("worker_pool_size", DEFAULT_WORKER_POOL_SIZE)?,
            request_timeout: values.millis(
                "request_timeout_ms",
                DEFAULT_REQUEST_TIMEOUT_MS,
                false,
            )?,
            drain_grace: values.millis("drain_grace_ms", DEFAULT_LB_DRAIN_GRACE_MS, true)?,
            max_queue: values.count("max_queue", DEFAULT_MAX_QUEUE)?,
            max_connections: values.count("max_connections", DEFAULT_MAX_CONNECTIONS)?,
            front_idle_timeout: values
                .optional_millis("front_idle_timeout_ms", DEFAULT_FRONT_IDLE_TIMEOUT_MS)?,
            supervision: SupervisionConfig::from_values(values)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The example shipped at the workspace root.
    const EXAMPLE: &str = include_str!("../../../config.ini.example");

    const PROXY_MIN: &str = "zk=127.0.0.1:2181\nproxy_address=/tmp/proxy.sock\n";
    const LB_MIN: &str = "zk=127.0.0.1:2181\nservice=echo\nback_address=/tmp/back.sock\n";

    fn proxy(text: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::parse(text).map(|(config, _)| config)
    }

    fn lb(text: &str) -> Result<LbConfig, ConfigError> {
        LbConfig::parse(text).map(|(config, _)| config)
    }

    /// Asserts `err` is `Invalid` for `key` with a one-line message naming the key.
    #[track_caller]
    fn assert_invalid(err: ConfigError, key: &str) {
        let message = err.to_string();
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if k == key),
            "{key}: {err:?}"
        );
        assert!(message.contains(&format!("`{key}`")), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn proxy_defaults() {
        let (config, warnings) = ProxyConfig::parse(PROXY_MIN).unwrap();
        assert!(warnings.is_empty());
        let expected = ProxyConfig {
            common: CommonConfig {
                zk: "127.0.0.1:2181".into(),
                product: "test".into(),
                zk_session_timeout: Duration::from_secs(30),
                verbose: false,
                max_frame_size: 16_384_000,
                heartbeat_interval: ms(1000),
                heartbeat_timeout: ms(6000),
                log_keep_days: 3,
                log_format: LogFormat::Text,
                status_interval: Some(ms(10_000)),
                zk_auth: None,
                socket_mode: 0o660,
                worker_threads: 1,
                write_timeout: ms(30_000),
                max_connection_buffer_bytes: 33_554_432,
                max_process_buffer_bytes: 1_073_741_824,
            },
            proxy_address: Address::Unix("/tmp/proxy.sock".into()),
            admin_address: None,
            request_timeout: ms(15_000),
            drain_grace: ms(10_000),
            max_connections: 20_000,
            max_inflight_per_connection: 1024,
            max_pending_per_endpoint: 8192,
            upstream_connections: 1,
            upstream_idle_timeout: ms(300_000),
            connect_timeout: ms(1000),
            client_idle_timeout: None,
            startup_hold: ms(5000),
            resilience: ResilienceConfig {
                consecutive_failures: 5,
                base_ejection: ms(30_000),
                max_ejection_percent: 50,
                retry_budget_percent: 20,
                retry_min_per_sec: 10,
            },
        };
        assert_eq!(config, expected);
        assert_eq!(config.resilience, ResilienceConfig::default());
    }

    #[test]
    fn lb_defaults() {
        let (config, warnings) = LbConfig::parse(LB_MIN).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(config.common, proxy(PROXY_MIN).unwrap().common);
        assert_eq!(config.service, "echo");
        assert_eq!(config.front_host, None);
        assert_eq!(config.front_port, None);
        assert_eq!(config.ip_prefix, None);
        assert_eq!(config.front_sock, None);
        assert_eq!(config.back_address, Address::Unix("/tmp/back.sock".into()));
        assert_eq!(config.admin_address, None);
        assert_eq!(config.worker_pool_size, 1);
        assert_eq!(config.request_timeout, ms(15_000));
        assert_eq!(config.drain_grace, ms(25_000));
        assert_eq!(config.max_queue, 1024);
        assert_eq!(config.max_connections, 20_000);
        assert_eq!(config.front_idle_timeout, Some(ms(300_000)));
        assert_eq!(config.supervision, SupervisionConfig::default());
        assert_eq!(config.supervision.command, None);
        assert_eq!(config.supervision.timeout, Some(ms(30_000)));
        assert_eq!(config.supervision.boot_timeout, ms(60_000));
    }

    #[test]
    fn worker_command_is_split_like_a_shell_without_one() {
        let text = format!(
            "{LB_MIN}worker_command=/usr/bin/python3 -m app.worker --name 'my app' \\$HOME\n\
             worker_processes=3\nworker_timeout_ms=0\nworker_max_requests=50\n\
             worker_max_requests_jitter=5\nworker_boot_timeout_ms=2000\n"
        );
        let s = lb(&text).unwrap().supervision;
        assert_eq!(
            s.command.unwrap(),
            [
                "/usr/bin/python3",
                "-m",
                "app.worker",
                "--name",
                "my app",
                "$HOME"
            ]
        );
        assert_eq!(
            (
                s.processes,
                s.timeout,
                s.max_requests,
                s.max_requests_jitter
            ),
            (3, None, 50, 5)
        );
        assert_eq!(s.boot_timeout, ms(2000));
        for bad in ["'unbalanced", "trailing\\", "'' x"] {
            let err = lb(&format!("{LB_MIN}worker_command={bad}\n")).unwrap_err();
            assert_invalid(err, "worker_command");
        }
        for (key, bad) in [
            ("worker_processes", "0"),
            ("worker_timeout_ms", "-1"),
            ("worker_max_requests", "many"),
            ("worker_boot_timeout_ms", "0"),
        ] {
            assert_invalid(lb(&format!("{LB_MIN}{key}={bad}\n")).unwrap_err(), key);
        }
    }

    #[test]
    fn every_key_set() {
        let text = "\
zk = zk1:2181,zk2:2181/chroot
product = online
zk_session_timeout = 12
verbose = yes
max_frame_size = 1048576
heartbeat_interval_ms = 500
heartbeat_timeout_ms = 3000
log_keep_days = 7
log_format = JSON
status_interval_ms = 0
admin_address = 127.0.0.1:9100
socket_mode = 0o600
request_timeout_ms = 2000
drain_grace_ms = 0
max_connections = 10
proxy_address = 0.0.0.0:5550
max_inflight_per_connection = 2
max_pending_per_endpoint = 3
upstream_connections = 4
upstream_idle_timeout_ms = 60000
connect_timeout_ms = 250
client_idle_timeout_ms = 30000
startup_hold_ms = 0
outlier_consecutive_failures = 0
outlier_base_ejection_ms = 500
outlier_max_ejection_percent = 100
retry_budget_percent = 0
retry_min_per_sec = 3
service = echo
front_host = 10.0.0.5
front_port = 5551
ip_prefix = 10.
front_sock = /run/echo.sock
back_address = [::1]:6000
worker_pool_size = 8
max_queue = 99
front_idle_timeout_ms = 45000
";
        let (p, warnings) = ProxyConfig::parse(text).unwrap();
        assert!(warnings.is_empty());
        let c = &p.common;
        assert_eq!(c.zk, "zk1:2181,zk2:2181/chroot");
        assert_eq!(c.product, "online");
        assert_eq!(c.zk_session_timeout, Duration::from_secs(12));
        assert!(c.verbose);
        assert_eq!(c.max_frame_size, 1 << 20);
        assert_eq!(
            (c.heartbeat_interval, c.heartbeat_timeout),
            (ms(500), ms(3000))
        );
        assert_eq!(c.log_keep_days, 7);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.status_interval, None);
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(p.proxy_address, Address::Tcp("0.0.0.0:5550".into()));
        assert_eq!(p.admin_address.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(p.request_timeout, ms(2000));
        assert_eq!(p.drain_grace, Duration::ZERO);
        assert_eq!(p.max_connections, 10);
        assert_eq!(p.max_inflight_per_connection, 2);
        assert_eq!(p.max_pending_per_endpoint, 3);
        assert_eq!(p.upstream_connections, 4);
        assert_eq!(p.upstream_idle_timeout, ms(60_000));
        assert_eq!(p.connect_timeout, ms(250));
        assert_eq!(p.client_idle_timeout, Some(ms(30_000)));
        assert_eq!(p.startup_hold, Duration::ZERO);
        assert_eq!(
            p.resilience,
            ResilienceConfig {
                consecutive_failures: 0,
                base_ejection: ms(500),
                max_ejection_percent: 100,
                retry_budget_percent: 0,
                retry_min_per_sec: 3,
            }
        );

        let (l, warnings) = LbConfig::parse(text).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(l.common, p.common);
        assert_eq!(l.service, "echo");
        assert_eq!(l.front_host.as_deref(), Some("10.0.0.5"));
        assert_eq!(l.front_port, Some(5551));
        assert_eq!(l.ip_prefix.as_deref(), Some("10."));
        assert_eq!(l.front_sock.as_deref(), Some(Path::new("/run/echo.sock")));
        assert_eq!(l.back_address, Address::Tcp("[::1]:6000".into()));
        assert_eq!(l.admin_address.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(l.worker_pool_size, 8);
        assert_eq!(l.request_timeout, ms(2000));
        assert_eq!(l.drain_grace, Duration::ZERO);
        assert_eq!(l.max_queue, 99);
        assert_eq!(l.max_connections, 10);
        assert_eq!(l.front_idle_timeout, Some(ms(45_000)));
        let off = lb(&format!("{LB_MIN}front_idle_timeout_ms=0\n")).unwrap();
        assert_eq!(off.front_idle_timeout, None, "0 = never");
    }

    #[test]
    fn quoted_empty_values_take_defaults() {
        let text = format!(
            "{LB_MIN}front_host=\"\"\nfront_port=\"\"\nip_prefix=\"\"\nfront_sock=\"\"\nproduct=\"\"\n"
        );
        let config = lb(&text).unwrap();
        assert_eq!(config.front_host, None);
        assert_eq!(config.front_port, None);
        assert_eq!(config.ip_prefix, None);
        assert_eq!(config.front_sock, None);
        assert_eq!(config.common.product, "test");
    }

    #[test]
    fn relative_front_sock_is_made_absolute() {
        let config = lb(&format!("{LB_MIN}front_sock=lb.sock")).unwrap();
        let expected = std::env::current_dir().unwrap().join("lb.sock");
        assert_eq!(config.front_sock, Some(expected));
    }

    #[test]
    fn missing_required_keys() {
        let cases: [(&str, &str, &str); 5] = [
            ("proxy", "proxy_address=/tmp/p.sock", "zk"),
            ("proxy", "zk=h:1", "proxy_address"),
            ("lb", "service=echo\nback_address=/tmp/b.sock", "zk"),
            ("lb", "zk=h:1\nback_address=/tmp/b.sock", "service"),
            ("lb", "zk=h:1\nservice=echo", "back_address"),
        ];
        for (who, text, key) in cases {
            // Absent, empty and `""` are all missing.
            for extra in ["", "\nKEY=", "\nKEY=\"\""] {
                let text = format!("{text}{}", extra.replace("KEY", key));
                let err = if who == "proxy" {
                    proxy(&text).unwrap_err()
                } else {
                    lb(&text).unwrap_err()
                };
                assert!(
                    matches!(err, ConfigError::Missing { key: k } if k == key),
                    "{who} {text:?}: {err:?}"
                );
                assert_eq!(err.to_string(), format!("config key `{key}` is required"));
            }
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let proxy_cases: &[(&str, &str)] = &[
            ("zk", ","),
            ("zk", "h:1,,h:2"),
            ("product", "a/b"),
            ("zk_session_timeout", "0"),
            ("zk_session_timeout", "-3"),
            ("zk_session_timeout", "30s"),
            ("verbose", "2"),
            ("max_frame_size", "0"),
            ("max_frame_size", "-1"),
            ("max_frame_size", "1073741825"),
            ("write_timeout_ms", "0"),
            ("max_connection_buffer_bytes", "0"),
            ("max_process_buffer_bytes", "-1"),
            ("max_process_buffer_bytes", "2000000000000"),
            ("heartbeat_interval_ms", "0"),
            ("heartbeat_interval_ms", "fast"),
            ("heartbeat_timeout_ms", "0"),
            ("heartbeat_timeout_ms", "1000"),
            ("heartbeat_timeout_ms", "999"),
            ("log_keep_days", "0"),
            ("log_format", "xml"),
            ("status_interval_ms", "-1"),
            ("admin_address", "9100"),
            ("admin_address", "localhost:port"),
            ("proxy_admin_address", "9100"),
            ("proxy_admin_address", "/tmp/admin.sock"),
            ("socket_mode", "0888"),
            ("socket_mode", "01777"),
            ("socket_mode", "rw"),
            ("proxy_address", "host:99999"),
            ("proxy_address", "::1:9000"),
            ("request_timeout_ms", "0"),
            ("request_timeout_ms", "1.5"),
            ("drain_grace_ms", "-1"),
            ("max_connections", "0"),
            ("max_inflight_per_connection", "0"),
            ("max_pending_per_endpoint", "none"),
            ("upstream_connections", "0"),
            ("upstream_idle_timeout_ms", "0"),
            ("connect_timeout_ms", "0"),
            ("client_idle_timeout_ms", "soon"),
            ("startup_hold_ms", "-5"),
            ("outlier_consecutive_failures", "-1"),
            ("outlier_consecutive_failures", "five"),
            ("outlier_base_ejection_ms", "0"),
            ("outlier_max_ejection_percent", "101"),
            ("retry_budget_percent", "1001"),
            ("retry_budget_percent", "20%"),
            ("retry_min_per_sec", "-1"),
        ];
        for (key, bad) in proxy_cases {
            let text = format!("{PROXY_MIN}{key}={bad}\n");
            assert_invalid(proxy(&text).unwrap_err(), key);
        }
        let lb_cases: &[(&str, &str)] = &[
            ("service", "a:b"),
            ("service", "a/b"),
            ("front_port", "0"),
            ("front_port", "65536"),
            ("front_port", "x"),
            ("front_sock", &format!("/{}", "s".repeat(120))),
            ("back_address", "host:"),
            ("back_address", "[::1]:x"),
            ("worker_pool_size", "0"),
            ("request_timeout_ms", "-1"),
            ("drain_grace_ms", "x"),
            ("max_queue", "0"),
            ("max_connections", "-1"),
            ("verbose", "maybe"),
            ("front_idle_timeout_ms", "-1"),
            ("front_idle_timeout_ms", "5m"),
            ("admin_address", "host:x"),
            ("lb_admin_address", "9101"),
            ("lb_admin_address", "[::1:9101"),
        ];
        for (key, bad) in lb_cases {
            let text = format!("{LB_MIN}{key}={bad}\n");
            assert_invalid(lb(&text).unwrap_err(), key);
        }
    }

    #[test]
    fn each_binary_has_its_own_admin_address_defaulting_to_the_shared_one() {
        let shared = "admin_address=127.0.0.1:9100\n";
        let both = "proxy_admin_address=127.0.0.1:9101\nlb_admin_address=127.0.0.1:9102\n";
        let text = format!("{PROXY_MIN}{LB_MIN}{shared}{both}");
        let (p, warnings) = ProxyConfig::parse(&text).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let (l, warnings) = LbConfig::parse(&text).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.admin_address.as_deref(), Some("127.0.0.1:9101"));
        assert_eq!(l.admin_address.as_deref(), Some("127.0.0.1:9102"));
        // Only the LB's own key: the proxy keeps the shared one.
        let text = format!("{PROXY_MIN}{LB_MIN}{shared}lb_admin_address=127.0.0.1:9102\n");
        assert_eq!(
            proxy(&text).unwrap().admin_address.as_deref(),
            Some("127.0.0.1:9100")
        );
        assert_eq!(
            lb(&text).unwrap().admin_address.as_deref(),
            Some("127.0.0.1:9102")
        );
        // Own keys without the shared one; empty values are unset.
        let text = format!("{PROXY_MIN}{LB_MIN}admin_address=\nproxy_admin_address=[::1]:9101\n");
        assert_eq!(
            proxy(&text).unwrap().admin_address.as_deref(),
            Some("[::1]:9101")
        );
        assert_eq!(lb(&text).unwrap().admin_address, None);
        // A bad shared value is reported even where an own key overrides it; the other
        // binary's key is not checked.
        let text = format!("{PROXY_MIN}{LB_MIN}admin_address=9100\n{both}");
        assert_invalid(proxy(&text).unwrap_err(), "admin_address");
        assert_invalid(lb(&text).unwrap_err(), "admin_address");
        let text = format!("{PROXY_MIN}{LB_MIN}lb_admin_address=9102\n");
        assert_eq!(proxy(&text).unwrap().admin_address, None);
        assert_invalid(lb(&text).unwrap_err(), "lb_admin_address");
    }

    #[test]
    fn heartbeat_timeout_must_exceed_interval() {
        let text = format!("{PROXY_MIN}heartbeat_interval_ms=7000\n");
        let err = proxy(&text).unwrap_err();
        assert_invalid(err, "heartbeat_timeout_ms");
        let text = format!("{PROXY_MIN}heartbeat_interval_ms=7000\nheartbeat_timeout_ms=7001\n");
        assert_eq!(proxy(&text).unwrap().common.heartbeat_timeout, ms(7001));
    }

    #[test]
    fn values_may_hold_comment_characters() {
        let text = format!("{PROXY_MIN}# product=commented\n; product=also\nproduct=a#b;c=d\n");
        assert_eq!(proxy(&text).unwrap().common.product, "a#b;c=d");
    }

    #[test]
    fn duplicate_keys_last_wins() {
        let text = format!("{PROXY_MIN}max_connections=5\nmax_connections=6\n");
        assert_eq!(proxy(&text).unwrap().max_connections, 6);
    }

    #[test]
    fn section_headers_are_ignored() {
        let text = format!("[proxy]\n{PROXY_MIN}[lb]\nmax_connections=5\n");
        let (config, warnings) = ProxyConfig::parse(&text).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(config.max_connections, 5);
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = proxy(&format!("{PROXY_MIN}oops\n")).unwrap_err();
        assert!(
            matches!(err, ConfigError::Syntax { line: 3, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "config line 3: expected key=value, got \"oops\""
        );
    }

    #[test]
    fn unknown_keys_warn_and_legacy_keys_do_not() {
        let text = format!(
            "{PROXY_MIN}{LB_MIN}foo=1\nprofile=1\nfalcon_client=http://x:1/v1/push\nrpc_timeout=5\nstand_alone=0\n"
        );
        for warnings in [
            ProxyConfig::parse(&text).unwrap().1,
            LbConfig::parse(&text).unwrap().1,
        ] {
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert_eq!(warnings[0].key, "foo");
            assert!(
                warnings[0]
                    .message
                    .starts_with("unknown config key `foo` ignored")
            );
        }
    }

    #[test]
    fn keys_of_the_other_binary_do_not_warn() {
        let (_, warnings) =
            ProxyConfig::parse(&format!("{PROXY_MIN}max_queue=3\nfront_port=1\n")).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let (_, warnings) = LbConfig::parse(&format!("{LB_MIN}startup_hold_ms=3\n")).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn address_parse() {
        assert_eq!(
            Address::parse("k", "/tmp/x.sock").unwrap(),
            Address::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Address::parse("k", "rel.sock").unwrap(),
            Address::Unix("rel.sock".into())
        );
        assert_eq!(
            Address::parse("k", " 127.0.0.1:9000 ").unwrap(),
            Address::Tcp("127.0.0.1:9000".into())
        );
        assert_eq!(
            Address::parse("k", "lb.example:0").unwrap(),
            Address::Tcp("lb.example:0".into())
        );
        assert_eq!(
            Address::parse("k", "[::1]:9000").unwrap(),
            Address::Tcp("[::1]:9000".into())
        );
        for bad in [
            "",
            "  ",
            "host:",
            "host:65536",
            "host:-1",
            ":9000",
            "::1:9000",
            "[::1]",
            "[zz]:1",
        ] {
            assert_invalid(Address::parse("k", bad).unwrap_err(), "k");
        }
        assert_invalid(Address::parse("k", &"x".repeat(200)).unwrap_err(), "k");
        assert_eq!(
            Address::parse("k", "[::1]:9000").unwrap().to_string(),
            "[::1]:9000"
        );
        assert_eq!(
            Address::parse("k", "/a.sock").unwrap().to_string(),
            "/a.sock"
        );
    }

    #[test]
    fn from_file_missing_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.ini");
        let err = ProxyConfig::from_file(&path).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Read { path: p, .. } if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("nope.ini"));
        assert!(matches!(
            LbConfig::from_file(&path).unwrap_err(),
            ConfigError::Read { .. }
        ));
    }

    #[test]
    fn from_file_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.ini");
        std::fs::write(&path, format!("{PROXY_MIN}{LB_MIN}bogus=1\n")).unwrap();
        let (config, warnings) = ProxyConfig::from_file(&path).unwrap();
        assert_eq!(
            config.proxy_address,
            Address::Unix("/tmp/proxy.sock".into())
        );
        assert_eq!(warnings.len(), 1);
        let (config, _) = LbConfig::from_file(&path).unwrap();
        assert_eq!(config.service, "echo");
    }

    // === config.ini.example ===

    /// The key of a `key=value` line, or of a commented-out `# key=value` line.
    fn mentioned_key(line: &str) -> Option<&str> {
        let line = line.trim();
        let body = line
            .strip_prefix('#')
            .or_else(|| line.strip_prefix(';'))
            .unwrap_or(line)
            .trim_start();
        let (key, _) = body.split_once('=')?;
        let key = key.trim_end();
        let is_ident = key.starts_with(|c: char| c.is_ascii_lowercase())
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        is_ident.then_some(key)
    }

    #[test]
    fn example_parses_for_both_binaries_without_warnings() {
        let (p, warnings) = ProxyConfig::parse(EXAMPLE).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(p.common.zk, "127.0.0.1:2181");
        assert_eq!(p.common.product, "test");
        assert_eq!(
            p.proxy_address,
            Address::Unix("/usr/local/rpc_proxy/proxy.sock".into())
        );
        let (l, warnings) = LbConfig::parse(EXAMPLE).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(l.service, "echo");
        assert_eq!(l.front_host.as_deref(), Some("127.0.0.1"));
        assert_eq!(l.front_port, Some(5550));
        assert_eq!(
            l.back_address,
            Address::Unix("/usr/local/rpc_proxy/echo_back.sock".into())
        );
    }

    #[test]
    fn example_mentions_exactly_the_known_keys_each_once_with_a_comment() {
        let lines: Vec<&str> = EXAMPLE.lines().collect();
        let mut mentioned = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if let Some(key) = mentioned_key(line) {
                assert!(
                    KNOWN_KEYS.contains(&key),
                    "example line {}: unknown key `{key}`",
                    i + 1
                );
                let previous = i.checked_sub(1).map(|j| lines[j].trim());
                assert!(
                    previous.is_some_and(|p| p.starts_with('#') && mentioned_key(p).is_none()),
                    "example line {}: `{key}` has no comment line explaining it",
                    i + 1
                );
                mentioned.push(key);
            }
        }
        let unique: BTreeSet<&str> = mentioned.iter().copied().collect();
        assert_eq!(
            unique.len(),
            mentioned.len(),
            "a key appears twice in the example"
        );
        let known: BTreeSet<&str> = KNOWN_KEYS.iter().copied().collect();
        let missing: Vec<_> = known.difference(&unique).collect();
        assert!(
            missing.is_empty(),
            "keys not documented in config.ini.example: {missing:?}"
        );
    }

    #[test]
    fn example_shows_the_true_defaults() {
        // Uncommenting every `# key=default` line must change nothing (drain_grace_ms shows
        // the proxy's default; the LB's differs and is checked apart).
        let uncommented: String = EXAMPLE
            .lines()
            .map(
                |line| match (line.strip_prefix("# "), mentioned_key(line)) {
                    (Some(rest), Some(_)) => rest,
                    _ => line,
                },
            )
            .collect::<Vec<_>>()
            .join("\n");
        assert_ne!(uncommented, EXAMPLE);
        assert_eq!(proxy(&uncommented).unwrap(), proxy(EXAMPLE).unwrap());
        let mut from_uncommented = lb(&uncommented).unwrap();
        assert_eq!(
            from_uncommented.drain_grace,
            ms(DEFAULT_PROXY_DRAIN_GRACE_MS)
        );
        from_uncommented.drain_grace = ms(DEFAULT_LB_DRAIN_GRACE_MS);
        assert_eq!(from_uncommented, lb(EXAMPLE).unwrap());
    }

    #[test]
    fn every_known_key_is_read_by_some_binary() {
        let values = Values::parse(EXAMPLE).unwrap();
        ProxyConfig::from_values(&values).unwrap();
        LbConfig::from_values(&values).unwrap();
        let known: BTreeSet<&str> = KNOWN_KEYS.iter().copied().collect();
        assert_eq!(values.read_keys(), known);
    }

    #[test]
    fn zk_auth_from_value_or_file_and_never_echoed() {
        let (c, _) = ProxyConfig::parse(&format!("{PROXY_MIN}zk_auth=lb:s3cr#t\n")).unwrap();
        assert_eq!(c.common.zk_auth.as_deref(), Some("lb:s3cr#t"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth");
        std::fs::write(&file, "\n  ops:pw  \n").unwrap();
        let text = format!("{PROXY_MIN}zk_auth_file={}\n", file.display());
        let (c, _) = ProxyConfig::parse(&text).unwrap();
        assert_eq!(c.common.zk_auth.as_deref(), Some("ops:pw"));
        let err = ProxyConfig::parse(&format!("{PROXY_MIN}zk_auth=nopassword\n")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("zk_auth") && !message.contains("nopassword"),
            "{message}"
        );
        let missing = format!("{PROXY_MIN}zk_auth_file=/nonexistent/auth\n");
        assert!(
            ProxyConfig::parse(&missing)
                .unwrap_err()
                .to_string()
                .contains("zk_auth_file")
        );
    }
}
