//! The access log of a real `lbd`: one line per request, in logfmt on stdout by default and in
//! JSON to a file when configured, with the fields that tie a line to its request (request id,
//! client, listener, cluster, backend, method, host, path, status, byte counts, durations,
//! error); `target = "off"` writes nothing. `lbd` is stopped before its output is counted, so
//! every line has been flushed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;

use common::{field, parse_logfmt, Client, Lbd, Response};
use lb_testkit::Origin;

/// The fields of a line, in the order lbd writes them.
const FIELDS: [&str; 18] = [
    "time",
    "request_id",
    "client",
    "listener",
    "cluster",
    "backend",
    "method",
    "host",
    "path",
    "proto",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "backend_ms",
    "error",
    "client_subject",
    "client_fingerprint",
];

fn config(top: &str, l: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "{top}\n[[listeners]]\naddress = \"{l}\"\n\n[clusters.web]\n\
         frontends = [ {{ address = \"{l}\", hostname = \"localhost\" }} ]\n\
         backends = [ {{ address = \"{backend}\" }} ]\n"
    )
}

/// What the client did, to compare with the log: (response, method, host, path, client).
struct Sent {
    resp: Response,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    client: SocketAddr,
}

/// Four requests on one connection and one on another: 200s, an origin 503, a 404.
fn traffic(lbd: &Lbd) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut c = Client::connect(lbd.addr());
    let client = c.stream.local_addr().unwrap();
    let mut one = |c: &mut Client, method, host, path, raw: String| {
        c.send(raw.as_bytes());
        let resp = c.response();
        out.push(Sent {
            resp,
            method,
            host,
            path,
            client: c.stream.local_addr().unwrap(),
        });
    };
    one(
        &mut c,
        "GET",
        "localhost",
        "/a",
        "GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n".into(),
    );
    one(
        &mut c,
        "POST",
        "localhost",
        "/digest",
        "POST /digest HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello".into(),
    );
    one(
        &mut c,
        "GET",
        "localhost",
        "/q?a=b&c=\"d\"",
        "GET /q?a=b&c=\"d\" HTTP/1.1\r\nHost: localhost\r\n\r\n".into(),
    );
    one(
        &mut c,
        "GET",
        "localhost",
        "/status/503",
        "GET /status/503 HTTP/1.1\r\nHost: localhost:1234\r\n\r\n".into(),
    );
    let mut c2 = Client::connect(lbd.addr());
    one(
        &mut c2,
        "GET",
        "nowhere.test",
        "/missing",
        "GET /missing HTTP/1.1\r\nHost: nowhere.test\r\n\r\n".into(),
    );
    assert_eq!(out[0].client, client);
    out
}

/// Checks one request's fields (as strings) against what the client sent and got.
fn check_fields(get: &dyn Fn(&str) -> Option<String>, sent: &Sent, lbd: &Lbd, backend: SocketAddr) {
    let want_id = sent.resp.header("x-request-id").expect("X-Request-Id");
    assert_eq!(get("request_id").as_deref(), Some(want_id));
    assert_eq!(get("method").as_deref(), Some(sent.method));
    assert_eq!(get("path").as_deref(), Some(sent.path));
    assert_eq!(
        get("host").as_deref(),
        Some(sent.host),
        "host without port, lower-case"
    );
    assert_eq!(
        get("status").as_deref(),
        Some(sent.resp.status.to_string().as_str())
    );
    assert_eq!(get("client"), Some(sent.client.to_string()));
    assert_eq!(get("listener"), Some(lbd.addr().to_string()));
    let bytes_in: u64 = get("bytes_in").unwrap().parse().unwrap();
    let bytes_out: u64 = get("bytes_out").unwrap().parse().unwrap();
    assert!(bytes_in > 0, "bytes_in {bytes_in}");
    assert!(
        bytes_out >= sent.resp.body.len() as u64,
        "bytes_out {bytes_out} < body {}",
        sent.resp.body.len()
    );
    let duration: f64 = get("duration_ms").unwrap().parse().unwrap();
    assert!(duration >= 0.0);
    if sent.resp.status == 404 {
        assert_eq!(get("cluster").as_deref().unwrap_or(""), "");
        assert_eq!(get("backend").as_deref().unwrap_or(""), "");
        assert!(
            !get("error").unwrap_or_default().is_empty(),
            "a 404 from kakehi says why in error"
        );
    } else {
        assert_eq!(get("cluster").as_deref(), Some("web"));
        assert_eq!(get("backend"), Some(backend.to_string()));
        assert_eq!(get("error").as_deref().unwrap_or(""), "");
        let backend_ms: f64 = get("backend_ms").unwrap().parse().unwrap();
        assert!(backend_ms >= 0.0 && backend_ms <= duration + 0.001);
    }
}

