//! The scenarios of issue 5, each measured against its baselines in the same round:
//!
//! 1. Proxy hop, 100 B calls at 1 and 64 in flight: direct, minimal forwarder, haproxy
//!    (`mode tcp`), `rpc_proxy`. Then 1 in flight with everything pinned to one core.
//! 2. Bodies of 64 KiB and 4 MiB over the same four paths.
//! 3. Python tier: `rpc_lb` + 2 `rpc_thrift` workers vs `TProcessPoolServer(2)`,
//!    `TThreadedServer` and thriftpy2's server, 2 and 8 clients.
//! 4. Full path: client -> `rpc_proxy` -> `rpc_lb` -> 2 workers vs client -> `rpc_lb`.
//! 5. Memory: RSS with many idle client connections (rpc_proxy, forwarder, haproxy).
//! 6. Discovery: services x 4 endpoints; time to a full routing table, time from an
//!    endpoint node's deletion to the last call reaching it, and no connection to endpoints
//!    of services nobody called.
//! 7. Blocking clients (issue 16): N OS threads, each a blocking client with one call
//!    outstanding on its own connection, at 1, 4 and 64 in flight, nothing pinned: direct,
//!    minimal forwarder, haproxy, `rpc_proxy` (one and two runtime threads), and the previous
//!    `rpc_proxy` build when one is given (`--baseline-bin-dir`). Reported next to scenario 1.
//!
//! "N in flight" is N client connections with one call outstanding each. Within a round the
//! targets of a case run back to back, in an order rotated every round.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::blocking::{self, BlockingLoad};
use crate::echo::{self, Stats, now_ns};
use crate::load::{self, FrameReader, Load, Outcome, Watched, Window};
use crate::procs::{self, Proc};
use crate::report::{Results, Sample};
use crate::systems::{self, Bins, READY_TIMEOUT, wait_ready};
use crate::zk::Zk;

/// ZooKeeper product of the hop scenarios (1, 2, 4, 5).
const PRODUCT: &str = "bench";
/// ZooKeeper product of the discovery scenario.
const DISC_PRODUCT: &str = "disc";
/// The multiplexed name of the echo call.
const ECHO: &str = "echo:echo";
/// The service the LB registers.
const PY_SERVICE: &str = "pyecho";
/// Size of a small call's string argument.
const SMALL: usize = 100;
/// Scenario 7: the call through a proxy (`echo` service, `ping` method).
pub const PING: &str = "echo:ping";
/// Scenario 7: the same call direct to the backend.
pub const PING_DIRECT: &str = "ping";
/// Scenario 7: the string argument (field 1) of the call.
pub const PING_PAYLOAD: usize = 70;
/// Scenario 7: calls in flight (blocking client threads, a connection each).
pub const BLOCKING_INFLIGHT: [usize; 3] = [1, 4, 64];
/// Runtime threads of the echo backend (issue 16: a Rust server with 2 threads).
const ECHO_THREADS: usize = 2;

/// The targets' labels, as they appear in the results.
pub mod names {
    /// Direct to the echo backend.
    pub const DIRECT: &str = "direct";
    /// Through the minimal forwarder.
    pub const FORWARDER: &str = "minimal forwarder";
    /// Through haproxy.
    pub const HAPROXY: &str = "haproxy (mode tcp)";
    /// Through rpc_proxy.
    pub const PROXY: &str = "rpc_proxy";
    /// Through rpc_proxy with two runtime threads (`worker_threads=2`; the default is 1).
    pub const PROXY_MT: &str = "rpc_proxy, worker_threads=2";
    /// Through the previous build of rpc_proxy (`--baseline-bin-dir`), same config.
    pub const PROXY_PREV: &str = "rpc_proxy (previous build)";
    /// The pinned case of scenario 1.
    pub const PINNED_CASE: &str = "1 in flight, all pinned to one CPU";
    /// Scenario 3: the LB and its workers.
    pub const PY_LB: &str = "rpc_lb + 2 rpc_thrift workers";
    /// Scenario 3: Apache Thrift's process pool.
    pub const PY_POOL: &str = "TProcessPoolServer(2)";
    /// Scenario 3: Apache Thrift's threaded server.
    pub const PY_THREADED: &str = "TThreadedServer";
    /// Scenario 3: thriftpy2's threaded server.
    pub const PY_THRIFTPY2: &str = "thriftpy2 TThreadedServer";
    /// Scenario 4: the LB called directly.
    pub const FULL_DIRECT: &str = "client -> rpc_lb";
    /// Scenario 4: through the proxy.
    pub const FULL_PROXY: &str = "client -> rpc_proxy -> rpc_lb";
}

use names::*;

/// How the run is shaped.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Rounds of scenarios 1-6.
    pub rounds: usize,
    /// Warm-up and window of every load point of scenarios 1-6.
    pub window: Window,
    /// Rounds of scenario 7 (the first `rounds` of them interleaved with the others).
    pub blocking_rounds: usize,
    /// Warm-up and window of every load point of scenario 7.
    pub blocking_window: Window,
    /// Smoke mode (tiny sizes; checks numbers exist, never timing).
    pub smoke: bool,
    /// Idle client connections of scenario 5.
    pub idle_connections: usize,
    /// Services of scenario 6 (4 endpoints each).
    pub services: usize,
    /// Deletion trials per round of scenario 6.
    pub deletion_trials: usize,
    /// Scenarios to run (1-7).
    pub only: Vec<u8>,
}

// === impl Settings ===

impl Settings {
    /// Rounds of the run: the most any selected scenario wants.
    pub fn total_rounds(&self) -> usize {
        let others = self.only.iter().any(|s| *s != 7);
        let mut n = if others { self.rounds } else { 0 };
        if self.only.contains(&7) {
            n = n.max(self.blocking_rounds);
        }
        n
    }
}

