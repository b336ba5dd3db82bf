//! `cargo xtask bench`: kakehi against nginx and HAProxy, on this machine, in the same run.
//!
//! Owns the benchmark's procedure (DESIGN.md, "Measuring speed"): one shared nginx origin
//! serving static files; each proxy with one worker/thread, keep-alive to the origin, pinned
//! alone on the second CPU while wrk (`-t1`) and the origin share the first; each proxy checked
//! to answer 200 with the origin's body before it is measured; runs interleaved across proxies
//! and repeated, medians reported, with kakehi's ratios to the others. The steadiest figure is
//! the proxy's CPU time per request. It is a benchmark, not a test: nothing here passes or
//! fails on a number. Every process it starts is stopped by pid, on error too (drop guards).

mod configs;
mod procfs;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::procs::{self, Proc, Signals, SpawnOptions};
use report::Sample;

const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the machine may stay busy before a round starts anyway (with a warning).
const IDLE_WAIT: Duration = Duration::from_secs(30);
const IDLE_BELOW: f64 = 0.15;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum ProxyKind {
    Kakehi,
    Nginx,
    Haproxy,
}

impl ProxyKind {
    const ALL: [Self; 3] = [Self::Kakehi, Self::Nginx, Self::Haproxy];

    fn name(self) -> &'static str {
        match self {
            Self::Kakehi => "kakehi",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Length of each measured run [default: 10s; 3s with --quick].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Runs per proxy and scenario; medians are reported [default: 3; 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// A quick look: 3s runs, one each, no warm-up.
    #[arg(long)]
    quick: bool,
    /// Only these proxies (comma-separated).
    #[arg(long, value_delimiter = ',', value_enum)]
    proxies: Vec<ProxyKind>,
    /// Only these scenarios (comma-separated): keepalive-c50, keepalive-c200, 64k-c50, close-c50.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// HAProxy's `http-reuse` mode. "always" lets it reuse origin connections across clients,
    /// as nginx's upstream keepalive and kakehi do; "safe" is HAProxy's own default.
    #[arg(long, default_value = "always", value_parser = ["always", "aggressive", "safe", "never"])]
    haproxy_reuse: String,
}

struct Scenario {
    name: &'static str,
    path: &'static str,
    connections: u32,
    close: bool,
    about: &'static str,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "keepalive-c50",
        path: "/",
        connections: 50,
        close: false,
        about: "GET / (20 B), keep-alive, 50 connections",
    },
    Scenario {
        name: "keepalive-c200",
        path: "/",
        connections: 200,
        close: false,
        about: "GET / (20 B), keep-alive, 200 connections",
    },
    Scenario {
        name: "64k-c50",
        path: "/bytes/65536",
        connections: 50,
        close: false,
        about: "GET /bytes/65536 (64 KiB), keep-alive, 50 connections",
    },
    Scenario {
        name: "close-c50",
        path: "/",
        connections: 50,
        close: true,
        about: "GET / with Connection: close (a new client connection per request), 50 connections",
    },
];

/// A proxy that started and answered correctly.
struct Proxy {
    kind: ProxyKind,
    port: u16,
    proc: Proc,
    settings: String,
    version: String,
    /// False when the kernel refused to reset the peak RSS: then it is the peak since start.
    rss_per_run: bool,
}

/// Where things run and for how long.
struct Plan {
    dir: PathBuf,
    duration: Duration,
    runs: usize,
    warmup: bool,
    client: SpawnOptions,
    proxy: SpawnOptions,
}

pub fn bench(signals: &Signals, args: &Args) -> Result<()> {
    let scenarios: Vec<&Scenario> = if args.scenarios.is_empty() {
        SCENARIOS.iter().collect()
    } else {
        args.scenarios
            .iter()
            .map(|name| {
                SCENARIOS.iter().find(|s| s.name == name).with_context(|| {
                    let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                    format!("unknown scenario {name:?}; known: {}", names.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let kinds: Vec<ProxyKind> = ProxyKind::ALL
        .into_iter()
        .filter(|kind| args.proxies.is_empty() || args.proxies.contains(kind))
        .collect();
    let (client_cpu, proxy_cpu) = cpus();
    let plan = Plan {
        dir: crate::target_dir().join("bench"),
        duration: args.duration.unwrap_or(if args.quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(10)
        }),
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        warmup: !args.quick,
        client: SpawnOptions {
            cpu: client_cpu,
            own_group: true,
        },
        proxy: SpawnOptions {
            cpu: proxy_cpu,
            own_group: true,
        },
    };

    crate::setup::setup(signals, &crate::setup::BENCH)?;
    std::fs::create_dir_all(plan.dir.join("logs"))
        .with_context(|| format!("creating {}", plan.dir.display()))?;
    std::fs::write(plan.dir.join("report.lua"), configs::WRK_SCRIPT)?;

    let mut failed: Vec<(ProxyKind, String)> = Vec::new();
    if kinds.contains(&ProxyKind::Kakehi) {
        let mut build = Command::new("cargo");
        build.current_dir(crate::root()).args([
            "build",
            "--release",
            "-p",
            "lbd",
            "-p",
            "lb-testkit",
        ]);
        if let Err(error) = procs::run_step(signals, &mut build) {
            if signals.stop_requested()?.is_some() {
                return Err(error);
            }
            failed.push((ProxyKind::Kakehi, format!("build failed: {error:#}")));
        }
    }

    let ports = procs::free_ports(1 + kinds.len())?;
    let origin_port = ports[0];
    let _origin = start_origin(signals, &plan, origin_port)?;
    verify(origin_port).context("the origin nginx does not serve its files")?;

    let mut proxies: Vec<Proxy> = Vec::new();
    for (&kind, &port) in kinds.iter().zip(&ports[1..]) {
        if failed.iter().any(|(k, _)| *k == kind) {
            continue;
        }
        let started = start_proxy(signals, &plan, kind, port, origin_port, &args.haproxy_reuse)
            .and_then(|proxy| {
                verify(proxy.port)?;
                Ok(proxy)
            });
        match started {
            Ok(proxy) => {
                println!("xtask bench: {} ready on 127.0.0.1:{port}", kind.name());
                proxies.push(proxy);
            }
            Err(error) => {
                if signals.stop_requested()?.is_some() {
                    return Err(error);
                }
                eprintln!("xtask bench: {} skipped: {error:#}", kind.name());
                failed.push((kind, format!("{error:#}")));
            }
        }
    }
    if proxies.is_empty() {
        bail!(
            "no proxy could be started; see {}",
            plan.dir.join("logs").display()
        );
    }

    let pinning = match (client_cpu, proxy_cpu) {
        (Some(c), Some(p)) => format!("wrk -t1 and the origin on cpu{c}, each proxy on cpu{p}"),
        _ => "not pinned: fewer than 2 CPUs available".to_string(),
    };
    println!(
        "xtask bench: {} scenario(s) × {} proxies × {} run(s) of {}s; {pinning}",
        scenarios.len(),
        proxies.len(),
        plan.runs,
        wrk_seconds(plan.duration)
    );

    if plan.warmup {
        println!("xtask bench: warming up (1s per proxy and scenario)");
        for scenario in &scenarios {
            for proxy in &mut proxies {
                let _ = measure(signals, &plan, scenario, proxy, Duration::from_secs(1))?;
            }
        }
    }

    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); proxies.len()]; scenarios.len()];
    let mut notes: Vec<String> = Vec::new();
    for run in 1..=plan.runs {
        wait_until_idle(signals, &mut notes)?;
        for (s, scenario) in scenarios.iter().enumerate() {
            for (p, proxy) in proxies.iter_mut().enumerate() {
                let name = proxy.kind.name();
                match measure(signals, &plan, scenario, proxy, plan.duration)? {
                    Ok(sample) => {
                        println!(
                            "  run {run}/{} {:<15} {:<8} {:>9.0} req/s {:>7.1} µs/req  p99 {:.2} ms",
                            plan.runs, scenario.name, name, sample.rps, sample.cpu_us_per_req,
                            sample.p99_ms
                        );
                        samples[s][p].push(sample);
                    }
                    Err(error) => {
                        let note = format!("run {run} {} {name}: {error:#}", scenario.name);
                        eprintln!("  {note}");
                        notes.push(note);
                    }
                }
            }
        }
    }

    for proxy in &mut proxies {
        proxy.proc.stop();
    }
    let results = summarize(
        &plan, &scenarios, &proxies, &failed, &samples, &notes, &pinning,
    );
    let path = plan.dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nxtask bench: results written to {}", path.display());
    Ok(())
}

/// The first two CPUs this process may run on: (client, proxy).
fn cpus() -> (Option<usize>, Option<usize>) {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return (None, None);
    };
    let mut allowed =
        (0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false));
    match (allowed.next(), allowed.next()) {
        (Some(client), Some(proxy)) => (Some(client), Some(proxy)),
        _ => (None, None),
    }
}

fn wrk_seconds(duration: Duration) -> u64 {
    duration.as_secs().max(1)
}

/// A fresh directory for one program's generated files.
fn program_dir(plan: &Plan, name: &str) -> Result<PathBuf> {
    let dir = plan.dir.join(name);
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("tmp").join(sub))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(dir)
}

