//! `lbctl upgrade` against a real lbd with eBPF steering, under real load.
//!
//! - Three upgrades in a row to freshly copied binaries under wrk keep-alive load, and again
//!   under `Connection: close` load (a new connection per request): wrk sees no socket error
//!   and no non-2xx answer; each upgrade reports the old and new generation, pid and binary;
//!   the old main and its workers are gone after the drain; `state dump` after the upgrades
//!   equals the dump before (lbctl changes made before the first upgrade included).
//! - A request in flight across the upgrade (3 s at the origin) completes with 200, and a
//!   WebSocket opened before it keeps echoing on the old generation until the client closes.
//! - A listener added at runtime (workers rolled onto the new socket) serves; removed, it is
//!   closed; wrk on the first listener sees no failure meanwhile.
//! - `--workers-only`: new worker pids, the same main, no failed request.
//! - Broken new binaries (one exits at start, one never becomes ready, one is not executable):
//!   lbctl exits 1 with the reason, the running generation keeps serving unchanged (same
//!   pids, same generation), no failed request.
//! - The new main killed with SIGKILL in the middle of the handoff (its workers started, before
//!   "ready"): the old generation keeps serving, no failed request.
//!
//! Each test runs in a fresh network namespace (the steering program attaches there), one at a
//! time; every process it starts is stopped by pid and every wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    in_fresh_netns, is_alive, lbctl_at, lbctl_ok, live_children, one_cluster, process_tree,
    wait_until, workers_ready, Lbd, Wrk,
};
use lb_testkit::Origin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WORKERS: usize = 2;
/// How long the old generation may take to be gone after an upgrade (drain included).
const GONE: Duration = Duration::from_secs(20);

/// One test at a time: they measure failures under load on a small machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `lbctl status --json` says about the running lbd.
#[derive(Debug, Clone, PartialEq)]
struct Status {
    pid: i32,
    generation: u64,
    version: String,
    workers: Vec<i32>,
}

fn status(socket: &Path) -> Status {
    let text = lbctl_ok(socket, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Status {
        pid: v["pid"].as_i64().unwrap() as i32,
        generation: v["generation"].as_u64().unwrap(),
        version: v["version"].as_str().unwrap().to_owned(),
        workers: v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_i64().unwrap_or(0) as i32)
            .collect(),
    }
}

/// One test at a time, in a fresh network namespace, with an origin and an lbd (eBPF
/// steering) in front of it; both are stopped after `test`.
fn rig(test: impl FnOnce(&Origin, &mut Lbd, &Path) + Send + 'static) {
    let _serial = serial();
    in_fresh_netns(move || {
        let origin = Origin::start("a");
        let mut lbd = start(origin.addr());
        let sock = socket(&lbd);
        test(&origin, &mut lbd, &sock);
        drop(lbd);
        origin.stop();
    });
}

/// wrk on lbd's listener for `seconds`, given half a second to get going.
fn load(lbd: &Lbd, connections: u32, seconds: u32, extra: &[&str]) -> Wrk {
    let url = format!("http://{}/", lbd.addr());
    let wrk = Wrk::start_with(&url, connections, seconds, "5s", extra, lbd.dir().path());
    std::thread::sleep(Duration::from_millis(500));
    wrk
}

fn socket(lbd: &Lbd) -> PathBuf {
    lbd.dir().path().join("lbd.sock")
}

fn start(origin: SocketAddr) -> Lbd {
    let top = format!(
        "workers = {WORKERS}\nsteering = \"ebpf\"\nsteering_policy = \"least-connections\"\n"
    );
    Lbd::start_until(|l| one_cluster(&top, l, &[origin]), workers_ready(WORKERS))
}

