//! Timeouts through a real `lbd`, configured short (hundreds of milliseconds) so the tests stay
//! quick: a request head that never completes gets 408 and a close (`request_header`), an idle
//! client connection is closed (`front_idle`), a backend that accepts but never answers gets
//! 504 (`back_idle`), and a backend whose connect hangs is given up on (`connect`). Every wait
//! is bounded by the client sockets' read timeouts; no test asserts how long anything took.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{one_cluster, BlackHole, Client, Lbd};
use lb_testkit::Origin;

const SHORT: &str = "[timeouts]\nconnect = \"500ms\"\nrequest_header = \"500ms\"\n\
                     front_idle = \"1s\"\nback_idle = \"500ms\"\n";

#[test]
fn slow_request_header_gets_408_and_close() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &[addr]));
    let mut c = Client::connect(lbd.addr());
    // Half a request head, then nothing.
    c.send(b"GET /slow HTTP/1.1\r\nHost: loc");
    let resp = c.response();
    resp.assert_html_answer(&[408]);
    c.assert_closed();
    assert!(origin.requests().is_empty());
    assert_eq!(origin.raw_bytes_received(), 0);
}

#[test]
fn request_header_timeout_is_not_reset_by_trickling_bytes() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &[addr]));
    let mut c = Client::connect(lbd.addr());
    c.send(b"GET /slowloris HTTP/1.1\r\n");
    // One header line every 100 ms: the head is never complete, and the 500 ms deadline
    // counts from its first byte, so a 408 must come although bytes keep arriving.
    let writer = c.stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        let mut w = writer;
        for i in 0..50 {
            use std::io::Write;
            if w.write_all(format!("X-Drip-{i}: x\r\n").as_bytes())
                .is_err()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let resp = c.response();
    resp.assert_html_answer(&[408]);
    c.read_to_close();
    trickle.join().unwrap();
    assert!(origin.requests().is_empty());
}

#[test]
fn idle_client_connection_is_closed() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &[addr]));
    // After one request, then nothing: closed after front_idle (1 s).
    let mut c = Client::connect(lbd.addr());
    assert_eq!(c.get("localhost", "/one").status, 200);
    let rest = c.read_to_close();
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"),
        "an idle connection may get a 408 or nothing before the close, got {:?}",
        String::from_utf8_lossy(&rest)
    );
    // A connection that never sends a byte is closed too.
    let mut c = Client::connect(lbd.addr());
    let rest = c.read_to_close();
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"),
        "got {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[test]
fn backend_that_never_answers_gets_504() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &[addr]));
    let mut c = Client::connect(lbd.addr());
    c.send(b"GET /sleep/5000 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let resp = c.response();
    resp.assert_html_answer(&[504]);
    assert_eq!(
        origin.requests().len(),
        1,
        "the request did reach the origin"
    );
    // The proxy gave up on this exchange; the answer says whether the connection goes on.
    if resp.closes() {
        c.assert_closed();
    } else {
        assert_eq!(c.get("localhost", "/next").status, 200);
    }
}

#[test]
fn slow_but_steady_response_is_not_cut() {
    // back_idle is about silence, not total time: /sleep/300 stays under it.
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &[addr]));
    let mut c = Client::connect(lbd.addr());
    for _ in 0..3 {
        let resp = c.get("localhost", "/sleep/300");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "slept 300ms\n");
    }
}

#[test]
fn connect_that_hangs_is_given_up() {
    let hole = BlackHole::new();
    let addr = hole.addr;
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &[addr]));
    let resp = common::get(lbd.addr(), "localhost", "/");
    resp.assert_html_answer(&[502, 503, 504]);
}

#[test]
fn connect_that_hangs_falls_over_to_a_live_backend() {
    let hole = BlackHole::new();
    let origin = Origin::start("o");
    let addrs = [hole.addr, origin.addr()];
    let lbd = Lbd::start(|l| one_cluster(SHORT, l, &addrs));
    // Round-robin alternates: half of the requests first try the black hole.
    for i in 0..4 {
        let resp = common::get(lbd.addr(), "localhost", &format!("/r{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i}: {} {:?}",
            resp.status,
            resp.text()
        );
    }
    assert_eq!(origin.requests().len(), 4);
}
