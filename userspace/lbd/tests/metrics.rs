//! Metrics through a real `lbd` with two workers: a known workload (each request on its own
//! connection, so every byte is counted by the client) and a scrape of `/metrics` read by a
//! real Prometheus text parser must agree exactly — requests by status class per listener,
//! cluster and backend, bytes both ways, connections, connect errors and retries, histogram
//! counts, TLS handshakes and failures — and `lbctl metrics` (table and JSON) says the same.
//! Then `lbctl log-level` changes the level of lbd and of every worker. Slow clients (a head
//! trickled a byte at a time, a silent connection) hold up no scrape and are cut off.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod scrape;

use common::{curl, free_addr, lbctl_bin, run_bounded, wait_until, ClosedPort, Lbd};
use lb_testkit::Origin;
use scrape::{get_metrics, histogram_bucket, histogram_count, scrape, value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Sends `request` on a new connection and reads the answer to the end: (status, bytes read).
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let status = String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&answer)));
    (status, answer.len())
}

fn get_request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[derive(Default, Debug)]
struct Sent {
    requests: [u64; 6],
    bytes_in: usize,
    bytes_out: usize,
}

impl Sent {
    fn add(&mut self, status: u16, request: usize, answer: usize) {
        self.requests[usize::from(status / 100)] += 1;
        self.bytes_in += request;
        self.bytes_out += answer;
    }
    fn total(&self) -> u64 {
        self.requests.iter().sum()
    }
}

fn lbctl(config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(lbctl_bin());
    cmd.arg("--config").arg(config).args(args);
    run_bounded(cmd, Duration::from_secs(20), "lbctl")
}

