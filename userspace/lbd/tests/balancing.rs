//! Load balancing end to end: how a real `lbd` spreads requests over two or three test
//! origins under each policy — weighted round-robin (exact counts), weighted random (wide
//! statistical bounds), least-connections (a slow request keeps new ones off its backend),
//! power of two choices (every backend gets a fair share) — and that a backup backend only
//! serves while the primary is down. Each request goes on a fresh client connection, so the
//! counts do not depend on whether balancing happens per request or per connection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::{get, wait_until, Client, Lbd};
use lb_testkit::Origin;

/// One cluster `pool` behind the listener; `backends` is the TOML array.
fn config(listener: SocketAddr, policy: &str, backends: &str) -> String {
    format!(
        "[[listeners]]\naddress = \"{listener}\"\n\n[clusters.pool]\n\
         load_balancing = \"{policy}\"\n\
         frontends = [ {{ address = \"{listener}\" }} ]\nbackends = {backends}\n"
    )
}

/// Sends `n` GETs, each on its own connection, all answered 200.
fn send(lbd: &Lbd, n: usize) {
    for i in 0..n {
        let resp = get(lbd.addr(), "localhost", &format!("/r{i}"));
        assert_eq!(resp.status, 200, "request {i}: {:?}", resp.text());
    }
}

fn counts(origins: &[&Origin]) -> Vec<usize> {
    origins.iter().map(|o| o.requests().len()).collect()
}

#[test]
fn round_robin_weights_1_2_exact() {
    let (a, b) = (Origin::start("a"), Origin::start("b"));
    let lbd = Lbd::start(|l| {
        config(
            l,
            "round-robin",
            &format!(
                "[ {{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 2 }} ]",
                a.addr(),
                b.addr()
            ),
        )
    });
    send(&lbd, 300);
    assert_eq!(counts(&[&a, &b]), [100, 200]);
}

#[test]
fn round_robin_equal_weights_alternate() {
    let origins: Vec<Origin> = ["a", "b", "c"].map(Origin::start).into();
    let addrs: Vec<SocketAddr> = origins.iter().map(Origin::addr).collect();
    let lbd = Lbd::start(|l| config(l, "round-robin", &common::backends(&addrs)));
    send(&lbd, 30);
    assert_eq!(counts(&origins.iter().collect::<Vec<_>>()), [10, 10, 10]);
}

#[test]
fn random_weights_1_3() {
    let (a, b) = (Origin::start("a"), Origin::start("b"));
    let lbd = Lbd::start(|l| {
        config(
            l,
            "random",
            &format!(
                "[ {{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 3 }} ]",
                a.addr(),
                b.addr()
            ),
        )
    });
    send(&lbd, 400);
    let c = counts(&[&a, &b]);
    assert_eq!(c[0] + c[1], 400);
    // Expected 100 / 300; the standard deviation is about 8.7, so ±40 is over 4.5 sigma.
    assert!(
        (60..=140).contains(&c[0]),
        "random 1:3 over 400 requests gave {c:?}, expected about [100, 300]"
    );
}

#[test]
fn least_connections_avoids_the_busy_backend() {
    let (a, b) = (Origin::start("a"), Origin::start("b"));
    let lbd = Lbd::start(|l| {
        config(
            l,
            "least-connections",
            &common::backends(&[a.addr(), b.addr()]),
        )
    });
    let addr = lbd.addr();
    let slow = thread::spawn(move || get(addr, "localhost", "/sleep/2000"));
    // The slow request is in flight once an origin has recorded it (before it sleeps).
    assert!(
        wait_until(Duration::from_secs(5), || a.requests().len()
            + b.requests().len()
            == 1),
        "the slow request never reached an origin"
    );
    let (busy, idle) = if a.requests().len() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    for i in 0..10 {
        let resp = get(addr, "localhost", &format!("/quick{i}"));
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("x-origin"),
            Some(idle.name()),
            "request {i} went to the busy backend {}",
            busy.name()
        );
    }
    assert_eq!(busy.requests().len(), 1, "only the slow request");
    assert_eq!(idle.requests().len(), 10);
    let slow = slow.join().unwrap();
    assert_eq!(slow.status, 200);
    assert_eq!(slow.text(), "slept 2000ms\n");
}

