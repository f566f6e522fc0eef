//! Typed lookups over the raw [`Values`]: integers, durations, switches, octal modes and
//! addresses. Each returns the default when the key is unset and a [`ConfigError::Invalid`]
//! naming the key when the value cannot be used.

use std::path::PathBuf;
use std::time::Duration;

use crate::parse::Values;
use crate::{Address, ConfigError, LogFormat};

/// Longest duration accepted, in milliseconds: `i32::MAX`, about 24.8 days. ZooKeeper carries
/// its session timeout as an `i32` of milliseconds, and a bound keeps `Instant + timeout` far
/// from overflowing anywhere a binary uses a timeout.
pub(crate) const MAX_MILLIS: u64 = i32::MAX as u64;

/// Largest count accepted (`max_connections` and friends): fits a tokio `Semaphore` on every
/// platform (its limit is `usize::MAX >> 3`, 2^29 - 1 on 32-bit targets).
pub(crate) const MAX_COUNT: usize = (1 << 29) - 1;

/// Largest `max_frame_size` accepted: 1 GiB.
pub(crate) const MAX_FRAME_SIZE_LIMIT: usize = 1 << 30;

/// Largest byte budget accepted (1 TiB): more is a typo, not a budget.
pub(crate) const MAX_BUFFER_BYTES: u64 = 1 << 40;

/// Longest unix socket path in bytes: Linux's `sun_path` is 108 bytes including the NUL.
pub(crate) const MAX_UNIX_PATH: usize = 107;