#[test]
fn scraped_counters_equal_the_workload() {
    let a = Origin::start("a");
    let b = Origin::start("b");
    let (d1, d2) = (ClosedPort::new(), ClosedPort::new());
    let metrics = free_addr();
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/examples/certs");
    let lbd = Lbd::start_multi(2, |l| {
        format!(
            "workers = 2\n[metrics]\naddress = \"{metrics}\"\n\n\
             [[listeners]]\naddress = \"{}\"\n\n\
             [[listeners]]\naddress = \"{}\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{}\", hostname = \"app.test\" }} ]\n\
             backends = [ {{ address = \"{}\" }}, {{ address = \"{}\" }} ]\n\n\
             [clusters.secure]\nfrontends = [ {{ address = \"{}\", hostname = \"app.test\" }} ]\n\
             backends = [ {{ address = \"{}\" }} ]\n\n\
             [clusters.dead]\nfrontends = [ {{ address = \"{}\", hostname = \"dead.test\" }} ]\n\
             backends = [ {{ address = \"{}\" }}, {{ address = \"{}\" }} ]\n",
            l[0],
            l[1],
            certs.join("site.pem").display(),
            certs.join("site.key").display(),
            l[0],
            a.addr(),
            b.addr(),
            l[1],
            a.addr(),
            l[0],
            d1.addr,
            d2.addr,
        )
    });
    let http = lbd.addrs[0];
    let https = lbd.addrs[1];
    // The harness connected to see lbd up: those connections are not the workload's. Once
    // the workers have seen them closed, they are the baseline.
    for addr in [http, https] {
        let label = addr.to_string();
        assert!(wait_until(Duration::from_secs(5), || value(
            &scrape(metrics),
            "kakehi_listener_connections_active",
            &[("listener", &label)]
        )
        .unwrap_or(0.0)
            == 0.0));
    }
    let http_label = http.to_string();
    let connections_before = || {
        value(
            &scrape(metrics),
            "kakehi_listener_connections_total",
            &[("listener", &http_label)],
        )
        .unwrap_or(0.0)
    };
    let before = connections_before();
    let https_label = https.to_string();
    let tls_failures_before = value(
        &scrape(metrics),
        "kakehi_listener_tls_handshake_failures_total",
        &[("listener", &https_label)],
    )
    .unwrap_or(0.0);

    let mut listener = Sent::default();
    let mut app = Sent::default();
    let mut dead = Sent::default();
    let run = |sent: &mut Vec<&mut Sent>, request: Vec<u8>, expect: u16| {
        let (status, len) = exchange(http, &request);
        assert_eq!(status, expect, "{}", String::from_utf8_lossy(&request));
        for s in sent.iter_mut() {
            s.add(status, request.len(), len);
        }
    };
    for i in 0..20 {
        run(
            &mut vec![&mut listener, &mut app],
            get_request("app.test", &format!("/ok{i}")),
            200,
        );
    }
    for _ in 0..6 {
        run(
            &mut vec![&mut listener, &mut app],
            get_request("app.test", "/status/404"),
            404,
        );
    }
    for _ in 0..4 {
        run(
            &mut vec![&mut listener, &mut app],
            get_request("app.test", "/status/503"),
            503,
        );
    }
    for _ in 0..2 {
        let body = "x".repeat(1000);
        let post = format!(
            "POST /digest HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{body}"
        );
        run(&mut vec![&mut listener, &mut app], post.into_bytes(), 200);
    }
    // No route: only the listener counts it.
    for _ in 0..3 {
        run(
            &mut vec![&mut listener],
            get_request("nowhere.test", "/"),
            404,
        );
    }
    // Both backends refuse: two connect errors and one retry per request, then 502.
    for _ in 0..5 {
        run(
            &mut vec![&mut listener, &mut dead],
            get_request("dead.test", "/"),
            502,
        );
    }
    // TLS: three handshakes through curl, two connections that never finish one.
    for _ in 0..3 {
        let out = curl(&[
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: app.test",
            &format!("https://{https}/tls"),
        ]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    drop(TcpStream::connect(https).unwrap());
    let (status, _) = exchange(https, &get_request("app.test", "/plain"));
    assert_eq!(status, 400, "plain HTTP on the TLS port");

    let l = [("listener", http.to_string())];
    let l = [(l[0].0, l[0].1.as_str())];
    let m = scrape(metrics);
    // Connections are counted when the worker closes them, just after the client's EOF.
    assert!(
        wait_until(Duration::from_secs(5), || value(
            &scrape(metrics),
            "kakehi_listener_connections_active",
            &l
        ) == Some(0.0)),
        "every connection closed"
    );
    let class = |name: &str, labels: &[(&str, &str)], c: &str| {
        let mut all = labels.to_vec();
        all.push(("class", c));
        value(&m, name, &all).unwrap_or(0.0) as u64
    };
    for (i, c) in ["", "1xx", "2xx", "3xx", "4xx", "5xx"]
        .iter()
        .enumerate()
        .skip(1)
    {
        assert_eq!(
            class("kakehi_listener_requests_total", &l, c),
            listener.requests[i],
            "listener {c}"
        );
        assert_eq!(
            class("kakehi_cluster_requests_total", &[("cluster", "app")], c),
            app.requests[i],
            "cluster app {c}"
        );
        assert_eq!(
            class("kakehi_cluster_requests_total", &[("cluster", "dead")], c),
            dead.requests[i],
            "cluster dead {c}"
        );
    }
    let v = |name: &str, labels: &[(&str, &str)]| value(&m, name, labels).unwrap_or(-1.0);
    assert_eq!(
        v("kakehi_listener_received_bytes_total", &l),
        listener.bytes_in as f64
    );
    assert_eq!(
        v("kakehi_listener_sent_bytes_total", &l),
        listener.bytes_out as f64
    );
    assert_eq!(
        v("kakehi_cluster_received_bytes_total", &[("cluster", "app")]),
        app.bytes_in as f64
    );
    assert_eq!(
        v("kakehi_cluster_sent_bytes_total", &[("cluster", "app")]),
        app.bytes_out as f64
    );
    assert_eq!(
        v("kakehi_listener_connections_total", &l) - before,
        listener.total() as f64
    );
    assert_eq!(
        histogram_count(&m, "kakehi_listener_request_duration_seconds", &l),
        Some(listener.total() as f64)
    );
    // Each backend: what its origin saw.
    for origin in [&a, &b] {
        let backend = origin.addr().to_string();
        // Summed over the clusters it serves (app, and secure for a).
        let labels = [("backend", backend.as_str())];
        let served = origin.requests().len() as f64;
        assert_eq!(
            v("kakehi_backend_requests_total", &labels),
            served,
            "requests to {backend} (https ones included)"
        );
        assert_eq!(
            v("kakehi_backend_connections_total", &labels),
            origin.connections_accepted() as f64,
            "connections to {backend}"
        );
        assert_eq!(
            histogram_count(&m, "kakehi_backend_response_time_seconds", &labels),
            Some(served)
        );
    }
    assert_eq!(
        v(
            "kakehi_cluster_connect_errors_total",
            &[("cluster", "dead")]
        ),
        10.0
    );
    assert_eq!(
        v("kakehi_cluster_retries_total", &[("cluster", "dead")]),
        5.0
    );
    for d in [&d1, &d2] {
        let backend = d.addr.to_string();
        assert_eq!(
            v(
                "kakehi_backend_connect_errors_total",
                &[("cluster", "dead"), ("backend", backend.as_str())]
            ),
            5.0
        );
    }
    let tls = [("listener", https.to_string())];
    let tls = [(tls[0].0, tls[0].1.as_str())];
    assert_eq!(v("kakehi_listener_tls_handshakes_total", &tls), 3.0);
    assert_eq!(
        v("kakehi_listener_tls_handshake_failures_total", &tls) - tls_failures_before,
        2.0
    );
    for w in ["0", "1"] {
        assert!(
            value(&m, "kakehi_worker_buffers_max", &[("worker", w)]).is_some_and(|x| x > 0.0),
            "worker {w} answered"
        );
        // Each worker's loop turns: it turned at least once per request it served, and turns
        // are not each a millisecond long (the waits for events are not in them).
        let of_worker = [("worker", w)];
        let turns = histogram_count(&m, "kakehi_worker_loop_turn_seconds", &of_worker);
        let quick = histogram_bucket(&m, "kakehi_worker_loop_turn_seconds", &of_worker, 0.001);
        assert!(
            turns.is_some_and(|t| t > 0.0) && quick.is_some_and(|q| q > 0.0),
            "worker {w}: {turns:?} turns, {quick:?} under 1 ms"
        );
    }

    // lbctl metrics: the same figures.
    let out = lbctl(&lbd.config_path, &["metrics", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let samples: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let twos: f64 = samples
        .iter()
        .filter(|s| {
            s["name"] == "kakehi_listener_requests_total"
                && s["labels"]["listener"] == http.to_string()
                && s["labels"]["class"] == "2xx"
        })
        .map(|s| s["value"].as_f64().unwrap())
        .sum();
    assert_eq!(twos, listener.requests[2] as f64);
    let out = lbctl(&lbd.config_path, &["metrics"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("kakehi_cluster_retries_total"), "{table}");
    assert!(!table.contains("_bucket"), "buckets only in --json");

    // The exporter answers only GET /metrics.
    let mut s = TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    let (status, body) = get_metrics(metrics);
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE kakehi_listener_request_duration_seconds histogram"));
}

#[test]
fn log_level_changes_in_main_and_every_worker() {
    let origin = Origin::start("a");
    let lbd = Lbd::start(|l| common::one_cluster("workers = 2\n", l, &[origin.addr()]));
    let config = &lbd.config_path;
    // Each worker logs "configuration update: ok" at info level when a change reaches it.
    let updates = || lbd.stderr().matches("configuration update: ok").count();
    assert!(wait_until(Duration::from_secs(5), || updates() == 2));

    let out = lbctl(config, &["log-level", "warn"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("log level warn (lbd and 2 workers)"),
        "{said}"
    );
    let add = [
        "backend",
        "add",
        "--cluster",
        "app",
        "--address",
        "127.0.0.1:1",
    ];
    assert!(lbctl(config, &add).status.success());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(updates(), 2, "at warn, the workers log no info line");

    let out = lbctl(config, &["log-level", "info"]);
    assert!(out.status.success(), "{out:?}");
    let remove = [
        "backend",
        "remove",
        "--cluster",
        "app",
        "--address",
        "127.0.0.1:1",
    ];
    assert!(lbctl(config, &remove).status.success());
    assert!(
        wait_until(Duration::from_secs(5), || updates() == 4),
        "back at info, both workers log the change:\n{}",
        lbd.stderr()
    );
    let out = lbctl(config, &["log-level", "loud"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown level is a usage error"
    );
    assert!(lbd.stderr().contains("log level set to warn by lbctl"));
}

#[test]
fn counters_survive_a_worker_restart() {
    let origin = Origin::start("a");
    let metrics = free_addr();
    let lbd = Lbd::start(|l| {
        common::one_cluster(
            &format!("[metrics]\naddress = \"{metrics}\"\n"),
            l,
            &[origin.addr()],
        )
    });
    let twos = || {
        value(
            &scrape(metrics),
            "kakehi_cluster_requests_total",
            &[("cluster", "app"), ("class", "2xx")],
        )
        .unwrap_or(0.0)
    };
    for _ in 0..10 {
        assert_eq!(exchange(lbd.addr(), &get_request("x", "/")).0, 200);
    }
    assert_eq!(twos(), 10.0);
    let old = lbd.workers();
    assert_eq!(old.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = lbd.workers();
            now.len() == 1 && now != old
        }),
        "the worker is restarted"
    );
    for _ in 0..5 {
        assert!(wait_until(Duration::from_secs(5), || exchange(
            lbd.addr(),
            &get_request("x", "/")
        )
        .0 == 200));
    }
    assert_eq!(
        twos(),
        15.0,
        "the dead worker's requests (as of its last answer) are still counted"
    );
    assert_eq!(
        value(
            &scrape(metrics),
            "kakehi_worker_restarts_total",
            &[("worker", "0")]
        ),
        Some(1.0)
    );
}

/// The status of one `GET /metrics` (0 when there is no answer within 10 s).
fn scrape_status(addr: SocketAddr) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Issue 12, item 9: the exporter served one client at a time, each read with a 2 s
/// timeout, so a client that sends its head a byte a second held it forever and no scrape
/// got through. Now every scrape has a total deadline (the trickler is cut off) and clients
/// are served concurrently (a scrape gets through while the slow ones wait).
#[test]
fn slow_clients_neither_hold_the_exporter_nor_stay_forever() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let origin = Origin::start("a");
    let metrics = free_addr();
    let _lbd = Lbd::start(|l| {
        common::one_cluster(
            &format!("[metrics]\naddress = \"{metrics}\"\n"),
            l,
            &[origin.addr()],
        )
    });
    assert!(wait_until(Duration::from_secs(10), || scrape_status(
        metrics
    ) == 200));
    let stop = Arc::new(AtomicBool::new(false));
    // Two tricklers (a byte every 500 ms, never the end of the head) and a silent client.
    let tricklers: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            let mut s = TcpStream::connect(metrics).unwrap();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
                    if s.write_all(b"X").is_err() {
                        return Some(started.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                None
            })
        })
        .collect();
    let silent = TcpStream::connect(metrics).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A scrape gets through while they hold their connections.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(scrape_status(metrics));
    });
    let got = rx.recv_timeout(Duration::from_secs(8));
    // The tricklers are cut off by the server (their writes start failing).
    let cut: Vec<_> = {
        let until = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < until && !tricklers.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        tricklers.into_iter().map(|t| t.join().unwrap()).collect()
    };
    drop(silent);
    assert_eq!(
        got,
        Ok(200),
        "a scrape waited behind slow clients (one client at a time)"
    );
    assert!(
        cut.iter().all(Option::is_some),
        "a client trickling its request head was never cut off: {cut:?}"
    );
}

