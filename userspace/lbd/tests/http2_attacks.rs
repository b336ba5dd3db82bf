//! HTTP/2 attacks against a real, sandboxed `lbd`, each scripted by `tests/h2/attacks.py`
//! (run with `/usr/bin/python3`: its hpack module comes with Debian's python3-h2) as raw
//! frames over h2c prior knowledge, as fast as the socket takes them. What kakehi must do is
//! in `h2/conn.rs` (`pub mod limits`, per-connection token buckets) and `h2/block.rs` (the
//! CONTINUATION caps):
//!
//! - Rapid Reset (CVE-2023-44487): 1000 x (HEADERS, RST_STREAM CANCEL) → GOAWAY
//!   ENHANCE_YOUR_CALM; the streams that reached the origin are counted, and none above the
//!   GOAWAY's last stream id;
//! - floods of RFC 9113 §10.5: 1000 PINGs, 1000 SETTINGS, 5000 PRIORITY, 5000 empty DATA on an
//!   open POST → GOAWAY ENHANCE_YOUR_CALM;
//! - CONTINUATION flood (CVE-2024-27316): 100 CONTINUATIONs of 16 octets, and a 40 KiB header
//!   block over a few → GOAWAY ENHANCE_YOUR_CALM, nothing at the origin;
//! - MadeYouReset (CVE-2025-8671): 500 x (HEADERS POST, then a WINDOW_UPDATE of 0 on it / DATA
//!   past its content-length), each making kakehi reset the stream → GOAWAY ENHANCE_YOUR_CALM
//!   long before the 500th;
//! - HPACK bomb: a 4000-octet field put in the dynamic table and referenced 20 times, then
//!   8000 times (32 MB decoded) in each of 50 blocks → each stream refused (RST_STREAM or
//!   431), the connection serving a normal request after them, no GOAWAY;
//! - 200 connections x 100 streams to a slow origin path with a pool of 2000 buffers → the
//!   streams past the pool get REFUSED_STREAM, the others 200, then a normal request works.
//!
//! After every attack: the attacking connection got the GOAWAY and is closed; a well-behaved
//! client (curl --http2-prior-knowledge), run in a loop all through the attack and once after
//! it, got every answer right; the worker is the same process (no crash, no "panic" in lbd's
//! log); and the worker's peak RSS (VmHWM) stayed under its RSS before the attack plus
//! [`RSS_MARGIN_KIB`] (64 MiB; measured: a flood costs the worker well under 1 MiB, the 200 x
//! 100 streams about 38 MiB, of which the pool's 2000 x 16 KiB buffers are 31 MiB).
//!
//! Every process is stopped by handle or pid, every client has a deadline. Run with
//! `cargo test -p lbd --test http2_attacks -- --nocapture` to see the figures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{curl, one_cluster, process_memory, run_bounded, Lbd, Memory};
use lb_testkit::Origin;
use serde_json::Value;

/// The longest any one external client (curl, python) may run.
const DEADLINE: Duration = Duration::from_secs(60);
/// `max_connections` of the lbd under attack: its pool holds twice as many buffers (2000 x
/// 16 KiB = 31.25 MiB), so that 200 x 100 streams run out of buffers.
const MAX_CONNECTIONS: usize = 1000;
/// What an attack may add to the worker's peak RSS (VmHWM) over its RSS before the attack:
/// the whole pool (31.25 MiB) and as much again for everything else. Measured: a flood adds
/// less than 1 MiB, 200 connections x 100 streams about 38 MiB.
const RSS_MARGIN_KIB: u64 = 64 * 1024;
/// GOAWAY and RST_STREAM error codes (RFC 9113 §7).
const PROTOCOL_ERROR: u64 = 0x1;
const REFUSED_STREAM: u64 = 0x7;
const ENHANCE_YOUR_CALM: u64 = 0xb;

// ---- lbd ------------------------------------------------------------------------------------

