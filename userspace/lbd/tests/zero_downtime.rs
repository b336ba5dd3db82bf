//! Zero downtime whatever the origin: no client error across upgrades and drains.
//!
//! The rule under test (README, "Upgrades"): kakehi closes a client connection only after a
//! response that said `Connection: close`, or while the connection is idle after the drain's
//! grace. The exchange in flight when a drain begins finishes; the next request on that
//! connection is answered with `Connection: close`.
//!
//! The origins are the ones users have, not the project's own fast one:
//! - `split`: Python's `http.server` (HTTP/1.1, threaded), ~40 ms per request, the response
//!   head and body written apart (as `http.server` and most application servers do);
//! - `stream`: the same server streaming a chunked body over 2 s;
//! - `instant`: lb-testkit's origin, which answers at once in one write.
//!
//! Under `wrk -t1` keep-alive load (16 and 200 connections), lbd (2 workers, eBPF steering)
//! is upgraded 3 times 1 s apart, rolled with `--workers-only`, or given a listener that is
//! then removed: wrk must see zero socket errors and zero non-2xx answers.
//!
//! Each test runs in a fresh network namespace, one at a time; every process it starts is
//! stopped by pid and every wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    in_fresh_netns, is_alive, lbctl_ok, one_cluster, wait_until, workers_ready, Lbd, Wrk,
};
use lb_testkit::Origin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WORKERS: usize = 2;
/// How long an old generation may take to be gone after an upgrade (drain included).
const GONE: Duration = Duration::from_secs(20);

/// One test at a time: they count failures under load on a small machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Python `http.server` origin. `split`: 40 ms, then the head and the body in two writes.
/// `stream`: a chunked body of four parts 0.5 s apart.
const PY_ORIGIN: &str = r#"
import http.server, sys, time

MODE = sys.argv[1]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if MODE == "split":
            time.sleep(0.04)
            body = b"python origin\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()          # first write: the head
            self.wfile.write(body)      # second write: the body
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(4):
                time.sleep(0.5)
                part = b"part %d\n" % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// A Python origin process, killed by pid when dropped.
struct PyOrigin {
    child: Child,
    addr: SocketAddr,
}

