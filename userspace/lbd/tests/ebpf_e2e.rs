//! eBPF connection steering end to end: the real `lbd` binary with `steering = "ebpf"`, its
//! supervisor loading the sk_reuseport program, its sandboxed workers publishing their live
//! connection counts, and real HTTP clients.
//!
//! Each test runs on a thread of its own that first moves into a fresh network namespace
//! (unshare(CLONE_NEWNET) changes only the calling thread) and brings its loopback up; the
//! origin, `lbd` (a child process) and every client are created from that thread, so they all
//! live in that namespace and an attached program cannot disturb the machine or another test.
//! They need root (a network namespace, BPF) and fail, saying so, without it.
//!
//! `lbd` is started without the harness's readiness probe (it would be one more connection
//! through the program): it is ready when its log says every worker started and is sandboxed.
//! What the program decided is read from the counters the supervisor logs on SIGTERM
//! (`steering ADDR: decisions per worker [...], dropped all-full N, dropped no-worker N,
//! select failed N`); which worker holds a connection is read from /proc (the accepted
//! socket's inode in `/proc/PID/net/tcp`, found among a worker's descriptors).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashSet;
use std::io::{self, BufReader, ErrorKind, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    field, in_fresh_netns, one_cluster, parse_logfmt, proc_status, process_alive, socket_inodes,
    tcp_sockets, wait_until, worker_index, workers_ready, Client, Lbd, TCP_ESTABLISHED,
};
use lb_testkit::Origin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use socket2::{Domain, Socket, Type};

// ---- a network namespace of the test's own ---------------------------------------------------

// ---- lbd with eBPF steering ------------------------------------------------------------------

/// Starts `lbd` with `steering = "ebpf"`, `workers` workers and `policy` (the config's
/// spelling), in front of `origin`; returns once every worker is started and sandboxed.
fn start_ebpf(workers: usize, policy: &str, extra: &str, origin: SocketAddr) -> Lbd {
    let top = format!(
        "workers = {workers}\nsteering = \"ebpf\"\nsteering_policy = \"{policy}\"\n{extra}"
    );
    let lbd = Lbd::start_until(|l| one_cluster(&top, l, &[origin]), workers_ready(workers));
    let log = lbd.stderr();
    assert!(
        log.contains("eBPF steering attached"),
        "lbd did not say it attached the program:\n{log}"
    );
    lbd
}

/// The steering program's counters, as the supervisor logs them on stop.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counters {
    decisions: Vec<u64>,
    all_full: u64,
    no_worker: u64,
    select_failed: u64,
}

impl Counters {
    fn total(&self) -> u64 {
        self.decisions.iter().sum()
    }
}

/// SIGTERM, expects exit status 0, and parses the counter line of the (only) listener.
fn stop_and_count(lbd: &mut Lbd) -> Counters {
    let status = lbd.shutdown();
    let log = lbd.stderr();
    assert_eq!(status.code(), Some(0), "lbd after SIGTERM: {status}\n{log}");
    let needle = format!("steering {}: decisions per worker [", lbd.addr());
    let line = log
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no counter line {needle:?} in lbd's log:\n{log}"));
    let msg = field(&parse_logfmt(line), "msg").unwrap().to_owned();
    let rest = msg.split_once('[').unwrap().1;
    let (list, rest) = rest.split_once(']').unwrap();
    let decisions = list
        .split(',')
        .map(|n| n.trim().parse().unwrap_or_else(|_| panic!("{msg}")))
        .collect();
    let after = |label: &str| -> u64 {
        let tail = rest
            .split_once(label)
            .unwrap_or_else(|| panic!("no {label:?} in {msg:?}"))
            .1;
        tail.trim()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {label:?} in {msg:?}"))
    };
    Counters {
        decisions,
        all_full: after("dropped all-full"),
        no_worker: after("dropped no-worker"),
        select_failed: after("select failed"),
    }
}

// ---- clients ---------------------------------------------------------------------------------

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn client_from(stream: TcpStream) -> Client {
    stream.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(common::IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    Client { stream, reader }
}

/// One connection, one `GET path` with `Connection: close`: the status, or what failed.
fn get_close(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    let mut client = client_from(stream);
    client.stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    Ok(client.try_response_to(false)?.status)
}

/// A kept-alive connection that had one request answered (so a worker surely accepted it).
fn held_connection(addr: SocketAddr, n: usize) -> Client {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("held connection {n}: connect: {e}"));
    let mut client = client_from(stream);
    let resp = client.get("localhost", &format!("/held/{n}"));
    assert_eq!(resp.status, 200, "held connection {n}: {:?}", resp.text());
    client
}

