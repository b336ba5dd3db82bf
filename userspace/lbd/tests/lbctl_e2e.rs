//! `lbctl` against a real `lbd`: every runtime change through the command socket, end to end.
//!
//! - Under wrk load (2 workers) for the whole sequence: a backend added gets traffic; a backend
//!   drained while requests are in flight through it lets them finish with 200 and gets nothing
//!   new; a drained backend is removed; a cluster and a frontend with a hostname are added,
//!   route their Host, lose a backend with requests in flight, and are removed; wrk reports no
//!   socket error and no non-2xx answer.
//! - Refused changes (lbctl's and raw frames: garbage, a future protocol version, an over-size
//!   frame...) get one clear line, and `state dump` is byte-identical before and after.
//! - `state save`, then a new lbd started from the saved file, dumps the same state.
//! - `reload` reports exactly the edits made to the config file, then "no change".
//! - A peer whose uid is not allowed is refused and changes nothing.
//! - A worker killed with SIGKILL comes back with the current state, not the file's.
//!
//! lbctl is another package's binary: it is found next to lbd's (`target/debug/lbctl`), built
//! with `cargo build -p lbctl` when missing or older than its sources. The tests of this file
//! run one at a time (they measure traffic and timing on a small machine). Every process a test
//! starts is stopped by pid; every wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::Wrk;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    get, holds_for, lbctl_bin, proc_status, run_bounded, wait_until, Lbd, Response, TempDir,
};
use lb_config::protocol::{
    encode, Decoder, Payload, Request, Response as Answer, Verb, MAX_FRAME, VERSION,
};
use lb_testkit::Origin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long one lbctl run may take before it is killed (its own answer timeout is shorter).
const LBCTL_DEADLINE: Duration = Duration::from_secs(30);
/// The uid of `nobody`, a peer lbd must refuse.
const NOBODY: u32 = 65534;
/// A request that stays in flight at the origin for one second.
const SLEEP: &str = "/sleep/1000";
/// How long workers may take to be (re)started and sandboxed.
const WORKERS_UP: Duration = Duration::from_secs(10);

/// One test at a time: they share two CPUs with wrk, lbd's workers and the origins.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---- running lbctl --------------------------------------------------------------------------

/// What one lbctl run did.
#[derive(Debug)]
struct Ctl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `lbctl --socket SOCKET --timeout 20 ARGS...`, as `uid` (and its own gid, no groups) when
/// given.
fn lbctl_as(socket: &Path, args: &[&str], uid: Option<u32>) -> Ctl {
    let mut cmd = Command::new(lbctl_bin());
    cmd.arg("--socket")
        .arg(socket)
        .args(["--timeout", "20"])
        .args(args);
    if let Some(uid) = uid {
        // As root, std drops the supplementary groups before switching uid.
        cmd.uid(uid).gid(uid);
    }
    let out = run_bounded(cmd, LBCTL_DEADLINE, &format!("lbctl {args:?}"));
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn lbctl(socket: &Path, args: &[&str]) -> Ctl {
    lbctl_as(socket, args, None)
}

/// Runs an lbctl command that must succeed; returns its stdout.
fn ok(socket: &Path, args: &[&str]) -> String {
    let ctl = lbctl(socket, args);
    assert!(
        ctl.code == Some(0) && ctl.stderr.is_empty(),
        "lbctl {args:?} should succeed, got exit {:?}\nstdout: {}\nstderr: {}",
        ctl.code,
        ctl.stdout,
        ctl.stderr
    );
    ctl.stdout
}

/// Asserts that lbd refused: exit 1, nothing on stdout, one line on stderr naming the verb
/// and containing `needle`. Returns that line.
fn assert_refused(ctl: &Ctl, args: &[&str], needle: &str) -> String {
    assert_eq!(
        ctl.code,
        Some(1),
        "lbctl {args:?} should be refused (exit 1)\nstdout: {}\nstderr: {}",
        ctl.stdout,
        ctl.stderr
    );
    assert!(
        ctl.stdout.is_empty(),
        "a refusal prints nothing on stdout; lbctl {args:?} printed {:?}",
        ctl.stdout
    );
    let line = ctl.stderr.strip_suffix('\n').unwrap_or_else(|| {
        panic!(
            "stderr should be one line ending with a newline: {:?}",
            ctl.stderr
        )
    });
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "a refusal is one line on stderr; lbctl {args:?} wrote {:?}",
        ctl.stderr
    );
    assert!(
        line.starts_with("lbctl: "),
        "the refusal line should start with \"lbctl: \": {line:?}"
    );
    assert!(
        line.contains(needle),
        "lbctl {args:?}: the refusal should say {needle:?}, it says {line:?}"
    );
    line.to_owned()
}

