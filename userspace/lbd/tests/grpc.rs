//! gRPC end to end through a real, sandboxed `lbd`: a python gRPC client (`tests/grpc/client.py`)
//! calls a python gRPC server (`tests/grpc/server.py`) through kakehi, whose cluster has
//! `http2 = true` and so speaks h2c (prior knowledge) to the server. Both run with
//! `/usr/bin/python3` and Debian's python3-grpcio; messages are raw bytes (no protoc), the
//! service is `kakehi.Test`:
//!
//! - Echo (unary, the request reversed, trailing metadata `x-trailer: <len>`), a 300 KB Echo,
//!   Count (server streaming, 5 messages 100 ms apart), Chat (bidi streaming in lock step: the
//!   client sends message k only once reply k-1 is back, so it completes only if both
//!   directions stream through) and Fail (PERMISSION_DENIED, "nope"), through an http listener
//!   (h2c prior knowledge from the client) and through an https listener (ALPN h2): exact
//!   payloads, the trailers (gRPC's status and the custom metadata) carried back, the stream
//!   not buffered;
//! - 200 Echo calls at once on one channel (one HTTP/2 connection), every one answered right,
//!   the worker not replaced;
//! - the access log line of each gRPC call: `proto=h2`, `method=POST`, the call's path, status
//!   200 (a gRPC error travels in the trailers, not in `:status`), the cluster and backend.
//!
//! Every process is stopped by handle or pid, every client has a deadline (each call 10 s, the
//! client 50 s, the test's bound on it 60 s).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod scrape;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{field, free_addr, parse_logfmt, run_bounded, wait_until, Cert, Lbd, TempDir};
use serde_json::Value;

/// The longest any one external client (python, openssl) may run.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long the gRPC server may take to write its port.
const SERVER_START: Duration = Duration::from_secs(10);
/// What client.py sends to Echo (its `ECHO`).
const ECHO: &[u8] = b"kakehi \x00\x01\xfe\xff gRPC echo";
/// What client.py's Chat sends, one at a time (its `CHAT`).
const CHAT: [&str; 5] = ["alpha", "beta", "gamma", "delta", "epsilon"];
/// How many messages client.py asks Count for (its `COUNT`), and server.py's delay between
/// two of them.
const COUNT: usize = 5;
const COUNT_DELAY: f64 = 0.1;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/grpc")
        .join(name)
}

/// Fails the test, with the way out, when /usr/bin/python3 has no grpc module: never skipped.
fn require_python_grpc() {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", "import grpc"]);
    let ok = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this end-to-end test needs /usr/bin/python3 with the grpc module (Debian's \
         python3-grpcio: `cargo xtask setup` or apt-get install -y python3-grpcio); it is not \
         skipped"
    );
}

// ---- the gRPC server ------------------------------------------------------------------------

/// `server.py` serving `kakehi.Test` on 127.0.0.1 (insecure, h2c), killed by handle on drop.
struct GrpcServer {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: TempDir,
}

impl GrpcServer {
    /// Starts server.py on a free port and waits (10 s at most) for the port it writes.
    fn start() -> GrpcServer {
        GrpcServer::start_on(0)
    }