fn nginx_command(dir: &Path) -> Command {
    let mut cmd = Command::new(NGINX);
    cmd.arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    cmd
}

fn start_origin(signals: &Signals, plan: &Plan, port: u16) -> Result<Proc> {
    let dir = program_dir(plan, "origin")?;
    configs::origin_documents(&dir)?;
    std::fs::write(dir.join("nginx.conf"), configs::origin_nginx(&dir, port))?;
    let log = plan.dir.join("logs").join("origin.log");
    let mut proc = Proc::spawn_logged("origin nginx", &mut nginx_command(&dir), plan.client, &log)?;
    let addr = ([127, 0, 0, 1], port).into();
    procs::wait_for_accept(
        signals,
        addr,
        START_TIMEOUT,
        std::slice::from_mut(&mut proc),
    )
    .with_context(|| format!("the origin nginx did not start; {}", log_tail(&log)))?;
    Ok(proc)
}

fn start_proxy(
    signals: &Signals,
    plan: &Plan,
    kind: ProxyKind,
    port: u16,
    origin: u16,
    haproxy_reuse: &str,
) -> Result<Proxy> {
    let name = kind.name();
    let dir = program_dir(plan, name)?;
    let log = plan.dir.join("logs").join(format!("{name}.log"));
    let (mut cmd, settings, version) = match kind {
        ProxyKind::Kakehi => {
            let config = dir.join("lbd.toml");
            std::fs::write(&config, configs::kakehi(&dir, port, origin))?;
            let _ = std::fs::remove_file(dir.join("lbd.sock"));
            let lbd = crate::target_dir().join("release").join("lbd");
            let check = Command::new(&lbd)
                .arg("--config")
                .arg(&config)
                .arg("--check")
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {}", lbd.display()))?;
            if !check.status.success() {
                bail!(
                    "`lbd --config {} --check` refused the bench config: {}",
                    config.display(),
                    String::from_utf8_lossy(&check.stderr).trim()
                );
            }
            let mut cmd = Command::new(lbd);
            cmd.arg("--config").arg(&config);
            (cmd, configs::KAKEHI_SETTINGS.to_string(), String::new())
        }
        ProxyKind::Nginx => {
            std::fs::write(
                dir.join("nginx.conf"),
                configs::nginx_proxy(&dir, port, origin),
            )?;
            let version = version_of(Command::new(NGINX).arg("-v"));
            (
                nginx_command(&dir),
                configs::NGINX_SETTINGS.to_string(),
                version,
            )
        }
        ProxyKind::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, configs::haproxy(port, origin, haproxy_reuse))?;
            let mut cmd = Command::new(HAPROXY);
            cmd.arg("-db").arg("-f").arg(&config);
            let version = version_of(Command::new(HAPROXY).arg("-v"));
            (cmd, configs::haproxy_settings(haproxy_reuse), version)
        }
    };
    let mut proc = Proc::spawn_logged(name, &mut cmd, plan.proxy, &log)?;
    let addr = ([127, 0, 0, 1], port).into();
    procs::wait_for_accept(
        signals,
        addr,
        START_TIMEOUT,
        std::slice::from_mut(&mut proc),
    )
    .with_context(|| log_tail(&log))?;
    Ok(Proxy {
        kind,
        port,
        proc,
        settings,
        version,
        rss_per_run: true,
    })
}

