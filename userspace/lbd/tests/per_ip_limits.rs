//! Per-client limits in the kernel (`max_connections_per_ip`, `max_connection_rate_per_ip`):
//! the real `lbd` with eBPF steering, real clients bound to different loopback addresses.
//!
//! A client over a limit is refused by the `sk_reuseport` program at its SYN: its connect
//! fails with ECONNREFUSED and no worker accepts anything, while other addresses are served.
//! Open connections are counted by the `sock_ops` program `track` (up when a connection is
//! established, down when it closes), so a client under its limit again is served again;
//! `lbctl upgrade` hands the counts over with the maps. Each test runs in a fresh network
//! namespace (see `common::in_fresh_netns`), whose loopback answers on all of 127.0.0.0/8.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{self, BufReader, ErrorKind, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    field, in_fresh_netns, lbctl_at, lbctl_ok, parse_logfmt, read_head, wait_until, workers_ready,
    Lbd,
};
use lb_testkit::Origin;
use socket2::{Domain, Socket, Type};

const WORKERS: usize = 2;

/// lbd with eBPF steering and one http listener with `limits` (listener keys) in front of
/// `origin`.
fn start(limits: &str, origin: SocketAddr) -> Lbd {
    Lbd::start_until(
        |l| {
            format!(
                "workers = {WORKERS}\nsteering = \"ebpf\"\n\n[[listeners]]\naddress = \"{l}\"\n\
                 {limits}\n\n[clusters.app]\nfrontends = [ {{ address = \"{l}\" }} ]\n\
                 backends = [ {{ address = \"{origin}\" }} ]\n"
            )
        },
        workers_ready(WORKERS),
    )
}

fn source(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `to` from `from` (any port), or the connect error.
fn connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(3))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// One keep-alive GET on `stream`; its status.
fn get(stream: &TcpStream) -> u16 {
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    read_head(&mut reader).expect("a response head").status
}

/// A connection from `from` that is served (200), or a panic naming `what`.
fn served(from: IpAddr, to: SocketAddr, what: &str) -> TcpStream {
    let stream =
        connect_from(from, to).unwrap_or_else(|e| panic!("{what}: connect from {from}: {e}"));
    assert_eq!(get(&stream), 200, "{what}: GET from {from}");
    stream
}

/// Asserts that a connection from `from` is refused with ECONNREFUSED; returns how long the
/// refusal took.
fn refused(from: IpAddr, to: SocketAddr, what: &str) -> Duration {
    let started = Instant::now();
    match connect_from(from, to) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => started.elapsed(),
        Err(e) => panic!("{what}: from {from}: {e}, not ECONNREFUSED"),
        Ok(stream) => {
            // Established: a request tells whether a worker took it.
            let status = get(&stream);
            panic!("{what}: a connection from {from} was accepted (GET: {status})")
        }
    }
}

/// Waits until a connection from `from` is served again (the close of another one has been
/// counted down); panics after 5 s.
fn served_again(from: IpAddr, to: SocketAddr, what: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match connect_from(from, to) {
            Ok(stream) => {
                assert_eq!(get(&stream), 200, "{what}: GET from {from}");
                return stream;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{what}: from {from}, still refused after 5 s: {e}"),
        }
    }
}

/// The per-client drops in the counter line lbd logs for its listener when it stops.
fn drops_on_stop(lbd: &mut Lbd) -> (u64, u64) {
    let status = lbd.shutdown();
    let log = lbd.stderr();
    assert_eq!(status.code(), Some(0), "lbd after SIGTERM: {status}\n{log}");
    let needle = format!("steering {}: decisions per worker [", lbd.addr());
    let line = log
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no counter line {needle:?} in lbd's log:\n{log}"));
    let msg = field(&parse_logfmt(line), "msg").unwrap().to_owned();
    let after = |label: &str| -> u64 {
        let tail = msg
            .split_once(label)
            .unwrap_or_else(|| panic!("no {label:?} in {msg:?}"))
            .1;
        tail.trim()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {label:?} in {msg:?}"))
    };
    (
        after("dropped per-ip-connections"),
        after("dropped per-ip-rate"),
    )
}

