//! HTTP/2 through a real, sandboxed `lbd`, with real clients: curl (`--http2-prior-knowledge`
//! on an http listener, ALPN h2 on an https one), h2load, and a python3-h2 client
//! (`tests/h2/h2client.py`, run with `/usr/bin/python3`, Debian's python3-h2) for what curl
//! cannot do: many streams at once on one connection, RST_STREAM mid-response, uploads in
//! DATA frames with and without content-length. Each stream reaches the origin as one
//! HTTP/1.1 exchange.
//!
//! - h2c prior knowledge: 200 and the origin's body, `%{http_version}` 2, the origin saw
//!   HTTP/1.1 with Host from `:authority`, X-Forwarded-*, Forwarded and X-Request-Id, no
//!   pseudo-header; the response carries no connection-specific header; HEAD and statuses;
//! - TLS with ALPN h2 (curl and python), and a listener with `alpn = ["http/1.1"]` that falls
//!   back to HTTP/1.1 (and refuses prior knowledge on http);
//! - 20 concurrent streams on one connection, and 8 concurrent downloads of ~300 KB each;
//! - 8 MiB down (Content-Length and chunked at the origin), 4 MiB up with curl, 3 MiB up in
//!   DATA frames with and without content-length, 1 MiB echoed, all byte-exact;
//! - kakehi's own 404 on its stream, the connection serving the next streams;
//! - RST_STREAM of a download and of a response not yet begun, the connection going on;
//! - h2load: 2000 requests, 4 connections, 10 streams each, over h2c and over TLS, none failed;
//! - a bad preface and garbage after a good one: closed (GOAWAY with an error code, if any),
//!   and lbd keeps serving with the same worker;
//! - HTTP/1.1 clients on the same listener (keep-alive, `Upgrade: h2c`) unaffected.
//!
//! Every process is stopped by handle or pid, every client has a deadline.

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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    curl, digest_line, h2load_all_ok, one_cluster, pattern, run_bounded, Cert, Client, Lbd, TempDir,
};
use lb_testkit::{fnv1a64, Origin};
use serde_json::Value;

/// The longest any one external client (curl, h2load, python, openssl) may run.
const DEADLINE: Duration = Duration::from_secs(60);

// ---- lbd ------------------------------------------------------------------------------------

/// lbd with one http listener (h2c prior knowledge and HTTP/1.1) in front of `origin`.
fn h2c_lbd(origin: &Origin) -> Lbd {
    let backend = origin.addr();
    Lbd::start(move |l| one_cluster("", l, &[backend]))
}

