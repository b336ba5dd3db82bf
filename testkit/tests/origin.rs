//! End-to-end tests of the test origin: start an [`Origin`] and talk raw
//! HTTP/1.1 to it over `std::net::TcpStream`.

// Test code: helpers outside `#[test]` fns may panic too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use lb_testkit::{fnv1a64, Origin};

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(o: &Origin) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(o.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn read_line(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line.trim_end_matches(['\r', '\n']).to_owned()
}

/// Reads a status line and headers.
fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let status_line = read_line(r);
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let line = read_line(r);
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').unwrap();
        headers.push((n.to_owned(), v.trim().to_owned()));
    }
    (status, headers)
}

fn read_response(r: &mut impl BufRead) -> Response {
    let (status, headers) = read_head(r);
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(len) = resp.header("content-length") {
        let mut body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut body).unwrap();
        resp.body = body;
    } else if resp.header("transfer-encoding") == Some("chunked") {
        loop {
            let size = usize::from_str_radix(&read_line(r), 16).unwrap();
            if size == 0 {
                assert_eq!(read_line(r), "");
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            r.read_exact(&mut resp.body[start..]).unwrap();
            assert_eq!(read_line(r), "");
        }
    } else if status >= 200 && status != 204 && status != 304 {
        r.read_to_end(&mut resp.body).unwrap();
    }
    resp
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn keep_alive_two_requests_on_one_connection() {
    let o = Origin::start("alpha");
    let (mut s, mut r) = connect(&o);
    let first: &[u8] = b"GET /first?x=1 HTTP/1.1\r\nHost: a\r\n\r\n";
    let second: &[u8] = b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
    s.write_all(first).unwrap();
    let a = read_response(&mut r);
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-origin"), Some("alpha"));
    assert_eq!(a.body, b"origin alpha: GET /first?x=1\n");
    s.write_all(second).unwrap();
    let b = read_response(&mut r);
    assert_eq!(b.status, 200);
    assert_eq!(b.body, b"ok");
    assert_eq!(b.header("connection"), None);

    let reqs = o.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(o.connections_accepted(), 1);
    assert_eq!((reqs[0].conn_id, reqs[1].conn_id), (0, 0));
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].target, "/first?x=1");
    assert_eq!(reqs[0].version, "HTTP/1.1");
    assert_eq!(reqs[0].header("host"), Some("a"));
    assert_eq!(reqs[1].target, "/health");
    assert_eq!(o.raw_bytes_received(), first.len() + second.len());
}

#[test]
fn pipelined_requests_and_connection_close() {
    let o = Origin::start("p");
    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r).body, b"origin p: GET /a\n");
    let b = read_response(&mut r);
    assert_eq!(b.body, b"origin p: GET /b\n");
    assert_eq!(b.header("connection"), Some("close"));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn http10_closes_unless_keep_alive() {
    let o = Origin::start("old");
    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let a = read_response(&mut r);
    assert_eq!(a.header("connection"), Some("keep-alive"));
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let b = read_response(&mut r);
    assert_eq!(b.header("connection"), Some("close"));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn chunked_request_to_digest() {
    let o = Origin::start("d");
    let (mut s, mut r) = connect(&o);
    let body = pattern(20_000);
    let mut req =
        b"POST /digest HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(3000) {
        req.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    s.write_all(&req).unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.status, 200);
    let want = format!("len=20000 fnv={:016x}\n", fnv1a64(&body));
    assert_eq!(String::from_utf8(resp.body).unwrap(), want);
    let reqs = o.requests();
    assert_eq!(reqs[0].body_len, 20_000);
    assert_eq!(reqs[0].body_sha, fnv1a64(&body));
    assert_eq!(o.raw_bytes_received(), req.len());

    // The connection is still usable.
    s.write_all(b"POST /digest HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    let resp = read_response(&mut r);
    let want = format!("len=3 fnv={:016x}\n", fnv1a64(b"abc"));
    assert_eq!(String::from_utf8(resp.body).unwrap(), want);
}

#[test]
fn bytes_and_chunked_lengths() {
    let o = Origin::start("b");
    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET /bytes/100000 HTTP/1.1\r\n\r\n").unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.header("content-length"), Some("100000"));
    assert_eq!(resp.body.len(), 100_000);
    assert_eq!(resp.body, pattern(100_000));

    s.write_all(b"GET /chunked/70000 HTTP/1.1\r\n\r\n").unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.body, pattern(70_000));

    s.write_all(b"GET /bytes/0 HTTP/1.1\r\n\r\n").unwrap();
    assert!(read_response(&mut r).body.is_empty());
}