/// A [`ConfigError::Invalid`] for `key`.
pub(crate) fn invalid(key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a non-negative decimal integer no larger than `max`.
fn unsigned(key: &str, text: &str, max: u64) -> Result<u64, ConfigError> {
    if text.starts_with('-') {
        return Err(invalid(key, text, "must not be negative"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(key, text, "expected a whole decimal number"));
    }
    match text.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(invalid(key, text, format!("must be at most {max}"))),
    }
}

// === impl Values (typed lookups) ===

impl Values {
    /// A required text value.
    ///
    /// # Errors
    /// [`ConfigError::Missing`] when absent or empty.
    pub(crate) fn required(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key).ok_or(ConfigError::Missing { key })
    }

    /// An optional text value.
    pub(crate) fn text(&self, key: &'static str) -> Option<String> {
        self.get(key).map(str::to_owned)
    }

    /// A whole number in `0..=max` (`outlier_consecutive_failures`, percentages, ...).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a negative or non-numeric value, or more than `max`.
    pub(crate) fn number(
        &self,
        key: &'static str,
        default: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(default);
        };
        // `max` is a u32, so the value fits.
        Ok(unsigned(key, text, u64::from(max))? as u32)
    }

    /// A count, at least 1 (`max_connections`, `worker_pool_size`, ...).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for anything but a whole number in `1..=`[`MAX_COUNT`].
    pub(crate) fn count(&self, key: &'static str, default: usize) -> Result<usize, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(default);
        };
        // MAX_COUNT < 2^29, so the value fits usize on every target.
        let n = unsigned(key, text, MAX_COUNT as u64)? as usize;
        if n == 0 {
            return Err(invalid(key, text, "must be at least 1"));
        }
        Ok(n)
    }

    /// `max_frame_size`: bytes, `1..=`[`MAX_FRAME_SIZE_LIMIT`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for zero, a negative number or more than 1 GiB.
    pub(crate) fn frame_size(
        &self,
        key: &'static str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        self.byte_count(key, default, MAX_FRAME_SIZE_LIMIT as u64)
    }

    /// A byte budget (`max_connection_buffer_bytes`, ...): `1..=`[`MAX_BUFFER_BYTES`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for zero, a negative or non-numeric value, or more than 1 TiB.
    pub(crate) fn buffer_bytes(
        &self,
        key: &'static str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        self.byte_count(key, default, MAX_BUFFER_BYTES)
    }

    /// A number of bytes in `1..=max`.
    fn byte_count(
        &self,
        key: &'static str,
        default: usize,
        max: u64,
    ) -> Result<usize, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(default);
        };
        let n = unsigned(key, text, max)?;
        if n == 0 {
            return Err(invalid(key, text, "must be at least 1 (bytes)"));
        }
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// A `*_ms` duration in milliseconds. `allow_zero` says whether `0` is meaningful.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a negative or non-numeric value, more than
    /// [`MAX_MILLIS`], or `0` when not allowed.
    pub(crate) fn millis(
        &self,
        key: &'static str,
        default_ms: u64,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(Duration::from_millis(default_ms));
        };
        let n = unsigned(key, text, MAX_MILLIS)?;
        if n == 0 && !allow_zero {
            return Err(invalid(key, text, "must be at least 1 (milliseconds)"));
        }
        Ok(Duration::from_millis(n))
    }

    /// A `*_ms` duration where `0` means off.
    ///
    /// # Errors
    /// As [`Values::millis`].
    pub(crate) fn optional_millis(
        &self,
        key: &'static str,
        default_ms: u64,
    ) -> Result<Option<Duration>, ConfigError> {
        let duration = self.millis(key, default_ms, true)?;
        Ok((!duration.is_zero()).then_some(duration))
    }

    /// A duration in whole seconds, at least 1 (`zk_session_timeout`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for zero, a negative or non-numeric value, or more than
    /// [`MAX_MILLIS`] milliseconds.
    pub(crate) fn seconds(
        &self,
        key: &'static str,
        default_s: u64,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(Duration::from_secs(default_s));
        };
        let n = unsigned(key, text, MAX_MILLIS / 1000)?;
        if n == 0 {
            return Err(invalid(key, text, "must be at least 1 (seconds)"));
        }
        Ok(Duration::from_secs(n))
    }

    /// A switch: `0`/`1`, `true`/`false`, `yes`/`no`, `on`/`off` (any case).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for anything else.
    pub(crate) fn switch(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(default);
        };
        match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(invalid(
                key,
                text,
                "expected 0, 1, true, false, yes, no, on or off",
            )),
        }
    }

    /// File permissions in octal: `0660`, `660` or `0o660`, at most `0777`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for non-octal text or bits beyond `0777`.
    pub(crate) fn octal_mode(&self, key: &'static str, default: u32) -> Result<u32, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(default);
        };
        let digits = text
            .strip_prefix("0o")
            .or_else(|| text.strip_prefix("0O"))
            .unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(invalid(
                key,
                text,
                "expected octal permissions such as 0660",
            ));
        }
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if mode <= 0o777 => Ok(mode),
            _ => Err(invalid(key, text, "must be at most 0777")),
        }
    }

    /// `log_format`: `text` or `json` (any case).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for anything else.
    pub(crate) fn log_format(&self, key: &'static str) -> Result<LogFormat, ConfigError> {
        match self.get(key) {
            None => Ok(LogFormat::default()),
            Some(text) if text.eq_ignore_ascii_case("text") => Ok(LogFormat::Text),
            Some(text) if text.eq_ignore_ascii_case("json") => Ok(LogFormat::Json),
            Some(text) => Err(invalid(key, text, "expected text or json")),
        }
    }

    /// A TCP port, `1..=65535`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for anything else.
    pub(crate) fn port(&self, key: &'static str) -> Result<Option<u16>, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(None);
        };
        match unsigned(key, text, u64::from(u16::MAX)) {
            Ok(0) | Err(_) => Err(invalid(key, text, "expected a port number from 1 to 65535")),
            // Bounded by u16::MAX just above.
            Ok(n) => Ok(Some(n as u16)),
        }
    }

    /// A required [`Address`].
    ///
    /// # Errors
    /// [`ConfigError::Missing`] when unset, else as [`Address::parse`].
    pub(crate) fn address(&self, key: &'static str) -> Result<Address, ConfigError> {
        Address::parse(key, self.required(key)?)
    }

    /// An optional TCP `host:port` (`admin_address`), kept as written.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the value is not `host:port`.
    pub(crate) fn host_port(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(None);
        };
        if !text.contains(':') {
            return Err(invalid(key, text, "expected host:port"));
        }
        check_host_port(key, text)?;
        Ok(Some(text.to_owned()))
    }

    /// An optional unix socket path, made absolute against the current directory.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the path is too long for a socket or the current
    /// directory cannot be read.
    pub(crate) fn absolute_path(&self, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(text) = self.get(key) else {
            return Ok(None);
        };
        let path = std::path::absolute(text)
            .map_err(|e| invalid(key, text, format!("cannot make the path absolute: {e}")))?;
        check_unix_path(key, text, &path)?;
        Ok(Some(path))
    }
}