/// lbd with one https listener serving `cert` in front of `origin`; `listener_extra` is more
/// of the listener's keys (`alpn = [...]`).
fn https_lbd(cert: &Cert, origin: &Origin, listener_extra: &str) -> Lbd {
    let (pem, key) = (
        cert.pem.display().to_string(),
        cert.key.display().to_string(),
    );
    let backend = origin.addr();
    let listener_extra = listener_extra.to_owned();
    Lbd::start(move |addr| {
        format!(
            "[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n{listener_extra}\n\
             certificates = [ {{ certificate = \"{pem}\", key = \"{key}\" }} ]\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{addr}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
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

// ---- certificates ---------------------------------------------------------------------------

// ---- curl -----------------------------------------------------------------------------------

/// What curl got: `%{http_version}`, `%{response_code}`, the response head (`-D`) and body.
#[derive(Debug)]
struct Fetched {
    version: String,
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Fetched {
    /// A response header's value, from curl's `-D` dump (the last response's, case-insensitive).
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// curl `ARGS...` with the head and body written to files of `dir`; fails the test when curl
/// does (the transfer, not the status).
fn fetch(dir: &Path, args: &[&str]) -> Fetched {
    let out = fetch_raw(dir, args);
    assert!(
        out.1.status.success(),
        "curl {args:?} failed ({}): {}",
        out.1.status,
        String::from_utf8_lossy(&out.1.stderr)
    );
    out.0
}

/// Like [`fetch`], also when curl fails.
fn fetch_raw(dir: &Path, args: &[&str]) -> (Fetched, Output) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (head, body) = (dir.join(format!("head{n}")), dir.join(format!("body{n}")));
    let mut all: Vec<&str> = vec![
        "-D",
        head.to_str().unwrap(),
        "-o",
        body.to_str().unwrap(),
        "-w",
        "%{http_version} %{response_code}",
    ];
    all.extend_from_slice(args);
    let out = curl(&all);
    let w = String::from_utf8_lossy(&out.stdout).into_owned();
    let (version, status) = w.split_once(' ').unwrap_or((&w, "0"));
    let fetched = Fetched {
        version: version.to_owned(),
        status: status.trim().parse().unwrap_or(0),
        head: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    };
    (fetched, out)
}

/// `curl --http2-prior-knowledge ARGS... http://ADDR/PATH`.
fn h2c(dir: &Path, addr: SocketAddr, path: &str, args: &[&str]) -> Fetched {
    let url = format!("http://{addr}{path}");
    let mut all = vec!["--http2-prior-knowledge"];
    all.extend_from_slice(args);
    all.push(&url);
    fetch(dir, &all)
}

/// `curl --http2 --cacert CERT ARGS... https://NAME:PORT/PATH`, NAME resolved to the listener.
fn h2_tls(dir: &Path, addr: SocketAddr, name: &str, cert: &Cert, path: &str) -> Fetched {
    fetch(
        dir,
        &[
            "--http2",
            "--resolve",
            &format!("{name}:{}:{}", addr.port(), addr.ip()),
            "--cacert",
            cert.pem.to_str().unwrap(),
            &format!("https://{name}:{}{path}", addr.port()),
        ],
    )
}

fn assert_ok(got: &Fetched, version: &str, body: &[u8], what: &str) {
    assert_eq!(
        (got.version.as_str(), got.status),
        (version, 200),
        "{what}: {got:?}"
    );
    assert!(
        got.body == body,
        "{what}: body of {} bytes differs from the expected {} bytes ({:?}...)",
        got.body.len(),
        body.len(),
        String::from_utf8_lossy(&got.body[..got.body.len().min(200)])
    );
}

// ---- the python3-h2 client ------------------------------------------------------------------

fn h2client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2/h2client.py")
}

/// Fails the test, with the way out, when /usr/bin/python3 has no h2 module: never skipped.
fn require_python_h2() {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", "import h2.connection"]);
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

/// Runs `h2client.py [--tls --sni NAME] IP PORT ARGS...` and returns the JSON it printed.
fn h2client(addr: SocketAddr, tls_sni: Option<&str>, args: &[&str]) -> Value {
    require_python_h2();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(h2client_script());
    if let Some(sni) = tls_sni {
        cmd.args(["--tls", "--sni", sni]);
    }
    cmd.arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(args);
    let out = run_bounded(cmd, DEADLINE, &format!("h2client.py {args:?}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "h2client.py {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("h2client.py {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// The streams of a client report, in the order they were opened.
fn streams(report: &Value) -> &Vec<Value> {
    report["streams"].as_array().expect("a streams array")
}

fn status_of(stream: &Value) -> Option<u64> {
    stream["status"].as_u64()
}

fn header_of<'a>(stream: &'a Value, name: &str) -> Option<&'a str> {
    stream["headers"]
        .as_array()?
        .iter()
        .find_map(|h| (h[0].as_str()? == name).then(|| h[1].as_str())?)
}

/// The connection ended well: no GOAWAY with an error code, not closed under the client.
fn assert_connection_clean(report: &Value, what: &str) {
    assert!(
        report["goaway"].is_null() || report["goaway"]["error_code"] == 0,
        "{what}: the server sent GOAWAY: {}",
        report["goaway"]
    );
    assert_eq!(
        report["closed"], false,
        "{what}: the server closed the connection"
    );
}

/// A stream answered 200 by the origin with `body`, ended, not reset.
fn assert_stream_ok(stream: &Value, body: &str, what: &str) {
    assert_eq!(status_of(stream), Some(200), "{what}: {stream}");
    assert_eq!(stream["ended"], true, "{what}: not ended: {stream}");
    assert!(stream["reset"].is_null(), "{what}: reset: {stream}");
    assert_eq!(stream["body_text"].as_str(), Some(body), "{what}: {stream}");
}

// ---- raw frames -----------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;

/// An HTTP/2 frame: its 9-octet header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The (type, payload) of each complete frame at the start of `bytes`.
fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        out.push((rest[3], rest[9..9 + len].to_vec()));
        rest = &rest[9 + len..];
    }
    out
}

/// The error code of the first GOAWAY frame in `bytes`.
fn goaway_code(bytes: &[u8]) -> Option<u32> {
    frames(bytes)
        .into_iter()
        .find(|(kind, p)| *kind == GOAWAY && p.len() >= 8)
        .map(|(_, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn h2c_prior_knowledge_reaches_the_origin_as_http11() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let addr = lbd.addr();
    let dir = lbd.dir().path();

    let got = h2c(
        dir,
        addr,
        "/headers?a=1&b=2",
        &["-H", "X-Keep: end-to-end", "-A", "kakehi-test/1"],
    );
    assert_eq!(got.version, "2", "curl did not speak HTTP/2: {got:?}");
    assert_eq!(got.status, 200, "{got:?}");
    assert!(
        got.head.starts_with("HTTP/2 200"),
        "curl's head: {:?}",
        got.head
    );
    // HTTP/2 forbids connection-specific fields in a response (RFC 9113 §8.2.2).
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(
            got.header(name).is_none(),
            "the h2 response carries {name}: {}",
            got.head
        );
    }
    assert_eq!(got.header("x-origin").as_deref(), Some("o"), "{}", got.head);

    let reqs = origin.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let seen = &reqs[0];
    assert_eq!(seen.version, "HTTP/1.1", "{seen:?}");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, "/headers?a=1&b=2");
    assert_eq!(seen.body_len, 0);
    assert_eq!(
        seen.header("host"),
        Some(addr.to_string().as_str()),
        "Host must come from :authority: {:?}",
        seen.headers
    );
    assert_eq!(
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
            .count(),
        1,
        "exactly one Host: {:?}",
        seen.headers
    );
    assert!(
        seen.headers.iter().all(|(n, _)| !n.starts_with(':')),
        "a pseudo-header reached the origin: {:?}",
        seen.headers
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-port"),
        Some(addr.port().to_string().as_str())
    );
    let forwarded = seen
        .header("forwarded")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        forwarded.contains("for=127.0.0.1") && forwarded.contains("proto=http"),
        "Forwarded: {forwarded:?}"
    );
    assert_eq!(seen.header("x-keep"), Some("end-to-end"));
    assert_eq!(seen.header("user-agent"), Some("kakehi-test/1"));
    let id = seen.header("x-request-id").unwrap_or_default();
    assert!(
        !id.is_empty(),
        "no X-Request-Id at the origin: {:?}",
        seen.headers
    );
    // The client sees the id the origin saw.
    assert_eq!(
        got.header("x-request-id").as_deref(),
        Some(id),
        "{}",
        got.head
    );
    // And what /headers echoed is what the origin recorded.
    assert!(
        got.text()
            .to_ascii_lowercase()
            .contains(&format!("host: {addr}\n")),
        "{}",
        got.text()
    );

    // The default route: the origin's own body, byte for byte.
    let got = h2c(dir, addr, "/hello", &[]);
    assert_ok(&got, "2", b"origin o: GET /hello\n", "GET /hello");
}

#[test]
fn head_and_statuses_pass_through_h2() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let (addr, dir) = (lbd.addr(), lbd.dir().path());

    // HEAD: the length of the body that would have come, no DATA.
    let got = h2c(dir, addr, "/bytes/777", &["-I"]);
    assert_eq!((got.version.as_str(), got.status), ("2", 200), "{got:?}");
    assert_eq!(
        got.header("content-length").as_deref(),
        Some("777"),
        "{}",
        got.head
    );
    assert_eq!(origin.requests()[0].method, "HEAD");

    for (code, body) in [
        (503, "status 503\n"),
        (404, "status 404\n"),
        (201, "status 201\n"),
    ] {
        let got = h2c(dir, addr, &format!("/status/{code}"), &[]);
        assert_eq!((got.version.as_str(), got.status), ("2", code), "{got:?}");
        assert_eq!(got.text(), body);
    }
    let got = h2c(dir, addr, "/status/204", &[]);
    assert_eq!((got.version.as_str(), got.status), ("2", 204), "{got:?}");
    assert!(got.body.is_empty(), "a 204 with a body: {:?}", got.text());
}

#[test]
fn https_alpn_negotiates_h2() {
    let dir = TempDir::new("h2-tls");
    let cert = Cert::new(dir.path(), "a.test");
    let origin = Origin::start("o");
    let lbd = https_lbd(&cert, &origin, "");
    let addr = lbd.addr();

    let got = h2_tls(dir.path(), addr, "a.test", &cert, "/");
    assert_ok(&got, "2", b"origin o: GET /\n", "curl --http2 over TLS");
    let seen = &origin.requests()[0];
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(
        seen.header("host"),
        Some(format!("a.test:{}", addr.port()).as_str()),
        "{:?}",
        seen.headers
    );
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some("https"),
        "{:?}",
        seen.headers
    );

    // 4 MiB down through TLS and HTTP/2 flow control, byte-exact.
    let len = 4 << 20;
    let got = h2_tls(dir.path(), addr, "a.test", &cert, &format!("/bytes/{len}"));
    assert_ok(&got, "2", &pattern(len), "4 MiB over TLS h2");

    // python3-h2 offering h2 only: selected, and ten streams at once served.
    let report = h2client(addr, Some("a.test"), &["concurrent", "10", "a.test", "/t"]);
    assert_eq!(report["alpn"], "h2", "{report}");
    let s = streams(&report);
    assert_eq!(s.len(), 10);
    for (i, stream) in s.iter().enumerate() {
        assert_stream_ok(
            stream,
            &format!("origin o: GET /t{i}\n"),
            &format!("stream /t{i}"),
        );
    }
    assert_connection_clean(&report, "TLS h2");
}

#[test]
fn alpn_http11_only_listeners_speak_http11() {
    let dir = TempDir::new("h2-alpn-off");
    let cert = Cert::new(dir.path(), "a.test");
    let origin = Origin::start("o");

    // https: curl asks for h2 and gets HTTP/1.1.
    let lbd = https_lbd(&cert, &origin, "alpn = [\"http/1.1\"]");
    let got = h2_tls(dir.path(), lbd.addr(), "a.test", &cert, "/fallback");
    assert_ok(
        &got,
        "1.1",
        b"origin o: GET /fallback\n",
        "ALPN http/1.1 only",
    );
    drop(lbd);

    // http: prior knowledge is not HTTP/2 there; HTTP/1.1 works.
    let backend = origin.addr();
    let lbd = Lbd::start(move |l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\nalpn = [\"http/1.1\"]\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{l}\" }} ]\nbackends = [ {{ address = \"{backend}\" }} ]\n"
        )
    });
    let url = format!("http://{}/pk", lbd.addr());
    let (got, out) = fetch_raw(dir.path(), &["--http2-prior-knowledge", &url]);
    assert!(
        !(out.status.success() && got.version == "2"),
        "an http listener without h2 in alpn spoke HTTP/2: {got:?}"
    );
    let url = format!("http://{}/h1", lbd.addr());
    let got = fetch(dir.path(), &["--http1.1", &url]);
    assert_ok(
        &got,
        "1.1",
        b"origin o: GET /h1\n",
        "HTTP/1.1 on the h1-only listener",
    );
}

#[test]
fn twenty_concurrent_streams_on_one_connection() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let addr = lbd.addr();

    let report = h2client(addr, None, &["concurrent", "20", "localhost", "/c"]);
    let s = streams(&report);
    assert_eq!(s.len(), 20, "{report}");
    let mut ids: Vec<u64> = s.iter().map(|x| x["id"].as_u64().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 20, "twenty distinct streams: {ids:?}");
    for (i, stream) in s.iter().enumerate() {
        assert_stream_ok(
            stream,
            &format!("origin o: GET /c{i}\n"),
            &format!("stream /c{i}"),
        );
    }
    assert_connection_clean(&report, "20 streams");
    let mut targets: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
    targets.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("/c{i}")).collect();
    expected.sort();
    assert_eq!(
        targets, expected,
        "the origin saw each stream's request once"
    );

    // Eight downloads of ~300 KB at once: more than the client's 64 KiB connection window
    // together, so the streams share it through WINDOW_UPDATEs. Each body byte-exact.
    let report = h2client(
        addr,
        None,
        &["concurrent", "8", "localhost", "/bytes/", "300000"],
    );
    let s = streams(&report);
    assert_eq!(s.len(), 8, "{report}");
    for (i, stream) in s.iter().enumerate() {
        let len = 300_000 + i as u64;
        assert_eq!(status_of(stream), Some(200), "{}", stream["path"]);
        assert_eq!(stream["ended"], true, "{}", stream["path"]);
        assert_eq!(stream["body_len"].as_u64(), Some(len), "{}", stream["path"]);
        assert_eq!(
            stream["pattern_ok"], true,
            "{}: not the pattern",
            stream["path"]
        );
    }
    assert_connection_clean(&report, "8 downloads");
}