#[test]
fn logfmt_on_stdout_one_line_per_request() {
    let origin = Origin::start("o");
    let backend = origin.addr();
    let mut lbd = Lbd::start(|l| config("", l, backend));
    let sent = traffic(&lbd);
    assert!(lbd.shutdown().success());
    let out = lbd.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), sent.len(), "one line per request:\n{out}");
    for line in &lines {
        let fields = parse_logfmt(line);
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, FIELDS, "fields of {line:?}");
    }
    for s in &sent {
        let id = s.resp.header("x-request-id").unwrap();
        let line = lines
            .iter()
            .find(|l| field(&parse_logfmt(l), "request_id") == Some(id))
            .unwrap_or_else(|| panic!("no log line for request id {id}:\n{out}"));
        let fields = parse_logfmt(line);
        check_fields(&|k| field(&fields, k).map(str::to_owned), s, &lbd, backend);
    }
}

#[test]
fn json_to_a_file() {
    let origin = Origin::start("o");
    let backend = origin.addr();
    let log_dir = common::TempDir::new("log");
    let log_path = log_dir.path().join("access.json");
    let log_text = log_path.display().to_string();
    let mut lbd = Lbd::start(|l| {
        config(
            &format!("[access_log]\nformat = \"json\"\ntarget = \"{log_text}\"\n"),
            l,
            backend,
        )
    });
    let sent = traffic(&lbd);
    assert!(lbd.shutdown().success());
    assert_eq!(
        lbd.stdout(),
        "",
        "with a file target nothing goes to stdout"
    );
    let text = std::fs::read_to_string(&log_path).expect("the access log file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert_eq!(lines.len(), sent.len(), "one line per request:\n{text}");
    for v in &lines {
        let obj = v.as_object().expect("a JSON object per line");
        for k in FIELDS {
            assert!(obj.contains_key(k), "missing {k} in {v}");
        }
        assert!(v["status"].is_u64(), "status is a number: {v}");
        assert!(v["bytes_in"].is_u64() && v["bytes_out"].is_u64(), "{v}");
        assert!(v["duration_ms"].is_number(), "{v}");
    }
    for s in &sent {
        let id = s.resp.header("x-request-id").unwrap();
        let v = lines
            .iter()
            .find(|v| v["request_id"] == id)
            .unwrap_or_else(|| panic!("no log line for request id {id}:\n{text}"));
        check_fields(
            &|k| match &v[k] {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            },
            s,
            &lbd,
            backend,
        );
    }
}

#[test]
fn off_writes_nothing() {
    let origin = Origin::start("o");
    let backend = origin.addr();
    let mut lbd = Lbd::start(|l| config("[access_log]\ntarget = \"off\"\n", l, backend));
    let sent = traffic(&lbd);
    assert_eq!(sent.len(), 5);
    assert!(lbd.shutdown().success());
    assert_eq!(lbd.stdout(), "");
}

#[test]
fn hostile_values_cannot_forge_fields() {
    let origin = Origin::start("o");
    let backend = origin.addr();
    let mut lbd = Lbd::start(|l| config("", l, backend));
    let mut c = Client::connect(lbd.addr());
    // A path carrying a fake field and quotes: it must stay inside the path value.
    c.send(b"GET /x%20status=999\"error=forged HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let resp = c.response();
    assert!(lbd.shutdown().success());
    let out = lbd.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let fields = parse_logfmt(lines[0]);
    assert_eq!(
        field(&fields, "status"),
        Some(resp.status.to_string().as_str()),
        "{:?}",
        lines[0]
    );
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, FIELDS, "{:?}", lines[0]);
}