/// The number in lbd's access log of requests served (lines on stdout).
fn requests_logged(lbd: &Lbd) -> usize {
    lbd.stdout()
        .lines()
        .filter(|l| l.contains("status="))
        .count()
}

fn socket(lbd: &Lbd) -> PathBuf {
    lbd.dir().path().join("lbd.sock")
}

#[test]
fn a_client_at_its_connection_limit_is_refused_in_the_kernel_and_served_after_a_close() {
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let mut lbd = start("max_connections_per_ip = 3", origin.addr());
        let to = lbd.addr();
        let (a, b) = (source(2), source(3));

        let mut open: Vec<TcpStream> = (0..3)
            .map(|i| served(a, to, &format!("connection {i} of 3")))
            .collect();
        let logged = requests_logged(&lbd);
        let took = refused(a, to, "a fourth connection from one address");
        eprintln!("refused in {took:?}");
        // Another address is not held by the first one's limit.
        let other: Vec<TcpStream> = (0..3)
            .map(|i| served(b, to, &format!("connection {i} from another address")))
            .collect();
        refused(b, to, "a fourth connection from the other address");
        assert!(
            wait_until(Duration::from_secs(2), || requests_logged(&lbd)
                >= logged + 3),
            "the other address's requests are logged"
        );

        // A close counts down: one more is served, then the limit holds again.
        drop(open.pop());
        open.push(served_again(a, to, "after one of three closed"));
        refused(a, to, "at the limit again");
        // All closed: the whole allowance is back.
        drop(open);
        drop(other);
        let again: Vec<TcpStream> = (0..3)
            .map(|i| served_again(a, to, &format!("connection {i} after all closed")))
            .collect();
        refused(a, to, "the fourth after all closed");
        drop(again);

        // At least the four refusals above; `served_again` may have been refused too while
        // a close was on its way.
        let (connections, rate) = drops_on_stop(&mut lbd);
        assert!(
            connections >= 4 && rate == 0,
            "the program counts each refusal as a per-ip-connections drop: {connections}, {rate}"
        );
    });
}

#[test]
fn a_client_over_its_connection_rate_is_refused_and_others_are_not() {
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let mut lbd = start("max_connection_rate_per_ip = \"5/s\"", origin.addr());
        let to = lbd.addr();
        let (a, b) = (source(2), source(3));

        // A burst of the rate is admitted at once; closing them does not give any back.
        let started = Instant::now();
        for i in 0..5 {
            drop(served(a, to, &format!("connection {i} of a burst of 5")));
        }
        let burst = started.elapsed();
        // Only meaningful if the burst took well under the 200 ms that earns one more.
        if burst < Duration::from_millis(150) {
            refused(a, to, "a sixth connection within the same second");
        } else {
            eprintln!("the burst took {burst:?}: the sixth-connection check is skipped");
        }
        for i in 0..5 {
            drop(served(
                b,
                to,
                &format!("connection {i} from another address"),
            ));
        }
        // The rate earns one connection per 200 ms.
        std::thread::sleep(Duration::from_millis(1100));
        drop(served(a, to, "a second later"));

        let (connections, rate) = drops_on_stop(&mut lbd);
        assert_eq!(connections, 0);
        if burst < Duration::from_millis(150) {
            assert!(rate >= 1, "the refusal was counted as per-ip-rate: {rate}");
        }
    });
}