#[test]
fn large_bodies_both_ways_with_flow_control() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let (addr, dir) = (lbd.addr(), lbd.dir().path());

    // 8 MiB down, Content-Length at the origin: byte-exact (same FNV-1a as the pattern).
    let len = 8 << 20;
    let got = h2c(dir, addr, &format!("/bytes/{len}"), &[]);
    assert_eq!((got.version.as_str(), got.status), ("2", 200), "{got:?}");
    assert_eq!(got.body.len(), len);
    assert_eq!(
        fnv1a64(&got.body),
        fnv1a64(&pattern(len)),
        "the 8 MiB body differs from the pattern"
    );
    // 3 MiB down, chunked at the origin (no length known in advance).
    let len = 3 << 20;
    let got = h2c(dir, addr, &format!("/chunked/{len}"), &[]);
    assert_ok(&got, "2", &pattern(len), "3 MiB chunked at the origin");

    // 4 MiB up with curl (content-length), as the origin's digest.
    let body = pattern(4 << 20);
    let file = lbd.dir().write("up.bin", &body);
    let got = h2c(
        dir,
        addr,
        "/digest",
        &["--data-binary", &format!("@{}", file.display())],
    );
    assert_ok(&got, "2", digest_line(&body).as_bytes(), "4 MiB up");
    let seen = origin.requests().into_iter().last().unwrap();
    assert_eq!((seen.method.as_str(), seen.body_len), ("POST", 4 << 20));
    assert_eq!(seen.body_sha, fnv1a64(&body));

    // 3 MiB up in DATA frames, with and without content-length (the second reaches the
    // HTTP/1.1 origin chunked): the client sends only what the windows allow.
    let len = 3 << 20;
    for cl in ["1", "0"] {
        let report = h2client(addr, None, &["upload", "localhost", &len.to_string(), cl]);
        assert_eq!(report["sent"].as_u64(), Some(len as u64), "{report}");
        let s = &streams(&report)[0];
        assert_stream_ok(
            s,
            &digest_line(&pattern(len)),
            &format!("upload content-length={cl}"),
        );
        assert_connection_clean(&report, "upload");
        let seen = origin.requests().into_iter().last().unwrap();
        assert_eq!(seen.body_len, len as u64, "{:?}", seen.headers);
        if cl == "0" {
            assert!(
                seen.header("content-length").is_some()
                    || seen
                        .header("transfer-encoding")
                        .is_some_and(|v| v.eq_ignore_ascii_case("chunked")),
                "a body without a length must reach the origin framed: {:?}",
                seen.headers
            );
        }
    }

    // 1 MiB echoed: the origin streams it back while it still reads it.
    let body = pattern(1 << 20);
    let file = lbd.dir().write("echo.bin", &body);
    let got = h2c(
        dir,
        addr,
        "/echo",
        &["--data-binary", &format!("@{}", file.display())],
    );
    assert_ok(&got, "2", &body, "1 MiB echoed");
}

