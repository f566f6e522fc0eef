//! Starting the systems under test as real processes with generated configs, each on its own
//! unix socket in the run's work directory: the echo backend and the minimal forwarder (this
//! binary's hidden subcommands), haproxy, `rpc_proxy`, `rpc_lb`, and the Python servers of
//! `bench/python/py_servers.py`. Readiness is always a real call answered.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::load;
use crate::procs::Proc;

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `rpc_proxy`.
    pub proxy: PathBuf,
    /// `rpc_lb`.
    pub lb: PathBuf,
    /// A previous build of `rpc_proxy`, run beside the current one (`--baseline-bin-dir`).
    pub baseline_proxy: Option<PathBuf>,
    /// This binary (echo backend and forwarder).
    pub me: PathBuf,
    /// Python interpreter.
    pub python: String,
    /// The repository root (IDL, Python scripts).
    pub repo: PathBuf,
}

// === impl Bins ===

impl Bins {
    /// `bench/python/py_servers.py`.
    pub fn py_servers(&self) -> PathBuf {
        self.repo.join("bench/python/py_servers.py")
    }

    /// `idl/echo.thrift`.
    pub fn idl(&self) -> PathBuf {
        self.repo.join("idl/echo.thrift")
    }
}

/// Longest wait for a system to answer its first call.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls `socket` until an `echo` call named `name` gets a REPLY. Fails early (with the
/// process output) if `proc` exits.
///
/// # Errors
/// When no reply comes within `timeout`, or the process died.
pub async fn wait_ready(
    proc: &mut Proc,
    socket: &Path,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        proc.check_alive()?;
        match load::call_once(socket, name, 16, Duration::from_secs(2)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(failure)) => last = failure,
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "{} not ready within {timeout:?} on {} (last: {last})\n--- output ---\n{}",
        proc.name(),
        socket.display(),
        proc.tail()
    )
}

/// Starts the echo backend on `socket` with `threads` runtime threads.
///
/// # Errors
/// When it cannot be started.
pub fn echo(bins: &Bins, name: &str, socket: &Path, threads: usize) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(&bins.me);
    cmd.arg("echo-server")
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--unix")
        .arg(socket);
    Proc::spawn(name, cmd, &[])
}

/// Starts the minimal frame forwarder from `listen` to `upstream`.
///
/// # Errors
/// When it cannot be started.
pub fn forwarder(bins: &Bins, listen: &Path, upstream: &Path) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(&bins.me);
    cmd.arg("forwarder")
        .arg("--listen")
        .arg(listen)
        .arg("--upstream")
        .arg(upstream);
    Proc::spawn("forwarder", cmd, &[])
}

/// Whether haproxy can be run; the reason when not.
pub fn haproxy_available() -> Result<(), String> {
    match Command::new("haproxy").arg("-v").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("haproxy -v failed: {}", out.status)),
        Err(e) => Err(format!(
            "haproxy not found ({e}); install it with `apt-get install haproxy`"
        )),
    }
}

/// Starts haproxy in the foreground (`-db`) in `mode tcp` from `listen` to `upstream`, with
/// a config written to `dir`.
///
/// # Errors
/// When it cannot be started.
pub fn haproxy(dir: &Path, name: &str, listen: &Path, upstream: &Path) -> anyhow::Result<Proc> {
    let cfg = dir.join(format!("{name}.cfg"));
    let _ = std::fs::remove_file(listen);
    // haproxy wants two descriptors per connection and refuses to start when the limit is
    // lower than that; it inherits ours.
    let maxconn = (crate::procs::nofile().saturating_sub(100) / 2).clamp(100, 40_000);
    let text = format!(
        "global\n    maxconn {maxconn}\n    nbthread 2\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\n\n\
         frontend bench_in\n    bind unix@{listen}\n    default_backend bench_echo\n\n\
         backend bench_echo\n    server echo unix@{upstream}\n",
        listen = listen.display(),
        upstream = upstream.display(),
    );
    std::fs::write(&cfg, text).context("write haproxy config")?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    Proc::spawn(name, cmd, &[])
}

/// A config.ini for `rpc_proxy`.
pub fn proxy_config(zk: &str, product: &str, socket: &Path, extra: &[(&str, &str)]) -> String {
    let mut text = format!(
        "zk={zk}\nproduct={product}\nproxy_address={}\nstatus_interval_ms=0\n",
        socket.display()
    );
    for (key, value) in extra {
        let _ = writeln!(text, "{key}={value}");
    }
    text
}

/// Starts `rpc_proxy` with `config` (written to `dir/<name>.ini`).
///
/// # Errors
/// When it cannot be started.
pub fn proxy(bins: &Bins, dir: &Path, name: &str, config: &str) -> anyhow::Result<Proc> {
    proxy_program(&bins.proxy, dir, name, config)
}

/// Starts the `rpc_proxy` binary `program` with `config` (written to `dir/<name>.ini`).
///
/// # Errors
/// When it cannot be started.
pub fn proxy_program(program: &Path, dir: &Path, name: &str, config: &str) -> anyhow::Result<Proc> {
    let ini = dir.join(format!("{name}.ini"));
    std::fs::write(&ini, config).context("write proxy config")?;
    let mut cmd = Command::new(program);
    cmd.arg("-c").arg(&ini);
    Proc::spawn(name, cmd, &["routing table complete"])
}

/// Starts `rpc_lb` for `service` with its front on `front` and its back on `back`.
///
/// # Errors
/// When it cannot be started.
pub fn lb(
    bins: &Bins,
    dir: &Path,
    zk: &str,
    product: &str,
    service: &str,
    front: &Path,
    back: &Path,
) -> anyhow::Result<Proc> {
    let ini = dir.join("lb.ini");
    let text = format!(
        "zk={zk}\nproduct={product}\nservice={service}\nfront_sock={}\nback_address={}\n\
         worker_pool_size=1\nstatus_interval_ms=0\n",
        front.display(),
        back.display()
    );
    std::fs::write(&ini, text).context("write lb config")?;
    let mut cmd = Command::new(&bins.lb);
    cmd.arg("-c").arg(&ini).arg("--work-dir").arg(dir);
    Proc::spawn("rpc_lb", cmd, &[])
}

/// A Python server of `py_servers.py` (`mode`: threaded, processpool, thriftpy2, worker).
///
/// # Errors
/// When it cannot be started.
pub fn python(
    bins: &Bins,
    name: &str,
    mode: &str,
    socket: &Path,
    gen_dir: &Path,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(&bins.python);
    cmd.arg(bins.py_servers())
        .arg(mode)
        .arg("--unix")
        .arg(socket)
        .arg("--gen-dir")
        .arg(gen_dir)
        .arg("--idl")
        .arg(bins.idl())
        .args(extra)
        .env("PYTHONUNBUFFERED", "1");
    Proc::spawn(name, cmd, &[])
}

/// Whether the Python modules a mode needs import; the reason when not.
pub fn python_has(bins: &Bins, modules: &str) -> Result<(), String> {
    match Command::new(&bins.python)
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "python cannot import {modules}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("cannot run {}: {e}", bins.python)),
    }
}

/// Generates the Python code of `idl/echo.thrift` into `out` (`thrift --gen py`).
///
/// # Errors
/// When the thrift compiler fails.
pub fn gen_python(bins: &Bins, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let status = Command::new("thrift")
        .args(["--gen", "py", "-out"])
        .arg(out)
        .arg(bins.idl())
        .status()
        .context("run thrift (apt-get install thrift-compiler)")?;
    if !status.success() {
        bail!("thrift --gen py failed: {status}");
    }
    Ok(())
}