fn refused(socket: &Path, args: &[&str], needle: &str) -> String {
    assert_refused(&lbctl(socket, args), args, needle)
}

/// `lbctl state dump`.
fn dump(socket: &Path) -> String {
    ok(socket, &["state", "dump"])
}

/// What lbctl prints for an accepted change applied by both workers.
fn applied(changes: &[String]) -> String {
    let mut out = String::new();
    for c in changes {
        out.push_str(c);
        out.push('\n');
    }
    out.push_str("applied by all 2 workers\n");
    out
}

/// The command socket of a harness-started lbd.
fn socket_of(lbd: &Lbd) -> PathBuf {
    lbd.dir().path().join("lbd.sock")
}

/// `lbctl --json status`, parsed.
fn status(socket: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(socket, &["--json", "status"])).unwrap()
}

// ---- origins and requests -------------------------------------------------------------------

/// The requests for `target` the origin has received.
fn count(origin: &Origin, target: &str) -> usize {
    origin
        .requests()
        .iter()
        .filter(|r| r.target == target)
        .count()
}

/// Whether the origin receives bytes within `within`.
fn grows(origin: &Origin, within: Duration) -> bool {
    let base = origin.raw_bytes_received();
    wait_until(within, || origin.raw_bytes_received() > base)
}

/// Whether the origin receives nothing for the whole `window`.
fn quiet(origin: &Origin, window: Duration) -> bool {
    let base = origin.raw_bytes_received();
    holds_for(window, || origin.raw_bytes_received() == base)
}

/// The origin that gave a 200 answer (its `X-Origin` header, which every route sets).
fn origin_of(r: &Response) -> String {
    assert_eq!(r.status, 200, "expected 200, got {r:?}");
    r.header("x-origin")
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("not an origin's answer (no X-Origin): {r:?}"))
}

/// `GET path` with `Host: host` on a new connection; the origin that answered.
fn served_by(addr: SocketAddr, host: &str, path: &str) -> String {
    origin_of(&get(addr, host, path))
}

/// `n` threads, each sending `GET path` on its own connection; each returns the response and
/// when it arrived.
fn in_flight(
    addr: SocketAddr,
    host: &str,
    path: &str,
    n: usize,
) -> Vec<JoinHandle<(Response, Instant)>> {
    (0..n)
        .map(|_| {
            let (host, path) = (host.to_owned(), path.to_owned());
            thread::spawn(move || {
                let r = get(addr, &host, &path);
                (r, Instant::now())
            })
        })
        .collect()
}

fn join_all(handles: Vec<JoinHandle<(Response, Instant)>>) -> Vec<(Response, Instant)> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| panic!("a request in flight failed (see the panic above)"))
        })
        .collect()
}

// ---- wrk ------------------------------------------------------------------------------------

// ---- raw frames on the command socket -------------------------------------------------------

fn raw_connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to the command socket {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A frame with any version byte and body.
fn frame(version: u8, body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len() + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    out.push(version);
    out.extend_from_slice(body);
    out
}

/// Reads one answer; None when lbd closed the connection first.
fn read_answer(stream: &mut UnixStream) -> Option<Answer> {
    let mut decoder = Decoder::<Answer>::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("reading lbd's answer: {e}"),
        };
        if n == 0 {
            return None;
        }
        if let Some(answer) = decoder
            .feed(&buf[..n])
            .unwrap_or_else(|e| panic!("lbd's answer does not decode: {e}"))
        {
            return Some(answer);
        }
    }
}

/// Reads one answer, which must be a refusal; returns its id and line.
fn read_refusal(stream: &mut UnixStream, what: &str) -> (u64, String) {
    let answer = read_answer(stream)
        .unwrap_or_else(|| panic!("{what}: lbd closed the connection without an answer"));
    match answer.result {
        Err(e) => {
            assert!(
                !e.contains('\n'),
                "{what}: the refusal is not one line: {e:?}"
            );
            (answer.id, e)
        }
        Ok(p) => panic!("{what}: expected a refusal, got {p:?}"),
    }
}

/// Asserts that lbd closes the connection (after what it already sent), within the read
/// timeout.
fn assert_closes(stream: &mut UnixStream, what: &str) {
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{what}: expected the connection to close, got {n} more bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: the connection is still open: {e}"),
    }
}

// ---- the tests ------------------------------------------------------------------------------