#[test]
fn no_route_404_comes_back_on_its_stream_and_the_connection_goes_on() {
    let origin = Origin::start("o");
    let backend = origin.addr();
    let lbd = Lbd::start(move |l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{l}\", hostname = \"app.test\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    });
    let report = h2client(
        lbd.addr(),
        None,
        &[
            "sequence",
            "nobody.test",
            "/",
            "app.test",
            "/after-404",
            "other.test",
            "/x",
            "app.test",
            "/again",
        ],
    );
    let s = streams(&report);
    assert_eq!(s.len(), 4, "{report}");
    for miss in [&s[0], &s[2]] {
        assert_eq!(status_of(miss), Some(404), "{miss}");
        assert_eq!(miss["ended"], true, "{miss}");
        assert!(miss["reset"].is_null(), "{miss}");
        assert!(
            header_of(miss, "content-type").is_some_and(|v| v.contains("text/html")),
            "{miss}"
        );
        assert!(
            miss["body_text"]
                .as_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("<html"),
            "{miss}"
        );
        assert!(
            header_of(miss, "x-request-id").is_some_and(|v| !v.is_empty()),
            "{miss}"
        );
    }
    assert_stream_ok(
        &s[1],
        "origin o: GET /after-404\n",
        "the stream after a 404",
    );
    assert_stream_ok(
        &s[3],
        "origin o: GET /again\n",
        "the stream after the second 404",
    );
    assert_connection_clean(&report, "404s");
    let targets: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        ["/after-404", "/again"],
        "a 404 never reaches the origin"
    );
}

