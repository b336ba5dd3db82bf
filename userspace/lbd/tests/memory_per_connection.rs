//! Memory per connection through a real `lbd` (issue 12, item 5): 2,000 client connections,
//! each sending one of the worst request heads we could craft for the parser's metadata
//! (thousands of tiny headers, thousands of cookie crumbs, heads at the header-field and
//! crumb caps with a long target, complete and kept alive or left unfinished), must keep the
//! worker's memory under `2,000 × the README's bytes-per-connection figure + its idle size`.
//! The figure is the one the README states for the default `buffer_size`; what is measured is
//! the worker's VmRSS (sampled) and VmHWM from `/proc`, so the transient of one parse counts
//! too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{process_memory, wait_until, Client, Lbd, Memory};
use lb_testkit::Origin;

/// The README's worst case per connection with `buffer_size = 16384` ("Memory per connection").
const BYTES_PER_CONNECTION: u64 = 4 * 16384 + 40 * 1024;
const CONNECTIONS: usize = 2000;

/// The worker processes of `lbd` (every pid but main's), their memory added up.
fn workers_memory(lbd: &Lbd) -> Memory {
    let main = lbd.pid();
    lbd.pids()
        .into_iter()
        .filter(|&p| p != main)
        .filter_map(process_memory)
        .fold(Memory::default(), |a, m| Memory {
            rss_kib: a.rss_kib + m.rss_kib,
            hwm_kib: a.hwm_kib + m.hwm_kib,
        })
}

/// A request line and Host, then `fields` more header lines.
fn head_of(target: &str, lines: &[String], end: bool) -> Vec<u8> {
    let mut h = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n");
    for l in lines {
        h.push_str(l);
        h.push_str("\r\n");
    }
    if end {
        h.push_str("\r\n");
    }
    h.into_bytes()
}