/// A point that must have numbers at the end: scenario, case, target, metric.
type Expected = (String, String, String, &'static str);

/// The harness state across scenarios.
pub struct Bench {
    settings: Settings,
    bins: Bins,
    dir: tempfile::TempDir,
    zk_servers: String,
    zk: Zk,
    /// The CPUs this process may use (restored after pinning).
    cpus: String,
    gen_dir: PathBuf,
    /// What the run measured.
    pub results: Results,
    expected: Vec<Expected>,
    hops: Option<Hops>,
    py: Option<PyTier>,
    disc: Option<Disc>,
}

/// The long-running processes of scenarios 1, 2 and 4.
struct Hops {
    echo: Proc,
    echo_sock: PathBuf,
    forwarder: Proc,
    fwd_sock: PathBuf,
    haproxy: Option<Proc>,
    haproxy_sock: PathBuf,
    proxy: Proc,
    proxy_sock: PathBuf,
    /// The same proxy binary on a two-thread runtime (scenarios 1 and 7).
    proxy_mt: Proc,
    proxy_mt_sock: PathBuf,
    /// The previous build of rpc_proxy, same config (scenarios 1 and 7), when given.
    proxy_prev: Option<(Proc, PathBuf)>,
}

/// One path of scenario 1 and 2.
struct HopTarget {
    label: &'static str,
    socket: PathBuf,
    /// The hop's process group (none for direct).
    hop: Option<u32>,
}

impl Hops {
    fn targets(&self) -> Vec<HopTarget> {
        let mut all = vec![
            HopTarget {
                label: DIRECT,
                socket: self.echo_sock.clone(),
                hop: None,
            },
            HopTarget {
                label: FORWARDER,
                socket: self.fwd_sock.clone(),
                hop: Some(self.forwarder.pid()),
            },
        ];
        if let Some(h) = &self.haproxy {
            all.push(HopTarget {
                label: HAPROXY,
                socket: self.haproxy_sock.clone(),
                hop: Some(h.pid()),
            });
        }
        all.push(HopTarget {
            label: PROXY,
            socket: self.proxy_sock.clone(),
            hop: Some(self.proxy.pid()),
        });
        all
    }

    /// [`Hops::targets`] plus the two-thread proxy and the previous build, if any.
    fn targets_mt(&self) -> Vec<HopTarget> {
        let mut all = self.targets();
        all.push(HopTarget {
            label: PROXY_MT,
            socket: self.proxy_mt_sock.clone(),
            hop: Some(self.proxy_mt.pid()),
        });
        if let Some((proc, socket)) = &self.proxy_prev {
            all.push(HopTarget {
                label: PROXY_PREV,
                socket: socket.clone(),
                hop: Some(proc.pid()),
            });
        }
        all
    }
}

/// The Python servers of scenarios 3 and 4.
struct PyTier {
    lb: Option<LbTier>,
    servers: Vec<PyServer>,
}

/// `rpc_lb` with its workers.
struct LbTier {
    lb: Proc,
    front: PathBuf,
    workers: Vec<Proc>,
}

struct PyServer {
    label: &'static str,
    proc: Proc,
    socket: PathBuf,
}

/// Scenario 6: in-process echo listeners registered as many services.
struct Disc {
    tasks: Vec<JoinHandle<()>>,
    /// `stats[service][endpoint]`.
    stats: Vec<Vec<Arc<Stats>>>,
    services: Vec<String>,
    /// Indexes of the services the scenario calls.
    sample: Vec<usize>,
    /// The two endpoints of service `churn`: socket and stats.
    churn: [(String, Arc<Stats>); 2],
    /// Node path of the churn endpoint deleted in the trials.
    churn_node: String,
}

impl Drop for Disc {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// === impl Bench ===

impl Bench {
    /// Starts ZooKeeper and prepares the work directory.
    ///
    /// # Errors
    /// When ZooKeeper or the thrift compiler cannot be run.
    pub async fn new(settings: Settings, bins: Bins, zk_servers: String) -> anyhow::Result<Bench> {
        // Unix socket paths must stay short (108 bytes): a directory right under /tmp.
        let dir = tempfile::Builder::new()
            .prefix("rpcb")
            .tempdir_in("/tmp")
            .context("create work dir")?;
        let zk = Zk::connect(&zk_servers).await?;
        let gen_dir = dir.path().join("gen");
        systems::gen_python(&bins, &gen_dir)?;
        Ok(Bench {
            settings,
            bins,
            dir,
            zk_servers,
            zk,
            cpus: procs::allowed_cpus(),
            gen_dir,
            results: Results::default(),
            expected: Vec::new(),
            hops: None,
            py: None,
            disc: None,
        })
    }

    fn runs(&self, scenario: u8) -> bool {
        self.settings.only.contains(&scenario)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn expect(&mut self, scenario: &str, case: &str, target: &str, metric: &'static str) {
        let e = (
            scenario.to_owned(),
            case.to_owned(),
            target.to_owned(),
            metric,
        );
        if !self.expected.contains(&e) {
            self.expected.push(e);
        }
    }

    /// Points that should have numbers and have none.
    pub fn missing(&self) -> Vec<String> {
        self.expected
            .iter()
            .filter(|(s, c, t, m)| {
                !self.results.find(s, c, t).is_some_and(|p| {
                    p.samples
                        .iter()
                        .any(|x| x.get(*m).is_some_and(|v| v.is_finite()))
                })
            })
            .map(|(s, c, t, m)| format!("scenario {s} / {c} / {t}: no {m}"))
            .collect()
    }

    /// Starts every long-running system the selected scenarios need.
    ///
    /// # Errors
    /// When a system needed by every scenario (echo backend, proxy) cannot be started.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if [1, 2, 4, 5, 7].iter().any(|s| self.runs(*s)) {
            self.hops = Some(self.start_hops().await?);
        }
        if self.runs(3) || self.runs(4) {
            self.py = Some(self.start_py().await?);
        }
        if self.runs(6) {
            self.disc = Some(self.start_disc().await?);
        }
        Ok(())
    }

    /// Sockets and pids of the running systems (for `rpc-bench up`).
    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        if let Some(h) = &self.hops {
            lines.push(format!(
                "echo backend   pid {:>7}  {}",
                h.echo.pid(),
                h.echo_sock.display()
            ));
            lines.push(format!(
                "forwarder      pid {:>7}  {}",
                h.forwarder.pid(),
                h.fwd_sock.display()
            ));
            if let Some(hp) = &h.haproxy {
                lines.push(format!(
                    "haproxy        pid {:>7}  {}",
                    hp.pid(),
                    h.haproxy_sock.display()
                ));
            }
            lines.push(format!(
                "rpc_proxy      pid {:>7}  {} (services echo, {PY_SERVICE})",
                h.proxy.pid(),
                h.proxy_sock.display()
            ));
            lines.push(format!(
                "rpc_proxy (mt) pid {:>7}  {} (worker_threads=2)",
                h.proxy_mt.pid(),
                h.proxy_mt_sock.display()
            ));
            if let Some((proc, socket)) = &h.proxy_prev {
                lines.push(format!(
                    "rpc_proxy prev pid {:>7}  {} ({})",
                    proc.pid(),
                    socket.display(),
                    self.bins
                        .baseline_proxy
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display()
                ));
            }
        }
        if let Some(py) = &self.py {
            if let Some(lb) = &py.lb {
                lines.push(format!(
                    "rpc_lb         pid {:>7}  {}",
                    lb.lb.pid(),
                    lb.front.display()
                ));
                for w in &lb.workers {
                    lines.push(format!("{:<14} pid {:>7}", w.name(), w.pid()));
                }
            }
            for s in &py.servers {
                lines.push(format!(
                    "{:<14} pid {:>7}  {}",
                    s.label,
                    s.proc.pid(),
                    s.socket.display()
                ));
            }
        }
        lines.join("\n")
    }

    /// Stops every system.
    pub fn stop(&mut self) {
        self.disc = None;
        self.py = None;
        self.hops = None;
    }

    async fn start_hops(&mut self) -> anyhow::Result<Hops> {
        let dir = self.dir().to_owned();
        let echo_sock = dir.join("echo.sock");
        let mut echo = systems::echo(&self.bins, "echo backend", &echo_sock, ECHO_THREADS)?;
        wait_ready(&mut echo, &echo_sock, ECHO, READY_TIMEOUT).await?;
        let fwd_sock = dir.join("fwd.sock");
        let mut forwarder = systems::forwarder(&self.bins, &fwd_sock, &echo_sock)?;
        wait_ready(&mut forwarder, &fwd_sock, ECHO, READY_TIMEOUT).await?;
        let haproxy_sock = dir.join("haproxy.sock");
        let haproxy = match systems::haproxy_available() {
            Ok(()) => {
                let mut h = systems::haproxy(&dir, "haproxy", &haproxy_sock, &echo_sock)?;
                match wait_ready(&mut h, &haproxy_sock, ECHO, READY_TIMEOUT).await {
                    Ok(()) => Some(h),
                    Err(e) => {
                        self.results.skip(format!("haproxy: {e:#}"));
                        None
                    }
                }
            }
            Err(reason) => {
                self.results.skip(format!("haproxy: {reason}"));
                None
            }
        };
        self.zk
            .register(
                PRODUCT,
                &[("echo".to_owned(), echo_sock.display().to_string())],
            )
            .await?;
        let proxy_sock = dir.join("proxy.sock");
        let config = systems::proxy_config(&self.zk_servers, PRODUCT, &proxy_sock, &[]);
        let mut proxy = systems::proxy(&self.bins, &dir, "rpc_proxy", &config)?;
        wait_ready(&mut proxy, &proxy_sock, ECHO, READY_TIMEOUT).await?;
        let proxy_mt_sock = dir.join("proxy_mt.sock");
        let config = systems::proxy_config(
            &self.zk_servers,
            PRODUCT,
            &proxy_mt_sock,
            &[("worker_threads", "2")],
        );
        let mut proxy_mt = systems::proxy(&self.bins, &dir, "rpc_proxy-mt", &config)?;
        wait_ready(&mut proxy_mt, &proxy_mt_sock, ECHO, READY_TIMEOUT).await?;
        let proxy_prev = match self.bins.baseline_proxy.clone() {
            Some(program) => {
                let sock = dir.join("proxy_prev.sock");
                let config = systems::proxy_config(&self.zk_servers, PRODUCT, &sock, &[]);
                let started = systems::proxy_program(&program, &dir, "rpc_proxy-prev", &config);
                let ready = match started {
                    Ok(mut p) => match wait_ready(&mut p, &sock, ECHO, READY_TIMEOUT).await {
                        Ok(()) => Ok(p),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                match ready {
                    Ok(p) => Some((p, sock)),
                    Err(e) => {
                        self.results
                            .skip(format!("{PROXY_PREV} ({}): {e:#}", program.display()));
                        None
                    }
                }
            }
            None => None,
        };
        Ok(Hops {
            echo,
            echo_sock,
            forwarder,
            fwd_sock,
            haproxy,
            haproxy_sock,
            proxy,
            proxy_sock,
            proxy_mt,
            proxy_mt_sock,
            proxy_prev,
        })
    }

    async fn start_py(&mut self) -> anyhow::Result<PyTier> {
        let dir = self.dir().to_owned();
        systems::python_has(&self.bins, "thrift").map_err(anyhow::Error::msg)?;
        let mut servers = Vec::new();
        let mut pending = Vec::new();
        let mut modes = vec![
            (PY_POOL, "processpool", "py_pool.sock"),
            (PY_THREADED, "threaded", "py_threaded.sock"),
        ];
        match systems::python_has(&self.bins, "thriftpy2") {
            Ok(()) => modes.push((PY_THRIFTPY2, "thriftpy2", "py_thriftpy2.sock")),
            Err(reason) => self
                .results
                .skip(format!("{PY_THRIFTPY2}: {reason} (pip install thriftpy2)")),
        }
        for (label, mode, sock) in modes {
            let socket = dir.join(sock);
            let proc = systems::python(
                &self.bins,
                label,
                mode,
                &socket,
                &self.gen_dir,
                &["--workers", "2"],
            )?;
            pending.push(PyServer {
                label,
                proc,
                socket,
            });
        }
        // The LB and its workers start while the other servers import.
        let lb = match systems::python_has(&self.bins, "rpc_thrift") {
            Ok(()) => Some(self.start_lb(&dir)?),
            Err(reason) => {
                self.results.note(
                    "3",
                    "-",
                    PY_LB,
                    format!("{reason} (pip install ./worker-py)"),
                );
                None
            }
        };
        for mut server in pending {
            wait_ready(&mut server.proc, &server.socket, "echo", READY_TIMEOUT).await?;
            servers.push(server);
        }
        let lb = match lb {
            Some(mut lb) => {
                wait_ready(&mut lb.lb, &lb.front, "echo", READY_TIMEOUT).await?;
                Some(lb)
            }
            None => None,
        };
        Ok(PyTier { lb, servers })
    }

    fn start_lb(&self, dir: &Path) -> anyhow::Result<LbTier> {
        let front = dir.join("lb.sock");
        let back = dir.join("lb_back.sock");
        let lb = systems::lb(
            &self.bins,
            dir,
            &self.zk_servers,
            PRODUCT,
            PY_SERVICE,
            &front,
            &back,
        )?;
        let mut workers = Vec::new();
        for i in 0..2 {
            workers.push(systems::python(
                &self.bins,
                if i == 0 { "worker 1" } else { "worker 2" },
                "worker",
                &back,
                &self.gen_dir,
                &["--pool-size", "1", "--service", PY_SERVICE],
            )?);
        }
        Ok(LbTier { lb, front, workers })
    }

    async fn start_disc(&mut self) -> anyhow::Result<Disc> {
        let dir = self.dir().join("d");
        std::fs::create_dir_all(&dir)?;
        let n = self.settings.services;
        let mut tasks = Vec::new();
        let mut stats = Vec::with_capacity(n);
        let mut services = Vec::with_capacity(n);
        let mut endpoints = Vec::with_capacity(n * 4 + 2);
        for s in 0..n {
            let service = format!("svc{s:04}");
            let mut per = Vec::with_capacity(4);
            for e in 0..4 {
                let path = dir.join(format!("s{s:04}e{e}.sock"));
                let listener = echo::bind(&path).with_context(|| format!("bind {path:?}"))?;
                let st = Arc::new(Stats::default());
                tasks.push(tokio::spawn(echo::serve(listener, st.clone())));
                per.push(st);
                endpoints.push((service.clone(), path.display().to_string()));
            }
            stats.push(per);
            services.push(service);
        }
        let mut churn_paths = Vec::new();
        let mut churn_stats = Vec::new();
        for name in ["churnA", "churnB"] {
            let path = dir.join(format!("{name}.sock"));
            let listener = echo::bind(&path)?;
            let st = Arc::new(Stats::default());
            tasks.push(tokio::spawn(echo::serve(listener, st.clone())));
            endpoints.push(("churn".to_owned(), path.display().to_string()));
            churn_paths.push(path.display().to_string());
            churn_stats.push(st);
        }
        let started = Instant::now();
        let nodes = self.zk.register(DISC_PRODUCT, &endpoints).await?;
        eprintln!(
            "rpc-bench: registered {} endpoints of {} services in {:.0} ms",
            nodes.len(),
            n + 1,
            started.elapsed().as_secs_f64() * 1e3
        );
        // Called services: the last ones (listed last), the first, and a few in between.
        let mut sample: Vec<usize> = (n.saturating_sub(5)..n).collect();
        sample.extend([0, n / 4, n / 2, 3 * n / 4]);
        sample.sort_unstable();
        sample.dedup();
        let churn_node = nodes[nodes.len() - 1].clone();
        let churn = [
            (churn_paths[0].clone(), churn_stats[0].clone()),
            (churn_paths[1].clone(), churn_stats[1].clone()),
        ];
        Ok(Disc {
            tasks,
            stats,
            services,
            sample,
            churn,
            churn_node,
        })
    }

    /// Runs every selected scenario once (one round); scenarios 1-6 only in their first
    /// `rounds` rounds, scenario 7 in its first `blocking_rounds`.
    pub async fn round(&mut self, round: usize) {
        eprintln!(
            "rpc-bench: round {}/{}",
            round + 1,
            self.settings.total_rounds()
        );
        if self.runs(1) && round < self.settings.rounds {
            self.scenario1(round).await;
            self.scenario1_pinned(round).await;
        }
        if self.runs(7) && round < self.settings.blocking_rounds {
            self.scenario7(round).await;
        }
        if round >= self.settings.rounds {
            return;
        }
        if self.runs(2) {
            self.scenario2(round).await;
        }
        if self.runs(3) {
            self.scenario3(round).await;
        }
        if self.runs(4) {
            self.scenario4(round).await;
        }
        if self.runs(5) {
            self.scenario5(round).await;
        }
        if self.runs(6)
            && let Err(e) = self.scenario6(round).await
        {
            self.results
                .note("6", "discovery", PROXY, format!("round failed: {e:#}"));
        }
    }

    /// Runs one load point and records its base metrics; `None` (noted) on failure.
    async fn measure(
        &mut self,
        scenario: &str,
        case: &str,
        target: &str,
        load: &Load,
        watched: &[Watched],
    ) -> Option<Outcome> {
        self.expect(scenario, case, target, "calls_per_s");
        let outcome = load::run(load, self.settings.window, watched).await;
        self.record(scenario, case, target, outcome, watched)
    }

    /// Records one load point's base metrics; `None` (noted) on failure.
    fn record(
        &mut self,
        scenario: &str,
        case: &str,
        target: &str,
        outcome: anyhow::Result<Outcome>,
        watched: &[Watched],
    ) -> Option<Outcome> {
        match outcome {
            Ok(o) => {
                if o.errors > 0 {
                    let first = o.first_error.clone().unwrap_or_default();
                    self.results.note(
                        scenario,
                        case,
                        target,
                        format!("{} error replies ({first})", o.errors),
                    );
                }
                if o.broken > 0 {
                    self.results.note(
                        scenario,
                        case,
                        target,
                        format!("{} connections broke or could not open", o.broken),
                    );
                }
                let mut sample = Sample::new();
                sample.insert("calls_per_s".into(), o.rate());
                sample.insert("p50_us".into(), o.percentile_us(0.5));
                sample.insert("p99_us".into(), o.percentile_us(0.99));
                sample.insert("p999_us".into(), o.percentile_us(0.999));
                sample.insert("errors".into(), o.errors as f64);
                sample.insert("served".into(), o.served() as f64);
                sample.insert("clients".into(), o.per_connection.len() as f64);
                sample.insert("client_cpu_us".into(), per_call_us(o.client_cpu, &o));
                // Noise: what else ran on the machine during the window, in % of one CPU.
                let ours = o.client_cpu + o.cpu.iter().sum::<f64>();
                let pct = |s: f64| s * 100.0 / o.seconds.max(1e-9);
                sample.insert(
                    "other_cpu_pct".into(),
                    pct((o.machine.busy - ours).max(0.0)),
                );
                sample.insert("steal_pct".into(), pct(o.machine.steal));
                for (w, cpu) in watched.iter().zip(&o.cpu) {
                    sample.insert(format!("{}_cpu_us", w.label), per_call_us(*cpu, &o));
                }
                self.results.add(scenario, case, target, sample);
                Some(o)
            }
            Err(e) => {
                self.results.note(scenario, case, target, format!("{e:#}"));
                None
            }
        }
    }

    /// Adds `ratio` (calls/s over the baseline's, same round) to every listed point.
    fn ratios(&mut self, scenario: &str, case: &str, targets: &[&str], baseline_rate: f64) {
        for t in targets {
            if let Some(rate) = self.results.last(scenario, case, t, "calls_per_s")
                && baseline_rate > 0.0
            {
                let extra = Sample::from([("ratio".to_owned(), rate / baseline_rate)]);
                self.results.extend_last(scenario, case, t, &extra);
            }
        }
    }

    // === scenario 1 ===

    async fn scenario1(&mut self, round: usize) {
        let Some(hops) = &self.hops else { return };
        let mut targets = hops.targets_mt();
        let echo_pid = hops.echo.pid();
        rotate(&mut targets, round);
        for inflight in [1usize, 64] {
            let case = format!("{inflight} in flight");
            let mut direct = 0.0;
            let mut labels = Vec::new();
            for t in &targets {
                let load = Load {
                    socket: t.socket.clone(),
                    connections: inflight,
                    depth: 1,
                    name: ECHO.to_owned(),
                    payload: SMALL,
                };
                let watched = hop_watch(t.hop, echo_pid);
                if let Some(o) = self.measure("1", &case, t.label, &load, &watched).await
                    && t.label == DIRECT
                {
                    direct = o.rate();
                }
                labels.push(t.label);
            }
            self.ratios("1", &case, &labels, direct);
        }
    }

    async fn scenario1_pinned(&mut self, round: usize) {
        let Some(hops) = &self.hops else { return };
        let mut targets = hops.targets_mt();
        rotate(&mut targets, round);
        let echo_pid = hops.echo.pid();
        let mut pids = vec![std::process::id(), echo_pid];
        pids.extend(targets.iter().filter_map(|t| t.hop));
        let case = PINNED_CASE;
        let cpu = procs::idlest_cpu(&self.cpus, Duration::from_millis(300)).to_string();
        let pinned = pin_all(&pids, &cpu);
        if let Err(e) = pinned {
            self.results
                .note("1-pinned", case, DIRECT, format!("cannot pin: {e:#}"));
            pin_all(&pids, &self.cpus).ok();
            return;
        }
        let mut labels = Vec::new();
        let mut direct_p50 = None;
        let mut direct_rate = 0.0;
        for t in &targets {
            let load = Load {
                socket: t.socket.clone(),
                connections: 1,
                depth: 1,
                name: ECHO.to_owned(),
                payload: SMALL,
            };
            let watched = hop_watch(t.hop, echo_pid);
            if let Some(o) = self
                .measure("1-pinned", case, t.label, &load, &watched)
                .await
            {
                let mean = 1e6 / o.rate().max(1e-9);
                let extra = Sample::from([("mean_us".to_owned(), mean)]);
                self.results.extend_last("1-pinned", case, t.label, &extra);
                if t.label == DIRECT {
                    direct_p50 = Some(o.percentile_us(0.5));
                    direct_rate = o.rate();
                }
            }
            labels.push(t.label);
        }
        if let Err(e) = pin_all(&pids, &self.cpus) {
            eprintln!("rpc-bench: cannot restore CPU affinity: {e:#}");
        }
        self.ratios("1-pinned", case, &labels, direct_rate);
        if let Some(base) = direct_p50 {
            let base_mean = 1e6 / direct_rate.max(1e-9);
            for t in &labels {
                let p50 = self.results.last("1-pinned", case, t, "p50_us");
                let mean = self.results.last("1-pinned", case, t, "mean_us");
                if let (Some(p50), Some(mean)) = (p50, mean) {
                    let extra = Sample::from([
                        ("added_p50_us".to_owned(), p50 - base),
                        ("added_mean_us".to_owned(), mean - base_mean),
                    ]);
                    self.results.extend_last("1-pinned", case, t, &extra);
                }
            }
        }
    }

    // === scenario 7 ===

    /// Blocking clients at 1, 4 and 64 in flight over every hop path, nothing pinned.
    async fn scenario7(&mut self, round: usize) {
        let Some(hops) = &self.hops else { return };
        let mut targets = hops.targets_mt();
        let echo_pid = hops.echo.pid();
        rotate(&mut targets, round);
        let window = self.settings.blocking_window;
        for inflight in BLOCKING_INFLIGHT {
            let case = inflight.to_string();
            let mut direct = 0.0;
            let mut labels = Vec::new();
            for t in &targets {
                let load = BlockingLoad {
                    socket: t.socket.clone(),
                    threads: inflight,
                    name: if t.label == DIRECT { PING_DIRECT } else { PING }.to_owned(),
                    payload: PING_PAYLOAD,
                };
                let watched = hop_watch(t.hop, echo_pid);
                self.expect("7", &case, t.label, "calls_per_s");
                let outcome = {
                    let watched = watched.clone();
                    tokio::task::spawn_blocking(move || blocking::run(&load, window, &watched))
                        .await
                        .unwrap_or_else(|e| Err(anyhow::anyhow!("load thread failed: {e}")))
                };
                if let Some(o) = self.record("7", &case, t.label, outcome, &watched)
                    && t.label == DIRECT
                {
                    direct = o.rate();
                }
                labels.push(t.label);
            }
            self.ratios("7", &case, &labels, direct);
            // Before/after in the same round: the previous build as the baseline.
            let prev_rate = self.results.last("7", &case, PROXY_PREV, "calls_per_s");
            let prev_p99 = self.results.last("7", &case, PROXY_PREV, "p99_us");
            for t in [PROXY, PROXY_MT] {
                let rate = self.results.last("7", &case, t, "calls_per_s");
                let p99 = self.results.last("7", &case, t, "p99_us");
                let mut extra = Sample::new();
                if let (Some(now), Some(before)) = (rate, prev_rate)
                    && before > 0.0
                {
                    extra.insert("vs_previous".to_owned(), now / before);
                }
                if let (Some(now), Some(before)) = (p99, prev_p99)
                    && before > 0.0
                {
                    extra.insert("p99_vs_previous".to_owned(), now / before);
                }
                if !extra.is_empty() {
                    self.results.extend_last("7", &case, t, &extra);
                }
            }
        }
    }

    // === scenario 2 ===

    async fn scenario2(&mut self, round: usize) {
        let Some(hops) = &self.hops else { return };
        let mut targets = hops.targets();
        let echo_pid = hops.echo.pid();
        rotate(&mut targets, round);
        for (case, payload, connections) in [
            ("64 KiB bodies, 4 conns", 64 * 1024, 4),
            ("4 MiB bodies, 2 conns", 4 * 1024 * 1024, 2),
        ] {
            let mut direct = 0.0;
            let mut labels = Vec::new();
            for t in &targets {
                let load = Load {
                    socket: t.socket.clone(),
                    connections,
                    depth: 1,
                    name: ECHO.to_owned(),
                    payload,
                };
                let watched = hop_watch(t.hop, echo_pid);
                if let Some(o) = self.measure("2", case, t.label, &load, &watched).await {
                    let mb = o.calls as f64 * payload as f64 / 1e6;
                    let mut extra = Sample::from([
                        ("mb_per_s".to_owned(), o.rate() * payload as f64 / 1e6),
                        ("gb_per_s".to_owned(), o.rate() * payload as f64 / 1e9),
                    ]);
                    if t.hop.is_some() && mb > 0.0 {
                        extra.insert("hop_cpu_us_per_mb".to_owned(), o.cpu[0] * 1e6 / mb);
                    }
                    self.results.extend_last("2", case, t.label, &extra);
                    if t.label == DIRECT {
                        direct = o.rate();
                    }
                }
                labels.push(t.label);
            }
            self.ratios("2", case, &labels, direct);
        }
    }

    // === scenario 3 ===

    async fn scenario3(&mut self, round: usize) {
        let Some(py) = &self.py else { return };
        // (label, socket, process groups of the server)
        let mut targets: Vec<(&'static str, PathBuf, Vec<u32>)> = py
            .servers
            .iter()
            .map(|s| (s.label, s.socket.clone(), vec![s.proc.pid()]))
            .collect();
        if let Some(lb) = &py.lb {
            let mut groups = vec![lb.lb.pid()];
            groups.extend(lb.workers.iter().map(Proc::pid));
            targets.insert(0, (PY_LB, lb.front.clone(), groups));
        }
        rotate(&mut targets, round);
        let mut pool_best: f64 = 0.0;
        let mut all = Vec::new();
        for clients in [2usize, 8] {
            let case = format!("{clients} clients");
            for (label, socket, groups) in &targets {
                let load = Load {
                    socket: socket.clone(),
                    connections: clients,
                    depth: 1,
                    name: "echo".to_owned(),
                    payload: SMALL,
                };
                let watched: Vec<Watched> = groups
                    .iter()
                    .map(|g| Watched {
                        label: "server".to_owned(),
                        pgid: *g,
                    })
                    .collect();
                if let Some(o) = self.measure("3", &case, label, &load, &watched).await {
                    let cpu: f64 = o.cpu.iter().sum();
                    let extra = Sample::from([("server_cpu_us".to_owned(), per_call_us(cpu, &o))]);
                    self.results.extend_last("3", &case, label, &extra);
                    if *label == PY_POOL {
                        pool_best = pool_best.max(o.rate());
                    }
                }
                all.push((case.clone(), *label));
            }
        }
        if pool_best > 0.0 {
            for (case, label) in all {
                if let Some(rate) = self.results.last("3", &case, label, "calls_per_s") {
                    let extra = Sample::from([("vs_pool_best".to_owned(), rate / pool_best)]);
                    self.results.extend_last("3", &case, label, &extra);
                }
            }
        }
    }

    // === scenario 4 ===

    async fn scenario4(&mut self, round: usize) {
        let (Some(hops), Some(py)) = (&self.hops, &self.py) else {
            return;
        };
        let Some(lb) = &py.lb else {
            self.results.note(
                "4",
                "-",
                FULL_PROXY,
                "rpc_lb tier not running (see scenario 3)".to_owned(),
            );
            self.expect("4", "-", FULL_PROXY, "calls_per_s");
            return;
        };
        // The tier behind the front: the LB, then each worker.
        let mut tier = vec![Watched {
            label: "lb".to_owned(),
            pgid: lb.lb.pid(),
        }];
        tier.extend(lb.workers.iter().map(|w| Watched {
            label: "workers".to_owned(),
            pgid: w.pid(),
        }));
        let mut via_proxy = vec![Watched {
            label: "proxy".to_owned(),
            pgid: hops.proxy.pid(),
        }];
        via_proxy.extend(tier.iter().cloned());
        let mut targets = vec![
            (FULL_DIRECT, lb.front.clone(), "echo".to_owned(), tier),
            (
                FULL_PROXY,
                hops.proxy_sock.clone(),
                format!("{PY_SERVICE}:echo"),
                via_proxy,
            ),
        ];
        targets.rotate_left(round % 2);
        for inflight in [8usize, 64] {
            let case = format!("{inflight} in flight");
            let mut direct = 0.0;
            for (label, socket, name, watched) in &targets {
                let load = Load {
                    socket: socket.clone(),
                    connections: inflight,
                    depth: 1,
                    name: name.clone(),
                    payload: SMALL,
                };
                if let Some(o) = self.measure("4", &case, label, &load, watched).await {
                    // Two worker groups share one label: sum them.
                    let workers: f64 = watched
                        .iter()
                        .zip(&o.cpu)
                        .filter(|(w, _)| w.label == "workers")
                        .map(|(_, c)| c)
                        .sum();
                    let extra = Sample::from([
                        ("workers_cpu_us".to_owned(), per_call_us(workers, &o)),
                        (
                            "tier_cpu_us".to_owned(),
                            per_call_us(o.cpu.iter().sum(), &o),
                        ),
                    ]);
                    self.results.extend_last("4", &case, label, &extra);
                    if *label == FULL_DIRECT {
                        direct = o.rate();
                    }
                }
            }
            self.ratios("4", &case, &[FULL_DIRECT, FULL_PROXY], direct);
        }
    }

    // === scenario 5 ===

    async fn scenario5(&mut self, round: usize) {
        let Some(hops) = &self.hops else { return };
        let echo_sock = hops.echo_sock.clone();
        let has_haproxy = hops.haproxy.is_some();
        let n = self.settings.idle_connections;
        let case = format!("{n} idle connections");
        let dir = self.dir().to_owned();
        let mut targets = vec![PROXY, FORWARDER];
        if has_haproxy {
            targets.push(HAPROXY);
        }
        rotate(&mut targets, round);
        // The forwarder and haproxy hold two descriptors per client connection (client and
        // upstream side): with a low open-file limit they get fewer connections.
        let two_sided = (procs::nofile().saturating_sub(400) / 2) as usize;
        for target in targets {
            self.expect("5", &case, target, "per_conn_kib");
            let n = if target == PROXY { n } else { n.min(two_sided) };
            if n < self.settings.idle_connections {
                self.results.note(
                    "5",
                    &case,
                    target,
                    format!("only {n} connections: the open-file limit allows no more"),
                );
            }
            let sock = dir.join(format!("mem{round}.sock"));
            let started = match target {
                PROXY => {
                    let config = systems::proxy_config(&self.zk_servers, PRODUCT, &sock, &[]);
                    systems::proxy(&self.bins, &dir, &format!("rpc_proxy-mem{round}"), &config)
                }
                FORWARDER => systems::forwarder(&self.bins, &sock, &echo_sock),
                _ => systems::haproxy(&dir, &format!("haproxy-mem{round}"), &sock, &echo_sock),
            };
            let result = match started {
                Ok(mut proc) => {
                    let r = idle_memory(&mut proc, &sock, n).await;
                    proc.stop();
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(sample) => self.results.add("5", &case, target, sample),
                Err(e) => self.results.note("5", &case, target, format!("{e:#}")),
            }
        }
    }

    // === scenario 6 ===

    async fn scenario6(&mut self, round: usize) -> anyhow::Result<()> {
        let case = "discovery";
        self.expect("6", case, PROXY, "table_ms");
        self.expect("6", case, PROXY, "deletion_ms_median");
        let Some(disc) = &self.disc else {
            return Ok(());
        };
        let dir = self.dir().to_owned();
        let sock = dir.join(format!("disc{round}.sock"));
        let config = systems::proxy_config(&self.zk_servers, DISC_PRODUCT, &sock, &[]);
        let t0 = Instant::now();
        let mut proxy =
            systems::proxy(&self.bins, &dir, &format!("rpc_proxy-disc{round}"), &config)?;

        // 1. Time to accept, then to a full table: every sampled service answers.
        let mut stream = loop {
            if let Ok(s) = UnixStream::connect(&sock).await {
                break s;
            }
            proxy.check_alive()?;
            if t0.elapsed() > READY_TIMEOUT {
                bail!("proxy never accepted\n{}", proxy.tail());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let accept = t0.elapsed();
        let mut frames = FrameReader::default();
        let names: Vec<String> = disc
            .sample
            .iter()
            .map(|i| format!("{}:echo", disc.services[*i]))
            .collect();
        loop {
            let mut batch = Vec::new();
            for (i, name) in names.iter().enumerate() {
                batch.extend_from_slice(&crate::wire::echo_call(name, i as i32, 16));
            }
            stream.write_all(&batch).await?;
            let mut failure = None;
            for _ in &names {
                let frame = frames.next(&mut stream).await?;
                if let Err(f) = load::reply_or_failure(&frame) {
                    failure = Some(f);
                }
            }
            let Some(failure) = failure else { break };
            if t0.elapsed() > READY_TIMEOUT {
                bail!("routing table never complete: {failure}\n{}", proxy.tail());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let table = t0.elapsed();
        let logged = proxy
            .marker("routing table complete")
            .map(|t| t.saturating_duration_since(t0));
        drop(stream);

        // 2. Nobody called the other services: none of their endpoints saw a connection.
        let uncalled: u64 = disc
            .stats
            .iter()
            .enumerate()
            .filter(|(i, _)| !disc.sample.contains(i))
            .flat_map(|(_, eps)| eps.iter())
            .map(|s| s.connections.load(Ordering::Relaxed))
            .sum();
        let called: u64 = disc
            .sample
            .iter()
            .flat_map(|i| disc.stats[*i].iter())
            .filter(|s| s.connections.load(Ordering::Relaxed) > 0)
            .count() as u64;

        let services = disc.services.len();

        // 3. Deletion to routing stopping, under load on service `churn`.
        let trials = self.deletion_trials(&sock).await;

        proxy.stop();
        let trials = trials?;

        // 4. The floor for the full table: a fresh session of a plain client reading it all.
        let floor_started = Instant::now();
        let fresh = Zk::connect(&self.zk_servers).await?;
        fresh.read_all(DISC_PRODUCT).await?;
        let floor = floor_started.elapsed();
        drop(fresh);
        let mut sample = Sample::from([
            ("accept_ms".to_owned(), ms(accept)),
            ("table_ms".to_owned(), ms(table)),
            ("uncalled_connections".to_owned(), uncalled as f64),
            ("called_endpoints_connected".to_owned(), called as f64),
            ("services".to_owned(), services as f64 + 1.0),
            ("endpoints".to_owned(), services as f64 * 4.0 + 2.0),
        ]);
        if let Some(l) = logged {
            sample.insert("log_table_ms".to_owned(), ms(l));
        }
        sample.insert("zk_read_all_ms".to_owned(), ms(floor));
        if !trials.deletions.is_empty() {
            sample.insert("deletion_ms_median".to_owned(), median(&trials.deletions));
            sample.insert(
                "deletion_ms_max".to_owned(),
                trials.deletions.iter().copied().fold(0.0, f64::max),
            );
        }
        if !trials.watches.is_empty() {
            sample.insert("zk_watch_ms_median".to_owned(), median(&trials.watches));
        }
        if !trials.readds.is_empty() {
            sample.insert("readd_ms_median".to_owned(), median(&trials.readds));
        }
        self.results.add("6", case, PROXY, sample);
        Ok(())
    }

    /// Deletes and re-creates the node of one of the two `churn` endpoints while calls flow.
    async fn deletion_trials(&mut self, sock: &Path) -> anyhow::Result<Trials> {
        let Some(disc) = &self.disc else {
            return Ok(Trials::default());
        };
        let load = Load {
            socket: sock.to_owned(),
            connections: 2,
            depth: 4,
            name: "churn:echo".to_owned(),
            payload: 16,
        };
        let cancel = CancellationToken::new();
        let window = Window {
            warmup: Duration::ZERO,
            window: Duration::from_secs(600),
        };
        let background = {
            let cancel = cancel.clone();
            tokio::spawn(async move { load::run_until(&load, window, &[], cancel).await })
        };
        let (a, b) = (&disc.churn[0].1, &disc.churn[1].1);
        let node = disc.churn_node.clone();
        let frontend = disc.churn[1].0.clone();
        let churn_service = rpc_registry::service_path(DISC_PRODUCT, "churn");
        let mut deletions = Vec::new();
        let mut watches = Vec::new();
        let mut readds = Vec::new();
        let outcome: anyhow::Result<()> = async {
            for _ in 0..self.settings.deletion_trials {
                if !receiving(b, Duration::from_secs(10)).await {
                    bail!("the churn endpoint got no calls");
                }
                // The floor: when ZooKeeper tells a watching client (this one) of the delete.
                let watcher = self.zk.watch_children(&churn_service).await?;
                let watched = tokio::spawn(async move {
                    watcher.changed().await;
                    now_ns()
                });
                let deleted_at = now_ns();
                self.zk.delete(&node).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let last = b.last_call_ns.load(Ordering::Relaxed);
                deletions.push(last.saturating_sub(deleted_at) as f64 / 1e6);
                if let Ok(fired) = watched.await {
                    watches.push(fired.saturating_sub(deleted_at) as f64 / 1e6);
                }
                if !receiving(a, Duration::from_secs(1)).await {
                    bail!("the remaining churn endpoint got no calls after the deletion");
                }
                let before = b.calls.load(Ordering::Relaxed);
                let added_at = now_ns();
                self.zk.reregister(DISC_PRODUCT, "churn", &frontend).await?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while b.calls.load(Ordering::Relaxed) == before {
                    if Instant::now() > deadline {
                        bail!("the re-created churn endpoint got no calls");
                    }
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                readds.push(now_ns().saturating_sub(added_at) as f64 / 1e6);
            }
            Ok(())
        }
        .await;
        cancel.cancel();
        match background.await {
            Ok(Ok(o)) if o.errors > 0 => {
                let first = o.first_error.unwrap_or_default();
                self.results.note(
                    "6",
                    "discovery",
                    PROXY,
                    format!("{} calls failed during deletions ({first})", o.errors),
                );
            }
            Ok(Err(e)) => bail!("churn load: {e:#}"),
            _ => {}
        }
        outcome.map(|()| Trials {
            deletions,
            watches,
            readds,
        })
    }
}

/// Rotates the targets by the round number, so no target always runs first.
fn rotate<T>(targets: &mut [T], round: usize) {
    if !targets.is_empty() {
        let n = targets.len();
        targets.rotate_left(round % n);
    }
}

/// Times (ms) measured by the deletion trials of scenario 6.
#[derive(Debug, Default)]
struct Trials {
    /// From each delete request to the last call reaching the deleted endpoint.
    deletions: Vec<f64>,
    /// From each delete request to ZooKeeper's watch event at a plain client (the floor).
    watches: Vec<f64>,
    /// From each re-create to the first call reaching the endpoint again.
    readds: Vec<f64>,
}

/// Whether `stats` records a call within `bound`.
async fn receiving(stats: &Stats, bound: Duration) -> bool {
    let before = stats.calls.load(Ordering::Relaxed);
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if stats.calls.load(Ordering::Relaxed) > before {
            return true;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    false
}

/// The processes watched on a hop path: the hop (if any), then the echo backend (metrics
/// `hop_cpu_us` and `echo_cpu_us`).
fn hop_watch(hop: Option<u32>, echo: u32) -> Vec<Watched> {
    let mut watched = Vec::new();
    if let Some(pgid) = hop {
        watched.push(Watched {
            label: "hop".to_owned(),
            pgid,
        });
    }
    watched.push(Watched {
        label: "echo".to_owned(),
        pgid: echo,
    });
    watched
}

/// CPU microseconds per counted call.
fn per_call_us(cpu_seconds: f64, o: &Outcome) -> f64 {
    if o.calls == 0 {
        f64::NAN
    } else {
        cpu_seconds * 1e6 / o.calls as f64
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Pins every thread of every process of each group in `pids` to `cpus`.
fn pin_all(pids: &[u32], cpus: &str) -> anyhow::Result<()> {
    for pid in pids {
        let members = if *pid == std::process::id() {
            vec![*pid]
        } else {
            procs::group_members(*pid)
        };
        for member in members {
            procs::pin(member, cpus)?;
        }
    }
    Ok(())
}

/// Scenario 5 on one started process: RSS before and after `n` client connections that
/// each made one call and stay open.
async fn idle_memory(proc: &mut Proc, sock: &Path, n: usize) -> anyhow::Result<Sample> {
    wait_ready(proc, sock, ECHO, READY_TIMEOUT).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = proc.pid();
    let (before, _) = procs::rss_kib(pid).context("read RSS")?;
    let opened = futures_util::stream::iter(0..n)
        .map(|i| open_idle(sock.to_owned(), i as i32))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let failures = opened.iter().filter(|r| r.is_err()).count();
    let first_failure = opened
        .iter()
        .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}")));
    let streams: Vec<UnixStream> = opened.into_iter().filter_map(Result::ok).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proc.check_alive()?;
    let (after, hwm) = procs::rss_kib(pid).context("read RSS")?;
    let open = streams.len();
    drop(streams);
    if open == 0 {
        bail!(
            "no idle connection could be made: {}",
            first_failure.unwrap_or_default()
        );
    }
    if failures > 0 {
        eprintln!(
            "rpc-bench: {} of {n} idle connections failed: {}",
            failures,
            first_failure.unwrap_or_default()
        );
    }
    Ok(Sample::from([
        ("connections".to_owned(), open as f64),
        ("rss_before_mib".to_owned(), before as f64 / 1024.0),
        ("rss_after_mib".to_owned(), after as f64 / 1024.0),
        ("hwm_mib".to_owned(), hwm as f64 / 1024.0),
        (
            "per_conn_kib".to_owned(),
            (after as f64 - before as f64) / open as f64,
        ),
    ]))
}

/// Opens a connection (retrying while the accept queue is full) and makes one call on it.
async fn open_idle(sock: PathBuf, seqid: i32) -> anyhow::Result<UnixStream> {
    let mut attempt = 0;
    let mut stream = loop {
        match UnixStream::connect(&sock).await {
            Ok(s) => break s,
            Err(e) if attempt < 200 => {
                attempt += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("connect"),
        }
    };
    let mut frames = FrameReader::default();
    let call = load::call_on(&mut stream, &mut frames, ECHO, seqid, 16);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(Ok(()))) => Ok(stream),
        Ok(Ok(Err(failure))) => bail!("call failed: {failure}"),
        Ok(Err(e)) => Err(e).context("call"),
        Err(_) => bail!("call timed out"),
    }
}
