//! `lbctl upgrade`, drains and runtime config changes with HTTP/2 clients (h2c prior
//! knowledge on an http listener): a draining worker says GOAWAY(NO_ERROR, last stream id) on
//! every HTTP/2 connection, lets the streams in flight finish, refuses newer ones with
//! REFUSED_STREAM, then closes; no stream is lost.
//!
//! - h2load (8 connections, 10 streams each, `/sleep/20`, duration mode) across two upgrades:
//!   0 failed, 0 errored, 0 timeout, every answer 2xx. h2load (nghttp2 1.52) retries nothing:
//!   a stream it sent that crossed the GOAWAY is refused (REFUSED_STREAM, safe to retry, RFC
//!   9113 §8.7) and counts as failed and errored; and over HTTP/2 it opens no new connection
//!   after a GOAWAY (it does only for HTTP/1.1 `Connection: close`): once its connections said
//!   GOAWAY at the first upgrade it sends nothing more, so the second upgrade sees no h2load
//!   traffic (its `--log-file` spans are printed). The next test is the load that follows RFC
//!   9113 across both.
//! - The same load from an RFC 9113 client (tests/h2/upgrade_client.py, python3-h2): on GOAWAY
//!   it opens no new stream on that connection and retries the refused ones on a new
//!   connection. No stream is lost, every request reaches the origin exactly once, every
//!   GOAWAY says NO_ERROR.
//! - One connection with 5 slow streams across an upgrade: GOAWAY(NO_ERROR) with a last
//!   stream id covering them, the 5 finish with 200 and their whole bodies, a stream opened
//!   after the GOAWAY is refused and never reaches the origin, the connection is closed, and a
//!   new connection is held by a worker of the new generation.
//! - One connection across `backend add`, `backend drain` and `backend remove` with streams in
//!   flight: they finish, no GOAWAY, the connection keeps serving and follows the change.
//!
//! Each test runs in a fresh network namespace (eBPF steering, 2 workers, as `upgrade.rs`),
//! one at a time; every process it starts is stopped by pid and every wait has a deadline.
//!
//! `cargo test -p lbd --test http2_upgrade -- --nocapture` (as root, like upgrade.rs).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    in_fresh_netns, is_alive, lbctl_ok, one_cluster, parse_h2load, require, run_bounded,
    socket_inodes, tcp_sockets, wait_until, workers_ready, Lbd, TCP_ESTABLISHED,
};
use lb_testkit::Origin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const WORKERS: usize = 2;
/// How long the old generation may take to be gone after an upgrade (drain included).
const GONE: Duration = Duration::from_secs(20);
/// The longest a client may run.
const DEADLINE: Duration = Duration::from_secs(90);
/// RFC 9113 §7.
const REFUSED_STREAM: u64 = 0x7;
/// How long the slow streams take at the origin: longer than an upgrade takes on a busy
/// machine (100-600 ms seen), so that the drain begins while they are in flight.
const SLOW_MS: u64 = 2500;

/// One test at a time: they count failures under load on a small machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- lbd ------------------------------------------------------------------------------------

/// What `lbctl status --json` says about the running lbd.
#[derive(Debug, Clone, PartialEq)]
struct Status {
    pid: i32,
    generation: u64,
    workers: Vec<i32>,
}

fn status(socket: &Path) -> Status {
    let text = lbctl_ok(socket, &["status", "--json"]);
    let v: Value = serde_json::from_str(&text).unwrap();
    Status {
        pid: v["pid"].as_i64().unwrap() as i32,
        generation: v["generation"].as_u64().unwrap(),
        workers: v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_i64().unwrap_or(0) as i32)
            .collect(),
    }
}

fn socket(lbd: &Lbd) -> PathBuf {
    lbd.dir().path().join("lbd.sock")
}

/// lbd (2 workers, eBPF steering) with one http listener (h2c and HTTP/1.1) in front of
/// `origin`.
fn start(origin: SocketAddr) -> Lbd {
    let top = format!(
        "workers = {WORKERS}\nsteering = \"ebpf\"\nsteering_policy = \"least-connections\"\n"
    );
    Lbd::start_until(|l| one_cluster(&top, l, &[origin]), workers_ready(WORKERS))
}

