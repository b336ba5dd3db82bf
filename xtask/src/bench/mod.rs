//! `cargo xtask bench`: kakehi against nginx and HAProxy, on this machine, in the same run.
//!
//! Owns the benchmark's procedure (DESIGN.md, "Measuring speed"): one shared nginx origin
//! serving static files; each proxy with one worker/thread (`--workers N`: N of them, and
//! kakehi steering connections with eBPF, least connections), keep-alive to the origin; with
//! one worker each proxy is pinned alone on the second CPU while wrk (`-t1`) and the origin
//! share the first, with more the proxy may run on every CPU while wrk and the origin stay on
//! the first; each proxy checked to answer 200 with the origin's body before it is measured;
//! runs interleaved across proxies and repeated, medians reported, with kakehi's ratios to the
//! others. The steadiest figure is the proxy's CPU time per request, over its whole process
//! tree. It is a benchmark, not a test: nothing here passes or fails on a number. Every
//! process it starts is stopped by pid, on error too (drop guards).

mod configs;
mod extras;
mod procfs;
mod report;
mod start;
mod wire;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::procs::{self, Proc, Signals, SpawnOptions};
use report::Sample;

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
    /// Only these scenarios (comma-separated): keepalive-c50, keepalive-c200, 64k-c50,
    /// close-c50, https-keepalive-c50, https-newconn-c50, tcp-c50, idle8k-c50,
    /// h2-tls-c10m10, h2-tls-64k-c10m10.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// HAProxy's `http-reuse` mode. "always" lets it reuse origin connections across clients,
    /// as nginx's upstream keepalive and kakehi do; "safe" is HAProxy's own default.
    #[arg(long, default_value = "always", value_parser = ["always", "aggressive", "safe", "never"])]
    haproxy_reuse: String,
    /// Workers (threads for HAProxy) per proxy; the origin keeps one. Above 1, kakehi steers
    /// connections with eBPF (least connections) and each proxy may run on every CPU, while wrk
    /// and the origin stay on the first.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// The lbd binary to measure as kakehi, instead of building this checkout's (to compare two
    /// builds: run the bench once with each, nginx and HAProxy giving the yardstick).
    #[arg(long)]
    lbd: Option<PathBuf>,
}

struct Scenario {
    name: &'static str,
    path: &'static str,
    connections: u32,
    close: bool,
    /// Over TLS, to each proxy's https listener (TLS 1.3, ECDSA P-256 certificate).
    tls: bool,
    /// Keep-alive connections held open and idle (each served one request first) while wrk
    /// runs; the proxy's memory per idle connection is measured as they are opened.
    idle: u32,
    /// HTTP/2 (h2load, [`H2_STREAMS`] streams per connection) rather than HTTP/1.1 (wrk).
    h2: bool,
    /// Through the proxy's TCP passthrough listener: wrk speaks HTTP/1.1 to the origin and the
    /// proxy forwards the bytes untouched.
    tcp: bool,
    /// The goal for kakehi's CPU time per request, as a ratio to nginx's (issue 16's table;
    /// issue 15's "at most nginx's" for HTTP/2).
    goal: f64,
    about: &'static str,
}

/// Concurrent streams per connection in the HTTP/2 scenarios.
const H2_STREAMS: u32 = 10;