/// A shell script standing in for a broken lbd.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Upgrades to `binary` and checks what lbctl and the new lbd say; follows the new main.
fn upgrade(lbd: &mut Lbd, binary: &Path) -> Status {
    let sock = socket(lbd);
    let before = status(&sock);
    let started = Instant::now();
    let out = lbctl_ok(&sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
    let took = started.elapsed();
    let after = status(&sock);
    eprintln!("upgrade took {took:?}: {}", out.trim());
    assert_eq!(after.generation, before.generation + 1, "{out}");
    assert_ne!(after.pid, before.pid, "a new main process: {out}");
    assert_ne!(after.version, before.version, "another binary: {out}");
    assert!(
        out.contains(&format!("generation {}", before.generation))
            && out.contains(&format!("generation {}", after.generation))
            && out.contains(&before.version)
            && out.contains(&after.version),
        "lbctl names both generations and versions: {out}"
    );
    for w in &after.workers {
        assert!(
            !before.workers.contains(w),
            "new workers: {after:?} {before:?}"
        );
    }
    lbd.follow_main(after.pid);
    // The old main exits once its workers have finished; they are gone with it.
    assert!(
        wait_until(GONE, || !is_alive(before.pid)
            && before.workers.iter().all(|w| !is_alive(*w))),
        "the old generation ({before:?}) is still running {GONE:?} after the upgrade"
    );
    after
}

fn assert_clean(wrk: Wrk, what: &str) -> u64 {
    let (summary, out) = wrk.finish(Duration::from_secs(60));
    eprintln!("{what}: {summary:?}");
    summary.assert_clean(1000, what, &out);
    summary.requests
}

fn three_upgrades_under(extra: &'static [&'static str], what: &'static str) {
    let _serial = serial();
    in_fresh_netns(move || {
        let origin = Origin::start("a");
        let extra_origin = Origin::start("b");
        let mut lbd = start(origin.addr());
        let sock = socket(&lbd);
        // Runtime changes before the upgrades: they must all survive them.
        lbctl_ok(
            &sock,
            &[
                "backend",
                "add",
                "--cluster",
                "app",
                "--address",
                &extra_origin.addr().to_string(),
            ],
        );
        lbctl_ok(
            &sock,
            &[
                "cluster",
                "add",
                "spare",
                "--backend",
                &extra_origin.addr().to_string(),
            ],
        );
        let dump_before = lbctl_ok(&sock, &["state", "dump"]);
        let url = format!("http://{}/", lbd.addr());
        let wrk = Wrk::start_with(&url, 20, 14, "5s", extra, lbd.dir().path());
        std::thread::sleep(Duration::from_secs(1));
        let first = status(&sock);
        let mut generations = vec![first.generation];
        for n in 1..=3 {
            let binary = common::fresh_binary(lbd.dir().path(), n);
            let after = upgrade(&mut lbd, &binary);
            generations.push(after.generation);
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(generations, vec![1, 2, 3, 4]);
        let requests = assert_clean(wrk, what);
        let dump_after = lbctl_ok(&sock, &["state", "dump"]);
        assert_eq!(dump_before, dump_after, "the state survives three upgrades");
        // The last generation serves, and both backends of the edited cluster get traffic.
        assert_eq!(common::get(lbd.addr(), "x", "/").status, 200);
        assert!(
            extra_origin.requests().len() > 10,
            "the backend added before the upgrades got traffic"
        );
        eprintln!("{what}: {requests} requests over 3 upgrades, 0 failed");
        drop(lbd);
        origin.stop();
        extra_origin.stop();
    });
}

#[test]
fn three_upgrades_under_keep_alive_load_fail_no_request() {
    three_upgrades_under(&[], "keep-alive");
}

#[test]
fn three_upgrades_under_new_connection_load_fail_no_request() {
    three_upgrades_under(&["-H", "Connection: close"], "Connection: close");
}

#[test]
fn a_request_in_flight_across_the_upgrade_completes() {
    rig(|origin, lbd, sock| {
        let mut client = TcpStream::connect(lbd.addr()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        client
            .write_all(b"GET /sleep/3000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // The request is at the origin (in the old generation) before the upgrade starts.
        assert!(wait_until(Duration::from_secs(5), || origin
            .requests()
            .iter()
            .any(|r| r.target == "/sleep/3000")));
        let binary = common::fresh_binary(lbd.dir().path(), 1);
        let before = status(sock);
        let started = Instant::now();
        let out = lbctl_ok(sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the upgrade does not wait for the request"
        );
        let after = status(sock);
        lbd.follow_main(after.pid);
        assert!(after.generation == before.generation + 1, "{out}");
        // Meanwhile the old main is still there, waiting for its worker's request.
        assert!(is_alive(before.pid), "the old main waits for its workers");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&answer);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answered in time"
        );
        assert!(wait_until(GONE, || !is_alive(before.pid)));
    });
}

#[test]
fn workers_only_upgrade_replaces_the_workers_under_load() {
    rig(|_origin, lbd, sock| {
        let wrk = load(lbd, 20, 6, &[]);
        let before = status(sock);
        let out = lbctl_ok(sock, &["upgrade", "--workers-only"]);
        let after = status(sock);
        assert_eq!(after.pid, before.pid, "the same main: {out}");
        assert_eq!(after.generation, before.generation);
        for w in &after.workers {
            assert!(!before.workers.contains(w), "{before:?} → {after:?}: {out}");
            assert!(
                out.contains(&w.to_string()),
                "lbctl names the new workers: {out}"
            );
        }
        assert!(wait_until(GONE, || before
            .workers
            .iter()
            .all(|w| !is_alive(*w))));
        assert_eq!(live_children(lbd.pid()).len(), WORKERS);
        assert_clean(wrk, "workers-only upgrade");
    });
}

#[test]
fn a_broken_new_binary_is_rolled_back_and_nothing_fails() {
    rig(|_origin, lbd, sock| {
        let dir = lbd.dir().path().to_path_buf();
        let wrk = load(lbd, 10, 24, &[]);
        let before = status(sock);
        let dump = lbctl_ok(sock, &["state", "dump"]);
        let cases = [
            (script(&dir, "exits", "exit 3"), "exited with status 3"),
            (
                script(&dir, "hangs", "exec sleep 60"),
                "was not ready within 15 s",
            ),
            (
                script(&dir, "refuses", "echo nope >&2; exit 0"),
                "exited with status 0",
            ),
        ];
        for (binary, reason) in &cases {
            let started = Instant::now();
            let ctl = lbctl_at(sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
            eprintln!(
                "{}: {:?} {}",
                binary.display(),
                started.elapsed(),
                ctl.stderr.trim()
            );
            assert_eq!(ctl.code, Some(1), "{}", ctl.stderr);
            assert!(
                ctl.stderr.contains(reason) && ctl.stderr.contains("keeps serving"),
                "{}: {}",
                binary.display(),
                ctl.stderr
            );
            assert_eq!(
                ctl.stderr.trim().lines().count(),
                1,
                "one line: {}",
                ctl.stderr
            );
            assert_eq!(
                status(sock).workers,
                before.workers,
                "the same workers serve"
            );
        }
        let plain = dir.join("not-executable");
        fs::write(&plain, "data").unwrap();
        let ctl = lbctl_at(sock, &["upgrade", "--binary", plain.to_str().unwrap()]);
        assert_eq!(ctl.code, Some(1));
        assert!(ctl.stderr.contains("not an executable"), "{}", ctl.stderr);
        let after = status(sock);
        assert_eq!(
            (after.pid, after.generation),
            (before.pid, before.generation)
        );
        assert_eq!(after.workers, before.workers);
        assert_eq!(lbctl_ok(sock, &["state", "dump"]), dump);
        assert_clean(wrk, "rollbacks");
    });
}

#[test]
fn the_new_main_killed_mid_handoff_leaves_the_old_generation_serving() {
    rig(|_origin, lbd, sock| {
        let dir = lbd.dir().path().to_path_buf();
        let wrapper = script(
            &dir,
            "lbd-paused",
            &format!(
                "KAKEHI_TEST_HANDOFF_PAUSE_MS=10000 exec {} \"$@\"",
                common::lbd_bin()
            ),
        );
        let wrk = load(lbd, 10, 8, &[]);
        let before = status(sock);
        let sock2 = sock.to_path_buf();
        let wrapper2 = wrapper.clone();
        let upgrading = std::thread::spawn(move || {
            lbctl_at(&sock2, &["upgrade", "--binary", wrapper2.to_str().unwrap()])
        });
        // The new main: a child of the old one that is not a worker, with workers of its own.
        let mut new_main = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                new_main = process_tree(before.pid).into_iter().find(|&p| {
                    p != before.pid
                        && !before.workers.contains(&p)
                        && fs::read(format!("/proc/{p}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--upgrade-fd"))
                        && live_children(p).len() == WORKERS
                });
                new_main.is_some()
            }),
            "the new main and its workers appear"
        );
        let new_main = new_main.unwrap();
        kill(Pid::from_raw(new_main), Signal::SIGKILL).unwrap();
        let ctl = upgrading.join().unwrap();
        assert_eq!(ctl.code, Some(1), "{}", ctl.stderr);
        assert!(ctl.stderr.contains("killed by SIGKILL"), "{}", ctl.stderr);
        let after = status(sock);
        assert_eq!(
            (after.pid, after.generation),
            (before.pid, before.generation)
        );
        assert_eq!(after.workers, before.workers);
        assert_eq!(common::get(lbd.addr(), "x", "/").status, 200);
        assert_clean(wrk, "killed handoff");
    });
}

