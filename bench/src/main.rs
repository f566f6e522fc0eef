//! `rpc-bench`: side-by-side numbers for every hop of rpc_proxy, each against the baselines
//! a user would pick instead, measured in the same run (this machine is small, shared and
//! noisy, so every figure is a ratio or a CPU-per-call against a baseline of the same round).
//!
//! `rpc-bench` (or `make bench`) builds `rpc_proxy` and `rpc_lb`, starts a throwaway
//! ZooKeeper and every system it drives, runs the scenarios interleaved for several rounds,
//! stops everything and writes `bench/results/latest.md` and `latest.json`. `--smoke` runs
//! one tiny round and fails when a scenario produced no numbers (it asserts no timing).
//!
//! # Layout
//! - [`scenarios`]: the seven scenarios and the systems they keep running.
//! - [`load`]: the closed-loop load generator (connections, pipelining, histograms, CPU).
//! - [`blocking`]: the blocking load shape (a thread and a connection per call in flight).
//! - [`systems`]: starting `rpc_proxy`, `rpc_lb`, haproxy, Python servers, helpers.
//! - [`echo`], [`forwarder`]: the Rust echo backend and the minimal frame forwarder (also
//!   run as hidden subcommands of this binary).
//! - [`procs`]: child processes, `/proc` readings (CPU, RSS), pinning, file limits.
//! - [`zk`]: registering endpoints in ZooKeeper.
//! - [`wire`]: the hand-encoded `echo(1: string s)` call.
//! - [`report`]: medians and ranges, Markdown and JSON.

mod blocking;
mod echo;
mod forwarder;
mod load;
mod procs;
mod report;
mod scenarios;
mod systems;
mod wire;
mod zk;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::report::{Check, Fmt, Results, col};
use crate::scenarios::names::{PROXY, PROXY_PREV};
use crate::scenarios::{Bench, Settings};
use crate::systems::Bins;

/// Benchmarks of rpc_proxy against direct calls, a minimal forwarder, haproxy and the
/// Python Thrift servers.
#[derive(Debug, Parser)]
#[command(name = "rpc-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