/// Checks a name used as one ZooKeeper path element (`product`, `service`).
///
/// # Errors
/// [`ConfigError::Invalid`] for `/`, whitespace, `.` or `..`, or any character in `forbidden`.
pub(crate) fn check_name(key: &str, text: &str, forbidden: &[char]) -> Result<(), ConfigError> {
    if text == "." || text == ".." {
        return Err(invalid(
            key,
            text,
            "`.` and `..` are not valid ZooKeeper node names",
        ));
    }
    if let Some(c) = text
        .chars()
        .find(|c| *c == '/' || c.is_whitespace() || c.is_control() || forbidden.contains(c))
    {
        return Err(invalid(key, text, format!("must not contain {c:?}")));
    }
    Ok(())
}

/// Checks `text` as TCP `host:port`: the port after the last `:` is a `u16`, the host is not
/// empty, and an IPv6 host is in brackets.
pub(crate) fn check_host_port(key: &str, text: &str) -> Result<(), ConfigError> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(invalid(key, text, "expected host:port"));
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err()
    {
        return Err(invalid(
            key,
            text,
            "the port after the last `:` must be a number from 0 to 65535",
        ));
    }
    if host.is_empty() {
        return Err(invalid(key, text, "the host before the port is empty"));
    }
    if let Some(inner) = host.strip_prefix('[') {
        let valid = inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        if !valid {
            return Err(invalid(
                key,
                text,
                "expected an IPv6 address in brackets, such as [::1]:9000",
            ));
        }
    } else if host.contains(':') {
        return Err(invalid(
            key,
            text,
            "an IPv6 host must be in brackets, such as [::1]:9000",
        ));
    } else if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '[' || *c == ']')
    {
        return Err(invalid(
            key,
            text,
            format!("the host must not contain {c:?}"),
        ));
    }
    Ok(())
}