#[test]
fn the_counts_survive_an_upgrade() {
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let mut lbd = start("max_connections_per_ip = 2", origin.addr());
        let to = lbd.addr();
        let a = source(2);
        // Everything the upgrade needs first (the binary's copy, lbctl, which the harness
        // builds when it is older than its sources): the upgrade must come while the slow
        // requests below are in flight.
        let sock = socket(&lbd);
        let binary = common::fresh_binary(lbd.dir().path(), 1);
        let before: serde_json::Value =
            serde_json::from_str(&lbctl_ok(&sock, &["status", "--json"])).unwrap();
        // Two connections with a request in flight for 5 s: the old generation keeps them
        // open through the upgrade, until it has answered.
        let slow: Vec<TcpStream> = (0..2)
            .map(|i| {
                let stream =
                    connect_from(a, to).unwrap_or_else(|e| panic!("slow connection {i}: {e}"));
                (&stream)
                    .write_all(b"GET /sleep/5000 HTTP/1.1\r\nHost: app\r\n\r\n")
                    .unwrap();
                stream
            })
            .collect();
        assert!(
            wait_until(Duration::from_secs(5), || {
                match connect_from(a, to) {
                    Err(e) => e.kind() == ErrorKind::ConnectionRefused,
                    Ok(_) => false,
                }
            }),
            "a third connection is refused before the upgrade"
        );

        let out = lbctl_ok(&sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
        let after: serde_json::Value =
            serde_json::from_str(&lbctl_ok(&sock, &["status", "--json"])).unwrap();
        assert_ne!(after["pid"], before["pid"], "a new main: {out}");
        lbd.follow_main(after["pid"].as_i64().unwrap() as i32);
        // The two requests are still in flight on the old generation: they count, in the
        // maps the new lbd took over.
        refused(a, to, "a third just after the upgrade");
        for (i, stream) in slow.iter().enumerate() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let head = read_head(&mut reader).unwrap_or_else(|e| panic!("slow {i}: {e}"));
            assert_eq!(
                head.status, 200,
                "slow request {i}, answered by the old generation"
            );
        }
        drop(slow);
        let old = before["pid"].as_i64().unwrap() as i32;
        assert!(
            wait_until(Duration::from_secs(30), || !common::process_alive(old)),
            "the old main exits after the upgrade"
        );

        // Their closes were counted; counting goes on with the old lbd gone (the new one
        // holds the link of `track`).
        let mut open: Vec<TcpStream> = (0..2)
            .map(|i| served_again(a, to, &format!("connection {i} after the upgrade")))
            .collect();
        refused(a, to, "a third after the upgrade");
        drop(open.pop());
        open.push(served_again(a, to, "after one closed, upgraded"));
        refused(a, to, "at the limit again, upgraded");
        drop(open);

        // A runtime change of the limit applies to the next SYN.
        let change = lbctl_at(
            &sock,
            &[
                "listener",
                "add",
                "--address",
                "127.0.0.1:1",
                "--max-connections-per-ip",
                "0",
            ],
        );
        assert_ne!(change.code, Some(0), "0 is refused: {change:?}");
        assert!(
            change.stderr.contains("max_connections_per_ip"),
            "the error names the field: {change:?}"
        );
        lbd.shutdown();
    });
}

/// Percentile `p` (0..=100) of `samples`, sorted in place.
fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let index = (samples.len() * p / 100).min(samples.len().saturating_sub(1));
    samples.get(index).copied().unwrap_or_default()
}

/// 150 new connections from `from`, one every 20 ms, each with one GET: the time from connect
/// to the response head of each. Panics if one is not served.
fn paced_requests(from: IpAddr, to: SocketAddr, what: &str) -> Vec<Duration> {
    (0..150)
        .map(|i| {
            let started = Instant::now();
            let stream = served(from, to, &format!("{what}: request {i}"));
            let took = started.elapsed();
            drop(stream);
            std::thread::sleep(Duration::from_millis(20));
            took
        })
        .collect()
}