/// The whole runtime story under wrk: add, drain and remove backends, add and remove a
/// cluster and its frontend, without one failed request.
#[test]
fn changes_under_wrk_load_fail_no_request() {
    let _serial = serial();
    let _ = lbctl_bin();
    let a = Origin::start("A");
    let b = Origin::start("B");
    let c = Origin::start("C");
    let d = Origin::start("D");
    let lbd = Lbd::start(|l| common::one_cluster("workers = 2", l, &[a.addr()]));
    let sock = socket_of(&lbd);
    let l = lbd.addr();
    let host = l.to_string();

    let mut wrk = Wrk::start(&format!("http://{l}/"), 10, 12, "5s", lbd.dir().path());
    let wrk_started = Instant::now();
    assert!(
        grows(&a, Duration::from_secs(5)),
        "wrk's requests do not reach origin A"
    );

    // A backend added gets traffic.
    let out = ok(
        &sock,
        &[
            "backend",
            "add",
            "--cluster",
            "app",
            "--address",
            &b.addr().to_string(),
        ],
    );
    assert_eq!(
        out,
        applied(&[format!("+ backend {} (cluster app)", b.addr())])
    );
    assert!(
        grows(&b, Duration::from_secs(3)),
        "origin B gets no request after `backend add`"
    );

    // Drain A while requests are in flight through it.
    let mut sleepers = Vec::new();
    let end = Instant::now() + Duration::from_secs(8);
    loop {
        sleepers.extend(in_flight(l, &host, SLEEP, 6));
        if wait_until(Duration::from_millis(600), || count(&a, SLEEP) > 0) {
            break;
        }
        assert!(
            Instant::now() < end,
            "none of {} requests for {SLEEP} reached origin A",
            sleepers.len()
        );
    }
    let out = ok(
        &sock,
        &[
            "backend",
            "drain",
            "--cluster",
            "app",
            "--address",
            &a.addr().to_string(),
        ],
    );
    let drained = Instant::now();
    assert_eq!(
        out,
        applied(&[format!(
            "~ backend {} (cluster app): draining: (unset) -> true",
            a.addr()
        )])
    );
    let sent = sleepers.len();
    let answers = join_all(sleepers);
    let from_a: Vec<Instant> = answers
        .iter()
        .filter(|(r, _)| origin_of(r) == "A")
        .map(|(_, at)| *at)
        .collect();
    assert!(!from_a.is_empty(), "no request in flight was served by A");
    assert_eq!(
        from_a.len(),
        count(&a, SLEEP),
        "every {SLEEP} origin A received was answered through kakehi"
    );
    assert!(
        from_a.iter().all(|at| *at > drained),
        "a request in flight at A finished before the drain was answered: the test did not \
         drain with requests in flight (too slow a machine?)"
    );
    println!(
        "{} of {sent} requests for {SLEEP} were in flight at A during the drain; all answered 200",
        from_a.len()
    );
    // Everything picked before the drain has arrived by now: A gets nothing new.
    assert!(
        quiet(&a, Duration::from_secs(1)),
        "origin A still gets requests after the drain"
    );
    assert!(
        grows(&b, Duration::from_secs(2)),
        "origin B gets no traffic after the drain of A"
    );

    // Remove the drained backend.
    let out = ok(
        &sock,
        &[
            "backend",
            "remove",
            "--cluster",
            "app",
            "--address",
            &a.addr().to_string(),
        ],
    );
    assert_eq!(
        out,
        applied(&[format!("- backend {} (cluster app)", a.addr())])
    );
    assert!(
        quiet(&a, Duration::from_millis(500)),
        "origin A gets requests after its removal"
    );
    assert!(grows(&b, Duration::from_secs(2)));

    // A new cluster, reached through a frontend with a hostname.
    let out = ok(
        &sock,
        &["cluster", "add", "web", "--backend", &c.addr().to_string()],
    );
    assert_eq!(out, applied(&["+ cluster web".to_owned()]));
    let fe = [
        "--cluster",
        "web",
        "--address",
        &host,
        "--hostname",
        "web.example",
    ];
    let out = ok(&sock, &[&["frontend", "add"][..], &fe[..]].concat());
    assert_eq!(
        out,
        applied(&[format!("+ frontend {l} hostname=web.example (cluster web)")])
    );
    for _ in 0..10 {
        assert_eq!(served_by(l, "web.example", "/"), "C");
    }
    assert_eq!(served_by(l, "other.example", "/"), "B");

    // Remove the cluster's backend while requests are in flight through it.
    let sleepers = in_flight(l, "web.example", SLEEP, 4);
    assert!(
        wait_until(Duration::from_secs(3), || count(&c, SLEEP) == 4),
        "the requests for {SLEEP} did not all reach origin C ({} did)",
        count(&c, SLEEP)
    );
    let out = ok(
        &sock,
        &[
            "backend",
            "add",
            "--cluster",
            "web",
            "--address",
            &d.addr().to_string(),
        ],
    );
    assert_eq!(
        out,
        applied(&[format!("+ backend {} (cluster web)", d.addr())])
    );
    let out = ok(
        &sock,
        &[
            "backend",
            "remove",
            "--cluster",
            "web",
            "--address",
            &c.addr().to_string(),
        ],
    );
    let removed = Instant::now();
    assert_eq!(
        out,
        applied(&[format!("- backend {} (cluster web)", c.addr())])
    );
    for (r, at) in join_all(sleepers) {
        assert_eq!(origin_of(&r), "C");
        assert!(
            at > removed,
            "a request in flight at C finished before the removal was answered"
        );
    }
    for _ in 0..6 {
        assert_eq!(served_by(l, "web.example", "/"), "D");
    }
    assert!(
        quiet(&c, Duration::from_millis(300)),
        "origin C gets requests after its removal"
    );

    // Remove the frontend (its Host falls back to the catch-all cluster), then the cluster.
    let out = ok(&sock, &[&["frontend", "remove"][..], &fe[..]].concat());
    assert_eq!(
        out,
        applied(&[format!("- frontend {l} hostname=web.example (cluster web)")])
    );
    assert_eq!(served_by(l, "web.example", "/"), "B");
    let out = ok(&sock, &["cluster", "remove", "web"]);
    assert_eq!(out, applied(&["- cluster web".to_owned()]));
    let last = dump(&sock);
    assert!(!last.contains("clusters.web"), "{last}");
    assert!(!last.contains(&a.addr().to_string()), "{last}");
    assert!(last.contains(&b.addr().to_string()), "{last}");

    // No worker died on the way.
    let st = status(&sock);
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "running", "{st}");
        assert_eq!(w["restarts"], 0, "{st}");
    }

    assert!(
        wrk.running(),
        "wrk ended before the last change ({:?} after its start): the changes were not all made \
         under load",
        wrk_started.elapsed()
    );
    println!(
        "all changes made {:?} after wrk started",
        wrk_started.elapsed()
    );
    let (summary, out) = wrk.finish(Duration::from_secs(30));
    println!("{out}");
    println!("wrk: {summary:?}");
    summary.assert_clean(0, "changes under load", &out);
}