    /// Starts server.py on `port` (0: any free one).
    fn start_on(port: u16) -> GrpcServer {
        require_python_grpc();
        let dir = TempDir::new("grpc-server");
        let portfile = dir.path().join("port");
        let stderr = dir.path().join("server.stderr");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script("server.py"))
            .arg(&portfile)
            // server.py's own bound: it stops by itself after this, should the test not.
            .args(["--lifetime", "300"])
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start server.py: {e}"));
        let mut port = None;
        let mut exited = None;
        wait_until(SERVER_START, || {
            port = std::fs::read_to_string(&portfile)
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok());
            exited = child.try_wait().ok().flatten();
            port.is_some() || exited.is_some()
        });
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server.py wrote no port within {SERVER_START:?} (exit: {exited:?}):\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        GrpcServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stderr,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server wrote on stderr so far (for failure messages).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("server.py's stderr:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- lbd ------------------------------------------------------------------------------------

/// lbd with one http listener (h2c prior knowledge and HTTP/1.1) in front of `backend`, in a
/// cluster `grpc` that speaks h2c to it.
fn h2c_lbd(backend: SocketAddr) -> Lbd {
    Lbd::start(move |l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\nprotocol = \"http\"\n\n\
             [clusters.grpc]\nhttp2 = true\n\
             frontends = [ {{ address = \"{l}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    })
}

/// lbd with one https listener serving `cert` (ALPN h2 and http/1.1, the default) in front of
/// `backend`, in a cluster `grpc` that speaks h2c to it.
fn https_lbd(cert: &Cert, backend: SocketAddr) -> Lbd {
    let (pem, key) = (
        cert.pem.display().to_string(),
        cert.key.display().to_string(),
    );
    Lbd::start(move |l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{pem}\", key = \"{key}\" }} ]\n\n\
             [clusters.grpc]\nhttp2 = true\n\
             frontends = [ {{ address = \"{l}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    })
}

/// The pids of lbd's one worker, once it runs: 10 s at most.
fn the_worker(lbd: &Lbd) -> Vec<i32> {
    let mut workers = Vec::new();
    let up = wait_until(Duration::from_secs(10), || {
        workers = lbd.workers();
        workers.len() == 1
    });
    assert!(up, "lbd has not one worker after 10 s: {workers:?}");
    workers
}

// ---- certificates ---------------------------------------------------------------------------

// ---- the gRPC client ------------------------------------------------------------------------

/// Runs `client.py ADDR [--tls CAFILE --name NAME] ARGS...` and returns the JSON it printed.
fn client(addr: SocketAddr, tls: Option<(&Cert, &str)>, args: &[&str]) -> Value {
    require_python_grpc();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script("client.py")).arg(addr.to_string());
    if let Some((cert, name)) = tls {
        cmd.arg("--tls").arg(&cert.pem).args(["--name", name]);
    }
    cmd.args(args);
    let out = run_bounded(cmd, DEADLINE, &format!("client.py {args:?}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "client.py {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("client.py {args:?} printed no JSON ({e}):\n{stdout}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("a string: {s}")))
        .collect()
}

/// A call ended with status OK.
fn assert_call_ok(call: &Value, what: &str) {
    assert_eq!(
        call["code"], "OK",
        "{what}: status {} ({})",
        call["code"], call["details"]
    );
}

/// Echo, the 300 KB Echo, Count, Chat and Fail of a default client.py run all came back as
/// server.py answers them.
fn assert_all_calls(report: &Value, what: &str) {
    // Unary: the request reversed, byte for byte, and the trailing metadata the server set.
    let echo = &report["echo"];
    assert_call_ok(echo, &format!("{what}: Echo"));
    assert_eq!(echo["request_hex"], hex(ECHO), "{what}: Echo sent: {echo}");
    let reversed: Vec<u8> = ECHO.iter().rev().copied().collect();
    assert_eq!(
        echo["reply_hex"],
        hex(&reversed),
        "{what}: Echo's reply: {echo}"
    );
    assert_eq!(
        echo["trailing"]["x-trailer"],
        ECHO.len().to_string(),
        "{what}: Echo's trailing metadata: {echo}"
    );

    // 300 KB each way: several DATA frames, past the initial flow-control windows.
    let big = &report["echo_big"];
    assert_call_ok(big, &format!("{what}: the 300 KB Echo"));
    assert_eq!(big["reply_len"], big["len"], "{what}: {big}");
    assert_eq!(
        big["reversed_ok"], true,
        "{what}: the 300 KB reply is not the request reversed: {big}"
    );
    assert_eq!(
        big["trailing"]["x-trailer"],
        big["len"].to_string(),
        "{what}: {big}"
    );

    // Server streaming: every message, in order, each as it was sent (not all at the end).
    let count = &report["count"];
    assert_call_ok(count, &format!("{what}: Count"));
    let expected: Vec<String> = (0..COUNT).map(|i| i.to_string()).collect();
    assert_eq!(
        strings(&count["messages"]),
        expected,
        "{what}: Count's messages: {count}"
    );
    let arrivals: Vec<f64> = count["arrivals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let spread = arrivals[COUNT - 1] - arrivals[0];
    // The server spends (COUNT-1) x 100 ms between the first and the last: a proxy that held
    // the stream until its end would deliver them all at once.
    assert!(
        spread >= 0.5 * COUNT_DELAY * (COUNT - 1) as f64,
        "{what}: Count's messages arrived together ({spread:.3} s from first to last), \
         the stream was buffered: {count}"
    );

    // Bidi streaming in lock step: every message sent, every reply back, uppercased.
    let chat = &report["chat"];
    assert_call_ok(chat, &format!("{what}: Chat"));
    assert!(
        chat["stalled_before"].is_null(),
        "{what}: Chat's reply to message {} never came while the call was open: {chat}",
        chat["stalled_before"]
    );
    assert_eq!(strings(&chat["sent"]), CHAT, "{what}: Chat sent: {chat}");
    let upper: Vec<String> = CHAT.iter().map(|m| m.to_uppercase()).collect();
    assert_eq!(
        strings(&chat["replies"]),
        upper,
        "{what}: Chat's replies: {chat}"
    );
    assert_eq!(chat["interleaved"], true, "{what}: {chat}");

    // An error status, from the trailers (or a trailers-only response).
    let fail = &report["fail"];
    assert_eq!(fail["code"], "PERMISSION_DENIED", "{what}: Fail: {fail}");
    assert_eq!(fail["details"], "nope", "{what}: Fail: {fail}");
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn unary_streaming_bidi_and_errors_over_h2c() {
    let server = GrpcServer::start();
    let lbd = h2c_lbd(server.addr());
    let workers = the_worker(&lbd);

    let report = client(lbd.addr(), None, &[]);
    assert_eq!(report["tls"], false, "{report}");
    assert_all_calls(&report, "h2c");

    // A second channel (a new client connection), after the first one closed.
    let again = client(lbd.addr(), None, &["--calls", "echo,fail"]);
    let echo = &again["echo"];
    assert_call_ok(echo, "Echo on a second connection");
    assert_eq!(echo["trailing"]["x-trailer"], ECHO.len().to_string());
    assert_eq!(again["fail"]["code"], "PERMISSION_DENIED", "{again}");
    assert_eq!(lbd.workers(), workers, "the worker was replaced");
}

#[test]
fn unary_streaming_bidi_and_errors_over_tls_alpn_h2() {
    let dir = TempDir::new("grpc-tls");
    let cert = Cert::new(dir.path(), "grpc.test");
    let server = GrpcServer::start();
    let lbd = https_lbd(&cert, server.addr());
    let workers = the_worker(&lbd);

    // gRPC's TLS channel offers ALPN h2 only and refuses a connection that does not select
    // it: every call answered means kakehi spoke h2 over TLS.
    let report = client(lbd.addr(), Some((&cert, "grpc.test")), &[]);
    assert_eq!(report["tls"], true, "{report}");
    assert_all_calls(&report, "TLS h2");
    assert_eq!(lbd.workers(), workers, "the worker was replaced");
}

#[test]
fn two_hundred_concurrent_unary_calls_on_one_channel() {
    let server = GrpcServer::start();
    let lbd = h2c_lbd(server.addr());
    let workers = the_worker(&lbd);

    let n = 200;
    let report = client(lbd.addr(), None, &["--concurrent", &n.to_string()]);
    let c = &report["concurrent"];
    assert_eq!(c["n"], n, "{report}");
    assert_eq!(
        c["codes"],
        serde_json::json!({ "OK": n }),
        "not every call ended OK: {c}"
    );
    assert_eq!(
        c["ok"], n,
        "not every reply was its request reversed with its x-trailer: {c}"
    );
    assert!(c["bad"].as_array().unwrap().is_empty(), "{c}");
    assert_eq!(lbd.workers(), workers, "the worker was replaced");

    // And lbd serves the next channel.
    let after = client(lbd.addr(), None, &["--calls", "echo"]);
    assert_call_ok(&after["echo"], "Echo after the 200");
}

/// The connections from `lbd` to `backend` that are open now, as `ss` sees them.
fn established_to(backend: SocketAddr) -> usize {
    let mut ss = Command::new("ss");
    ss.args(["-Htn", "state", "established", "dst", &backend.to_string()]);
    let out = run_bounded(ss, Duration::from_secs(10), "ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// lbd with one http listener in front of `backend` (an `http2 = true` cluster), and its
/// Prometheus endpoint on `metrics`.
fn h2c_lbd_with_metrics(backend: SocketAddr, metrics: SocketAddr) -> Lbd {
    Lbd::start(move |l| {
        format!(
            "[metrics]\naddress = \"{metrics}\"\n\n\
             [[listeners]]\naddress = \"{l}\"\nprotocol = \"http\"\n\n\
             [clusters.grpc]\nhttp2 = true\n\
             frontends = [ {{ address = \"{l}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    })
}

/// New connections kakehi opened to `backend`, by its metrics.
fn connections_opened(metrics: SocketAddr, backend: SocketAddr) -> f64 {
    let m = scrape::scrape(metrics);
    let labels = [("cluster", "grpc"), ("backend", &*backend.to_string())];
    scrape::value(&m, "kakehi_backend_connections_total", &labels)
        .expect("no kakehi_backend_connections_total for the backend")
}

#[test]
fn calls_share_pooled_backend_connections() {
    let server = GrpcServer::start();
    let backend = server.addr();
    let metrics = free_addr();
    let lbd = h2c_lbd_with_metrics(backend, metrics);
    let workers = the_worker(&lbd);

    // 200 calls at once on one client channel, then channels one after another.
    let n = 200;
    let report = client(lbd.addr(), None, &["--concurrent", &n.to_string()]);
    assert_eq!(report["concurrent"]["ok"], n, "{report}");
    for round in 0..5 {
        let r = client(lbd.addr(), None, &["--calls", "echo,count,chat,fail"]);
        assert_call_ok(&r["echo"], &format!("Echo, round {round}"));
        assert_call_ok(&r["count"], &format!("Count, round {round}"));
        assert_call_ok(&r["chat"], &format!("Chat, round {round}"));
        assert_eq!(r["fail"]["code"], "PERMISSION_DENIED", "{r}");
    }

    // 20 calls of 300 KB each at once: both directions past the streams' 64 KiB windows,
    // interleaved on the shared connections, every byte back in its place.
    let big = client(
        lbd.addr(),
        None,
        &["--concurrent", "20", "--size", "300000"],
    );
    assert_eq!(big["concurrent"]["ok"], 20, "{big}");

    // 240 exchanges went to the server over a few HTTP/2 connections: one, and one more
    // per 100 streams opened before the server's SETTINGS said how many it takes.
    let opened = connections_opened(metrics, backend);
    eprintln!("240 gRPC calls opened {opened} connections to the backend");
    assert!(
        (1.0..=3.0).contains(&opened),
        "240 calls opened {opened} backend connections: they are not shared"
    );
    // The server sees them too, kept open for the next calls.
    let open = established_to(backend);
    assert!(
        open >= 1 && open as f64 <= opened,
        "{open} connections to the server are open, {opened} were opened"
    );
    assert_eq!(lbd.workers(), workers, "the worker was replaced");
}

#[test]
fn a_pooled_connection_the_backend_closed_is_not_reused() {
    let server = GrpcServer::start();
    let backend = server.addr();
    let metrics = free_addr();
    let lbd = h2c_lbd_with_metrics(backend, metrics);
    let workers = the_worker(&lbd);

    let r = client(lbd.addr(), None, &["--calls", "echo,echo_big"]);
    assert_call_ok(&r["echo"], "Echo");
    assert_eq!(r["echo_big"]["reversed_ok"], true, "{r}");
    assert!(wait_until(Duration::from_secs(5), || established_to(
        backend
    ) == 1));

    // The server goes and comes back on the same port: the idle connection kakehi pooled
    // was closed by the old one, and the first call after must not be sent on it.
    drop(server);
    assert!(
        wait_until(Duration::from_secs(5), || established_to(backend) == 0),
        "kakehi kept the closed connection to the server open"
    );
    let _again = GrpcServer::start_on(backend.port());
    let r = client(lbd.addr(), None, &["--calls", "echo,count,chat"]);
    assert_call_ok(&r["echo"], "Echo to the server restarted");
    assert_call_ok(&r["count"], "Count to the server restarted");
    assert_call_ok(&r["chat"], "Chat to the server restarted");
    assert_eq!(connections_opened(metrics, backend), 2.0);
    assert_eq!(lbd.workers(), workers, "the worker was replaced");
}

#[test]
fn access_log_says_h2_and_200_for_grpc_calls() {
    let server = GrpcServer::start();
    let backend = server.addr();
    let mut lbd = h2c_lbd(backend);

    let calls = ["echo", "count", "chat", "fail"];
    let report = client(lbd.addr(), None, &["--calls", &calls.join(",")]);
    assert_call_ok(&report["echo"], "Echo");
    assert_call_ok(&report["count"], "Count");
    assert_call_ok(&report["chat"], "Chat");
    assert_eq!(report["fail"]["code"], "PERMISSION_DENIED", "{report}");

    // Stopped first: every line flushed.
    assert!(lbd.shutdown().success(), "lbd did not exit cleanly");
    let out = lbd.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        calls.len(),
        "one access log line per gRPC call:\n{out}"
    );
    let mut paths = BTreeMap::new();
    for line in &lines {
        let f = parse_logfmt(line);
        let get = |k: &str| field(&f, k).unwrap_or("");
        assert_eq!(get("proto"), "h2", "{line}");
        // A gRPC status, even an error, travels in the trailers: `:status` is 200.
        assert_eq!(get("status"), "200", "{line}");
        assert_eq!(get("method"), "POST", "{line}");
        assert_eq!(get("cluster"), "grpc", "{line}");
        assert_eq!(get("backend"), backend.to_string(), "{line}");
        assert_eq!(get("error"), "", "{line}");
        assert!(!get("request_id").is_empty(), "{line}");
        *paths.entry(get("path").to_owned()).or_insert(0) += 1;
    }
    let expected: BTreeMap<String, i32> = [
        "/kakehi.Test/Echo",
        "/kakehi.Test/Count",
        "/kakehi.Test/Chat",
        "/kakehi.Test/Fail",
    ]
    .into_iter()
    .map(|p| (p.to_owned(), 1))
    .collect();
    assert_eq!(paths, expected, "the logged paths:\n{out}");
}