/// The Grafana dashboard in `config/grafana/kakehi.json` asks only for what lbd exports: every
/// metric its queries name is in a real scrape (lbd with eBPF steering, in a fresh network
/// namespace, after some requests), and every label a query groups or filters by is one those
/// samples carry.
#[test]
fn the_grafana_dashboard_asks_for_what_lbd_exports() {
    common::in_fresh_netns(dashboard_queries_exported_metrics);
}

fn dashboard_queries_exported_metrics() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/grafana/kakehi.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");

    let origin = Origin::start("o");
    let backend = origin.addr();
    let metrics = free_addr();
    let lbd = Lbd::start(|l| {
        format!(
            "workers = 2\n[metrics]\naddress = \"{metrics}\"\n\n[[listeners]]\naddress = \"{l}\"\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{l}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n\
             health_check = {{ interval = \"200ms\", timeout = \"100ms\" }}\n"
        )
    });
    for _ in 0..5 {
        exchange(lbd.addr(), &get_request("app", "/"));
    }
    let mut seen = scrape(metrics);
    wait_until(Duration::from_secs(5), || {
        seen = scrape(metrics);
        seen.samples.iter().any(|s| s.metric == "kakehi_backend_up")
    });
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for expr in &exprs {
        // Every metric named, and the labels its `by (...)` and `{...}` use.
        let mut names = Vec::new();
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("kakehi_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
            names.push(&tail[..end]);
            rest = &tail[end..];
        }
        let mut labels: Vec<&str> = Vec::new();
        for part in expr.split("by (").skip(1) {
            let list = part.split(')').next().unwrap();
            labels.extend(list.split(',').map(str::trim).filter(|l| *l != "le"));
        }
        for part in expr.split('{').skip(1) {
            let inside = part.split('}').next().unwrap();
            labels.extend(
                inside
                    .split(',')
                    .filter_map(|m| m.split(['=', '!', '~']).next())
                    .map(str::trim)
                    // A bucket's bound: the parser keeps it in the histogram's value.
                    .filter(|l| !l.is_empty() && *l != "le"),
            );
        }
        assert!(!names.is_empty(), "{expr}");
        for name in names {
            // The parser keeps a histogram's series under its base name.
            let base = name.strip_suffix("_bucket").unwrap_or(name);
            let samples: Vec<_> = seen
                .samples
                .iter()
                .filter(|s| s.metric == name || s.metric == base)
                .collect();
            assert!(!samples.is_empty(), "{name} (in {expr}) is not exported");
            for label in &labels {
                assert!(
                    samples.iter().any(|s| s.labels.contains_key(*label)),
                    "{name} has no label {label} (in {expr})"
                );
            }
        }
    }
}
