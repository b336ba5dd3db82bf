//! The life of the `lbd` process: SIGTERM (and SIGINT) drain — a request in flight completes,
//! idle kept-alive connections are closed, new connections are refused — and the process exits
//! 0. In-flight requests are held either by the origin (`/sleep/1000`) or by the client (a body
//! announced but not yet sent), which needs no timer at all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::{digest_line, get, one_cluster, wait_until, Client, Lbd};
use lb_testkit::Origin;
use nix::sys::signal::Signal;

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let mut lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let front = lbd.addr();
    let in_flight = thread::spawn(move || get(front, "localhost", "/sleep/1000"));
    // In flight once the origin has recorded it (it records before sleeping).
    assert!(
        wait_until(Duration::from_secs(5), || origin.requests().len() == 1),
        "the slow request never reached the origin"
    );
    lbd.signal(Signal::SIGTERM);
    let resp = in_flight.join().unwrap();
    assert_eq!(resp.status, 200, "the in-flight request: {:?}", resp.text());
    assert_eq!(resp.text(), "slept 1000ms\n");
    let status = lbd.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "lbd did not exit within 10 s of SIGTERM");
    assert_eq!(status.unwrap().code(), Some(0), "exit status after SIGTERM");
}

/// Starts lbd and holds one request in flight from the client side (its body announced, half
/// sent), plus one idle kept-alive connection.
fn held_request() -> (Origin, Lbd, Client, Client) {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let mut idle = Client::connect(lbd.addr());
    assert_eq!(idle.get("localhost", "/idle").status, 200);
    // In flight once its first bytes reached the origin (on a new or a reused backend
    // connection).
    let before = origin.raw_bytes_received();
    let mut held = Client::connect(lbd.addr());
    held.send(b"POST /digest HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n\r\nabc");
    assert!(
        wait_until(Duration::from_secs(5), || origin.raw_bytes_received()
            > before),
        "the held request never reached the origin"
    );
    (origin, lbd, idle, held)
}

#[test]
fn drain_closes_idle_connections_and_finishes_the_held_request() {
    let (_origin, mut lbd, mut idle, mut held) = held_request();
    lbd.signal(Signal::SIGTERM);
    // The idle connection is closed while the held request keeps lbd alive.
    idle.assert_closed();
    assert!(
        lbd.wait_exit(Duration::ZERO).is_none(),
        "lbd exited with a request in flight"
    );
    // The held request completes, announcing the close.
    held.send(b"def");
    let resp = held.response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), digest_line(b"abcdef"));
    assert!(
        resp.closes(),
        "a response during drain announces the close: {:?}",
        resp.headers
    );
    held.assert_closed();
    let status = lbd.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit status after the drain"
    );
}

#[test]
fn drain_refuses_new_connections() {
    let (_origin, mut lbd, _idle, mut held) = held_request();
    lbd.signal(Signal::SIGTERM);
    // While the held request keeps lbd draining, a new connection must be refused, not left
    // in an accept queue that nobody serves any more.
    let front = lbd.addr();
    let refused = wait_until(Duration::from_secs(5), || {
        TcpStream::connect_timeout(&front, Duration::from_millis(200)).is_err()
    });
    let still_draining = lbd.wait_exit(Duration::ZERO).is_none();
    held.send(b"def");
    assert_eq!(held.response().status, 200);
    assert!(still_draining, "lbd exited with a request in flight");
    assert!(
        refused,
        "lbd still completes TCP handshakes on {front} 5 s into its drain"
    );
    let status = lbd.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[test]
fn sigint_exits_0() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let mut lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    assert_eq!(get(lbd.addr(), "localhost", "/").status, 200);
    lbd.signal(Signal::SIGINT);
    let status = lbd.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[test]
fn idle_lbd_stops_at_once_on_sigterm() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let status = lbd.stop();
    assert_eq!(status.code(), Some(0), "exit status: {status}");
}

/// A request longer than `timeouts.drain` is cut at the drain deadline: lbd exits then,
/// not when the request would have ended.
#[test]
fn a_request_longer_than_the_drain_timeout_is_cut_at_the_deadline() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let mut lbd = Lbd::start(|l| one_cluster("[timeouts]\ndrain = \"1s\"\n", l, &[addr]));
    let front = lbd.addr();
    let mut slow = common::Client::connect(front);
    slow.send(b"GET /sleep/8000 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(
        wait_until(Duration::from_secs(5), || origin.requests().len() == 1),
        "the slow request never reached the origin"
    );
    let signalled = std::time::Instant::now();
    lbd.signal(Signal::SIGTERM);
    let status = lbd.wait_exit(Duration::from_secs(6));
    let took = signalled.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "lbd exits 0");
    assert!(
        took < Duration::from_secs(6),
        "lbd took {took:?}: the 8 s request should be cut after the 1 s drain"
    );
    assert!(
        slow.try_response_to(false).is_err(),
        "the cut request gets no response"
    );
}