/// Every kind of refusal answers one clear line and leaves the state byte-identical.
#[test]
fn refused_changes_leave_the_state_byte_identical() {
    let _serial = serial();
    let _ = lbctl_bin();
    let a = Origin::start("A");
    let b = Origin::start("B");
    let lbd = Lbd::start(|l| common::one_cluster("workers = 2", l, &[a.addr()]));
    let sock = socket_of(&lbd);
    let l = lbd.addr().to_string();
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let before = dump(&sock);
    let files = TempDir::new("refusals");
    let bad_syntax = files.write("bad.toml", "workers = 1\nwokers = 2\n");
    let more_workers = files.write(
        "workers.toml",
        lbd.config_text.replace("workers = 2", "workers = 3"),
    );
    let missing = files.path().join("missing.toml");
    let (bad_syntax, more_workers, missing) = (
        bad_syntax.to_string_lossy().into_owned(),
        more_workers.to_string_lossy().into_owned(),
        missing.to_string_lossy().into_owned(),
    );
    // An address another process holds (without SO_REUSEPORT): lbd cannot bind it.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let unbound = common::free_addr().to_string();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["backend", "add", "--cluster", "nope", "--address", &b_addr],
            "there is no cluster named \"nope\"",
        ),
        (
            vec![
                "backend",
                "add",
                "--cluster",
                "app",
                "--address",
                "not-an-address",
            ],
            "is not a socket address",
        ),
        (
            vec![
                "backend",
                "add",
                "--cluster",
                "app",
                "--address",
                "127.0.0.1:99999",
            ],
            "is not a socket address",
        ),
        (
            vec!["backend", "add", "--cluster", "app", "--address", &a_addr],
            "already has the backend",
        ),
        (
            vec![
                "backend",
                "add",
                "--cluster",
                "app",
                "--address",
                &b_addr,
                "--weight",
                "0",
            ],
            "weight",
        ),
        (
            vec![
                "backend",
                "remove",
                "--cluster",
                "app",
                "--address",
                &a_addr,
            ],
            "is the last backend of cluster \"app\"",
        ),
        (
            vec![
                "backend",
                "remove",
                "--cluster",
                "app",
                "--address",
                &b_addr,
            ],
            "has no backend",
        ),
        (
            vec![
                "backend",
                "drain",
                "--cluster",
                "nope",
                "--address",
                &a_addr,
            ],
            "there is no cluster named \"nope\"",
        ),
        (
            vec!["frontend", "add", "--cluster", "app", "--address", &l],
            "already exists in cluster \"app\"",
        ),
        (
            // The same route spelled with its defaults.
            vec![
                "frontend",
                "add",
                "--cluster",
                "app",
                "--address",
                &l,
                "--path",
                "/",
                "--path-type",
                "prefix",
            ],
            "already exists in cluster \"app\"",
        ),
        (
            vec!["frontend", "add", "--cluster", "nope", "--address", &l],
            "there is no cluster named \"nope\"",
        ),
        (
            vec![
                "frontend",
                "add",
                "--cluster",
                "app",
                "--address",
                &unbound,
                "--hostname",
                "x.example",
            ],
            &unbound,
        ),
        (
            vec![
                "frontend",
                "remove",
                "--cluster",
                "app",
                "--address",
                &l,
                "--hostname",
                "x.example",
            ],
            "has no frontend",
        ),
        (
            vec!["cluster", "add", "app", "--backend", &b_addr],
            "cluster \"app\" already exists",
        ),
        (
            vec!["cluster", "add", "bad name!", "--backend", &b_addr],
            "bad name!",
        ),
        (
            vec!["cluster", "remove", "nope"],
            "there is no cluster named \"nope\"",
        ),
        (vec!["listener", "add", "--address", &taken], "cannot bind"),
        (
            vec!["listener", "remove", "--address", &l],
            "still serves frontends",
        ),
        (
            vec![
                "certificate",
                "add",
                "--address",
                &l,
                "--certificate",
                "/nonexistent/c.pem",
                "--key",
                "/nonexistent/k.pem",
            ],
            "cannot read the certificate /nonexistent/c.pem",
        ),
        (vec!["state", "load", &bad_syntax], "wokers"),
        (
            vec!["state", "load", &more_workers],
            "workers cannot change at runtime",
        ),
        (vec!["state", "load", &missing], "cannot read"),
    ];
    for (args, needle) in &cases {
        let line = refused(&sock, args, needle);
        println!("{args:?}\n    {line}");
        assert_eq!(
            dump(&sock),
            before,
            "lbctl {args:?} was refused but changed the state"
        );
    }

    // Raw bytes on the socket.
    // 1. Garbage: its first four bytes read as a length far over the limit.
    let mut s = raw_connect(&sock);
    s.write_all(b"hello garbage\r\n\r\n").unwrap();
    let (id, e) = read_refusal(&mut s, "garbage bytes");
    assert_eq!(id, 0);
    assert!(e.contains("the limit is 1048576 bytes"), "{e}");
    assert_closes(&mut s, "garbage bytes");

    // 2. A well-framed body that is not JSON: refused, and the connection goes on.
    let mut s = raw_connect(&sock);
    s.write_all(&frame(VERSION, b"\xff\xfe\x00garbage{"))
        .unwrap();
    let (id, e) = read_refusal(&mut s, "a frame of garbage");
    assert_eq!(id, 0);
    assert!(e.contains("the message is not JSON"), "{e}");
    // An unknown verb, with its id; an empty frame.
    s.write_all(&frame(VERSION, br#"{"id":12,"verb":"self_destruct"}"#))
        .unwrap();
    let (id, e) = read_refusal(&mut s, "an unknown verb");
    assert_eq!(id, 12);
    assert!(e.contains("self_destruct"), "{e}");
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let (_, e) = read_refusal(&mut s, "an empty frame");
    assert!(e.contains("empty frame"), "{e}");
    s.write_all(
        &encode(&Request {
            id: 7,
            verb: Verb::Status,
        })
        .unwrap(),
    )
    .unwrap();
    let answer = read_answer(&mut s).expect("an answer to status after the refusals");
    assert_eq!(answer.id, 7);
    assert!(
        matches!(answer.result, Ok(Payload::Status(_))),
        "{answer:?}"
    );

    // 3. A change in a frame of a future protocol version: refused, not applied.
    let drain = Request {
        id: 3,
        verb: Verb::Change(lb_config::state::Edit::DrainBackend {
            cluster: "app".into(),
            address: a_addr.clone(),
        }),
    };
    let mut s = raw_connect(&sock);
    s.write_all(&frame(VERSION + 1, &serde_json::to_vec(&drain).unwrap()))
        .unwrap();
    let (_, e) = read_refusal(&mut s, "a future protocol version");
    assert!(e.contains("protocol version 2 is newer"), "{e}");
    s.write_all(
        &encode(&Request {
            id: 4,
            verb: Verb::StateDump,
        })
        .unwrap(),
    )
    .unwrap();
    let answer = read_answer(&mut s).expect("an answer to state dump");
    assert_eq!(answer.id, 4);
    match answer.result {
        Ok(Payload::State(state)) => assert_eq!(state.to_toml(), before),
        other => panic!("expected the state, got {other:?}"),
    }

    // 4. A frame over the limit: refused, then closed.
    let mut s = raw_connect(&sock);
    let mut big = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes().to_vec();
    big.push(VERSION);
    big.extend(std::iter::repeat_n(b'x', 256 * 1024));
    s.write_all(&big).unwrap();
    let (id, e) = read_refusal(&mut s, "an over-size frame");
    assert_eq!(id, 0);
    assert!(
        e.contains("frame of 1048577 bytes refused: the limit is 1048576 bytes"),
        "{e}"
    );
    assert_closes(&mut s, "an over-size frame");

    // 5. A frame cut short by the client: lbd closes without acting on it.
    let mut s = raw_connect(&sock);
    let whole = encode(&drain).unwrap();
    s.write_all(&whole[..whole.len() / 2]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closes(&mut s, "a truncated frame");

    // lbd is still there, and nothing changed.
    ok(&sock, &["status"]);
    assert_eq!(dump(&sock), before, "a raw frame changed the state");
    assert_eq!(
        served_by(lbd.addr(), "x.example", "/"),
        "A",
        "lbd no longer serves after the refusals"
    );
}

/// `state save`, stop, start from the saved file: the same state.
#[test]
fn a_saved_state_restarts_identically() {
    let _serial = serial();
    let _ = lbctl_bin();
    let saved = TempDir::new("saved-state");
    let file = saved.path().join("saved.toml");
    let file_text = file.to_string_lossy().into_owned();
    let a = Origin::start("A");
    let b = Origin::start("B");
    let c = Origin::start("C");
    let mut first = Lbd::start(|l| common::one_cluster("workers = 2", l, &[a.addr()]));
    let sock = socket_of(&first);
    let l = first.addr();
    let host = l.to_string();

    // A state the file never had.
    ok(
        &sock,
        &[
            "backend",
            "add",
            "--cluster",
            "app",
            "--address",
            &b.addr().to_string(),
            "--weight",
            "3",
        ],
    );
    ok(
        &sock,
        &[
            "backend",
            "drain",
            "--cluster",
            "app",
            "--address",
            &a.addr().to_string(),
        ],
    );
    ok(
        &sock,
        &[
            "cluster",
            "add",
            "web",
            "--backend",
            &c.addr().to_string(),
            "--load-balancing",
            "least-connections",
        ],
    );
    ok(
        &sock,
        &[
            "frontend",
            "add",
            "--cluster",
            "web",
            "--address",
            &host,
            "--hostname",
            "web.example",
            "--path",
            "/api",
            "--path-type",
            "prefix",
            "--method",
            "GET",
        ],
    );
    let before = dump(&sock);
    let before_json = ok(&sock, &["--json", "state", "dump"]);

    let out = ok(&sock, &["state", "save", &file_text]);
    assert_eq!(out, format!("state saved to {file_text}\n"));
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        before,
        "the saved file is not the dump"
    );
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "a saved state may hold private keys: only its owner reads it"
    );
    let check = ok(&sock, &["config", "check", &file_text]);
    assert!(check.contains("configuration is valid"), "{check}");

    let out = ok(&sock, &["shutdown"]);
    assert_eq!(out, "stopping: workers finish their requests first\n");
    let exit = first
        .wait_exit(Duration::from_secs(20))
        .expect("lbd did not exit after lbctl shutdown");
    assert!(
        exit.success(),
        "lbd exited with {exit} after lbctl shutdown"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !sock.exists()),
        "the command socket is left after lbd stopped"
    );

    let second = Lbd::start_file(&file, vec![l]);
    let after = dump(&sock);
    assert_eq!(
        after, before,
        "the restarted lbd does not dump the saved state"
    );
    assert_eq!(ok(&sock, &["--json", "state", "dump"]), before_json);

    // And it serves that state.
    for _ in 0..6 {
        assert_eq!(served_by(l, &host, "/"), "B", "A is drained");
    }
    assert_eq!(served_by(l, "web.example", "/api/x"), "C");
    assert_eq!(served_by(l, "web.example", "/other"), "B");
    assert_eq!(
        ok(&sock, &["state", "load", &file_text]),
        "no change: the running state already is that\n"
    );
    drop(second);
    drop(first);
}