#[test]
fn a_flood_from_one_address_at_ten_times_its_rate_is_refused_and_another_is_served() {
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let mut lbd = start("max_connection_rate_per_ip = \"100/s\"", origin.addr());
        let to = lbd.addr();
        let (flooder, other) = (source(2), source(3));

        let mut quiet = paced_requests(other, to, "without a flood");

        // 1,000 connection attempts per second for 3 s from one address: 10x its rate.
        let flood = std::thread::spawn(move || {
            let (mut admitted, mut refused) = (0u32, 0u32);
            let started = Instant::now();
            for n in 0..3000u32 {
                let due = started + Duration::from_millis(u64::from(n));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                match connect_from(flooder, to) {
                    Ok(stream) => {
                        admitted += 1;
                        drop(stream);
                    }
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
                    Err(e) => panic!("flood: {e}"),
                }
            }
            (admitted, refused, started.elapsed())
        });
        let mut flooded = paced_requests(other, to, "during the flood");
        let (admitted, refused, took) = flood.join().unwrap();

        eprintln!(
            "flood of {} attempts in {took:?}: {admitted} admitted, {refused} refused; the other \
             address, 150 new connections each: p50 {:?} / p99 {:?} without the flood, p50 {:?} \
             / p99 {:?} during it",
            admitted + refused,
            percentile(&mut quiet, 50),
            percentile(&mut quiet, 99),
            percentile(&mut flooded, 50),
            percentile(&mut flooded, 99),
        );
        // The burst (100) and 100 per second after it, with room for a slow run.
        let allowed = 100 + 100 * took.as_secs_f64().ceil() as u32 + 20;
        assert!(
            admitted <= allowed,
            "{admitted} of the flood admitted in {took:?}, at most {allowed} expected"
        );
        assert!(refused >= 1500, "most of the flood is refused: {refused}");
        let (_, rate) = drops_on_stop(&mut lbd);
        assert!(
            u64::from(refused) <= rate,
            "each refusal is counted as per-ip-rate: {refused} refused, {rate} counted"
        );
    });
}

/// One GET on a new connection from `from`: the status and the `Retry-After` header.
fn get_once(from: IpAddr, to: SocketAddr) -> (u16, Option<String>) {
    let stream = connect_from(from, to).unwrap_or_else(|e| panic!("connect from {from}: {e}"));
    (&stream)
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader).expect("a response head");
    (head.status, head.header("retry-after").map(str::to_owned))
}

/// The 8-hex-digit worker prefixes of the request ids in lbd's access log, for `status`.
fn worker_prefixes(lbd: &Lbd, status: u16) -> std::collections::HashSet<String> {
    lbd.stdout()
        .lines()
        .map(parse_logfmt)
        .filter(|fields| field(fields, "status") == Some(&status.to_string()))
        .filter_map(|fields| field(&fields, "request_id").map(|id| id.chars().take(8).collect()))
        .collect()
}