/// The index of the worker process holding the accepted end of `client`'s connection.
fn worker_of(lbd: &Lbd, client: &TcpStream) -> usize {
    let local = client.local_addr().unwrap();
    let mut found = None;
    wait_until(Duration::from_secs(2), || {
        let Some(inode) = tcp_sockets(lbd.pid())
            .into_iter()
            .find(|s| s.state == TCP_ESTABLISHED && s.local == lbd.addr() && s.remote == local)
            .map(|s| s.inode)
        else {
            return false;
        };
        found = lbd
            .workers()
            .into_iter()
            .find(|&w| socket_inodes(w).contains(&inode))
            .and_then(worker_index);
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no worker holds the connection from {local}"))
}

/// The worker-process prefix (first 8 hex digits of the request id) of each access log line.
fn request_id_prefixes(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let fields = parse_logfmt(l);
            field(&fields, "request_id").map(|id| id.chars().take(8).collect())
        })
        .collect()
}

// ---- 2,000 short connections per policy -------------------------------------------------------

const CONNECTIONS: u64 = 2_000;
const WORKERS: usize = 4;

/// 2,000 sequential `Connection: close` requests, all answered 200; then every worker must
/// have had at least `min_share` of the decisions, and they add up to the connections made.
fn spread(policy: &'static str, min_share: f64) {
    in_fresh_netns(move || {
        let origin = Origin::start("o");
        let mut lbd = start_ebpf(WORKERS, policy, "", origin.addr());
        let started = Instant::now();
        for n in 0..CONNECTIONS {
            match get_close(lbd.addr(), &format!("/c/{n}")) {
                Ok(200) => {}
                other => panic!("{policy}: connection {n}: {other:?}"),
            }
        }
        let took = started.elapsed();
        let counters = stop_and_count(&mut lbd);
        println!("{policy}: {CONNECTIONS} connections in {took:?}: {counters:?}");
        assert_eq!(counters.decisions.len(), WORKERS, "{counters:?}");
        assert_eq!(
            counters.total(),
            CONNECTIONS,
            "{policy}: every connection is one decision: {counters:?}"
        );
        assert_eq!(
            (
                counters.all_full,
                counters.no_worker,
                counters.select_failed
            ),
            (0, 0, 0),
            "{policy}: {counters:?}"
        );
        for (worker, &n) in counters.decisions.iter().enumerate() {
            let share = n as f64 / CONNECTIONS as f64;
            assert!(
                n > 0 && share > min_share,
                "{policy}: worker {worker} got {n} of {CONNECTIONS} ({:.1}%, needs > {:.0}%): \
                 {counters:?}",
                share * 100.0,
                min_share * 100.0
            );
        }
        assert_eq!(origin.requests().len() as u64, CONNECTIONS);
    });
}

#[test]
fn flow_hash_spreads_2000_connections_over_every_worker() {
    spread("flow-hash", 0.10);
}

#[test]
fn least_connections_spreads_2000_connections_over_every_worker() {
    spread("least-connections", 0.0);
}

#[test]
fn power_of_two_spreads_2000_connections_over_every_worker() {
    spread("power-of-two", 0.0);
}

#[test]
fn flow_hash_keeps_a_4_tuple_on_one_worker() {
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let lbd = start_ebpf(WORKERS, "flow-hash", "", origin.addr());
        let mut used = HashSet::new();
        for port in 41_000..41_016u16 {
            let mut first = None;
            for round in 0..3 {
                // From a fixed source port; closed with a reset (SO_LINGER 0) so that the same
                // 4-tuple can connect again at once.
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket.set_reuse_address(true).unwrap();
                socket.set_linger(Some(Duration::ZERO)).unwrap();
                let local = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
                socket.bind(&local.into()).unwrap();
                socket
                    .connect_timeout(&lbd.addr().into(), CONNECT_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect from port {port}: {e}"));
                let mut client = client_from(TcpStream::from(socket));
                assert_eq!(client.get("localhost", "/tuple").status, 200);
                let worker = worker_of(&lbd, &client.stream);
                match first {
                    None => first = Some(worker),
                    Some(w) => assert_eq!(
                        worker, w,
                        "source port {port}, round {round}: moved from worker {w} to {worker}"
                    ),
                }
                used.insert(worker);
            }
        }
        println!("16 source ports used workers {used:?}");
        assert!(used.len() >= 3, "16 tuples landed on workers {used:?} only");
    });
}

// ---- least connections with held connections --------------------------------------------------