/// The heads sent, in turn, one per connection; `true` when a response is expected and the
/// connection then stays idle (kept alive), `false` when the head is left unfinished or may be
/// refused.
fn shapes() -> Vec<(&'static str, Vec<u8>, bool)> {
    let crumbs = format!("Cookie: {}", "a;".repeat(7000));
    let tiny: Vec<String> = (0..3500).map(|_| "a:".to_owned()).collect();
    let tiny_complete: Vec<String> = (0..2500).map(|_| "a:b".to_owned()).collect();
    // Just under the caps: 98 fields besides Host and Cookie, 127 crumbs, values filling the
    // buffer.
    let mut at_caps: Vec<String> = (0..97)
        .map(|i| format!("X-H{i}: {}", "v".repeat(80)))
        .collect();
    at_caps.push(format!(
        "Cookie: {}",
        (0..127)
            .map(|i| format!("c{i}=xxxxxxxxxx"))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let long_target = format!("/{}", "p".repeat(3000));
    vec![
        ("crumbs, unfinished", head_of("/", &[crumbs], false), false),
        (
            "tiny headers, unfinished",
            head_of("/", &tiny, false),
            false,
        ),
        (
            "tiny headers, complete",
            head_of("/", &tiny_complete, true),
            false,
        ),
        (
            "at the caps, unfinished",
            head_of(&long_target, &at_caps, false),
            false,
        ),
        (
            "at the caps, complete",
            head_of(&long_target, &at_caps, true),
            true,
        ),
    ]
}

#[test]
fn worst_heads_on_2000_connections_stay_under_the_stated_bound() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| {
        common::one_cluster(
            "max_connections = 5000\n[timeouts]\nrequest_header = \"60s\"\nfront_idle = \"60s\"\n\
             connect = \"30s\"\nback_idle = \"60s\"\n",
            l,
            &[addr],
        )
    });
    // Warm up (buffers, the idle pool, the log), then the idle size.
    for _ in 0..20 {
        assert_eq!(common::get(lbd.addr(), "localhost", "/").status, 200);
    }
    std::thread::sleep(Duration::from_millis(200));
    let idle = workers_memory(&lbd);
    assert!(idle.rss_kib > 0, "no worker found: {:?}", lbd.pids());

    let shapes = shapes();
    let mut clients: Vec<(usize, Client)> = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let shape = i % shapes.len();
        let mut c = Client::connect(lbd.addr());
        c.send(&shapes[shape].1);
        clients.push((shape, c));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for (shape, c) in clients.iter_mut() {
        if shapes[*shape].2 {
            let resp = c.response();
            *statuses.entry((shapes[*shape].0, resp.status)).or_insert(0) += 1;
        }
    }
    // The heads at the caps were served and their connections are kept alive, holding what
    // they hold.
    assert!(
        statuses.keys().all(|(_, status)| *status == 200),
        "{statuses:?}"
    );
    // Let the worker read whatever it has not read yet, then look at it a few times.
    let mut max_rss = 0;
    wait_until(Duration::from_secs(2), || {
        max_rss = max_rss.max(workers_memory(&lbd).rss_kib);
        false
    });
    let now = workers_memory(&lbd);
    let bound_kib = idle.rss_kib + CONNECTIONS as u64 * BYTES_PER_CONNECTION / 1024;
    let grown = max_rss.saturating_sub(idle.rss_kib);
    eprintln!(
        "idle {} KiB; with {CONNECTIONS} connections: max VmRSS {max_rss} KiB, VmHWM {} KiB \
         ({} bytes per connection over idle); bound {bound_kib} KiB; answers {statuses:?}",
        idle.rss_kib,
        now.hwm_kib,
        grown * 1024 / CONNECTIONS as u64
    );
    assert!(
        max_rss <= bound_kib && now.hwm_kib <= bound_kib,
        "the worker grew past {CONNECTIONS} × {BYTES_PER_CONNECTION} bytes + idle {} KiB: \
         max VmRSS {max_rss} KiB, VmHWM {} KiB",
        idle.rss_kib,
        now.hwm_kib
    );
    // Every connection is still served or was answered: nothing was lost on the way.
    drop(clients);
    assert_eq!(common::get(lbd.addr(), "localhost", "/").status, 200);
}

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: i32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// Peak RSS (issue 16): a worker is exec'd, so it faults in every page of lbd's binary that
/// its start runs (the config, the TLS and seccomp set-up), plus the kernel's fault-around;
/// before it serves it unmaps them, and the event loop faults back only what it runs. Seen
/// from /proc: its resident set after start and a few requests is well under its peak, by
/// file pages. Before the change the worker's RSS stayed at its peak (within the heap's
/// small returns).
#[test]
fn a_serving_worker_holds_only_the_binary_pages_it_runs() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start_until(
        |l| common::one_cluster("", l, &[addr]),
        common::workers_ready(1),
    );
    for _ in 0..20 {
        assert_eq!(common::get(lbd.addr(), "localhost", "/").status, 200);
    }
    let workers = lbd.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    let worker = workers[0];
    let (peak, now, file) = (
        status_kib(worker, "VmHWM:"),
        status_kib(worker, "VmRSS:"),
        status_kib(worker, "RssFile:"),
    );
    assert!(
        peak >= now + 1024,
        "the worker's RSS is {now} KiB ({file} KiB of it file pages), its peak {peak} KiB: \
         the start-up pages were not unmapped"
    );
}

/// lbd's main process gives back its start's memory (the BTF parse's heap, the pages of the
/// binary the start ran) a second after the start, not ten: a short bench's first scenario
/// counted ten seconds of it (main at its start-up peak). Seen from /proc: main's resident set
/// three seconds after the workers are up is under its peak by at least 1 MiB.
#[test]
fn main_gives_back_its_start_up_memory_in_seconds() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start_until(
        |l| common::one_cluster("", l, &[addr]),
        common::workers_ready(1),
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let main = lbd.pid();
    let (peak, now) = (status_kib(main, "VmHWM:"), status_kib(main, "VmRSS:"));
    assert!(
        peak >= now + 1024,
        "lbd's main process is at {now} KiB, its peak {peak} KiB: the start's memory is still \
         resident"
    );
}