const SCENARIOS: [Scenario; 10] = [
    Scenario {
        name: "keepalive-c50",
        path: "/",
        connections: 50,
        close: false,
        tls: false,
        idle: 0,
        h2: false,
        tcp: false,
        goal: 0.90,
        about: "GET / (20 B), keep-alive, 50 connections",
    },
    Scenario {
        name: "keepalive-c200",
        path: "/",
        connections: 200,
        close: false,
        tls: false,
        idle: 0,
        h2: false,
        tcp: false,
        goal: 0.90,
        about: "GET / (20 B), keep-alive, 200 connections",
    },
    Scenario {
        name: "64k-c50",
        path: "/bytes/65536",
        connections: 50,
        close: false,
        tls: false,
        idle: 0,
        h2: false,
        tcp: false,
        goal: 0.85,
        about: "GET /bytes/65536 (64 KiB), keep-alive, 50 connections",
    },
    Scenario {
        name: "close-c50",
        path: "/",
        connections: 50,
        close: true,
        tls: false,
        idle: 0,
        h2: false,
        tcp: false,
        goal: 0.95,
        about: "GET / with Connection: close (a new client connection per request), 50 connections",
    },
    Scenario {
        name: "https-keepalive-c50",
        path: "/",
        connections: 50,
        close: false,
        tls: true,
        idle: 0,
        h2: false,
        tcp: false,
        goal: 0.80,
        about: "GET / (20 B) over TLS 1.3 (ECDSA P-256, X25519), keep-alive, 50 connections",
    },
    Scenario {
        name: "https-newconn-c50",
        path: "/",
        connections: 50,
        close: true,
        tls: true,
        idle: 0,
        h2: false,
        tcp: false,
        goal: 0.60,
        about: "GET / over TLS 1.3 with Connection: close: a TLS handshake per request, mostly \
                resumed (wrk offers the session it last got: PSK + X25519, no certificate \
                signature), 50 connections",
    },
    Scenario {
        name: "tcp-c50",
        path: "/",
        connections: 50,
        close: false,
        tls: false,
        idle: 0,
        h2: false,
        tcp: true,
        goal: 0.90,
        about: "GET / (20 B) through TCP passthrough (the proxy forwards bytes to the origin \
                untouched: kakehi's tcp listener, nginx's stream module, HAProxy's mode tcp), \
                keep-alive, 50 connections",
    },
    Scenario {
        name: "idle8k-c50",
        path: "/",
        connections: 50,
        close: false,
        tls: false,
        idle: IDLE_CONNECTIONS,
        h2: false,
        tcp: false,
        goal: 0.90,
        about: "GET / (20 B), keep-alive, 50 busy connections while 8,000 idle keep-alive \
                connections stay open (each served one request first); memory per idle \
                connection measured as they are opened",
    },
    Scenario {
        name: "h2-tls-c10m10",
        path: "/",
        connections: 10,
        close: false,
        tls: true,
        idle: 0,
        h2: true,
        tcp: false,
        goal: 1.0,
        about: "GET / (20 B) over HTTP/2 and TLS 1.3 (ALPN h2), h2load: 10 connections x 10 \
                concurrent streams",
    },
    Scenario {
        name: "h2-tls-64k-c10m10",
        path: "/bytes/65536",
        connections: 10,
        close: false,
        tls: true,
        idle: 0,
        h2: true,
        tcp: false,
        goal: 1.0,
        about: "GET /bytes/65536 (64 KiB) over HTTP/2 and TLS 1.3, h2load: 10 connections x 10 \
                concurrent streams",
    },
];

/// Idle connections of the `idle8k-c50` scenario. Not 10,000: HAProxy wants about two file
/// descriptors per `maxconn`, and the hard open-file limit here is 20,000.
const IDLE_CONNECTIONS: u32 = 8_000;

/// The scenario captured on the wire (where its connections wait: on the proxy or on wrk), and
/// for how long.
const WIRE_SCENARIO: &str = "https-newconn-c50";
const WIRE_SECONDS: u64 = 3;

/// The scenario whose syscalls are counted, and for how long.
const SYSCALL_SCENARIO: &str = "keepalive-c50";
const SYSCALL_SECONDS: u64 = 3;

/// A proxy that started and answered correctly.
struct Proxy {
    kind: ProxyKind,
    port: u16,
    /// Its https listener (the same routes, TLS terminated by the proxy).
    tls_port: u16,
    /// Its TCP passthrough listener (bytes forwarded to the origin untouched).
    tcp_port: u16,
    proc: Proc,
    settings: String,
    version: String,
    /// False when the kernel refused to reset the peak RSS: then it is the peak since start.
    rss_per_run: bool,
}