#[test]
fn least_connections_spreads_held_connections_evenly() {
    const HELD: usize = 40;
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let mut lbd = start_ebpf(WORKERS, "least-connections", "", origin.addr());
        let mut held = Vec::new();
        let mut per_worker = [0u64; WORKERS];
        let mut order = Vec::new();
        for n in 0..HELD {
            let before = per_worker;
            let client = held_connection(lbd.addr(), n);
            let worker = worker_of(&lbd, &client.stream);
            let fewest = *before.iter().min().unwrap();
            assert_eq!(
                before[worker], fewest,
                "connection {n} went to worker {worker}, which held {} while the fewest was \
                 {fewest}: {before:?}",
                before[worker]
            );
            per_worker[worker] += 1;
            order.push(worker);
            held.push(client);
            // Time for the worker's event loop to publish its new count.
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("least-connections, {HELD} held: per worker {per_worker:?}, order {order:?}");
        let (min, max) = (
            per_worker.iter().min().unwrap(),
            per_worker.iter().max().unwrap(),
        );
        assert!(
            max - min <= 1,
            "held connections per worker: {per_worker:?}"
        );
        // The held ones still work.
        for (n, client) in held.iter_mut().enumerate() {
            assert_eq!(client.get("localhost", &format!("/again/{n}")).status, 200);
        }
        let counters = stop_and_count(&mut lbd);
        println!("{counters:?}");
        assert_eq!(
            counters.decisions,
            per_worker.to_vec(),
            "the program's decisions vs where /proc shows the connections"
        );
        assert_eq!(
            (
                counters.all_full,
                counters.no_worker,
                counters.select_failed
            ),
            (0, 0, 0)
        );
        drop(held);
    });
}

// ---- every worker full: refused in the kernel -------------------------------------------------