/// `lbctl upgrade --binary` a fresh copy of lbd; follows the new main. Returns the status
/// before and after (the old generation may still be draining).
fn upgrade(lbd: &mut Lbd, n: usize) -> (Status, Status, Duration) {
    let binary = common::fresh_binary(lbd.dir().path(), n);
    upgrade_to(lbd, &binary, n)
}

/// [`upgrade`] to a binary made beforehand (copying lbd takes a while on a busy machine).
fn upgrade_to(lbd: &mut Lbd, binary: &Path, n: usize) -> (Status, Status, Duration) {
    let sock = socket(lbd);
    let before = status(&sock);
    let started = Instant::now();
    let out = lbctl_ok(&sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
    let took = started.elapsed();
    let after = status(&sock);
    eprintln!("upgrade {n} took {took:?}: {}", out.trim());
    assert_eq!(after.generation, before.generation + 1, "{out}");
    assert_ne!(after.pid, before.pid, "a new main: {out}");
    lbd.follow_main(after.pid);
    (before, after, took)
}

fn assert_gone(old: &Status) {
    assert!(
        wait_until(GONE, || !is_alive(old.pid)
            && old.workers.iter().all(|w| !is_alive(*w))),
        "the old generation ({old:?}) is still running {GONE:?} after the upgrade"
    );
}

/// How many requests the origin saw whose target starts with `prefix`.
fn seen(origin: &Origin, prefix: &str) -> usize {
    origin
        .requests()
        .iter()
        .filter(|r| r.target.starts_with(prefix))
        .count()
}

// ---- h2load ---------------------------------------------------------------------------------

#[test]
fn h2load_across_two_upgrades_fails_no_request() {
    require("h2load", "nghttp2-client");
    let _serial = serial();
    in_fresh_netns(|| {
        let origin = Origin::start("a");
        let mut lbd = start(origin.addr());
        let _ = status(&socket(&lbd));
        let url = format!("http://{}/sleep/20", lbd.addr());
        let log = lbd.dir().path().join("h2load.log");
        let log_arg = log.to_str().unwrap().to_owned();
        let h2load = std::thread::spawn(move || {
            let mut cmd = Command::new("h2load");
            // -N: a connection quiet for 10 s is given up (and counted as failed requests).
            // --log-file: one line per request, "start (µs since the epoch) TAB status (-1:
            // failed) TAB duration (µs)".
            cmd.args([
                "-c",
                "8",
                "-m",
                "10",
                "-D",
                "8",
                "-N",
                "10",
                "--log-file",
                &log_arg,
                &url,
            ]);
            run_bounded(cmd, DEADLINE, "h2load")
        });
        std::thread::sleep(Duration::from_secs(2));
        let mut retired = Vec::new();
        for n in 1..=2 {
            let (before, _, _) = upgrade(&mut lbd, n);
            retired.push(before);
            std::thread::sleep(Duration::from_millis(2500));
        }
        let out = h2load.join().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{text}");
        let m = parse_h2load(&text);
        let get = |k: &str| m.get(k).copied().unwrap_or(u64::MAX);
        eprintln!(
            "h2load across 2 upgrades: {} done, {} succeeded, {} failed, {} errored, {} timeout, \
             {} 2xx; the origin saw {} requests",
            get("done"),
            get("succeeded"),
            get("failed"),
            get("errored"),
            get("timeout"),
            get("status 2xx"),
            origin.requests().len()
        );
        // When did h2load start its requests, and which failed? (It opens no new connection
        // after a GOAWAY over HTTP/2: once every connection it had said GOAWAY, it sends
        // nothing more.)
        let lines: Vec<(u64, i64)> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
            })
            .collect();
        // A request nghttp2 closed before sending it (refused locally at GOAWAY) has start 0.
        let unsent = lines.iter().filter(|l| l.0 == 0).count();
        let lines: Vec<(u64, i64)> = lines.into_iter().filter(|l| l.0 > 0).collect();
        let sent_and_failed = lines.iter().filter(|l| l.1 < 0).count();
        if let (Some(first), Some(last)) = (
            lines.iter().map(|l| l.0).min(),
            lines.iter().map(|l| l.0).max(),
        ) {
            let failed: Vec<f64> = lines
                .iter()
                .filter(|l| l.1 < 0)
                .map(|l| (l.0 - first) as f64 / 1e6)
                .collect();
            eprintln!(
                "h2load's log: {} requests started over {:.2}s of its 8s; failed ones started \
                 at {failed:.3?}s; {unsent} failed unsent",
                lines.len(),
                (last - first) as f64 / 1e6
            );
        }
        assert!(
            get("done") > 1000,
            "too few requests to say anything:\n{text}"
        );
        // What h2load counts as failed: requests sent and not answered (a stream refused or
        // lost: kakehi's fault), and requests nghttp2 never sent because the connection had
        // said GOAWAY (RFC 9113 §6.8: the client opens no stream there; h2load does not open a
        // new connection for them, a browser or gRPC client does). Only the first kind must be
        // zero; the second is logged with start time 0.
        assert_eq!(
            sent_and_failed, 0,
            "requests sent across the upgrades failed:\n{text}"
        );
        assert_eq!(
            get("failed").saturating_sub(unsent as u64),
            0,
            "h2load counted failures beyond the {unsent} requests it never sent:\n{text}"
        );
        assert_eq!(get("timeout"), 0, "timeouts across the upgrades:\n{text}");
        assert_eq!(
            (get("succeeded"), get("status 2xx")),
            (get("done") - unsent as u64, get("done") - unsent as u64),
            "not every request sent succeeded with a 2xx:\n{text}"
        );
        assert_eq!(
            origin.requests().len() as u64,
            get("succeeded"),
            "the origin did not see each answered request once"
        );
        for old in &retired {
            assert_gone(old);
        }
        drop(lbd);
        origin.stop();
    });
}