/// `reload` applies the edited file and prints exactly what changed.
#[test]
fn reload_reports_exactly_the_edits() {
    let _serial = serial();
    let _ = lbctl_bin();
    let a = Origin::start("A");
    let b = Origin::start("B");
    let a_def = format!("{{ address = \"{}\", weight = 2 }}", a.addr());
    let lbd = Lbd::start(|l| {
        format!(
            "workers = 2\n[[listeners]]\naddress = \"{l}\"\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{l}\" }} ]\nbackends = [ {a_def} ]\n"
        )
    });
    let sock = socket_of(&lbd);
    let l = lbd.addr();
    let host = l.to_string();
    assert_eq!(
        ok(&sock, &["reload"]),
        "no change: the running state already is that\n",
        "a reload of the unchanged file"
    );

    let edited = lbd.config_text.replace(
        &a_def,
        &format!(
            "{{ address = \"{}\", weight = 5 }}, {{ address = \"{}\" }}",
            a.addr(),
            b.addr()
        ),
    );
    assert_ne!(edited, lbd.config_text);
    fs::write(&lbd.config_path, &edited).unwrap();
    let out = ok(&sock, &["reload"]);
    assert_eq!(
        out,
        applied(&[
            format!("~ backend {} (cluster app): weight: 2 -> 5", a.addr()),
            format!("+ backend {} (cluster app)", b.addr()),
        ])
    );
    assert_eq!(
        ok(&sock, &["reload"]),
        "no change: the running state already is that\n",
        "a second reload"
    );
    let state = dump(&sock);
    assert!(state.contains("weight = 5"), "{state}");
    assert!(state.contains(&b.addr().to_string()), "{state}");
    let seen: Vec<String> = (0..24).map(|_| served_by(l, &host, "/")).collect();
    assert!(seen.iter().any(|o| o == "B"), "B gets nothing: {seen:?}");

    // A refused reload changes nothing.
    fs::write(
        &lbd.config_path,
        edited.replace("workers = 2", "workers = 3"),
    )
    .unwrap();
    refused(&sock, &["reload"], "workers cannot change at runtime");
    fs::write(&lbd.config_path, format!("{edited}\nwokers = 1\n")).unwrap();
    refused(&sock, &["reload"], "wokers");
    assert_eq!(dump(&sock), state);

    // Reload applies the difference from the running state: a runtime change is undone.
    fs::write(&lbd.config_path, &edited).unwrap();
    ok(
        &sock,
        &["cluster", "add", "web", "--backend", &b.addr().to_string()],
    );
    assert_eq!(
        ok(&sock, &["reload"]),
        applied(&["- cluster web".to_owned()])
    );
    assert_eq!(dump(&sock), state);
}