/// Where things run and for how long.
struct Plan {
    dir: PathBuf,
    /// Workers (or threads) per proxy.
    workers: u32,
    duration: Duration,
    runs: usize,
    warmup: bool,
    client: SpawnOptions,
    proxy: SpawnOptions,
    /// The lbd binary measured as kakehi.
    lbd: PathBuf,
    pinning: Pinning,
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
    let allowed = allowed_cpus();
    let pinning = Pinning::new(&allowed, args.workers);
    let plan = Plan {
        dir: crate::target_dir().join("bench"),
        workers: args.workers,
        duration: args.duration.unwrap_or(if args.quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(10)
        }),
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        warmup: !args.quick,
        client: SpawnOptions {
            cpu: pinning.client,
            own_group: true,
        },
        proxy: SpawnOptions {
            cpu: pinning.proxy,
            own_group: true,
        },
        lbd: args
            .lbd
            .clone()
            .unwrap_or_else(|| crate::target_dir().join("release").join("lbd")),
        pinning,
    };
    let mut notes: Vec<String> = Vec::new();
    if !allowed.is_empty() && plan.workers as usize > allowed.len() {
        notes.push(format!(
            "--workers {} is more than the {} CPU(s) available: workers share CPUs",
            plan.workers,
            allowed.len()
        ));
    }

    crate::setup::setup(signals, &crate::setup::BENCH)?;
    std::fs::create_dir_all(plan.dir.join("logs"))
        .with_context(|| format!("creating {}", plan.dir.display()))?;
    std::fs::write(plan.dir.join("report.lua"), configs::WRK_SCRIPT)?;

    let mut failed: Vec<(ProxyKind, String)> = Vec::new();
    if kinds.contains(&ProxyKind::Kakehi) && args.lbd.is_none() {
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

    let ports = procs::free_ports(1 + 3 * kinds.len())?;
    let origin_port = ports[0];
    let _origin = start::start_origin(signals, &plan, origin_port)?;
    start::verify(origin_port).context("the origin nginx does not serve its files")?;
    start::make_certificate(&plan).context("making the bench's TLS certificate")?;

    let mut proxies: Vec<Proxy> = Vec::new();
    for (&kind, three) in kinds.iter().zip(ports[1..].chunks(3)) {
        if failed.iter().any(|(k, _)| *k == kind) {
            continue;
        }
        let &[port, tls_port, tcp_port] = three else {
            bail!("free_ports gave too few ports");
        };
        let ports = start::Ports {
            proxy: configs::Ports {
                http: port,
                https: tls_port,
                tcp: tcp_port,
            },
            origin: origin_port,
        };
        let started = start::start_proxy(signals, &plan, kind, ports, &args.haproxy_reuse)
            .and_then(|proxy| {
                start::verify(proxy.port)?;
                start::verify_tls(proxy.tls_port)?;
                start::verify(proxy.tcp_port)?;
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

    println!(
        "xtask bench: {} scenario(s) × {} proxies × {} run(s) of {}s; {} worker(s) per proxy; {}",
        scenarios.len(),
        proxies.len(),
        plan.runs,
        wrk_seconds(plan.duration),
        plan.workers,
        plan.pinning.text
    );

    if plan.warmup {
        println!("xtask bench: warming up (1s per proxy and scenario, idle connections apart)");
        // Not the idle scenarios: the memory a proxy grows for its idle connections is
        // measured the first time it holds them (see below), not after a warm-up did.
        for scenario in scenarios.iter().filter(|s| s.idle == 0) {
            for proxy in &mut proxies {
                let _ = measure(signals, &plan, scenario, proxy, Duration::from_secs(1))?;
            }
        }
    }

    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); proxies.len()]; scenarios.len()];
    // The scenarios with idle connections run after all the others: a proxy keeps some of the
    // memory they grow (its connection table, its allocator's heap), which would otherwise
    // count in the peak RSS of every scenario after them, and their own first run is the one
    // whose memory per idle connection is the growth of a proxy that never held them.
    let passes = [false, true]
        .into_iter()
        .flat_map(|idle| (1..=plan.runs).map(move |run| (idle, run)));
    for (idle_pass, run) in passes {
        if !scenarios.iter().any(|s| (s.idle > 0) == idle_pass) {
            continue;
        }
        wait_until_idle(signals, run, &mut notes)?;
        for (s, scenario) in scenarios
            .iter()
            .enumerate()
            .filter(|(_, scenario)| (scenario.idle > 0) == idle_pass)
        {
            for (p, proxy) in proxies.iter_mut().enumerate() {
                let name = proxy.kind.name();
                match measure(signals, &plan, scenario, proxy, plan.duration)? {
                    Ok(sample) => {
                        println!(
                            "  run {run}/{} {:<15} {:<8} {:>9.0} req/s {:>7.1} µs/req  p50 {:.2} \
                             p99 {:.2} p99.9 {:.2} ms",
                            plan.runs,
                            scenario.name,
                            name,
                            sample.rps,
                            sample.cpu_us_per_req,
                            sample.p50_ms,
                            sample.p99_ms,
                            sample.p999_ms
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

    println!(
        "xtask bench: counting syscalls per request ({SYSCALL_SCENARIO}, {SYSCALL_SECONDS}s \
         under strace -c -f)"
    );
    let syscalls = count_syscalls(signals, &plan, &proxies, &mut notes)?;
    println!(
        "xtask bench: capturing {WIRE_SCENARIO} on the wire ({WIRE_SECONDS}s under tcpdump on lo)"
    );
    let wire = watch_wire(signals, &plan, &proxies, &mut notes)?;
    for proxy in &mut proxies {
        proxy.proc.stop();
    }
    let extras = Extras { syscalls, wire };
    let results = summarize(
        &plan, &scenarios, &proxies, &failed, &samples, &notes, &extras,
    );
    let path = plan.dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nxtask bench: results written to {}", path.display());
    Ok(())
}

/// Prints where the connections of [`WIRE_SCENARIO`] waited, and returns it as JSON.
fn print_wire(wire: &[(ProxyKind, Wire)]) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    if wire.is_empty() {
        return out;
    }
    println!(
        "  on the wire ({WIRE_SCENARIO}, {WIRE_SECONDS}s under tcpdump on lo; the proxy's answer \
         runs from the client's last segment to the proxy's last before the client's next, wrk's \
         reaction from there to its next segment; wrk's own p50 and p99 in the same run):"
    );
    for (kind, w) in wire {
        let t = &w.times;
        let dropped = match w.dropped {
            Some(0) | None => String::new(),
            Some(n) => format!(" ({n} packets dropped by the kernel)"),
        };
        println!(
            "    {:<9} proxy answers p50 {:.2} p99 {:.2} ms, wrk reacts p50 {:.2} p99 {:.2} ms; \
             connections waited {:.0}% of their time on the proxy; wrk p50 {:.2} p99 {:.2} ms; \
             {} connections{dropped}",
            kind.name(),
            t.proxy.p50_ms,
            t.proxy.p99_ms,
            t.client.p50_ms,
            t.client.p99_ms,
            t.proxy_share * 100.0,
            w.wrk_p50_ms,
            w.wrk_p99_ms,
            t.connections
        );
        out.insert(
            kind.name().into(),
            json!({
                "proxy_answer_ms": { "p50": t.proxy.p50_ms, "p99": t.proxy.p99_ms, "count": t.proxy.count },
                "client_reaction_ms": { "p50": t.client.p50_ms, "p99": t.client.p99_ms, "count": t.client.count },
                "proxy_share_of_time": t.proxy_share,
                "connections": t.connections,
                "wrk_p50_ms": w.wrk_p50_ms,
                "wrk_p99_ms": w.wrk_p99_ms,
                "dropped_packets": w.dropped,
            }),
        );
    }
    out
}

/// The CPUs this process may run on, in order; empty when they cannot be read.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// Where wrk, the origin and each proxy run.
#[derive(Debug, PartialEq, Eq)]
struct Pinning {
    /// wrk and the origin: the first allowed CPU.
    client: Option<usize>,
    /// Each proxy: the second allowed CPU with one worker; `None` (not pinned: it inherits
    /// every CPU xtask may use) with more, or with fewer than 2 CPUs.
    proxy: Option<usize>,
    /// The CPUs a proxy may run on, for results.json; empty when nothing is pinned.
    proxy_cpus: Vec<usize>,
    /// The same in words, for the terminal and results.json.
    text: String,
}

impl Pinning {
    fn new(allowed: &[usize], workers: u32) -> Self {
        match allowed {
            [client, proxy, ..] if workers <= 1 => Self {
                client: Some(*client),
                proxy: Some(*proxy),
                proxy_cpus: vec![*proxy],
                text: format!("wrk -t1 and the origin on cpu{client}, each proxy on cpu{proxy}"),
            },
            [client, _, ..] => Self {
                client: Some(*client),
                proxy: None,
                proxy_cpus: allowed.to_vec(),
                text: format!(
                    "wrk -t1 and the origin on cpu{client}; each proxy ({workers} workers) on \
                     every CPU (cpus {}, not pinned), so it shares cpu{client} with them",
                    cpu_list(allowed)
                ),
            },
            _ => Self {
                client: None,
                proxy: None,
                proxy_cpus: Vec::new(),
                text: "not pinned: fewer than 2 CPUs available".to_string(),
            },
        }
    }
}

/// "0-3,6,8-9", as taskset writes a CPU list.
fn cpu_list(cpus: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &cpu in cpus {
        match ranges.last_mut() {
            Some((_, last)) if *last + 1 == cpu => *last = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    ranges
        .iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn wrk_seconds(duration: Duration) -> u64 {
    duration.as_secs().max(1)
}

/// Waits (bounded) for the machine to be idle before a round, as DESIGN.md asks.
fn wait_until_idle(signals: &Signals, round: usize, notes: &mut Vec<String>) -> Result<()> {
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
                "round {round}: the machine stayed {:.0}% busy for {}s: its figures may swing",
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
    let mut idle = None;
    if scenario.idle > 0 {
        match extras::hold_idle(pid, proxy.port, scenario.idle) {
            Ok(set) => idle = Some(set),
            Err(error) => return Ok(Err(error.context("opening the idle connections"))),
        }
    }
    let rss_reset = procfs::reset_peak_rss(pid);
    let cpu_before = procfs::cpu_ticks(pid);
    let wrk = run_wrk(signals, plan, scenario, proxy, wrk_seconds(duration))?;
    let cpu = procfs::cpu_ticks(pid).since(cpu_before);
    let rss = procfs::peak_rss_kib(pid);
    proxy.rss_per_run &= rss_reset;
    let output = match wrk {
        Ok(output) => output,
        Err(error) => return Ok(Err(error)),
    };
    let mut sample = if scenario.h2 {
        Sample::from_h2load(
            &output,
            &h2load_log(plan),
            cpu,
            procfs::ticks_per_second(),
            rss,
        )
    } else {
        Sample::from_wrk(&output, cpu, procfs::ticks_per_second(), rss)
    };
    if let (Ok(sample), Some(mut idle)) = (sample.as_mut(), idle) {
        sample.idle_bytes_per_conn = Some(idle.bytes_per_conn);
        let open = idle.still_open();
        if open < scenario.idle as usize {
            return Ok(Err(anyhow::anyhow!(
                "{} of {} idle connections were closed by the proxy during the run",
                scenario.idle as usize - open,
                scenario.idle
            )));
        }
    }
    Ok(sample)
}

/// Where h2load writes each request's status and duration.
fn h2load_log(plan: &Plan) -> PathBuf {
    plan.dir.join("logs").join("h2load-requests.tsv")
}

/// The client's command line for one run of `scenario` against `proxy`: wrk, or h2load for
/// the HTTP/2 scenarios.
fn wrk_command(plan: &Plan, scenario: &Scenario, proxy: &Proxy, seconds: u64) -> Command {
    if scenario.h2 {
        let log = h2load_log(plan);
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new("h2load");
        cmd.arg("-t1")
            .arg(format!("-c{}", scenario.connections))
            .arg(format!("-m{H2_STREAMS}"))
            .arg(format!("-D{seconds}"))
            .arg(format!("--log-file={}", log.display()))
            .arg(format!(
                "https://127.0.0.1:{}{}",
                proxy.tls_port, scenario.path
            ));
        return cmd;
    }
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "--timeout", "5s"])
        .arg(format!("-c{}", scenario.connections))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(plan.dir.join("report.lua"));
    if scenario.close {
        cmd.args(["-H", "Connection: close"]);
    }
    let scheme = if scenario.tls { "https" } else { "http" };
    cmd.arg(format!(
        "{scheme}://127.0.0.1:{}{}",
        client_port(scenario, proxy),
        scenario.path
    ));
    cmd
}

/// The proxy's listener the load generator speaks to in `scenario`.
fn client_port(scenario: &Scenario, proxy: &Proxy) -> u16 {
    if scenario.tls {
        proxy.tls_port
    } else if scenario.tcp {
        proxy.tcp_port
    } else {
        proxy.port
    }
}

/// Where the connections of [`WIRE_SCENARIO`] wait, for each proxy: a short run of its own
/// captured by tcpdump on loopback (the proxy's listener only, headers only; tcpdump on the load
/// generator's CPU), cut by [`wire::wire_times`] into the proxy's answers and wrk's reactions.
/// tcpdump costs CPU: the run's own figures are not compared with the measured runs'.
fn watch_wire(
    signals: &Signals,
    plan: &Plan,
    proxies: &[Proxy],
    notes: &mut Vec<String>,
) -> Result<Vec<(ProxyKind, Wire)>> {
    let Some(scenario) = SCENARIOS.iter().find(|s| s.name == WIRE_SCENARIO) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for proxy in proxies {
        let name = proxy.kind.name();
        let port = client_port(scenario, proxy);
        let capture = plan.dir.join("logs").join(format!("wire-{name}.pcap"));
        let _ = std::fs::remove_file(&capture);
        let mut tcpdump = Command::new("tcpdump");
        tcpdump
            .args(["-i", "lo", "-n", "-s", "96", "-B", "32768", "-w"])
            .arg(&capture)
            .arg(format!("tcp port {port}"));
        let log = plan.dir.join("logs").join(format!("tcpdump-{name}.log"));
        // On the load generator's CPU: the proxy's answers are what is measured.
        let mut tcpdump = Proc::spawn_logged("tcpdump", &mut tcpdump, plan.client, &log)?;
        // tcpdump opens its socket within milliseconds; let it before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        let run = run_wrk(signals, plan, scenario, proxy, WIRE_SECONDS)?.and_then(|output| {
            let no_cpu = procfs::CpuTicks::default();
            Sample::from_wrk(&output, no_cpu, procfs::ticks_per_second(), 0)
        });
        tcpdump.interrupt();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tcpdump.try_exited()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        tcpdump.stop();
        let dropped = wire::dropped(&std::fs::read_to_string(&log).unwrap_or_default());
        let seen = run.and_then(|wrk| {
            let bytes = std::fs::read(&capture)
                .with_context(|| format!("reading {}", capture.display()))?;
            let times = wire::wire_times(&bytes, port)?;
            Ok(Wire {
                times,
                wrk_p50_ms: wrk.p50_ms,
                wrk_p99_ms: wrk.p99_ms,
                dropped,
            })
        });
        match seen {
            Ok(wire) => out.push((proxy.kind, wire)),
            Err(error) => notes.push(format!("{name} not captured on the wire: {error:#}")),
        }
    }
    Ok(out)
}

/// One proxy's capture: where its connections waited, and what wrk said of the same run.
struct Wire {
    times: wire::WireTimes,
    wrk_p50_ms: f64,
    wrk_p99_ms: f64,
    /// Packets the kernel dropped from the capture, as tcpdump said.
    dropped: Option<u64>,
}

/// The figures measured in runs of their own, after the measured ones.
struct Extras {
    syscalls: Vec<(ProxyKind, extras::Syscalls)>,
    wire: Vec<(ProxyKind, Wire)>,
}

/// Syscalls per request of each proxy in [`SYSCALL_SCENARIO`], in a short run of its own
/// under `strace -c -f` attached to every process of its tree (strace slows the proxy: its
/// figures are counts, not speed).
fn count_syscalls(
    signals: &Signals,
    plan: &Plan,
    proxies: &[Proxy],
    notes: &mut Vec<String>,
) -> Result<Vec<(ProxyKind, extras::Syscalls)>> {
    let Some(scenario) = SCENARIOS.iter().find(|s| s.name == SYSCALL_SCENARIO) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for proxy in proxies {
        let name = proxy.kind.name();
        let summary = plan.dir.join("logs").join(format!("strace-{name}.txt"));
        let _ = std::fs::remove_file(&summary);
        let mut strace = Command::new("strace");
        strace.args(["-c", "-f", "-o"]).arg(&summary);
        for pid in procfs::tree(proxy.proc.pid()) {
            strace.arg("-p").arg(pid.to_string());
        }
        let log = plan.dir.join("logs").join(format!("strace-{name}.log"));
        let no_pin = SpawnOptions {
            cpu: None,
            own_group: true,
        };
        let mut strace = Proc::spawn_logged("strace", &mut strace, no_pin, &log)?;
        // strace attaches within milliseconds; let it before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        let requests =
            run_wrk(signals, plan, scenario, proxy, SYSCALL_SECONDS)?.and_then(|output| {
                let no_cpu = procfs::CpuTicks::default();
                Ok(Sample::from_wrk(&output, no_cpu, procfs::ticks_per_second(), 0)?.requests)
            });
        strace.interrupt();
        let deadline = Instant::now() + Duration::from_secs(10);
        while strace.try_exited()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        strace.stop();
        let counted = requests.and_then(|requests| extras::read_syscalls(&summary, requests));
        match counted {
            Ok(counts) => out.push((proxy.kind, counts)),
            Err(error) => notes.push(format!("syscalls of {name} not counted: {error:#}")),
        }
    }
    Ok(out)
}

/// One wrk run of `scenario` against `proxy`: what wrk wrote. The outer error stops the bench
/// (interrupted); the inner one is a failed run.
fn run_wrk(
    signals: &Signals,
    plan: &Plan,
    scenario: &Scenario,
    proxy: &Proxy,
    seconds: u64,
) -> Result<Result<String>> {
    let mut cmd = wrk_command(plan, scenario, proxy, seconds);
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
    if !status.success() {
        return Ok(Err(anyhow::anyhow!(
            "wrk failed ({}); {}",
            procs::describe(status),
            start::log_tail(&log)
        )));
    }
    Ok(Ok(std::fs::read_to_string(&log).unwrap_or_default()))
}

/// Prints the table and ratios, and returns the same as JSON.
fn summarize(
    plan: &Plan,
    scenarios: &[&Scenario],
    proxies: &[Proxy],
    failed: &[(ProxyKind, String)],
    samples: &[Vec<Vec<Sample>>],
    notes: &[String],
    extras: &Extras,
) -> Value {
    let syscalls = &extras.syscalls;
    println!(
        "\nkakehi benchmark: {} worker(s) per proxy; median of {} run(s) of {}s; proxy CPU = \
         utime+stime of its whole process tree (every worker and thread) over the run, per \
         request, then user (utime) and kernel (stime) apart; RSS = peak VmHWM of the tree",
        plan.workers,
        plan.runs,
        wrk_seconds(plan.duration)
    );
    let mut scenario_json = Vec::new();
    let mut flagged: Vec<&str> = Vec::new();
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
        if scenario.idle > 0 {
            let per_proxy: Vec<String> = medians
                .iter()
                .filter_map(|(kind, m)| {
                    let bytes = m.as_ref()?.idle_bytes_per_conn?;
                    Some(format!("{} {:.2} KiB", kind.name(), bytes / 1024.0))
                })
                .collect();
            println!(
                "  memory per idle connection (resident set growth / {}): {}",
                scenario.idle,
                per_proxy.join(", ")
            );
        }
        let find = |kind| {
            medians
                .iter()
                .find(|(k, _)| *k == kind)
                .and_then(|(_, m)| *m)
        };
        let mut ratios = serde_json::Map::new();
        let mut p99_over = false;
        if let Some(kakehi) = find(ProxyKind::Kakehi) {
            for other in [ProxyKind::Nginx, ProxyKind::Haproxy] {
                if let Some(theirs) = find(other) {
                    println!(
                        "{}",
                        report::ratio_line(other.name(), &kakehi, &theirs, scenario.goal)
                    );
                    ratios.insert(
                        format!("kakehi/{}", other.name()),
                        report::ratios(&kakehi, &theirs),
                    );
                }
            }
            if let Some(nginx) = find(ProxyKind::Nginx) {
                println!("{}", report::latency_line(&kakehi, &nginx));
                p99_over = report::p99_flagged(&kakehi, &nginx);
                if p99_over {
                    flagged.push(scenario.name);
                }
            }
        }
        scenario_json.push(json!({
            "name": scenario.name,
            "about": scenario.about,
            "path": scenario.path,
            "connections": scenario.connections,
            "connection_close": scenario.close,
            "tls": scenario.tls,
            "tcp": scenario.tcp,
            "idle_connections": scenario.idle,
            "results": results,
            "ratios": ratios,
            "p99_over_limit_vs_nginx": p99_over,
        }));
    }
    println!();
    for proxy in proxies {
        // "HAProxy version 2.6.12 2023/01/01 - https://haproxy.org/": keep what precedes " - ".
        let version = proxy.version.split(" - ").next().unwrap_or_default();
        println!("  {:<9} {version}: {}", proxy.kind.name(), proxy.settings);
    }
    for (kind, reason) in failed {
        println!(
            "  {:<9} not measured: {}",
            kind.name(),
            reason.replace('\n', "\n    ")
        );
    }
    let pinning = &plan.pinning;
    println!("  pinning:  {}", pinning.text);
    if flagged.is_empty() {
        println!(
            "  latency:  kakehi's p99 is within {}× nginx's in every scenario measured",
            report::P99_LIMIT
        );
    } else {
        println!(
            "  LATENCY:  kakehi's p99 is over {}× nginx's in: {}",
            report::P99_LIMIT,
            flagged.join(", ")
        );
    }
    let mut syscall_json = serde_json::Map::new();
    if !syscalls.is_empty() {
        println!("  syscalls per request ({SYSCALL_SCENARIO}, strace -c -f on the whole tree):");
        for (kind, counts) in syscalls {
            println!(
                "    {:<9} {:.2} in all ({:.2} failed): {}",
                kind.name(),
                counts.total_per_request(),
                counts.errors_per_request(),
                counts.text()
            );
            let top: serde_json::Map<String, Value> = counts
                .top()
                .into_iter()
                .map(|(name, calls, errors)| (name, json!({ "calls": calls, "failed": errors })))
                .collect();
            syscall_json.insert(
                kind.name().into(),
                json!({
                    "requests": counts.requests,
                    "per_request": counts.total_per_request(),
                    "failed_per_request": counts.errors_per_request(),
                    "by_syscall": top,
                }),
            );
        }
    }
    let wire_json = print_wire(&extras.wire);
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
        "workers": plan.workers,
        "pinning": pinning.text,
        "cpus": {
            "load_generator_and_origin": pinning.client,
            "proxy": pinning.proxy_cpus,
            "proxy_pinned_alone": pinning.proxy.is_some(),
        },
        "load_generator": "wrk -t1 (Debian)",
        "origin": "nginx, 1 worker, static files",
        "proxies": proxy_json,
        "scenarios": scenario_json,
        "p99_limit_vs_nginx": report::P99_LIMIT,
        "p99_over_limit": flagged,
        "syscalls": {
            "scenario": SYSCALL_SCENARIO,
            "seconds": SYSCALL_SECONDS,
            "proxies": syscall_json,
        },
        "wire": {
            "scenario": WIRE_SCENARIO,
            "seconds": WIRE_SECONDS,
            "proxies": wire_json,
        },
        "notes": notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_pins_the_proxy_alone_on_the_second_cpu() {
        let pinning = Pinning::new(&[0, 1, 2, 3], 1);
        assert_eq!((pinning.client, pinning.proxy), (Some(0), Some(1)));
        assert_eq!(pinning.proxy_cpus, [1]);
        assert_eq!(
            pinning.text,
            "wrk -t1 and the origin on cpu0, each proxy on cpu1"
        );
    }

    #[test]
    fn several_workers_let_the_proxy_use_every_cpu() {
        let pinning = Pinning::new(&[0, 1, 2, 3], 4);
        assert_eq!((pinning.client, pinning.proxy), (Some(0), None));
        assert_eq!(pinning.proxy_cpus, [0, 1, 2, 3]);
        assert!(pinning.text.starts_with("wrk -t1 and the origin on cpu0; "));
        assert!(pinning.text.contains("(cpus 0-3, not pinned)"));
    }

    #[test]
    fn fewer_than_two_cpus_pin_nothing() {
        for workers in [1, 2] {
            let pinning = Pinning::new(&[3], workers);
            assert_eq!((pinning.client, pinning.proxy), (None, None));
            assert!(pinning.proxy_cpus.is_empty());
        }
    }

    #[test]
    fn cpu_lists_read_as_taskset_writes_them() {
        assert_eq!(cpu_list(&[0, 1]), "0-1");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[]), "");
    }
}
