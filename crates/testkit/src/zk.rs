//! A throwaway standalone ZooKeeper for integration tests (recipe: shared `env.md` §2).
//!
//! Each [`ZkServer`] owns a temporary directory (config, data, log) and one `java` child
//! process listening on `127.0.0.1` only. Tests can stop it (SIGKILL: like a crash) and
//! restart it on the same port and data directory, which is how session loss and expiry
//! are exercised. Dropping the server kills the process and removes the directory.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the ZooKeeper jar to run instead of the default.
pub const ZK_JAR_ENV: &str = "RPC_TEST_ZK_JAR";

/// Debian's `zookeeper` package: its manifest `Class-Path` lists every dependency.
const DEFAULT_JAR: &str = "/usr/share/java/zookeeper.jar";

/// Optional logging backend jars (without them SLF4J falls back to NOP and logs nothing).
const LOG_JARS: [&str; 2] = [
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
];

/// The default tick: short, so short session timeouts are accepted and expire quickly.
const DEFAULT_TICK_MS: u64 = 200;

/// Upper bound of one start (JVM start plus snapshot load: about 2 s on a quiet box).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many fresh ports [`ZkServer::start`] tries when the picked port was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// A running (or stopped) throwaway ZooKeeper server.
#[derive(Debug)]
pub struct ZkServer {
    /// Holds `zoo.cfg`, `log4j.properties`, `zk.log` and `data/`; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    tick_ms: u64,
    /// `None` while stopped.
    child: Option<Child>,
}

// === impl ZkServer ===

impl ZkServer {
    /// Starts a server with a 200 ms tick (sessions of 400 ms up to 60 s are accepted).
    ///
    /// # Panics
    /// When the server is not ready within 30 s; the message carries the server log.
    pub fn start() -> ZkServer {
        Self::start_with_tick(DEFAULT_TICK_MS)
    }

    /// Starts a server with `tickTime = tick_ms`. `minSessionTimeout` is `2 * tick_ms` and
    /// `maxSessionTimeout` is 60 s, so tests choose their session timeout freely.
    ///
    /// # Panics
    /// When the server is not ready within 30 s; the message carries the server log.
    pub fn start_with_tick(tick_ms: u64) -> ZkServer {
        let dir = tempfile::Builder::new()
            .prefix("rpc-testkit-zk-")
            .tempdir()
            .expect("create zookeeper temp dir");
        fs::create_dir(dir.path().join("data")).expect("create zookeeper data dir");
        let mut server = ZkServer {
            dir,
            port: 0,
            tick_ms,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            server.write_config();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                // The port was free when picked but another process took it meanwhile.
                Err(_)
                    if attempt < START_ATTEMPTS
                        && server.log().contains("Address already in use") =>
                {
                    continue;
                }
                Err(why) => server.fail(&why),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `127.0.0.1:PORT`, for a client's connect string.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The configured tick.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// The process id of the running server (`None` while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The data directory (kept across [`ZkServer::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. Sessions are not
    /// closed, so ephemeral nodes survive until their session expires after a restart.
    /// Does nothing when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only when the process already exited, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if running, then starts it again on the same port and data dir.
    ///
    /// # Panics
    /// When the server is not ready within 30 s; the message carries the server log.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn_and_wait() {
            self.fail(&why);
        }
    }

    /// The server log so far (all starts append to it).
    pub fn log(&self) -> String {
        fs::read_to_string(self.path("zk.log")).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_config(&self) {
        let data = self.data_dir();
        let cfg = format!(
            "tickTime={tick}\n\
             dataDir={data}\n\
             clientPort={port}\n\
             clientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n\
             4lw.commands.whitelist=ruok,srvr,stat,mntr,cons\n\
             maxClientCnxns=0\n\
             minSessionTimeout={min}\n\
             maxSessionTimeout=60000\n\
             forceSync=no\n\
             preAllocSize=1024\n",
            tick = self.tick_ms,
            data = data.display(),
            port = self.port,
            min = 2 * self.tick_ms,
        );
        fs::write(self.path("zoo.cfg"), cfg).expect("write zoo.cfg");
        let log4j = "log4j.rootLogger=INFO, CONSOLE\n\
                     log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n\
                     log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n\
                     log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c{1} - %m%n\n";
        fs::write(self.path("log4j.properties"), log4j).expect("write log4j.properties");
    }

    fn classpath() -> String {
        let jar = std::env::var(ZK_JAR_ENV).unwrap_or_else(|_| DEFAULT_JAR.to_owned());
        let mut classpath = jar;
        for extra in LOG_JARS.iter().filter(|jar| Path::new(jar).exists()) {
            classpath.push(':');
            classpath.push_str(extra);
        }
        classpath
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("zk.log"))
            .map_err(|e| format!("open zk.log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("clone zk.log handle: {e}"))?;
        let child = Command::new("java")
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                self.path("log4j.properties").display()
            ))
            .arg("-cp")
            .arg(Self::classpath())
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.path("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawn java: {e}"))?;
        self.child = Some(child);
        let result = self.wait_ready();
        if result.is_err() {
            self.stop();
        }
        result
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("zookeeper exited during start: {status}"));
            }
            if serving(self.port) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!("zookeeper not ready within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "{why} (port {}, dir {})\n--- zk.log ---\n{}",
            self.port,
            self.dir.path().display(),
            self.log()
        )
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the server serves clients. `ruok` alone is not enough: ZooKeeper 3.8.0 answers
/// `imok` while its database is still loading, and closes client sessions meanwhile ("ZooKeeperServer
/// not running"). `srvr` reports a `Mode:` only once the server runs.
fn serving(port: u16) -> bool {
    four_letter_word(port, b"ruok").is_some_and(|reply| reply == "imok")
        && four_letter_word(port, b"srvr").is_some_and(|reply| reply.contains("Mode: "))
}

/// Sends a four-letter word and reads the reply up to EOF. Every step is bounded: during
/// start ZooKeeper 3.8.0 can accept the probe, hit an NPE ("zkDb is null") and never close
/// the socket.
fn four_letter_word(port: u16, word: &[u8; 4]) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let timeout = Some(Duration::from_secs(1));
    stream.set_read_timeout(timeout).ok()?;
    stream.set_write_timeout(timeout).ok()?;
    stream.write_all(word).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    Some(reply)
}

/// A port that was free a moment ago (the kernel's pick for an ephemeral bind).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0 to pick a free port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_and_restarts_on_the_same_port() {
        let mut zk = ZkServer::start();
        let port = zk.port();
        assert!(serving(port));
        assert_eq!(zk.connect_string(), format!("127.0.0.1:{port}"));
        assert!(zk.pid().is_some());
        zk.stop();
        assert!(zk.pid().is_none());
        assert!(!serving(port));
        zk.restart();
        assert_eq!(zk.port(), port);
        assert!(serving(port));
        let dir = zk.dir.path().to_owned();
        drop(zk);
        assert!(!dir.exists());
    }
}