/// lbd with one http listener (h2c prior knowledge and HTTP/1.1) in front of `origin`, with
/// [`MAX_CONNECTIONS`].
fn h2c_lbd(origin: &Origin) -> Lbd {
    let backend = origin.addr();
    Lbd::start(move |l| {
        one_cluster(
            &format!("max_connections = {MAX_CONNECTIONS}"),
            l,
            &[backend],
        )
    })
}

/// lbd as [`h2c_lbd`], its listener with `h2 = { H2 }`.
fn h2c_lbd_with(origin: &Origin, h2: &str) -> Lbd {
    let backend = origin.addr();
    let h2 = h2.to_owned();
    Lbd::start(move |l| {
        one_cluster(
            &format!("max_connections = {MAX_CONNECTIONS}"),
            l,
            &[backend],
        )
        .replacen(
            "\n\n[clusters.app]",
            &format!("\nh2 = {{ {h2} }}\n\n[clusters.app]"),
            1,
        )
    })
}

/// The pid of lbd's one worker, once it runs (lbd accepts on its listeners, through the
/// kernel's backlog, before its worker is forked): 10 s at most.
fn the_worker(lbd: &Lbd) -> Vec<i32> {
    let mut workers = Vec::new();
    let up = common::wait_until(Duration::from_secs(10), || {
        workers = lbd.workers();
        workers.len() == 1
    });
    assert!(up, "lbd has not one worker after 10 s: {workers:?}");
    workers
}

/// The worker's VmRSS and VmHWM.
fn worker_memory(worker: i32) -> Memory {
    process_memory(worker).unwrap_or_else(|| panic!("worker {worker} is gone"))
}

// ---- curl -----------------------------------------------------------------------------------

/// What curl got: `%{http_version}`, `%{response_code}` and the body.
#[derive(Debug)]
struct Fetched {
    version: String,
    status: u16,
    body: Vec<u8>,
    ok: bool,
    stderr: String,
}

/// `curl --http2-prior-knowledge http://ADDR/PATH`, the body written to a file of `dir`; also
/// when curl fails.
fn h2c_raw(dir: &Path, addr: SocketAddr, path: &str) -> Fetched {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let body = dir.join(format!("body{n}"));
    let url = format!("http://{addr}{path}");
    let out: Output = curl(&[
        "--http2-prior-knowledge",
        "-o",
        body.to_str().unwrap(),
        "-w",
        "%{http_version} %{response_code}",
        &url,
    ]);
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let (version, status) = w.split_once(' ').unwrap_or((&w, "0"));
    let fetched = Fetched {
        version: version.to_owned(),
        status: status.trim().parse().unwrap_or(0),
        body: std::fs::read(&body).unwrap_or_default(),
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let _ = std::fs::remove_file(&body);
    fetched
}

/// A GET answered over HTTP/2 with 200 and the origin's body for `path`.
fn assert_served(got: &Fetched, path: &str, what: &str) {
    assert!(
        got.ok && got.version == "2" && got.status == 200,
        "{what}: curl GET {path}: {got:?}, curl said {:?}",
        got.stderr
    );
    assert_eq!(
        String::from_utf8_lossy(&got.body),
        format!("origin o: GET {path}\n"),
        "{what}"
    );
}

// ---- the attacks ----------------------------------------------------------------------------

fn attacks_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2/attacks.py")
}

/// Fails the test, with the way out, when /usr/bin/python3 has no h2 module: never skipped.
fn require_python_h2() {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", "import h2.connection, hpack"]);
    let ok = cmd
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this end-to-end test needs /usr/bin/python3 with the h2 module (Debian's python3-h2: \
         `cargo xtask setup` or apt-get install -y python3-h2); it is not skipped"
    );
}