/// A setting only a restart can apply is refused by `reload`, like `workers`: lbd binds its
/// command socket once, so a reload that moves it must not report the move as applied.
#[test]
fn reload_refuses_to_move_the_command_socket() {
    let _serial = serial();
    let _ = lbctl_bin();
    let a = Origin::start("A");
    let lbd = Lbd::start(|l| common::one_cluster("workers = 2", l, &[a.addr()]));
    let sock = socket_of(&lbd);
    let before = dump(&sock);
    let moved = lbd.dir().path().join("moved.sock");
    let edited = lbd.config_text.replace(
        sock.to_string_lossy().as_ref(),
        moved.to_string_lossy().as_ref(),
    );
    assert_ne!(edited, lbd.config_text);
    fs::write(&lbd.config_path, &edited).unwrap();
    let ctl = lbctl(&sock, &["reload"]);
    let after = dump(&sock);
    assert!(
        ctl.code == Some(1) && ctl.stderr.contains("command_socket"),
        "a reload moving the command socket should be refused; got exit {:?}, stdout {:?}, \
         stderr {:?}; the socket is still at {} (exists: {}), {} exists: {}",
        ctl.code,
        ctl.stdout,
        ctl.stderr,
        sock.display(),
        sock.exists(),
        moved.display(),
        moved.exists()
    );
    assert_eq!(after, before, "a refused reload changed the state");
}