// ---- the python3-h2 client ------------------------------------------------------------------

/// upgrade_client.py, run with its stdout read line by line (JSON) and its stdin for "go".
struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: PathBuf,
    what: String,
}

impl Driver {
    fn start(addr: SocketAddr, dir: &Path, args: &[&str]) -> Driver {
        let ok = Command::new("/usr/bin/python3")
            .args(["-c", "import h2.connection"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "this test needs /usr/bin/python3 with the h2 module (Debian's python3-h2: `cargo \
             xtask setup` or apt-get install -y python3-h2); it is not skipped"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2/upgrade_client.py");
        let stderr = dir.join(format!("upgrade_client-{}.err", args[0]));
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(&stderr).unwrap()))
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Driver {
            child,
            stdin,
            lines,
            stderr,
            what: format!("upgrade_client.py {args:?}"),
        }
    }

    /// The next JSON line, within `within`; fails with the script's stderr otherwise.
    fn next(&mut self, within: Duration) -> Value {
        match self.lines.recv_timeout(within) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.what)),
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{}: no line within {within:?} (exit: {status:?}); stderr:\n{}",
                    self.what,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
        }
    }

    /// The next line, which must be the pause `name`.
    fn pause(&mut self, name: &str) -> Value {
        let v = self.next(DEADLINE);
        assert!(
            v["event"] == "pause" && v["name"] == name,
            "{}: expected pause {name:?}, got {v}",
            self.what
        );
        v
    }

    fn go(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The final report; the script exits 0.
    fn report(&mut self) -> Value {
        let v = self.next(DEADLINE);
        assert_eq!(v["event"], "report", "{}: {v}", self.what);
        let exited = wait_until(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        assert!(exited, "{}: still running after its report", self.what);
        v
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn streams(conn: &Value) -> &Vec<Value> {
    conn["streams"].as_array().expect("a streams array")
}

fn assert_stream_ok(s: &Value, body: &str, what: &str) {
    assert_eq!(s["status"].as_u64(), Some(200), "{what}: {s}");
    assert_eq!(s["ended"], true, "{what}: not ended: {s}");
    assert!(s["reset"].is_null(), "{what}: reset: {s}");
    assert_eq!(s["body_text"].as_str(), Some(body), "{what}: {s}");
}

#[test]
fn an_rfc_9113_client_loses_no_stream_across_two_upgrades() {
    let _serial = serial();
    in_fresh_netns(|| {
        let origin = Origin::start("a");
        let mut lbd = start(origin.addr());
        let _ = status(&socket(&lbd));
        let dir = lbd.dir().path().to_path_buf();
        let mut client = Driver::start(lbd.addr(), &dir, &["load", "8", "10", "8", "/sleep/20"]);
        std::thread::sleep(Duration::from_secs(2));
        let mut retired = Vec::new();
        for n in 1..=2 {
            let (before, _, _) = upgrade(&mut lbd, n);
            retired.push(before);
            std::thread::sleep(Duration::from_millis(2500));
        }
        let report = client.report();
        let goaways = report["goaways"].as_array().unwrap();
        eprintln!(
            "RFC 9113 client across 2 upgrades: {} tags, {} sent, {} ok, {} refused with \
             REFUSED_STREAM, {} above GOAWAY's last stream id ({}), {} lost, {} connections, {} \
             GOAWAYs: {}",
            report["last_tag"],
            report["sent"],
            report["ok"],
            report["refused_rst"],
            report["above_goaway"],
            report["above_goaway_how"],
            report["lost"].as_array().unwrap().len(),
            report["connections"],
            goaways.len(),
            serde_json::to_string(goaways).unwrap()
        );
        assert_eq!(
            report["lost"].as_array().unwrap().len(),
            0,
            "streams lost: {}",
            report["lost"]
        );
        let tags = report["last_tag"].as_u64().unwrap();
        assert!(tags > 500, "too few requests to say anything: {report}");
        assert_eq!(
            report["ok"].as_u64(),
            Some(tags),
            "every request answered: {report}"
        );
        assert!(
            goaways.len() >= 8,
            "each of the 8 connections open at the first upgrade got GOAWAY: {report}"
        );
        for g in goaways {
            assert_eq!(g["code"], 0, "GOAWAY with an error code: {g}");
        }
        // Each request reached the origin exactly once: a refused stream was not processed.
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for r in origin.requests() {
            if let Some(tag) = r.target.strip_prefix("/sleep/20?r=") {
                *counts.entry(tag.parse().unwrap()).or_default() += 1;
            }
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "requests processed twice: {twice:?}");
        assert_eq!(
            counts.len() as u64,
            tags,
            "every request reached the origin once"
        );
        for old in &retired {
            assert_gone(old);
        }
        drop(client);
        drop(lbd);
        origin.stop();
    });
}

#[test]
fn slow_streams_finish_across_an_upgrade_after_goaway_and_newer_ones_are_refused() {
    let _serial = serial();
    in_fresh_netns(|| {
        let origin = Origin::start("a");
        let mut lbd = start(origin.addr());
        // lbctl found (or built) before the clock starts for the slow streams.
        let _ = status(&socket(&lbd));
        let dir = lbd.dir().path().to_path_buf();
        let binary = common::fresh_binary(&dir, 1);
        let slow = SLOW_MS.to_string();
        let mut client = Driver::start(lbd.addr(), &dir, &["drain", &slow]);
        let opened = client.pause("opened");
        let ids: Vec<u64> = opened["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), 5);
        // The 5 are at the origin, in the old generation, before the upgrade starts.
        let prefix = format!("/sleep/{SLOW_MS}?n=");
        assert!(
            wait_until(Duration::from_secs(5), || seen(&origin, &prefix) == 5),
            "the 5 slow streams did not reach the origin"
        );
        let at_origin = Instant::now();
        client.go();
        let (before, after, took) = upgrade_to(&mut lbd, &binary, 1);
        let new = client.pause("new");
        let since = at_origin.elapsed();
        // The new connection: which process holds its socket?
        let port = new["local_port"].as_u64().unwrap() as u16;
        let inode = tcp_sockets(lbd.pid())
            .into_iter()
            .find(|s| {
                s.state == TCP_ESTABLISHED && s.local == lbd.addr() && s.remote.port() == port
            })
            .map(|s| s.inode)
            .unwrap_or_else(|| panic!("no socket of lbd's for the new connection (port {port})"));
        let holders: Vec<i32> = after
            .workers
            .iter()
            .chain(before.workers.iter())
            .copied()
            .filter(|w| socket_inodes(*w).contains(&inode))
            .collect();
        assert!(
            holders.len() == 1 && after.workers.contains(&holders[0]),
            "the new connection is held by {holders:?}, not by one of the new generation's \
             workers {:?} (old: {:?})",
            after.workers,
            before.workers
        );
        client.go();
        let report = client.report();
        let old = &report["old"];
        eprintln!(
            "upgrade took {took:?} ({since:?} from the 5 streams at the origin to the new \
             connection served); old connection: goaway {} at {}s, closed at {}s; streams: {}",
            old["goaway"],
            old["goaway_at"],
            old["closed_at"],
            serde_json::to_string(
                &streams(old)
                    .iter()
                    .map(|s| (
                        s["id"].clone(),
                        s["path"].clone(),
                        s["status"].clone(),
                        s["reset"].clone(),
                        s["done_at"].clone()
                    ))
                    .collect::<Vec<_>>()
            )
            .unwrap()
        );
        // GOAWAY(NO_ERROR) covering the 5 streams, sent while they were still in flight.
        let goaway = &old["goaway"];
        assert!(
            !goaway.is_null(),
            "no GOAWAY on the drained connection: {old}"
        );
        assert_eq!(
            goaway["error_code"], 0,
            "GOAWAY with an error code: {goaway}"
        );
        let last = goaway["last_stream_id"].as_u64().unwrap();
        assert!(
            last >= *ids.iter().max().unwrap(),
            "GOAWAY's last stream id {last} does not cover the streams in flight {ids:?}"
        );
        assert_eq!(
            goaway["streams_done_before"], 0,
            "the slow streams finished before the drain began (upgrade took {took:?}): the \
             test did not drain with streams in flight (too slow a machine?)"
        );
        // The 5 finish with their whole answer.
        let s = streams(old);
        for (i, st) in s.iter().take(5).enumerate() {
            assert_eq!(st["id"].as_u64(), Some(ids[i]));
            assert_stream_ok(st, &format!("slept {SLOW_MS}ms\n"), "a stream in flight");
        }
        // The stream opened after GOAWAY: refused, never served, never at the origin.
        assert_eq!(
            report["after_goaway"], true,
            "no stream could be sent after GOAWAY"
        );
        let late = &s[5];
        assert_eq!(late["path"], "/after-goaway");
        assert!(
            late["id"].as_u64().unwrap() > last,
            "the late stream's id is above the last stream id: {late}"
        );
        assert!(
            !(late["status"].as_u64() == Some(200) && late["ended"] == true),
            "a stream opened after GOAWAY was served: {late}"
        );
        assert_eq!(
            late["reset"]["error_code"].as_u64(),
            Some(REFUSED_STREAM),
            "a stream opened after GOAWAY is refused with REFUSED_STREAM: {late}"
        );
        assert_eq!(
            seen(&origin, "/after-goaway"),
            0,
            "the refused stream reached the origin"
        );
        // Then the connection is closed.
        assert_eq!(
            old["closed"], true,
            "the drained connection was not closed: {old}"
        );
        // The new connection serves (twice).
        let n = streams(&report["new"]);
        assert_stream_ok(&n[0], "origin a: GET /new-conn\n", "the new connection");
        assert_stream_ok(
            &n[1],
            "origin a: GET /new-conn-again\n",
            "the new connection again",
        );
        assert!(report["new"]["goaway"].is_null(), "{}", report["new"]);
        assert_gone(&before);
        drop(client);
        drop(lbd);
        origin.stop();
    });
}

#[test]
fn backend_add_drain_and_remove_with_streams_in_flight_keep_the_connection_serving() {
    let _serial = serial();
    in_fresh_netns(|| {
        let a = Origin::start("A");
        let b = Origin::start("B");
        let lbd = start(a.addr());
        let sock = socket(&lbd);
        let dir = lbd.dir().path().to_path_buf();
        let workers = status(&sock).workers;
        let mut client = Driver::start(lbd.addr(), &dir, &["config"]);
        let cluster_backend = |verb: &str, o: &Origin| {
            let out = lbctl_ok(
                &sock,
                &[
                    "backend",
                    verb,
                    "--cluster",
                    "app",
                    "--address",
                    &o.addr().to_string(),
                ],
            );
            eprintln!("backend {verb}: {}", out.trim());
        };

        client.pause("opened");
        assert!(
            wait_until(Duration::from_secs(5), || seen(
                &a,
                "/sleep/1500?step=inflight-"
            ) == 5),
            "the 5 streams did not reach origin A"
        );
        cluster_backend("add", &b);
        client.go();

        client.pause("opened2");
        // Wait until every one of the 6 is at an origin; some must be at A.
        assert!(
            wait_until(Duration::from_secs(5), || seen(
                &a,
                "/sleep/1500?step=draining-"
            ) + seen(
                &b,
                "/sleep/1500?step=draining-"
            ) == 6),
            "the 6 streams did not reach the origins"
        );
        let at_a = seen(&a, "/sleep/1500?step=draining-");
        assert!(
            at_a > 0,
            "none of the 6 streams went to A: nothing in flight at the drain"
        );
        cluster_backend("drain", &a);
        client.go();

        client.pause("before-remove");
        cluster_backend("remove", &a);
        client.go();
        let report = client.report();
        assert!(
            report["goaway"].is_null(),
            "GOAWAY on a config change: {report}"
        );
        assert_eq!(
            report["closed"], false,
            "the connection was closed: {report}"
        );
        let all = streams(&report);
        let by_id: HashMap<u64, &Value> =
            all.iter().map(|s| (s["id"].as_u64().unwrap(), s)).collect();
        let step = |name: &str| -> Vec<&Value> {
            report["steps"][name]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| by_id[&id.as_u64().unwrap()])
                .collect()
        };
        let origin_of = |s: &Value| -> String {
            let t = s["body_text"].as_str().unwrap_or("");
            t.strip_prefix("origin ")
                .and_then(|r| r.split(':').next())
                .unwrap_or("?")
                .to_owned()
        };
        for s in step("inflight") {
            assert_stream_ok(s, "slept 1500ms\n", "in flight across `backend add`");
        }
        let added = step("added");
        for s in &added {
            assert_eq!(s["status"].as_u64(), Some(200), "after `backend add`: {s}");
            assert_eq!(s["ended"], true, "{s}");
        }
        let added_at = report["resumed"]["opened"].as_f64().unwrap();
        for s in step("inflight") {
            assert!(
                s["done_at"].as_f64().unwrap() > added_at,
                "a stream ended before `backend add` was applied: {s}"
            );
        }
        let from_b = added.iter().filter(|s| origin_of(s) == "B").count();
        assert!(
            from_b > 0,
            "the connection did not follow `backend add`: no stream went to B: {added:?}"
        );
        for s in step("draining") {
            assert_stream_ok(s, "slept 1500ms\n", "in flight across `backend drain`");
        }
        // The ones at A were still in flight when the drain had been applied.
        let drained_at = report["resumed"]["opened2"].as_f64().unwrap();
        let slow_at_a: Vec<f64> = step("draining")
            .iter()
            .filter(|s| {
                let n = s["path"].as_str().unwrap();
                a.requests().iter().any(|r| r.target == n)
            })
            .map(|s| s["done_at"].as_f64().unwrap())
            .collect();
        assert_eq!(slow_at_a.len(), at_a);
        assert!(
            slow_at_a.iter().all(|t| *t > drained_at),
            "a stream at A ended ({slow_at_a:?}) before the drain was applied ({drained_at}): \
             the test did not drain with streams in flight (too slow a machine?)"
        );
        for name in ["drained", "removed"] {
            for s in step(name) {
                assert_eq!(s["status"].as_u64(), Some(200), "{name}: {s}");
                assert_eq!(
                    origin_of(s),
                    "B",
                    "{name}: a stream went to the drained A: {s}"
                );
            }
        }
        eprintln!(
            "config changes on one h2 connection: {} streams, all 200; {from_b}/10 to B after \
             the add; {at_a}/6 slow streams in flight at A during its drain",
            all.len()
        );
        assert_eq!(status(&sock).workers, workers, "the workers were replaced");
        drop(client);
        drop(lbd);
        a.stop();
        b.stop();
    });
}