#[test]
fn rst_stream_from_the_client_leaves_the_connection_usable() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let workers = the_worker(&lbd);
    let report = h2client(lbd.addr(), None, &["reset", "localhost"]);
    let s = streams(&report);
    assert_eq!(s.len(), 4, "{report}");
    let (big, slow, after, again) = (&s[0], &s[1], &s[2], &s[3]);
    assert_eq!(status_of(big), Some(200), "{big}");
    assert!(
        report["received_before_reset"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(
        big["reset"]["by"], "client",
        "the download ended before the reset: {big}"
    );
    assert_eq!(slow["reset"]["by"], "client", "{slow}");
    assert!(
        status_of(slow).is_none(),
        "a head for the cancelled slow stream: {slow}"
    );
    assert_stream_ok(
        after,
        "origin o: GET /after-reset\n",
        "the GET after the resets",
    );
    assert_stream_ok(
        again,
        "origin o: GET /again\n",
        "the second GET after the resets",
    );
    // Not held behind the cancelled /sleep/3000 (nor behind anything).
    let secs = report["after_secs"].as_f64().unwrap();
    assert!(secs < 2.5, "the GET after the resets took {secs:.2}s");
    assert_connection_clean(&report, "after RST_STREAM");
    // lbd goes on, with the same worker.
    let got = h2c(lbd.dir().path(), lbd.addr(), "/next", &[]);
    assert_ok(
        &got,
        "2",
        b"origin o: GET /next\n",
        "a new connection after the resets",
    );
    assert_eq!(lbd.workers(), workers, "the worker was replaced");
}

/// `h2load -n N -c 4 -m 10 URL`: asserts every request succeeded with a 2xx over `proto`.
fn h2load(url: &str, n: u64, proto: &str) {
    h2load_all_ok(&["-c", "4", "-m", "10"], url, n, proto, DEADLINE);
}

#[test]
fn h2load_2000_requests_over_h2c_and_tls_none_fail() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    h2load(&format!("http://{}/", lbd.addr()), 2000, "h2c");
    assert_eq!(origin.requests().len(), 2000);

    let dir = TempDir::new("h2-h2load");
    let cert = Cert::new(dir.path(), "a.test");
    let tls = https_lbd(&cert, &origin, "");
    h2load(&format!("https://{}/", tls.addr()), 2000, "h2");
}