/// A peer whose uid is neither root nor lbd's is refused, and changes nothing.
#[test]
fn a_peer_whose_uid_is_not_allowed_is_refused() {
    let _serial = serial();
    let _ = lbctl_bin();
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs lbctl as uid {NOBODY}, which needs root: run it as root, as CI does; \
         it is not skipped"
    );
    let a = Origin::start("A");
    let lbd = Lbd::start(|l| common::one_cluster("workers = 2", l, &[a.addr()]));
    let sock = socket_of(&lbd);
    let before = dump(&sock);
    let mode = fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the command socket should be private");
    let drain = [
        "backend",
        "drain",
        "--cluster",
        "app",
        "--address",
        &a.addr().to_string(),
    ];

    // First fence: the mode. lbctl cannot even connect.
    let ctl = lbctl_as(&sock, &drain, Some(NOBODY));
    assert_eq!(ctl.code, Some(3), "{ctl:?}");
    assert!(ctl.stderr.contains("permission denied"), "{ctl:?}");

    // Second fence: the peer's uid, even on a socket anyone may open.
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let ctl = lbctl_as(&sock, &drain, Some(NOBODY));
    let line = assert_refused(&ctl, &drain, &format!("uid {NOBODY}"));
    assert!(line.contains("may not use this command socket"), "{line}");
    println!("{line}");
    let ctl = lbctl_as(&sock, &["state", "dump"], Some(NOBODY));
    assert_refused(&ctl, &["state", "dump"], "may not use this command socket");
    assert_eq!(dump(&sock), before, "a refused peer changed the state");
    assert_eq!(served_by(lbd.addr(), "x.example", "/"), "A");
}