impl PyOrigin {
    fn start(mode: &str, dir: &Path) -> PyOrigin {
        let script = dir.join("origin.py");
        fs::write(&script, PY_ORIGIN).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs python3: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the python origin printed {line:?}, not its port"));
        PyOrigin {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for PyOrigin {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Which origin serves the test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Split,
    Stream,
    Instant,
}

/// The origin of one test, whatever its kind.
enum AnyOrigin {
    Py(PyOrigin),
    Own(Origin),
}

impl AnyOrigin {
    fn start(kind: Kind, dir: &Path) -> AnyOrigin {
        match kind {
            Kind::Split => AnyOrigin::Py(PyOrigin::start("split", dir)),
            Kind::Stream => AnyOrigin::Py(PyOrigin::start("stream", dir)),
            Kind::Instant => AnyOrigin::Own(Origin::start("instant")),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            AnyOrigin::Py(p) => p.addr,
            AnyOrigin::Own(o) => o.addr(),
        }
    }
}

fn main_pid(socket: &Path) -> (i32, Vec<i32>) {
    let v: serde_json::Value =
        serde_json::from_str(&lbctl_ok(socket, &["status", "--json"])).unwrap();
    let workers = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap_or(0) as i32)
        .collect();
    (v["pid"].as_i64().unwrap() as i32, workers)
}

/// What the test does to lbd while wrk runs.
#[derive(Clone, Copy, Debug)]
enum Disturbance {
    /// Three `lbctl upgrade`s to fresh binaries, 1 s apart.
    Upgrades,
    /// `lbctl upgrade --workers-only`, twice, 1 s apart.
    WorkersOnly,
    /// A listener added (the workers roll onto the new set), then removed (they roll again).
    ListenerAddRemove,
}

/// wrk keep-alive on lbd in front of a `kind` origin while `what` happens; zero socket
/// errors and zero non-2xx answers.
fn no_error_across(kind: Kind, connections: u32, what: Disturbance) {
    let _serial = serial();
    in_fresh_netns(move || {
        let dir = common::TempDir::new("zero-downtime");
        let origin = AnyOrigin::start(kind, dir.path());
        let top = format!("workers = {WORKERS}\nsteering = \"ebpf\"\n");
        let mut lbd = Lbd::start_until(
            |l| one_cluster(&top, l, &[origin.addr()]),
            workers_ready(WORKERS),
        );
        let sock = lbd.dir().path().join("lbd.sock");
        let url = format!("http://{}/", lbd.addr());
        let seconds = 8;
        let wrk = Wrk::start_with(&url, connections, seconds, "10s", &[], lbd.dir().path());
        std::thread::sleep(Duration::from_millis(1500));
        let mut retired = Vec::new();
        match what {
            Disturbance::Upgrades => {
                for n in 1..=3 {
                    let before = main_pid(&sock);
                    let binary = common::fresh_binary(lbd.dir().path(), n);
                    lbctl_ok(&sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
                    let after = main_pid(&sock);
                    assert_ne!(before.0, after.0, "a new main");
                    lbd.follow_main(after.0);
                    retired.push(before.0);
                    retired.extend(before.1);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            Disturbance::WorkersOnly => {
                for _ in 0..2 {
                    let before = main_pid(&sock);
                    lbctl_ok(&sock, &["upgrade", "--workers-only"]);
                    retired.extend(before.1);
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            Disturbance::ListenerAddRemove => {
                let added = common::free_addr().to_string();
                let before = main_pid(&sock);
                lbctl_ok(&sock, &["listener", "add", "--address", &added]);
                retired.extend(before.1);
                std::thread::sleep(Duration::from_secs(1));
                let middle = main_pid(&sock);
                lbctl_ok(&sock, &["listener", "remove", "--address", &added]);
                retired.extend(middle.1);
            }
        }
        let started = Instant::now();
        let (summary, out) = wrk.finish(Duration::from_secs(u64::from(seconds) + 30));
        eprintln!(
            "{kind:?} origin, c{connections}, {what:?}: {summary:?} (wrk ended {:?} after the last change)",
            started.elapsed()
        );
        summary.assert_clean(
            u64::from(connections),
            &format!("{kind:?} origin, c{connections}, {what:?}"),
            &out,
        );
        assert!(
            wait_until(GONE, || retired.iter().all(|p| !is_alive(*p))),
            "the retired processes {retired:?} are gone after the drain"
        );
        drop(lbd);
        drop(origin);
    });
}

#[test]
fn upgrades_fail_no_request_with_an_origin_writing_head_and_body_apart_c16() {
    no_error_across(Kind::Split, 16, Disturbance::Upgrades);
}

#[test]
fn upgrades_fail_no_request_with_an_origin_writing_head_and_body_apart_c200() {
    no_error_across(Kind::Split, 200, Disturbance::Upgrades);
}

#[test]
fn upgrades_fail_no_request_with_an_origin_streaming_a_chunked_body_c16() {
    no_error_across(Kind::Stream, 16, Disturbance::Upgrades);
}

#[test]
fn upgrades_fail_no_request_with_an_origin_streaming_a_chunked_body_c200() {
    no_error_across(Kind::Stream, 200, Disturbance::Upgrades);
}

#[test]
fn upgrades_fail_no_request_with_an_instant_origin_c16() {
    no_error_across(Kind::Instant, 16, Disturbance::Upgrades);
}

#[test]
fn upgrades_fail_no_request_with_an_instant_origin_c200() {
    no_error_across(Kind::Instant, 200, Disturbance::Upgrades);
}

#[test]
fn workers_only_upgrades_fail_no_request_with_an_origin_writing_head_and_body_apart() {
    no_error_across(Kind::Split, 16, Disturbance::WorkersOnly);
}

#[test]
fn a_listener_added_and_removed_fails_no_request_with_an_origin_writing_head_and_body_apart() {
    no_error_across(Kind::Split, 16, Disturbance::ListenerAddRemove);
}