#[test]
fn bad_preface_and_garbage_are_closed_and_lbd_keeps_serving() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let (addr, dir) = (lbd.addr(), lbd.dir().path());
    let workers = the_worker(&lbd);
    let settings = frame(0x4, 0, 0, &[]);
    let mut noise = Vec::with_capacity(4096);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    // What is sent, and the GOAWAY error code RFC 9113 requires for it (None: any error code,
    // or a close without GOAWAY).
    let cases: Vec<(&str, Vec<u8>, Option<u32>)> = vec![
        (
            "HTTP/1.1 text after the preface",
            [PREFACE, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"].concat(),
            None,
        ),
        (
            "a SETTINGS frame of 5 octets",
            [PREFACE, &frame(0x4, 0, 0, &[0, 3, 0, 0, 0])].concat(),
            Some(FRAME_SIZE_ERROR), // §6.5
        ),
        (
            "DATA on stream 0 after a good SETTINGS",
            [PREFACE, &settings, &frame(0x0, 0, 0, b"x")].concat(),
            Some(PROTOCOL_ERROR), // §6.1
        ),
        (
            "HEADERS on an even stream",
            [PREFACE, &settings, &frame(0x1, 0x5, 2, &[0x82, 0x86, 0x84])].concat(),
            Some(PROTOCOL_ERROR), // §5.1.1
        ),
        (
            "4 KiB of noise after the preface",
            [PREFACE, &noise].concat(),
            None,
        ),
    ];
    for (what, bytes, expected) in &cases {
        let mut c = Client::connect(addr);
        c.send(bytes);
        // Closed within the client's read timeout (read_to_close panics otherwise).
        let got = c.read_to_close();
        let received = frames(&got);
        // An HTTP/2 server's preface is its SETTINGS; on a connection error it sends GOAWAY
        // with the error's code, then closes.
        if let Some((kind, _)) = received.first() {
            assert_eq!(
                *kind, 0x4,
                "{what}: the server's first frame is not SETTINGS: {got:?}"
            );
        }
        let kinds: Vec<u8> = received.iter().map(|(k, _)| *k).collect();
        match (goaway_code(&got), expected) {
            (Some(code), Some(want)) => {
                assert_eq!(
                    code, *want,
                    "{what}: GOAWAY's error code (frames {kinds:?})"
                );
            }
            (None, Some(want)) => {
                panic!("{what}: closed without GOAWAY({want}) (frames {kinds:?})")
            }
            (Some(code), None) => {
                assert_ne!(code, 0, "{what}: GOAWAY with NO_ERROR for a protocol error");
            }
            (None, None) => {}
        }
        let ok = h2c(dir, addr, "/after", &[]);
        assert_ok(
            &ok,
            "2",
            b"origin o: GET /after\n",
            &format!("after {what}"),
        );
    }
    assert!(
        origin.requests().iter().all(|r| r.target == "/after"),
        "a broken connection reached the origin: {:?}",
        origin.requests()
    );

    // A broken preface: closed (perhaps after an HTTP/1.1 error); nothing reaches the origin.
    let before = origin.requests().len();
    let mut c = Client::connect(addr);
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n");
    let got = c.read_to_close();
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains(" 200 ") && goaway_code(&got) != Some(0),
        "a broken preface: {text:?}"
    );
    assert_eq!(
        origin.requests().len(),
        before,
        "a broken preface reached the origin"
    );
    let ok = h2c(dir, addr, "/last", &[]);
    assert_ok(&ok, "2", b"origin o: GET /last\n", "after a broken preface");
    assert_eq!(lbd.workers(), workers, "the worker was replaced");
}