/// Runs `attacks.py IP PORT ARGS...` and returns the JSON it printed.
fn attack(addr: SocketAddr, args: &[&str]) -> Value {
    require_python_h2();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(attacks_script())
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(args);
    let out = run_bounded(cmd, DEADLINE, &format!("attacks.py {args:?}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "attacks.py {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("attacks.py {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// A count from a report's `frames` or `rst` map (absent: 0).
fn count(map: &Value, key: &str) -> u64 {
    map[key].as_u64().unwrap_or(0)
}

/// The attacking connection ended with GOAWAY `code` and was closed by the server.
fn assert_goaway(report: &Value, code: u64, what: &str) {
    assert_eq!(
        report["goaway"]["error_code"].as_u64(),
        Some(code),
        "{what}: the attacking connection did not get GOAWAY({code:#x}): {report}"
    );
    assert_eq!(
        report["closed"], true,
        "{what}: the server did not close the attacking connection: {report}"
    );
    // "eof" (FIN) or "ConnectionResetError" (kakehi closed with the rest of the attack unread).
    println!(
        "{what}: GOAWAY {}, then the connection closed ({})",
        report["goaway"], report["close_how"]
    );
}

/// One lbd with its origin and worker under attack.
struct Target {
    origin: Origin,
    lbd: Lbd,
    workers: Vec<i32>,
}

impl Target {
    fn start() -> Target {
        Target::start_with("")
    }

    /// With `h2 = { H2 }` on the listener ("": none).
    fn start_with(h2: &str) -> Target {
        let origin = Origin::start("o");
        let lbd = if h2.is_empty() {
            h2c_lbd(&origin)
        } else {
            h2c_lbd_with(&origin, h2)
        };
        let workers = the_worker(&lbd);
        let target = Target {
            origin,
            lbd,
            workers,
        };
        let got = h2c_raw(target.dir(), target.addr(), "/warm-up");
        assert_served(&got, "/warm-up", "before the attack");
        target
    }

    fn addr(&self) -> SocketAddr {
        self.lbd.addr()
    }

    fn dir(&self) -> &Path {
        self.lbd.dir().path()
    }

    fn worker(&self) -> i32 {
        self.workers[0]
    }

    /// Runs `attacks.py ARGS...` while a well-behaved client GETs `/during-N` in a loop on
    /// connections of its own, then once more after; asserts every one of them was served.
    /// Returns the attack's report and the worker's memory before it.
    fn under_attack(&self, args: &[&str]) -> (Value, Memory) {
        let before = worker_memory(self.worker());
        let stop = Arc::new(AtomicBool::new(false));
        let during = {
            let (stop, dir, addr) = (Arc::clone(&stop), self.dir().to_path_buf(), self.addr());
            thread::spawn(move || {
                let mut got = Vec::new();
                for i in 0.. {
                    let path = format!("/during-{i}");
                    got.push((h2c_raw(&dir, addr, &path), path));
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                got
            })
        };
        let report = attack(self.addr(), args);
        stop.store(true, Ordering::SeqCst);
        let during = during.join().expect("the well-behaved client's thread");
        for (got, path) in &during {
            assert_served(got, path, &format!("during {args:?}"));
        }
        println!(
            "{args:?}: {} well-behaved requests served during the attack",
            during.len()
        );
        (report, before)
    }

    /// lbd survived: the same worker, no panic in its log, its peak RSS within
    /// [`RSS_MARGIN_KIB`] of `before`, and a new client served.
    fn assert_survived(&self, before: Memory, what: &str) {
        let got = h2c_raw(self.dir(), self.addr(), "/after");
        assert_served(&got, "/after", &format!("after {what}"));
        assert_eq!(
            self.lbd.workers(),
            self.workers,
            "{what}: the worker was replaced"
        );
        let log = self.lbd.stderr();
        assert!(
            !log.to_ascii_lowercase().contains("panic"),
            "{what}: lbd's log shows a panic:\n{log}"
        );
        let now = worker_memory(self.worker());
        println!(
            "{what}: worker RSS {} KiB before, {} KiB after, peak (VmHWM) {} KiB: +{} KiB \
             (bound +{RSS_MARGIN_KIB} KiB)",
            before.rss_kib,
            now.rss_kib,
            now.hwm_kib,
            now.hwm_kib.saturating_sub(before.rss_kib)
        );
        assert!(
            now.hwm_kib <= before.rss_kib + RSS_MARGIN_KIB,
            "{what}: the worker's peak RSS {} KiB is more than {} KiB over its {} KiB before",
            now.hwm_kib,
            RSS_MARGIN_KIB,
            before.rss_kib
        );
    }

    /// The targets the origin saw that start with `prefix`, once they stopped coming (at
    /// most 2 s after the attack).
    fn origin_saw(&self, prefix: &str) -> Vec<String> {
        let seen = || -> Vec<String> {
            self.origin
                .requests()
                .into_iter()
                .map(|r| r.target)
                .filter(|t| t.starts_with(prefix))
                .collect()
        };
        let mut last = seen().len();
        for _ in 0..10 {
            thread::sleep(Duration::from_millis(200));
            let n = seen().len();
            if n == last {
                break;
            }
            last = n;
        }
        seen()
    }
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn rapid_reset_gets_goaway_and_few_streams_reach_the_origin() {
    let t = Target::start();
    let n = 1000;
    let (report, before) = t.under_attack(&["rapid_reset", &n.to_string(), "localhost", "/rr"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "Rapid Reset");
    // Streams above the GOAWAY's last stream id were never served (§6.8).
    let last = report["goaway"]["last_stream_id"].as_u64().unwrap();
    let accepted = last.div_ceil(2);
    let reached = t.origin_saw("/rr");
    println!(
        "Rapid Reset: {n} streams sent, GOAWAY(0xb) with last stream id {last} ({accepted} \
         streams taken), {} reached the origin; frames received {}",
        reached.len(),
        report["frames"]
    );
    assert!(
        last < 2 * n - 1,
        "the GOAWAY came after all {n} streams: {report}"
    );
    // CLIENT_RESETS allows a burst of 100 then 10 a second: a little slack for the refill.
    assert!(
        accepted <= 200,
        "{accepted} reset streams taken before the GOAWAY: {report}"
    );
    assert!(
        reached.len() as u64 <= accepted,
        "{} streams reached the origin, more than the {accepted} below the GOAWAY's last \
         stream id: {reached:?}",
        reached.len()
    );
    t.assert_survived(before, "Rapid Reset");
}

#[test]
fn ping_flood_gets_goaway() {
    let t = Target::start();
    let (report, before) = t.under_attack(&["ping", "1000"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "PING flood");
    let acks = count(&report["frames"], "PING");
    println!("PING flood: 1000 sent, {acks} PING ACKs before GOAWAY(0xb)");
    // PINGS: a burst of 50, then 10 a second.
    assert!(acks <= 100, "{acks} PINGs answered: {report}");
    t.assert_survived(before, "PING flood");
}

#[test]
fn a_listener_sets_its_own_ping_budget() {
    // 5 at once and 1 a second instead of 50 and 10.
    let t = Target::start_with("pings = { burst = 5, per_second = 1 }");
    let (report, before) = t.under_attack(&["ping", "40"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "40 PINGs");
    let acks = count(&report["frames"], "PING");
    println!("40 PINGs against a budget of 5: {acks} PING ACKs before GOAWAY(0xb)");
    assert!((5..=7).contains(&acks), "{acks} PINGs answered: {report}");
    t.assert_survived(before, "40 PINGs");
}

#[test]
fn settings_flood_gets_goaway() {
    let t = Target::start();
    let (report, before) = t.under_attack(&["settings", "1000"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "SETTINGS flood");
    // kakehi's own SETTINGS, then one ACK for each SETTINGS taken (the preface's among them).
    let acks = count(&report["frames"], "SETTINGS").saturating_sub(1);
    println!("SETTINGS flood: 1000 sent, {acks} SETTINGS ACKs before GOAWAY(0xb)");
    assert!(acks <= 100, "{acks} SETTINGS acknowledged: {report}");
    t.assert_survived(before, "SETTINGS flood");
}

#[test]
fn priority_flood_gets_goaway() {
    let t = Target::start();
    let (report, before) = t.under_attack(&["priority", "5000"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "PRIORITY flood");
    println!(
        "PRIORITY flood: 5000 planned ({} of {} bytes written before the close), frames \
         received {}",
        report["sent_bytes"], report["planned_bytes"], report["frames"]
    );
    t.assert_survived(before, "PRIORITY flood");
}

#[test]
fn empty_data_flood_gets_goaway() {
    let t = Target::start();
    let (report, before) = t.under_attack(&["empty_data", "5000", "localhost"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "empty DATA flood");
    println!(
        "empty DATA flood: 5000 planned, GOAWAY {}, frames received {}",
        report["goaway"], report["frames"]
    );
    t.assert_survived(before, "empty DATA flood");
}

#[test]
fn continuation_floods_get_goaway() {
    let t = Target::start();
    // Many small CONTINUATION frames: past the 8 a block may have.
    let (report, before) = t.under_attack(&["continuation", "100", "localhost"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "100 CONTINUATIONs");
    assert_eq!(
        report["goaway"]["last_stream_id"], 0,
        "the stream of the unfinished block was not taken: {report}"
    );
    println!(
        "CONTINUATION flood: {} CONTINUATIONs, GOAWAY {}",
        report["continuations"], report["goaway"]
    );
    t.assert_survived(before, "the CONTINUATION flood");

    // A block growing past 32 KiB over a few CONTINUATIONs.
    let (report, before) = t.under_attack(&["continuation_big", "40", "localhost"]);
    assert_goaway(&report, ENHANCE_YOUR_CALM, "a 40 KiB header block");
    assert_eq!(report["goaway"]["last_stream_id"], 0, "{report}");
    println!(
        "a {}-octet header block over {} CONTINUATIONs: GOAWAY {}",
        report["block_bytes"], report["continuations"], report["goaway"]
    );
    t.assert_survived(before, "the 40 KiB header block");
    assert!(
        t.origin_saw("/continued").is_empty() && t.origin_saw("/big-block").is_empty(),
        "an unfinished header block reached the origin: {:?}",
        t.origin.requests()
    );
}

#[test]
fn made_you_reset_gets_goaway() {
    let t = Target::start();
    for mode in ["wu0", "cl"] {
        let n = 500;
        let (report, before) =
            t.under_attack(&["made_you_reset", &n.to_string(), mode, "localhost"]);
        let what = format!("MadeYouReset ({mode})");
        assert_goaway(&report, ENHANCE_YOUR_CALM, &what);
        let last = report["goaway"]["last_stream_id"].as_u64().unwrap();
        let resets = count(&report["rst"], &PROTOCOL_ERROR.to_string());
        println!(
            "{what}: {n} streams sent, {resets} RST_STREAM(PROTOCOL_ERROR) from kakehi, then \
             GOAWAY(0xb) with last stream id {last}; frames received {}",
            report["frames"]
        );
        assert!(
            last < 2 * n - 1,
            "{what}: the GOAWAY came after all {n} streams: {report}"
        );
        // OWN_RESETS allows a burst of 100 then 10 a second.
        assert!(
            (1..=200).contains(&resets),
            "{what}: {resets} streams reset: {report}"
        );
        assert_eq!(
            report["frames"]["RST_STREAM"].as_u64().unwrap_or(0),
            resets,
            "{what}: a reset with another code: {report}"
        );
        t.assert_survived(before, &what);
    }
}

/// Every bomb stream of an `hpack_bomb` report was refused (RST_STREAM, or a 431), and the
/// GET after them was served on the same connection, which kakehi kept.
fn assert_bombs_refused(report: &Value, times: u64, what: &str) {
    let streams = report["streams"].as_object().expect("a streams object");
    for i in 0..times {
        let s = &streams[&(1 + 2 * i).to_string()];
        assert!(
            !s["reset"].is_null() || s["status"] == 431,
            "{what}: bomb stream {} was not refused: {s}",
            1 + 2 * i
        );
    }
    let after = &streams[&report["after_stream"].as_u64().unwrap().to_string()];
    assert_eq!(
        after["status"], 200,
        "{what}: the GET after the bombs: {report}"
    );
    assert_eq!(after["ended"], true, "{what}: {after}");
    assert_eq!(
        after["body"], "origin o: GET /after-bomb\n",
        "{what}: {after}"
    );
    assert!(
        report["goaway"].is_null() && report["closed"] == false,
        "{what}: kakehi ended the connection: {report}"
    );
}

#[test]
fn hpack_bomb_is_refused_and_the_connection_goes_on() {
    let t = Target::start();
    // One field of 4000 octets in the dynamic table, referenced 20 times: 84 KB of header
    // list (counted with 32 octets a field) against SETTINGS_MAX_HEADER_LIST_SIZE 16384.
    let (report, before) = t.under_attack(&["hpack_bomb", "1", "20", "localhost"]);
    assert_bombs_refused(&report, 1, "an HPACK bomb of 20 references");
    println!(
        "HPACK bomb (20 refs): {}-octet block, stream answered {}, rst codes {}",
        report["block_bytes"], report["streams"]["1"], report["rst"]
    );
    t.assert_survived(before, "an HPACK bomb of 20 references");

    // 50 blocks of 8000 references each: 32 MB each if expanded, 1.6 GB in all.
    let (report, before) = t.under_attack(&["hpack_bomb", "50", "8000", "localhost"]);
    assert_bombs_refused(&report, 50, "50 HPACK bombs of 8000 references");
    println!(
        "HPACK bomb (50 x 8000 refs): {}-octet blocks, rst codes {}, frames {}",
        report["block_bytes"], report["rst"], report["frames"]
    );
    t.assert_survived(before, "50 HPACK bombs of 8000 references");
    assert!(
        t.origin_saw("/bomb").is_empty(),
        "a bomb reached the origin: {:?}",
        t.origin_saw("/bomb")
    );
}

#[test]
fn many_connections_and_streams_are_bounded_by_the_pool() {
    let t = Target::start();
    let before = worker_memory(t.worker());
    let (conns, per_conn) = (200u64, 100u64);
    let report = attack(
        t.addr(),
        &[
            "many_conns",
            &conns.to_string(),
            &per_conn.to_string(),
            "localhost",
            "/sleep/3000",
        ],
    );
    let (ok, refused) = (
        report["ok"].as_u64().unwrap(),
        report["refused"].as_u64().unwrap(),
    );
    println!(
        "{conns} connections x {per_conn} streams to /sleep/3000: {report}; pool {} buffers",
        2 * MAX_CONNECTIONS
    );
    assert_eq!(report["connected"], conns, "{report}");
    assert_eq!(report["unfinished"], 0, "streams left unanswered: {report}");
    assert_eq!(report["closed_early"], 0, "connections closed: {report}");
    assert!(
        report["goaways"].as_object().unwrap().is_empty(),
        "GOAWAY on connections that respected MAX_CONCURRENT_STREAMS: {report}"
    );
    // A stream takes two buffers of the pool; the ones that found none are refused.
    assert!(ok >= 1, "no stream was served: {report}");
    assert!(
        ok <= MAX_CONNECTIONS as u64,
        "{ok} streams served at once with {} buffers: {report}",
        2 * MAX_CONNECTIONS
    );
    assert_eq!(
        (
            ok + refused,
            report["rst"][REFUSED_STREAM.to_string()].as_u64()
        ),
        (conns * per_conn, Some(refused)),
        "every stream either served or REFUSED_STREAM: {report}"
    );
    t.assert_survived(before, "200 connections x 100 streams");
    let served = t.origin_saw("/sleep/3000");
    assert_eq!(
        served.len() as u64,
        ok,
        "the origin saw {} requests",
        served.len()
    );
}