#[test]
fn a_listener_added_and_removed_at_runtime_serves_and_stops_with_no_failed_request() {
    rig(|_origin, lbd, sock| {
        let wrk = load(lbd, 20, 8, &[]);
        let before = status(sock);
        let added = common::free_addr().to_string();
        let out = lbctl_ok(sock, &["listener", "add", "--address", &added]);
        assert!(out.contains(&added), "{out}");
        let out = lbctl_ok(
            sock,
            &["frontend", "add", "--cluster", "app", "--address", &added],
        );
        assert!(out.contains("frontend"), "{out}");
        let on_added = common::get(added.parse().unwrap(), "x", "/");
        assert_eq!(on_added.status, 200, "the new listener serves");
        assert!(on_added.text().contains("origin a"));
        let middle = status(sock);
        assert_eq!(middle.pid, before.pid, "no restart of lbd");
        for w in &middle.workers {
            assert!(
                !before.workers.contains(w),
                "the workers were rolled onto the new socket"
            );
        }
        assert!(wait_until(GONE, || before
            .workers
            .iter()
            .all(|w| !is_alive(*w))));
        lbctl_ok(
            sock,
            &[
                "frontend",
                "remove",
                "--cluster",
                "app",
                "--address",
                &added,
            ],
        );
        lbctl_ok(sock, &["listener", "remove", "--address", &added]);
        assert!(wait_until(GONE, || middle
            .workers
            .iter()
            .all(|w| !is_alive(*w))));
        let refused = TcpStream::connect(added.parse::<SocketAddr>().unwrap());
        assert!(
            refused.is_err(),
            "the removed listener is closed: {refused:?}"
        );
        assert_eq!(common::get(lbd.addr(), "x", "/").status, 200);
        assert_clean(wrk, "listener add and remove");
    });
}

