//! Syscalls per request in steady state (issue 16), counted by `strace -c` on a real worker
//! while `wrk` sends keep-alive requests to two backends in round robin: every request goes to
//! another backend than the one before it on the same client connection, so a pooled backend
//! connection changes hands between sessions at every request.
//!
//! Required: no `epoll_ctl` per request (a backend connection is registered once, when it is
//! opened, under a token of its own, and stays registered while it waits in the pool; the
//! only registrations left are those of wrk's new client connections), and no empty read per
//! request (a read that finds nothing, `EAGAIN`: nginx makes none in this scenario).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_until, Lbd};
use lb_testkit::Origin;

/// Client connections wrk keeps open.
const CLIENTS: usize = 16;

/// One row of `strace -c`: calls and errors of a syscall.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    calls: u64,
    errors: u64,
}

/// Parses the table `strace -c` writes: `% time seconds usecs/call calls errors syscall`,
/// the errors column empty when there were none.
fn parse_strace_summary(text: &str) -> HashMap<String, Count> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 5 || words[0].parse::<f64>().is_err() {
            continue;
        }
        let name = words[words.len() - 1];
        if name == "total" {
            continue;
        }
        let calls = words[3].parse().unwrap();
        let errors = if words.len() >= 6 {
            words[4].parse().unwrap()
        } else {
            0
        };
        out.insert(name.to_string(), Count { calls, errors });
    }
    out
}

/// Runs wrk against `url` and returns the number of requests it completed.
fn wrk(url: &str, seconds: u32) -> u64 {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{CLIENTS}"),
            &format!("-d{seconds}s"),
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("wrk (installed by cargo xtask setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk saw errors:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("requests in"))
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

fn tracer_pid(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

#[test]
fn keepalive_round_robin_makes_no_epoll_ctl_and_no_empty_read_per_request() {
    let a = Origin::start("a");
    let b = Origin::start("b");
    // Ready when the worker is started, not when the listener answers (main binds it before
    // it forks the worker: a CI run looked for the worker in between and found none).
    let lbd = Lbd::start_until(
        |l| {
            format!(
                "workers = 1\n[access_log]\ntarget = \"off\"\n\n[[listeners]]\naddress = \"{l}\"\n\n\
                 [clusters.app]\nload_balancing = \"round-robin\"\n\
                 frontends = [ {{ address = \"{l}\" }} ]\nbackends = {}\n",
                common::backends(&[a.addr(), b.addr()])
            )
        },
        common::workers_ready(1),
    );
    let url = format!("http://{}/", lbd.addr());
    let main = lbd.pid();
    let workers: Vec<i32> = lbd.pids().into_iter().filter(|&p| p != main).collect();
    assert_eq!(workers.len(), 1, "one worker expected: {:?}", lbd.pids());
    let worker = workers[0];

    // Warm up: the backend connections are opened and pooled.
    wrk(&url, 1);

    let dir = common::TempDir::new("strace");
    let summary = dir.path().join("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-c", "-q", "-o"])
        .arg(&summary)
        .args(["-p", &worker.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace (installed by cargo xtask setup)");
    assert!(
        wait_until(Duration::from_secs(5), || tracer_pid(worker) != 0),
        "strace did not attach to the worker {worker}"
    );
    let requests = wrk(&url, 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    // strace writes its summary when interrupted, and exits with a status of its own.
    let _ = strace.wait().unwrap();
    let text = std::fs::read_to_string(&summary).unwrap();
    let counts = parse_strace_summary(&text);
    let count = |name: &str| counts.get(name).copied().unwrap_or_default();
    let per = |n: u64| n as f64 / requests as f64;

    let epoll_ctl = count("epoll_ctl");
    let reads = [count("recvfrom"), count("read")];
    let empty_reads: u64 = reads.iter().map(|c| c.errors).sum();
    eprintln!(
        "{requests} requests on {CLIENTS} connections, two backends in round robin: \
         epoll_ctl {} ({:.3}/request), reads {} ({:.3}/request), empty reads {empty_reads} \
         ({:.3}/request), writev {:.3}/request\n{text}",
        epoll_ctl.calls,
        per(epoll_ctl.calls),
        reads.iter().map(|c| c.calls).sum::<u64>(),
        per(reads.iter().map(|c| c.calls).sum()),
        per(empty_reads),
        per(count("writev").calls),
    );
    assert!(requests > 500, "too few requests to count: {requests}");
    // wrk's new client connections are registered once each; a backend connection opened
    // because the pool ran short may add a few more.
    assert!(
        epoll_ctl.calls <= (CLIENTS + 8) as u64,
        "{} epoll_ctl for {requests} requests on {CLIENTS} new client connections",
        epoll_ctl.calls
    );
    assert!(
        per(empty_reads) < 0.02,
        "{empty_reads} empty reads for {requests} requests"
    );
}

#[test]
fn strace_summary_parses() {
    let text = "% time     seconds  usecs/call     calls    errors syscall\n\
        ------ ----------- ----------- --------- --------- ----------------\n \
        52.10    0.100000           5     20000           writev\n \
        30.00    0.050000           2     23000      3100 recvfrom\n  \
        0.01    0.000010           1        12           epoll_ctl\n\
        ------ ----------- ----------- --------- --------- ----------------\n\
        100.00    0.150010           3     43012      3100 total\n";
    let c = parse_strace_summary(text);
    assert_eq!(c["writev"].calls, 20000);
    assert_eq!(c["writev"].errors, 0);
    assert_eq!(c["recvfrom"].calls, 23000);
    assert_eq!(c["recvfrom"].errors, 3100);
    assert_eq!(c["epoll_ctl"].calls, 12);
    assert!(!c.contains_key("total"));
}