/// The first line a program prints about its version, from stdout or stderr.
fn version_of(cmd: &mut Command) -> String {
    let Ok(output) = cmd.stdin(Stdio::null()).output() else {
        return String::new();
    };
    let text = [output.stdout, output.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
    if tail.is_empty() {
        format!("{} is empty", log.display())
    } else {
        format!("last lines of {}:\n    {tail}", log.display())
    }
}

/// `GET /` answers 200 with the origin's small body, `GET /bytes/65536` 200 with 64 KiB.
fn verify(port: u16) -> Result<()> {
    let checks = [
        ("/", Some(configs::SMALL_BODY), configs::SMALL_BODY.len()),
        ("/bytes/65536", None, configs::LARGE_SIZE),
    ];
    for (path, body, size) in checks {
        let url = format!("http://127.0.0.1:{port}{path}");
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let (got, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        if !output.status.success() || status != "200" || got.len() != size {
            bail!(
                "GET {url}: expected 200 with {size} bytes, got status {status:?} with {} bytes {}",
                got.len(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        if body.is_some_and(|body| body != got) {
            bail!("GET {url}: expected the body {body:?}, got {got:?}");
        }
    }
    Ok(())
}

/// Waits (bounded) for the machine to be idle before a round, as DESIGN.md asks.
fn wait_until_idle(signals: &Signals, notes: &mut Vec<String>) -> Result<()> {
    let deadline = Instant::now() + IDLE_WAIT;
    let mut said = false;
    loop {
        let Some(busy) = procfs::machine_busy(Duration::from_secs(1)) else {
            return Ok(());
        };
        if busy < IDLE_BELOW {
            return Ok(());
        }
        if let Some(signal) = signals.stop_requested()? {
            bail!("interrupted by {signal}");
        }
        if Instant::now() >= deadline {
            let note = format!(
                "the machine stayed {:.0}% busy for {}s before a round: figures may swing",
                busy * 100.0,
                IDLE_WAIT.as_secs()
            );
            eprintln!("xtask bench: warning: {note}");
            notes.push(note);
            return Ok(());
        }
        if !said {
            println!(
                "xtask bench: machine {:.0}% busy, waiting for it to settle",
                busy * 100.0
            );
            said = true;
        }
    }
}

/// One wrk run against `proxy`. The outer error stops the bench (interrupted); the inner one
/// is a failed run, noted and skipped.
fn measure(
    signals: &Signals,
    plan: &Plan,
    scenario: &Scenario,
    proxy: &mut Proxy,
    duration: Duration,
) -> Result<Result<Sample>> {
    if let Some(status) = proxy.proc.try_exited()? {
        return Ok(Err(anyhow::anyhow!(
            "{} is no longer running ({})",
            proxy.kind.name(),
            procs::describe(status)
        )));
    }
    let pid = proxy.proc.pid();
    let rss_reset = procfs::reset_peak_rss(pid);
    let cpu_before = procfs::cpu_ticks(pid);
    let seconds = wrk_seconds(duration);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "--timeout", "5s"])
        .arg(format!("-c{}", scenario.connections))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(plan.dir.join("report.lua"));
    if scenario.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{}{}", proxy.port, scenario.path));
    let log = plan.dir.join("logs").join("wrk.log");
    let mut wrk = Proc::spawn_logged("wrk", &mut cmd, plan.client, &log)?;
    let deadline = Instant::now() + Duration::from_secs(seconds + 20);
    let status = loop {
        if let Some(status) = wrk.try_exited()? {
            break status;
        }
        if let Some(signal) = signals.wait(Duration::from_millis(100))? {
            wrk.stop();
            bail!("interrupted by {signal}");
        }
        if Instant::now() >= deadline {
            wrk.stop();
            return Ok(Err(anyhow::anyhow!(
                "wrk did not finish in {}s",
                seconds + 20
            )));
        }
    };
    let cpu = procfs::cpu_ticks(pid).saturating_sub(cpu_before);
    let rss = procfs::peak_rss_kib(pid);
    proxy.rss_per_run &= rss_reset;
    if !status.success() {
        return Ok(Err(anyhow::anyhow!(
            "wrk failed ({}); {}",
            procs::describe(status),
            log_tail(&log)
        )));
    }
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    Ok(Sample::from_wrk(
        &output,
        cpu,
        procfs::ticks_per_second(),
        rss,
    ))
}

/// Prints the table and ratios, and returns the same as JSON.
fn summarize(
    plan: &Plan,
    scenarios: &[&Scenario],
    proxies: &[Proxy],
    failed: &[(ProxyKind, String)],
    samples: &[Vec<Vec<Sample>>],
    notes: &[String],
    pinning: &str,
) -> Value {
    println!(
        "\nkakehi benchmark: median of {} run(s) of {}s; proxy CPU = utime+stime of its process \
         tree over the run, per request; RSS = peak VmHWM of the tree",
        plan.runs,
        wrk_seconds(plan.duration)
    );
    let mut scenario_json = Vec::new();
    for (s, scenario) in scenarios.iter().enumerate() {
        println!("\n{} — {}", scenario.name, scenario.about);
        println!("{}", report::header());
        let mut results = serde_json::Map::new();
        let mut medians = Vec::new();
        for (p, proxy) in proxies.iter().enumerate() {
            let name = proxy.kind.name();
            let runs = &samples[s][p];
            let median = report::median(runs);
            match &median {
                Some(m) => println!("{}", report::row(name, m)),
                None => println!("  {name:<9} no successful run"),
            }
            results.insert(
                name.into(),
                json!({
                    "median": median.map(Sample::to_json),
                    "runs": runs.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
                }),
            );
            medians.push((proxy.kind, median));
        }
        for (kind, _) in failed {
            println!("  {:<9} not measured (see below)", kind.name());
        }
        let find = |kind| {
            medians
                .iter()
                .find(|(k, _)| *k == kind)
                .and_then(|(_, m)| *m)
        };
        let mut ratios = serde_json::Map::new();
        if let Some(kakehi) = find(ProxyKind::Kakehi) {
            for other in [ProxyKind::Nginx, ProxyKind::Haproxy] {
                if let Some(theirs) = find(other) {
                    println!("{}", report::ratio_line(other.name(), &kakehi, &theirs));
                    ratios.insert(
                        format!("kakehi/{}", other.name()),
                        report::ratios(&kakehi, &theirs),
                    );
                }
            }
        }
        scenario_json.push(json!({
            "name": scenario.name,
            "about": scenario.about,
            "path": scenario.path,
            "connections": scenario.connections,
            "connection_close": scenario.close,
            "results": results,
            "ratios": ratios,
        }));
    }
    println!();
    for proxy in proxies {
        println!(
            "  {:<9} {} {}",
            proxy.kind.name(),
            proxy.version,
            proxy.settings
        );
    }
    for (kind, reason) in failed {
        println!(
            "  {:<9} not measured: {}",
            kind.name(),
            reason.replace('\n', "\n    ")
        );
    }
    let mut notes = notes.to_vec();
    for proxy in proxies.iter().filter(|p| !p.rss_per_run) {
        notes.push(format!(
            "{}: peak RSS could not be reset per run (clear_refs refused): it is the peak since start",
            proxy.kind.name()
        ));
    }
    for note in &notes {
        println!("  note: {note}");
    }
    let proxy_json: serde_json::Map<String, Value> = proxies
        .iter()
        .map(|p| {
            let info =
                json!({ "status": "measured", "version": p.version, "settings": p.settings });
            (p.kind.name().to_string(), info)
        })
        .chain(failed.iter().map(|(kind, reason)| {
            (
                kind.name().to_string(),
                json!({ "status": "not measured", "reason": reason }),
            )
        }))
        .collect();
    json!({
        "tool": "cargo xtask bench",
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "duration_s": wrk_seconds(plan.duration),
        "runs": plan.runs,
        "pinning": pinning,
        "load_generator": "wrk -t1 (Debian)",
        "origin": "nginx, 1 worker, static files",
        "proxies": proxy_json,
        "scenarios": scenario_json,
        "notes": notes,
    })
}