/// Options of the benchmark run.
#[derive(Debug, Args)]
struct RunArgs {
    /// One tiny round; fail unless every scenario produced numbers (no timing asserted).
    #[arg(long)]
    smoke: bool,
    /// Rounds of every scenario (default 5, scenario 7: 7; 1 with --smoke).
    #[arg(long)]
    rounds: Option<usize>,
    /// Warm-up before each window, ms (default 1000, scenario 7: 300; with --smoke 150
    /// and 100).
    #[arg(long)]
    warmup_ms: Option<u64>,
    /// Measuring window, ms (default 2000; with --smoke 300, scenario 7: 200).
    #[arg(long)]
    window_ms: Option<u64>,
    /// Idle client connections of scenario 5 (default 10000; 300 with --smoke).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Services (x 4 endpoints) of scenario 6 (default 1000; 40 with --smoke).
    #[arg(long)]
    services: Option<usize>,
    /// Scenarios to run, e.g. `1,3` or `7` (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Where latest.md and latest.json go (default bench/results; with --smoke
    /// target/rpc-bench-smoke).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Directory holding rpc_proxy and rpc_lb (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory holding a previous build's rpc_proxy, run beside the current one in the
    /// same rounds of scenarios 1 and 7 (before/after).
    #[arg(long)]
    baseline_bin_dir: Option<PathBuf>,
    /// Do not run `cargo build` for rpc_proxy and rpc_lb first.
    #[arg(long)]
    no_build: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the echo backend on unix sockets (used by the harness).
    #[command(hide = true)]
    EchoServer {
        /// Socket to listen on (repeatable).
        #[arg(long, required = true)]
        unix: Vec<PathBuf>,
        /// Runtime threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Run the minimal frame forwarder (used by the harness).
    #[command(hide = true)]
    Forwarder {
        /// Socket to listen on.
        #[arg(long)]
        listen: PathBuf,
        /// Socket to forward to.
        #[arg(long)]
        upstream: PathBuf,
    },
    /// Drive load at a unix socket and print calls/s, latency and CPU per call.
    Load {
        /// The socket to call.
        #[arg(long)]
        unix: PathBuf,
        /// Client connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Calls in flight per connection.
        #[arg(long, default_value_t = 1)]
        depth: usize,
        /// Message name.
        #[arg(long, default_value = "echo:echo")]
        name: String,
        /// Bytes of the string argument.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Warm-up, ms.
        #[arg(long, default_value_t = 1000)]
        warmup_ms: u64,
        /// Window, ms.
        #[arg(long, default_value_t = 5000)]
        window_ms: u64,
        /// Process (group) ids whose CPU per call to report.
        #[arg(long)]
        pid: Vec<u32>,
        /// Blocking clients instead: one OS thread per connection, one call at a time
        /// (scenario 7's shape; `--depth` is ignored).
        #[arg(long)]
        blocking: bool,
    },
    /// Start ZooKeeper, the echo backend, rpc_proxy, rpc_lb and workers, print their
    /// sockets and pids, and wait for Ctrl-C (for profiling with `load`).
    Up {
        /// Directory holding rpc_proxy and rpc_lb (default: next to this binary).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Directory holding a previous build's rpc_proxy, started beside the current one.
        #[arg(long)]
        baseline_bin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Cmd::EchoServer { unix, threads }) => serve_echo(unix, threads),
        Some(Cmd::Forwarder { listen, upstream }) => serve_forwarder(listen, upstream),
        Some(Cmd::Load {
            unix,
            connections,
            depth,
            name,
            payload,
            warmup_ms,
            window_ms,
            pid,
            blocking,
        }) => {
            let load = load::Load {
                socket: unix,
                connections,
                depth,
                name,
                payload,
            };
            let window = load::Window {
                warmup: Duration::from_millis(warmup_ms),
                window: Duration::from_millis(window_ms),
            };
            if blocking {
                run_load_blocking(load, window, pid)
            } else {
                runtime().and_then(|rt| rt.block_on(run_load(load, window, pid)))
            }
        }
        Some(Cmd::Up {
            bin_dir,
            baseline_bin_dir,
        }) => up(bin_dir, baseline_bin_dir),
        None => bench(cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rpc-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_threads(None)
}

/// A multi-thread runtime with `threads` workers (default: one per CPU).
fn runtime_threads(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    builder.enable_all().build().context("start tokio runtime")
}

fn serve_echo(sockets: Vec<PathBuf>, threads: Option<usize>) -> anyhow::Result<ExitCode> {
    runtime_threads(threads)?.block_on(async {
        let stats = std::sync::Arc::new(echo::Stats::default());
        let mut tasks = Vec::new();
        for path in &sockets {
            let listener = echo::bind(path).with_context(|| format!("bind {path:?}"))?;
            tasks.push(tokio::spawn(echo::serve(listener, stats.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn serve_forwarder(listen: PathBuf, upstream: PathBuf) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let listener = echo::bind(&listen).with_context(|| format!("bind {listen:?}"))?;
        forwarder::serve(listener, upstream).await;
        Ok(ExitCode::SUCCESS)
    })
}

fn watched_pids(pids: &[u32]) -> Vec<load::Watched> {
    pids.iter()
        .map(|p| load::Watched {
            label: p.to_string(),
            pgid: *p,
        })
        .collect()
}

async fn run_load(
    load: load::Load,
    window: load::Window,
    pids: Vec<u32>,
) -> anyhow::Result<ExitCode> {
    procs::raise_nofile(200_000);
    let watched = watched_pids(&pids);
    let o = load::run(&load, window, &watched).await?;
    print_outcome(&o, &watched);
    Ok(ExitCode::SUCCESS)
}

fn run_load_blocking(
    load: load::Load,
    window: load::Window,
    pids: Vec<u32>,
) -> anyhow::Result<ExitCode> {
    procs::raise_nofile(200_000);
    let watched = watched_pids(&pids);
    let load = blocking::BlockingLoad {
        socket: load.socket,
        threads: load.connections,
        name: load.name,
        payload: load.payload,
    };
    let o = blocking::run(&load, window, &watched)?;
    print_outcome(&o, &watched);
    Ok(ExitCode::SUCCESS)
}

fn print_outcome(o: &load::Outcome, watched: &[load::Watched]) {
    println!(
        "{:.0} calls/s  p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  errors {}  served {}/{}  client CPU {:.2} us/call",
        o.rate(),
        o.percentile_us(0.5),
        o.percentile_us(0.99),
        o.percentile_us(0.999),
        o.errors,
        o.served(),
        o.per_connection.len(),
        o.client_cpu * 1e6 / o.calls.max(1) as f64,
    );
    for (w, cpu) in watched.iter().zip(&o.cpu) {
        println!(
            "pid {}: {:.2} us CPU per call ({:.2} CPU s)",
            w.label,
            cpu * 1e6 / o.calls.max(1) as f64,
            cpu
        );
    }
    if let Some(e) = &o.first_error {
        println!("first error: {e}");
    }
}

/// The repository root (this crate's parent directory).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds rpc_proxy and rpc_lb in this binary's profile, unless told not to.
fn bins(
    bin_dir: Option<PathBuf>,
    baseline_bin_dir: Option<PathBuf>,
    build: bool,
) -> anyhow::Result<Bins> {
    let repo = repo_root();
    let me = std::env::current_exe().context("locate rpc-bench")?;
    let release = !cfg!(debug_assertions);
    if build && bin_dir.is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&repo)
            .args(["build", "-q", "-p", "rpc-proxy", "-p", "rpc-lb"]);
        if release {
            cmd.arg("--release");
        }
        eprintln!(
            "rpc-bench: cargo build{} -p rpc-proxy -p rpc-lb",
            if release { " --release" } else { "" }
        );
        let status = cmd.status().context("run cargo build")?;
        if !status.success() {
            bail!("cargo build of rpc_proxy and rpc_lb failed");
        }
    }
    let dir = match bin_dir {
        Some(d) => d,
        None => me
            .parent()
            .map(Path::to_path_buf)
            .context("rpc-bench has no parent directory")?,
    };
    let bins = Bins {
        proxy: dir.join("rpc_proxy"),
        lb: dir.join("rpc_lb"),
        baseline_proxy: baseline_bin_dir.map(|d| d.join("rpc_proxy")),
        me,
        python: std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned()),
        repo,
    };
    for bin in [&bins.proxy, &bins.lb] {
        if !bin.exists() {
            bail!("{} not found (build it, or pass --bin-dir)", bin.display());
        }
    }
    if let Some(prev) = &bins.baseline_proxy
        && !prev.exists()
    {
        bail!("{} not found (--baseline-bin-dir)", prev.display());
    }
    Ok(bins)
}

fn settings(args: &RunArgs) -> Settings {
    let smoke = args.smoke;
    let pick = |given: Option<u64>, full: u64, small: u64| {
        given.unwrap_or(if smoke { small } else { full })
    };
    let only = if args.only.is_empty() {
        (1..=7).collect()
    } else {
        args.only.clone()
    };
    Settings {
        rounds: args.rounds.unwrap_or(if smoke { 1 } else { 5 }),
        window: load::Window {
            warmup: Duration::from_millis(pick(args.warmup_ms, 1000, 150)),
            window: Duration::from_millis(pick(args.window_ms, 2000, 300)),
        },
        blocking_rounds: args.rounds.unwrap_or(if smoke { 1 } else { 7 }),
        blocking_window: load::Window {
            warmup: Duration::from_millis(pick(args.warmup_ms, 300, 100)),
            window: Duration::from_millis(pick(args.window_ms, 2000, 200)),
        },
        smoke,
        idle_connections: args
            .idle_connections
            .unwrap_or(if smoke { 300 } else { 10_000 }),
        services: args.services.unwrap_or(if smoke { 40 } else { 1000 }),
        deletion_trials: if smoke { 2 } else { 5 },
        only,
    }
}

fn bench(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(&args);
    if let Some(bad) = args.only.iter().find(|s| !(1..=7).contains(*s)) {
        bail!("no scenario {bad} (scenarios are 1-7)");
    }
    let bins = bins(
        args.bin_dir.clone(),
        args.baseline_bin_dir.clone(),
        !args.no_build,
    )?;
    let nofile = procs::raise_nofile(200_000);
    if nofile < settings.idle_connections as u64 + settings.services as u64 * 4 + 1000 {
        eprintln!("rpc-bench: warning: open-file limit {nofile} is low for scenarios 5 and 6");
    }
    let out = args.out.clone().unwrap_or_else(|| {
        if settings.smoke {
            repo_root().join("target/rpc-bench-smoke")
        } else {
            repo_root().join("bench/results")
        }
    });
    let stem = if settings.smoke { "smoke" } else { "latest" };
    eprintln!("rpc-bench: starting ZooKeeper");
    let zk = rpc_testkit::ZkServer::start();
    let started = std::time::Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rt = runtime()?;
    let (results, missing) = rt.block_on(async {
        let mut bench = Bench::new(settings.clone(), bins.clone(), zk.connect_string()).await?;
        let started_ok = bench.start().await;
        if let Err(e) = started_ok {
            bench.stop();
            return Err(e);
        }
        for round in 0..settings.total_rounds() {
            bench.round(round).await;
        }
        bench.stop();
        let missing = bench.missing();
        anyhow::Ok((std::mem::take(&mut bench.results), missing))
    })?;
    drop(zk);
    let mut results = results;
    results.finish();
    results.checks = checks(&results);
    // Only the targets of the scenarios run.
    results.checks.retain(|c| {
        c.scenario
            .parse::<u8>()
            .is_ok_and(|n| settings.only.contains(&n))
    });
    fill_meta(
        &mut results,
        &settings,
        &bins,
        &load_before,
        started.elapsed(),
    );
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let md = markdown(&results, &settings, &missing);
    let md_path = out.join(format!("{stem}.md"));
    let json_path = out.join(format!("{stem}.json"));
    std::fs::write(&md_path, &md)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    if settings.smoke {
        let points = results
            .points
            .iter()
            .filter(|p| !p.samples.is_empty())
            .count();
        if settings.only.contains(&7) {
            println!("{}", blocking_section(&results));
        }
        println!(
            "rpc-bench: smoke: {points} points with numbers, {} missing",
            missing.len()
        );
    } else {
        println!("{md}");
    }
    eprintln!(
        "rpc-bench: wrote {} and {} in {:.0} s",
        md_path.display(),
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    if missing.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for m in &missing {
            eprintln!("rpc-bench: MISSING {m}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn up(bin_dir: Option<PathBuf>, baseline_bin_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let bins = bins(bin_dir, baseline_bin_dir, false)?;
    procs::raise_nofile(200_000);
    let zk = rpc_testkit::ZkServer::start();
    let settings = Settings {
        rounds: 0,
        window: load::Window {
            warmup: Duration::ZERO,
            window: Duration::ZERO,
        },
        blocking_rounds: 0,
        blocking_window: load::Window {
            warmup: Duration::ZERO,
            window: Duration::ZERO,
        },
        smoke: false,
        idle_connections: 0,
        services: 0,
        deletion_trials: 0,
        only: vec![1, 3, 4],
    };
    runtime()?.block_on(async {
        let mut bench = Bench::new(settings, bins, zk.connect_string()).await?;
        bench.start().await?;
        println!("zookeeper {}", zk.connect_string());
        println!("{}", bench.describe());
        println!("Ctrl-C stops everything.");
        let _ = tokio::signal::ctrl_c().await;
        bench.stop();
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

// === report ===

fn fill_meta(
    results: &mut Results,
    settings: &Settings,
    bins: &Bins,
    load_before: &str,
    elapsed: Duration,
) {
    use serde_json::json;
    let cmd_out = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let m = &mut results.meta;
    m.insert(
        "date".into(),
        json!(chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string()),
    );
    m.insert("smoke".into(), json!(settings.smoke));
    m.insert("rounds".into(), json!(settings.rounds));
    m.insert(
        "warmup_ms".into(),
        json!(settings.window.warmup.as_millis() as u64),
    );
    m.insert(
        "window_ms".into(),
        json!(settings.window.window.as_millis() as u64),
    );
    m.insert("blocking_rounds".into(), json!(settings.blocking_rounds));
    m.insert(
        "blocking_warmup_ms".into(),
        json!(settings.blocking_window.warmup.as_millis() as u64),
    );
    m.insert(
        "blocking_window_ms".into(),
        json!(settings.blocking_window.window.as_millis() as u64),
    );
    m.insert("idle_connections".into(), json!(settings.idle_connections));
    m.insert("services".into(), json!(settings.services));
    m.insert(
        "cpus".into(),
        json!(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
    );
    m.insert("cpu_model".into(), json!(cpu_model));
    m.insert("loadavg_before".into(), json!(load_before.trim()));
    m.insert(
        "loadavg_after".into(),
        json!(
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        ),
    );
    m.insert("elapsed_s".into(), json!(elapsed.as_secs()));
    m.insert(
        "profile".into(),
        json!(if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }),
    );
    m.insert("rpc_proxy".into(), json!(bins.proxy.display().to_string()));
    if let Some(prev) = &bins.baseline_proxy {
        m.insert(
            "rpc_proxy_previous".into(),
            json!(prev.display().to_string()),
        );
    }
    m.insert(
        "git".into(),
        json!(cmd_out(
            "git",
            &[
                "-C",
                &bins.repo.display().to_string(),
                "describe",
                "--always",
                "--dirty"
            ]
        )),
    );
    m.insert("haproxy".into(), json!(cmd_out("haproxy", &["-v"])));
    m.insert(
        "python".into(),
        json!(cmd_out(&bins.python, &["--version"])),
    );
    m.insert(
        "python_thrift".into(),
        json!(cmd_out(
            &bins.python,
            &[
                "-c",
                "import importlib.metadata as m; print(m.version('thrift'))"
            ]
        )),
    );
}

/// Scenario 7: the Go original proxy's calls/s as a fraction of direct, at 1, 4 and 64 in
/// flight, as measured in issue 16 (the Go proxy is not available here: fixed references).
const GO_BLOCKING_RATIOS: [(usize, f64); 3] = [(1, 0.85), (4, 0.64), (64, 0.62)];

/// Checks the targets against the medians.
fn checks(r: &Results) -> Vec<Check> {
    use scenarios::names::*;
    let mut out = Vec::new();
    let med = |s: &str, c: &str, t: &str, m: &str| r.summary(s, c, t, m).map(|x| x.median);
    let mut check = |scenario: &str, goal: &str, measured: Option<String>, met: Option<bool>| {
        out.push(Check {
            scenario: scenario.to_owned(),
            goal: goal.to_owned(),
            measured: measured.unwrap_or_else(|| "not measured".to_owned()),
            met,
        });
    };
    let c64 = "64 in flight";
    let ratio = med("1", c64, PROXY, "ratio");
    check(
        "1",
        "rpc_proxy at 64 in flight >= 0.55x direct",
        ratio.map(|v| format!("{v:.2}x")),
        ratio.map(|v| v >= 0.55),
    );
    let cpu = med("1", c64, PROXY, "hop_cpu_us");
    check(
        "1",
        "rpc_proxy CPU per call at 64 in flight <= 7 us",
        cpu.map(|v| format!("{v:.1} us")),
        cpu.map(|v| v <= 7.0),
    );
    for hop in [HAPROXY, FORWARDER] {
        let ratio = med("1", c64, hop, "ratio");
        let cpu = med("1", c64, hop, "hop_cpu_us");
        let measured = match (ratio, cpu) {
            (Some(r), Some(c)) => Some(format!("{r:.2}x, {c:.1} us")),
            _ => None,
        };
        check(
            "1",
            &format!("reference: {hop} about 0.41-0.43x and 13 us"),
            measured,
            None,
        );
    }
    let added = med("1-pinned", PINNED_CASE, PROXY, "added_p50_us");
    check(
        "1",
        "1 in flight pinned to one core: rpc_proxy adds <= 12 us (p50)",
        added.map(|v| format!("{v:.1} us")),
        added.map(|v| v <= 12.0),
    );
    // Scenario 7 (issue 16): blocking clients.
    for (inflight, go) in GO_BLOCKING_RATIOS {
        let case = inflight.to_string();
        let ratio = med("7", &case, PROXY, "ratio");
        check(
            "7",
            &format!(
                "blocking, {inflight} in flight: rpc_proxy >= {go:.2}x direct (the Go original's ratio, a fixed reference from issue 16)"
            ),
            ratio.map(|v| format!("{v:.2}x")),
            ratio.map(|v| v >= go),
        );
    }
    let ratio = med("7", "64", PROXY, "ratio");
    check(
        "7",
        "blocking, 64 in flight: rpc_proxy >= 0.80x direct",
        ratio.map(|v| format!("{v:.2}x")),
        ratio.map(|v| v >= 0.80),
    );
    let cpu = med("7", "64", PROXY, "hop_cpu_us");
    check(
        "7",
        "blocking, 64 in flight: rpc_proxy CPU per call <= 9 us",
        cpu.map(|v| format!("{v:.1} us")),
        cpu.map(|v| v <= 9.0),
    );
    for inflight in scenarios::BLOCKING_INFLIGHT {
        let case = inflight.to_string();
        let vs = med("7", &case, PROXY, "p99_vs_previous");
        let now = med("7", &case, PROXY, "p99_us");
        let before = med("7", &case, PROXY_PREV, "p99_us");
        check(
            "7",
            &format!(
                "blocking, {inflight} in flight: rpc_proxy p99 not worse than the previous build's (median of per-round ratios <= 1.00)"
            ),
            match (vs, now, before) {
                (Some(vs), Some(now), Some(before)) => {
                    Some(format!("{now:.1} us vs {before:.1} us ({vs:.2}x)"))
                }
                _ => None,
            },
            vs.map(|v| v <= 1.0),
        );
    }
    let gbs = med("2", "4 MiB bodies, 2 conns", PROXY, "gb_per_s");
    check(
        "2",
        "4 MiB bodies through rpc_proxy >= 1 GB/s",
        gbs.map(|v| format!("{v:.2} GB/s")),
        gbs.map(|v| v >= 1.0),
    );
    let c8 = "8 clients";
    let vs = med("3", c8, PY_LB, "vs_pool_best");
    check(
        "3",
        "LB + 2 workers at 8 clients >= 1.0x TProcessPoolServer(2) at its best",
        vs.map(|v| format!("{v:.2}x")),
        vs.map(|v| v >= 1.0),
    );
    let served = r.summary("3", c8, PY_LB, "served").map(|s| s.min);
    check(
        "3",
        "LB + 2 workers: all 8 clients served",
        served.map(|v| format!("{v:.0}/8 (worst round)")),
        served.map(|v| v >= 8.0),
    );
    let p99 = med("3", c8, PY_LB, "p99_us");
    check(
        "3",
        "LB + 2 workers at 8 clients: p99 <= 2 ms",
        p99.map(|v| format!("{:.2} ms", v / 1e3)),
        p99.map(|v| v <= 2000.0),
    );
    let case5 = r
        .points
        .iter()
        .find(|p| p.scenario == "5" && p.target == PROXY)
        .map(|p| p.case.clone());
    let rss = case5
        .as_deref()
        .and_then(|c| med("5", c, PROXY, "rss_after_mib"));
    check(
        "5",
        "rpc_proxy RSS with the idle connections <= 64 MB",
        rss.map(|v| format!("{v:.1} MiB")),
        rss.map(|v| v <= 64.0),
    );
    let table = med("6", "discovery", PROXY, "table_ms");
    check(
        "6",
        "proxy start to full routing table <= 0.5 s",
        table.map(|v| format!("{v:.0} ms")),
        table.map(|v| v <= 500.0),
    );
    let del = med("6", "discovery", PROXY, "deletion_ms_median");
    let del_max = r
        .summary("6", "discovery", PROXY, "deletion_ms_max")
        .map(|s| s.max);
    check(
        "6",
        "endpoint node deleted to routing stopped <= 2 ms",
        del.map(|v| {
            format!(
                "{v:.2} ms (worst trial {:.2} ms)",
                del_max.unwrap_or(f64::NAN)
            )
        }),
        del.map(|v| v <= 2.0),
    );
    let uncalled = r
        .summary("6", "discovery", PROXY, "uncalled_connections")
        .map(|s| s.max);
    check(
        "6",
        "no upstream connection to endpoints of services nobody called",
        uncalled.map(|v| format!("{v:.0} connections")),
        uncalled.map(|v| v == 0.0),
    );
    out
}

fn markdown(r: &Results, settings: &Settings, missing: &[String]) -> String {
    use std::fmt::Write as _;
    let meta = |k: &str| {
        r.meta
            .get(k)
            .map(|v| v.to_string().trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# rpc_proxy benchmarks{}\n",
        if settings.smoke {
            " (smoke run: sizes too small to mean anything)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "Run {} on {} CPUs ({}), load average before: {}, after: {}; {} rounds, {} ms warm-up + {} ms window per point (scenario 7: {} rounds, {} ms + {} ms); {} build of `{}`; took {} s.\n",
        meta("date"),
        meta("cpus"),
        meta("cpu_model"),
        meta("loadavg_before"),
        meta("loadavg_after"),
        meta("rounds"),
        meta("warmup_ms"),
        meta("window_ms"),
        meta("blocking_rounds"),
        meta("blocking_warmup_ms"),
        meta("blocking_window_ms"),
        meta("profile"),
        meta("git"),
        meta("elapsed_s"),
    );
    md.push_str(
        "Command: `make bench` (= `cargo run -p rpc-bench --release`). Every cell is the median over rounds, \
         with (min-max). Targets run interleaved within each round (order rotated every round). \
         Ratios are taken against the baseline of the same round. CPU figures are `utime+stime` of the \
         process group from `/proc/<pid>/stat`, read right before and after the window, divided by the calls \
         completed in it. The load generator is a closed loop over unix sockets; \"N in flight\" is N \
         connections with one call outstanding each. All sockets are unix sockets.\n\n",
    );
    let shown = |n: u8| settings.only.contains(&n);
    md.push_str("## Targets\n\n");
    md.push_str(&report::checks_table(r));
    let us = |h, m| col(h, m, Fmt::Dec1);
    if shown(1) {
        md.push_str("\n## 1. Proxy hop (100 B string argument)\n\n");
        md.push_str(&report::table(
            r,
            "1",
            &[
                col("calls/s", "calls_per_s", Fmt::Count),
                col("x direct", "ratio", Fmt::Ratio),
                us("p50 us", "p50_us"),
                us("p99 us", "p99_us"),
                col("hop CPU us/call", "hop_cpu_us", Fmt::Dec2),
                col("echo CPU us/call", "echo_cpu_us", Fmt::Dec2),
                col("client CPU us/call", "client_cpu_us", Fmt::Dec2),
            ],
        ));
        md.push_str(
            "\n`rpc_proxy` runs its default `worker_threads=1` (a current-thread runtime); \
             `rpc_proxy, worker_threads=2` is the same binary with two runtime threads, for \
             comparison. Reference: the Go original proxy, measured the same way, reached 0.38x \
             direct at 14.4 us of CPU per call (64 in flight).\n",
        );
        md.push_str(
            "\n### 1 in flight, client, echo backend and hop all pinned to one CPU (taskset; the idlest one at the time)\n\n",
        );
        md.push_str(&report::table(
            r,
            "1-pinned",
            &[
                us("p50 us", "p50_us"),
                us("added p50 us", "added_p50_us"),
                us("mean us", "mean_us"),
                us("added mean us", "added_mean_us"),
                col("calls/s", "calls_per_s", Fmt::Count),
                col("hop CPU us/call", "hop_cpu_us", Fmt::Dec2),
            ],
        ));
    }
    if shown(7) {
        md.push('\n');
        md.push_str(&blocking_section(r));
    }
    if shown(2) {
        md.push_str("\n## 2. Large bodies (echoed: each call carries the body both ways)\n\n");
        md.push_str(&report::table(
            r,
            "2",
            &[
                col("MB/s (each way)", "mb_per_s", Fmt::Int),
                col("x direct", "ratio", Fmt::Ratio),
                col("calls/s", "calls_per_s", Fmt::Count),
                us("p50 us", "p50_us"),
                us("p99 us", "p99_us"),
                col("hop CPU us/MB", "hop_cpu_us_per_mb", Fmt::Dec1),
            ],
        ));
    }
    if shown(3) {
        md.push_str(
            "\n## 3. Python tier (same trivial echo handler; clients send bare `echo`)\n\n",
        );
        md.push_str(&report::table(
            r,
            "3",
            &[
                col("calls/s", "calls_per_s", Fmt::Count),
                col("x TProcessPool(2) best", "vs_pool_best", Fmt::Ratio),
                us("p50 us", "p50_us"),
                us("p99 us", "p99_us"),
                col("clients served", "served", Fmt::Int),
                col("clients", "clients", Fmt::Int),
                col("server CPU us/call", "server_cpu_us", Fmt::Dec1),
            ],
        ));
        md.push_str("\nA client with zero calls completed in the window was starved. Server CPU includes every process of the server (LB + workers; pool workers).\n");
    }
    if shown(4) {
        md.push_str("\n## 4. Full path: client -> rpc_proxy -> rpc_lb -> 2 workers\n\n");
        md.push_str(&report::table(
            r,
            "4",
            &[
                col("calls/s", "calls_per_s", Fmt::Count),
                col("x client->LB", "ratio", Fmt::Ratio),
                us("p50 us", "p50_us"),
                us("p99 us", "p99_us"),
                col("proxy CPU us/call", "proxy_cpu_us", Fmt::Dec2),
                col("LB CPU us/call", "lb_cpu_us", Fmt::Dec2),
                col("workers CPU us/call", "workers_cpu_us", Fmt::Dec1),
            ],
        ));
    }
    if shown(5) {
        md.push_str("\n## 5. Memory with idle client connections (each made one call)\n\n");
        md.push_str(&report::table(
            r,
            "5",
            &[
                col("connections", "connections", Fmt::Int),
                col("RSS before MiB", "rss_before_mib", Fmt::Dec1),
                col("RSS after MiB", "rss_after_mib", Fmt::Dec1),
                col("peak RSS MiB", "hwm_mib", Fmt::Dec1),
                col("KiB per connection", "per_conn_kib", Fmt::Dec1),
            ],
        ));
        md.push_str("\nThe forwarder and haproxy also hold one upstream connection per client connection; rpc_proxy shares one.\n");
    }
    if shown(6) {
        md.push_str("\n## 6. Discovery at scale\n\n");
        md.push_str(&report::table(
            r,
            "6",
            &[
                col("services", "services", Fmt::Int),
                col("endpoints", "endpoints", Fmt::Int),
                us("start to accept ms", "accept_ms"),
                us("start to full table ms", "table_ms"),
                us("(log line) ms", "log_table_ms"),
                us("baseline: fresh ZK client reads all ms", "zk_read_all_ms"),
                col(
                    "deletion to stop ms (median)",
                    "deletion_ms_median",
                    Fmt::Dec2,
                ),
                col("(worst trial)", "deletion_ms_max", Fmt::Dec2),
                col(
                    "baseline: ZK watch fired ms",
                    "zk_watch_ms_median",
                    Fmt::Dec2,
                ),
                col("re-add to first call ms", "readd_ms_median", Fmt::Dec2),
                col(
                    "conns to uncalled endpoints",
                    "uncalled_connections",
                    Fmt::Int,
                ),
            ],
        ));
        md.push_str(
            "\nFull table: time from spawning rpc_proxy until calls to a sample of services (the last ones listed, \
             the first, and some in between) all succeed; its baseline is a fresh session of a plain ZooKeeper \
             client reading every service and endpoint (pipelined, as the proxy's discovery does). Deletion to \
             stop: time from issuing the ZooKeeper delete of one of a service's two endpoints, under load, to \
             the last call arriving at that endpoint's backend; its baseline is the time until ZooKeeper's \
             watch event reaches a plain client (the harness's own session).\n",
        );
    }
    if !r.skipped.is_empty() {
        md.push_str("\n## Skipped\n\n");
        for s in &r.skipped {
            let _ = writeln!(md, "- {s}");
        }
    }
    if !missing.is_empty() {
        md.push_str("\n## Missing numbers\n\n");
        for m in missing {
            let _ = writeln!(md, "- {m}");
        }
    }
    md
}

/// The report section of scenario 7 (also printed by a smoke run).
fn blocking_section(r: &Results) -> String {
    use std::fmt::Write as _;
    let mut md =
        String::from("## 7. Blocking clients (a connection per thread, one call at a time)\n\n");
    md.push_str(&report::table_headed(
        r,
        "7",
        ["in flight", "path"],
        &[
            col("calls/s", "calls_per_s", Fmt::Count),
            col("x direct", "ratio", Fmt::Ratio),
            col("p50 us", "p50_us", Fmt::Dec1),
            col("p99 us", "p99_us", Fmt::Dec1),
            col("proxy CPU us/call", "hop_cpu_us", Fmt::Dec2),
            col("backend CPU us/call", "echo_cpu_us", Fmt::Dec2),
            col("client CPU us/call", "client_cpu_us", Fmt::Dec2),
        ],
    ));
    let frame = wire::echo_call(scenarios::PING, 0, scenarios::PING_PAYLOAD).len();
    let _ = write!(
        md,
        "\nThe issue 16 load shape, next to scenario 1's async client: N OS threads (\"in flight\"), each a \
         blocking client (`std::os::unix::net::UnixStream`) on its own connection, in a closed loop of one call at \
         a time: a {frame}-byte frame, strict binary CALL `{}` (bare `{}` direct) whose args are field 1, a \
         {}-byte string; the reply's type and seqid are checked. The backend is the echo server with 2 runtime \
         threads, registered in ZooKeeper as service `echo`; it answers each CALL with a REPLY of the same name \
         and seqid. Nothing is pinned. Latency is write to whole reply. \"proxy CPU\" is the hop's process \
         (rpc_proxy, haproxy or the forwarder), \"client CPU\" this harness's process (the client threads). \
         Reference (issue 16, same shape, Go original proxy, not run here): 0.83-0.85x direct at 1 in flight, \
         0.64x at 4, 0.62x at 64 with 11.2 us of proxy CPU per call; haproxy 0.66-0.70x, 0.39x, 0.43x.\n",
        scenarios::PING,
        scenarios::PING_DIRECT,
        scenarios::PING_PAYLOAD,
    );
    // How quiet the box was: what else ran during the windows of this scenario.
    let noise = |metric: &str| {
        let mut v: Vec<f64> = r
            .points
            .iter()
            .filter(|p| p.scenario == "7")
            .flat_map(|p| p.samples.iter().filter_map(|s| s.get(metric).copied()))
            .filter(|v| v.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| (v[v.len() / 2], v[v.len() - 1]))
    };
    if let (Some((other, other_max)), Some((steal, steal_max))) =
        (noise("other_cpu_pct"), noise("steal_pct"))
    {
        let _ = writeln!(
            md,
            "\nNoise: besides the client, the hop and the backend, the machine was busy {other:.0}% of one CPU \
             during a window (median over windows; worst {other_max:.0}%), and the hypervisor stole \
             {steal:.0}% (worst {steal_max:.0}%)."
        );
    }
    if let Some(prev) = r.meta.get("rpc_proxy_previous") {
        let _ = write!(
            md,
            "\n`{PROXY_PREV}` is {} with the same config, run in the same rounds.",
            prev.to_string().trim_matches('"'),
        );
        let mut cells = Vec::new();
        for inflight in scenarios::BLOCKING_INFLIGHT {
            let case = inflight.to_string();
            let rate = r.summary("7", &case, PROXY, "vs_previous");
            let p99 = r.summary("7", &case, PROXY, "p99_vs_previous");
            cells.push(format!(
                "{inflight} in flight: calls/s {}, p99 {}",
                report::cell(rate, Fmt::Ratio),
                report::cell(p99, Fmt::Ratio)
            ));
        }
        let _ = writeln!(
            md,
            " rpc_proxy over the previous build (per-round ratios): {}.",
            cells.join("; ")
        );
    }
    md
}