/// Checks that `path` fits a unix socket address.
pub(crate) fn check_unix_path(
    key: &str,
    text: &str,
    path: &std::path::Path,
) -> Result<(), ConfigError> {
    let len = path.as_os_str().len();
    if len > MAX_UNIX_PATH {
        return Err(invalid(
            key,
            text,
            format!(
                "a unix socket path may have at most {MAX_UNIX_PATH} bytes, this one has {len}"
            ),
        ));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(invalid(
            key,
            text,
            "a unix socket path must not contain a NUL byte",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str) -> Values {
        Values::parse(text).unwrap()
    }

    /// Asserts `err` is `Invalid` for `key`, and its message is one line naming the key.
    #[track_caller]
    fn assert_invalid(err: ConfigError, key: &str) {
        let message = err.to_string();
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if k == key),
            "{err:?}"
        );
        assert!(message.contains(&format!("`{key}`")), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn counts() {
        assert_eq!(values("").count("max_queue", 7).unwrap(), 7);
        assert_eq!(values("max_queue=12").count("max_queue", 7).unwrap(), 12);
        for bad in [
            "0",
            "-1",
            "abc",
            "1.5",
            "1e3",
            "99999999999999999999999",
            "+3",
        ] {
            assert_invalid(
                values(&format!("max_queue={bad}"))
                    .count("max_queue", 7)
                    .unwrap_err(),
                "max_queue",
            );
        }
    }

    #[test]
    fn millis() {
        let v = values("request_timeout_ms=250\nstartup_hold_ms=0\nstatus_interval_ms=0");
        assert_eq!(
            v.millis("request_timeout_ms", 1, false).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            v.millis("startup_hold_ms", 1, true).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            v.millis("connect_timeout_ms", 9, false).unwrap(),
            Duration::from_millis(9)
        );
        assert_eq!(v.optional_millis("status_interval_ms", 5).unwrap(), None);
        assert_eq!(
            v.optional_millis("client_idle_timeout_ms", 5).unwrap(),
            Some(Duration::from_millis(5))
        );
        for bad in ["0", "-5", "1s", "2147483648"] {
            let v = values(&format!("connect_timeout_ms={bad}"));
            assert_invalid(
                v.millis("connect_timeout_ms", 1, false).unwrap_err(),
                "connect_timeout_ms",
            );
        }
    }

    #[test]
    fn seconds() {
        assert_eq!(
            values("zk_session_timeout=5")
                .seconds("zk_session_timeout", 30)
                .unwrap(),
            Duration::from_secs(5)
        );
        for bad in ["0", "-1", "1.5", "abc", "2147484"] {
            let v = values(&format!("zk_session_timeout={bad}"));
            assert_invalid(
                v.seconds("zk_session_timeout", 30).unwrap_err(),
                "zk_session_timeout",
            );
        }
    }

    #[test]
    fn switches() {
        for (text, want) in [
            ("1", true),
            ("TRUE", true),
            ("yes", true),
            ("On", true),
            ("0", false),
            ("false", false),
            ("No", false),
            ("off", false),
        ] {
            assert_eq!(
                values(&format!("verbose={text}"))
                    .switch("verbose", !want)
                    .unwrap(),
                want,
                "{text}"
            );
        }
        assert_invalid(
            values("verbose=2").switch("verbose", false).unwrap_err(),
            "verbose",
        );
    }

    #[test]
    fn octal_modes() {
        for (text, want) in [
            ("0660", 0o660),
            ("660", 0o660),
            ("0o600", 0o600),
            ("0O777", 0o777),
            ("0", 0),
            ("00777", 0o777),
        ] {
            assert_eq!(
                values(&format!("socket_mode={text}"))
                    .octal_mode("socket_mode", 1)
                    .unwrap(),
                want,
                "{text}"
            );
        }
        for bad in [
            "0o",
            "0x1ff",
            "0888",
            "1777",
            "rw-rw----",
            "-660",
            "999999999999999",
        ] {
            assert_invalid(
                values(&format!("socket_mode={bad}"))
                    .octal_mode("socket_mode", 1)
                    .unwrap_err(),
                "socket_mode",
            );
        }
    }

    #[test]
    fn ports() {
        assert_eq!(
            values("front_port=5550").port("front_port").unwrap(),
            Some(5550)
        );
        assert_eq!(
            values("front_port=65535").port("front_port").unwrap(),
            Some(65535)
        );
        assert_eq!(values("front_port=").port("front_port").unwrap(), None);
        for bad in ["0", "65536", "-1", "http"] {
            assert_invalid(
                values(&format!("front_port={bad}"))
                    .port("front_port")
                    .unwrap_err(),
                "front_port",
            );
        }
    }

    #[test]
    fn host_ports() {
        for good in [
            "127.0.0.1:9100",
            "localhost:0",
            "[::1]:9100",
            "admin.example:80",
        ] {
            assert_eq!(
                values(&format!("admin_address={good}"))
                    .host_port("admin_address")
                    .unwrap()
                    .as_deref(),
                Some(good)
            );
        }
        for bad in [
            "9100",
            "/tmp/admin.sock",
            ":9100",
            "host:",
            "host:x",
            "host:70000",
            "::1:9100",
            "[::1:9100",
            "[nope]:1",
            "a b:1",
        ] {
            assert_invalid(
                values(&format!("admin_address={bad}"))
                    .host_port("admin_address")
                    .unwrap_err(),
                "admin_address",
            );
        }
    }

    #[test]
    fn absolute_paths() {
        let v = values("front_sock=rel/lb.sock");
        let path = v.absolute_path("front_sock").unwrap().unwrap();
        assert!(path.is_absolute());
        assert!(path.ends_with("rel/lb.sock"));
        assert_eq!(
            values("front_sock=/run/lb.sock")
                .absolute_path("front_sock")
                .unwrap(),
            Some(PathBuf::from("/run/lb.sock"))
        );
        let long = format!("front_sock=/{}", "x".repeat(200));
        assert_invalid(
            values(&long).absolute_path("front_sock").unwrap_err(),
            "front_sock",
        );
    }

    #[test]
    fn names() {
        check_name("service", "echo-2.v1", &[':']).unwrap();
        for bad in ["a/b", "a:b", "a b", ".", ".."] {
            assert_invalid(check_name("service", bad, &[':']).unwrap_err(), "service");
        }
    }
}