#[test]
fn a_websocket_open_across_the_upgrade_keeps_echoing_on_the_old_generation() {
    rig(|_origin, lbd, sock| {
        let mut c = common::Client::connect(lbd.addr());
        c.send(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert_eq!(c.head().status, 101);
        let echo = |c: &mut common::Client, msg: &[u8]| {
            c.send(msg);
            let mut got = vec![0u8; msg.len()];
            c.reader.read_exact(&mut got).expect("echo");
            assert_eq!(got, msg);
        };
        echo(&mut c, b"before the upgrade");
        let before = status(sock);
        let binary = common::fresh_binary(lbd.dir().path(), 1);
        upgrade_without_waiting(lbd, &binary);
        // The old worker still pipes this connection while it drains.
        for i in 0..5 {
            echo(&mut c, format!("after the upgrade, message {i}").as_bytes());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(is_alive(before.pid), "the old main waits for its worker");
        c.shutdown_write();
        c.assert_closed();
        // With its last connection closed, the old generation is gone well before the
        // drain deadline.
        assert!(wait_until(Duration::from_secs(5), || !is_alive(before.pid)));
        assert_eq!(common::get(lbd.addr(), "x", "/").status, 200);
    });
}

/// `lbctl upgrade`, following the new main, without waiting for the old one to be gone.
fn upgrade_without_waiting(lbd: &mut Lbd, binary: &Path) {
    let sock = socket(lbd);
    let before = status(&sock);
    lbctl_ok(&sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
    let after = status(&sock);
    assert_eq!(after.generation, before.generation + 1);
    lbd.follow_main(after.pid);
}

/// Health verdicts are handed over: a backend the running lbd found down is down in the new
/// one at once, before the new one's own probe could say so (its connect hangs for the 3 s
/// probe timeout).
#[test]
fn a_backend_found_down_stays_down_across_the_upgrade() {
    let _serial = serial();
    in_fresh_netns(|| {
        let origin = Origin::start("a");
        let hole = common::BlackHole::new();
        let top = format!(
            "workers = {WORKERS}\nsteering = \"ebpf\"\nsteering_policy = \"least-connections\"\n"
        );
        let mut lbd = Lbd::start_until(
            |l| {
                format!(
                    "{top}\n[[listeners]]\naddress = \"{l}\"\n\n[clusters.app]\n\
                     frontends = [ {{ address = \"{l}\" }} ]\n\
                     backends = [ {{ address = \"{}\" }}, {{ address = \"{}\" }} ]\n\
                     health_check = {{ interval = \"4s\", timeout = \"3s\", rise = 1, fall = 1 }}\n",
                    origin.addr(),
                    hole.addr
                )
            },
            workers_ready(WORKERS),
        );
        let sock = socket(&lbd);
        let state_of = |sock: &Path| -> String {
            let text = lbctl_ok(sock, &["status", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["address"] == hole.addr.to_string())
                .map(|b| b["state"].as_str().unwrap_or("").to_owned())
                .unwrap_or_default()
        };
        assert!(
            wait_until(Duration::from_secs(10), || state_of(&sock) == "down"),
            "the running lbd finds the black hole down"
        );
        let binary = common::fresh_binary(lbd.dir().path(), 1);
        upgrade_without_waiting(&mut lbd, &binary);
        assert_eq!(state_of(&sock), "down", "the new lbd starts with it down");
        for _ in 0..20 {
            assert_eq!(common::get(lbd.addr(), "x", "/").status, 200);
        }
        drop(lbd);
        origin.stop();
    });
}