#[test]
fn a_frontend_rate_limit_answers_429_across_workers_and_protocols() {
    in_fresh_netns(|| {
        let origin = Origin::start("o");
        let metrics = common::free_addr();
        let mut lbd = Lbd::start_until(
            |l| {
                format!(
                    "workers = {WORKERS}\nsteering = \"ebpf\"\n\n[metrics]\naddress = \"{metrics}\"\n\n\
                     [[listeners]]\naddress = \"{l}\"\n\n[clusters.app]\n\
                     frontends = [ {{ address = \"{l}\", rate_limit = \"5/s\" }} ]\n\
                     backends = [ {{ address = \"{}\" }} ]\n",
                    origin.addr()
                )
            },
            workers_ready(WORKERS),
        );
        let to = lbd.addr();
        let (a, b) = (source(2), source(3));

        // 20 requests at once, each on its own connection: the connections spread over both
        // workers, and the limit holds for the address as a whole (per worker, 10 would pass).
        // All connected first, then all sent, then all read: the burst takes milliseconds.
        let started = Instant::now();
        let streams: Vec<TcpStream> = (0..20)
            .map(|i| connect_from(a, to).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect();
        for stream in &streams {
            (&*stream)
                .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                .unwrap();
        }
        let answers: Vec<(u16, Option<String>)> = streams
            .into_iter()
            .map(|stream| {
                let head = read_head(&mut BufReader::new(stream)).expect("a response head");
                (head.status, head.header("retry-after").map(str::to_owned))
            })
            .collect();
        let took = started.elapsed();
        let ok = answers.iter().filter(|(s, _)| *s == 200).count();
        // The burst, and one more per 200 ms the burst took (one for the boundary).
        let earned = usize::try_from(took.as_millis() / 200).unwrap_or(usize::MAX);
        assert!(
            ok >= 5 && ok <= 6 + earned,
            "a burst of 5 in {took:?}: {answers:?}"
        );
        for (status, retry) in &answers {
            assert!(*status == 200 || *status == 429, "{answers:?}");
            if *status == 429 {
                assert_eq!(retry.as_deref(), Some("1"), "429 says when to come back");
            }
        }
        assert!(
            wait_until(Duration::from_secs(5), || worker_prefixes(&lbd, 429).len()
                + worker_prefixes(&lbd, 200).len()
                >= 2),
            "the requests reached both workers (the limit is shared, not per worker):\n{}",
            lbd.stdout()
        );
        // Another address is served.
        assert_eq!(get_once(b, to).0, 200);

        // HTTP/2 (prior knowledge), seven streams on one connection, from 127.0.0.1 (nghttp
        // has no source address option; curl 7.88's reuse of an h2c connection is broken,
        // against nginx as well).
        common::require("nghttp", "nghttp2-client");
        let urls: Vec<String> = (1..=7).map(|i| format!("http://{to}/{i}")).collect();
        let mut args = vec!["-nv".to_owned()];
        args.extend(urls);
        let out = std::process::Command::new("nghttp")
            .args(&args)
            .output()
            .expect("nghttp runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let count = |status: &str| {
            text.lines()
                .filter(|l| l.trim_end().ends_with(&format!(":status: {status}")))
                .count()
        };
        assert_eq!(count("200"), 5, "h2: five of seven streams served:\n{text}");
        assert_eq!(count("429"), 2, "h2: two answered 429:\n{text}");

        // The access log names the cause, and the metrics count it.
        let log = lbd.stdout();
        assert!(
            log.lines().any(|l| l.contains("status=429")
                && l.contains("error=\"over the frontend's rate limit\"")),
            "{log}"
        );
        let expected = 20 - ok + 2;
        let scraped = wait_until(Duration::from_secs(10), || {
            let out = common::curl(&[&format!("http://{metrics}/metrics")]);
            String::from_utf8_lossy(&out.stdout).contains(&format!(
                "kakehi_cluster_rate_limited_total{{cluster=\"app\"}} {expected}"
            ))
        });
        assert!(
            scraped,
            "the metrics count {expected} rate-limited requests"
        );
        lbd.shutdown();
    });
}

#[test]
fn without_cap_net_admin_a_connection_limit_fails_to_start_saying_why() {
    common::require("capsh", "libcap2-bin");
    in_fresh_netns(|| {
        let dir = common::TempDir::new("per-ip-caps");
        let run = |limits: &str| {
            let port = common::free_addr().port();
            let config = dir.write(
                "lbd.toml",
                format!(
                    "workers = 1\nsteering = \"ebpf\"\ncommand_socket = \"{}\"\n\n\
                     [[listeners]]\naddress = \"127.0.0.1:{port}\"\n{limits}\n\n\
                     [clusters.app]\nfrontends = [ {{ address = \"127.0.0.1:{port}\" }} ]\n\
                     backends = [ {{ address = \"127.0.0.1:1\" }} ]\n",
                    dir.path().join("lbd.sock").display()
                ),
            );
            // capsh drops the capabilities from the bounding set, so the lbd it execs (as
            // root) runs without them, as the appliance's unit runs it without CAP_SYS_ADMIN
            // (which the kernel also accepts for sock_ops); lbd is stopped by SIGTERM if it
            // starts.
            let mut child = std::process::Command::new("capsh")
                .args([
                    "--drop=cap_net_admin,cap_sys_admin",
                    "--",
                    "-c",
                    &format!("exec {} --config {}", common::lbd_bin(), config.display()),
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("capsh (libcap2-bin) runs lbd");
            let exited = wait_until(Duration::from_secs(5), || {
                child.try_wait().unwrap().is_some()
            });
            if !exited {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            let out = child.wait_with_output().unwrap();
            (exited, String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let (exited, log) = run("max_connections_per_ip = 10");
        assert!(
            exited,
            "lbd with a connection limit and no CAP_NET_ADMIN started:\n{log}"
        );
        assert!(
            log.contains("CAP_NET_ADMIN") && log.contains("127.0.0.1:"),
            "the error names the listener and the capability:\n{log}"
        );
        // Steering and the rate limit need no CAP_NET_ADMIN: lbd serves (until stopped).
        let (exited, log) = run("max_connection_rate_per_ip = \"10/s\"");
        assert!(!exited, "lbd with a rate limit only stopped:\n{log}");
    });
}
