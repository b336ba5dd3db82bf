//! `load_balancing = "maglev"` through two real `lbd` processes with the same backend list, as
//! two appliances behind one router would be: clients bound to 40 loopback addresses
//! (127.0.0.2 to 127.0.0.41), over HTTP and TCP passthrough, and with `hash_key =
//! "header:x-user"`. Each key reaches the same backend through either lbd, every time; a
//! backend removed from one lbd moves its own keys and (nearly) no other. The table's balance
//! and disruption are measured in lb-proxy's `maglev.rs` unit tests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::{lbctl_ok, Lbd};
use lb_testkit::Origin;
use socket2::{Domain, Socket, Type};

const SOURCES: u8 = 40;

/// The origin that answered a GET sent from `from` to `to` (`extra`: more header lines).
fn served_by(from: IpAddr, to: SocketAddr, extra: &str) -> String {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    socket
        .connect_timeout(&to.into(), Duration::from_secs(3))
        .unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("origin "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no origin in the answer from {to}:\n{text}"))
        .to_owned()
}

fn source(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i))
}

fn start(backends: &str) -> Lbd {
    let backends = backends.to_owned();
    Lbd::start_multi(3, move |l| {
        format!(
            "[[listeners]]\naddress = \"{}\"\n\n[[listeners]]\naddress = \"{}\"\n\n\
             [[listeners]]\naddress = \"{}\"\nprotocol = \"tcp\"\n\n\
             [clusters.by_ip]\nload_balancing = \"maglev\"\n\
             frontends = [ {{ address = \"{}\" }} ]\nbackends = [ {backends} ]\n\n\
             [clusters.by_user]\nload_balancing = \"maglev\"\nhash_key = \"header:X-User\"\n\
             frontends = [ {{ address = \"{}\" }} ]\nbackends = [ {backends} ]\n\n\
             [clusters.tcp]\nprotocol = \"tcp\"\nload_balancing = \"maglev\"\n\
             frontends = [ {{ address = \"{}\" }} ]\nbackends = [ {backends} ]\n",
            l[0], l[1], l[2], l[0], l[1], l[2]
        )
    })
}

#[test]
fn two_lbds_send_each_key_to_the_same_backend() {
    let origins: Vec<Origin> = (0..5).map(|i| Origin::start(&format!("o{i}"))).collect();
    let list: Vec<String> = origins
        .iter()
        .map(|o| format!("{{ address = \"{}\" }}", o.addr()))
        .collect();
    let list = list.join(", ");
    let a = start(&list);
    let b = start(&list);

    // By source address, over HTTP and TCP passthrough, through either lbd.
    let mut by_source = HashMap::new();
    for i in 0..SOURCES {
        let from = source(i);
        let seen = [
            served_by(from, a.addrs[0], ""),
            served_by(from, b.addrs[0], ""),
            served_by(from, a.addrs[0], ""),
            served_by(from, a.addrs[2], ""),
            served_by(from, b.addrs[2], ""),
        ];
        assert!(
            seen.iter().all(|s| *s == seen[0]),
            "{from}: one backend through both lbds, HTTP and TCP: {seen:?}"
        );
        by_source.insert(i, seen[0].clone());
    }
    let used: HashSet<&String> = by_source.values().collect();
    eprintln!(
        "{SOURCES} sources over {} of 5 backends: {by_source:?}",
        used.len()
    );
    assert!(used.len() >= 3, "the sources spread: {used:?}");

    // By header: one source, 40 users.
    let mut by_user = HashMap::new();
    for u in 0..SOURCES {
        let header = format!("X-User: user{u}\r\n");
        let one = served_by(source(0), a.addrs[1], &header);
        let other = served_by(source(u), b.addrs[1], &header);
        assert_eq!(
            one, other,
            "user{u}: the same backend whatever the lbd and source"
        );
        by_user.insert(u, one);
    }
    let users: HashSet<&String> = by_user.values().collect();
    assert!(users.len() >= 3, "the users spread: {users:?}");

    // One backend removed from lbd a: its sources move, the others stay (Maglev moves a few
    // more in theory, about 0.2% of keys for 5 backends: at most one of 40 here).
    let removed = by_source[&0].clone();
    let index: usize = removed.trim_start_matches('o').parse().unwrap();
    let sock = a.dir().path().join("lbd.sock");
    lbctl_ok(
        &sock,
        &[
            "backend",
            "remove",
            "--cluster",
            "by_ip",
            "--address",
            &origins[index].addr().to_string(),
        ],
    );
    let mut moved_own = 0;
    let mut moved_other = 0;
    for i in 0..SOURCES {
        let now = served_by(source(i), a.addrs[0], "");
        let before = &by_source[&i];
        if *before == removed {
            assert_ne!(now, removed);
            moved_own += 1;
        } else if now != *before {
            moved_other += 1;
        }
    }
    eprintln!(
        "backend {removed} removed: {moved_own} sources moved off it, {moved_other} others moved"
    );
    assert!(moved_own >= 1);
    assert!(
        moved_other <= 1,
        "{moved_other} sources of other backends moved"
    );
}