#[test]
fn websocket_upgrade_echoes_raw_bytes() {
    let o = Origin::start("ws");
    let (mut s, mut r) = connect(&o);
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: ws\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly",
    )
    .unwrap();
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 101);
    assert!(headers.contains(&("Upgrade".into(), "websocket".into())));
    assert!(headers.contains(&("Connection".into(), "Upgrade".into())));
    let mut got = [0u8; 5];
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early");
    s.write_all(b"hello, world").unwrap();
    let mut got = [0u8; 12];
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello, world");
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(o.requests()[0].target, "/ws");

    // Without the upgrade header: no switch.
    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).status, 426);
}

#[test]
fn expect_100_continue_then_echo() {
    let o = Origin::start("e");
    let (mut s, mut r) = connect(&o);
    s.write_all(
        b"PUT /echo HTTP/1.1\r\nHost: e\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_line(&mut r), "HTTP/1.1 100 Continue");
    assert_eq!(read_line(&mut r), "");
    s.write_all(b"hello there").unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("11"));
    assert_eq!(resp.body, b"hello there");
    let reqs = o.requests();
    assert_eq!(reqs[0].body_len, 11);
    assert_eq!(reqs[0].body_sha, fnv1a64(b"hello there"));
}

#[test]
fn chunked_echo_streams_piece_by_piece() {
    let o = Origin::start("ce");
    let (mut s, mut r) = connect(&o);
    s.write_all(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .unwrap();
    // The first piece comes back before the request body is complete.
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200);
    assert!(headers.contains(&("Transfer-Encoding".into(), "chunked".into())));
    assert_eq!(read_line(&mut r), "5");
    assert_eq!(read_line(&mut r), "hello");
    s.write_all(b"6\r\n world\r\n0\r\n\r\n").unwrap();
    assert_eq!(read_line(&mut r), "6");
    assert_eq!(read_line(&mut r), " world");
    assert_eq!(read_line(&mut r), "0");
    assert_eq!(read_line(&mut r), "");
    assert_eq!(o.requests()[0].body_len, 11);
}

#[test]
fn headers_status_close_and_bad_request() {
    let o = Origin::start("h");
    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: h\r\nX-One: 1\r\nx-two:  two \r\n\r\n")
        .unwrap();
    assert_eq!(
        read_response(&mut r).body,
        b"Host: h\nX-One: 1\nx-two: two\n"
    );
    s.write_all(b"GET /status/503 HTTP/1.1\r\n\r\n").unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("x-origin"), Some("h"));
    s.write_all(b"GET /status/204 HTTP/1.1\r\n\r\n").unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.status, 204);
    assert!(resp.body.is_empty());
    s.write_all(b"GET /sleep/20 HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r).status, 200);
    s.write_all(b"GET /close HTTP/1.1\r\n\r\n").unwrap();
    let resp = read_response(&mut r);
    assert_eq!(resp.header("connection"), Some("close"));
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r).status, 400);
}

#[test]
fn stop_closes_connections_and_listener() {
    let o = Origin::start("s");
    let addr = o.addr();
    let (mut s, mut r) = connect(&o);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    read_response(&mut r);
    o.stop();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(TcpStream::connect(addr).is_err());
}