#[test]
fn http11_clients_keep_working_on_the_same_listener() {
    let origin = Origin::start("o");
    let lbd = h2c_lbd(&origin);
    let (addr, dir) = (lbd.addr(), lbd.dir().path());

    // Raw HTTP/1.1 with keep-alive, between HTTP/2 requests.
    let mut c = Client::connect(addr);
    for i in 0..3 {
        let resp = c.get("localhost", &format!("/k{i}"));
        assert_eq!(
            (resp.version.as_str(), resp.status),
            ("HTTP/1.1", 200),
            "{resp:?}"
        );
        assert_eq!(resp.text(), format!("origin o: GET /k{i}\n"));
        let got = h2c(dir, addr, &format!("/h2-{i}"), &[]);
        assert_ok(
            &got,
            "2",
            format!("origin o: GET /h2-{i}\n").as_bytes(),
            "h2 between",
        );
    }
    // curl, HTTP/1.1.
    let url = format!("http://{addr}/curl11");
    let got = fetch(dir, &["--http1.1", &url]);
    assert_ok(&got, "1.1", b"origin o: GET /curl11\n", "curl --http1.1");
    // curl --http2 on http:// asks for `Upgrade: h2c`: answered, whichever version it is.
    let url = format!("http://{addr}/upgrade");
    let got = fetch(dir, &["--http2", &url]);
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.text(), "origin o: GET /upgrade\n", "{got:?}");
    // A POST with a body, HTTP/1.1.
    let body = pattern(100_000);
    let file = lbd.dir().write("post.bin", &body);
    let url = format!("http://{addr}/digest");
    let got = fetch(
        dir,
        &[
            "--http1.1",
            "--data-binary",
            &format!("@{}", file.display()),
            &url,
        ],
    );
    assert_ok(&got, "1.1", digest_line(&body).as_bytes(), "HTTP/1.1 POST");
    assert!(
        origin.requests().iter().all(|r| r.version == "HTTP/1.1"),
        "every request reached the origin as HTTP/1.1"
    );
    // The connection opened first still works.
    let resp = c.get("localhost", "/still-open");
    assert_eq!(resp.status, 200);
}