#[test]
fn power_of_two_spreads_the_load() {
    let origins: Vec<Origin> = ["a", "b", "c"].map(Origin::start).into();
    let addrs: Vec<SocketAddr> = origins.iter().map(Origin::addr).collect();
    let lbd = Lbd::start(|l| config(l, "power-of-two", &common::backends(&addrs)));
    send(&lbd, 300);
    let c = counts(&origins.iter().collect::<Vec<_>>());
    assert_eq!(c.iter().sum::<usize>(), 300);
    // Expected about 100 each (sigma about 8): 60 is five sigma below.
    for (i, n) in c.iter().enumerate() {
        assert!(
            *n >= 60,
            "power-of-two over 300 requests gave {c:?}: backend {i} starved"
        );
    }
}

#[test]
fn power_of_two_prefers_the_less_loaded() {
    let (a, b) = (Origin::start("a"), Origin::start("b"));
    let lbd = Lbd::start(|l| config(l, "power-of-two", &common::backends(&[a.addr(), b.addr()])));
    // Hold one request in flight without a timer: its body is announced but not sent yet. The
    // backend it went to is the one that accepted a connection.
    let mut held = Client::connect(lbd.addr());
    held.send(b"POST /digest HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nab");
    assert!(
        wait_until(Duration::from_secs(5), || a.connections_accepted()
            + b.connections_accepted()
            == 1),
        "the held request never reached an origin"
    );
    let (busy, idle) = if a.connections_accepted() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    // Two picks either differ (the idle backend wins) or land on the same backend (either):
    // the idle one should get about 3/4 of the requests.
    for i in 0..100 {
        assert_eq!(get(lbd.addr(), "localhost", &format!("/q{i}")).status, 200);
    }
    let to_busy = busy.requests().len();
    let to_idle = idle.requests().len();
    assert_eq!(to_busy + to_idle, 100);
    // Expected 75 (sigma about 4.3); 55 is over four sigma below.
    assert!(
        to_idle > 55,
        "power-of-two sent {to_busy} of 100 requests to the busy backend ({to_idle} to the idle one)"
    );
    held.send(b"cd");
    let resp = held.response();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), common::digest_line(b"abcd"));
}

#[test]
fn backup_only_when_primary_down() {
    let primary = Origin::start("primary");
    let backup = Origin::start("backup");
    let primary_addr = primary.addr();
    let lbd = Lbd::start(|l| {
        config(
            l,
            "round-robin",
            &format!(
                "[ {{ address = \"{primary_addr}\" }}, {{ address = \"{}\", backup = true }} ]",
                backup.addr()
            ),
        )
    });
    // Primary up: the backup sees nothing, on fresh and on kept-alive connections.
    send(&lbd, 20);
    let mut c = Client::connect(lbd.addr());
    for i in 0..10 {
        let resp = c.get("localhost", &format!("/ka{i}"));
        assert_eq!(resp.header("x-origin"), Some("primary"));
    }
    assert_eq!(primary.requests().len(), 30);
    assert!(
        backup.requests().is_empty(),
        "the backup served while the primary was up"
    );

    // Primary down (its port now refuses connections): everything goes to the backup.
    primary.stop();
    for i in 0..20 {
        let resp = get(lbd.addr(), "localhost", &format!("/down{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i} with the primary down: {} {:?}",
            resp.status,
            resp.text()
        );
        assert_eq!(resp.header("x-origin"), Some("backup"));
    }
    assert_eq!(backup.requests().len(), 20);

    // Primary back on the same address: traffic returns to it.
    let primary = Origin::start_on("primary", primary_addr).expect("rebind the primary");
    for i in 0..10 {
        let resp = get(lbd.addr(), "localhost", &format!("/back{i}"));
        assert_eq!(resp.status, 200);
    }
    assert_eq!(
        primary.requests().len(),
        10,
        "the primary came back but requests still went to the backup"
    );
    assert_eq!(backup.requests().len(), 20);
}
