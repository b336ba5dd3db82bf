//! Backends that cannot be reached, through a real `lbd`: a cluster whose only backend refuses
//! connections gets kakehi's own 5xx with an HTML body, a cluster with one live and one dead
//! backend serves every request (the failed connect is retried on the other), a cluster with
//! every backend down answers 5xx on every request, and a backend that dies between requests
//! (its idle kept-alive connections now closed) does not cost the client a failed request.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{get, one_cluster, Client, ClosedPort, Lbd};
use lb_testkit::Origin;

#[test]
fn only_backend_down_is_5xx_with_html() {
    let dead = ClosedPort::new();
    let addr = dead.addr;
    let lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let resp = get(lbd.addr(), "localhost", "/");
    resp.assert_html_answer(&[502, 503]);
    assert!(resp.header("x-request-id").is_some_and(|v| !v.is_empty()));
    // And again on a kept-alive connection, if the answer allows it.
    let mut c = Client::connect(lbd.addr());
    for _ in 0..3 {
        let resp = c.get("localhost", "/again");
        resp.assert_html_answer(&[502, 503]);
        if resp.closes() {
            c.assert_closed();
            break;
        }
    }
}

#[test]
fn one_of_two_backends_down_every_request_succeeds() {
    let dead = ClosedPort::new();
    let live = Origin::start("live");
    let addrs = [dead.addr, live.addr()];
    let lbd = Lbd::start(|l| one_cluster("", l, &addrs));
    for i in 0..20 {
        let resp = get(lbd.addr(), "localhost", &format!("/r{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i}: {} {:?}",
            resp.status,
            resp.text()
        );
    }
    // A request with a body is retried too (nothing of it reached the dead backend).
    let mut c = Client::connect(lbd.addr());
    for i in 0..4 {
        c.send(
            format!("POST /digest HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nx{i:02}")
                .as_bytes(),
        );
        let resp = c.response();
        assert_eq!(resp.status, 200, "POST {i}: {:?}", resp.text());
        assert_eq!(
            resp.text(),
            common::digest_line(format!("x{i:02}").as_bytes())
        );
    }
    assert_eq!(live.requests().len(), 24);
}

#[test]
fn all_backends_down_is_5xx() {
    let (d1, d2, d3) = (ClosedPort::new(), ClosedPort::new(), ClosedPort::new());
    let addrs = [d1.addr, d2.addr, d3.addr];
    let lbd = Lbd::start(|l| one_cluster("", l, &addrs));
    for i in 0..5 {
        let resp = get(lbd.addr(), "localhost", &format!("/r{i}"));
        resp.assert_html_answer(&[502, 503]);
    }
}

#[test]
fn backend_dying_between_requests_is_retried() {
    let a = Origin::start("a");
    let b = Origin::start("b");
    let addrs = [a.addr(), b.addr()];
    let lbd = Lbd::start(|l| one_cluster("", l, &addrs));
    // Warm up: both backends now have idle kept-alive connections in the proxy's pool.
    for i in 0..10 {
        assert_eq!(
            get(lbd.addr(), "localhost", &format!("/warm{i}")).status,
            200
        );
    }
    assert_eq!(a.requests().len(), 5);
    // `a` goes away: its pooled connections are closed and its port refuses.
    a.stop();
    for i in 0..10 {
        let resp = get(lbd.addr(), "localhost", &format!("/after{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i} after a backend died: {} {:?}",
            resp.status,
            resp.text()
        );
        assert_eq!(resp.header("x-origin"), Some("b"));
    }
    assert_eq!(b.requests().len(), 15);
}

/// A backend whose response head does not fit in `buffer_size` gets a 502 at once, not
/// after the backend timeout.
#[test]
fn a_response_head_larger_than_the_buffer_is_a_prompt_502() {
    use std::io::{Read, Write};
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin_addr = origin.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = origin.accept().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut request = [0u8; 4096];
        let _ = conn.read(&mut request);
        let mut head = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 20_000));
        head.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        let _ = conn.write_all(&head);
        // Hold the connection open: only the proxy's own check can end the exchange.
        std::thread::sleep(std::time::Duration::from_secs(3));
    });
    let lbd = Lbd::start(|l| {
        one_cluster(
            "buffer_size = 4096\n[timeouts]\nback_idle = \"30s\"\n",
            l,
            &[origin_addr],
        )
    });
    let mut c = Client::connect(lbd.addr());
    c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let resp = c.response();
    assert_eq!(resp.status, 502, "{:?}", resp.text());
    server.join().unwrap();
    // The origin still held its connection open when the 502 was sent: the reason is the
    // head's size, not the origin closing or the 30 s timeout.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut log = lbd.stdout();
    while !log.contains("response head larger than the buffer")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        log = lbd.stdout();
    }
    assert!(
        log.contains("error=\"response head larger than the buffer\""),
        "{log}"
    );
}