/// A worker restarted after a change runs the current state, not the file's.
#[test]
fn a_killed_worker_restarts_with_the_current_state() {
    let _serial = serial();
    let _ = lbctl_bin();
    let a = Origin::start("A");
    let b = Origin::start("B");
    let c = Origin::start("C");
    let lbd = Lbd::start(|l| common::one_cluster("workers = 2", l, &[a.addr(), b.addr()]));
    let sock = socket_of(&lbd);
    let l = lbd.addr();
    let host = l.to_string();
    let originals = wait_workers(&lbd, 2, &[]);

    ok(
        &sock,
        &[
            "backend",
            "drain",
            "--cluster",
            "app",
            "--address",
            &a.addr().to_string(),
        ],
    );
    ok(
        &sock,
        &[
            "backend",
            "add",
            "--cluster",
            "app",
            "--address",
            &c.addr().to_string(),
        ],
    );

    // Kill every worker that saw the changes arrive, one after the other.
    let mut gone = Vec::new();
    for &victim in &originals {
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        gone.push(victim);
        wait_workers(&lbd, 2, &gone);
    }
    let st = status(&sock);
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "running", "{st}");
        assert_eq!(w["restarts"], 1, "{st}");
    }

    // Only new workers serve now: A is still drained, C still there.
    assert!(quiet(&a, Duration::from_millis(200)));
    let base_a = a.raw_bytes_received();
    let seen: Vec<String> = (0..60).map(|_| served_by(l, &host, "/")).collect();
    assert_eq!(
        a.raw_bytes_received(),
        base_a,
        "a restarted worker sent requests to the drained backend A: {seen:?}"
    );
    assert!(seen.iter().all(|o| o == "B" || o == "C"), "{seen:?}");
    assert!(seen.iter().any(|o| o == "B"), "{seen:?}");
    assert!(seen.iter().any(|o| o == "C"), "C gets nothing: {seen:?}");

    // The restarted workers take changes too.
    let out = ok(
        &sock,
        &[
            "backend",
            "drain",
            "--cluster",
            "app",
            "--address",
            &c.addr().to_string(),
        ],
    );
    assert_eq!(
        out,
        applied(&[format!(
            "~ backend {} (cluster app): draining: (unset) -> true",
            c.addr()
        )])
    );
    for _ in 0..20 {
        assert_eq!(served_by(l, &host, "/"), "B");
    }
}

/// Whether the worker has entered its sandbox (the seccomp filter is the last step).
fn sandboxed(pid: i32) -> bool {
    proc_status(pid, "Seccomp").as_deref() == Some("2")
}

/// Waits until `lbd` has exactly `n` live, sandboxed workers, none of them in `gone`.
fn wait_workers(lbd: &Lbd, n: usize, gone: &[i32]) -> Vec<i32> {
    let mut workers = Vec::new();
    let up = wait_until(WORKERS_UP, || {
        workers = lbd.workers();
        workers.len() == n
            && workers.iter().all(|w| !gone.contains(w))
            && workers.iter().all(|&w| sandboxed(w))
    });
    assert!(
        up,
        "expected {n} sandboxed workers under lbd (pid {}) other than {gone:?}, found {workers:?}",
        lbd.pid()
    );
    workers
}