fn all_full_refused(policy: &'static str) {
    const LIMIT: usize = 3;
    const FEW: usize = 2;
    in_fresh_netns(move || {
        let origin = Origin::start("o");
        let extra = format!("max_connections = {LIMIT}");
        let mut lbd = start_ebpf(FEW, policy, &extra, origin.addr());
        let mut held = Vec::new();
        let mut per_worker = [0u64; FEW];
        for n in 0..FEW * LIMIT {
            let client = held_connection(lbd.addr(), n);
            per_worker[worker_of(&lbd, &client.stream)] += 1;
            held.push(client);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(per_worker, [LIMIT as u64; FEW], "{policy}: held per worker");

        // The (workers x limit + 1)-th: refused, at once, by the kernel.
        let at = Instant::now();
        let seventh = TcpStream::connect_timeout(&lbd.addr(), CONNECT_TIMEOUT);
        let waited = at.elapsed();
        let mut refused = 0u64;
        match seventh {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                refused += 1;
                println!("{policy}: connection 7 refused after {waited:?}: {e}");
            }
            Err(e) => {
                panic!("{policy}: connection 7 failed with {e} after {waited:?}, not refused")
            }
            Ok(s) => {
                // Accepted by the kernel: see whether anyone answers, for the report.
                let mut c = client_from(s);
                c.stream
                    .write_all(b"GET /seventh HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .unwrap();
                c.stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                panic!(
                    "{policy}: connection 7 was accepted while every worker held {LIMIT} \
                     (then: {:?})",
                    c.try_response_to(false).map(|r| r.status)
                );
            }
        }
        assert!(
            waited < Duration::from_secs(1),
            "{policy}: refused only after {waited:?}"
        );

        // The held ones still get answers.
        for (n, client) in held.iter_mut().enumerate() {
            let resp = client.get("localhost", &format!("/still/{n}"));
            assert_eq!(resp.status, 200, "{policy}: held connection {n}");
        }

        // One closes: a new connection is accepted and answered within a second.
        let closed = held.remove(0);
        let freed = worker_of(&lbd, &closed.stream);
        drop(closed);
        let at = Instant::now();
        let status = loop {
            match TcpStream::connect_timeout(&lbd.addr(), CONNECT_TIMEOUT) {
                Ok(s) => {
                    let mut c = client_from(s);
                    let status = c.get("localhost", "/after-close").status;
                    assert_eq!(worker_of(&lbd, &c.stream), freed, "{policy}");
                    held.push(c);
                    break status;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    refused += 1;
                    assert!(
                        at.elapsed() < Duration::from_secs(1),
                        "{policy}: still refused {:?} after a held connection closed",
                        at.elapsed()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{policy}: connect after a close: {e}"),
            }
        };
        let took = at.elapsed();
        println!(
            "{policy}: accepted and answered {took:?} after a close ({refused} refused in all)"
        );
        assert_eq!(status, 200, "{policy}");
        assert!(took < Duration::from_secs(1), "{policy}: took {took:?}");

        let counters = stop_and_count(&mut lbd);
        println!("{policy}: {counters:?}");
        assert!(counters.all_full >= 1, "{policy}: {counters:?}");
        assert_eq!(
            counters.all_full, refused,
            "{policy}: one all-full drop per refused connect: {counters:?}"
        );
        assert_eq!(
            counters.total(),
            (FEW * LIMIT + 1) as u64,
            "{policy}: {counters:?}"
        );
        let mut expected = [LIMIT as u64; FEW];
        expected[freed] += 1;
        assert_eq!(counters.decisions, expected.to_vec(), "{policy}");
        assert_eq!(
            (counters.no_worker, counters.select_failed),
            (0, 0),
            "{policy}"
        );
        drop(held);
    });
}

#[test]
fn all_full_is_refused_in_the_kernel_flow_hash() {
    all_full_refused("flow-hash");
}

#[test]
fn all_full_is_refused_in_the_kernel_least_connections() {
    all_full_refused("least-connections");
}

#[test]
fn all_full_is_refused_in_the_kernel_power_of_two() {
    all_full_refused("power-of-two");
}

// ---- kill -9 of a worker under a stream of new connections -----------------------------------

#[derive(Debug, Default)]
struct Stream {
    ok: u64,
    refused: u64,
    /// Other failures, with what happened.
    failed: Vec<String>,
}

fn killed_worker(policy: &'static str) {
    const CLIENTS: usize = 2;
    in_fresh_netns(move || {
        let origin = Origin::start("o");
        let mut lbd = start_ebpf(WORKERS, policy, "", origin.addr());
        let addr = lbd.addr();
        let workers = lbd.workers();
        assert_eq!(workers.len(), WORKERS);
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(Mutex::new(Stream::default()));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let stop = Arc::clone(&stop);
                let outcome = Arc::clone(&outcome);
                // Threads created here stay in this thread's network namespace.
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let result = get_close(addr, &format!("/stream/{t}/{n}"));
                        let mut o = outcome.lock().unwrap();
                        match result {
                            Ok(200) => o.ok += 1,
                            Err(e) if e.kind() == ErrorKind::ConnectionRefused => o.refused += 1,
                            other => o.failed.push(format!("client {t} request {n}: {other:?}")),
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1000));
        let victim = *workers
            .iter()
            .find(|&&w| worker_index(w) == Some(1))
            .unwrap();
        let known: HashSet<i32> = workers.iter().copied().collect();
        let before_kill = lbd.stdout().lines().count();
        let killed_at = Instant::now();
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let mut replacement = None;
        wait_until(Duration::from_secs(5), || {
            replacement = lbd.workers().into_iter().find(|w| !known.contains(w));
            replacement.is_some()
        });
        let back_after = killed_at.elapsed();
        let replacement = replacement.expect("no replacement worker within 5 s");
        wait_until(Duration::from_secs(5), || {
            proc_status(replacement, "Seccomp").as_deref() == Some("2")
        });
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        let stream = std::mem::take(&mut *outcome.lock().unwrap());
        println!(
            "{policy}: worker 1 (pid {victim}) killed; replacement {replacement} after \
             {back_after:?}; stream: {} ok, {} refused, failed {:?}",
            stream.ok, stream.refused, stream.failed
        );
        assert!(!process_alive(victim));
        assert_eq!(worker_index(replacement), Some(1));

        // Then 200 more, sequential: the replacement takes its share again.
        let tail_start = lbd.stdout().lines().count();
        let mut tail_failed = Vec::new();
        for n in 0..200 {
            match get_close(addr, &format!("/after/{n}")) {
                Ok(200) => {}
                other => tail_failed.push(format!("request {n}: {other:?}")),
            }
        }
        let made = stream.ok + stream.refused + stream.failed.len() as u64 + 200;
        let lines = lbd.wait_stdout_lines(tail_start + 200 - tail_failed.len());
        let before: HashSet<String> = request_id_prefixes(&lines[..before_kill])
            .into_iter()
            .collect();
        let tail: HashSet<String> = request_id_prefixes(&lines[tail_start..])
            .into_iter()
            .collect();
        let counters = stop_and_count(&mut lbd);
        println!("{policy}: {counters:?} over {made} connections");

        assert!(
            back_after < Duration::from_secs(1),
            "{policy}: the replacement appeared {back_after:?} after the kill"
        );
        assert_eq!(
            stream.refused, 0,
            "{policy}: refused connections: {stream:?}"
        );
        // Only a connection the dead worker had accepted can fail: one per client at most.
        assert!(
            stream.failed.len() <= CLIENTS,
            "{policy}: failed connections: {stream:?}"
        );
        assert!(stream.ok > 500, "{policy}: too few requests: {stream:?}");
        assert!(
            tail_failed.is_empty(),
            "{policy}: after the restart: {tail_failed:?}"
        );
        assert_eq!(
            before.len(),
            WORKERS,
            "{policy}: prefixes before the kill {before:?}"
        );
        assert_eq!(
            tail.len(),
            WORKERS,
            "{policy}: 4 worker processes should serve after the restart: {tail:?}"
        );
        assert_eq!(
            tail.difference(&before).count(),
            1,
            "{policy}: the replacement (a new request-id prefix) should serve: before \
             {before:?}, after {tail:?}"
        );
        assert_eq!(
            (
                counters.all_full,
                counters.no_worker,
                counters.select_failed
            ),
            (0, 0, 0),
            "{policy}: {counters:?}"
        );
        assert_eq!(counters.total(), made, "{policy}: {counters:?}");
    });
}

#[test]
fn a_killed_worker_loses_no_new_connection_flow_hash() {
    killed_worker("flow-hash");
}

#[test]
fn a_killed_worker_loses_no_new_connection_least_connections() {
    killed_worker("least-connections");
}

#[test]
fn a_killed_worker_loses_no_new_connection_power_of_two() {
    killed_worker("power-of-two");
}

// ---- eBPF steering is the default ------------------------------------------------------------

/// A config that does not name `steering` gets the sk_reuseport program: the supervisor
/// attaches it, and its counters account for every connection.
#[test]
fn a_config_without_steering_gets_ebpf_steering() {
    in_fresh_netns(|| {
        let origin = Origin::start("a");
        let mut lbd = Lbd::start_until(
            |l| one_cluster("workers = 2\n", l, &[origin.addr()]),
            workers_ready(2),
        );
        assert!(!lbd.config_text.contains("steering"), "no steering key");
        let log = lbd.stderr();
        assert!(
            log.contains("eBPF steering attached"),
            "the default is eBPF steering:\n{log}"
        );
        for n in 0..10 {
            assert_eq!(get_close(lbd.addr(), &format!("/{n}")).unwrap(), 200);
        }
        let counters = stop_and_count(&mut lbd);
        assert_eq!(counters.total(), 10, "{counters:?}");
        origin.stop();
    });
}

/// Without the privilege to load eBPF programs (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN taken
/// out of the bounding set, so root's exec gets none of them), lbd on a config without
/// `steering` stops at start with one line that says what is missing and that
/// `steering = "kernel"` runs without it; with that line added, the same lbd serves.
#[test]
fn without_the_privilege_to_load_ebpf_lbd_stops_with_one_line_and_kernel_steering_runs() {
    in_fresh_netns(|| {
        let origin = Origin::start("a");
        let dir = common::TempDir::new("no-bpf");
        let listener = common::free_addr();
        let body = one_cluster("workers = 2\n", listener, &[origin.addr()]);
        let config = dir.write(
            "lbd.toml",
            format!(
                "command_socket = \"{}/lbd.sock\"\n{body}",
                dir.path().display()
            ),
        );
        let setpriv = |config: &std::path::Path| {
            let mut cmd = std::process::Command::new("setpriv");
            cmd.args(["--bounding-set=-bpf,-perfmon,-sys_admin", common::lbd_bin()])
                .arg("--config")
                .arg(config);
            cmd
        };
        let out = common::run_bounded(setpriv(&config), Duration::from_secs(20), "lbd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let last = stderr.trim().lines().last().unwrap_or_default();
        assert_eq!(
            stderr
                .trim()
                .lines()
                .filter(|l| l.starts_with("lbd:"))
                .count(),
            1,
            "{stderr}"
        );
        assert!(
            last.starts_with("lbd: ")
                && last.contains(&listener.to_string())
                && last.contains("CAP_BPF")
                && last.contains("steering = \"kernel\""),
            "one line naming the listener, what is missing and the way out: {stderr}"
        );
        // The way out works, with the same privileges.
        let kernel = dir.write(
            "kernel.toml",
            format!(
                "steering = \"kernel\"\ncommand_socket = \"{}/lbd.sock\"\n{body}",
                dir.path().display()
            ),
        );
        let mut child = setpriv(&kernel)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let served = wait_until(Duration::from_secs(10), || {
            get_close(listener, "/").is_ok_and(|s| s == 200)
        });
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let _ = child.wait();
        assert!(served, "steering = \"kernel\" serves without CAP_BPF");
        origin.stop();
    });
}