/// A backend that closes its kept-alive connection while the client is idle between two
/// requests on one connection: the client's next request is still answered, on a new backend
/// connection (kakehi keeps the backend connection for this client and, having seen it close,
/// does not reuse it).
#[test]
fn a_kept_backend_connection_closed_while_the_client_idles_is_replaced() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
    // Answers one request per connection (keep-alive in words), then closes it 100 ms later
    // and says so.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                std::thread::sleep(std::time::Duration::from_millis(100));
                drop(reader);
                drop(conn);
                let _ = closed_tx.send(());
            });
        }
    });
    let lbd = Lbd::start(|l| one_cluster("", l, &[backend]));
    let mut c = Client::connect(lbd.addr());
    for i in 0..3 {
        let resp = c.get("localhost", &format!("/r{i}"));
        assert_eq!(resp.status, 200, "request {i}: {:?}", resp.text());
        assert!(!resp.closes());
        // The next request only once the backend has closed the connection kakehi keeps
        // (its FIN is then queued for kakehi's worker before the request is).
        closed
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the backend closes its connection");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "one backend connection per request"
    );
}

/// A chunked body whose trailer line is longer than the whole buffer can never be parsed:
/// the request gets a 400 at once (not at the request timeout), and a response a close right
/// after what was already sent (not at the backend timeout).
#[test]
fn a_body_line_longer_than_the_buffer_is_answered_at_once() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    let long = "a".repeat(40_000);
    // Request side (to /digest, which answers only after the whole body: nothing of a
    // response can start before kakehi's own 400).
    let origin = Origin::start("o");
    let addr = origin.addr();
    let top = "[timeouts]\nrequest_header = \"60s\"\nfront_idle = \"60s\"\nback_idle = \"60s\"\n";
    let lbd = Lbd::start(|l| one_cluster(top, l, &[addr]));
    let mut c = Client::connect(lbd.addr());
    c.send(
        format!(
            "POST /digest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\nX-Long: {long}\r\n\r\n"
        )
        .as_bytes(),
    );
    let resp = c.response();
    assert_eq!(resp.status, 400, "{:?}", resp.text());
    drop(lbd);

    // Response side: a backend whose chunked response ends in an endless trailer line.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let body = long.clone();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let _ = conn.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Long: {body}"
            )
            .as_bytes(),
        );
        // Keep the connection open: only kakehi's own check can end this response.
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    let lbd = Lbd::start(|l| one_cluster(top, l, &[backend]));
    let mut c = Client::connect(lbd.addr());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.head();
    assert_eq!(head.status, 200);
    let mut rest = Vec::new();
    // The client's read timeout (10 s) is far below the 60 s timeouts: EOF must come first.
    let _ = c
        .reader
        .read_to_end(&mut rest)
        .expect("closed by kakehi, not timed out");
    assert!(String::from_utf8_lossy(&rest).contains("hello"));
}
